"""Random bytes and random damage reach the tokenizer, the manifest reader, the ONNX
reference walker and the sampler; each answers with its own clean error, nothing else."""

import contextlib
import copy
import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgegen.errors import BundleError, SamplingError, TokenizerError
from edgegen.runtime.manifest import parse_manifest, read_manifest
from edgegen.runtime.onnx_refs import external_data_locations
from edgegen.runtime.sampler import Sampler
from edgegen.tokenizer import ByteTokenizer, load_tokenizer, tokenizer_from_dict

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


@given(st.lists(st.integers(-(2**40), 2**40), max_size=50))
def test_tokenizer_decodes_any_ids_or_says_which_is_bad(ids):
    tokenizer = ByteTokenizer()
    try:
        data = tokenizer.decode_bytes(ids)
    except TokenizerError as e:
        assert "id" in str(e)
    else:
        assert len(data) <= len(ids)
        assert isinstance(tokenizer.decode(ids), str)


@given(json_values)
def test_tokenizer_specs(spec):
    with contextlib.suppress(TokenizerError):
        tokenizer_from_dict(spec)


@given(st.binary(max_size=200))
def test_tokenizer_files(data):
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "tokenizer.json").write_bytes(data)
        with pytest.raises(TokenizerError):
            load_tokenizer(Path(tmp))


@pytest.fixture(scope="module")
def valid(trained_bundles):
    bundle = trained_bundles["gpt"][1]
    return bundle, json.loads((bundle / "manifest.json").read_text())


def paths_in(value, prefix=()):
    yield prefix
    if isinstance(value, dict):
        for key, item in value.items():
            yield from paths_in(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from paths_in(item, (*prefix, index))


@settings(max_examples=400)
@given(st.data())
def test_manifest_with_random_damage(valid, data):
    bundle, manifest = valid
    damaged = copy.deepcopy(manifest)
    for _ in range(data.draw(st.integers(1, 3))):
        paths = [p for p in paths_in(damaged) if p]
        if not paths:
            break
        path = data.draw(st.sampled_from(paths))
        parent = damaged
        for key in path[:-1]:
            parent = parent[key]
        if data.draw(st.booleans()):
            parent[path[-1]] = data.draw(json_values)
        elif isinstance(parent, dict):
            del parent[path[-1]]
        else:
            parent.pop(path[-1])
    with contextlib.suppress(BundleError):
        parse_manifest(damaged, bundle)


@given(st.binary(max_size=300) | json_values.map(lambda v: json.dumps(v).encode()))
def test_manifest_files_of_random_bytes(data):
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "manifest.json").write_bytes(data)
        with pytest.raises(BundleError):
            read_manifest(tmp)


@settings(max_examples=100)
@given(st.data())
def test_onnx_walker_on_damaged_models(valid, data):
    bundle, _ = valid
    model = bytearray((bundle / "model.onnx").read_bytes())
    for _ in range(data.draw(st.integers(1, 8))):
        at = data.draw(st.integers(0, len(model) - 1))
        model[at] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(1, len(model)))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        path.write_bytes(bytes(model[:cut]))
        try:
            locations = external_data_locations(path)
        except BundleError:
            pass
        else:
            assert all(isinstance(x, str) for x in locations)


logit_values = st.floats(allow_nan=True, allow_infinity=True, width=32)


@given(
    st.lists(st.lists(logit_values, min_size=3, max_size=3), min_size=1, max_size=3),
    st.fixed_dictionaries(
        {},
        optional={
            "temperature": st.floats(-1, 3) | st.just(0.0),
            "top_k": st.integers(-1, 5),
            "top_p": st.floats(-0.5, 1.5),
            "min_p": st.floats(-0.5, 1.5),
            "repetition_penalty": st.floats(-1, 3),
            "seed": st.integers(0, 3),
        },
    ),
    st.lists(st.integers(-5, 5), max_size=4),
)
def test_sampler_on_any_logits(rows, params, seen):
    try:
        sampler = Sampler(**params)
        tokens = sampler(np.array(rows, dtype=np.float32), [seen] * len(rows), [[]] * len(rows))
    except SamplingError:
        return
    assert tokens.shape == (len(rows),)
    assert all(0 <= t < 3 for t in tokens)
    for row, token in zip(rows, tokens, strict=True):
        assert np.isfinite(row[token])

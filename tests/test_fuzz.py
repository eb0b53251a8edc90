"""Random bytes and random damage reach the tokenizer, the manifest reader, the ONNX
reference walker and the sampler; each answers with its own clean error, nothing else.

Each property also counts its outcomes and asserts that enough of the generated cases
reached the assertions that matter: damage refused (a reader that accepts everything
would pass a test that only allows errors), valid sampler cases sampled."""

import copy
import json
import tempfile
from collections import Counter
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


def share(outcomes: Counter, what: str) -> float:
    return outcomes[what] / max(1, sum(outcomes.values()))


def test_tokenizer_decodes_any_ids_or_says_which_is_bad():
    tokenizer, outcomes = ByteTokenizer(), Counter()

    @given(st.lists(st.integers(-(2**40), 2**40), max_size=50) | st.lists(st.integers(0, 258)))
    def decode(ids):
        try:
            data = tokenizer.decode_bytes(ids)
        except TokenizerError as e:
            assert "id" in str(e)
            assert any(not 0 <= i < 259 for i in ids)  # only a bad id is refused
            outcomes["refused"] += 1
        else:
            assert all(0 <= i < 259 for i in ids)  # every bad id is refused
            assert len(data) <= len(ids)
            assert isinstance(tokenizer.decode(ids), str)
            outcomes["decoded"] += 1

    decode()
    assert share(outcomes, "refused") > 0.2 and share(outcomes, "decoded") > 0.2, outcomes


def test_tokenizer_specs():
    outcomes = Counter()

    @given(json_values)
    def load(spec):
        try:
            tokenizer_from_dict(spec)
        except TokenizerError:
            outcomes["refused"] += 1
        else:
            outcomes["read"] += 1

    load()
    assert share(outcomes, "refused") > 0.95, outcomes  # random JSON is almost never a spec


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


def test_manifest_with_random_damage(valid):
    bundle, manifest = valid
    outcomes = Counter()

    @settings(max_examples=400)
    @given(st.data())
    def damage(data):
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
        try:
            parse_manifest(damaged, bundle)
        except BundleError:
            outcomes["refused"] += 1
        else:  # damage the reader does not look at (a figure of a report, say)
            outcomes["read"] += 1

    damage()
    # most random damage lands where the runtime reads (artifacts, signature, tokenizer,
    # config), so most must be refused (77% are)
    assert share(outcomes, "refused") > 0.6, outcomes


@given(st.binary(max_size=300) | json_values.map(lambda v: json.dumps(v).encode()))
def test_manifest_files_of_random_bytes(data):
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "manifest.json").write_bytes(data)
        with pytest.raises(BundleError):
            read_manifest(tmp)


def test_onnx_walker_on_damaged_models(valid):
    bundle, _ = valid
    original = (bundle / "model.onnx").read_bytes()
    outcomes = Counter()

    @settings(max_examples=100)
    @given(st.data())
    def damage(data):
        model = bytearray(original)
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
                outcomes["refused"] += 1
            else:
                assert all(isinstance(x, str) for x in locations)
                outcomes["read"] += 1

    damage()
    assert share(outcomes, "refused") > 0.8, outcomes  # a cut or flipped message (96% are)


# any float, and often a masked one (-inf), as top-k and suppressed ids leave them
logit_values = st.floats(allow_nan=True, allow_infinity=True, width=32) | st.just(-np.inf)


sampling_params = st.fixed_dictionaries(
    {},
    optional={
        "temperature": st.floats(-1, 3) | st.just(0.0),
        "top_k": st.integers(-1, 5),
        "top_p": st.floats(-0.5, 1.5),
        "min_p": st.floats(-0.5, 1.5),
        "repetition_penalty": st.floats(-1, 3),
        "seed": st.integers(0, 3),
    },
)


def test_sampler_on_any_logits():
    outcomes = Counter()

    @given(
        st.lists(st.lists(logit_values, min_size=3, max_size=3), min_size=1, max_size=3),
        sampling_params,
        st.lists(st.integers(-5, 5), max_size=4),
    )
    def sample(rows, params, seen):
        try:
            sampler = Sampler(**params)
        except SamplingError:
            outcomes["bad parameters"] += 1
            return
        logits = np.array(rows, dtype=np.float32)
        bad_logits = (
            np.isnan(logits).any()
            or np.isposinf(logits).any()
            or not np.isfinite(logits).any(axis=1).all()
        )
        penalized = params.get("repetition_penalty", 1.0) != 1.0
        bad_ids = penalized and not all(0 <= i < 3 for i in seen)
        try:
            tokens = sampler(logits, [seen] * len(rows), [[]] * len(rows))
        except SamplingError:
            assert bad_logits or bad_ids  # refused only for a reason
            outcomes["refused"] += 1
            return
        assert not bad_logits and not bad_ids  # and always for one
        assert tokens.shape == (len(rows),)
        assert all(0 <= t < 3 for t in tokens)
        for row, token in zip(rows, tokens, strict=True):
            assert np.isfinite(row[token])
        outcomes["sampled"] += 1

    sample()
    assert share(outcomes, "sampled") > 0.35, outcomes  # half the cases are valid

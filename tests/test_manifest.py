import json
import re
import shutil

import pytest
import torch

import edgegen.runtime
from edgegen.checkpoint import write_model_files
from edgegen.config import preset
from edgegen.errors import BundleError
from edgegen.export import export_bundle
from edgegen.files import sha256_file
from edgegen.models import build_model
from edgegen.runtime.manifest import read_manifest
from edgegen.runtime.onnx_refs import _CHILDREN, external_data_locations
from edgegen.tokenizer import ByteTokenizer, HFTokenizer
from edgegen.verify import check_files
from tests.hf_tokenizers import byte_level_bpe


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    root = tmp_path_factory.mktemp("bundle")
    torch.manual_seed(0)
    (root / "ckpt").mkdir()
    model = build_model(preset("rnn", "tiny", dim=16, hidden_size=16))
    write_model_files(root / "ckpt", model, ByteTokenizer())
    export_bundle(root / "ckpt", root / "b", formats=["onnx"])
    return root / "b"


@pytest.fixture
def copy(bundle, tmp_path):
    target = tmp_path / "b"
    shutil.copytree(bundle, target)
    return target


def edit(directory, change):
    path = directory / "manifest.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_valid_bundle_reads(bundle):
    manifest = read_manifest(bundle)
    assert manifest.config.family == "rnn" and manifest.artifact("onnx").path == "model.onnx"


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda d: d.update(format_version=5), "bundle format version 5 is not supported"),
        (lambda d: d.update(format_version=3), "export the checkpoint again"),
        (lambda d: d.pop("signature"), "missing the field 'signature'"),
        (lambda d: d.update(format="other"), "not an edgegen bundle"),
        (lambda d: d["artifacts"][0].update(path="/etc/passwd"), "must stay inside the bundle"),
        (lambda d: d["artifacts"][0].update(path="../b/model.onnx"), "must stay inside the bundle"),
        (lambda d: d["artifacts"][0].update(format="tflite"), "unknown format"),
        (lambda d: d["artifacts"][0].update(precision="int3"), "unknown precision"),
        (lambda d: d["artifacts"][0].update(extra=1), "unexpected keyword"),
        (
            lambda d: d["artifacts"][0].update(session_config={"session.load_model_format": "x"}),
            "session_config may only set",
        ),
        (lambda d: d.update(artifacts=[]), "lists no artifacts"),
        (lambda d: d["model"].update(family="cnn"), "unknown model family"),
        (lambda d: d["tokenizer"].update(spec={"type": "bpe", "version": 1}), "tokenizer type"),
        (lambda d: d["tokenizer"].update(file="/etc/passwd"), "must be a path inside the bundle"),
        (lambda d: d["tokenizer"].update(file="../b/tokenizer.json"), "must be a path inside"),
        (lambda d: d["tokenizer"].pop("sha256"), "tokenizer: sha256 must be 64 hex digits"),
        (lambda d: d["generation"].update(eos_token_id=[1, "2"]), "'eos_token_id' has a bad"),
        (lambda d: d["signature"]["state"].append({"input": "x", "output": "y"}), "unknown input"),
    ],
)
def test_invalid_manifests_are_rejected(copy, change, message):
    edit(copy, change)
    with pytest.raises(BundleError, match=message):
        read_manifest(copy)


def test_tampered_artifact_is_rejected(copy):
    data = bytearray((copy / "model.onnx").read_bytes())
    data[-1] ^= 0xFF
    (copy / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="does not match its manifest hash"):
        read_manifest(copy)
    read_manifest(copy, verify_hashes=False)


def test_missing_pieces(copy, tmp_path):
    (copy / "model.onnx").unlink()
    with pytest.raises(BundleError, match=r"missing model\.onnx"):
        read_manifest(copy)
    (copy / "manifest.json").write_text("{")
    with pytest.raises(BundleError, match="cannot read"):
        read_manifest(copy)
    with pytest.raises(BundleError, match="not a bundle"):
        read_manifest(tmp_path)
    with pytest.raises(BundleError, match="not found"):
        read_manifest(tmp_path / "nope")


def test_symlink_out_of_the_bundle_is_rejected(copy, tmp_path):
    outside = tmp_path / "outside.onnx"
    shutil.move(copy / "model.onnx", outside)
    (copy / "model.onnx").symlink_to(outside)
    with pytest.raises(BundleError, match="outside the bundle"):
        read_manifest(copy)


# --- ONNX external data ------------------------------------------------------------


def rehash_model(bundle_dir):
    """Record model.onnx's new hash in the manifest, as a careless editor would."""
    sha256 = sha256_file(bundle_dir / "model.onnx")
    edit(bundle_dir, lambda d: d["artifacts"][0].update(sha256=sha256))


def to_external(bundle_dir, location="weights.bin"):
    """Move model.onnx's weights into `location` and return its path."""
    import onnx

    model = onnx.load(bundle_dir / "model.onnx")
    onnx.save(
        model,
        bundle_dir / "model.onnx",
        save_as_external_data=True,
        location=location,
        size_threshold=0,
    )
    rehash_model(bundle_dir)
    return bundle_dir / location


def point_weights_at(bundle_dir, location):
    """Rewrite every external-data location in model.onnx (onnx refuses to write these)."""
    import onnx

    model = onnx.load(bundle_dir / "model.onnx", load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    (bundle_dir / "model.onnx").write_bytes(model.SerializeToString())
    rehash_model(bundle_dir)


def test_external_data_must_be_hashed_in_the_manifest(copy, bundle):
    weights = to_external(copy)
    with pytest.raises(BundleError, match="a file the manifest does not hash"):
        read_manifest(copy)
    edit(
        copy,
        lambda d: d["artifacts"][0].update(external_data={"weights.bin": sha256_file(weights)}),
    )
    gen = edgegen.runtime.load(copy)
    same = edgegen.runtime.load(bundle)
    assert (
        gen.generate("ab", max_new_tokens=8, seed=1).text
        == same.generate("ab", max_new_tokens=8, seed=1).text
    )
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(BundleError, match=r"weights\.bin does not match its manifest hash"):
        read_manifest(copy)
    weights.unlink()
    with pytest.raises(BundleError, match="which is missing"):
        read_manifest(copy)


@pytest.mark.parametrize(
    "location,message",
    [
        ("../outside.bin", "outside the bundle directory"),
        ("/tmp/outside.bin", "outside the bundle directory"),
        ("sub/../../outside.bin", "outside the bundle directory"),
    ],
)
def test_external_data_outside_the_bundle_is_rejected(copy, location, message):
    to_external(copy)
    point_weights_at(copy, location)
    with pytest.raises(BundleError, match=message):
        read_manifest(copy)


def test_external_data_symlinked_out_of_the_bundle_is_rejected(copy, tmp_path):
    weights = to_external(copy)
    outside = tmp_path / "outside.bin"
    shutil.move(weights, outside)
    weights.symlink_to(outside)
    edit(
        copy,
        lambda d: d["artifacts"][0].update(external_data={"weights.bin": sha256_file(outside)}),
    )
    with pytest.raises(BundleError, match="resolves outside the bundle directory"):
        read_manifest(copy)


def test_the_wire_reader_knows_onnx_field_numbers():
    """onnx_refs walks the protobuf by field number; onnx's own descriptors must agree."""
    import onnx

    messages = {
        "model": onnx.ModelProto,
        "function": onnx.FunctionProto,
        "graph": onnx.GraphProto,
        "node": onnx.NodeProto,
        "attribute": onnx.AttributeProto,
        "sparse": onnx.SparseTensorProto,
        "tensor": onnx.TensorProto,
    }
    kinds = {v: k for k, v in messages.items()}
    kinds[onnx.StringStringEntryProto] = "entry"
    for kind, message in messages.items():
        embedded = {
            f.number: f.message_type.name
            for f in message.DESCRIPTOR.fields
            if f.message_type is not None and f.message_type.name in {m.__name__ for m in kinds}
        }
        for number, kind_name in _CHILDREN[kind].items():
            assert kinds[getattr(onnx, embedded[number])] == kind_name, (kind, number)
        if kind != "tensor":  # only TensorProto's entries are locations
            holders = {n for n, name in embedded.items() if name != "StringStringEntryProto"}
            assert holders <= set(_CHILDREN[kind]), (kind, holders - set(_CHILDREN[kind]))


def test_damaged_model_bytes_give_clean_errors(copy):
    data = (copy / "model.onnx").read_bytes()
    for cut in (7, len(data) // 2, len(data) - 3):
        (copy / "model.onnx").write_bytes(data[:cut])
        with pytest.raises(BundleError, match="not a readable ONNX model"):
            external_data_locations(copy / "model.onnx")
    (copy / "model.onnx").write_bytes(b"")
    with pytest.raises(BundleError, match="is empty"):
        external_data_locations(copy / "model.onnx")


# --- the tokenizer file --------------------------------------------------------------


def test_damaged_byte_tokenizer_file_is_rejected(copy):
    (copy / "tokenizer.json").write_text("{}")
    with pytest.raises(BundleError, match=r"tokenizer\.json does not match its manifest hash"):
        read_manifest(copy)
    manifest = read_manifest(copy, verify_hashes=False)
    assert [c.passed for c in check_files(manifest)] == [True, False]  # model.onnx, tokenizer


@pytest.fixture(scope="module")
def hf_bundle(tmp_path_factory):
    """An RNN whose 400 embedding rows outnumber its byte-level BPE tokenizer's ids."""
    root = tmp_path_factory.mktemp("hf-bundle")
    torch.manual_seed(0)
    tokenizer = HFTokenizer.from_hf(
        byte_level_bpe(), {"eos_token": "<|endoftext|>"}, {"eos_token_id": [0, 2]}, 400
    )
    (root / "ckpt").mkdir()
    model = build_model(preset("rnn", "tiny", dim=16, hidden_size=16, vocab_size=400))
    write_model_files(root / "ckpt", model, tokenizer)
    export_bundle(root / "ckpt", root / "b", formats=["onnx"])
    return root / "b", tokenizer


@pytest.fixture
def hf_copy(hf_bundle, tmp_path):
    shutil.copytree(hf_bundle[0], tmp_path / "b")
    return tmp_path / "b"


def test_hf_tokenizer_round_trips_through_the_bundle(hf_bundle):
    bundle, tokenizer = hf_bundle
    manifest = read_manifest(bundle)
    assert manifest.tokenizer == tokenizer and manifest.tokenizer.vocab_size == 400
    assert (bundle / "tokenizer.json").read_text() == byte_level_bpe()  # verbatim
    assert sorted(p.name for p in bundle.iterdir()) == [
        "manifest.json",
        "model.onnx",
        "tokenizer.json",
    ]
    assert manifest.data["tokenizer"]["sha256"] == sha256_file(bundle / "tokenizer.json")
    assert manifest.generation["eos_token_id"] == [0, 2] and not manifest.generation["add_bos"]
    prompt = "<|im_start|>user\n東京 🚀<|im_end|>"
    result = edgegen.runtime.load(bundle).generate(prompt, max_new_tokens=6, temperature=0)
    assert result.prompt_tokens == len(tokenizer.encode(prompt))
    assert all(0 <= t < 400 for t in result.token_ids)
    assert [c.passed for c in check_files(manifest)] == [True, True]


def test_generation_stops_at_any_eos_id(hf_bundle):
    generator = edgegen.runtime.load(hf_bundle[0])
    free = generator.generate("hello", max_new_tokens=4, temperature=0, eos_token_id=[])
    first = free.token_ids[0]
    stopped = generator.generate("hello", max_new_tokens=4, temperature=0, eos_token_id=[2, first])
    assert stopped.finish_reason == "eos" and stopped.token_ids == []
    held = generator.generate(
        "hello", max_new_tokens=4, temperature=0, eos_token_id=[2, first], min_new_tokens=2
    )
    assert len(held.token_ids) >= 2 and first not in held.token_ids[:2]


def too_many_ids() -> str:
    from tokenizers import Tokenizer as Backend

    backend = Backend.from_str(byte_level_bpe())
    backend.add_tokens([f"<extra_{i}>" for i in range(40)])
    return backend.to_str()


@pytest.mark.parametrize(
    "content,message",
    [
        ("", r"tokenizer file .*tokenizer\.json is empty"),
        ("{", "tokenizer.json is not a Hugging Face tokenizer"),
        ('{"version": "1.0"}', "tokenizer.json is not a Hugging Face tokenizer"),
        (None, r"has ids up to \d+, beyond the model's vocab_size 400"),
    ],
)
def test_damaged_hf_tokenizer_files_give_one_line(hf_copy, content, message):
    path = hf_copy / "tokenizer.json"
    path.write_text(too_many_ids() if content is None else content)
    with pytest.raises(BundleError, match=r"tokenizer\.json does not match its manifest hash"):
        edgegen.runtime.load(hf_copy)
    edit(hf_copy, lambda d: d["tokenizer"].update(sha256=sha256_file(path)))  # a careless editor
    for read in (read_manifest, edgegen.runtime.load):
        with pytest.raises(BundleError, match=message) as error:
            read(hf_copy)
        assert "\n" not in str(error.value)
    check = check_files(read_manifest(hf_copy, verify_hashes=False))[-1]
    assert not check.passed and re.search(message, check.detail)


def test_hf_tokenizer_file_follows_the_artifact_path_rules(hf_copy, tmp_path):
    outside = tmp_path / "outside.json"
    shutil.move(hf_copy / "tokenizer.json", outside)
    (hf_copy / "tokenizer.json").symlink_to(outside)
    with pytest.raises(BundleError, match="resolves outside the bundle directory"):
        edgegen.runtime.load(hf_copy)
    (hf_copy / "tokenizer.json").unlink()
    with pytest.raises(BundleError, match=r"is missing tokenizer\.json"):
        read_manifest(hf_copy)
    edit(hf_copy, lambda d: d["tokenizer"].update(file="/etc/passwd"))
    with pytest.raises(BundleError, match="'/etc/passwd' must be a path inside the bundle"):
        edgegen.runtime.load(hf_copy)


def test_hf_spec_in_the_manifest_is_checked(hf_copy):
    edit(hf_copy, lambda d: d["tokenizer"]["spec"].update(eos_ids=[400]))
    with pytest.raises(BundleError, match="eos_ids id 400 is not in the vocabulary"):
        read_manifest(hf_copy)


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda d: d["generation"].update(max_seq_len=100000), "max_seq_len 100000 must be"),
        (lambda d: d["generation"].update(max_seq_len=129), "max_seq_len 129 must be"),
        (lambda d: d["generation"].update(max_seq_len=None), "max_seq_len None must be"),
        (lambda d: d["generation"].pop("max_seq_len"), "max_seq_len None must be"),
        (lambda d: d["generation"].update(max_seq_len=0), "max_seq_len 0 must be"),
        (lambda d: d["signature"]["layout"].update(max_seq_len=64), "context of 64 tokens"),
    ],
)
def test_a_context_beyond_the_models_is_refused(trained_bundles, tmp_path, change, message):
    """Past the graph's positions generation would fail mid-run; the manifest says so first."""
    shutil.copytree(trained_bundles["gpt"][1], tmp_path / "b")
    edit(tmp_path / "b", change)
    with pytest.raises(BundleError, match=message):
        read_manifest(tmp_path / "b")


def test_a_context_within_the_models_is_kept(trained_bundles, tmp_path, copy):
    shutil.copytree(trained_bundles["gpt"][1], tmp_path / "gpt")
    edit(tmp_path / "gpt", lambda d: d["generation"].update(max_seq_len=64))
    gen = edgegen.runtime.load(tmp_path / "gpt")
    assert gen.context == 64 and gen.generate("ab", max_new_tokens=61).finish_reason
    edit(copy, lambda d: d["generation"].update(max_seq_len=100000))  # an RNN has no limit
    assert read_manifest(copy).generation["max_seq_len"] == 100000

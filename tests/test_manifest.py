import json
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
from edgegen.tokenizer import ByteTokenizer


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
        (lambda d: d.update(format_version=3), "bundle format version 3 is not supported"),
        (lambda d: d.update(format_version=1), "export the checkpoint again"),
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

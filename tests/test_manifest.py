import json
import shutil

import pytest
import torch

from edgegen.checkpoint import write_model_files
from edgegen.config import preset
from edgegen.errors import BundleError
from edgegen.export import export_bundle
from edgegen.models import build_model
from edgegen.runtime.manifest import read_manifest
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
        (lambda d: d.update(format_version=2), "bundle format version 2 is not supported"),
        (lambda d: d.pop("signature"), "missing the field 'signature'"),
        (lambda d: d.update(format="other"), "not an edgegen bundle"),
        (lambda d: d["artifacts"][0].update(path="/etc/passwd"), "must stay inside the bundle"),
        (lambda d: d["artifacts"][0].update(path="../b/model.onnx"), "must stay inside the bundle"),
        (lambda d: d["artifacts"][0].update(format="tflite"), "unknown format"),
        (lambda d: d["artifacts"][0].update(precision="int3"), "unknown precision"),
        (lambda d: d["artifacts"][0].update(extra=1), "unexpected keyword"),
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

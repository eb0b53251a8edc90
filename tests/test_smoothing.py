"""Activation smoothing before int8 weights, and the block sizes a transformer's int8 tries."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from edgegen.errors import QualityGateError
from edgegen.export import QuantizeOptions, export_bundle
from edgegen.export import writer as export_writer
from edgegen.export.onnx import export_onnx
from edgegen.export.quantize import output_head, quantize_onnx
from edgegen.export.smoothing import smooth, smoothing_sites
from edgegen.export.spec import step_spec
from tests.test_export import make_checkpoint

LLAMA = dict(norm="rmsnorm", mlp="gated", activation="silu", pos_encoding="rope", n_kv_heads=2)
KINDS = {"llama": LLAMA, "gpt": {}}  # the GPT: LayerNorm (a bias to divide too), plain MLP
SITES = {"llama": 3, "gpt": 2}  # per layer: both norms, and the gated product
WEIGHTS = {"llama": 4, "gpt": 2}  # per layer, scaled: qkv, up (and gate, down)
COPIES = {"llama": 2, "gpt": 4}  # per layer: both norms' gains (and biases)


def _graph(tmp_path, kind, outlier=None, norms="untrained"):
    """A random tiny GPT's fp32 step graph and feeds of one prompt; `outlier` scales one
    channel of the first attention norm's output up and the weights that read it down:
    the same function, with an activation channel like a pretrained model's. Untrained
    norms have gains of one and biases of zero (the exporter shares them); "random" ones
    have their own."""
    from edgegen.checkpoint import load_checkpoint

    model, _ = load_checkpoint(make_checkpoint(tmp_path / "ck", "gpt", **KINDS[kind]))
    if norms == "random":
        torch.manual_seed(2)
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, torch.nn.LayerNorm | torch.nn.RMSNorm):
                    module.weight.copy_(1 + 0.3 * torch.randn_like(module.weight))
                    if getattr(module, "bias", None) is not None:
                        module.bias.copy_(0.3 * torch.randn_like(module.bias))
    if outlier:
        block = model.blocks[0]
        with torch.no_grad():
            block.norm1.weight[3] *= outlier
            qkv = next(m for m in block.attn.modules() if isinstance(m, torch.nn.Linear))
            qkv.weight[:, 3] /= outlier
    spec = step_spec(model)
    path = tmp_path / "model.onnx"
    export_onnx(spec, path)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    feeds = {k: v.numpy() for k, v in spec.prefill_feeds(ids).items()}
    return path, feeds


def _logits(model_or_path, feeds) -> np.ndarray:
    source = model_or_path if isinstance(model_or_path, str) else model_or_path.SerializeToString()
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"]).run(["logits"], feeds)[
        0
    ]


@pytest.mark.parametrize("norms", ["untrained", "random"])
@pytest.mark.parametrize("kind", KINDS)
def test_smoothing_keeps_the_fp32_logits(tmp_path, kind, norms):
    """Every norm and gated product is a site, the head never is; the smoothed graph
    computes what the original did, with other weights (a norm's gain and bias divided,
    shared ones copied first)."""
    path, feeds = _graph(tmp_path, kind, norms=norms)
    model = onnx.load(str(path))
    head = output_head(model)
    layers = 2
    assert len(smoothing_sites(model, {head.name})) == SITES[kind] * layers
    before = {t.name: onnx.numpy_helper.to_array(t).copy() for t in model.graph.initializer}
    assert smooth(model, [feeds], skip={head.name}) == SITES[kind] * layers
    after = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    changed = [n for n in before if not np.array_equal(before[n], after[n])]
    if norms == "untrained":  # the weights changed; the shared gains were copied
        assert len(changed) == WEIGHTS[kind] * layers
        assert len(after) - len(before) == COPIES[kind] * layers
    else:  # the weights and the norms' own gains (and biases) changed
        assert len(changed) == (WEIGHTS[kind] + COPIES[kind]) * layers
        assert len(after) == len(before)
    np.testing.assert_allclose(_logits(model, feeds), _logits(str(path), feeds), atol=1e-4)


def test_smoothing_rescues_int8_from_an_outlying_channel(tmp_path):
    """One activation channel 300x the rest leaves its int8 block a few levels; smoothed
    first, the int8 graph is several times closer to fp32."""
    path, feeds = _graph(tmp_path, "llama", outlier=300.0)
    want = _logits(str(path), feeds)
    errors = {}
    for name, calibration in (("plain", None), ("smoothed", [feeds])):
        out = tmp_path / f"{name}.int8.onnx"
        coverage = quantize_onnx(path, out, "int8", 64, calibration=calibration)
        assert ("smoothed" in coverage["method"]) == (calibration is not None)
        errors[name] = float(np.abs(_logits(str(out), feeds) - want).max())
    assert errors["smoothed"] * 3 < errors["plain"], errors


@pytest.mark.parametrize(
    "asked,failures,tried",
    [(None, 0, [64]), (None, 1, [64, 32]), (32, 0, [32])],
    ids=["64", "64-fails", "asked-32"],
)
def test_transformer_int8_tries_blocks_of_64_then_32(tmp_path, monkeypatch, asked, failures, tried):
    """Blocks of 64 first, 32 when they fail the gate, named in the method with their
    figures; a block size asked for is the only one tried."""
    calls = []

    def gate(spec, run, name, precision, gate, windows):
        calls.append(name)
        if len(calls) <= failures:
            figures = {"kl": 1.0, "top1": 0.9, "ppl_change": 0.01}
            raise QualityGateError(f"{name} fails its gate", figures)
        return {"precision": precision, "gate": {}, "quality": {}, "passed": True}

    monkeypatch.setattr(export_writer, "gate_quantized", gate)
    ckpt = make_checkpoint(tmp_path / "ck", "gpt", **LLAMA)
    options = QuantizeOptions(precisions=("int8",), block_size=asked)
    manifest = export_bundle(ckpt, tmp_path / "b", formats=["onnx"], quantize=options)
    method = manifest.artifact("onnx", "int8").quantization["method"]
    assert calls == ["model.int8.onnx"] * len(tried)
    assert f"blocks of {tried[-1]}," in method and "activations smoothed" in method
    assert method.count("failed the gate") == failures
    if failures:
        assert "symmetric round-to-nearest in blocks of 64 failed the gate: KL 1.00e+00" in method
    graph = onnx.load(str(tmp_path / "b" / "model.int8.onnx")).graph
    blocks = {
        a.i
        for n in graph.node
        if n.op_type == "MatMulNBits"
        for a in n.attribute
        if a.name == "block_size"
    }
    assert blocks == {tried[-1]}


def test_calibration_reads_the_training_split_or_nothing():
    """Calibration rows come from the embedded corpus's training split (the gates read
    its validation split); a tokenizer that cannot encode it gets none, so no smoothing."""
    from edgegen.config import preset
    from edgegen.corpus import load_corpus
    from edgegen.export.parity import CALIBRATION_ROWS, QUALITY_WINDOW, calibration_windows
    from edgegen.models import build_model
    from edgegen.tokenizer import ByteTokenizer

    spec = step_spec(build_model(preset("gpt", "tiny")))
    rows = calibration_windows(ByteTokenizer(), spec)
    assert rows.shape == (CALIBRATION_ROWS, QUALITY_WINDOW)
    first = ByteTokenizer().encode(load_corpus(None).train[0], bos=True, eos=True)
    n = min(len(first), rows.numel())
    assert rows.flatten()[:n].tolist() == first[:n]

    class Unknowing:  # every token unknown: a word vocabulary of other text
        unk_id = 0

        def encode(self, text, bos=False, eos=False):
            return [0] * len(text)

    assert calibration_windows(Unknowing(), spec) is None

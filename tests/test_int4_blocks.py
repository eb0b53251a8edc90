"""The block sizes a transformer's ONNX int4 tries: 128, 64, 32 (those that divide its
widths), each with every fit, unless its weights already sit on a 4-bit grid."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from edgegen.checkpoint import load_checkpoint, write_model_files
from edgegen.errors import QualityGateError
from edgegen.export import QuantizeOptions, export_bundle
from edgegen.export import writer as export_writer
from edgegen.export.onnx import export_onnx
from edgegen.export.quantize import INT4_FITS, four_bit_grid, quantize_onnx
from edgegen.export.spec import step_spec
from edgegen.tokenizer import ByteTokenizer
from tests.test_export import make_checkpoint

WIDE = dict(dim=128, n_heads=4)  # widths 128 and 512: every block size divides them


def q4_1(w: np.ndarray, block: int) -> np.ndarray:
    """`w` [out, in] as a Q4_1 file holds it: 16 levels from each block's minimum."""
    blocks = w.reshape(w.shape[0], -1, block)
    low, high = blocks.min(-1, keepdims=True), blocks.max(-1, keepdims=True)
    step = np.where(high > low, (high - low) / 15, 1)
    return (low + np.round((blocks - low) / step) * step).reshape(w.shape).astype(np.float32)


def test_four_bit_grid_finds_the_blocks_weights_were_quantized_in():
    w = np.random.default_rng(0).standard_normal((8, 256)).astype(np.float32)
    assert four_bit_grid([w]) is None  # float weights: 32 values in a block of 32
    assert four_bit_grid([q4_1(w, 32)]) == 32
    assert four_bit_grid([q4_1(w, 64)]) == 64  # 16 levels a block of 64: and of 32
    assert four_bit_grid([q4_1(w, 128), q4_1(w, 32)]) == 32  # every matrix must fit
    assert four_bit_grid([q4_1(w, 32)[:, :48]]) is None  # not a whole number of blocks
    assert four_bit_grid([q4_1(w, 32)[:, :96]]) == 32  # 96 inputs: no block of 64 or 128
    assert four_bit_grid([]) is None


def _gate_failing(calls: list, failures: int):
    def gate(spec, run, name, precision, gate, windows):
        calls.append(name)
        if len(calls) <= failures:
            raise QualityGateError(f"{name} fails", {"kl": 1.0, "top1": 0.9, "ppl_change": 0.2})
        return {"precision": precision, "gate": {}, "quality": {}, "passed": True}

    return gate


def _blocks(path) -> dict[int, set[int]]:
    """Block sizes of the graph's MatMulNBits, by bits."""
    found: dict[int, set[int]] = {}
    for node in onnx.load(str(path)).graph.node:
        if node.op_type == "MatMulNBits":
            attrs = {a.name: a.i for a in node.attribute}
            found.setdefault(attrs["bits"], set()).add(attrs["block_size"])
    return found


@pytest.mark.parametrize(
    "overrides,asked,failures,used",
    [
        (WIDE, None, 0, 128),
        (WIDE, None, len(INT4_FITS), 64),  # every fit in blocks of 128 failed
        ({}, None, 0, 64),  # the tiny preset's width 64: 128 is not tried
        (WIDE, 32, 0, 32),
    ],
    ids=["128", "128-fails", "width-64", "asked-32"],
)
def test_transformer_int4_tries_blocks_of_128_then_64_then_32(
    tmp_path, monkeypatch, overrides, asked, failures, used
):
    calls = []
    monkeypatch.setattr(export_writer, "gate_quantized", _gate_failing(calls, failures))
    ckpt = make_checkpoint(tmp_path / "ck", "gpt", **overrides)
    options = QuantizeOptions(precisions=("int4",), block_size=asked)
    manifest = export_bundle(ckpt, tmp_path / "b", formats=["onnx"], quantize=options)
    method = manifest.artifact("onnx", "int4").quantization["method"]
    assert len(calls) == failures + 1
    assert method.startswith(f"MatMulNBits int4 (symmetric blocks of {used},")
    assert "the output head, which is int8 in blocks of 32" in method
    if failures:
        assert "HQQ-fitted asymmetric round-to-nearest in blocks of 128 failed" in method
    assert _blocks(tmp_path / "b" / "model.int4.onnx") == {4: {used}, 8: {32}}


def test_weights_on_a_4_bit_grid_keep_its_blocks(tmp_path, monkeypatch):
    """A model whose layer weights are Q4_1 blocks of 32 (a GGUF import) is quantized in
    blocks of 32 only: coarser blocks would put them on another grid."""
    ckpt = make_checkpoint(tmp_path / "ck", "gpt", **WIDE)
    model, _ = load_checkpoint(ckpt)
    with torch.no_grad():
        for module in model.blocks.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.copy_(torch.from_numpy(q4_1(module.weight.numpy(), 32)))
    gridded = tmp_path / "gridded"
    gridded.mkdir()
    write_model_files(gridded, model, ByteTokenizer())
    calls = []
    monkeypatch.setattr(export_writer, "gate_quantized", _gate_failing(calls, 0))
    options = QuantizeOptions(precisions=("int4",))
    manifest = export_bundle(gridded, tmp_path / "b", formats=["onnx"], quantize=options)
    assert "blocks of 32" in manifest.artifact("onnx", "int4").quantization["method"]
    assert _blocks(tmp_path / "b" / "model.int4.onnx")[4] == {32}


@pytest.mark.parametrize("fit", INT4_FITS)
def test_int4_in_blocks_of_128_stays_near_blocks_of_32(tmp_path, fit):
    """Every fit in blocks of 128 (HQQ's residual blocks included) computes what the fp32
    graph computes about as closely as in blocks of 32 (a random model: its logits' spread
    is small, so the error is compared with both)."""
    model, _ = load_checkpoint(make_checkpoint(tmp_path / "ck", "gpt", **WIDE))
    spec = step_spec(model)
    path = tmp_path / "model.onnx"
    export_onnx(spec, path)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    feeds = {k: v.numpy() for k, v in spec.prefill_feeds(ids).items()}

    def logits(p):
        session = ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])
        return session.run(["logits"], feeds)[0]

    want, error = logits(path), {}
    for block in (32, 128):
        out = tmp_path / f"int4-{block}.onnx"
        quantize_onnx(path, out, "int4", block, fit=fit)
        assert _blocks(out)[4] == {block}
        error[block] = float(np.sqrt(np.mean((logits(out) - want) ** 2)))
    assert error[128] < 1.5 * error[32] and error[128] < 0.2 * want.std(), (error, want.std())

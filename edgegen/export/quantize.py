"""Quantized artifacts from the fp32 ones, and what each quantization covered.

    onnx int8         GPT: MatMulNBits 8-bit (blocks of 64 or 32) for every MatMul, the
                      head included, after activation smoothing when calibration text
                      is given (smoothing.py); embedding int8 per row. RNN: ONNX Runtime
                      dynamic quantization (MatMul -> MatMulInteger, per-channel int8
                      weights); the embedding and the weights of native RNN/GRU/LSTM
                      ops (which ORT's quantizer skips) stored int8 with per-row
                      scales behind a DequantizeLinear
    onnx int4         MatMulNBits (block-wise int4, block 32 by default; HQQ-fitted
                      asymmetric blocks for transformers) for every MatMul but the
                      output head; RNN weights int4 in blocks behind a DequantizeLinear
                      (opset 21); head and embedding int8 per row
    onnx fp16         float16 weights and compute, float32 inputs and outputs (GPU)
    torchscript int8  torch dynamic quantization of Linear, GRU and LSTM layers and an
                      8-bit embedding, then traced like fp32

Before quantizing, a weight the graph only transposes (a tied output head) is
stored transposed, so the quantizers see it as the constant it is.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper, version_converter

from edgegen.errors import ExportError
from edgegen.export.smoothing import smooth
from edgegen.quiet import quiet

QUANTIZED_PRECISIONS = ("int8", "int4", "fp16")
SUPPORTED = {("onnx", "int8"), ("onnx", "int4"), ("onnx", "fp16"), ("torchscript", "int8")}
FILENAMES = {
    ("onnx", "int8"): "model.int8.onnx",
    ("onnx", "int4"): "model.int4.onnx",
    ("onnx", "fp16"): "model.fp16.onnx",
    ("torchscript", "int8"): "model.int8.ts",
}
RNN_OPS = ("RNN", "GRU", "LSTM")
DEFAULT_BLOCK_SIZE = 32
INT8_BLOCKS = (64, 32)  # a transformer's ONNX int8 tries these in turn (writer._attempts)
# and its int4 these (the 4-bit kernel's pace is set by its blocks: about 52, 37 and 26
# G weights/s a thread here), unless its weights already sit on a 4-bit grid (four_bit_grid)
INT4_BLOCKS = (128, 64, 32)
DEFAULT_ACCURACY_LEVEL = 4  # MatMulNBits computes with int8 activations (fastest on CPU)
# how transformer int4 blocks are fitted (_onnx_nbits), fastest to run first
FIT_NAMES = {"rtn": "symmetric", "asym": "asymmetric", "hqq": "HQQ-fitted asymmetric"}
INT4_FITS = tuple(FIT_NAMES)


def quantize_onnx(
    src: Path,
    dst: Path,
    precision: str,
    block_size: int | None = None,
    accuracy_level: int = DEFAULT_ACCURACY_LEVEL,
    fit: str = "rtn",
    calibration: list[dict[str, np.ndarray]] | None = None,
) -> dict[str, Any]:
    """Write the `precision` version of the fp32 ONNX `src` to `dst`; return its coverage.
    `fit`: how a transformer's int4 blocks are fitted, one of INT4_FITS (see _onnx_nbits).
    `calibration`: step feeds on which a transformer's int8 activations are measured and
    smoothed into its weights (smoothing.py); None leaves them as they are."""
    block_size = DEFAULT_BLOCK_SIZE if block_size is None else block_size
    model = fold_constant_transposes(onnx.load(str(src)))
    smoothed = 0
    if precision == "int8" and calibration and not _is_rnn(model):
        head = output_head(model)
        smoothed = smooth(model, calibration, skip={head.name} if head is not None else set())
    # ORT's quantizer logs every node, and importing it sets the root logger to INFO
    with tempfile.TemporaryDirectory() as tmp, quiet("", "onnxruntime.quantization"):
        prepared = Path(tmp) / "prepared.onnx"
        onnx.save(model, str(prepared))
        if precision == "int8" and not _is_rnn(model):  # why: _onnx_dynamic_int8
            method = _onnx_nbits(prepared, dst, 8, block_size, accuracy_level)
        elif precision == "int8":
            method = _onnx_dynamic_int8(prepared, dst)
        elif precision == "int4":
            method = _onnx_nbits(prepared, dst, 4, block_size, accuracy_level, fit)
        elif precision == "fp16":
            method = _onnx_fp16(prepared, dst)
        else:
            choices = ", ".join(QUANTIZED_PRECISIONS)
            raise ExportError(f"ONNX has no {precision} quantization; choose from {choices}")
    if smoothed:
        method += f"; activations smoothed into the weights at {smoothed} norms and gated products"
    quantized = onnx.load(str(dst))
    coverage = {"method": method, **onnx_coverage(quantized)}
    if _folds_at_load(quantized):
        coverage["session_config"] = {"session.disable_quant_qdq": "1"}
    return coverage


def _folds_at_load(model: onnx.ModelProto) -> bool:
    """Whether ONNX Runtime should fold the graph's weight-only DequantizeLinear into
    float weights at load. ORT has no integer GRU/LSTM/RNN kernel, so unfolded, every
    step dequantizes every RNN weight (3.7x slower than fp32 for int8 on a small GRU);
    a GPT graph dequantizes its whole embedding table per step (folded: 4-6% faster on a
    tiny model, identical logits; the heads of quantized GPTs are MatMulNBits, never a
    DequantizeLinear, so folding never turns a head back into float32)."""
    return any(n.op_type == "DequantizeLinear" for n in model.graph.node)


def _onnx_dynamic_int8(src: Path, dst: Path) -> str:
    """RNN int8 (their MatMuls are the head alone). Transformers get MatMulNBits 8-bit for
    every MatMul, the head included, instead: ORT's dynamic quantization scales each
    activation tensor as a whole, and the outlier channels of pretrained models leave
    the rest of it a few levels (SmolLM2-135M: top-1 54%, perplexity +81%); block-wise
    weights keep them apart. A per-row int8 head cost SmolLM2 2 points of top-1
    agreement over a block-wise one."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        str(src),
        str(dst),
        weight_type=QuantType.QInt8,
        per_channel=True,
        op_types_to_quantize=["MatMul", "Gemm"],
        extra_options={"MatMulConstBOnly": True},
    )
    model = onnx.load(str(dst))
    quantize_rnn_weights(model)
    quantize_embeddings(model)
    onnx.save(model, str(dst))
    return (
        "onnxruntime dynamic int8 MatMul (per-channel weights); embedding and RNN weights "
        "int8 weight-only (per-row scales)"
    )


def _is_rnn(model: onnx.ModelProto) -> bool:
    return any(n.op_type in RNN_OPS for n in model.graph.node)


def _onnx_nbits(
    src: Path, dst: Path, bits: int, block_size: int, accuracy_level: int, fit: str = "rtn"
) -> str:
    """MatMulNBits weights; `fit` (transformer int4 only) says how each block's grid is
    chosen. "rtn" rounds to the nearest of a symmetric grid; "asym" to the nearest of
    a grid from the block's minimum to its maximum, with a 4-bit zero point that
    MatMulNBits' own kernel takes; "hqq" fits a scale and a float zero point by HQQ's
    half-quadratic search, which can land on the grid the weights came from (SmolLM2-135M,
    weights from a Q4_1 GGUF: round-to-nearest cost +21% perplexity, HQQ none).
    MatMulNBits runs float zero points on a kernel 10x slower, so they are rounded and
    their residuals become extra 4-bit inputs of the fast kernel (move_zero_points_out),
    at the cost of a block sum per input and a little precision: HQQ is the last
    resort, not the default."""
    if fit not in INT4_FITS:
        raise ExportError(f"int4 fit must be one of {', '.join(INT4_FITS)}, got {fit!r}")
    if block_size < 16 or block_size & (block_size - 1):
        raise ExportError(f"int{bits} block size must be a power of two >= 16, got {block_size}")
    model = onnx.load(str(src))
    rnn = _is_rnn(model)
    if rnn:  # int4 DequantizeLinear (for the RNN weights) needs opset 21
        model = version_converter.convert_version(model, 21)
    head = output_head(model)
    fit = fit if bits == 4 and not rnn else "rtn"
    hqq = fit == "hqq"
    # int4 keeps the head at 8 bits: in int4 it cost a tiny model over 8% perplexity
    keep_head = head is not None and bits == 4
    tied = _tied_embedding(model, head)
    model = _nbits_pass(model, bits, block_size, accuracy_level, fit, exclude=keep_head and head)
    kept_int8 = quantize_rnn_weights_int4(model, block_size) if bits == 4 else []
    if keep_head and rnn:  # per row, folded at load like the RNN weights
        dequantize_int8(model, next(n for n in model.graph.node if n.name == head.name), 1, axis=1)
    elif keep_head:  # block-wise: a per-row int8 head cost SmolLM2 2 points of top-1;
        # in blocks of at most 32, whatever the layers' size (int8 activations in coarser
        # blocks lose the outlying channels that reach the head: blocks of 64 failed
        # SmolLM2's gate before its activations were smoothed, and the head's are not)
        head_block = min(block_size, DEFAULT_BLOCK_SIZE)
        model = _nbits_pass(model, 8, head_block, accuracy_level, "rtn", include=head)
    if hqq:
        move_zero_points_out(model, accuracy_level)
    shared = tied is not None and embed_from_head(model, tied)
    quantize_embeddings(model)  # the rest: untied tables, learned positions
    onnx.save(model, str(dst))
    fit = FIT_NAMES[fit]
    return (
        f"MatMulNBits int{bits} ({fit} blocks of {block_size}, accuracy level "
        f"{accuracy_level}) for every MatMul"
        + (" but the output head, which is int8" if keep_head else ", the output head included")
        + (
            " with per-row scales"
            if keep_head and rnn
            else f" in blocks of {head_block}"
            if keep_head
            else ""
        )
        + (
            "; float zero points rounded, their residuals 4-bit weights of block sums"
            if hqq
            else ""
        )
        + ("; RNN weights int4 in blocks of the same size" if rnn else "")
        + (
            "; embedding read from the head's int8 blocks (GatherBlockQuantized)"
            if shared
            else "; embedding int8 with per-row scales"
        )
        + (f"; int8 instead of int4: {kept_int8}" if kept_int8 else "")
    )


def four_bit_grid(weights: list[np.ndarray]) -> int | None:
    """The largest block of INT4_BLOCKS in which every weight matrix [out, in] holds at
    most 16 values per block of inputs, or None. Weights dequantized from a 4-bit file
    (a Q4_0 or Q4_1 GGUF: 16 levels per block of 32) sit on such a grid, which int4 in
    those blocks can keep; coarser blocks would put them on another grid (SmolLM2-135M
    from its Q4_1 file in blocks of 64: +22% perplexity). Float weights never do."""
    if not weights or any(w.ndim != 2 for w in weights):
        return None
    for block in INT4_BLOCKS:
        if all(w.shape[1] % block == 0 and _most_values(w, block) <= 16 for w in weights):
            return block
    return None


def _most_values(w: np.ndarray, block: int) -> int:
    """The most distinct values any block of `block` inputs of `w` [out, in] holds."""
    grouped = np.sort(w.reshape(w.shape[0], -1, block), axis=-1)
    return 1 + int(np.count_nonzero(np.diff(grouped, axis=-1), axis=-1).max())


def _tied_embedding(model: onnx.ModelProto, head: onnx.NodeProto | None) -> str | None:
    """The output of the Gather that reads the embedding table when the head's weight is
    that table transposed (tied embeddings), else None."""
    if head is None or head.op_type != "MatMul":
        return None
    inits = {t.name: t for t in model.graph.initializer}
    weight = inits.get(head.input[1])
    if weight is None:
        return None
    for node in model.graph.node:
        table = inits.get(node.input[0]) if node.op_type == "Gather" else None
        if table is None or list(table.dims) != list(weight.dims)[::-1]:
            continue
        if np.array_equal(numpy_helper.to_array(table).T, numpy_helper.to_array(weight)):
            return node.output[0]
    return None


def embed_from_head(model: onnx.ModelProto, embedding: str) -> bool:
    """Read a tied embedding from the head's symmetric 8-bit MatMulNBits weights, so the
    table is stored once, as int8 (before: a second int8 table, folded back to float32 at
    load, 113 MB for SmolLM2-135M). MatMulNBits keeps row n of the table as blocks
    [N, K/b, b] and scales [N, K/b]: gathered rows dequantize the same way.

        input_ids ──GatherBlockQuantized(B, scales [N, K/b, 1])──Reshape── [batch, seq, K]
        x ──MatMulNBits(B, scales)── logits

    Returns whether it did: the head must be 8-bit MatMulNBits without zero points, and K
    a whole number of blocks (MatMulNBits pads a last partial block; a gathered row would
    carry the padding). `embedding`: the Gather's output (_tied_embedding)."""
    head = output_head(model)
    attrs = {a.name: a.i for a in head.attribute} if head is not None else {}
    if head is None or head.op_type != "MatMulNBits" or attrs.get("bits") != 8:
        return False
    if (len(head.input) > 3 and head.input[3]) or attrs["K"] % attrs["block_size"]:
        return False
    graph = model.graph
    gather = next(n for n in graph.node if n.op_type == "Gather" and n.output[0] == embedding)
    name = gather.name or embedding
    blocks, scales = head.input[1], head.input[2]
    n, k, block = attrs["N"], attrs["K"], attrs["block_size"]
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.array([n, -(-k // block), 1]), f"{name}/scales_shape"),
            numpy_helper.from_array(np.array([0, 0, k]), f"{name}/rows_shape"),
        ]
    )
    nodes = [
        helper.make_node("Reshape", [scales, f"{name}/scales_shape"], [f"{name}/scales"]),
        helper.make_node(
            "GatherBlockQuantized",
            [blocks, gather.input[1], f"{name}/scales"],
            [f"{name}/blocks"],
            name=f"{name}/GatherBlockQuantized",
            domain="com.microsoft",
            gather_axis=0,
            quantize_axis=2,
            block_size=block,
            bits=8,
        ),
        helper.make_node("Reshape", [f"{name}/blocks", f"{name}/rows_shape"], gather.output),
    ]
    at = list(graph.node).index(gather)
    graph.node.remove(gather)
    for offset, node in enumerate(nodes):
        graph.node.insert(at + offset, node)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    drop_unused_initializers(graph)  # the float table
    return True


def drop_unused_initializers(graph: onnx.GraphProto) -> None:
    used = {name for node in graph.node for name in node.input}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)


def move_zero_points_out(model: onnx.ModelProto, accuracy_level: int = 0) -> int:
    """Run float-zero-point 4-bit MatMulNBits (HQQ) on the fast integer-zero-point kernel.
    With z' = round(z), a block is s * (q - z) = s * (q - z') + r, r = s * (z' - z), the
    same for the whole block, so the block adds r times the sum of its inputs. The block
    sums ride along as extra inputs, and the residuals r as extra 4-bit weights:

        x ──MatMul(ones per block)── S          (S padded to whole blocks)
        x, S ──Concat── MatMulNBits([q | r], [s | s_r], [z' | 8]) ── y

    Each r (|r| <= s/2) is stored in 4 bits, to 1/14 of the largest in its column
    (SmolLM2-135M: perplexity +0.54% against +0.21% for an exact float correction, whose
    two small matmuls and an Add per weight took 9% longer a token, 7 of 8 paired runs).
    Returns how many nodes it rewrote."""
    inits = {t.name: t for t in model.graph.initializer}
    nodes, rewritten, inputs = [], 0, {}
    for node in model.graph.node:
        zero = node.input[3] if node.op_type == "MatMulNBits" and len(node.input) > 3 else ""
        if zero and zero in inits and inits[zero].data_type == onnx.TensorProto.FLOAT:
            nodes.extend(_residual_block(model, node, inits, accuracy_level, inputs))
            rewritten += 1
        nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    drop_unused_initializers(model.graph)
    return rewritten


def _residual_block(model, node, inits, accuracy_level, inputs) -> list[onnx.NodeProto]:
    """Rewrite `node` to read [x, block sums] with its residuals as extra blocks; return
    the nodes that make its input, unless `inputs` (by input and shape) already has them:
    MatMuls that share an input (an MLP's gate and up) share one."""
    attrs = {a.name: a.i for a in node.attribute}
    k, n, block = attrs["K"], attrs["N"], attrs["block_size"]
    if attrs["bits"] != 4:
        raise ExportError(f"{node.name}: float zero points are only moved out of 4-bit weights")
    blocks = -(-k // block)  # the quantizer pads K to whole blocks with zeros
    extra = -(-blocks // block)  # blocks of residuals, one residual per weight block
    scales = numpy_helper.to_array(inits[node.input[2]]).reshape(n, blocks).astype(np.float64)
    zero = numpy_helper.to_array(inits[node.input[3]]).reshape(n, blocks).astype(np.float64)
    rounded = np.clip(np.round(zero), 0, 15)
    residual = np.zeros((n, extra * block))
    residual[:, :blocks] = scales * (rounded - zero)
    residual = residual.reshape(n, extra, block)
    residual_scale = np.abs(residual).max(axis=-1) / 7
    residual_scale[residual_scale == 0] = 1.0
    levels = np.clip(np.round(residual / residual_scale[..., None]) + 8, 0, 15)
    weights = numpy_helper.to_array(inits[node.input[1]]).reshape(n, blocks, block // 2)
    _replace(inits[node.input[1]], np.concatenate([weights, _pack4(levels)], axis=1))
    all_scales = np.concatenate([scales, residual_scale], axis=1).astype(np.float32)
    _replace(inits[node.input[2]], all_scales.reshape(-1))
    zero_points = np.concatenate([rounded, np.full((n, extra), 8)], axis=1)
    _replace(inits[node.input[3]], _pack4(zero_points).reshape(-1))
    attrs["K"] = (blocks + extra) * block
    if accuracy_level:  # HQQ's nodes carry no accuracy level; ours do
        attrs["accuracy_level"] = accuracy_level
    del node.attribute[:]
    node.attribute.extend(helper.make_attribute(key, value) for key, value in attrs.items())
    x, summing = node.input[0], f"block_sum_{k}x{block}"
    node.input[0] = f"{x}/with_block_sums_{k}x{block}"
    if summing not in inits:  # x's padding, then one column per block, then padding
        ones = np.zeros((k, blocks * block - k + extra * block), np.float32)
        for b in range(blocks):
            ones[b * block : (b + 1) * block, blocks * block - k + b] = 1.0
        inits[summing] = numpy_helper.from_array(ones, summing)
        model.graph.initializer.append(inits[summing])
    if (x, summing) in inputs:
        return []
    inputs[x, summing] = node.input[0]
    sums = f"{x}/block_sums_{k}x{block}"
    return [
        helper.make_node("MatMul", [x, summing], [sums]),
        helper.make_node("Concat", [x, sums], [node.input[0]], axis=-1),
    ]


def _pack4(values: np.ndarray) -> np.ndarray:
    """4-bit values two to a byte along the last axis, the first in the low nibble (an
    odd count ends with a zero nibble)."""
    values = values.astype(np.uint8)
    if values.shape[-1] % 2:
        values = np.concatenate([values, np.zeros_like(values[..., :1])], axis=-1)
    return values[..., 0::2] | (values[..., 1::2] << 4)


def _replace(tensor: onnx.TensorProto, value: np.ndarray) -> None:
    tensor.CopyFrom(numpy_helper.from_array(value, tensor.name))


def _nbits_pass(model, bits, block_size, accuracy_level, fit, exclude=None, include=None):
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(
        model,
        algo_config=_nbits_config(bits, block_size, accuracy_level, fit),
        nodes_to_exclude=[exclude.name] if exclude else [],
        nodes_to_include=[include.name] if include else None,
        accuracy_level=accuracy_level,
    )
    quantizer.process()
    return quantizer.model.model


def _nbits_config(bits: int, block_size: int, accuracy_level: int, fit: str):
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        HQQWeightOnlyQuantConfig,
    )

    where = dict(op_types_to_quantize=("MatMul",), quant_axes=(("MatMul", 0),))
    if fit == "hqq":
        return HQQWeightOnlyQuantConfig(block_size=block_size, bits=bits, **where)
    return DefaultWeightOnlyQuantConfig(
        block_size=block_size,
        is_symmetric=fit == "rtn",
        accuracy_level=accuracy_level,
        bits=bits,
        **where,
    )


def quantize_rnn_weights_int4(model: onnx.ModelProto, block_size: int) -> list[str]:
    """W and R of RNN/GRU/LSTM nodes as int4 in blocks along the input axis; a weight
    whose width is not a multiple of the block size gets int8 per-row instead (named
    in the returned list)."""
    fallback = []
    for node in list(model.graph.node):
        if node.op_type in RNN_OPS:
            for slot in (1, 2):
                if not dequantize_int4_blocked(model, node, slot, block_size):
                    fallback.append(f"{node.input[slot]} (width not a multiple of {block_size})")
                    dequantize_int8(model, node, slot, axis=1)
    return fallback


def dequantize_int4_blocked(model, node, slot: int, block: int) -> bool:
    """Input `slot` of `node` ([dirs, rows, width] float) as symmetric int4 with one scale
    per `block` consecutive inputs; False when the width does not divide into blocks."""
    graph = model.graph
    name = node.input[slot]
    init = next((t for t in graph.initializer if t.name == name), None)
    if init is None or init.data_type != onnx.TensorProto.FLOAT or len(init.dims) != 3:
        return True
    weight = numpy_helper.to_array(init)
    dirs, rows, width = weight.shape
    if width % block:
        return False
    blocks = weight.reshape(dirs, rows, width // block, block)
    scale = np.maximum(np.abs(blocks).max(axis=-1), 1e-12) / 7.0  # (dirs, rows, width/block)
    q = np.clip(np.round(blocks / scale[..., None]), -8, 7).astype(np.int8).reshape(weight.shape)
    graph.initializer.remove(init)
    nibbles = (q.flatten() & 0x0F).astype(np.uint8)
    if nibbles.size % 2:
        nibbles = np.append(nibbles, np.uint8(0))
    raw = (nibbles[0::2] | (nibbles[1::2] << 4)).tobytes()  # two per byte, low nibble first
    packed = helper.make_tensor(f"{name}_int4", onnx.TensorProto.INT4, q.shape, raw, raw=True)
    graph.initializer.extend(
        [packed, numpy_helper.from_array(scale.astype(np.float32), f"{name}_scale")]
    )
    dq = helper.make_node(
        "DequantizeLinear",
        [f"{name}_int4", f"{name}_scale"],
        [f"{name}_dq"],
        name=f"{node.name}/{name}/DequantizeLinear",
        axis=2,
        block_size=block,
    )
    graph.node.insert(list(graph.node).index(node), dq)
    node.input[slot] = f"{name}_dq"
    return True


def output_head(model: onnx.ModelProto) -> onnx.NodeProto | None:
    """The MatMul/Gemm that produces the logits."""
    producers = {out: node for node in model.graph.node for out in node.output}
    node = producers.get("logits")
    while node is not None and node.op_type not in _MATMULS:
        node = next((producers[i] for i in node.input if i in producers), None)
    return node


def _onnx_fp16(src: Path, dst: Path) -> str:
    """float16 weights and compute but for GroupQueryAttention, which stays float32: its
    CUDA kernel takes no attention_bias (padding) and no float32, so ONNX Runtime runs it
    on the CPU provider. (The converter casts the float32 KV buffers to float16 and back
    around it: a copy of the cache per layer and token that fp32 artifacts do not make.)"""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    model = convert_float_to_float16(
        onnx.load(str(src)),
        keep_io_types=True,
        op_block_list=[*DEFAULT_OP_BLOCK_LIST, "GroupQueryAttention"],
    )
    onnx.save(model, str(dst))
    attention = any(n.op_type == "GroupQueryAttention" for n in model.graph.node)
    return "float16 weights and compute, float32 inputs and outputs" + (
        "; attention in float32, on the CPU provider" if attention else ""
    )


def fold_constant_transposes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Replace Transpose(initializer) with the transposed initializer.

    emb ──Gather──>            emb ──Gather──>
     └──Transpose──MatMul  =>  emb_T ──MatMul      (the tied head)
    """
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    keep = []
    for node in graph.node:
        if node.op_type == "Transpose" and node.input[0] in inits:
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
            value = numpy_helper.to_array(inits[node.input[0]])
            value = value.transpose(perm) if perm else value.T
            graph.initializer.append(
                numpy_helper.from_array(np.ascontiguousarray(value), node.output[0])
            )
        else:
            keep.append(node)
    del graph.node[:]
    graph.node.extend(keep)
    return model


def quantize_rnn_weights(model: onnx.ModelProto) -> None:
    """int8 W and R for RNN/GRU/LSTM nodes, one scale per gate row (weight-only: ORT has
    no integer kernel for these ops)."""
    for node in list(model.graph.node):
        if node.op_type in RNN_OPS:
            for slot in (1, 2):  # W, R: [directions, gates * hidden, inputs]
                dequantize_int8(model, node, slot, axis=1)


def quantize_embeddings(model: onnx.ModelProto) -> None:
    """int8 embedding tables with one scale per row: per-tensor scales (what ORT's
    dynamic quantizer gives Gather) cost a tiny model several points of top-1."""
    for node in list(model.graph.node):
        if node.op_type == "Gather":
            dequantize_int8(model, node, 0, axis=0)


def dequantize_int8(model: onnx.ModelProto, node: onnx.NodeProto, slot: int, axis: int) -> None:
    """Store input `slot` of `node` (a float initializer) as symmetric int8 with one scale
    per index of `axis`, dequantized just before the node.

        w(float) ──node   =>   w_int8, w_scale ──DequantizeLinear──node
    """
    graph = model.graph
    name = node.input[slot]
    init = next((t for t in graph.initializer if t.name == name), None)
    if init is None or init.data_type != onnx.TensorProto.FLOAT or len(init.dims) < 2:
        return
    weight = numpy_helper.to_array(init)
    others = tuple(i for i in range(weight.ndim) if i != axis)
    scale = np.maximum(np.abs(weight).max(axis=others), 1e-12) / 127.0
    shape = [1] * weight.ndim
    shape[axis] = -1
    q = np.clip(np.round(weight / scale.reshape(shape)), -127, 127).astype(np.int8)
    graph.initializer.remove(init)
    graph.initializer.extend(
        [
            numpy_helper.from_array(q, f"{name}_int8"),
            numpy_helper.from_array(scale.astype(np.float32), f"{name}_scale"),
            numpy_helper.from_array(np.zeros_like(scale, dtype=np.int8), f"{name}_zero"),
        ]
    )
    dq = helper.make_node(
        "DequantizeLinear",
        [f"{name}_int8", f"{name}_scale", f"{name}_zero"],
        [f"{name}_dq"],
        name=f"{node.name}/{name}/DequantizeLinear",
        axis=axis,
    )
    graph.node.insert(list(graph.node).index(node), dq)
    for other in graph.node:  # every reader of the weight now reads the dequantized one
        for i, input_name in enumerate(other.input):
            if input_name == name and other is not dq:
                other.input[i] = f"{name}_dq"


def onnx_coverage(model: onnx.ModelProto) -> dict[str, Any]:
    """How many weight elements are stored below 32 bits, and the large ones that are not."""
    low, total, kept = 0, 0, []
    for t in model.graph.initializer:
        n = int(np.prod(t.dims)) if t.dims else 1
        side = ("_scale", "_scales", "_zero_point", "_zero", "_zp", "/zero_point_correction")
        if t.name.endswith(side) or t.name.startswith("block_sum_") or n < 2:
            continue
        total += n
        if t.data_type in (onnx.TensorProto.FLOAT,):
            if len(t.dims) >= 2 and n >= 1024:
                kept.append({"name": t.name, "elements": n, "reason": "kept float32"})
        else:
            low += n
    ops = sorted({n.op_type for n in model.graph.node})
    quantized_ops = [op for op in ops if op in _QUANT_OPS]
    return {
        "quantized_fraction": low / max(1, total),
        "quantized_ops": quantized_ops,
        "embedding": _embedding_storage(model),
        "head": _head_storage(model),
        "kept_float32": kept,
    }


def _embedding_storage(model: onnx.ModelProto) -> str:
    producers = {out: node for node in model.graph.node for out in node.output}
    for node in model.graph.node:
        if node.op_type == "GatherBlockQuantized":
            return f"int{next((a.i for a in node.attribute if a.name == 'bits'), 4)}"
        source = producers.get(node.input[0]) if node.op_type == "Gather" else None
        if source is not None and source.op_type == "DequantizeLinear":
            return "int8"
    return "float32"


def _head_storage(model: onnx.ModelProto) -> str:
    head = output_head(model)
    if head is None:
        return "none"
    if head.op_type == "MatMulNBits":
        return f"int{next((a.i for a in head.attribute if a.name == 'bits'), 4)}"
    if head.op_type in ("MatMulInteger", "DynamicQuantizeMatMul"):
        return "int8"
    producers = {out: node for node in model.graph.node for out in node.output}
    weight = producers.get(head.input[1])
    return "int8" if weight is not None and weight.op_type == "DequantizeLinear" else "float32"


_MATMULS = ("MatMul", "Gemm", "MatMulInteger", "MatMulNBits", "DynamicQuantizeMatMul")
_QUANT_OPS = {
    "MatMulInteger",
    "DynamicQuantizeMatMul",
    "MatMulNBits",
    "GatherBlockQuantized",
    "DequantizeLinear",
    "DynamicQuantizeLinear",
    "DynamicQuantizeLSTM",
}


def quantize_torch_int8(model):
    """int8 quantization of a copy of `model` for the TorchScript artifact. RNNs: torch's
    dynamic int8 Linear/GRU/LSTM. Transformers: block-wise weight-only int8 Linears, since
    dynamic quantization scales each activation tensor as a whole and the outlier
    channels of pretrained models ruin it (SmolLM2-135M: top-1 36%, perplexity +330%)."""
    import copy

    import torch
    from torch import nn

    transformer = getattr(model.config, "family", None) == "gpt"
    qconfig = {nn.Embedding: torch.ao.quantization.float_qparams_weight_only_qconfig}
    if not transformer:
        qconfig[nn.Linear] = torch.ao.quantization.per_channel_dynamic_qconfig
        qconfig[nn.GRU] = qconfig[nn.LSTM] = torch.ao.quantization.default_dynamic_qconfig
    with warnings.catch_warnings():  # torch.ao.quantization is deprecated in favour of torchao
        warnings.simplefilter("ignore")
        quantized = torch.ao.quantization.quantize_dynamic(
            copy.deepcopy(model).eval(), qconfig, dtype=torch.qint8
        )
    WeightOnlyInt8RNN = _weight_only_int8_rnn_class()
    WeightOnlyInt8Linear = _weight_only_int8_linear_class()
    for name, module in list(quantized.named_modules()):
        replacement = (
            WeightOnlyInt8RNN(module)
            if type(module) is nn.RNN  # torch has no dynamic int8 RNN (tanh) module
            else WeightOnlyInt8Linear(module)
            if transformer and type(module) is nn.Linear
            else None
        )
        if replacement is not None:
            parent = quantized.get_submodule(name.rpartition(".")[0]) if "." in name else quantized
            setattr(parent, name.rpartition(".")[2], replacement)
    return quantized, _torch_coverage(quantized, transformer)


def _torch_coverage(quantized, transformer: bool) -> dict[str, Any]:
    done = sorted(
        {type(m).__name__ for m in quantized.modules() if "quantized" in type(m).__module__}
        | {type(m).__name__ for m in quantized.modules() if type(m).__name__.startswith("Weight")}
    )
    method = (
        "weight-only int8 Linear weights in blocks of 32 (dequantized in the step: smaller, "
        "not faster) + 8-bit per-row embedding"
        if transformer
        else "torch dynamic int8 (per-channel Linear, GRU, LSTM) + 8-bit per-row "
        "embedding and weight-only per-row int8 RNN (tanh) weights"
    )
    linear = "WeightOnlyInt8Linear" in done or "Linear" in done
    return {
        "method": method,
        "quantized_modules": done,
        "embedding": "int8" if "Embedding" in done else "float32",
        "head": "int8" if linear else "float32",
        "kept_float32": [],
    }


def symmetric_int8(weight):
    """int8 values and float scales of a torch weight, one scale per row of its last axis
    (absmax / 127): what the weight-only TorchScript modules store and dequantize."""
    import torch

    scale = weight.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / 127
    return torch.round(weight / scale).clamp(-127, 127).to(torch.int8), scale


def _weight_only_int8_linear_class():
    from torch import nn

    class WeightOnlyInt8Linear(nn.Module):
        """nn.Linear with int8 weights, one scale per block of 32 inputs of a row (one per
        row when the width does not divide), dequantized inside each call."""

        def __init__(self, linear: nn.Linear, block: int = 32) -> None:
            super().__init__()
            weight = linear.weight.detach()
            rows, cols = weight.shape
            self.block = block if cols % block == 0 else cols
            blocks = weight.reshape(rows, cols // self.block, self.block)
            q, scale = symmetric_int8(blocks)
            self.register_buffer("q", q)
            self.register_buffer("scale", scale)
            bias = linear.bias.detach().clone() if linear.bias is not None else None
            self.register_buffer("bias", bias)
            self.shape = (rows, cols)

        def forward(self, x):
            weight = (self.q.float() * self.scale).reshape(self.shape)
            return nn.functional.linear(x, weight, self.bias)

    return WeightOnlyInt8Linear


def _weight_only_int8_rnn_class():
    import torch
    from torch import nn

    class WeightOnlyInt8RNN(nn.Module):
        """nn.RNN with int8 weights (per-row scales), dequantized inside each call:
        torch has no int8 kernel for it, so this buys size, not speed."""

        def __init__(self, rnn: nn.RNN) -> None:
            super().__init__()
            self.num_layers, self.batch_first = rnn.num_layers, rnn.batch_first
            self.relu = rnn.nonlinearity == "relu"
            for layer in range(rnn.num_layers):
                for kind in ("ih", "hh"):
                    weight = getattr(rnn, f"weight_{kind}_l{layer}").detach()
                    q, scale = symmetric_int8(weight)
                    self.register_buffer(f"w_{kind}_{layer}", q)
                    self.register_buffer(f"s_{kind}_{layer}", scale)
                    bias = getattr(rnn, f"bias_{kind}_l{layer}").detach().clone()
                    self.register_buffer(f"b_{kind}_{layer}", bias)

        def forward(self, x, h0):
            params = []
            for layer in range(self.num_layers):
                for kind in ("ih", "hh"):
                    q = getattr(self, f"w_{kind}_{layer}")
                    params.append(q.float() * getattr(self, f"s_{kind}_{layer}"))
                params += [getattr(self, f"b_ih_{layer}"), getattr(self, f"b_hh_{layer}")]
            run = torch.rnn_relu if self.relu else torch.rnn_tanh
            return run(x, h0, params, True, self.num_layers, 0.0, False, False, self.batch_first)

    return WeightOnlyInt8RNN

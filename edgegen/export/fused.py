"""ONNX Runtime's fused CPU kernels in the exported GPT graph.

torch.export spells an RMSNorm as seven ONNX nodes and the rotation of a query or key
tensor as eight. At decode each node costs a few microseconds of dispatch besides its
work, so a 30-layer model spent about as long between its matmuls as in them. While
the ONNX exporter runs, `ort_kernels(model)` swaps the model's RMSNorm modules and
rotary tables for modules that emit one ONNX Runtime kernel each:

    nn.RMSNorm       Pow ReduceMean Add Sqrt Reciprocal Mul Mul  ->  SimplifiedLayerNormalization
    rope on q or k   Split Mul Mul Sub Mul Mul Add Concat        ->  com.microsoft.RotaryEmbedding

Outside an export the swapped modules run the model's own code, and the parity gate
compares the exported graph with the eager model as it was, so a kernel that computes
anything else fails the export. Both kernels ship in onnxruntime's CPU provider (and
its CUDA one). ONNX Runtime, not ONNX, registers SimplifiedLayerNormalization in the
ONNX domain, so `onnx.checker` needs to be told (check_model).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial

import onnx
import torch
from torch import nn
from torch.onnx.ops import symbolic

from edgegen.models.gpt import GPT, Rotary, apply_rotary

# ops ONNX Runtime registers in the ONNX domain that ONNX itself does not define
ORT_ONNX_DOMAIN_OPS = ("SimplifiedLayerNormalization",)
_CHECKED_AS = "ai.onnxruntime.onnx_domain"  # a domain the checker skips


class FusedRMSNorm(nn.Module):
    def __init__(self, norm: nn.RMSNorm) -> None:
        super().__init__()
        self.norm = norm
        self.eps = norm.eps if norm.eps is not None else torch.finfo(torch.float32).eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.onnx.is_in_onnx_export():
            return self.norm(x)
        attrs = {"axis": -1, "epsilon": self.eps, "stash_type": 1}
        inputs = (x, self.norm.weight)
        return symbolic(
            "::SimplifiedLayerNormalization", inputs, attrs, dtype=x.dtype, shape=x.shape, version=1
        )


class FusedRotary(nn.Module):
    """The model's rotary tables as caches [max_seq_len, hs/2], indexed by position id
    inside the kernel (the model computes cos/sin from the ids; the same float32 ops)."""

    def __init__(self, rotary: Rotary, max_seq_len: int) -> None:
        super().__init__()
        angles = torch.arange(max_seq_len, dtype=torch.float32)[:, None] * rotary.inv_freq
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, position_ids: torch.Tensor):
        return partial(rotary_embedding, position_ids=position_ids, cos=self.cos, sin=self.sin)


def rotary_embedding(x, position_ids, cos, sin) -> torch.Tensor:
    """Rotate x [B, heads, T, hs] (the halves of each head as pairs) to position_ids [B, T]."""
    if not torch.onnx.is_in_onnx_export():
        return apply_rotary(x, cos[position_ids][:, None], sin[position_ids][:, None])
    return symbolic(
        "com.microsoft::RotaryEmbedding",
        (x, position_ids, cos, sin),
        {"interleaved": 0},
        dtype=x.dtype,
        shape=x.shape,
        version=1,
    )


@contextmanager
def ort_kernels(model: GPT) -> Iterator[None]:
    """Within: the model's RMSNorms and rotary tables emit fused kernels when exported."""
    swaps = [
        (parent, name, child, FusedRMSNorm(child))
        for parent in model.modules()
        for name, child in parent.named_children()
        if isinstance(child, nn.RMSNorm)
    ]
    if isinstance(model.rope, Rotary):
        swaps.append((model, "rope", model.rope, FusedRotary(model.rope, model.config.max_seq_len)))
    for parent, name, _, fused in swaps:
        setattr(parent, name, fused)
    try:
        yield
    finally:
        for parent, name, original, _ in swaps:
            setattr(parent, name, original)


def check_model(model: onnx.ModelProto) -> None:
    """onnx.checker.check_model, told that ONNX Runtime defines ORT_ONNX_DOMAIN_OPS."""
    moved = [n for n in model.graph.node if n.domain == "" and n.op_type in ORT_ONNX_DOMAIN_OPS]
    if moved:
        model.opset_import.append(onnx.helper.make_opsetid(_CHECKED_AS, 1))
    for node in moved:
        node.domain = _CHECKED_AS
    try:
        onnx.checker.check_model(model)
    finally:
        for node in moved:
            node.domain = ""
        if moved:
            del model.opset_import[-1]

"""ONNX Runtime's fused CPU kernels in the exported GPT graph.

torch.export spells an RMSNorm as seven ONNX nodes, the rotation of a query or key
tensor as eight and one layer's attention as about twenty. At decode each node costs a
few microseconds of dispatch besides its work, so a 30-layer model spent about as long
between its matmuls as in them. While the ONNX exporter runs, `fused_step(model)`
swaps the model's modules for ones that emit one ONNX Runtime kernel each, and gives
the step module to export (FusedStep):

    nn.RMSNorm       Pow ReduceMean Add Sqrt Reciprocal Mul Mul  ->  SimplifiedLayerNormalization
    rope on q or k   Split Mul Mul Sub Mul Mul Add Concat        ->  com.microsoft.RotaryEmbedding
    attention        Reshape MatMul Where Softmax MatMul ...     ->  GroupQueryAttention (contrib)

and, once exported, `fuse_skip_norms` folds each residual Add into the norm that reads
it (com.microsoft.SkipSimplifiedLayerNormalization / SkipLayerNormalization).

GroupQueryAttention writes the step's new keys and values into the KV buffer it is
given and reads only the slots the attention mask covers, which is the step contract
(spec.py); the runtime binds its present output to the past input's memory. Outside an
export the swapped norms and rotary tables run the model's own code, and the parity
gate compares the exported graph with the eager model as it was, so a kernel that
computes anything else fails the export. All these kernels ship in onnxruntime's CPU
provider; GroupQueryAttention's CUDA kernel takes neither float32 nor an attention
bias, so on a GPU it runs on the CPU provider (fp16 artifacts keep it float32).
ONNX Runtime, not ONNX, registers SimplifiedLayerNormalization in the ONNX domain, so
`onnx.checker` needs to be told (check_model).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from typing import NamedTuple

import onnx
import torch
from torch import nn
from torch.onnx.ops import symbolic, symbolic_multi_out

from edgegen.models.gpt import (
    GPT,
    CausalSelfAttention,
    Rotary,
    apply_rotary,
    attend_cached,
    attention_bias,
)

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
    """Rotate x [B, heads, T, hs] (the halves of each head as pairs) to position_ids [B, T].
    Exported, x may also be [B, T, heads * hs] (the kernel takes both)."""
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


class KVWrite(NamedTuple):
    """What every layer's attention reads besides its own tensors, made once per step
    from the attention mask [B, total]."""

    past_len: int | torch.SymInt  # slots before the new tokens: total - T
    bias: torch.Tensor  # GroupQueryAttention's: [B, 1, T, total], 0 or -inf; else the model's
    seqlens: torch.Tensor | None = None  # [B] int32: total - 1, the last slot written
    total: torch.Tensor | None = None  # int32 scalar


class FusedStep(nn.Module):
    """The GPT step contract (spec.GPTStep) as the ONNX graph computes it. Each layer's
    attention is one com.microsoft.GroupQueryAttention over the whole KV buffer: it
    writes the new keys and values at slots [total - T, total) and reads only the first
    `total`; at run time its present output is bound to the memory of its past input.
    That kernel takes head sizes that are a multiple of KERNEL_HEAD_MULTIPLE; other
    models attend with their own code and return each buffer with the new slots
    concatenated in (a copy per step, correct on any runtime)."""

    def __init__(self, model: GPT) -> None:
        super().__init__()
        self.model = model
        self.kernel = uses_attention_kernel(model)

    def forward(self, input_ids, position_ids, attention_mask, *buffers):
        seq, total = input_ids.shape[1], attention_mask.shape[1]
        # the model's own mask: causal, no padding key, a padding query sees itself
        allowed = attention_bias(seq, total - seq, attention_mask, input_ids.device)
        if not self.kernel:
            return self.model.step(input_ids, position_ids, KVWrite(total - seq, allowed), *buffers)
        bias = torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))
        lengths = (attention_mask[:, 0] * 0 + (total - 1)).to(torch.int32)
        write = KVWrite(total - seq, bias, lengths, torch.tensor(total, dtype=torch.int32))
        return self.model.step(input_ids, position_ids, write, *buffers)


KERNEL_HEAD_MULTIPLE = 8  # ONNX Runtime's CPU GroupQueryAttention refuses other head sizes


def uses_attention_kernel(model: GPT) -> bool:
    return model.config.head_dim % KERNEL_HEAD_MULTIPLE == 0


class FusedAttention(nn.Module):
    """A CausalSelfAttention as one com.microsoft.GroupQueryAttention, fed the packed q/k/v
    projection, or, with rotary positions, queries and keys rotated by FusedRotary's
    kernel on [B, T, heads * hs] at position_ids. (The kernel's own rotation goes by
    cache slot, which a left-padded row's positions do not follow.)"""

    def __init__(self, attn: CausalSelfAttention) -> None:
        super().__init__()
        self.attn = attn

    def forward(self, x, buffer_k, buffer_v, write: KVWrite, rope):
        attn = self.attn
        if write.seqlens is None:  # no kernel: the model's attention, then a functional write
            return self._attend_and_concat(x, buffer_k, buffer_v, write, rope)
        qkv = attn.qkv(x)
        if rope is None:  # the kernel splits the packed projection itself
            qkv_inputs = (qkv, None, None)
        else:
            q, k, v = qkv.split(attn.sizes, dim=2)
            qkv_inputs = (rope(q), rope(k), v)
        inputs = (*qkv_inputs, buffer_k, buffer_v, write.seqlens, write.total, None, None, None)
        attrs = {"num_heads": attn.n_heads, "kv_num_heads": attn.kv_heads}
        B, T = x.shape[:2]
        y, present_k, present_v = symbolic_multi_out(
            "com.microsoft::GroupQueryAttention",
            (*inputs, write.bias),
            attrs,
            dtypes=(x.dtype, x.dtype, x.dtype),
            shapes=((B, T, attn.n_heads * attn.head_dim), buffer_k.shape, buffer_v.shape),
            version=1,
        )
        return attn.resid_drop(attn.proj(y)), present_k, present_v

    def _attend_and_concat(self, x, buffer_k, buffer_v, write: KVWrite, rope):
        attn, past = self.attn, write.past_len
        T = x.shape[1]
        torch._check(past >= 0)
        torch._check(past + T <= buffer_k.shape[2])
        q, k, v = attn.heads(x, rope)
        past_k, past_v = buffer_k[:, :, :past], buffer_v[:, :, :past]
        y = attend_cached(q, k, v, past_k, past_v, write.bias)  # never SDPA's branch
        keys = [
            torch.cat([b[:, :, :past], new, b[:, :, past + T :]], dim=2)
            for b, new in ((buffer_k, k), (buffer_v, v))
        ]
        return (attn.output(y), *keys)


@contextmanager
def fused_step(model: GPT) -> Iterator[FusedStep]:
    """Within: the module to export for a GPT, with ONNX Runtime's fused kernels."""
    swaps = [
        (parent, name, child, FusedAttention(child))
        for parent in model.modules()
        for name, child in parent.named_children()
        if isinstance(child, CausalSelfAttention)
    ]
    with ort_kernels(model, swaps):
        yield FusedStep(model)


@contextmanager
def ort_kernels(model: GPT, swaps: list | None = None) -> Iterator[None]:
    """Within: the model's RMSNorms and rotary tables emit fused kernels when exported."""
    swaps = list(swaps or []) + [
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


SKIP_NORMS = {  # a norm over a residual sum -> ONNX Runtime's kernel that also adds
    "SimplifiedLayerNormalization": "SkipSimplifiedLayerNormalization",
    "LayerNormalization": "SkipLayerNormalization",
}


def fuse_skip_norms(model: onnx.ModelProto) -> int:
    """Fold each residual Add that feeds a norm into the norm: Add(x, y) -> Norm becomes
    one com.microsoft.Skip*LayerNormalization, whose fourth output is the sum the rest of
    the graph reads. Only an Add of two activations of one declared shape qualifies (a
    bias or a broadcast stays as it is). Returns how many it folded."""
    graph = model.graph
    nodes = list(graph.node)
    producer = {out: i for i, node in enumerate(nodes) for out in node.output}
    constants = {i.name for i in graph.initializer} | {
        n.output[0] for n in nodes if n.op_type == "Constant"
    }
    shapes = {  # declared shapes whose every dim is named or known
        v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
        for v in list(graph.value_info) + list(graph.input)
        if v.type.tensor_type.HasField("shape")
        and all(d.dim_param or d.HasField("dim_value") for d in v.type.tensor_type.shape.dim)
    }
    weights = {i.name for i in graph.initializer}
    drop = set()
    for at, norm in enumerate(nodes):
        if norm.op_type not in SKIP_NORMS or norm.domain != "" or norm.input[0] not in producer:
            continue
        add_at = producer[norm.input[0]]
        add = nodes[add_at]
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in norm.attribute}
        a, b = add.input if add.op_type == "Add" else ("", "")
        shape = shapes.get(a)
        if (
            attrs.get("axis", -1) != -1
            or len(norm.output) > 1
            or a in constants
            or b in constants
            or not set(norm.input[1:]) <= weights
            or not shape
            or len(shape) != 3
            or shape != shapes.get(b)
        ):
            continue
        # at the Add's place: its inputs are ready there, and the norm's are weights
        nodes[add_at] = onnx.helper.make_node(
            SKIP_NORMS[norm.op_type],
            [a, b, *norm.input[1:]],
            [norm.output[0], "", "", add.output[0]],
            name=f"{norm.name}/skip",
            domain="com.microsoft",
            epsilon=attrs.get("epsilon", 1e-5),
        )
        drop.add(at)
    del graph.node[:]
    graph.node.extend(n for i, n in enumerate(nodes) if i not in drop)
    if drop and not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    return len(drop)


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

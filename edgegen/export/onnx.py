"""ONNX export through torch.export (the dynamo-based exporter).

One graph serves prefill and decode: batch, seq and past are dynamic. The example
inputs use sizes of at least 2 everywhere, because torch.export specialises dims
it sees as 0 or 1; the parity grid then proves batch 1, seq 1 and past 0 work.

RNN families use the legacy TorchScript-based exporter instead: torch.export
specialises the sequence length of nn.RNN/GRU/LSTM (its decomposition unrolls
time), while the legacy exporter maps them to ONNX's native RNN/GRU/LSTM ops
with every axis dynamic.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import onnx
import torch

from edgegen.errors import ExportError, first_line
from edgegen.export.fused import check_model, fuse_skip_norms, fused_step
from edgegen.export.spec import StepSpec
from edgegen.quiet import quiet

MIN_OPSET = 18  # the dynamo-based exporter emits opset 18 and newer
MAX_OPSET = 23  # the newest the legacy (RNN) exporter writes; newer ones fail mid-export
DEFAULT_OPSET = 18


def check_opset(opset: int) -> None:
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ExportError(f"opset must be between {MIN_OPSET} and {MAX_OPSET}, got {opset}")


def export_onnx(spec: StepSpec, path: Path, opset: int = DEFAULT_OPSET) -> None:
    check_opset(opset)
    example = tuple(spec.example(batch=3, seq=7, past=5).values())
    if spec.is_gpt:
        how = dict(dynamo=True, dynamic_shapes=spec.dynamic_shapes(), external_data=False)
        kernels = fused_step(spec.module.model)
    else:
        how = dict(dynamo=False, dynamic_axes=spec.dynamic_axes())
        kernels = nullcontext(spec.module)
    with quiet("torch.onnx", "torch.export", "torch._dynamo"), torch.no_grad(), kernels as module:
        try:
            torch.onnx.export(
                module,
                example,
                str(path),
                input_names=spec.input_names,
                output_names=spec.output_names,
                opset_version=opset,
                verbose=False,
                **how,
            )
        except Exception as e:  # the exporter raises many types; report one line
            first = first_line(e)
            raise ExportError(f"ONNX export failed: {first}") from e
    name_dims(path, spec)


def name_dims(path: Path, spec: StepSpec) -> None:
    """Replace the exporter's symbols (s10, s70 + s89, ...) with the signature's dim names,
    so a graph viewer and the manifest say the same thing."""
    model = onnx.load(str(path))
    declared = {io["name"]: io["shape"] for io in spec.inputs + spec.outputs}
    for value in list(model.graph.input) + list(model.graph.output):
        dims = value.type.tensor_type.shape.dim
        shape = declared[value.name]
        if len(dims) != len(shape):
            raise ExportError(f"ONNX {value.name} has rank {len(dims)}, expected {len(shape)}")
        for dim, want in zip(dims, shape, strict=True):
            if isinstance(want, str):
                dim.dim_param = want
            elif dim.HasField("dim_value") and dim.dim_value != want:
                raise ExportError(
                    f"ONNX {value.name} has a dim of {dim.dim_value}, expected {want}"
                )
            else:
                dim.dim_value = want
    strip_debug_info(model)
    fuse_skip_norms(model)
    check_model(model)
    onnx.save(model, str(path))


def strip_debug_info(model: onnx.ModelProto) -> None:
    """Drop the exporter's per-node stack traces and metadata: in a small model they
    outweigh the weights, and nothing at run time reads them."""
    for node in model.graph.node:
        node.doc_string = ""
        del node.metadata_props[:]
    for value in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        value.doc_string = ""
        del value.metadata_props[:]
    model.graph.doc_string = ""

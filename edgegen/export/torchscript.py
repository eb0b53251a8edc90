"""TorchScript export: the step module traced on example inputs.

Tracing records one path through the code; the step has no data-dependent
branches once position_ids and attention_mask are given, and the parity grid
(batch 1/3, seq 1/7, past 0/5, padded rows) proves the trace general before a
bundle is published. The file loads with `torch.jit.load` alone.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from edgegen.errors import ExportError, first_line
from edgegen.export.spec import StepSpec


def export_torchscript(spec: StepSpec, path: Path, opset: int | None = None) -> None:
    example = tuple(spec.example(batch=3, seq=7, past=5).values())
    # TorchScript is deprecated upstream but is a supported edgegen format: silence
    # its deprecation and tracer notes here only.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", FutureWarning)
        try:
            with torch.no_grad():
                traced = torch.jit.trace(spec.module, example, check_trace=False)
            torch.jit.save(traced, str(path))
        except Exception as e:
            first = first_line(e)
            raise ExportError(f"TorchScript export failed: {first}") from e


def model_from_torchscript(path: Path, config) -> torch.nn.Module:
    """The eager model whose fp32 step was traced into `path`: the trace keeps every
    parameter under the step module's names (`model.<name>`), so a bundle without its
    checkpoint still yields the exact weights it was exported from."""
    from edgegen.models import build_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        try:
            traced = torch.jit.load(str(path), map_location="cpu")
        except Exception as e:
            raise ExportError(f"cannot load {path.name}: {first_line(e)}") from None
    model = build_model(config)
    want = model.state_dict()
    have = {k.removeprefix("model."): v for k, v in traced.state_dict().items()}
    missing = sorted(set(want) - set(have))
    if missing:
        raise ExportError(f"{path.name} lacks the weights {', '.join(missing[:3])}")
    try:
        model.load_state_dict({k: have[k] for k in want})
    except RuntimeError as e:
        raise ExportError(
            f"{path.name} does not fit the bundle's config: {first_line(e)}"
        ) from None
    return model.eval()

"""The torch-free side of edgegen: sampling and the generation loop.

Imports numpy only (onnxruntime once bundles land); never torch.
"""

from edgegen.runtime.loop import StepBackend, generate_ids
from edgegen.runtime.sampler import Sampler

__all__ = ["Sampler", "StepBackend", "generate_ids"]

"""Checkpoint -> bundle: TorchScript and ONNX step functions, gated by parity with
eager PyTorch. See writer.export_bundle; from_module exports the user's own nn.Module."""

from edgegen.export.user_module import from_module
from edgegen.export.writer import FORMATS, QuantizeOptions, export_bundle, quantize_bundle

__all__ = ["FORMATS", "QuantizeOptions", "export_bundle", "from_module", "quantize_bundle"]

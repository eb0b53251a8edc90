"""Checkpoint -> bundle: TorchScript and ONNX step functions, gated by parity with
eager PyTorch. See writer.export_bundle."""

from edgegen.export.writer import FORMATS, QuantizeOptions, export_bundle, quantize_bundle

__all__ = ["FORMATS", "QuantizeOptions", "export_bundle", "quantize_bundle"]

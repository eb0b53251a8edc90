"""Checkpoint -> bundle: TorchScript and ONNX step functions, gated by parity with
eager PyTorch. See writer.export_bundle."""

from edgegen.export.writer import FORMATS, export_bundle

__all__ = ["FORMATS", "export_bundle"]

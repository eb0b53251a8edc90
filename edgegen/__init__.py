"""edgegen: ship small language models to devices.

Train in PyTorch, export stateful step functions to TorchScript and ONNX, and
generate text with a torch-free runtime.
"""

__version__ = "0.1.0"

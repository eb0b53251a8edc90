"""Backends run one step of an artifact: `run(feeds) -> outputs` in signature order.

ONNX Runtime needs only numpy. TorchScript imports torch lazily, only when chosen.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from edgegen.errors import BackendError, first_line

DEVICES = ("cpu", "cuda")


def cuda_provider_available() -> bool:
    """Whether this onnxruntime has its CUDA execution provider (onnxruntime-gpu)."""
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


class OnnxRunner:
    def __init__(
        self,
        path: Path,
        input_names: list[str],
        device: str = "cpu",
        threads: int | None = None,
        session_config: dict[str, str] | None = None,
    ) -> None:
        import onnxruntime as ort

        providers = ["CPUExecutionProvider"]
        if device == "cuda":
            if not cuda_provider_available():
                raise BackendError(
                    "device cuda needs ONNX Runtime's CUDA execution provider, which this "
                    "onnxruntime lacks: pip uninstall onnxruntime && pip install onnxruntime-gpu"
                )
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        for key, value in (session_config or {}).items():
            options.add_session_config_entry(key, value)
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as e:  # onnxruntime raises its own exception types
            raise BackendError(f"ONNX Runtime cannot load {path.name}: {first_line(e)}") from None
        self.input_names = input_names

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(None, feeds)


class TorchScriptRunner:
    def __init__(
        self,
        path: Path,
        input_names: list[str],
        device: str = "cpu",
        threads: int | None = None,
        session_config: dict[str, str] | None = None,  # ONNX Runtime's; nothing here
    ) -> None:
        try:
            import torch
        except ImportError:
            raise BackendError(
                "the torchscript backend needs torch: pip install 'edgegen[export]'"
            ) from None
        if device == "cuda" and not torch.cuda.is_available():
            raise BackendError("device cuda was asked for, but torch sees no CUDA GPU")
        if threads:
            torch.set_num_threads(threads)
        self.module = _load_torchscript(torch, path, device)
        self.torch, self.device, self.input_names = torch, torch.device(device), input_names

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        torch = self.torch
        with torch.inference_mode():
            args = [
                torch.from_numpy(np.ascontiguousarray(feeds[n])).to(self.device)
                for n in self.input_names
            ]
            return [t.float().cpu().numpy() for t in self.module(*args)]


def _load_torchscript(torch, path: Path, device: str):
    # A matching hash proves only that the file is the one exported; a bundle whose
    # manifest was rewritten to match a damaged file must still fail as one line.
    with warnings.catch_warnings():  # TorchScript is deprecated upstream; supported here
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        try:
            return torch.jit.load(str(path), map_location=device).eval()
        except Exception as e:  # torch raises RuntimeError and friends, untyped
            raise BackendError(f"TorchScript cannot load {path.name}: {first_line(e)}") from None


RUNNERS = {"onnx": OnnxRunner, "torchscript": TorchScriptRunner}

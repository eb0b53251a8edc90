"""Backends run one step of an artifact: `run(feeds) -> outputs` in signature order.

ONNX Runtime needs only numpy. TorchScript imports torch lazily, only when chosen.

`in_place` maps state inputs to the outputs that return them updated (a GPT's KV
buffers): ONNX Runtime binds each such output to its input's memory, so the step
writes the new slots into the caller's buffer and hands that same array back.
Both backends move the weights they load onto huge pages (huge_pages.py), in the
background: `huge_pages.done` is set when that is over.
"""

from __future__ import annotations

import threading
import warnings
from pathlib import Path

import numpy as np

from edgegen.errors import BackendError, first_line
from edgegen.runtime.huge_pages import collapsed

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
        in_place: dict[str, str] | None = None,
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
        # the weights, as ORT laid them out, onto huge pages while the first steps run
        with collapsed(background=True) as self.huge_pages:
            try:
                self.session = ort.InferenceSession(str(path), options, providers=providers)
            except Exception as e:  # onnxruntime raises its own exception types
                message = f"ONNX Runtime cannot load {path.name}: {first_line(e)}"
                raise BackendError(message) from None
        self.input_names = input_names
        self.in_place = dict(in_place or {})
        self._ort, self._local = ort, threading.local()  # a binding per thread

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        if not self.in_place:
            return self.session.run(None, feeds)
        binding = getattr(self._local, "binding", None)
        if binding is None:
            binding = self._local.binding = _InPlaceBinding(self._ort, self.session, self.in_place)
        return binding.run(feeds)

    def release(self) -> None:
        """Drop this thread's binding and the arrays it holds (a finished generation's KV
        buffers); the next run binds afresh."""
        self._local.binding = None


class _InPlaceBinding:
    """One IOBinding kept across steps: an input is bound again only when the caller
    passes a different array (arrays it mutates in place stay bound), and each in-place
    output is bound to its input's memory. Returns outputs in the session's order: the
    in-place ones are the caller's arrays, now updated."""

    def __init__(self, ort, session, in_place: dict[str, str]) -> None:
        self.ort, self.session, self.in_place = ort, session, in_place
        self.binding = session.io_binding()
        self.output_names = [o.name for o in session.get_outputs()]
        self.fresh = [n for n in self.output_names if n not in in_place.values()]
        self.source = {out: name for name, out in in_place.items()}
        self.bound: dict[str, tuple[np.ndarray, object]] = {}  # array, its OrtValue
        self.order: list[str] = []  # outputs in the order first bound (get_outputs' order)

    def _bind_output(self, name: str, *value) -> None:
        if value:
            self.binding.bind_ortvalue_output(name, *value)
        else:
            self.binding.bind_output(name, "cpu")
        if name not in self.order:
            self.order.append(name)

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        for name, value in feeds.items():
            held = self.bound.get(name)
            if held is not None and held[0] is value:
                continue  # bound to this very memory (a copy made for layout is not reused)
            array = np.ascontiguousarray(value)
            ortvalue = self.ort.OrtValue.ortvalue_from_numpy(array)
            self.binding.bind_ortvalue_input(name, ortvalue)
            if name in self.in_place:
                self._bind_output(self.in_place[name], ortvalue)
            self.bound[name] = (array, ortvalue)  # keeps the memory alive while bound
        for name in self.fresh:
            self._bind_output(name)
        self.session.run_with_iobinding(self.binding)
        made = dict(zip(self.order, self.binding.get_outputs(), strict=True))
        return [
            self.bound[self.source[n]][0] if n in self.source else made[n].numpy()
            for n in self.output_names
        ]


class TorchScriptRunner:
    def __init__(
        self,
        path: Path,
        input_names: list[str],
        device: str = "cpu",
        threads: int | None = None,
        session_config: dict[str, str] | None = None,  # ONNX Runtime's; nothing here
        in_place: dict[str, str] | None = None,  # the traced step writes its buffers itself
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
        with collapsed(background=True) as self.huge_pages:
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

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
from itertools import compress
from operator import is_not
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
    output is bound to its input's memory. Every other output whose declared shape the
    inputs' shapes settle (a GPT's logits, [batch, seq, vocab]) is bound to a fresh
    array of that shape, so a step hands back arrays without asking ONNX Runtime for
    its outputs (a Python object per output, KV buffers included: 0.2-0.3 ms a step on
    SmolLM2). Returns outputs in the session's order: the in-place ones are the
    caller's arrays, now updated."""

    def __init__(self, ort, session, in_place: dict[str, str]) -> None:
        self.ort, self.session, self.in_place = ort, session, in_place
        self.binding = session.io_binding()
        outputs = session.get_outputs()
        self.output_names = [o.name for o in outputs]
        self.slot = {name: i for i, name in enumerate(self.output_names)}
        self.fresh = [  # (slot, name, declared shape, numpy dtype) of the others
            (self.slot[o.name], o.name, o.shape, _numpy_type(o.type))
            for o in outputs
            if o.name not in in_place.values()
        ]
        self.input_dims = {i.name: i.shape for i in session.get_inputs()}
        # every input bound, by name: its memory stays alive while IOBinding points at it,
        # even when a later run leaves the input out (held has the last run's only)
        self.keep: dict[str, tuple[np.ndarray, object]] = {}
        self.names: list[str] = []  # the inputs of the last run, in the caller's order
        self.held: list = []  # the arrays bound for them (a copy made for layout is not reused)
        self.result: list = [None] * len(self.output_names)  # the in-place ones kept here
        self.order: list[str] = []  # every output, in the order first bound (IOBinding's)
        self.dims: dict[str, int] = {}  # symbolic dimension -> size in the bound inputs

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        names, values = list(feeds), list(feeds.values())
        if names != self.names:  # another set of inputs, or another order: check them all
            self.names, self.held = names, [None] * len(names)
        # the inputs not bound to this very memory, found at C speed: after a step has
        # streamed the weights, every Python-level operation runs on cold caches
        for i in compress(range(len(values)), map(is_not, values, self.held)):
            values[i] = self._bind_input(names[i], values[i])
        self.held = values
        result, allocated = list(self.result), []
        for slot, name, declared, dtype in self.fresh:
            shape = [d if isinstance(d, int) else self.dims.get(d) for d in declared]
            if dtype is None or None in shape:  # ORT allocates it; fetched after the run
                self._bind_output(name)
                allocated.append((slot, name))
                continue
            result[slot] = np.empty(shape, dtype=dtype)
            self._bind_output(name, self.ort.OrtValue.ortvalue_from_numpy(result[slot]))
        self.session.run_with_iobinding(self.binding)
        if allocated:
            made = dict(zip(self.order, self.binding.get_outputs(), strict=True))
            for slot, name in allocated:
                result[slot] = made[name].numpy()
        return result

    def _bind_input(self, name: str, value: np.ndarray) -> np.ndarray:
        """Binds `value` (a contiguous copy if it is not) and returns the array bound."""
        array = np.ascontiguousarray(value)
        ortvalue = self.ort.OrtValue.ortvalue_from_numpy(array)
        self.binding.bind_ortvalue_input(name, ortvalue)
        if name in self.in_place:
            self._bind_output(self.in_place[name], ortvalue)
            self.result[self.slot[self.in_place[name]]] = array
        self.keep[name] = (array, ortvalue)  # keeps the memory alive while bound
        for dim, size in zip(self.input_dims.get(name, ()), array.shape, strict=False):
            if isinstance(dim, str):
                self.dims[dim] = size
        return array

    def _bind_output(self, name: str, *value) -> None:
        if value:
            self.binding.bind_ortvalue_output(name, *value)
        else:
            self.binding.bind_output(name, "cpu")
        if name not in self.order:
            self.order.append(name)


def _numpy_type(onnx_type: str):
    """numpy's dtype for an ONNX Runtime type string, or None for one not preallocated."""
    types = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64}
    return types.get(onnx_type)


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

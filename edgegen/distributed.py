"""Training in several processes: one rank per process (started by torchrun or by
`edgegen train --nproc N`), DistributedDataParallel over gloo on CPU or nccl on CUDA.

Every rank builds the whole batch of a step, a pure function of (seed, step), and
computes only its own rows of it (`World.rows`), so a run gives the same numbers with
any number of processes. Rank 0 alone validates and writes checkpoints while the others
wait (`World.on_main`); an error in any rank stops every rank, and rank 0 says why in
one line (`World.settle`). A rank that dies makes the others' next collective fail
(or time out after EDGEGEN_DIST_TIMEOUT seconds), and they stop with `PeerLost`.
A rank started from the CLI ends without the interpreter's teardown (`launch.end_rank`).
"""

from __future__ import annotations

import datetime
import gc
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from edgegen.errors import ConfigError, EdgegenError, PeerStopped, first_line
from edgegen.launch import launched_size

TIMEOUT_ENV = "EDGEGEN_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 1800  # rank 0 validating and saving a large model keeps the others waiting
LOST_PEER_SIGNS = ("connection closed", "connection reset", "broken pipe", "timed out", "timeout")


class PeerLost(EdgegenError):
    """Another rank of the run died or stopped answering."""


@dataclass
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    launched: bool = False  # by torchrun or --nproc: a process group (even for one process)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> World:
        size = launched_size()
        if size is None:
            return cls()
        env = os.environ
        return cls(int(env["RANK"]), size, int(env.get("LOCAL_RANK", env["RANK"])), True)

    def device(self, name: str) -> torch.device:
        """`name` ("auto", "cpu", "cuda") resolved for this rank: its own GPU on CUDA."""
        if name == "auto":
            name = "cuda" if torch.cuda.is_available() else "cpu"
        if name == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device cuda was asked for, but torch sees no CUDA GPU")
        if name != "cuda" or not self.launched:
            return torch.device(name)
        if self.local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"rank {self.rank} needs GPU {self.local_rank}, but torch sees "
                f"{torch.cuda.device_count()}: run at most one process per GPU"
            )
        return torch.device("cuda", self.local_rank)

    @contextmanager
    def running(self, device_name: str) -> Iterator[None]:
        """The process group for the run's lifetime (nothing to do in one process)."""
        if not self.launched:
            yield
            return
        cuda = torch.cuda.is_available() and device_name in ("cuda", "auto")
        local_size = int(os.environ.get("LOCAL_WORLD_SIZE", self.size))
        if cuda and local_size > torch.cuda.device_count():
            # every rank of the machine reaches the same answer, so all stop here together,
            # before any enters a collective the others would never join
            raise ConfigError(
                f"{local_size} processes on this machine but torch sees "
                f"{torch.cuda.device_count()} GPU(s): run at most one process per GPU"
            )
        if cuda:
            torch.cuda.set_device(self.local_rank)
        seconds = float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))
        try:
            dist.init_process_group(
                "nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=seconds)
            )
        except (RuntimeError, ValueError) as e:
            raise EdgegenError(f"cannot join the run's processes: {first_line(e)}") from None
        try:
            yield
            self.settle(None)  # every rank is done before any tears the group down
        finally:
            # DistributedDataParallel's reducer sits in reference cycles: collected only
            # at interpreter exit, after the group is gone, it aborted the process
            # ("terminate called without an active exception"). Collect it while the
            # group still exists.
            gc.collect()
            dist.destroy_process_group()

    def rows(self, n_rows: int, micro: int, n_micro: int) -> np.ndarray:
        """This rank's rows of micro-batch `micro` of a step's batch of `n_rows` rows.

        Slot s = micro * size + rank takes rows s, s + n_micro * size, ...; so over the
        micro-batches rank r computes rows r, r + size, ..., each kept in batch order."""
        return np.arange(micro * self.size + self.rank, n_rows, n_micro * self.size)

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        """The module as trained: DistributedDataParallel when there are other ranks.
        No device_ids, so inputs stay where they are (packed RNN lengths stay on the CPU)."""
        if not self.launched:
            return module
        return torch.nn.parallel.DistributedDataParallel(module)

    def no_sync(self, trained: torch.nn.Module, sync: bool):
        """Accumulate gradients locally unless `sync` (the last micro-batch of a step)."""
        return trained.no_sync() if self.launched and not sync else nullcontext()

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum of `tensor` over the ranks (a new tensor on every rank)."""
        tensor = tensor.detach().clone()
        if self.launched:
            with self.collective():
                dist.all_reduce(tensor)
        return tensor

    def any(self, flag: bool, device: torch.device) -> bool:
        """Whether any rank says `flag`: the ranks stop together."""
        if not self.launched:
            return flag
        return bool(self.sum(torch.tensor([float(flag)], device=device)).item())

    def on_main(self, work: Callable[[], None]) -> None:
        """Run `work` on rank 0 while the others wait; its error stops every rank."""
        error = None
        if self.is_main:
            try:
                work()
            except Exception as e:
                error = e
        self.settle(error)

    @contextmanager
    def together(self) -> Iterator[None]:
        """A stage every rank runs (setting up): an error in any of them stops them all."""
        try:
            yield
        except Exception as e:
            self.settle(e)
        else:
            self.settle(None)

    def settle(self, error: Exception | None) -> None:
        """Each rank tells whether it failed. If one did, every rank raises: rank 0 the
        error (its own, or the first rank's that failed), the others PeerStopped."""
        if not self.launched:
            if error is not None:
                raise error
            return
        said: list[str | None] = [None] * self.size
        with self.collective():
            dist.all_gather_object(said, None if error is None else _one_line(error))
        failed = [(rank, message) for rank, message in enumerate(said) if message is not None]
        if not failed:
            return
        if not self.is_main:
            raise PeerStopped(failed[0][1])
        if error is not None:
            raise error
        raise EdgegenError(f"rank {failed[0][0]}: {failed[0][1]}")

    @contextmanager
    def collective(self) -> Iterator[None]:
        """Turn the failure of a collective (a rank died or hung) into PeerLost."""
        try:
            yield
        except RuntimeError as e:
            if self.launched and _is_lost_peer(e):
                raise PeerLost(_lost_reason(e)) from None
            raise


def _is_lost_peer(error: RuntimeError) -> bool:
    return isinstance(error, dist.DistError) or any(
        sign in str(error).lower() for sign in LOST_PEER_SIGNS
    )


def _lost_reason(error: RuntimeError) -> str:
    text = str(error).lower()
    if "time" in text:
        return "another process of the run stopped answering (timed out)"
    return "another process of the run is gone (its connection closed)"


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split()) or type(error).__name__

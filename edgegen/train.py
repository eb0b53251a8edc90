"""Training loop (CPU, CUDA with bf16 autocast): AdamW, warm-up + cosine schedule,
gradient clipping, gradient accumulation, periodic validation in bits per byte, exact
resume. A run starts from a new model (byte tokenizer) or, fine-tuning, from a checkpoint
(`init`), whose architecture and tokenizer it keeps. It runs in one process or in several
(torchrun, `--nproc`; distributed.py) with the same result: the loss of a step is the sum
of its per-token losses over the whole batch's token count, whichever rank computed them.

A checkpoint holds the model files (checkpoint.py) plus `train_state.json`,
`train_state.safetensors` (optimizer moments, RNG, carried RNN state) and
`train_log.json` (the loss and validation curves).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import signal
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import edgegen
from edgegen.batches import DocumentBatches, WindowBatches, eval_windows, tokenize_documents
from edgegen.checkpoint import load_checkpoint, write_model_files
from edgegen.config import PRESETS, GPTConfig, ModelConfig, config_to_dict, preset
from edgegen.corpus import Corpus, load_corpus
from edgegen.distributed import PeerLost, World
from edgegen.errors import CheckpointError, ConfigError, PeerStopped, TrainingError
from edgegen.files import check_seal, seal, write_atomically, write_json
from edgegen.launch import check_world
from edgegen.models import build_model, count_parameters
from edgegen.output import claim_output, try_recover
from edgegen.progress import ProgressLine
from edgegen.tokenizer import ByteTokenizer, Tokenizer

STATE_FILE = "train_state.json"
STATE_TENSORS_FILE = "train_state.safetensors"
LOG_FILE = "train_log.json"
TRAIN_STATE_VERSION = 2  # 2: `init`; the model and tokenizer come from the checkpoint
MAX_LR = 10.0  # far above any useful rate; larger ones only overflow
DEFAULT_LR = {"tiny": 3e-3, "small": 2e-3, "base": 6e-4}  # smaller models take larger steps
INIT_LR = 1e-4  # fine-tuning: small steps keep what the checkpoint already knows
INIT_SEQ_LEN = 256  # fine-tuning window cap: an imported 8192 context is slow to train on


@dataclass
class TrainOptions:
    family: str = "gpt"  # "gpt" or "rnn"
    cell: str = "gru"  # RNN cell: "rnn", "gru" or "lstm"
    preset: str = "tiny"  # size preset (config.PRESETS)
    overrides: dict[str, Any] = field(default_factory=dict)  # model config fields
    data: str | None = None  # text file or folder; None = the embedded corpus
    init: str | None = None  # checkpoint to fine-tune; None = a new model
    out: str = "runs/model"  # checkpoint directory
    steps: int = 1000  # total optimizer steps
    batch_size: int = 32  # rows of each micro-batch, shared by all processes
    grad_accum: int = 1  # micro-batches per optimizer step: a step's batch is batch_size * this
    seq_len: int | None = None  # GPT window; None = max_seq_len (with init: <= INIT_SEQ_LEN)
    bptt: int = 64  # RNN truncated-BPTT length
    lr: float | None = None  # peak learning rate; None = DEFAULT_LR of the preset, or INIT_LR
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int | None = None  # None = min(100, steps // 10)
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_interval: int = 100  # validate every N steps (and at the first and last)
    eval_tokens: int = 16384  # validation tokens per evaluation
    save_interval: int | None = None  # checkpoint every N steps; None = eval_interval
    seed: int = 0
    device: str = "auto"  # "auto", "cpu" or "cuda"

    def validate(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "bptt", "eval_interval", "eval_tokens"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.seq_len is not None and self.seq_len < 1:
            raise ConfigError(f"seq_len must be positive, got {self.seq_len}")
        if self.save_interval is not None and self.save_interval <= 0:
            raise ConfigError(f"save_interval must be positive, got {self.save_interval}")
        if self.lr is not None and not 0 < self.lr <= MAX_LR:
            raise ConfigError(f"lr must be in (0, {MAX_LR:g}], got {self.lr:g}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio:g}")
        for name in ("weight_decay", "grad_clip"):
            value = getattr(self, name)
            if not 0 <= value <= 1e6:
                raise ConfigError(f"{name} must be in [0, 1e6], got {value:g}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ConfigError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device must be auto, cpu or cuda, got {self.device!r}")

    @property
    def step_batch(self) -> int:
        """Rows per optimizer step, over all micro-batches and processes."""
        return self.batch_size * self.grad_accum

    @property
    def peak_lr(self) -> float:
        if self.lr is not None:
            return self.lr
        return INIT_LR if self.init else DEFAULT_LR.get(self.preset, 1e-3)

    def window(self, config: GPTConfig) -> int:
        """The GPT training window: seq_len, else the model's whole context (capped when
        fine-tuning, since an imported model's context can be thousands of tokens)."""
        if self.seq_len is not None:
            return self.seq_len
        return min(config.max_seq_len, INIT_SEQ_LEN) if self.init else config.max_seq_len

    def model_config(self) -> ModelConfig:
        extra = {"cell": self.cell} if self.family == "rnn" else {}
        return preset(self.family, self.preset, **extra, **self.overrides)


@dataclass
class TrainResult:
    out: Path
    step: int
    parameters: int
    val_bpb: float | None  # last validation figure
    log: dict[str, list[dict[str, float]]]
    interrupted: bool = False
    rank: int = 0  # in a distributed run, the process this result is from (0 reports)


def train(
    options: TrainOptions,
    *,
    resume: bool = False,
    force: bool = False,
    progress: bool = True,
    on_step: Callable[[int, float], bool | None] | None = None,
) -> TrainResult:
    """Train (or resume) a model and write its checkpoint to `options.out`.

    With `options.init` the run starts from that checkpoint (fine-tuning): its config
    and tokenizer, which family, cell, preset and overrides may only repeat.
    On resume the saved options are used; only `steps` (the new total), `device`
    and the evaluation/save intervals come from `options`, and any other option set
    to a value that differs from the saved run is refused. `on_step(step, loss)`
    returning True stops the run after saving a checkpoint, as Ctrl-C does.

    Started by torchrun (or `edgegen train --nproc`), this is one rank of a distributed
    run: rank 0 claims the output, validates and writes; `on_step` runs on every rank.
    """
    world = World.from_env()
    with world.running(options.device), contextlib.ExitStack() as claimed:
        world.on_main(lambda: claimed.enter_context(_claim(options, resume, force)))
        return _train_claimed(options, resume, progress and world.is_main, on_step, world)


def _claim(options: TrainOptions, resume: bool, force: bool):
    out = Path(options.out)
    inputs = [path for path in (options.data, options.init) if path]
    if resume and not (out / STATE_FILE).is_file() and not out.is_symlink():
        try_recover(out)
        if not (out / STATE_FILE).is_file():
            raise CheckpointError(f"nothing to resume: no training checkpoint in {out}")
    return claim_output(out, "checkpoint", inputs=inputs, force=force, existing=resume)


def _train_claimed(options, resume: bool, progress: bool, on_step, world: World) -> TrainResult:
    with world.together():  # the same checks on every rank; rank 0 reports a failure
        out = Path(options.out)
        saved = _read_train_state(out) if resume else None
        if saved is not None:
            options = _resumed_options(saved["options"], options)
        options.validate()
        check_world(world.size, options.batch_size)
        device = world.device(options.device)
        torch.manual_seed(options.seed)
        model, tokenizer = _starting_model(options, saved is not None, device)
        if options.init and saved is None:
            options = _init_options(options, model.config)
        corpus = load_corpus(options.data)
        if saved is not None and saved["corpus"] != corpus.fingerprint():
            raise CheckpointError(f"the training text changed since {out} was saved; cannot resume")
        task = make_task(options, model, corpus, tokenizer, device)
        optimizer = make_optimizer(model, options)
        run = Run(options, model, optimizer, task, tokenizer, corpus, world)
        if saved is not None:
            run.restore(out, saved)
    return run.loop(progress, on_step)


def _starting_model(options: TrainOptions, resumed: bool, device: torch.device):
    """(model, tokenizer) a run starts from: a resumed run's own checkpoint (so a
    fine-tuned one keeps its tokenizer), the init checkpoint, or a new model with the
    byte tokenizer. Checkpoints are checked against their hashes as they load."""
    if resumed:
        return load_checkpoint(options.out, device)
    if options.init:
        return load_checkpoint(options.init, device)
    return build_model(options.model_config()).to(device), ByteTokenizer()


def _init_options(options: TrainOptions, config: ModelConfig) -> TrainOptions:
    """Refuse an architecture option that contradicts the init checkpoint; the options
    then name its family and cell, so a resume compares them with what was trained."""
    default, fields = TrainOptions(), config_to_dict(config)
    asked = {
        name: getattr(options, name)
        for name in ("family", "cell")
        if getattr(options, name) != getattr(default, name)
    }
    for name, value in {**asked, **options.overrides}.items():
        if name not in fields:
            raise ConfigError(f"--init {options.init} is a {config.family} model: it has no {name}")
        if value != fields[name]:
            _contradicts(options.init, name, value, fields[name])
    if options.preset != default.preset:
        _check_preset(options, config)
    return dataclasses.replace(options, family=config.family, cell=fields.get("cell", default.cell))


def _check_preset(options: TrainOptions, config: ModelConfig) -> None:
    """A preset names sizes: it may be given only when the checkpoint has those sizes."""
    extra = {"cell": config.cell} if config.family == "rnn" else {}
    sized, fields = (
        config_to_dict(preset(config.family, options.preset, **extra)),
        config_to_dict(config),
    )
    for name in PRESETS[config.family][options.preset]:
        if sized[name] != fields[name]:
            _contradicts(
                options.init, f"--preset {options.preset}'s {name}", sized[name], fields[name]
            )


def _contradicts(init: str | None, name: str, value: Any, has: Any) -> None:
    raise ConfigError(
        f"--init {init} keeps its own architecture: {name}={value!r} contradicts its "
        f"{name.split()[-1]}={has!r} (leave the option out)"
    )


RESUME_KEEPS = ("steps", "device", "eval_interval", "save_interval", "out")


def _resumed_options(saved: TrainOptions, asked: TrainOptions) -> TrainOptions:
    """The saved run's options, with the few a resume may change taken from `asked`.
    Any other option set away from its default to a value the run did not use is an
    error: silently training on something else than asked would be worse."""
    default = TrainOptions()
    for f in dataclasses.fields(TrainOptions):
        if f.name in RESUME_KEEPS:
            continue
        value = getattr(asked, f.name)
        if value != getattr(default, f.name) and value != getattr(saved, f.name):
            raise ConfigError(
                f"--resume continues the saved run, which has {f.name}={getattr(saved, f.name)!r}; "
                f"{f.name}={value!r} cannot change (start a new run with --force instead)"
            )
    return dataclasses.replace(saved, **{k: getattr(asked, k) for k in RESUME_KEEPS})


def lr_at(step: int, options: TrainOptions) -> float:
    """Linear warm-up, then cosine decay to lr * min_lr_ratio at the last step."""
    warmup = (
        options.warmup_steps if options.warmup_steps is not None else min(100, options.steps // 10)
    )
    peak = options.peak_lr
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, options.steps - warmup))
    floor = peak * options.min_lr_ratio
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, options: TrainOptions) -> torch.optim.AdamW:
    """Weight decay on matrices and embeddings only, not on biases and norms."""
    params = list({id(p): p for p in model.parameters()}.values())
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": options.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=options.peak_lr, betas=(0.9, 0.95))


class Run:
    """The mutable state of one training run: step, log, and what a checkpoint saves."""

    def __init__(self, options, model, optimizer, task, tokenizer, corpus, world: World) -> None:
        self.options, self.model, self.optimizer, self.task = options, model, optimizer, task
        self.tokenizer, self.corpus, self.device = tokenizer, corpus, task.device
        self.world = world
        self.trained = world.wrap(task.trainable())  # what the steps call (DDP in a group)
        self.step = 0
        self.saved_step: int | None = None  # the last step this run (or the one resumed) saved
        self.log: dict[str, list[dict[str, float]]] = {"train": [], "val": []}

    def loop(self, progress: bool, on_step) -> TrainResult:
        opts = self.options
        save_every = opts.save_interval or opts.eval_interval
        bar = ProgressLine(opts.steps, enabled=progress, every=max(1, opts.steps // 20))
        interrupted = False
        try:  # an error (a diverged run) must not leave its line glued to the bar's
            if not self.log["val"]:
                self.world.on_main(self.validate)
            with _stop_on_sigint() as stop:
                while self.step < opts.steps and not interrupted:
                    loss, tokens_per_s = self.train_step()
                    last = self.step == opts.steps
                    if self.step % opts.eval_interval == 0 or last:
                        self.world.on_main(self.validate)
                    if bar.enabled:  # rank 0 (the others do not validate)
                        bar.update(self.step, self.describe(loss, tokens_per_s))
                    asked = bool(on_step and on_step(self.step, loss)) or stop.is_set()
                    interrupted = self.world.any(asked, self.device)  # the ranks stop together
                    if self.step % save_every == 0 or last or interrupted:
                        self.save()
        except PeerLost as e:
            stopped = f"training stopped at step {self.step}: {e}"
            raise TrainingError(f"{stopped}; {self.kept()}") from None
        finally:
            bar.close()
        return TrainResult(
            out=Path(opts.out),
            step=self.step,
            parameters=count_parameters(self.model),
            val_bpb=self.log["val"][-1]["bpb"] if self.log["val"] else None,
            log=self.log,
            interrupted=interrupted,
            rank=self.world.rank,
        )

    def train_step(self) -> tuple[float, float]:
        """One optimizer step over `grad_accum` micro-batches, each shared by the ranks."""
        start = time.perf_counter()
        self.trained.train()
        lr = lr_at(self.step, self.options)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        batch, n_micro = self.task.batch(self.step), self.options.grad_accum
        total = torch.zeros((), device=self.device)
        self.optimizer.zero_grad(set_to_none=True)
        with self.world.collective():
            for micro in range(n_micro):
                rows = self.world.rows(batch.n_rows, micro, n_micro)
                with self.world.no_sync(self.trained, micro == n_micro - 1):
                    with _autocast(self.device):
                        loss = self.task.loss(self.trained, batch, rows) / batch.n_tokens
                    (loss * self.world.size).backward()  # DDP averages the ranks' gradients
                total += loss.detach()
            value = self.world.sum(total).item()
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.options.grad_clip)
        if not (math.isfinite(value) and math.isfinite(norm.item())):
            what = "loss" if not math.isfinite(value) else "gradient norm"
            self.diverged(f"{what} {value if what == 'loss' else norm.item()}")
        self.optimizer.step()
        self.step += 1
        tokens_per_s = batch.n_tokens / (time.perf_counter() - start)
        entry = {"step": self.step, "loss": value, "lr": lr, "tokens_per_s": tokens_per_s}
        self.log["train"].append(entry)
        return value, tokens_per_s

    @torch.no_grad()
    def validate(self) -> None:
        self.model.eval()
        with _autocast(self.device):
            nll, n_targets, n_bytes = self.task.evaluate(self.model)
        bpb = nll / math.log(2) / max(1, n_bytes)
        if not math.isfinite(bpb):
            self.diverged(f"validation loss {nll / n_targets}", validating=True)
        self.log["val"].append({"step": self.step, "loss": nll / n_targets, "bpb": bpb})

    def diverged(self, what: str, validating: bool = False) -> None:
        """Stop without saving: the last checkpoint on disk is the last finite one."""
        if not self.world.is_main:  # every rank sees the same loss; rank 0 reports it
            raise PeerStopped(what)
        step = self.step + (not validating)
        raise TrainingError(
            f"training diverged at step {step}: {what}; the learning rate "
            f"({self.options.peak_lr:g}) is likely too high. {self.kept()}"
        )

    def kept(self) -> str:
        """What the output holds now that the run stops early."""
        out = Path(self.options.out)
        if self.saved_step is not None:
            return f"{out} keeps this run's last finite checkpoint (step {self.saved_step})"
        return f"{out} is left as it was" if out.exists() else "nothing was written"

    def describe(self, loss: float, tokens_per_s: float) -> str:
        val = self.log["val"][-1]
        return (
            f"loss {loss:.3f} | val {val['bpb']:.3f} bpb @ {val['step']} | "
            f"{tokens_per_s / 1000:.1f}k tok/s"
        )

    def save(self) -> None:
        """Rank 0 writes the checkpoint while the others wait; the carried RNN state is
        gathered first, since each rank carries only its own rows of it."""
        carry = tuple(self.world.sum(t) for t in self.task.carry)
        self.world.on_main(lambda: self._write(carry))
        self.saved_step = self.step  # the other ranks learn it here

    def _write(self, carry: tuple[torch.Tensor, ...]) -> None:
        if not all(torch.isfinite(p).all() for p in self.model.parameters()):
            self.diverged("the weights are no longer finite", validating=True)
        tensors = {f"carry.{i}": t.contiguous() for i, t in enumerate(carry)}
        tensors["rng.cpu"] = torch.get_rng_state()
        if self.device.type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state(self.device)
        for index, state in self.optimizer.state_dict()["state"].items():
            for key, value in state.items():
                tensors[f"optim.{index}.{key}"] = value.detach().cpu().contiguous()
        meta = {
            "version": TRAIN_STATE_VERSION,
            "step": self.step,
            "options": dataclasses.asdict(self.options),
            "corpus": self.corpus.fingerprint(),
            "edgegen": edgegen.__version__,
            "torch": torch.__version__,
        }

        def fill(tmp: Path) -> None:
            write_model_files(tmp, self.model, self.tokenizer)
            save_file(tensors, str(tmp / STATE_TENSORS_FILE))
            write_json(tmp / STATE_FILE, meta)
            write_json(tmp / LOG_FILE, self.log)
            seal(tmp)

        write_atomically(Path(self.options.out), fill)
        self.saved_step = self.step  # written, even if another rank is lost before it hears

    def restore(self, directory: Path, saved: dict[str, Any]) -> None:
        """The optimizer, RNG and carried state (the weights came with the model)."""
        try:
            tensors = load_file(str(directory / STATE_TENSORS_FILE))
            self.log = json.loads((directory / LOG_FILE).read_text())
        except Exception as e:  # any damage: one message, not a traceback
            raise CheckpointError(f"cannot resume from {directory}: {e}") from None
        state: dict[int, dict[str, torch.Tensor]] = {}
        for name, value in tensors.items():
            if name.startswith("optim."):
                _, index, key = name.split(".", 2)
                # AdamW keeps its step counter on the CPU
                state.setdefault(int(index), {})[key] = (
                    value if key == "step" else value.to(self.device)
                )
        groups = self.optimizer.state_dict()["param_groups"]
        self.optimizer.load_state_dict({"state": state, "param_groups": groups})
        torch.set_rng_state(tensors["rng.cpu"])
        if "rng.cuda" in tensors and self.device.type == "cuda":
            torch.cuda.set_rng_state(tensors["rng.cuda"], self.device)
        n_carry = sum(name.startswith("carry.") for name in tensors)
        self.task.carry = tuple(tensors[f"carry.{i}"].to(self.device) for i in range(n_carry))
        self.step = self.saved_step = saved["step"]


# --- what each family trains on -------------------------------------------------


@dataclass
class StepBatch:
    """The whole batch of one step, which every rank builds; each computes its own rows."""

    step: int
    data: Any  # what the task's loss reads
    n_rows: int  # rows the micro-batches and ranks share
    n_tokens: int  # targets in the whole batch: the step's loss is their mean


def make_task(options, model, corpus: Corpus, tokenizer: Tokenizer, device):
    train_docs = tokenize_documents(corpus.train, tokenizer)
    val_docs = tokenize_documents(corpus.val, tokenizer)
    if isinstance(model.config, GPTConfig):
        return WindowTask(options, model, train_docs, val_docs, tokenizer, device)
    return DocumentTask(options, model, train_docs, val_docs, tokenizer, device)


def text_bytes(tokenizer: Tokenizer, device) -> torch.Tensor:
    """The bytes of text each id stands for, so validation reports bits per byte for
    any tokenizer: a byte id 1, a BPE token its UTF-8 length, a special token 0."""
    special = tokenizer.special_ids
    lengths = [
        0 if i in special else len(tokenizer.decode_bytes([i])) for i in range(tokenizer.vocab_size)
    ]
    return torch.tensor(lengths, dtype=torch.int64, device=device)


class WindowTask:
    """GPT: next-token loss on fixed windows."""

    carry: tuple[torch.Tensor, ...] = ()

    def __init__(self, options, model, train_docs, val_docs, tokenizer, device):
        self.seq_len = options.window(model.config)
        if self.seq_len > model.config.max_seq_len:
            raise ConfigError(
                f"seq_len {self.seq_len} exceeds max_seq_len {model.config.max_seq_len}"
            )
        self.batches = WindowBatches(train_docs, self.seq_len, options.step_batch, options.seed)
        self.model, self.val_docs, self.options, self.device = model, val_docs, options, device
        self.bytes_of = text_bytes(tokenizer, device)

    def trainable(self) -> torch.nn.Module:
        return self.model

    def batch(self, step: int) -> StepBatch:
        x, y = self.batches.train_batch(step)
        return StepBatch(step, (x, y), len(x), y.size)

    def loss(self, trained, batch: StepBatch, rows: np.ndarray) -> torch.Tensor:
        """The sum of the per-token losses of `rows`."""
        x, y = (torch.from_numpy(a[rows]).to(self.device) for a in batch.data)
        logits = trained(x)[0]
        return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="sum")

    def evaluate(self, model) -> tuple[float, int, int]:
        nll, n_targets, n_bytes = 0.0, 0, 0
        opts = self.options
        for x, y in eval_windows(self.val_docs, self.seq_len, opts.batch_size, opts.eval_tokens):
            x, y = torch.from_numpy(x).to(self.device), torch.from_numpy(y).to(self.device)
            logits = model(x)[0].float()
            nll += F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()
            n_targets += y.numel()
            n_bytes += int(self.bytes_of[y].sum())
        return nll, n_targets, n_bytes


class PackedRNN(torch.nn.Module):
    """An RNN's packed forward as a module's forward, which DistributedDataParallel calls."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, lengths, *state):
        return self.model.forward_packed(input_ids, lengths, *state)


class DocumentTask:
    """RNN: packed document batches, state carried across chunks (truncated BPTT).

    The carried state has one row per row of the batch still running; a rank fills in
    the rows it computes and leaves the others zero, so the ranks' sum is the whole
    state (what a checkpoint saves, whatever the number of processes)."""

    def __init__(self, options, model, train_docs, val_docs, tokenizer, device) -> None:
        common = dict(bptt=options.bptt, batch_size=options.step_batch, pad_id=tokenizer.pad_id)
        self.batches = DocumentBatches(train_docs, seed=options.seed, **common)
        self.val_batches = DocumentBatches(val_docs, seed=options.seed, **common)
        self.model, self.options, self.device = model, options, device
        self.pad_id = tokenizer.pad_id
        self.bytes_of = text_bytes(tokenizer, device)
        self.carry: tuple[torch.Tensor, ...] = ()
        self._carry_in: tuple[torch.Tensor, ...] = ()

    def trainable(self) -> torch.nn.Module:
        return PackedRNN(self.model)

    def batch(self, step: int) -> StepBatch:
        chunk = self.batches.train_chunk(step)
        running = int((chunk.lengths > 0).sum())
        self._carry_in = self.carry
        self.carry = tuple(torch.zeros_like(s) for s in self.model.init_state(running))
        return StepBatch(step, chunk, len(chunk.lengths), int(chunk.lengths.sum()))

    def loss(self, trained, batch: StepBatch, rows: np.ndarray) -> torch.Tensor:
        """The sum of the per-token losses of `rows`; their new state is carried."""
        chunk = batch.data
        rows = rows[chunk.lengths[rows] > 0]  # those still running
        if not len(rows):
            return self._idle(trained)
        logits, y, index, new_state = self._run(trained, chunk, rows, self._carry_in)
        for carry, state in zip(self.carry, new_state, strict=True):
            carry[:, index] = state.detach()
        return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="sum")

    def _idle(self, trained) -> torch.Tensor:
        """A rank whose rows have all ended still takes part in the step (DDP reduces every
        parameter's gradient): one padding token, weighted 0."""
        x = torch.full((1, 1), self.pad_id, dtype=torch.int64, device=self.device)
        logits = trained(x, torch.ones(1, dtype=torch.int64), *self.model.init_state(1))[0]
        return logits.sum() * 0.0

    def evaluate(self, model) -> tuple[float, int, int]:
        nll, n_targets, n_bytes, carry = 0.0, 0, 0, ()
        for chunk in self.val_batches.eval_chunks(self.options.eval_tokens):
            rows = np.flatnonzero(chunk.lengths > 0)  # a prefix: rows still running
            logits, y, _, carry = self._run(model.forward_packed, chunk, rows, carry)
            nll += F.cross_entropy(
                logits.flatten(0, 1).float(), y.flatten(), reduction="sum"
            ).item()
            n_targets += int((y >= 0).sum())
            n_bytes += int(self.bytes_of[y[y >= 0]].sum())
        return nll, n_targets, n_bytes

    def _run(self, forward, chunk, rows: np.ndarray, carry):
        """`rows` of `chunk` from their carried state (zero where the chunk starts its
        documents): (logits, targets, the rows as a tensor, their new state)."""
        index = torch.from_numpy(rows).to(self.device)
        if chunk.first:
            state = self.model.init_state(len(rows))
        else:
            state = tuple(s[:, index] for s in carry)
        x, y = (torch.from_numpy(a[rows]).to(self.device) for a in (chunk.inputs, chunk.targets))
        logits, *new_state = forward(x, torch.from_numpy(chunk.lengths[rows]), *state)
        return logits, y, index, tuple(new_state)


# --- helpers ---------------------------------------------------------------------


def _read_train_state(directory: Path) -> dict[str, Any]:
    path = directory / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"nothing to resume: no training checkpoint in {directory}")
    # the model's own files are checked as they load (load_checkpoint), not hashed twice
    check_seal(directory, (STATE_FILE, STATE_TENSORS_FILE, LOG_FILE))
    try:
        meta = json.loads(path.read_text())
        version = meta["version"]
        options = TrainOptions(**meta["options"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"cannot read training state {path}: {e}") from None
    step = meta.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise CheckpointError(f"{path}: step must be an integer >= 0, got {step!r}")
    if version > TRAIN_STATE_VERSION:
        raise CheckpointError(
            f"{path} has training state version {version}; this edgegen reads up to "
            f"{TRAIN_STATE_VERSION}"
        )
    return {**meta, "options": options}


def _autocast(device: torch.device):
    """bf16 autocast on CUDA; plain fp32 elsewhere."""
    return torch.autocast(
        device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"
    )


@contextmanager
def _stop_on_sigint():
    """Ctrl-C asks the loop to stop after the current step (and save); a second one aborts."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)

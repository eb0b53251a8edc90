"""Training loop (CPU, CUDA with bf16 autocast): AdamW, warm-up + cosine schedule,
gradient clipping, periodic validation in bits per byte, exact resume. A run starts
from a new model (byte tokenizer) or, fine-tuning, from a checkpoint (`init`), whose
architecture and tokenizer it keeps.

A checkpoint holds the model files (checkpoint.py) plus `train_state.json`,
`train_state.safetensors` (optimizer moments, RNG, carried RNN state) and
`train_log.json` (the loss and validation curves).
"""

from __future__ import annotations

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

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import edgegen
from edgegen.batches import DocumentBatches, WindowBatches, eval_windows, tokenize_documents
from edgegen.checkpoint import load_checkpoint, write_model_files
from edgegen.config import PRESETS, GPTConfig, ModelConfig, config_to_dict, preset
from edgegen.corpus import Corpus, load_corpus
from edgegen.errors import CheckpointError, ConfigError, TrainingError
from edgegen.files import check_seal, seal, write_atomically, write_json
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
    batch_size: int = 32
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
        for name in ("steps", "batch_size", "bptt", "eval_interval", "eval_tokens"):
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
    """
    out = Path(options.out)
    inputs = [path for path in (options.data, options.init) if path]
    if resume and not (out / STATE_FILE).is_file() and not out.is_symlink():
        try_recover(out)
        if not (out / STATE_FILE).is_file():
            raise CheckpointError(f"nothing to resume: no training checkpoint in {out}")
    with claim_output(out, "checkpoint", inputs=inputs, force=force, existing=resume):
        return _train_claimed(options, resume, progress, on_step)


def _train_claimed(options: TrainOptions, resume: bool, progress: bool, on_step) -> TrainResult:
    out = Path(options.out)
    saved = _read_train_state(out) if resume else None
    if saved is not None:
        options = _resumed_options(saved["options"], options)
    options.validate()
    device = resolve_device(options.device)
    torch.manual_seed(options.seed)
    model, tokenizer = _starting_model(options, saved is not None, device)
    if options.init and saved is None:
        options = _init_options(options, model.config)
    corpus = load_corpus(options.data)
    if saved is not None and saved["corpus"] != corpus.fingerprint():
        raise CheckpointError(f"the training text changed since {out} was saved; cannot resume")
    task = make_task(options, model.config, corpus, tokenizer, device)
    optimizer = make_optimizer(model, options)
    run = Run(options, model, optimizer, task, tokenizer, corpus, device)
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


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device cuda was asked for, but torch sees no CUDA GPU")
    return torch.device(name)


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

    def __init__(self, options, model, optimizer, task, tokenizer, corpus, device) -> None:
        self.options, self.model, self.optimizer, self.task = options, model, optimizer, task
        self.tokenizer, self.corpus, self.device = tokenizer, corpus, device
        self.step = 0
        self.saved_step: int | None = None  # the last step this run (or the one resumed) saved
        self.log: dict[str, list[dict[str, float]]] = {"train": [], "val": []}

    def loop(self, progress: bool, on_step) -> TrainResult:
        opts = self.options
        save_every = opts.save_interval or opts.eval_interval
        bar = ProgressLine(opts.steps, enabled=progress, every=max(1, opts.steps // 20))
        if not self.log["val"]:
            self.validate()
        interrupted = False
        try:  # an error (a diverged run) must not leave its line glued to the bar's
            with _stop_on_sigint() as stop:
                while self.step < opts.steps and not interrupted:
                    loss, tokens_per_s = self.train_step()
                    last = self.step == opts.steps
                    if self.step % opts.eval_interval == 0 or last:
                        self.validate()
                    bar.update(self.step, self.describe(loss, tokens_per_s))
                    interrupted = bool(on_step and on_step(self.step, loss)) or stop.is_set()
                    if self.step % save_every == 0 or last or interrupted:
                        self.save()
        finally:
            bar.close()
        return TrainResult(
            out=Path(opts.out),
            step=self.step,
            parameters=count_parameters(self.model),
            val_bpb=self.log["val"][-1]["bpb"] if self.log["val"] else None,
            log=self.log,
            interrupted=interrupted,
        )

    def train_step(self) -> tuple[float, float]:
        start = time.perf_counter()
        self.model.train()
        lr = lr_at(self.step, self.options)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        with _autocast(self.device):
            loss, n_tokens = self.task.loss(self.model, self.step)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.options.grad_clip)
        value = loss.item()
        if not (math.isfinite(value) and math.isfinite(norm.item())):
            what = "loss" if not math.isfinite(value) else "gradient norm"
            self.diverged(f"{what} {value if what == 'loss' else norm.item()}")
        self.optimizer.step()
        self.step += 1
        tokens_per_s = n_tokens / (time.perf_counter() - start)
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
        out, step = Path(self.options.out), self.step + (not validating)
        kept = (
            f"{out} keeps this run's last finite checkpoint (step {self.saved_step})"
            if self.saved_step is not None
            else f"{out} is left as it was"
            if out.exists()
            else "nothing was written"
        )
        raise TrainingError(
            f"training diverged at step {step}: {what}; the learning rate "
            f"({self.options.peak_lr:g}) is likely too high. {kept}"
        )

    def describe(self, loss: float, tokens_per_s: float) -> str:
        val = self.log["val"][-1]
        return (
            f"loss {loss:.3f} | val {val['bpb']:.3f} bpb @ {val['step']} | "
            f"{tokens_per_s / 1000:.1f}k tok/s"
        )

    def save(self) -> None:
        if not all(torch.isfinite(p).all() for p in self.model.parameters()):
            self.diverged("the weights are no longer finite", validating=True)
        tensors = {f"carry.{i}": t.contiguous() for i, t in enumerate(self.task.carry)}
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
        self.saved_step = self.step

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


def make_task(options, config, corpus: Corpus, tokenizer: Tokenizer, device):
    train_docs = tokenize_documents(corpus.train, tokenizer)
    val_docs = tokenize_documents(corpus.val, tokenizer)
    if isinstance(config, GPTConfig):
        return WindowTask(options, config, train_docs, val_docs, tokenizer, device)
    return DocumentTask(options, train_docs, val_docs, tokenizer, device)


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

    def __init__(self, options, config: GPTConfig, train_docs, val_docs, tokenizer, device):
        self.seq_len = options.window(config)
        if self.seq_len > config.max_seq_len:
            raise ConfigError(f"seq_len {self.seq_len} exceeds max_seq_len {config.max_seq_len}")
        self.batches = WindowBatches(train_docs, self.seq_len, options.batch_size, options.seed)
        self.val_docs, self.options, self.device = val_docs, options, device
        self.bytes_of = text_bytes(tokenizer, device)

    def loss(self, model, step: int):
        x, y = (torch.from_numpy(a).to(self.device) for a in self.batches.train_batch(step))
        logits = model(x)[0]
        return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten()), y.numel()

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


class DocumentTask:
    """RNN: packed document batches, state carried across chunks (truncated BPTT)."""

    def __init__(self, options, train_docs, val_docs, tokenizer, device) -> None:
        common = dict(bptt=options.bptt, batch_size=options.batch_size, pad_id=tokenizer.pad_id)
        self.batches = DocumentBatches(train_docs, seed=options.seed, **common)
        self.val_batches = DocumentBatches(val_docs, seed=options.seed, **common)
        self.options, self.device = options, device
        self.bytes_of = text_bytes(tokenizer, device)
        self.carry: tuple[torch.Tensor, ...] = ()

    def loss(self, model, step: int):
        chunk = self.batches.train_chunk(step)
        logits, y, self.carry = self._run(model, chunk, self.carry)
        self.carry = tuple(s.detach() for s in self.carry)
        return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten()), int(chunk.lengths.sum())

    def evaluate(self, model) -> tuple[float, int, int]:
        nll, n_targets, n_bytes, carry = 0.0, 0, 0, ()
        for chunk in self.val_batches.eval_chunks(self.options.eval_tokens):
            logits, y, carry = self._run(model, chunk, carry)
            nll += F.cross_entropy(
                logits.flatten(0, 1).float(), y.flatten(), reduction="sum"
            ).item()
            n_targets += int((y >= 0).sum())
            n_bytes += int(self.bytes_of[y[y >= 0]].sum())
        return nll, n_targets, n_bytes

    def _run(self, model, chunk, carry):
        rows = int((chunk.lengths > 0).sum())  # rows still running: a prefix (longest first)
        state = model.init_state(rows) if chunk.first else tuple(s[:, :rows] for s in carry)
        x = torch.from_numpy(chunk.inputs[:rows]).to(self.device)
        y = torch.from_numpy(chunk.targets[:rows]).to(self.device)
        lengths = torch.from_numpy(chunk.lengths[:rows])
        logits, *new_state = model.forward_packed(x, lengths, *state)
        return logits, y, tuple(new_state)


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

"""Training in several processes (DDP over gloo on CPU): the same losses and weights as one
process at the same global batch, gradient accumulation as a larger batch, resume with
another number of processes, and a rank killed mid-run. The runs are real processes,
started by `edgegen train --nproc`, by torchrun, or by hand with torchrun's environment."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from edgegen.checkpoint import load_checkpoint
from edgegen.cli import main
from edgegen.train import STATE_FILE, TrainOptions, train
from tests.conftest import TEXT
from tests.test_interrupted import _wait_for_step

STEPS = 20
TOLERANCE = 1e-5
FAMILY = {
    "gpt": dict(family="gpt", seq_len=32, overrides=dict(dim=32, n_heads=4, n_layers=1)),
    "gru": dict(family="rnn", cell="gru", bptt=16, overrides=dict(dim=32, hidden_size=48)),
}
GROUP_TIMEOUT = {"EDGEGEN_DIST_TIMEOUT": "20"}  # a lost rank is noticed within seconds


def options(family, out, text_file, **kw) -> TrainOptions:
    """A tiny run: validation only at the first and the last step."""
    base = dict(
        data=str(text_file), out=str(out), steps=STEPS, batch_size=8, lr=3e-3,
        eval_interval=STEPS, eval_tokens=1024, device="cpu",
    )  # fmt: skip
    return TrainOptions(**{**base, **FAMILY[family], **kw})


def cli_args(opts: TrainOptions) -> list[str]:
    args = ["train", "--family", opts.family, "--cell", opts.cell, "--data", opts.data]
    args += ["--out", opts.out, "--steps", opts.steps, "--batch-size", opts.batch_size]
    args += ["--grad-accum", opts.grad_accum, "--bptt", opts.bptt, "--lr", opts.lr]
    args += ["--eval-interval", opts.eval_interval, "--eval-tokens", opts.eval_tokens]
    args += ["--save-interval", opts.save_interval] if opts.save_interval else []
    args += ["--device", opts.device, "--quiet"]
    args += ["--seq-len", opts.seq_len] if opts.seq_len else []
    for name, value in opts.overrides.items():
        args += ["--set", f"{name}={value}"]
    return [str(a) for a in args]


def run(command: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, **GROUP_TIMEOUT}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    return done


def edgegen(*args) -> list[str]:
    return [sys.executable, "-m", "edgegen", *args]


def torchrun(nproc: int, *args) -> list[str]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    return [*launcher, "--nproc-per-node", str(nproc), "-m", "edgegen", *args]


def start_ranks(command: list[str], nproc: int, port: int) -> list[subprocess.Popen]:
    """The ranks of one run started by hand, with the environment torchrun gives them."""
    env = {**os.environ, **GROUP_TIMEOUT, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    env |= {"WORLD_SIZE": str(nproc), "OMP_NUM_THREADS": "1"}
    return [
        subprocess.Popen(
            command,
            env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(nproc)
    ]


def free_port() -> int:
    from edgegen.launch import _free_port

    return _free_port()


def assert_same_run(a: Path, b: Path) -> None:
    """Losses within TOLERANCE at every step, and final weights within TOLERANCE."""
    log_a, log_b = (json.loads((d / "train_log.json").read_text())["train"] for d in (a, b))
    assert [e["step"] for e in log_a] == [e["step"] for e in log_b]
    for x, y in zip(log_a, log_b, strict=True):
        assert abs(x["loss"] - y["loss"]) <= TOLERANCE, (x["step"], x["loss"], y["loss"])
    weights_a, weights_b = (load_file(d / "model.safetensors") for d in (a, b))
    assert weights_a.keys() == weights_b.keys()
    for name, value in weights_a.items():
        difference = (value - weights_b[name]).abs().max().item()
        assert difference <= TOLERANCE, (name, difference)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """Uninterrupted single-process runs, one per (family, batch size), made once."""
    root, made = tmp_path_factory.mktemp("one"), {}
    (root / "text.txt").write_text(TEXT)

    def reference(family: str, batch_size: int) -> Path:
        out = root / f"{family}-{batch_size}"
        if out not in made:
            train(options(family, out, root / "text.txt", batch_size=batch_size), progress=False)
            made[out] = True
        return out

    return reference


@pytest.mark.slow
@pytest.mark.parametrize(
    "family,batch_size,grad_accum,launcher",
    [
        ("gpt", 8, 1, "nproc"),
        ("gpt", 4, 2, "torchrun"),  # grad-accum 2 against one batch twice as large
        ("gru", 3, 1, "nproc"),  # uneven shards, ranks whose rows have ended
        ("gru", 4, 2, "nproc"),
    ],
)
def test_two_processes_train_as_one(
    tmp_path, text_file, one_process, family, batch_size, grad_accum, launcher
):
    opts = options(family, tmp_path / "two", text_file, batch_size=batch_size)
    opts.grad_accum = grad_accum
    args = cli_args(opts)
    run(edgegen(*args, "--nproc", "2") if launcher == "nproc" else torchrun(2, *args))
    assert_same_run(one_process(family, batch_size * grad_accum), tmp_path / "two")
    load_checkpoint(tmp_path / "two")
    assert json.loads((tmp_path / "two" / STATE_FILE).read_text())["options"]["grad_accum"] == (
        grad_accum
    )


INTERRUPT_AT_10 = """
from edgegen.train import TrainOptions, train
options = TrainOptions(**{options!r})
train(options, progress=False, on_step=lambda step, loss: step == 10)
"""


@pytest.mark.slow
@pytest.mark.parametrize("family", ["gru", "gpt"])
def test_resume_with_another_number_of_processes(tmp_path, text_file, one_process, family):
    """Two processes stop at step 10 and one resumes; one process stops at 10 and two resume.
    Both end as the uninterrupted run."""
    two_then_one = options(family, tmp_path / "two-one", text_file)
    fields = {k: getattr(two_then_one, k) for k in two_then_one.__dataclass_fields__}
    script = textwrap.dedent(INTERRUPT_AT_10).format(options=fields)
    ranks = start_ranks([sys.executable, "-c", script], 2, free_port())
    for rank in ranks:
        _, stderr = rank.communicate(timeout=300)
        assert rank.returncode == 0, stderr
    assert json.loads((tmp_path / "two-one" / STATE_FILE).read_text())["step"] == 10
    assert train(two_then_one, resume=True, progress=False).step == STEPS

    one_then_two = options(family, tmp_path / "one-two", text_file)
    first = train(one_then_two, progress=False, on_step=lambda step, loss: step == 10)
    assert first.interrupted and first.step == 10
    run(edgegen(*cli_args(one_then_two), "--resume", "--nproc", "2"))

    for out in (two_then_one.out, one_then_two.out):
        assert_same_run(one_process(family, 8), Path(out))


@pytest.mark.slow
@pytest.mark.parametrize("killed", [1, 0])
def test_a_killed_rank_leaves_a_resumable_checkpoint(tmp_path, text_file, killed):
    """Rank 1, or rank 0 (the writer, maybe in the middle of a save), is killed: the other
    stops in seconds with one line, and the checkpoint on disk loads and resumes."""
    out = tmp_path / "ck"
    opts = options("gpt", out, text_file, steps=100000, batch_size=2, save_interval=2)
    opts.eval_interval = 1000
    ranks = start_ranks(edgegen(*cli_args(opts)), 2, free_port())
    survivor = ranks[1 - killed]
    try:
        _wait_for_step(out, 4, ranks[0])
    finally:
        ranks[killed].send_signal(signal.SIGKILL)
    start = time.monotonic()
    _, stderr = survivor.communicate(timeout=60)
    assert time.monotonic() - start < 30  # no hang: the lost rank is noticed
    assert survivor.returncode == 1, stderr
    assert stderr.count("\n") == 1 and stderr.startswith("error: training stopped at step ")
    assert "another process of the run is gone" in stderr and "keeps this run's" in stderr
    ranks[killed].wait()

    load_checkpoint(out)  # puts back a checkpoint parked by a save cut short
    step = json.loads((out / STATE_FILE).read_text())["step"]
    told = int(stderr.split("(step ")[1].split(")")[0])
    assert told == step if killed else step - 2 <= told <= step  # rank 1 hears of a save late
    resumed = options("gpt", out, text_file, steps=step + 2, batch_size=2, save_interval=2)
    resumed.eval_interval = 1000
    assert train(resumed, resume=True, progress=False).step == step + 2


@pytest.mark.slow
def test_ctrl_c_stops_every_rank_after_the_same_step(tmp_path, text_file):
    """Ctrl-C at a terminal reaches `edgegen train --nproc 2` and both ranks: they agree on
    a step, rank 0 saves it, and all exit 0."""
    out = tmp_path / "ck"
    opts = options("gru", out, text_file, steps=100000, batch_size=2, save_interval=5)
    opts.eval_interval = 1000
    launcher = subprocess.Popen(
        edgegen(*cli_args(opts), "--nproc", "2"),
        env={**os.environ, **GROUP_TIMEOUT},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a terminal's job is
    )
    _wait_for_step(out, 5, launcher)
    os.killpg(launcher.pid, signal.SIGINT)
    stdout, stderr = launcher.communicate(timeout=60)
    assert launcher.returncode == 0, stderr
    assert "Traceback" not in stderr and "stopped early, resumable with --resume" in stdout
    step = json.loads((out / STATE_FILE).read_text())["step"]
    assert f"step {step}," in stdout and step > 0
    load_checkpoint(out)


RANK_WITH_TEARDOWN_MARK = """
import atexit, sys
from edgegen.cli import main
atexit.register(lambda: print("teardown ran", flush=True))
main(sys.argv[1:])
"""


def test_a_rank_ends_without_the_interpreters_teardown(tmp_path, text_file):
    """A rank whose run is over exits at once with its status, its output flushed: the
    interpreter's teardown (where torch's threads aborted finished ranks) never runs.
    A failing rank still says its one line first."""
    opts = options("gru", tmp_path / "ck", text_file, steps=2, batch_size=2)
    command = [sys.executable, "-c", RANK_WITH_TEARDOWN_MARK, *cli_args(opts)]
    ranks = start_ranks(command, 2, free_port())
    outputs = [rank.communicate(timeout=120) for rank in ranks]
    assert [rank.returncode for rank in ranks] == [0, 0], outputs
    assert outputs[0][0].startswith(f"{opts.out}: step 2,") and outputs[1][0] == ""
    assert all("teardown ran" not in out for out, _ in outputs)
    load_checkpoint(opts.out)

    missing = options("gru", tmp_path / "other", tmp_path / "missing.txt", steps=2, batch_size=2)
    command = [sys.executable, "-c", RANK_WITH_TEARDOWN_MARK, *cli_args(missing)]
    ranks = start_ranks(command, 2, free_port())
    outputs = [rank.communicate(timeout=120) for rank in ranks]
    assert [rank.returncode for rank in ranks] == [1, 1], outputs
    assert outputs[0][1].startswith("error: ") and outputs[0][1].count("\n") == 1, outputs
    assert outputs[1][1] == "" and all("teardown ran" not in out for out, _ in outputs)


@pytest.mark.parametrize(
    "args,piece",
    [
        (["--nproc", "0"], "nproc must be positive, got 0"),
        (["--grad-accum", "0"], "grad_accum must be positive, got 0"),
        (["--nproc", "2", "--batch-size", "1"], "batch size 1 cannot be shared by 2 processes"),
    ],
)
def test_bad_distributed_options_are_one_line(tmp_path, text_file, args, piece):
    result = CliRunner().invoke(
        main, ["train", "--data", str(text_file), "--out", str(tmp_path / "o"), *args]
    )
    assert result.exit_code == 1, result.output
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert piece in result.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.gpu
def test_nccl_on_the_gpus(tmp_path, text_file, one_process):
    """One process per GPU (up to two) over nccl, against one process on one GPU: bf16
    autocast and CUDA kernels make the losses close, not equal."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    nproc = min(2, torch.cuda.device_count())
    alone = options("gpt", tmp_path / "alone", text_file, device="cuda")
    train(alone, progress=False)
    run(torchrun(nproc, *cli_args(options("gpt", tmp_path / "spread", text_file, device="cuda"))))
    log_a, log_b = (
        json.loads((tmp_path / d / "train_log.json").read_text())["train"]
        for d in ("alone", "spread")
    )
    assert len(log_b) == STEPS
    for x, y in zip(log_a, log_b, strict=True):
        assert abs(x["loss"] - y["loss"]) < 0.05 * abs(x["loss"]), (x, y)
    model, _ = load_checkpoint(tmp_path / "spread")
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_more_processes_than_gpus_stop_before_joining(monkeypatch):
    """Every rank of the machine sees the same count, so all stop before any enters a
    collective (DDP's constructor) that the others would never join."""
    from edgegen.distributed import World
    from edgegen.errors import ConfigError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    world = World(rank=1, size=2, local_rank=1, launched=True)
    expected = "2 processes on this machine but torch sees 1 GPU"
    with pytest.raises(ConfigError, match=expected), world.running("cuda"):
        pass

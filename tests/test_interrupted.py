"""Work is never half-written or lost: atomic directories, SIGKILL and Ctrl-C in training."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

import edgegen.files
from edgegen.checkpoint import load_checkpoint
from edgegen.files import write_atomically
from edgegen.train import STATE_FILE, TrainOptions, train

TINY = ["--set", "dim=32", "--set", "n_layers=1", "--set", "max_seq_len=64"]


def fill_with(text):
    def fill(tmp):
        (tmp / "a.txt").write_text(text)
        (tmp / "b.txt").write_text(text)

    return fill


def test_a_failed_fill_leaves_the_old_directory(tmp_path):
    target = tmp_path / "ckpt"
    write_atomically(target, fill_with("one"))

    def broken(tmp):
        (tmp / "a.txt").write_text("two")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_atomically(target, broken)
    assert (target / "a.txt").read_text() == "one"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_a_kill_between_the_renames_is_recovered(tmp_path, monkeypatch, text_file):
    target = tmp_path / "ckpt"
    train(_options(text_file, target, steps=2), progress=False)
    real_replace = os.replace
    calls = []

    def dies_on_the_second_rename(src, dst):
        calls.append(src)
        if len(calls) == 2:
            raise KeyboardInterrupt  # stands for SIGKILL between the renames
        real_replace(src, dst)

    monkeypatch.setattr(edgegen.files.os, "replace", dies_on_the_second_rename)
    with pytest.raises(KeyboardInterrupt):
        write_atomically(target, fill_with("new"))
    monkeypatch.setattr(edgegen.files.os, "replace", real_replace)
    assert not target.exists()  # the old checkpoint is parked, the new one unfinished

    model, _ = load_checkpoint(target)  # a reader puts the parked one back
    assert model is not None
    assert json.loads((target / STATE_FILE).read_text())["step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "text.txt"]
    assert train(_options(text_file, target, steps=3), resume=True, progress=False).step == 3


def test_sigkill_at_any_moment_leaves_a_resumable_checkpoint(tmp_path, text_file):
    out = tmp_path / "ckpt"
    command = [*_train_command(text_file, out, save_interval=1), "--quiet"]
    last = 0
    for round, delay in enumerate([0.0, 0.013, 0.031, 0.057]):
        process = subprocess.Popen(
            command + (["--resume"] if round else []),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            _wait_for_step(out, last + 2, process)
            time.sleep(delay)  # land somewhere inside a later save
        finally:
            process.send_signal(signal.SIGKILL)
            process.wait()
        load_checkpoint(out)  # loadable (recovering a parked directory if need be)
        step = json.loads((out / STATE_FILE).read_text())["step"]
        assert step >= last + 2
        last = step

    seen = []
    options = _options(text_file, out, steps=last + 2)
    result = train(options, resume=True, progress=False, on_step=lambda s, _: seen.append(s))
    assert seen == [last + 1, last + 2] and result.step == last + 2


def test_ctrl_c_saves_and_exits_cleanly(tmp_path, text_file):
    out = tmp_path / "ckpt"
    command = _train_command(text_file, out, save_interval=5)
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_step(out, 5, process)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr
    assert "Traceback" not in stderr
    assert "resumable with --resume" in stdout
    step = json.loads((out / STATE_FILE).read_text())["step"]
    assert step >= 5 and f"step {step}," in stdout


def _train_command(text_file, out, save_interval: int) -> list[str]:
    """`edgegen train` in a process of its own, tiny and endless until it is stopped."""
    command = [sys.executable, "-m", "edgegen", "train", "--data", str(text_file)]
    command += ["--out", str(out), "--steps", "100000", "--save-interval", str(save_interval)]
    return [*command, "--eval-interval", "1000", "--batch-size", "2", "--seq-len", "16", *TINY]


def _options(text_file, out, steps):
    return TrainOptions(
        data=str(text_file),
        out=str(out),
        steps=steps,
        batch_size=2,
        seq_len=16,
        eval_interval=1000,
        save_interval=1,
        overrides=dict(dim=32, n_layers=1, max_seq_len=64),
    )


def _wait_for_step(out, step, process, timeout=120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"training exited early: {process.stderr.read()}")
        try:
            if json.loads((out / STATE_FILE).read_text())["step"] >= step:
                return
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.02)
    raise AssertionError(f"training did not reach step {step} in {timeout} s")

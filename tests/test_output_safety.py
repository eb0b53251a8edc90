"""Nothing a user has is lost or silently corrupted: --out/--force rules, one writer at a
time, checkpoint hashes, and an honest end to a diverged run."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

import edgegen.train
from edgegen.checkpoint import load_checkpoint
from edgegen.cli import main
from edgegen.errors import CheckpointError, ConfigError, OutputError, TrainingError
from edgegen.export import export_bundle
from edgegen.files import seal
from edgegen.train import STATE_FILE, STATE_TENSORS_FILE, TrainOptions, train

TINY = dict(dim=32, n_layers=1, max_seq_len=32)


def options(text_file, out, steps=3, **kw):
    base = dict(data=str(text_file), out=str(out), steps=steps, batch_size=2, seq_len=16)
    return TrainOptions(**{**base, "eval_interval": 1000, "overrides": TINY, **kw})


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("ck")
    (root / "text.txt").write_text("Return the value of the thing.\n\n" * 40)
    train(options(root / "text.txt", root / "ck"), progress=False)
    return root / "ck"


def snapshot(root):
    """Every file under `root` with its bytes, to show nothing changed."""
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def cli(*args, cwd=None):
    old = os.getcwd()
    try:
        if cwd:
            os.chdir(cwd)
        return CliRunner().invoke(main, [str(a) for a in args])
    finally:
        os.chdir(old)


def one_line_error(result, piece):
    assert result.exit_code == 1, result.output
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert piece in result.stderr, result.stderr


# --- 1. train never replaces what is not its own --------------------------------------


@pytest.mark.parametrize("what", ["folder", "file", "bundle", "checkpoint without config"])
def test_train_refuses_an_existing_out(tmp_path, text_file, checkpoint, what):
    out = tmp_path / "d"
    if what == "folder":
        out.mkdir()
        (out / "notes.txt").write_text("important")
    elif what == "file":
        out.write_text("important")
    elif what == "bundle":
        export_bundle(checkpoint, out, formats=["onnx"])
    else:
        train(options(text_file, out, steps=4), progress=False)
        (out / "config.json").unlink()
    before = snapshot(tmp_path)
    for force in ([], ["--force"]) if what != "checkpoint without config" else ([],):
        result = cli("train", "--data", text_file, "--out", out, "--steps", 2, *force)
        one_line_error(result, str(out))
        assert snapshot(tmp_path) == before


def test_force_never_replaces_a_folder_that_only_looks_like_a_model(tmp_path, text_file):
    """A Hugging Face model folder has a config.json too; only an edgegen checkpoint's
    hashes (or its own config beside its weights) make a folder one."""
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text('{"model_type": "llama"}')
    (hf / "model.safetensors").write_bytes(b"weights")
    before = snapshot(tmp_path)
    result = cli("train", "--data", text_file, "--out", hf, "--force", "--steps", 1)
    one_line_error(result, "refusing to replace")
    assert snapshot(tmp_path) == before


def test_symbolic_links_are_not_written_through(tmp_path, text_file):
    train(options(text_file, tmp_path / "ck"), progress=False)
    (tmp_path / "link").symlink_to(tmp_path / "ck")
    before = snapshot(tmp_path / "ck")
    result = cli("train", "--data", text_file, "--out", tmp_path / "link", "--resume")
    one_line_error(result, "is a symbolic link")
    assert snapshot(tmp_path / "ck") == before and (tmp_path / "link").is_symlink()


def test_train_force_replaces_a_checkpoint(tmp_path, text_file):
    out = tmp_path / "ck"
    train(options(text_file, out, steps=4), progress=False)
    assert train(options(text_file, out, steps=2), force=True, progress=False).step == 2
    assert json.loads((out / STATE_FILE).read_text())["step"] == 2


# --- 2. --force replaces only an artifact of the same kind, never an input --------------


def test_export_force_never_deletes_inputs_or_their_neighbours(tmp_path, checkpoint):
    runs = tmp_path / "runs"
    (runs / "other").mkdir(parents=True)
    (runs / "other" / "data.txt").write_text("keep me")
    ck = runs / "ck"
    ck.mkdir()
    for path in checkpoint.iterdir():
        (ck / path.name).write_bytes(path.read_bytes())
    before = snapshot(tmp_path)
    one_line_error(cli("export", ck, "--out", runs, "--force"), "contains the input")
    one_line_error(cli("export", ck, "--out", ck, "--force"), "is the input")
    one_line_error(cli("export", ck, "--out", ck / "inner", "--force"), "lies inside the input")
    one_line_error(cli("export", ck, "--out", runs / "other", "--force"), "a folder with 1")
    assert snapshot(tmp_path) == before


def test_export_refuses_the_working_directory(tmp_path, checkpoint):
    inner = tmp_path / "inner"
    inner.mkdir()
    (inner / "notes.txt").write_text("mine")
    result = cli("export", checkpoint, "--out", "../inner", "--force", cwd=inner)
    one_line_error(result, "working directory")
    result = cli("export", checkpoint, "--out", "..", "--force", cwd=inner)
    one_line_error(result, "working directory")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inner"]
    assert (inner / "notes.txt").read_text() == "mine"


def test_export_force_replaces_a_bundle(tmp_path, checkpoint):
    out = tmp_path / "b"
    export_bundle(checkpoint, out, formats=["onnx"])
    manifest = export_bundle(checkpoint, out, formats=["torchscript"], force=True)
    assert [a.format for a in manifest.artifacts] == ["torchscript"]


# --- 3. one writer at a time ------------------------------------------------------------

HOLD = """
import sys, time
from edgegen.output import writer_lock
with writer_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(60)
"""


def test_a_second_writer_is_refused_and_a_dead_ones_lock_taken_over(tmp_path, checkpoint):
    out = tmp_path / "b"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        leftover = tmp_path / ".b.tmp-live"
        leftover.mkdir()  # the live writer's folder: a second writer must not touch it
        result = cli("export", checkpoint, "--out", out)
        one_line_error(result, f"another edgegen process is writing {out} (pid {holder.pid})")
        assert leftover.is_dir()
        with pytest.raises(OutputError, match="another edgegen process"):
            train(options(checkpoint.parent / "text.txt", out), progress=False)
    finally:
        holder.kill()
        holder.wait()
    assert (tmp_path / ".b.lock").exists()  # a dead writer's lock stays behind ...
    export_bundle(checkpoint, out, formats=["onnx"])  # ... and is taken over
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]  # leftovers cleaned up


def test_readers_clean_up_dead_writers_leftovers(tmp_path, checkpoint):
    import edgegen.runtime

    out = tmp_path / "b"
    export_bundle(checkpoint, out, formats=["onnx"])
    (tmp_path / ".b.tmp-dead").mkdir()
    edgegen.runtime.load(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE)
    try:  # while another process writes, a reader leaves its folders alone
        assert holder.stdout.readline().strip() == b"held"
        (tmp_path / ".b.tmp-live").mkdir()
        edgegen.runtime.load(out)
        assert (tmp_path / ".b.tmp-live").is_dir()
    finally:
        holder.kill()
        holder.wait()


# --- 4. checkpoints carry their hashes --------------------------------------------------


def flip(path, offset, count):
    data = bytearray(path.read_bytes())
    for i in range(offset, offset + count):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_damaged_weights_are_refused_everywhere(tmp_path, checkpoint, text_file):
    ck = tmp_path / "ck"
    ck.mkdir()
    for path in checkpoint.iterdir():
        (ck / path.name).write_bytes(path.read_bytes())
    weights = ck / "model.safetensors"
    flip(weights, weights.stat().st_size // 2, 16)
    with pytest.raises(CheckpointError, match=r"model\.safetensors does not match"):
        load_checkpoint(ck)
    one_line_error(cli("sample", ck, "--prompt", "a"), "does not match its recorded sha256")
    one_line_error(cli("export", ck, "--out", tmp_path / "b"), "does not match")
    assert not (tmp_path / "b").exists()


def test_damaged_training_state_is_never_resumed(tmp_path, text_file):
    out = tmp_path / "ck"
    train(options(text_file, out, steps=3), progress=False)
    state = out / STATE_TENSORS_FILE
    flip(state, state.stat().st_size - 200, 64)
    before = snapshot(out)
    with pytest.raises(CheckpointError, match=r"train_state\.safetensors does not match"):
        train(options(text_file, out, steps=6), resume=True, progress=False)
    assert snapshot(out) == before


@pytest.mark.parametrize("step", [-3, "10", None])
def test_a_bad_step_in_the_training_state_is_one_line(tmp_path, text_file, step):
    out = tmp_path / "ck"
    train(options(text_file, out, steps=3), progress=False)
    meta = json.loads((out / STATE_FILE).read_text())
    meta["step"] = step
    (out / STATE_FILE).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"train_state\.json does not match"):
        train(options(text_file, out, steps=6), resume=True, progress=False)
    seal(out)  # the same edit, hashed again: the value itself is checked too
    with pytest.raises(CheckpointError, match="step must be an integer >= 0"):
        train(options(text_file, out, steps=6), resume=True, progress=False)


# --- 5. a diverged run ends honestly ----------------------------------------------------


@pytest.mark.parametrize("lr", ["inf", "1e30", "1e300", "nan", "-1"])
def test_overflowing_learning_rates_are_refused_up_front(tmp_path, text_file, lr):
    result = cli("train", "--data", text_file, "--out", tmp_path / "o", "--lr", lr)
    one_line_error(result, "lr must be in (0, 10]")
    assert not (tmp_path / "o").exists()


def test_non_finite_loss_stops_the_run_and_keeps_the_last_finite_checkpoint(
    tmp_path, text_file, monkeypatch
):
    out = tmp_path / "ck"
    train(options(text_file, out, steps=3, save_interval=1), progress=False)
    before = snapshot(out)
    real = edgegen.train.WindowTask.loss

    def nan_from_step_4(self, trained, batch, rows):
        loss = real(self, trained, batch, rows)
        return loss * math.nan if batch.step >= 4 else loss

    monkeypatch.setattr(edgegen.train.WindowTask, "loss", nan_from_step_4)
    with pytest.raises(TrainingError, match=r"diverged at step 5: loss nan.*learning rate"):
        train(options(text_file, out, steps=8, save_interval=1), resume=True, progress=False)
    model, _ = load_checkpoint(out)
    assert json.loads((out / STATE_FILE).read_text())["step"] == 4
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert snapshot(out) != before  # step 4 was saved: it was finite


def test_a_diverging_run_exits_non_zero_through_the_cli(tmp_path, text_file, monkeypatch):
    monkeypatch.setattr(edgegen.train, "MAX_LR", 1e30)
    result = cli(
        "train", "--data", text_file, "--out", tmp_path / "o", "--lr", "1e30", "--quiet",
        "--steps", 20, "--batch-size", 2, "--seq-len", 16,
        "--set", "dim=32", "--set", "n_layers=1", "--set", "max_seq_len=32",
    )  # fmt: skip
    one_line_error(result, "nothing was written")
    assert not (tmp_path / "o").exists()  # no finite checkpoint was ever reached


# --- 9 and 10: values refused up front, resume options -----------------------------------


@pytest.mark.parametrize(
    "args,piece",
    [
        (["--opset", "28"], "opset must be between 18 and 23, got 28"),
        (["--opset", "24"], "opset must be between 18 and 23, got 24"),
    ],
)
def test_export_values_are_refused_up_front(tmp_path, checkpoint, args, piece):
    one_line_error(cli("export", checkpoint, "--out", tmp_path / "b", *args), piece)
    assert not (tmp_path / "b").exists()


def test_norm_eps_must_be_positive(tmp_path, text_file):
    result = cli("train", "--data", text_file, "--out", tmp_path / "o", "--set", "norm_eps=-1")
    one_line_error(result, "norm_eps must be positive")


def test_resume_refuses_options_it_would_ignore(tmp_path, text_file):
    out = tmp_path / "ck"
    train(options(text_file, out, steps=3), progress=False)
    for changed in (dict(lr=0.5), dict(batch_size=4), dict(family="rnn"), dict(preset="small")):
        with pytest.raises(ConfigError, match="--resume continues the saved run"):
            train(options(text_file, out, steps=6, **changed), resume=True, progress=False)
    assert train(options(text_file, out, steps=5), resume=True, progress=False).step == 5

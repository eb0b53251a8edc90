import subprocess
import sys

import pytest
from click.testing import CliRunner

from edgegen.cli import main
from edgegen.files import seal

GPT_TINY = ["--set", "dim=32", "--seq-len", "32", "--batch-size", "4", "--eval-interval", "5"]


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_train_then_sample(tmp_path, text_file):
    out = tmp_path / "ckpt"
    result = run("train", "--data", text_file, "--steps", 6, "--out", out, "--quiet", *GPT_TINY)
    assert result.exit_code == 0, result.output
    assert "step 6" in result.stdout and "bits/byte" in result.stdout
    result = run("sample", out, "--prompt", "The ", "--max-new-tokens", 10, "--temperature", 0)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("The ")


def test_train_rnn_and_resume(tmp_path, text_file):
    out = tmp_path / "rnn"
    args = [
        "train",
        "--family",
        "rnn",
        "--cell",
        "lstm",
        "--data",
        text_file,
        "--out",
        out,
        "--bptt",
        8,
        "--batch-size",
        4,
        "--set",
        "hidden_size=32",
        "--quiet",
    ]
    assert run(*args, "--steps", 3).exit_code == 0
    result = run(*args, "--steps", 5, "--resume")
    assert result.exit_code == 0, result.output
    assert "step 5" in result.stdout


@pytest.mark.parametrize(
    "args,message",
    [
        (["train", "--data", "/no/such/file"], "data path does not exist"),
        (["train", "--preset", "huge"], "unknown preset 'huge'"),
        (["train", "--set", "dim=0"], "dim must be positive"),
        (["train", "--set", "dim=wide"], "dim must be int"),
        (["train", "--set", "colour=3"], "unknown gpt config field"),
        (["train", "--set", "dim"], "name=value"),
        (["train", "--steps", "0"], "steps must be positive"),
        (["train", "--resume"], "nothing to resume"),
        (["sample", "/no/such/ckpt"], "checkpoint directory not found"),
    ],
)
def test_bad_input_is_one_line(tmp_path, text_file, args, message):
    if "--data" not in args:
        args = [*args, "--data", str(text_file)] if args[0] == "train" else args
    result = run(*args, "--out", tmp_path / "o") if args[0] == "train" else run(*args)
    assert result.exit_code == 1
    assert result.stderr.strip() == result.stderr.strip().splitlines()[0]
    assert result.stderr.startswith("error: ") and message in result.stderr, result.stderr
    assert "Traceback" not in result.output


def test_empty_corpus(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    result = run("train", "--data", empty, "--out", tmp_path / "o")
    assert result.exit_code == 1 and "no text found" in result.stderr


def test_sample_rejects_bad_sampling_values(tmp_path, text_file):
    out = tmp_path / "ckpt"
    run("train", "--data", text_file, "--steps", 1, "--out", out, "--quiet", *GPT_TINY)
    result = run("sample", out, "--top-p", "1.5")
    assert result.exit_code == 1 and "top_p must be in (0, 1]" in result.stderr
    result = run("sample", out, "--max-new-tokens", "500")
    assert result.exit_code == 1 and "exceeds the model's context" in result.stderr


def test_sample_default_length_fits_the_context(tmp_path, text_file):
    out = tmp_path / "ckpt"
    run("train", "--data", text_file, "--steps", 1, "--out", out, "--quiet", *GPT_TINY)
    result = run("sample", out, "--prompt", "x" * 120, "--temperature", 0)
    assert result.exit_code == 0, result.output
    result = run("sample", out, "--prompt", "x" * 200)
    assert result.exit_code == 1 and "does not fit the model's context" in result.stderr


def test_damaged_checkpoint(tmp_path, text_file):
    out = tmp_path / "ckpt"
    run("train", "--data", text_file, "--steps", 1, "--out", out, "--quiet", *GPT_TINY)
    weights = out / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    result = run("sample", out)
    assert result.exit_code == 1 and "does not match its recorded sha256" in result.stderr
    seal(out)  # the same damage, hashed again: loading the weights still fails in one line
    result = run("sample", out)
    assert result.exit_code == 1 and "cannot load weights" in result.stderr
    (out / "config.json").unlink()
    result = run("sample", out)
    assert result.exit_code == 1 and "missing config.json" in result.stderr


def test_real_subprocess(tmp_path, text_file):
    out = tmp_path / "ckpt"
    cmd = [
        sys.executable,
        "-m",
        "edgegen",
        "train",
        "--data",
        str(text_file),
        "--steps",
        "2",
        "--out",
        str(out),
        *GPT_TINY,
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "2/2" in done.stderr  # progress lines on a non-terminal stderr
    bad = subprocess.run(
        [*cmd[:3], "sample", str(tmp_path / "nope")], capture_output=True, text=True
    )
    assert bad.returncode == 1 and bad.stderr.startswith("error: checkpoint directory not found")

"""Every command, given bad input, prints one line on stderr and exits non-zero."""

import json
import shutil
import warnings

import pytest
from click.testing import CliRunner

from edgegen.cli import main
from edgegen.files import sha256_file

# (command line, expected piece of the message). {gpt} / {gru} are trained bundles, {ckpt} the
# GRU checkpoint; {dir}, {empty}, {binary}, {latin1}, {long} are files written per test;
# {wide} and {broken_ts} are damaged bundles (see `damaged`).
CASES = [
    # wrong types and unknown names
    ("train --steps many", "'many' is not a valid integer"),
    ("train --family cnn", "'cnn' is not one of"),
    ("train --set dim=wide", "dim must be int"),
    ("generate {gru} --prompt a --temperature hot", "'hot' is not a valid float"),
    ("generate {gru} --prompt a --backend tflite", "'tflite' is not one of"),
    ("generate {gru} --prompt a --threads 0", "threads must be a positive integer"),
    ("bench {gru} --repeat x", "'x' is not a valid integer"),
    ("bench {gru} --backends onnx,tflite --quiet", "tflite"),
    ("export {ckpt} --out {dir}/o --opset x", "'x' is not a valid integer"),
    ("export {ckpt} --out {dir}/o --quantize int3", "int3"),
    ("verify {gru} --checkpoint {ckpt} --levels 9", "level"),
    ("nosuchcommand", "No such command"),
    ("export {ckpt}", "Missing option '--out'"),
    # missing or unreadable paths
    ("generate /no/such/bundle --prompt a", "bundle directory not found"),
    ("sample /no/such/ckpt --prompt a", "checkpoint directory not found"),
    ("export /no/such/ckpt --out {dir}/o", "checkpoint directory not found"),
    ("quantize /no/such/bundle --checkpoint {ckpt} --precision int8", "not found"),
    ("verify /no/such/bundle --checkpoint {ckpt}", "bundle directory not found"),
    ("verify {gru} --checkpoint /no/such/ckpt", "checkpoint directory not found"),
    ("bench /no/such/bundle", "bundle directory not found"),
    ("train --data /no/such/text", "data path does not exist"),
    ("generate {gru} --prompt-file {dir}", "cannot read prompt file"),
    ("generate {gru} --prompt-file /no/such/prompt", "cannot read prompt file"),
    ("generate {dir} --prompt a", "not a bundle"),
    ("export {gru} --out {dir}/o", "missing"),
    # empty or non-text data
    ("train --data {empty}", "no text"),
    ("train --data {binary}", "text"),
    ("generate {gru} --prompt-file {empty}", "the prompt is empty"),
    ("generate {gru} --prompt-file {latin1}", "not UTF-8"),
    # prompts and sampling values
    ("generate {gru} --prompt ''", "the prompt is empty"),
    ("generate {gpt} --prompt-file {long}", "prompt (201 tokens) does not fit the model's context"),
    ("generate {gpt} --prompt a --max-new-tokens 500", "exceeds the model's context"),
    ("generate {gru} --prompt a --top-p 2", "top_p must be in (0, 1]"),
    ("generate {gru} --prompt a --top-k 0", "top_k must be an integer >= 1"),
    ("generate {gru} --prompt a --temperature -1", "temperature must be >= 0"),
    ("generate {gru} --prompt a --min-p 1.5", "min_p must be in [0, 1]"),
    (
        "generate {gru} --prompt a --repetition-penalty 0",
        "repetition_penalty must be in [0.01, 100]",
    ),
    ("generate {gru} --prompt a --max-new-tokens -1", "max_new_tokens must be an integer >= 0"),
    ("generate {gru} --prompt a --temperature nan", "temperature must be >= 0"),
    ("sample {ckpt} --prompt a --top-p -0.5", "top_p must be in (0, 1]"),
    # writes that would destroy what they did not create, and values refused up front
    ("train --out {dir} --steps 1", "already exists (an empty folder)"),
    ("train --out {empty} --steps 1 --force", "refusing to replace"),
    ("train --out {gru} --force --steps 1", "refusing to replace"),
    ("export {ckpt} --out {ckpt} --force", "is the input"),
    ("import {ckpt} --out {ckpt}/x", "lies inside the input"),
    ("import {dir} --out {dir}/../x", "no config.json"),
    ("train --lr inf", "lr must be in (0, 10]"),
    ("train --lr 1e30", "lr must be in (0, 10]"),
    ("train --lr 1e300", "lr must be in (0, 10]"),
    ("train --set norm_eps=-1", "norm_eps must be positive"),
    ("export {ckpt} --out {dir}/o --opset 28", "opset must be between 18 and 23, got 28"),
    ("export {ckpt} --out {dir}/o --opset 24", "opset must be between 18 and 23, got 24"),
    # sampling values whose use would overflow (issue 19)
    ("generate {gru} --prompt a --seed -1", "seed must be an integer >= 0"),
    ("sample {ckpt} --prompt a --seed -1", "seed must be an integer >= 0"),
    (
        "generate {gru} --prompt a --temperature 5e-324",
        "temperature must be 0 (greedy) or at least",
    ),
    ("generate {gru} --prompt a --repetition-penalty 1e-308", "repetition_penalty must be in"),
    ("generate {gru} --prompt a --repetition-penalty 1e308", "repetition_penalty must be in"),
    (
        "generate {gru} --prompt a --frequency-penalty -1e308",
        "frequency_penalty must be in [-2, 2]",
    ),
    ("generate {gru} --prompt a --presence-penalty 1e308", "presence_penalty must be in [-2, 2]"),
    ("generate {gru} --prompt a --min-new-tokens 10 --max-new-tokens 3", "min_new_tokens (10)"),
    ("generate {gru} --prompt a --stop \ud800", "stop strings must be valid text"),
    # text and bundles that would fail mid-run
    ("generate {gru} --prompt \ud800", "lone surrogate at character 0"),  # as the API gets it
    ("generate {wide} --prompt a", "max_seq_len 100000 must be between 1 and the model's context"),
    ("generate {broken_ts} --prompt a --backend torchscript", "TorchScript cannot load model.ts"),
    # command-line bytes that are not UTF-8 (surrogate escapes), flags that do not combine
    ("generate {gru} --prompt \udced\udca0\udc80", "--prompt is not UTF-8"),
    ("generate {gru} --prompt a --stop \udcff", "--stop is not UTF-8"),
    ("sample {ckpt} --prompt \udcff", "--prompt is not UTF-8"),
    ("generate {gru} --prompt a --stream --json", "--stream and --json cannot be combined"),
    ("generate {gru} --prompt a --prompt b --stream", "--stream takes a single prompt"),
    ("sample {ckpt} --prompt a --stream --json", "--stream and --json cannot be combined"),
]
USAGE = ("--stream", "is not a valid", "is not one of", "No such command", "Missing option")


def rewrite_manifest(bundle, change):
    path = bundle / "manifest.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def rehash(bundle, name):
    """Record an artifact's current hash, as a careless (or hostile) editor would."""

    def change(data):
        for artifact in data["artifacts"]:
            if artifact["path"] == name:
                artifact["sha256"] = sha256_file(bundle / name)

    rewrite_manifest(bundle, change)


@pytest.fixture(scope="module")
def damaged(trained_bundles, tmp_path_factory):
    root = tmp_path_factory.mktemp("damaged")
    wide = root / "wide"  # a context beyond the graph's positions
    shutil.copytree(trained_bundles["gpt"][1], wide)
    rewrite_manifest(wide, lambda d: d["generation"].update(max_seq_len=100000))
    broken_ts = root / "broken_ts"  # a truncated model.ts whose hash was fixed up
    shutil.copytree(trained_bundles["gru"][1], broken_ts)
    model = broken_ts / "model.ts"
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    rehash(broken_ts, "model.ts")
    return {"wide": wide, "broken_ts": broken_ts}


@pytest.fixture
def places(trained_bundles, damaged, tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "binary.bin").write_bytes(bytes(range(256)) * 4)
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    (tmp_path / "long.txt").write_text("x" * 200)
    (tmp_path / "d").mkdir()
    return {
        "gpt": trained_bundles["gpt"][1],
        "gru": trained_bundles["gru"][1],
        "ckpt": trained_bundles["gru"][0],
        "dir": tmp_path / "d",
        "empty": tmp_path / "empty.txt",
        "binary": tmp_path / "binary.bin",
        "latin1": tmp_path / "latin1.txt",
        "long": tmp_path / "long.txt",
        **damaged,
    }


def invoke(args):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_one_line_error(result, message):
    assert result.exit_code not in (0, None), result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert message in lines[0], lines[0]


@pytest.mark.parametrize("line,message", CASES)
def test_bad_input_is_one_line(places, line, message):
    import shlex

    args = [a.format(**places) for a in shlex.split(line)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = invoke(args)
    assert_one_line_error(result, message)
    assert result.exit_code == (2 if any(u in message for u in USAGE) else 1)
    assert not [str(w.message) for w in caught]  # a warning would print a second line


@pytest.mark.parametrize(
    "damage,message",
    [
        ("missing", "is missing model.onnx"),
        ("truncated", "does not match its manifest hash"),
        ("tampered", "does not match its manifest hash"),
        ("manifest", "cannot read"),
    ],
)
@pytest.mark.parametrize("command", ["generate", "verify", "bench", "quantize"])
def test_damaged_bundles_are_refused_by_every_command(
    trained_bundles, tmp_path, damage, message, command
):
    ckpt, bundle = trained_bundles["gru"]
    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    model = copy / "model.onnx"
    if damage == "missing":
        model.unlink()
    elif damage == "truncated":
        model.write_bytes(model.read_bytes()[:100])
    elif damage == "tampered":
        data = bytearray(model.read_bytes())
        data[len(data) // 2] ^= 1
        model.write_bytes(bytes(data))
    else:
        (copy / "manifest.json").write_text('{"format": ')
    args = {
        "generate": ["generate", copy, "--prompt", "a"],
        "verify": ["verify", copy, "--checkpoint", ckpt],
        "bench": ["bench", copy, "--backends", "onnx", "--quiet"],
        "quantize": ["quantize", copy, "--checkpoint", ckpt, "--precision", "int8"],
    }[command]
    before = {p.name: p.read_bytes() for p in copy.iterdir()}
    result = invoke(args)
    if command == "verify" and damage != "manifest":  # verify reports damage in its table
        assert_one_line_error(result, "checks failed")
        assert message in result.stdout
    else:
        assert_one_line_error(result, message)
    assert {p.name: p.read_bytes() for p in copy.iterdir()} == before  # nothing rewritten


def test_a_failed_export_leaves_the_existing_bundle(trained_bundles, tmp_path):
    ckpt, bundle = trained_bundles["gru"]
    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    before = {p.name: p.read_bytes() for p in copy.iterdir()}
    assert_one_line_error(invoke(["export", ckpt, "--out", copy]), "already exists")
    broken = tmp_path / "ckpt"
    shutil.copytree(ckpt, broken)
    (broken / "model.safetensors").write_bytes(b"not weights")
    assert_one_line_error(
        invoke(["export", broken, "--out", copy, "--force"]), "does not match its recorded sha256"
    )
    assert {p.name: p.read_bytes() for p in copy.iterdir()} == before


def test_unexpected_errors_are_one_line_and_debug_shows_the_traceback(monkeypatch, places):
    import edgegen.runtime

    def broken(*args, **kwargs):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(edgegen.runtime, "load", broken)
    args = ["generate", places["gru"], "--prompt", "a"]
    assert_one_line_error(invoke(args), "unexpected ZeroDivisionError: division by zero")
    debug = invoke(["--debug", *args])
    assert debug.exit_code == 1 and "Traceback" in debug.stderr


def test_debug_shows_the_traceback_of_an_edgegen_error(places):
    result = invoke(["--debug", "generate", "/no/such/bundle", "--prompt", "a"])
    assert result.exit_code == 1
    assert "Traceback" in result.stderr and "bundle directory not found" in result.stderr


def test_a_damaged_artifact_blocks_only_itself(trained_bundles, tmp_path):
    """Loading checks the artifact it opens; verify's files level checks every one."""
    ckpt, bundle = trained_bundles["gru"]
    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    shutil.copy(copy / "model.onnx", copy / "model.int8.onnx")  # stands in for a quantized one

    def add_int8(data):
        fp32 = next(a for a in data["artifacts"] if a["path"] == "model.onnx")
        data["artifacts"].append({**fp32, "path": "model.int8.onnx", "precision": "int8"})

    rewrite_manifest(copy, add_int8)
    damaged = bytearray((copy / "model.int8.onnx").read_bytes())
    damaged[len(damaged) // 2] ^= 1
    (copy / "model.int8.onnx").write_bytes(bytes(damaged))
    healthy = invoke(["generate", copy, "--prompt", "a", "--max-new-tokens", "3"])
    assert healthy.exit_code == 0 and healthy.stdout.startswith("a"), healthy.output
    int8 = invoke(["generate", copy, "--prompt", "a", "--precision", "int8"])
    assert_one_line_error(int8, "model.int8.onnx does not match its manifest hash")
    verified = invoke(["verify", copy, "--checkpoint", ckpt, "--levels", "6"])
    assert_one_line_error(verified, "checks failed")
    failed = [line for line in verified.stdout.splitlines() if "sha256 differs" in line]
    assert len(failed) == 1 and "model.int8.onnx" in failed[0], verified.stdout

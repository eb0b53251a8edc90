import json
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

import edgegen.runtime
from edgegen.cli import main
from edgegen.eager import load_eager
from edgegen.errors import BackendError, BundleError, GenerationError, SamplingError
from edgegen.runtime.generator import Generator, TextStream
from edgegen.tokenizer import ByteTokenizer
from tests.conftest import TRAINED_FAMILIES

FAMILIES = TRAINED_FAMILIES
BACKENDS = ("eager", "torchscript", "onnx")
PROMPTS = ["Return the", "A", "The quick brown fox jumps"]


@pytest.fixture(scope="module")
def bundles(trained_bundles):
    return trained_bundles


def generators(bundles, name):
    ckpt, bundle = bundles[name]
    return {
        "eager": load_eager(ckpt),
        "torchscript": edgegen.runtime.load(bundle, backend="torchscript"),
        "onnx": edgegen.runtime.load(bundle, backend="onnx"),
    }


@pytest.mark.parametrize("name", FAMILIES)
def test_greedy_is_identical_across_backends_alone_and_batched(bundles, name):
    gens = generators(bundles, name)
    greedy = dict(temperature=0, max_new_tokens=64, ignore_eos=True)
    alone = {b: [g.generate(p, **greedy).token_ids for p in PROMPTS] for b, g in gens.items()}
    batched = {
        b: [r.token_ids for r in g.generate_batch(PROMPTS, **greedy)] for b, g in gens.items()
    }
    assert alone["eager"] == alone["torchscript"] == alone["onnx"]
    assert all(len(ids) == 64 for ids in alone["eager"])
    for backend in BACKENDS:
        assert batched[backend] == alone["eager"], backend


@pytest.mark.parametrize("name", FAMILIES)
def test_seeded_sampling_is_identical_across_backends(bundles, name):
    gens = generators(bundles, name)
    params = dict(
        temperature=1.0, top_k=50, top_p=0.95, seed=1234, max_new_tokens=48, ignore_eos=True
    )
    runs = {b: g.generate_batch(PROMPTS[:2], **params) for b, g in gens.items()}
    tokens = {b: [r.token_ids for r in rs] for b, rs in runs.items()}
    assert tokens["eager"] == tokens["torchscript"] == tokens["onnx"]
    other = gens["onnx"].generate_batch(PROMPTS[:2], **{**params, "seed": 99})
    assert [r.token_ids for r in other] != tokens["onnx"]


@pytest.mark.parametrize("name", ["gpt", "gru"])
def test_each_row_of_a_seeded_batch_equals_its_prompt_alone(bundles, name):
    """Every row draws from its own stream of the seed, so batching changes nothing."""
    gen = edgegen.runtime.load(bundles[name][1])
    prompts = ["The ", "The ", "Return the", "A"]
    for seed in (1, 2):
        params = dict(temperature=0.8, top_k=20, seed=seed, max_new_tokens=24, ignore_eos=True)
        alone = [gen.generate(p, **params).token_ids for p in prompts]
        batched = [r.token_ids for r in gen.generate_batch(prompts, **params)]
        assert batched == alone
        assert alone[0] == alone[1] and alone[0] != alone[2]


def test_cli_batch_rows_equal_single_prompts(bundles):
    bundle = str(bundles["gpt"][1])
    seeded = ["--seed", "1", "--temperature", "0.8", "--max-new-tokens", "20"]
    alone = CliRunner().invoke(main, ["generate", bundle, "--prompt", "The ", *seeded])
    twice = CliRunner().invoke(
        main, ["generate", bundle, "--prompt", "The ", "--prompt", "The ", *seeded, "--json"]
    )
    assert alone.exit_code == 0 and twice.exit_code == 0, twice.output
    assert ["The " + r["text"] + "\n" for r in json.loads(twice.stdout)] == [alone.stdout] * 2


@pytest.mark.parametrize("name", ["gpt", "gru"])
def test_stream_concatenates_to_the_generated_text(bundles, name):
    gen = generators(bundles, name)["onnx"]
    for seed in range(3):
        params = dict(temperature=1.5, seed=seed, max_new_tokens=80, stop=["the"])
        streamed = "".join(gen.stream("The ", **params))
        assert streamed == gen.generate("The ", **params).text


def test_runtime_needs_no_torch(bundles):
    bundle = bundles["gpt"][1]
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import edgegen.runtime\n"
        f"g = edgegen.runtime.load({str(bundle)!r})\n"
        "r = g.generate('Return the', temperature=0, max_new_tokens=20)\n"
        "assert len(r.token_ids) + (r.finish_reason == 'eos') >= 1, r\n"
        "assert not [m for m in sys.modules if m.split('.')[0] == 'torch' and sys.modules[m]]\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_result_fields(bundles):
    gen = edgegen.runtime.load(bundles["gpt"][1])
    result = gen.generate("Return the", temperature=0, max_new_tokens=10, ignore_eos=True)
    assert result.finish_reason == "length" and len(result.token_ids) == 10
    assert result.prompt_tokens == len("Return the") + 1  # BOS
    assert result.prefill_s > 0 and len(result.decode_s) == 9
    assert result.text == ByteTokenizer().decode(result.token_ids)


def test_request_errors(bundles):
    gen = edgegen.runtime.load(bundles["gpt"][1])
    with pytest.raises(GenerationError, match="exceeds the model's context of 128"):
        gen.generate("x" * 100, max_new_tokens=40)
    with pytest.raises(GenerationError, match="empty"):
        Generator(gen.runner, gen.signature, gen.tokenizer, {"add_bos": False}, "onnx").generate("")
    with pytest.raises(SamplingError, match="top_p"):
        gen.generate("a", top_p=2)
    with pytest.raises(SamplingError, match="unknown sampling parameter"):
        gen.generate("a", beam_width=4)
    with pytest.raises(GenerationError, match="non-empty list of prompts"):
        gen.generate_batch([])
    with pytest.raises(GenerationError, match="non-empty list of prompts"):
        gen.generate_batch("one string")


def test_a_prompt_may_fill_the_context_when_nothing_is_asked_for(bundles):
    gen = edgegen.runtime.load(bundles["gpt"][1])
    full = "x" * 127  # BOS + 127 bytes = the 128-token context
    result = gen.generate(full, max_new_tokens=0)
    assert (result.text, result.token_ids, result.finish_reason) == ("", [], "length")
    assert result.prompt_tokens == 128
    with pytest.raises(GenerationError, match="does not fit the model's context of 128"):
        gen.generate(full)  # the bundle's default length gives way, leaving nothing
    with pytest.raises(GenerationError, match="does not fit the model's context of 128"):
        gen.generate(full, max_new_tokens=1)
    with pytest.raises(GenerationError, match=r"prompt \(129 tokens\) does not fit"):
        gen.generate(full + "x", max_new_tokens=0)


def test_text_that_is_not_unicode_is_refused(bundles):
    gen = edgegen.runtime.load(bundles["gru"][1])
    with pytest.raises(GenerationError, match="lone surrogate at character 2"):
        gen.generate("ab\ud800")
    with pytest.raises(SamplingError, match="stop strings must be valid text"):
        gen.generate("ab", stop=["\udcff"])


@pytest.mark.parametrize("output", ["--stream", "--json"])
def test_piping_into_head_exits_quietly(bundles, output):
    """`edgegen generate ... | head -c 10`: the closed pipe ends the run without a word,
    with the status a shell gives a program that SIGPIPE ended. (One large write, as
    --json makes, may find no reader without Python raising: then the exit is 0.)"""
    args = [sys.executable, "-m", "edgegen", "generate", str(bundles["gru"][1]), "--prompt"]
    args += ["a", "--max-new-tokens", "4000", "--ignore-eos", output]
    child = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert len(child.stdout.read(10)) == 10
    child.stdout.close()  # what head does once it has its bytes
    stderr = child.stderr.read()
    assert child.wait(timeout=120) in ((141,) if output == "--stream" else (0, 141))
    assert stderr == b""


def test_load_errors(bundles, tmp_path):
    bundle = bundles["gru"][1]
    with pytest.raises(BackendError, match="unknown backend"):
        edgegen.runtime.load(bundle, backend="tflite")
    with pytest.raises(BundleError, match="no onnx int8 artifact"):
        edgegen.runtime.load(bundle, precision="int8")
    with pytest.raises(BundleError, match="not found"):
        edgegen.runtime.load(tmp_path / "missing")
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(BackendError, match="onnxruntime-gpu"):
            edgegen.runtime.load(bundle, device="cuda")


# --- the loop on a scripted model ------------------------------------------------

SIGNATURE = {
    "inputs": [
        {"name": "input_ids", "dtype": "int64", "shape": ["batch", "seq"]},
        {"name": "state.h", "dtype": "float32", "shape": [1, "batch", 1]},
    ],
    "outputs": [
        {"name": "logits", "dtype": "float32", "shape": ["batch", "seq", 259]},
        {"name": "state_out.h", "dtype": "float32", "shape": [1, "batch", 1]},
    ],
    "state": [{"input": "state.h", "output": "state_out.h"}],
    "layout": {"kind": "recurrent"},
}


class ScriptedRunner:
    """Emits the bytes of `script` one by one (the state counts the tokens seen)."""

    def __init__(self, script: bytes, nan_at: int | None = None):
        self.script, self.nan_at = script, nan_at

    def run(self, feeds):
        ids, h = feeds["input_ids"], feeds["state.h"]
        h = h + ids.shape[1]
        logits = np.zeros((ids.shape[0], ids.shape[1], 259), dtype=np.float32)
        for row in range(ids.shape[0]):
            step = int(h[0, row, 0]) - len("ab") - 1  # prompt "ab" plus BOS
            token = self.script[step] if step < len(self.script) else 257
            logits[row, -1, token] = 10.0
            if step == self.nan_at:
                logits[row, -1, 0] = np.nan
        return [logits, h]


def scripted(script: bytes, **kw) -> Generator:
    return Generator(ScriptedRunner(script, **kw), SIGNATURE, ByteTokenizer(), {}, "scripted")


def test_stream_never_splits_a_character():
    text = "né 東京 🚀!"
    gen = scripted(text.encode())
    pieces = list(gen.stream("ab", temperature=0))
    assert "".join(pieces) == text and "\ufffd" not in "".join(pieces)
    assert len(pieces) == len(text)  # one piece per whole character


def test_stop_strings_end_the_text_and_never_stream():
    gen = scripted(b"hello world, hello stop here")
    result = gen.generate("ab", temperature=0, stop=["o w", "stop"])
    assert result.text == "hell" and result.finish_reason == "stop"
    assert "".join(gen.stream("ab", temperature=0, stop=["o w"])) == "hell"
    assert "".join(gen.stream("ab", temperature=0, stop=["xyz"])) == "hello world, hello stop here"


def test_eos_min_new_tokens_and_ignore_eos():
    gen = scripted(b"hi")
    assert gen.generate("ab", temperature=0).finish_reason == "eos"
    assert gen.generate("ab", temperature=0).text == "hi"
    long = gen.generate("ab", temperature=0, ignore_eos=True, max_new_tokens=5)
    assert long.finish_reason == "length" and long.token_ids[:3] == [104, 105, 257]
    forced = gen.generate("ab", temperature=0, min_new_tokens=4, max_new_tokens=4)
    assert len(forced.token_ids) == 4 and 257 not in forced.token_ids


def test_non_finite_logits_name_the_step():
    with pytest.raises(GenerationError, match="non-finite logits at generation step 2"):
        scripted(b"abcdef", nan_at=2).generate("ab", temperature=0)


def test_text_stream_holds_back_a_possible_stop():
    stream = TextStream(("END",))
    buf = bytearray(b"abcE")
    assert stream.feed(buf, final=False) == "abc"
    buf += b"N"
    assert stream.feed(buf, final=False) == ""
    buf += b"x"
    assert stream.feed(buf, final=False) == "ENx"


# --- CLI ---------------------------------------------------------------------------


def test_cli_generate(bundles, tmp_path):
    bundle = str(bundles["gru"][1])
    runner = CliRunner()
    result = runner.invoke(
        main,
        ["generate", bundle, "--prompt", "The ", "--temperature", "0", "--max-new-tokens", "20"],
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("The ")
    as_json = runner.invoke(
        main,
        [
            "generate",
            bundle,
            "--prompt",
            "a",
            "--prompt",
            "bcd",
            "--json",
            "--seed",
            "3",
            "--max-new-tokens",
            "8",
        ],
    )
    data = json.loads(as_json.stdout)
    assert [d["prompt"] for d in data] == ["a", "bcd"] and all("finish_reason" in d for d in data)
    streamed = runner.invoke(
        main,
        [
            "generate",
            bundle,
            "--prompt",
            "The ",
            "--stream",
            "--seed",
            "4",
            "--backend",
            "torchscript",
            "--max-new-tokens",
            "30",
        ],
    )
    plain = runner.invoke(
        main, ["generate", bundle, "--prompt", "The ", "--seed", "4", "--max-new-tokens", "30"]
    )
    assert streamed.exit_code == 0 and streamed.stdout == plain.stdout
    piped = runner.invoke(main, ["generate", bundle, "--max-new-tokens", "5"], input="From stdin")
    assert piped.exit_code == 0 and piped.stdout.startswith("From stdin")
    prompt_file = tmp_path / "p.txt"
    prompt_file.write_text("From a file")
    filed = runner.invoke(main, ["generate", bundle, "--prompt-file", str(prompt_file)])
    assert filed.exit_code == 0 and filed.stdout.startswith("From a file")


@pytest.mark.parametrize(
    "args,message",
    [
        (["--prompt", "a", "--top-p", "0"], "top_p must be in (0, 1]"),
        (["--prompt", "a", "--temperature", "-1"], "temperature must be >= 0"),
        (["--prompt", "a", "--precision", "int4"], "no onnx int4 artifact"),
        (["--prompt", ""], "the prompt is empty"),
        (["--prompt-file", "/no/such/prompt"], "cannot read prompt file"),
    ],
)
def test_cli_generate_errors(bundles, args, message):
    result = CliRunner().invoke(main, ["generate", str(bundles["gru"][1]), *args])
    assert result.exit_code == 1
    assert result.stderr.startswith("error: ") and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_cli_generate_rejects_invalid_utf8(bundles, tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"caf\xe9")
    result = CliRunner().invoke(
        main, ["generate", str(bundles["gru"][1]), "--prompt-file", str(bad)]
    )
    assert result.exit_code == 1 and "not UTF-8" in result.stderr


def test_cli_generate_damaged_bundle(bundles, tmp_path):
    import shutil

    copy = tmp_path / "b"
    shutil.copytree(bundles["gru"][1], copy)
    with open(copy / "model.onnx", "ab") as f:
        f.write(b"\0")
    result = CliRunner().invoke(main, ["generate", str(copy), "--prompt", "a"])
    assert result.exit_code == 1 and "does not match its manifest hash" in result.stderr

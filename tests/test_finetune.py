"""Fine-tuning (`train --init`): a trained GPT, a trained GRU and an imported Hugging Face
Llama continue training on new text with their own architecture and tokenizer, resume
exactly, leave the init checkpoint untouched, and export through the parity gate."""

import pytest
import torch
from click.testing import CliRunner

import edgegen.runtime
from edgegen.checkpoint import load_checkpoint
from edgegen.cli import main
from edgegen.config import GPTConfig, config_to_dict
from edgegen.eager import load_eager
from edgegen.errors import ConfigError, OutputError
from edgegen.export import export_bundle
from edgegen.importers.pretrained import import_pretrained
from edgegen.tokenizer import ByteTokenizer, HFTokenizer
from edgegen.train import TrainOptions, text_bytes, train
from tests.hf_tokenizers import byte_level_bpe

# Text none of the inits saw, repeated so ten steps visibly lower the loss.
NEW_TEXT = (
    "Edge devices run small models, and a fine-tuned model learns the words of its users.\n\n"
    "Validation reports bits per byte, whatever the tokenizer cuts the text into.\n\n"
) * 20
INITS = ("gpt", "gru", "llama")


def snapshot(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def run_options(init, text, out, **kw):
    """A tiny run's options: fine-tuning `init`, or a new model when it is None."""
    base = dict(
        init=str(init) if init else None,
        data=str(text),
        out=str(out),
        steps=10,
        batch_size=8,
        seq_len=32,
        bptt=16,
        lr=1e-2,
        eval_interval=5,
        eval_tokens=1024,
    )
    return TrainOptions(**{**base, **kw})


def trained(root, name, family, text, **overrides):
    opts = run_options(None, text, root / name, family=family, overrides=overrides, steps=20)
    train(opts, progress=False)
    return root / name


def imported_llama(root):
    from tests.test_import_hf import MODELS, hf_model, save_hf

    model = hf_model("llama", MODELS["llama-gqa"][1])
    save_hf(model, root / "llama-hf")
    import_pretrained(root / "llama-hf", root / "llama")
    return root / "llama"


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "new.txt"
    path.write_text(NEW_TEXT)
    return path


@pytest.fixture(scope="module")
def inits(tmp_path_factory):
    """name -> (checkpoint, its files' bytes as they were written)."""
    pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("inits")
    (root / "old.txt").write_text("The quick brown fox jumps over the lazy dog.\n\n" * 30)
    paths = {
        "gpt": trained(root, "gpt", "gpt", root / "old.txt", dim=32, n_heads=4, max_seq_len=64),
        "gru": trained(root, "gru", "rnn", root / "old.txt", dim=32, hidden_size=48),
        "llama": imported_llama(root),
    }
    return {name: (path, snapshot(path)) for name, path in paths.items()}


@pytest.mark.parametrize("name", INITS)
def test_fine_tuning_learns_the_new_text_and_keeps_the_model(inits, text, tmp_path, name):
    init, before = inits[name]
    result = train(run_options(init, text, tmp_path / "ft"), progress=False)
    losses = [t["loss"] for t in result.log["train"]]
    val = [v["bpb"] for v in result.log["val"]]
    assert [v["step"] for v in result.log["val"]] == [0, 5, 10]
    assert sum(losses[-3:]) < 0.9 * sum(losses[:3]), losses
    assert val[-1] < val[0], val
    old, old_tokenizer = load_checkpoint(init)
    new, new_tokenizer = load_checkpoint(tmp_path / "ft")
    assert config_to_dict(new.config) == config_to_dict(old.config)
    assert new_tokenizer == old_tokenizer
    assert any(
        not torch.equal(a, b) for a, b in zip(old.parameters(), new.parameters(), strict=True)
    )
    assert snapshot(init) == before  # read, never written


@pytest.mark.parametrize("name", ["gru", "llama"])
def test_resume_continues_as_an_uninterrupted_fine_tune(inits, text, tmp_path, name):
    init, _ = inits[name]
    whole = train(run_options(init, text, tmp_path / "a"), progress=False)
    opts = run_options(init, text, tmp_path / "b")
    first = train(opts, progress=False, on_step=lambda step, loss: step == 5)
    assert first.interrupted and first.step == 5
    resumed = train(run_options(None, text, tmp_path / "b"), resume=True, progress=False)
    assert [t["loss"] for t in resumed.log["train"]] == [t["loss"] for t in whole.log["train"]]
    a, tokenizer_a = load_checkpoint(whole.out)
    b, tokenizer_b = load_checkpoint(resumed.out)
    assert tokenizer_b == tokenizer_a == load_checkpoint(init)[1]
    for (key, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(p, q), key


@pytest.mark.parametrize(
    "name,change,message",
    [
        ("gpt", dict(overrides={"dim": 48}), "dim=48 contradicts its dim=32"),
        ("gpt", dict(overrides={"n_layers": 1, "dim": 32}), "n_layers=1 contradicts its n_layers"),
        ("gpt", dict(overrides={"hidden_size": 48}), "is a gpt model: it has no hidden_size"),
        ("gpt", dict(family="rnn"), "family='rnn' contradicts its family='gpt'"),
        ("gpt", dict(cell="lstm"), "it has no cell"),
        ("gpt", dict(preset="small"), "--preset small's dim=192 contradicts its dim=32"),
        ("gru", dict(cell="lstm"), "cell='lstm' contradicts its cell='gru'"),
        ("llama", dict(overrides={"norm": "layernorm"}), "norm='layernorm' contradicts"),
        ("llama", dict(seq_len=256), "seq_len 256 exceeds max_seq_len 128"),
    ],
)
def test_options_contradicting_the_init_are_refused(inits, text, tmp_path, name, change, message):
    init, _ = inits[name]
    with pytest.raises(ConfigError, match=message):
        train(run_options(init, text, tmp_path / "ft", **change), progress=False)
    assert not (tmp_path / "ft").exists()


def test_options_repeating_the_init_are_accepted(inits, text, tmp_path):
    init, _ = inits["gru"]
    same = dict(family="rnn", cell="gru", overrides={"dim": 32, "hidden_size": 48})
    assert (
        train(run_options(init, text, tmp_path / "ft", steps=2, **same), progress=False).step == 2
    )
    again = run_options(init, text, tmp_path / "ft", steps=3, family="rnn", cell="gru")
    assert train(again, resume=True, progress=False).step == 3


def test_out_may_not_be_the_init_or_around_it(inits, text, tmp_path):
    init, before = inits["gpt"]
    for out, message in (
        (init, "it is the input"),
        (init / "sub", "it lies inside the input"),
        (init.parent, "it contains the input"),
    ):
        with pytest.raises(OutputError, match=message):
            train(run_options(init, text, out), force=True, progress=False)
    assert snapshot(init) == before


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_a_damaged_init_is_one_line(inits, text, tmp_path):
    _, before = inits["gpt"]
    bad = tmp_path / "bad"
    bad.mkdir()
    for name, data in before.items():
        (bad / name).write_bytes(data)
    weights = bytearray(before["model.safetensors"])
    weights[len(weights) // 2] ^= 0xFF
    (bad / "model.safetensors").write_bytes(bytes(weights))
    result = cli("train", "--init", bad, "--data", text, "--out", tmp_path / "ft", "--quiet")
    assert result.exit_code == 1, result.output
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert "model.safetensors does not match its recorded sha256" in result.stderr
    missing = cli("train", "--init", tmp_path / "none", "--data", text, "--out", tmp_path / "ft")
    assert missing.exit_code == 1 and "checkpoint directory not found" in missing.stderr
    assert not (tmp_path / "ft").exists()


def test_the_cli_fine_tunes_and_refuses_a_contradiction(inits, text, tmp_path):
    init, _ = inits["gpt"]
    common = ["train", "--init", init, "--data", text, "--steps", 3, "--batch-size", 4]
    result = cli(*common, "--seq-len", 32, "--out", tmp_path / "ft", "--quiet")
    assert result.exit_code == 0, result.output
    assert f"{tmp_path / 'ft'}: step 3" in result.stdout
    refused = cli(*common, "--set", "dim=48", "--out", tmp_path / "other", "--quiet")
    assert refused.exit_code == 1 and refused.stderr.count("\n") == 1
    assert refused.stderr.startswith("error: --init") and "dim=48" in refused.stderr
    assert not (tmp_path / "other").exists()


def test_a_fine_tuned_import_exports_and_generates(inits, text, tmp_path):
    init, _ = inits["llama"]
    train(run_options(init, text, tmp_path / "ft"), progress=False)
    manifest = export_bundle(tmp_path / "ft", tmp_path / "bundle", formats=["onnx"])  # parity
    assert manifest.tokenizer == load_checkpoint(init)[1]
    assert (tmp_path / "bundle" / "tokenizer.json").read_bytes() == (
        init / "tokenizer.json"
    ).read_bytes()
    params = dict(temperature=0, max_new_tokens=12, min_new_tokens=12)
    result = edgegen.runtime.load(tmp_path / "bundle").generate("Edge devices", **params)
    want = load_eager(tmp_path / "ft").generate("Edge devices", **params)
    assert result.token_ids == want.token_ids and result.text  # the fine-tuned model's


def test_bits_per_byte_count_the_bytes_each_token_stands_for():
    assert text_bytes(ByteTokenizer(), "cpu").tolist() == [1] * 256 + [0] * 3
    tokenizer = HFTokenizer(byte_level_bpe(), {"type": "hf", "version": 1}, vocab_size=420)
    table = text_bytes(tokenizer, "cpu")
    ids = tokenizer.encode(NEW_TEXT + "<|im_end|>")
    assert int(table[ids].sum()) == len(NEW_TEXT.encode())  # the special token counts 0
    assert table[400:].tolist() == [0] * 20  # padded rows stand for no text


def test_the_fine_tuning_window_defaults_to_a_short_one():
    imported = GPTConfig(vocab_size=49152, max_seq_len=8192)
    assert TrainOptions(init="ck").window(imported) == 256
    assert TrainOptions(init="ck").window(GPTConfig(max_seq_len=64)) == 64
    assert TrainOptions(init="ck", seq_len=1024).window(imported) == 1024
    assert TrainOptions().window(imported) == 8192  # a new model trains on its context
    assert TrainOptions(init="ck").peak_lr == 1e-4 and TrainOptions().peak_lr == 3e-3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")  # before the fixture
def test_cuda_fine_tuning(inits, text, tmp_path):
    init, before = inits["llama"]
    result = train(run_options(init, text, tmp_path / "ft", device="cuda"), progress=False)
    assert result.log["val"][-1]["bpb"] < result.log["val"][0]["bpb"]
    model, tokenizer = load_checkpoint(tmp_path / "ft")
    assert tokenizer == load_checkpoint(init)[1] and snapshot(init) == before
    assert all(torch.isfinite(p).all() for p in model.parameters())

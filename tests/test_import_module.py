"""The user's own nn.Module in: pytorch/examples word_language_model's RNNModel and
TransformerModel and the plainest nn.TransformerEncoder LM (tests/user_models.py),
trained a few steps on words, exported with from_module; the user's own forward,
recomputing the whole sequence for every token, is the oracle of the bundles' greedy
tokens. Modules that cannot map are refused in one line, through the CLI too."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from safetensors.torch import save_file

import edgegen.runtime
from edgegen.checkpoint import load_checkpoint
from edgegen.cli import main
from edgegen.errors import ExportError, ImportModelError, TokenizerError
from edgegen.export import from_module
from edgegen.export.parity import eval_windows
from edgegen.export.spec import step_spec
from edgegen.importers.module import from_user_module, import_module
from edgegen.tokenizer import ByteTokenizer, vocabulary_file, word_level
from edgegen.verify import PROMPTS, prompts_for
from tests import user_models
from tests.conftest import TEXT
from tests.user_models import (
    BidirectionalLSTM,
    CustomAttentionLM,
    RNNModel,
    TinyTransformerLM,
    TransformerModel,
    UnmaskedTransformerLM,
)

LINES = [[*line.split(), "<eos>"] for line in TEXT.splitlines() if line.strip()]
# ids in order of first appearance, as word_language_model's Dictionary gives them
WORDS = list(dict.fromkeys(w for line in LINES for w in line))
V = len(WORDS)
PROMPT = "The quick brown"
MODELS = {  # name: (factory, batch_first)
    "rnn-tanh": (lambda: RNNModel("RNN_TANH", V, 32, 32, 2, dropout=0.1), False),
    "rnn-relu": (lambda: RNNModel("RNN_RELU", V, 32, 32, 2, dropout=0.1), False),
    "gru": (lambda: RNNModel("GRU", V, 32, 32, 2, dropout=0.1), False),
    "lstm-tied": (lambda: RNNModel("LSTM", V, 32, 32, 2, dropout=0.1, tie_weights=True), False),
    "transformer": (lambda: TransformerModel(V, 32, 2, 64, 2, dropout=0.1), False),
    # batch_first and norm_first each change a different thing (how forward is called,
    # where the norms go), so one model takes both; test_more_encoder_shapes_map
    # checks the mapping of the other two combinations
    "transformer-batch-first-norm-first": (
        lambda: TransformerModel(V, 32, 2, 64, 2, dropout=0.1, batch_first=True, norm_first=True),
        True,
    ),
    "plain-encoder": (lambda: TinyTransformerLM(V), False),
}


def own_forward(model, ids, batch_first):
    """The user's forward, called as each of these models expects: ids [B, T] ->
    log-probabilities [B, T, V]."""
    x = ids if batch_first else ids.t()
    hidden = (model.init_hidden(ids.shape[0]),) if isinstance(model, RNNModel) else ()
    out = model(x, *hidden)
    out = out[0] if isinstance(out, tuple) else out
    out = out.reshape(*x.shape, V)
    return F.log_softmax(out if batch_first else out.transpose(0, 1), dim=-1)


def train_a_little(model, batch_first, steps=25):
    stream = torch.tensor([WORDS.index(w) for line in LINES for w in line])
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(stream) - 33, (8,), generator=gen)
        rows = torch.stack([stream[s : s + 33] for s in starts])
        logp = own_forward(model, rows[:, :-1], batch_first)
        loss = F.nll_loss(logp.reshape(-1, V), rows[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def own_greedy(model, ids, batch_first, n=32):
    """Greedy decoding the only way the user's module can: the whole sequence each token."""
    ids = list(ids)
    with torch.no_grad():
        for _ in range(n):
            logp = own_forward(model, torch.tensor([ids]), batch_first)
            ids.append(int(logp[0, -1].argmax()))
    return ids


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Models this small run fastest on one torch thread; more only spin on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """name -> (trained module, bundle), built on first use."""
    root, done = tmp_path_factory.mktemp("modules"), {}

    def get(name):
        if name not in done:
            factory, batch_first = MODELS[name]
            torch.manual_seed(0)
            model = train_a_little(factory(), batch_first)
            from_module(model, WORDS, root / name, checkpoint=root / f"{name}.ckpt")
            done[name] = model, root / name
        return done[name]

    return get


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("backend", ["onnx", "torchscript"])
def test_bundle_greedy_tokens_equal_the_modules_own(exported, name, backend):
    model, bundle = exported(name)
    generator = edgegen.runtime.load(bundle, backend=backend)
    prompt = generator.encode_prompt(PROMPT)
    assert prompt == [WORDS.index(w) for w in PROMPT.split()]  # no BOS
    got = generator.generate(PROMPT, temperature=0, max_new_tokens=32, ignore_eos=True)
    want = own_greedy(model, prompt, MODELS[name][1])[len(prompt) :]
    assert got.token_ids == want
    assert got.text == "".join(" " + WORDS[i] for i in want)  # words joined by spaces


def test_the_checkpoint_says_what_it_mapped(exported):
    _, bundle = exported("transformer")
    model, tokenizer = load_checkpoint(bundle.parent / "transformer.ckpt")
    c = model.config
    assert (c.norm_position, c.final_norm, c.pos_encoding, c.max_seq_len) == (
        "post",
        False,
        "sinusoidal",
        5000,
    )
    assert (c.activation, c.bias, c.head_bias, c.embed_scale) == ("relu", True, True, 32**0.5)
    assert tokenizer.eos_ids == (WORDS.index("<eos>"),) and not tokenizer.add_bos
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["signature"]["layout"]["kind"] == "kv_cache"


@pytest.mark.parametrize(
    "make",
    [
        lambda: TransformerModel(V, 32, 4, 48, 3, batch_first=True),
        lambda: TransformerModel(V, 32, 2, 64, 2, norm_first=True),
        lambda: user_models.TinyTransformerLM(V, d_model=16, nhead=4),
        lambda: _gelu_unbiased(),
        lambda: _learned_positions(),
    ],
    ids=[
        "batch-first-post-norm",
        "seq-first-norm-first",
        "four-heads",
        "gelu-no-bias",
        "learned-positions",
    ],
)
def test_more_encoder_shapes_map(make):
    torch.manual_seed(0)
    model, _ = from_user_module(make(), WORDS)  # the forward check is inside
    assert model.config.family == "gpt"


def _gelu_unbiased():
    model = TinyTransformerLM(V)
    layer = torch.nn.TransformerEncoderLayer(32, 2, 64, activation="gelu", bias=False)
    model.encoder = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    return model


class _LearnedPositions(TinyTransformerLM):
    def __init__(self):
        super().__init__(V)
        self.pos = torch.nn.Embedding(64, 32)

    def forward(self, x):
        x = self.embed(x) + self.pos(torch.arange(x.size(0)))[:, None]
        mask = torch.nn.Transformer.generate_square_subsequent_mask(x.size(0))
        return self.lm_head(self.encoder(x, mask=mask))


def _learned_positions():
    return _LearnedPositions()


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: BidirectionalLSTM(V), "bidirectional RNN rnn (LSTM)"),
        (lambda: UnmaskedTransformerLM(V), "is not causal"),
        (lambda: CustomAttentionLM(V), "custom attention encoder.layers.0.self_attn (MyAttention)"),
    ],
    ids=["bidirectional", "no-causal-mask", "custom-attention"],
)
def test_unsupported_modules_are_one_line(tmp_path, make, message):
    with pytest.raises(ImportModelError) as e:
        import_module(make(), WORDS, tmp_path / "ckpt")
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "ckpt").exists()


def test_a_forward_that_differs_from_its_layers_is_refused(tmp_path):
    class Doubled(TinyTransformerLM):
        def forward(self, x):
            return 2 * super().forward(x)

    with pytest.raises(ImportModelError, match="differs from its mapping"):
        import_module(Doubled(V), WORDS, tmp_path / "ckpt")


def test_word_list_tokenizer(tmp_path):
    path = tmp_path / "words.txt"
    path.write_text("\n".join(["<unk>", "the", "cat", "<eos>"]) + "\n")
    tok = vocabulary_file(path)
    assert tok.encode("the  cat\ndog <eos>") == [1, 2, 0, 3]
    assert tok.decode([1, 2, 3]) == "the cat <eos>" and tok.eos_ids == (3,) and tok.bos_id is None
    assert vocabulary_file(_saved_json(tmp_path, tok)).encode("the cat") == [1, 2]
    with pytest.raises(TokenizerError, match="twice"):
        word_level(["a", "b", "a"])
    with pytest.raises(TokenizerError, match="without whitespace"):
        word_level(["a", "b c"])
    with pytest.raises(TokenizerError, match="cannot encode"):  # no <unk> to fall back on
        word_level(["a"]).encode("b")


def _saved_json(tmp_path, tok):
    path = tmp_path / "tokenizer.json"
    path.write_text(tok.file_text())
    return path


# --- the CLI -------------------------------------------------------------------------

MODULE_FILE = """
import sys
sys.path.insert(0, {root!r})
from tests.user_models import *
"""


@pytest.fixture
def module_file(tmp_path):
    from pathlib import Path

    path = tmp_path / "model.py"
    path.write_text(MODULE_FILE.format(root=str(Path(__file__).parents[1])))
    (tmp_path / "words.txt").write_text("\n".join(WORDS) + "\n")
    return path


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_cli_imports_a_module_file(tmp_path, module_file, suffix):
    torch.manual_seed(0)
    model = RNNModel("GRU", V, 32, 32, 2)
    weights = tmp_path / f"weights{suffix}"
    if suffix == ".pt":
        torch.save(model.state_dict(), weights)
    else:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, weights)
    args = json.dumps(["GRU", V, 32, 32, 2])
    result = cli(
        "import", "--module", f"{module_file}:RNNModel", "--state-dict", weights,
        "--init-args", args, "--tokenizer", tmp_path / "words.txt", "--out", tmp_path / "ckpt",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "RNNModel" in result.output and "2 gru layers x 32" in result.output
    mapped, tok = load_checkpoint(tmp_path / "ckpt")
    ids = torch.tensor([[1, 2, 3]])
    want = model.eval()(ids.t(), model.init_hidden(1))[0]
    assert torch.allclose(torch.log_softmax(mapped(ids)[0][0], -1), want, atol=1e-5)
    assert tok.decode([0, 1]) == f"{WORDS[0]} {WORDS[1]}"


DATACLASS_FILE = """
from __future__ import annotations
import sys
sys.path.insert(0, {root!r})
from dataclasses import dataclass
from tests.user_models import RNNModel

@dataclass
class Config:
    ntoken: int
    ninp: int = 32

class ConfiguredRNN(RNNModel):
    def __init__(self, ntoken):
        config = Config(ntoken)
        super().__init__("GRU", config.ntoken, config.ninp, 32, 2)
"""


def test_cli_imports_a_module_file_with_dataclasses(tmp_path, module_file):
    """Postponed annotations make @dataclass look the file up in sys.modules."""
    from pathlib import Path

    path = tmp_path / "configured.py"
    path.write_text(DATACLASS_FILE.format(root=str(Path(__file__).parents[1])))
    torch.manual_seed(0)
    torch.save(RNNModel("GRU", V, 32, 32, 2).state_dict(), tmp_path / "w.pt")
    result = cli(
        "import", "--module", f"{path}:ConfiguredRNN", "--state-dict", tmp_path / "w.pt",
        "--init-args", json.dumps([V]), "--tokenizer", tmp_path / "words.txt",
        "--out", tmp_path / "ckpt",
    )  # fmt: skip
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize(
    "cls, init, message",
    [
        ("BidirectionalLSTM", [V], "bidirectional RNN rnn (LSTM)"),
        ("UnmaskedTransformerLM", [V], "is not causal"),
        ("CustomAttentionLM", [V], "custom attention encoder.layers.0.self_attn"),
        ("Nope", [V], "defines no class Nope"),
        ("TinyTransformerLM", [V, 16], "does not fit TinyTransformerLM"),
    ],
)
def test_cli_refuses_in_one_line(tmp_path, module_file, cls, init, message):
    torch.manual_seed(0)
    weights = tmp_path / "w.pt"
    source = getattr(user_models, cls, TinyTransformerLM)
    torch.save(source(V).state_dict(), weights)
    result = cli(
        "import", "--module", f"{module_file}:{cls}", "--state-dict", weights,
        "--init-args", json.dumps(init), "--tokenizer", tmp_path / "words.txt",
        "--out", tmp_path / "ckpt",
    )  # fmt: skip
    assert result.exit_code == 1
    assert message in result.output and result.output.count("\n") == 1, result.output
    assert "Traceback" not in result.output and not (tmp_path / "ckpt").exists()


def test_cli_refuses_a_pickled_module(tmp_path, module_file):
    weights = tmp_path / "model.pt"
    torch.save(TinyTransformerLM(V), weights)  # the whole module: nothing of it is unpickled
    result = cli(
        "import", "--module", f"{module_file}:TinyTransformerLM", "--state-dict", weights,
        "--init-args", json.dumps([V]), "--tokenizer", tmp_path / "words.txt",
        "--out", tmp_path / "ckpt",
    )  # fmt: skip
    assert result.exit_code == 1 and "weights_only=True" in result.output
    assert "save model.state_dict()" in result.output


def test_cli_module_options_go_together(tmp_path, module_file):
    result = cli("import", "--module", f"{module_file}:RNNModel", "--out", tmp_path / "c")
    assert result.exit_code == 2 and "--module takes --state-dict" in result.output
    result = cli("import", tmp_path, "--tokenizer", "w.txt", "--out", tmp_path / "c")
    assert result.exit_code == 2 and "--tokenizer goes with --module" in result.output


# --- verify and quantize on a word vocabulary ------------------------------------------


def test_verify_prompts_come_from_the_vocabulary_when_its_own_do_not_encode():
    assert prompts_for(ByteTokenizer()) == PROMPTS
    for words in (WORDS, ["<unk>", *WORDS]):  # "If" is not a word of theirs
        tok = word_level(words)
        prompts = prompts_for(tok)
        assert [len(tok.encode(p)) for p in prompts] == [3, 1, 7]
        assert all(w in WORDS and w != "<eos>" for p in prompts for w in p.split())
        assert prompts_for(tok) == prompts  # drawn with a seed


def test_verify_a_word_level_bundle(exported, text_file):
    _, bundle = exported("transformer")
    ckpt = bundle.parent / "transformer.ckpt"
    result = cli("verify", bundle, "--checkpoint", ckpt, "--tokens", 32)  # 128 takes 4x as long
    assert result.exit_code == 0, result.output
    # level 4 needs held-out text in its words: skipped (saying why), not passed
    assert result.output.count("skipped: the embedded corpus does not fit") == 2
    assert "--eval-text" in result.output
    assert result.output.splitlines()[-1] == "10 passed, 2 skipped, 0 failed"
    result = cli("verify", bundle, "--checkpoint", ckpt, "--levels", "4", "--strict")
    assert result.exit_code == 1 and "2 of 2 checks skipped" in result.output
    args = ("--levels", "4", "--eval-text", text_file, "--strict")
    result = cli("verify", bundle, "--checkpoint", ckpt, *args)
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[-1] == "2 passed, 0 skipped, 0 failed"


def test_quality_gates_need_text_in_the_vocabulary(exported, tmp_path, text_file):
    _, bundle = exported("transformer")
    ckpt = bundle.parent / "transformer.ckpt"
    spec = step_spec(load_checkpoint(ckpt)[0])
    with pytest.raises(ExportError, match=r"the embedded corpus is \d+% unknown tokens"):
        eval_windows(word_level(["<unk>", *WORDS]), None, spec)  # it would measure <unk>
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    other = tmp_path / "other.txt"
    other.write_text("Some words it has never seen.\n")
    for eval_text, message in [
        ((), "the embedded corpus does not fit this tokenizer"),
        (("--eval-text", other), f"evaluation text {other} does not fit this tokenizer"),
    ]:
        result = cli("quantize", copy, "--precision", "int8", *eval_text)
        assert result.exit_code == 1 and result.output.count("\n") == 1, result.output
        assert message in result.output and "--eval-text" in result.output
    result = cli("quantize", copy, "--precision", "int8,int4", "--eval-text", text_file)
    assert result.exit_code == 0, result.output
    assert _precisions(copy) == {"fp32", "int8", "int4"}


def test_export_quantizes_a_word_level_model_on_text_in_its_words(exported, tmp_path, text_file):
    _, bundle = exported("gru")
    ckpt, out = bundle.parent / "gru.ckpt", tmp_path / "bundle"
    args = ("export", ckpt, "--out", out, "--quantize", "int8,int4")
    result = cli(*args)  # refused before anything is exported
    assert result.exit_code == 1 and result.output.count("\n") == 1, result.output
    assert "the embedded corpus does not fit" in result.output and "--eval-text" in result.output
    assert "exporting" not in result.output and not out.exists()
    result = cli(*args, "--eval-text", text_file)
    assert result.exit_code == 0, result.output
    assert _precisions(out) == {"fp32", "int8", "int4"}
    generator = edgegen.runtime.load(out, precision="int4")
    assert generator.generate(PROMPT, temperature=0, max_new_tokens=4).text.startswith(" ")


def _precisions(bundle):
    return {a["precision"] for a in json.loads((bundle / "manifest.json").read_text())["artifacts"]}


EXAMPLE = Path(__file__).parent.parent / "examples" / "wordlm"


def test_the_readme_example_is_the_one_in_examples():
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    for name in ("model.py", "train.py"):
        assert (EXAMPLE / name).read_text() in blocks, name


@pytest.mark.slow
def test_the_readme_example_runs_end_to_end(tmp_path):
    """examples/wordlm, as the README and `make demo` run it: train, import, export,
    generate the continuation the README promises."""
    trained = subprocess.run(
        [sys.executable, str(EXAMPLE / "train.py")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert trained.returncode == 0, trained.stderr
    result = cli(
        "import", "--module", f"{EXAMPLE / 'model.py'}:WordLM",
        "--state-dict", tmp_path / "wordlm.pt", "--init-args", "[8]",
        "--tokenizer", tmp_path / "words.txt", "--out", tmp_path / "wordlm",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    result = cli("export", tmp_path / "wordlm", "--out", tmp_path / "wordlm.bundle")
    assert result.exit_code == 0, result.output
    generator = edgegen.runtime.load(tmp_path / "wordlm.bundle")
    assert generator.generate("the dog", temperature=0, max_new_tokens=4).text == " sat on the rug"

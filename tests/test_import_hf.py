"""Hugging Face models in. Tiny random Llama (grouped- and multi-query, tied and untied,
rope theta other than 10000) and GPT-2 models made here with `transformers` (no
download) are the oracle: logits, greedy tokens of the exported bundles, tokenizer."""

import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from tokenizers import Tokenizer

import edgegen.runtime
from edgegen.checkpoint import load_checkpoint
from edgegen.cli import main
from edgegen.errors import ImportModelError
from edgegen.export import export_bundle
from edgegen.importers.hf import ARCHITECTURES
from edgegen.importers.pretrained import import_pretrained
from tests.hf_tokenizers import byte_level_bpe

transformers = pytest.importorskip("transformers")

VOCAB = 420  # the tokenizer defines 400 ids: the model's rows beyond them are padding
LLAMA = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, max_position_embeddings=128)
MODELS = {
    "llama-gqa": ("llama", dict(num_attention_heads=4, num_key_value_heads=2, rope_theta=5e5)),
    "llama-mqa-tied": ("llama", dict(num_attention_heads=4, num_key_value_heads=1, tied=True)),
    "gpt2": ("gpt2", dict(n_embd=32, n_layer=2, n_head=4, n_positions=128)),
}
TEXT = "The quick brown fox 東京 🚀 def f(x):\n    return x  +  1\n\n\tdone"


def hf_model(kind, options):
    options = dict(options)
    tied = options.pop("tied", kind == "gpt2")
    torch.manual_seed(0)
    special = dict(bos_token_id=0, eos_token_id=2, pad_token_id=0, tie_word_embeddings=tied)
    if kind == "llama":
        config = transformers.LlamaConfig(vocab_size=VOCAB, **LLAMA, **options, **special)
        model = transformers.LlamaForCausalLM(config)
    else:
        config = transformers.GPT2Config(vocab_size=VOCAB, **options, **special)
        model = transformers.GPT2LMHeadModel(config)
    with torch.no_grad():  # peaked distributions: greedy decoding without near-ties
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    return model.eval()


def save_hf(model, path):
    model.save_pretrained(path)
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(byte_level_bpe()),
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
    )
    tokenizer.save_pretrained(path)
    return tokenizer


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for name, (kind, options) in MODELS.items():
        model = hf_model(kind, options)
        tokenizer = save_hf(model, root / name)
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        import_pretrained(root / name, root / f"{name}.ck")
        export_bundle(root / f"{name}.ck", root / f"{name}.bundle")
        out[name] = (model, tokenizer, root / name, root / f"{name}.ck", root / f"{name}.bundle")
    return out


def test_every_architecture_has_a_test():
    assert {kind for kind, _ in MODELS.values()} == set(ARCHITECTURES)


def left_padded():
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11], [0, 0, 0, 12, 13, 14, 15]])
    mask = torch.tensor([[1] * 7, [0, 0, 0, 1, 1, 1, 1]])
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


@pytest.mark.parametrize("name", MODELS)
def test_logits_match_transformers_on_a_left_padded_batch(imported, name):
    hf, _, _, ckpt, _ = imported[name]
    model, _ = load_checkpoint(ckpt)
    ids, mask, positions = left_padded()
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        ours = model(ids, attention_mask=mask, position_ids=positions)[0]
    assert ours.shape == theirs.shape
    real = mask.bool()
    assert (ours - theirs)[real].abs().max().item() < 1e-4
    assert theirs[real].std() > 1.0  # peaked: the comparison is not of near-zero numbers


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
@pytest.mark.parametrize("name", MODELS)
def test_greedy_tokens_of_the_bundles_match_generate(imported, name, fmt):
    hf, tokenizer, _, _, bundle = imported[name]
    prompt = "The quick brown fox"
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        theirs = hf.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=64,
            min_new_tokens=64,
            do_sample=False,
            pad_token_id=tokenizer.eos_token_id,
        )[0, ids.shape[1] :].tolist()
    generator = edgegen.runtime.load(bundle, backend=fmt)
    ours = generator.generate(prompt, temperature=0, max_new_tokens=64, min_new_tokens=64)
    assert len(theirs) == 64 and len(set(theirs)) > 4  # a real continuation, not one token
    assert ours.token_ids == theirs
    assert ours.prompt_tokens == ids.shape[1]


@pytest.mark.parametrize("name", MODELS)
def test_the_tokenizer_encodes_and_decodes_as_hf(imported, name):
    _, _, src, ckpt, bundle = imported[name]
    _, ours = load_checkpoint(ckpt)
    theirs = transformers.AutoTokenizer.from_pretrained(src)
    text = TEXT + "<|im_start|>user<|im_end|>"
    ids = theirs.encode(text, add_special_tokens=False)
    assert ours.encode(text) == ids
    assert ours.decode(ids) == theirs.decode(ids)
    assert edgegen.runtime.read_manifest(bundle).tokenizer.encode(text) == ids


def test_a_gguf_of_the_same_weights_imports_to_the_same_logits(imported, tmp_path):
    from tests.test_import_gguf import GPT2_WORDS, train_tokenizer, write_llama

    hf = hf_model("llama", MODELS["llama-gqa"][1])
    tokenizer = train_tokenizer(GPT2_WORDS)
    with torch.no_grad():  # the GGUF's vocabulary is this tokenizer's
        hf.resize_token_embeddings(tokenizer.get_vocab_size())
    path = write_llama(tmp_path / "m.gguf", hf, tokenizer)
    import_pretrained(path, tmp_path / "ck")
    model, _ = load_checkpoint(tmp_path / "ck")
    ids, mask, positions = left_padded()
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        ours = model(ids, attention_mask=mask, position_ids=positions)[0]
    assert (ours - theirs)[mask.bool()].abs().max().item() < 1e-4


def test_cli_import_prints_what_it_imported(imported, tmp_path):
    _, _, src, _, _ = imported["llama-gqa"]
    result = CliRunner().invoke(main, ["import", str(src), "--out", str(tmp_path / "ck")])
    assert result.exit_code == 0, result.output
    assert "llama" in result.stdout and "4 heads (2 KV)" in result.stdout
    assert json.loads((tmp_path / "ck" / "source.json").read_text())["model_type"] == "llama"
    again = CliRunner().invoke(main, ["import", str(src), "--out", str(tmp_path / "ck")])
    assert again.exit_code == 1 and "already exists" in again.stderr


def damaged(src, tmp_path, how):
    """A copy of the HF directory `src` with one thing wrong."""
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    config = json.loads((bad / "config.json").read_text())
    if how == "no config":
        (bad / "config.json").unlink()
    elif how == "unknown architecture":
        (bad / "config.json").write_text(json.dumps({**config, "model_type": "bert"}))
    elif how == "bad tokenizer":
        (bad / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    else:
        from safetensors.numpy import load_file, save_file

        tensors = load_file(str(bad / "model.safetensors"))
        name = "model.layers.1.mlp.up_proj.weight"
        if how == "missing tensor":
            del tensors[name]
        elif how == "misshapen tensor":
            tensors[name] = tensors[name][:, :5].copy()
        else:  # an extra tensor the mapping does not know
            tensors["model.layers.1.mlp.extra.weight"] = tensors[name]
        save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
    return bad


@pytest.mark.parametrize(
    "how,piece",
    [
        ("no config", "no config.json"),
        (
            "unknown architecture",
            "'bert' is not supported; edgegen imports llama, gpt2",
        ),
        ("bad tokenizer", "tokenizer"),
        ("missing tensor", "tensor model.layers.1.mlp.up_proj.weight is missing"),
        ("misshapen tensor", "model.layers.1.mlp.up_proj.weight has shape (48, 5), expected"),
        ("extra tensor", "tensor model.layers.1.mlp.extra.weight is not understood"),
    ],
)
def test_bad_sources_are_one_line_and_write_nothing(imported, tmp_path, how, piece):
    bad = damaged(imported["llama-gqa"][2], tmp_path, how)
    result = CliRunner().invoke(main, ["import", str(bad), "--out", str(tmp_path / "ck")])
    assert result.exit_code == 1, result.output
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert piece in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"]


def test_a_truncated_gguf_is_one_line(imported, tmp_path):
    from tests.test_import_gguf import GPT2_WORDS, train_tokenizer, write_llama

    path = write_llama(
        tmp_path / "m.gguf", hf_model(*MODELS["llama-gqa"]), train_tokenizer(GPT2_WORDS)
    )
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImportModelError):
        import_pretrained(path, tmp_path / "ck")
    assert not (tmp_path / "ck").exists()


def test_pickled_weights_are_refused(imported, tmp_path):
    bad = damaged(imported["gpt2"][2], tmp_path, "unknown architecture")
    (bad / "model.safetensors").rename(bad / "pytorch_model.bin")
    with pytest.raises(ImportModelError, match="never pickled"):
        import_pretrained(bad, tmp_path / "ck")


def test_the_manifest_says_the_cache_has_fewer_heads(imported):
    manifest = edgegen.runtime.read_manifest(imported["llama-gqa"][4])
    layout = manifest.signature["layout"]
    assert (layout["n_heads"], layout["n_kv_heads"]) == (4, 2)
    past = next(io for io in manifest.signature["inputs"] if io["name"].startswith("past"))
    assert past["shape"][1] == 2
    assert np.prod([d for d in past["shape"] if isinstance(d, int)]) == 2 * 8

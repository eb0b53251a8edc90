"""One row of the peer table, in a process of its own, in the tool's own venv.

    PYTHON measure.py ROW.json FIGURES.json

row.json: {"tool", "model", "precision", "threads", "prompt_ids", "new_tokens",
"warmup", "repeat"}. Every tool is given the same prompt ids (no tokenizer of its own
in the loop) and decodes greedily for exactly `new_tokens` tokens, end of turn or not.
Each generation times two things with the same clock:

    prefill   the prompt in one call, up to the logits of the first new token
    decode    each later step: one token in, the next token's logits out

so a generation of N new tokens has one prefill and N - 1 decode steps. Only numpy
and the tool itself are imported here.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import numpy as np

clock = time.perf_counter


class Generation:
    """One greedy generation's timings and tokens."""

    def __init__(self) -> None:
        self.prefill_s = 0.0
        self.decode_s: list[float] = []
        self.tokens: list[int] = []


class LlamaCpp:
    """llama.cpp through llama-cpp-python's C API: llama_decode of the whole prompt,
    then of one token a step; greedy over the last row of logits."""

    def __init__(self, row: dict[str, Any]) -> None:
        import llama_cpp

        self.api = llama_cpp
        self.version = f"llama-cpp-python {llama_cpp.__version__}"
        context = len(row["prompt_ids"]) + row["new_tokens"]
        self.llm = llama_cpp.Llama(
            row["model"],
            n_ctx=context,
            n_batch=context,
            n_ubatch=context,
            n_threads=row["threads"],
            n_threads_batch=row["threads"],
            verbose=False,
        )
        self.ctx = self.llm.ctx
        self.n_vocab = self.llm.n_vocab()

    def generate(self, ids: list[int], new_tokens: int) -> Generation:
        api, ctx, g = self.api, self.ctx, Generation()
        api.llama_memory_clear(api.llama_get_memory(ctx), True)
        prompt = (api.llama_token * len(ids))(*ids)
        one = (api.llama_token * 1)()
        start = clock()
        self._decode(api.llama_batch_get_one(prompt, len(ids)))
        g.prefill_s = clock() - start
        g.tokens.append(self._argmax())
        while len(g.tokens) < new_tokens:
            one[0] = g.tokens[-1]
            start = clock()
            self._decode(api.llama_batch_get_one(one, 1))
            g.decode_s.append(clock() - start)
            g.tokens.append(self._argmax())
        return g

    def _decode(self, batch) -> None:
        status = self.api.llama_decode(self.ctx, batch)
        if status != 0:
            raise RuntimeError(f"llama_decode returned {status}")

    def _argmax(self) -> int:
        logits = self.api.llama_get_logits_ith(self.ctx, -1)
        return int(np.ctypeslib.as_array(logits, shape=(self.n_vocab,)).argmax())


class OrtGenAI:
    """onnxruntime-genai's Generator: append_tokens runs the prompt, and each
    generate_next_token picks a token from the logits it has, then runs the model on
    that token when asked for the next one."""

    def __init__(self, row: dict[str, Any]) -> None:
        import onnxruntime_genai as og

        self.og = og
        self.version = f"onnxruntime-genai {og.__version__}"
        config = og.Config(row["model"])
        options = {"intra_op_num_threads": row["threads"], "inter_op_num_threads": 1}
        config.overlay(json.dumps({"model": {"decoder": {"session_options": options}}}))
        self.model = og.Model(config)

    def generate(self, ids: list[int], new_tokens: int) -> Generation:
        og, g = self.og, Generation()
        params = og.GeneratorParams(self.model)
        params.set_search_options(
            do_sample=False, max_length=len(ids) + new_tokens, min_length=len(ids) + new_tokens
        )
        generator = og.Generator(self.model, params)
        start = clock()
        generator.append_tokens(np.asarray(ids, dtype=np.int32))
        generator.generate_next_token()  # picks the first token from the prompt's logits
        g.prefill_s = clock() - start
        g.tokens.append(int(generator.get_next_tokens()[0]))
        while len(g.tokens) < new_tokens:
            start = clock()
            generator.generate_next_token()
            g.decode_s.append(clock() - start)
            g.tokens.append(int(generator.get_next_tokens()[0]))
        return g


class TorchLoop:
    """A manual greedy loop with past_key_values over a transformers-style model, as
    `generate` runs it (only the last position's logits computed)."""

    def __init__(self, model, torch, **last: Any) -> None:
        import inspect

        self.model, self.torch, self.last = model, torch, last
        # transformers 5 renamed past_key_values to cache (the old name goes through a
        # deprecation wrapper on every call)
        forward = inspect.signature(model.forward).parameters
        self.cache = "cache" if "cache" in forward else "past_key_values"

    def generate(self, ids: list[int], new_tokens: int) -> Generation:
        torch, g = self.torch, Generation()
        with torch.inference_mode():
            tokens = torch.tensor([ids])
            mask = torch.ones_like(tokens)
            start = clock()
            out = self.model(input_ids=tokens, attention_mask=mask, use_cache=True, **self.last)
            g.prefill_s = clock() - start
            while True:
                g.tokens.append(int(out.logits[0, -1].argmax()))
                if len(g.tokens) == new_tokens:
                    return g
                mask = torch.ones((1, mask.shape[1] + 1), dtype=mask.dtype)
                step = torch.tensor([[g.tokens[-1]]])
                past = {self.cache: getattr(out, self.cache)}
                start = clock()
                out = self.model(
                    input_ids=step, attention_mask=mask, use_cache=True, **past, **self.last
                )
                g.decode_s.append(clock() - start)


class Transformers(TorchLoop):
    def __init__(self, row: dict[str, Any]) -> None:
        import torch
        import transformers
        from transformers import AutoModelForCausalLM

        self.version = f"transformers {transformers.__version__}, torch {torch.__version__}"
        torch.set_num_threads(row["threads"])
        model = AutoModelForCausalLM.from_pretrained(row["model"], dtype=torch.float32).eval()
        super().__init__(model, torch, logits_to_keep=1)


class Optimum(TorchLoop):
    def __init__(self, row: dict[str, Any]) -> None:
        from importlib.metadata import version

        import onnxruntime
        import torch
        from optimum.onnxruntime import ORTModelForCausalLM

        ort = onnxruntime.__version__
        self.version = f"optimum-onnx {version('optimum-onnx')} (onnxruntime {ort})"
        torch.set_num_threads(row["threads"])
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = row["threads"], 1
        model = ORTModelForCausalLM.from_pretrained(row["model"], session_options=options)
        super().__init__(model, torch)


class Edgegen:
    """edgegen's runtime (ONNX Runtime, no torch): the generation loop every edgegen
    backend goes through, which times its prefill and each decode step itself."""

    def __init__(self, row: dict[str, Any]) -> None:
        import onnxruntime

        import edgegen.runtime

        self.version = f"onnxruntime {onnxruntime.__version__} (edgegen)"
        self.generator = edgegen.runtime.load(
            row["model"], "onnx", row["precision"], "cpu", row["threads"]
        )

    def generate(self, ids: list[int], new_tokens: int) -> Generation:
        from edgegen.runtime.generator import Run

        params = {"temperature": 0, "max_new_tokens": new_tokens, "ignore_eos": True}
        run = Run(self.generator, [ids], params)
        for _ in run.steps():
            pass
        g = Generation()
        g.prefill_s, g.decode_s, g.tokens = run.prefill_s, run.decode_s, run.generated[0]
        return g


TOOLS = {
    "llama.cpp": LlamaCpp,
    "onnxruntime-genai": OrtGenAI,
    "transformers": Transformers,
    "optimum": Optimum,
    "edgegen": Edgegen,
}


def measure(row: dict[str, Any]) -> dict[str, Any]:
    start = clock()
    tool = TOOLS[row["tool"]](row)
    load_s = clock() - start
    ids, new_tokens = row["prompt_ids"], row["new_tokens"]
    for _ in range(row["warmup"]):
        tool.generate(ids, new_tokens)
    runs = [tool.generate(ids, new_tokens) for _ in range(row["repeat"])]
    for g in runs:
        if len(g.tokens) != new_tokens or len(g.decode_s) != new_tokens - 1:
            raise RuntimeError(f"{len(g.tokens)} tokens, {len(g.decode_s)} decode steps")
    return {
        "load_s": load_s,
        "runs": [{"prefill_s": g.prefill_s, "decode_s": g.decode_s} for g in runs],
        "tokens": runs[-1].tokens,
        "peak_rss_bytes": peak_rss_bytes(),
        "version": tool.version,
    }


def peak_rss_bytes() -> int:
    """VmHWM, as edgegen.bench.worker reads it: this file runs in the peers' venvs,
    which have no edgegen to import it from."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def main() -> None:
    with open(sys.argv[1], encoding="utf-8") as f:
        row = json.load(f)
    try:
        figures = measure(row)
    except Exception as e:  # the parent reports it as the row's one line
        lines = str(e).strip().splitlines() or [""]
        figures = {"error": f"{type(e).__name__}: {lines[0]}"}
    with open(sys.argv[2], "w", encoding="utf-8") as f:
        json.dump(figures, f)


if __name__ == "__main__":
    main()

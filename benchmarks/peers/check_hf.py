"""Hold the Hugging Face directory written by prepare.py against edgegen's reference:
transformers' chat template must give the same prompt ids, and its logits on the prompt
must match edgegen's eager model. Runs in the peers' transformers venv.

    python benchmarks/peers/check_hf.py HF_DIR REFERENCE_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

TOLERANCE = 2e-4  # largest |logit difference| allowed, logits being O(10)


def main() -> None:
    hf_dir, reference = Path(sys.argv[1]), Path(sys.argv[2])
    prompt = json.loads((reference / "prompt.json").read_text(encoding="utf-8"))
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    messages = [{"role": "user", "content": prompt["message"]}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if text != prompt["text"] or ids != prompt["ids"]:
        raise SystemExit(f"transformers renders the prompt differently:\n{text!r}\n{ids}")
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        logits = model(torch.tensor([ids])).logits[0].numpy()
    expected = np.load(reference / "logits.npy")
    diff = float(np.abs(logits - expected).max())
    print(f"transformers vs edgegen eager, {len(ids)} prompt tokens: max |logit diff| {diff:.2e}")
    if not diff <= TOLERANCE:
        raise SystemExit(f"the Hugging Face directory does not match edgegen (> {TOLERANCE})")


if __name__ == "__main__":
    main()

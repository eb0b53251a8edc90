"""A pretrained model (a Hugging Face directory or a GGUF file) -> an edgegen checkpoint.

The checkpoint is an ordinary one: export, quantize, verify, bench, generate and
sample never learn where it came from. It is written only after the model built
from it runs, so a model that cannot be mapped leaves nothing behind.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from edgegen.checkpoint import write_model_files
from edgegen.config import ModelConfig, RNNConfig
from edgegen.errors import EdgegenError, ImportModelError
from edgegen.files import write_atomically, write_json
from edgegen.importers.hf import gpt_config, gpt_tensors, read_hf_dir
from edgegen.importers.source import ForeignModel
from edgegen.models import GPT, build_model, count_parameters
from edgegen.output import claim_output
from edgegen.tokenizer import HFTokenizer

SOURCE_FILE = "source.json"  # where an imported checkpoint came from


@dataclass
class ImportResult:
    out: Path
    architecture: str  # the source's model_type (a module's class name)
    config: ModelConfig
    parameters: int

    def summary(self) -> str:
        c = self.config
        if isinstance(c, RNNConfig):
            cell = f"{c.cell} ({c.nonlinearity})" if c.cell == "rnn" else c.cell
            return (
                f"{self.out}: {self.architecture}, {self.parameters:,} parameters, "
                f"{c.n_layers} {cell} layers x {c.hidden_size}, vocabulary {c.vocab_size}"
            )
        heads = f"{c.n_heads} heads" + (f" ({c.kv_heads} KV)" if c.kv_heads != c.n_heads else "")
        return (
            f"{self.out}: {self.architecture}, {self.parameters:,} parameters, "
            f"{c.n_layers} layers x {c.dim}, {heads}, vocabulary {c.vocab_size}, "
            f"context {c.max_seq_len}"
        )


def import_pretrained(src: str | Path, out: str | Path, force: bool = False) -> ImportResult:
    """Import `src` (an HF model directory or a .gguf file) into the checkpoint `out`."""
    src, out = Path(src), Path(out)
    with claim_output(out, "checkpoint", inputs=[src], force=force):
        foreign = read_source(src)
        model, tokenizer = to_gpt(foreign)

        def fill(tmp: Path) -> None:
            write_json(tmp / SOURCE_FILE, describe_source(foreign))
            write_model_files(tmp, model, tokenizer)

        write_atomically(out, fill)
    arch = str(foreign.config.get("model_type"))
    return ImportResult(out, arch, model.config, count_parameters(model))


def read_source(src: Path) -> ForeignModel:
    if src.is_dir():
        return read_hf_dir(src)
    if src.suffix.lower() == ".gguf" or src.is_file():
        from edgegen.importers.gguf import read_gguf

        return read_gguf(src)
    raise ImportModelError(f"{src} not found: give a Hugging Face model directory or a .gguf file")


def to_gpt(foreign: ForeignModel) -> tuple[GPT, HFTokenizer]:
    """edgegen's GPT holding the foreign weights, and the model's tokenizer."""
    config = gpt_config(foreign)
    tensors = gpt_tensors(foreign, config)
    try:
        tokenizer = HFTokenizer.from_hf(
            foreign.tokenizer_json,
            foreign.tokenizer_config,
            foreign.generation_config,
            vocab_size=config.vocab_size,
        )
    except EdgegenError as e:
        raise ImportModelError(f"{foreign.source}: tokenizer: {e}") from None
    model = build_model(config)
    state = {name: torch.from_numpy(value) for name, value in tensors.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [n for n in missing if not (n == "head.weight" and config.tie_embeddings)]
    if missing or unexpected:  # a mapping bug, not the user's input
        raise ImportModelError(f"internal mapping error: missing {missing}, extra {unexpected}")
    return model.eval(), tokenizer


def describe_source(foreign: ForeignModel) -> dict[str, object]:
    return {
        "source": foreign.source,
        "model_type": foreign.config.get("model_type"),
        "architectures": foreign.config.get("architectures"),
    }

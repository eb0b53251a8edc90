"""The user's own nn.Module -> bundle: imported as a checkpoint (checked against its own
forward, see importers.module), then exported like any other checkpoint."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from torch import nn

from edgegen.export.writer import export_bundle
from edgegen.importers.module import import_module
from edgegen.output import claim_output
from edgegen.runtime.manifest import Manifest
from edgegen.tokenizer import Tokenizer


def from_module(
    module: nn.Module,
    tokenizer: Tokenizer | str | Path | list[str],
    out: str | Path,
    *,
    checkpoint: str | Path | None = None,
    force: bool = False,
    **export_options: Any,
) -> Manifest:
    """Export `module` (an RNN or nn.TransformerEncoder language model) to the bundle `out`.

    `tokenizer`: the words by id (a list, or a file with one word per line), a
    tokenizer.json, or a Tokenizer. `checkpoint`: where to keep the imported checkpoint
    too (else it is temporary). `export_options` are export_bundle's (formats, opset,
    max_seq_len, quantize, on_artifact). Raises ImportModelError when the module does
    not map, ExportError when an artifact fails its parity gate; then no bundle is
    written (a `checkpoint` named here is kept: it is the module, mapped and checked).
    """
    out = Path(out)
    with claim_output(out, "bundle", force=force), tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(checkpoint) if checkpoint is not None else Path(tmp) / "checkpoint"
        import_module(module, tokenizer, ckpt, force=force, inputs=(out,))
        return export_bundle(ckpt, out, force=force, **export_options)

"""Checkpoints and bundles are data: loading them never unpickles."""

import pickle
import re

import torch

import edgegen.runtime
from edgegen.checkpoint import load_checkpoint
from edgegen.train import TrainOptions, train


def test_loading_never_unpickles(trained_bundles, monkeypatch, tmp_path, text_file):
    def refuse(*args, **kwargs):
        raise AssertionError("something unpickled")

    for module, name in [(pickle, "load"), (pickle, "loads"), (torch, "load")]:
        monkeypatch.setattr(module, name, refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    ckpt, bundle = trained_bundles["lstm"]
    load_checkpoint(ckpt)
    edgegen.runtime.load(bundle).generate("a", max_new_tokens=4)
    options = TrainOptions(
        data=str(text_file),
        out=str(tmp_path / "c"),
        steps=2,
        batch_size=2,
        seq_len=16,
        overrides=dict(dim=32, n_layers=1, max_seq_len=64),
    )
    train(options, progress=False)
    options.steps = 3
    assert train(options, resume=True, progress=False).step == 3


def test_the_source_never_calls_an_unpickler():
    from pathlib import Path

    import edgegen

    root = Path(edgegen.__file__).parent
    for path in root.rglob("*.py"):
        text = path.read_text()
        for call in ("pickle.load", "np.load(", "numpy.load("):
            assert call not in text, f"{path.relative_to(root)} calls {call}"
        # a user's state dict may come as a .pt file: read with weights_only=True only
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, f"{path.relative_to(root)} calls {call}"

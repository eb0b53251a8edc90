import os

import pytest

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

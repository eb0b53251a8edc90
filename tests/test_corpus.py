import pytest

from edgegen.corpus import default_corpus, load_corpus
from edgegen.errors import CorpusError


def test_default_corpus_is_deterministic_prose(tmp_path):
    first = default_corpus()  # the session's cache
    second = default_corpus(cache_dir=tmp_path)  # extracted again, not read from a cache
    assert first == second
    assert default_corpus(cache_dir=tmp_path).fingerprint() == first.fingerprint()
    train_bytes, val_bytes = first.num_bytes()
    assert train_bytes > 800_000 and 20_000 < val_bytes < train_bytes / 5
    assert any("Return" in doc for doc in first.train)


def test_default_corpus_splits_by_module():
    corpus = default_corpus()
    assert len(set(corpus.val) - set(corpus.train)) > len(corpus.val) / 2


def test_text_file_splits_paragraphs(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("\n\n".join(f"paragraph {i}" for i in range(30)))
    corpus = load_corpus(path)
    assert len(corpus.train) == 27 and len(corpus.val) == 3
    assert corpus.val[0] == "paragraph 9"


def test_short_text_holds_out_its_tail(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("one single paragraph of text that is long enough to cut")
    corpus = load_corpus(path)
    assert corpus.train[0] + corpus.val[0] == path.read_text()


def test_folder_of_text_files(tmp_path):
    for i in range(3):
        (tmp_path / f"{i}.txt").write_text("\n\n".join(f"file {i} part {j}" for j in range(5)))
    (tmp_path / ".hidden").write_text("never read")
    corpus = load_corpus(tmp_path)
    docs = corpus.train + corpus.val
    assert len(docs) == 15 and not any("never" in d for d in docs)


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda p: p / "missing.txt", "does not exist"),
        (lambda p: _write(p / "empty.txt", b"  \n\n \n"), "no text found"),
        (lambda p: _write(p / "bin.dat", b"\x00\x01\x02"), "not text"),
        (lambda p: _write(p / "latin1.txt", "café".encode("latin-1")), "not UTF-8"),
        (lambda p: _mkdir(p / "empty"), "no files found"),
        (lambda p: _write(p / "x.txt", b"x"), "too little text"),
    ],
)
def test_bad_data(tmp_path, make, message):
    with pytest.raises(CorpusError, match=message):
        load_corpus(make(tmp_path))


def _write(path, data):
    path.write_bytes(data)
    return path


def _mkdir(path):
    path.mkdir()
    return path

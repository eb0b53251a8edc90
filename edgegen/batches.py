"""Training and validation batches as numpy arrays, each a pure function of the step.

Because batch `s` depends only on (seed, s), a resumed run sees exactly the
batches the uninterrupted run would have seen, with no sampler state to save.

- GPT: fixed windows of `seq_len + 1` tokens from one stream of documents.
- RNN: whole documents (cut into pieces of at most `max_piece` tokens), batched
  by similar length, fed in chunks of `bptt` tokens with the state carried
  between chunks (truncated BPTT); rows of different lengths are packed.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from edgegen.errors import CorpusError
from edgegen.tokenizer import Tokenizer


def tokenize_documents(docs: list[str], tokenizer: Tokenizer) -> list[np.ndarray]:
    """Each document as [BOS] tokens [EOS]: the model learns where documents start and end.
    BOS only where the tokenizer's prompts start with it, so training sees what prompts do."""
    return [
        np.array(tokenizer.encode(d, bos=tokenizer.add_bos, eos=True), dtype=np.int64) for d in docs
    ]


class WindowBatches:
    def __init__(self, docs: list[np.ndarray], seq_len: int, batch_size: int, seed: int) -> None:
        self.stream = np.concatenate(docs) if docs else np.zeros(0, dtype=np.int64)
        if len(self.stream) < seq_len + 1:
            raise CorpusError(
                f"training text has {len(self.stream)} tokens, fewer than one window of "
                f"{seq_len + 1}; use more text or a smaller --seq-len"
            )
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed

    def train_batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(inputs, targets), each [B, seq_len]."""
        rng = np.random.default_rng([self.seed, step])
        starts = rng.integers(0, len(self.stream) - self.seq_len, size=self.batch_size)
        windows = np.stack([self.stream[s : s + self.seq_len + 1] for s in starts])
        return windows[:, :-1], windows[:, 1:]


def eval_windows(
    docs: list[np.ndarray], seq_len: int, batch_size: int, max_tokens: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Consecutive non-overlapping windows from the start of the stream."""
    stream = np.concatenate(docs) if docs else np.zeros(0, dtype=np.int64)
    if len(stream) < 2:
        raise CorpusError("validation text is empty")
    length = min(seq_len, len(stream) - 1)
    starts = list(range(0, len(stream) - length, length))[: max(1, max_tokens // length)]
    for i in range(0, len(starts), batch_size):
        windows = np.stack([stream[s : s + length + 1] for s in starts[i : i + batch_size]])
        yield windows[:, :-1], windows[:, 1:]


@dataclass
class Chunk:
    inputs: np.ndarray  # [B, bptt], right-padded
    targets: np.ndarray  # [B, bptt], padding = -100 (ignored by the loss)
    lengths: np.ndarray  # [B] tokens per row, non-increasing; rows past the end have 0
    first: bool  # the first chunk of its documents: start from a zero state


class DocumentBatches:
    def __init__(
        self,
        docs: list[np.ndarray],
        bptt: int,
        batch_size: int,
        seed: int,
        max_piece: int = 1024,
        pad_id: int = 0,
    ) -> None:
        pieces = [p for d in docs for p in _pieces(d, max_piece)]
        if not pieces:
            raise CorpusError("no documents with at least two tokens to train on")
        # Longest first, so within a bucket the rows still running form a prefix.
        pieces.sort(key=len, reverse=True)
        self.buckets = [pieces[i : i + batch_size] for i in range(0, len(pieces), batch_size)]
        self.chunks_per_bucket = np.array(
            [math.ceil((len(b[0]) - 1) / bptt) for b in self.buckets], dtype=np.int64
        )
        self.bptt, self.seed, self.pad_id = bptt, seed, pad_id

    def chunk_at(self, bucket: int, index: int) -> Chunk:
        rows = self.buckets[bucket]
        start = index * self.bptt
        inputs = np.full((len(rows), self.bptt), self.pad_id, dtype=np.int64)
        targets = np.full((len(rows), self.bptt), -100, dtype=np.int64)
        lengths = np.zeros(len(rows), dtype=np.int64)
        for r, piece in enumerate(rows):
            x = piece[start : start + self.bptt]
            y = piece[start + 1 : start + self.bptt + 1]
            n = len(y)
            inputs[r, :n], targets[r, :n], lengths[r] = x[:n], y, n
        return Chunk(inputs, targets, lengths, first=index == 0)

    def train_chunk(self, step: int) -> Chunk:
        """Epochs visit every bucket once, in an order drawn from (seed, epoch)."""
        per_epoch = int(self.chunks_per_bucket.sum())
        epoch, offset = divmod(step, per_epoch)
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.buckets))
        ends = np.cumsum(self.chunks_per_bucket[order])
        i = int(np.searchsorted(ends, offset, side="right"))
        begin = int(ends[i - 1]) if i else 0
        return self.chunk_at(int(order[i]), offset - begin)

    def eval_chunks(self, max_tokens: int) -> Iterator[Chunk]:
        """Whole buckets in order until `max_tokens` targets have been served."""
        served = 0
        for bucket, n_chunks in enumerate(self.chunks_per_bucket):
            if served >= max_tokens:
                return
            for index in range(int(n_chunks)):
                chunk = self.chunk_at(bucket, index)
                served += int(chunk.lengths.sum())
                yield chunk


def _pieces(doc: np.ndarray, max_piece: int) -> list[np.ndarray]:
    """Consecutive pieces sharing one token, so every target is predicted once."""
    return [doc[s : s + max_piece + 1] for s in range(0, len(doc) - 1, max_piece)]

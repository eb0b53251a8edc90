"""Next-token sampling in numpy, the same code for every backend.

Parameters are named as Hugging Face `generate` names them. The sampler owns its
RNG, so the same seed gives the same tokens on every backend; temperature 0 (or
do_sample=False) means argmax. Order: penalties, EOS suppression (min_new_tokens),
temperature, top-k, top-p, min-p, then one uniform draw per row.

Ranges are bounded so that no step can overflow, even in float64 on float32
logits: a positive temperature is at least MIN_TEMPERATURE, repetition_penalty
lies in REPETITION_PENALTY_RANGE, presence and frequency penalties in
[-MAX_PENALTY, MAX_PENALTY] (OpenAI's range).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgegen.errors import SamplingError
from edgegen.tokenizer import lone_surrogate_at

MIN_TEMPERATURE = 1e-4  # below it, logits / temperature can overflow: use 0 for greedy
REPETITION_PENALTY_RANGE = (0.01, 100.0)
MAX_PENALTY = 2.0  # |presence_penalty|, |frequency_penalty|


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 128
    min_new_tokens: int = 0  # EOS is suppressed until this many tokens exist
    do_sample: bool | None = None  # None: sample unless temperature is 0
    temperature: float = 1.0
    top_k: int | None = None  # keep the k most likely tokens
    top_p: float | None = None  # keep the smallest set with this much probability
    min_p: float | None = None  # keep tokens with p >= min_p * p(most likely)
    repetition_penalty: float = 1.0  # HF: divide (or multiply, if negative) seen tokens' logits
    presence_penalty: float = 0.0  # subtract once from every generated token's logit
    frequency_penalty: float = 0.0  # subtract per occurrence among generated tokens
    stop: tuple[str, ...] = ()  # stop before any of these strings
    eos_token_id: int | tuple[int, ...] | None = None  # one id or several, as in HF
    ignore_eos: bool = False
    seed: int | None = None

    def __post_init__(self) -> None:
        _check(
            _is_int(self.max_new_tokens) and self.max_new_tokens >= 0,
            "max_new_tokens must be an integer >= 0",
        )
        _check(
            _is_int(self.min_new_tokens) and self.min_new_tokens >= 0,
            "min_new_tokens must be an integer >= 0",
        )
        _check(
            self.min_new_tokens <= self.max_new_tokens,
            f"min_new_tokens ({self.min_new_tokens}) exceeds max_new_tokens "
            f"({self.max_new_tokens})",
        )
        _check(_finite(self.temperature) and self.temperature >= 0, "temperature must be >= 0")
        _check(
            self.temperature == 0 or self.temperature >= MIN_TEMPERATURE,
            f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE:g}, "
            f"got {self.temperature:g}",
        )
        _check(
            self.top_k is None or (_is_int(self.top_k) and self.top_k >= 1),
            "top_k must be an integer >= 1",
        )
        _check(
            self.top_p is None or (_finite(self.top_p) and 0 < self.top_p <= 1),
            "top_p must be in (0, 1]",
        )
        _check(
            self.min_p is None or (_finite(self.min_p) and 0 <= self.min_p <= 1),
            "min_p must be in [0, 1]",
        )
        low, high = REPETITION_PENALTY_RANGE
        _check(
            _finite(self.repetition_penalty) and low <= self.repetition_penalty <= high,
            f"repetition_penalty must be in [{low:g}, {high:g}]",
        )
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check(
                _finite(value) and abs(value) <= MAX_PENALTY,
                f"{name} must be in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}]",
            )
        _check(self.do_sample in (None, True, False), "do_sample must be true or false")
        _check(
            self.seed is None or (_is_int(self.seed) and self.seed >= 0),
            "seed must be an integer >= 0",
        )
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        _check(all(isinstance(s, str) and s for s in stop), "stop must be non-empty strings")
        _check(
            all(lone_surrogate_at(s) is None for s in stop),
            "stop strings must be valid text (no lone surrogates)",
        )
        object.__setattr__(self, "stop", stop)
        object.__setattr__(self, "eos_token_id", _checked_eos(self.eos_token_id))

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """Every id that ends generation."""
        eos = self.eos_token_id
        return () if eos is None else eos if isinstance(eos, tuple) else (eos,)

    @property
    def penalized(self) -> bool:
        return bool(
            self.repetition_penalty != 1.0 or self.presence_penalty or self.frequency_penalty
        )

    @property
    def greedy(self) -> bool:
        return self.do_sample is False or self.temperature == 0

    @classmethod
    def build(cls, defaults: dict[str, Any], overrides: dict[str, Any]) -> SamplingParams:
        """Bundle defaults, then the caller's values; unknown names are an error."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise SamplingError(f"unknown sampling parameter(s): {', '.join(unknown)}")
        values = {k: v for k, v in defaults.items() if k in known}
        values.update({k: v for k, v in overrides.items() if v is not None or k == "seed"})
        try:
            return cls(**values)
        except TypeError as e:
            raise SamplingError(str(e)) from None


class Sampler:
    """Picks the next token of every row. Each row of a batch draws from its own
    random stream, `numpy.random.default_rng(seed)`: the same stream for every row,
    so row i of a batch gets the tokens its prompt gets alone with that seed (and
    equal prompts in one batch get equal texts). Without a seed each row's stream is
    seeded afresh from the OS."""

    def __init__(self, params: SamplingParams | None = None, **kwargs: Any) -> None:
        self.params = params or SamplingParams.build({}, kwargs)
        self.rngs: list[np.random.Generator] = []  # one per row, made when first seen

    def __call__(
        self,
        logits: np.ndarray,
        seen: Sequence[Sequence[int]] | None = None,
        generated: Sequence[Sequence[int]] | None = None,
    ) -> np.ndarray:
        """logits [B, V] -> token ids [B]. `seen`: prompt + generated ids per row (for
        the repetition penalty); `generated`: ids generated so far per row."""
        p = self.params
        logits = np.asarray(logits)
        _check(
            logits.ndim == 2 and logits.size > 0, "logits must be a non-empty [batch, vocab] array"
        )
        for rows in (seen, generated):
            _check(not rows or len(rows) == len(logits), "seen/generated need a list per row")
        suppress_eos = p.min_new_tokens > 0 and bool(p.eos_ids) and generated is not None
        if p.greedy and not p.penalized and not suppress_eos:  # the common path: no copy
            best = logits.argmax(axis=-1)  # a NaN, if any, is argmax's pick
            _check_finite(logits, [logits.item(b, i) for b, i in enumerate(best.tolist())])
            return best
        _check_finite(logits, logits.max(axis=-1))
        if p.penalized or suppress_eos:  # edited in place: a float64 copy
            logits = logits.astype(np.float64)
        for b in range(logits.shape[0]):
            if p.penalized and (seen is not None or generated is not None):
                apply_penalties(
                    logits[b], seen[b] if seen else (), generated[b] if generated else (), p
                )
            if suppress_eos and len(generated[b]) < p.min_new_tokens:
                logits[b, list(p.eos_ids)] = -np.inf
        if p.greedy:
            return logits.argmax(axis=-1)
        while len(self.rngs) < len(logits):
            self.rngs.append(np.random.default_rng(self.params.seed))
        out = np.empty(logits.shape[0], dtype=np.int64)
        for b, row in enumerate(logits):
            out[b] = self._draw(row, self.rngs[b])
        return out

    def _draw(self, row: np.ndarray, rng: np.random.Generator) -> int:
        """One token from a row of logits, as `logits_to_probs` filters them, on the few
        candidates that matter: a partial sort for top-k, then one sort of those, so
        top-p and min-p are prefixes of it. No array is larger than the row."""
        p = self.params
        ids = None
        if p.top_k is not None and p.top_k < row.shape[-1]:
            ids = top_k_ids(row, p.top_k)
            row = row[ids]
        row = row.astype(np.float64)  # a copy of only the candidates after a top-k
        order = np.argsort(row)[::-1]  # most likely first
        weights = np.exp((row[order] - row[order[0]]) / p.temperature)  # the best weighs 1
        cumulative = np.cumsum(weights)
        keep = len(weights)
        if p.top_p is not None and p.top_p < 1.0:
            keep = min(keep, int(np.searchsorted(cumulative, p.top_p * cumulative[-1])) + 1)
        if p.min_p:
            keep = min(keep, int(np.count_nonzero(weights >= p.min_p)))
        draw = rng.random() * cumulative[keep - 1]
        pick = order[min(int(np.searchsorted(cumulative, draw, side="right")), keep - 1)]
        return int(ids[pick]) if ids is not None else int(pick)


def top_k_ids(row: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest values of `row`, in no order; the same set a partial sort
    finds, at a fraction of its cost over a large vocabulary (SmolLM2's 49,152 logits:
    a partial sort alone took 470 us). The row is cut into at least 4k chunks; k of
    them hold a value at least as large as the k-th largest chunk maximum, so every
    value of the top k is at least that, and only those few are partially sorted."""
    n = row.shape[0]
    chunk = n // (4 * k)
    if chunk < 8:  # a small vocabulary: one partial sort is cheap
        return np.argpartition(row, -k)[-k:]
    maxima = row[: chunk * (n // chunk)].reshape(-1, chunk).max(axis=1)
    candidates = np.flatnonzero(row >= np.partition(maxima, -k)[-k])
    return candidates[np.argpartition(row[candidates], -k)[-k:]]


def _check_finite(logits: np.ndarray, maxima) -> None:
    """What the sampler relies on, from each row's maximum (NaN and +inf reach it, and
    so does a row with no finite value): the full checks run only when one fails. After
    a step has streamed the weights, caches are cold and each numpy call costs tens of
    microseconds: the common case makes as few as it can."""
    if not all(map(math.isfinite, maxima)):
        _check(not np.isnan(logits).any(), "logits contain NaN")
        _check(not np.isposinf(logits).any(), "logits contain +inf")
        _check(np.isfinite(logits).any(axis=-1).all(), "a row of logits has no finite value")


def _row_ids(ids, vocab: int) -> np.ndarray:
    ids = np.asarray(ids, dtype=np.int64)
    _check(
        ids.ndim == 1 and (ids.size == 0 or (ids.min() >= 0 and ids.max() < vocab)),
        f"token ids must lie in [0, {vocab})",
    )
    return ids


def apply_penalties(logits: np.ndarray, seen, generated, p: SamplingParams) -> None:
    """In place, on one row of logits."""
    if p.repetition_penalty != 1.0 and len(seen):
        ids = np.unique(_row_ids(seen, logits.shape[-1]))
        values = logits[ids]
        logits[ids] = np.where(
            values > 0, values / p.repetition_penalty, values * p.repetition_penalty
        )
    if (p.presence_penalty or p.frequency_penalty) and len(generated):
        ids, counts = np.unique(_row_ids(generated, logits.shape[-1]), return_counts=True)
        logits[ids] -= p.presence_penalty + p.frequency_penalty * counts


def logits_to_probs(
    logits: np.ndarray, temperature: float, top_k=None, top_p=None, min_p=None
) -> np.ndarray:
    """Probabilities after temperature, top-k, nucleus (top-p) and min-p filtering."""
    scaled = logits / temperature
    if top_k is not None and top_k < scaled.shape[-1]:
        kth = np.partition(scaled, -top_k)[-top_k]
        scaled = np.where(scaled < kth, -np.inf, scaled)
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    if top_p is not None and top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        cumulative = np.cumsum(probs[order])
        # keep the smallest prefix whose mass reaches top_p (always at least one token)
        drop = order[int(np.searchsorted(cumulative, top_p)) + 1 :]
        probs[drop] = 0.0
    if min_p:
        probs[probs < min_p * probs.max()] = 0.0
    return probs / probs.sum()


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise SamplingError(message)


def _is_int(value: Any) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _checked_eos(value: Any) -> int | tuple[int, ...] | None:
    """eos_token_id as given, several ids as a tuple (the params are frozen)."""
    value = tuple(value) if isinstance(value, list | tuple) else value
    ids = value if isinstance(value, tuple) else () if value is None else (value,)
    _check(
        all(_is_int(i) and i >= 0 for i in ids), "eos_token_id must be a token id or a list of them"
    )
    return value


def _finite(value: Any) -> bool:
    return (
        isinstance(value, int | float | np.floating)
        and not isinstance(value, bool)
        and bool(np.isfinite(value))
    )

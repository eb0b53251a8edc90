"""Next-token sampling in numpy. The sampler owns its RNG, so a seed reproduces a run
on every backend; temperature 0 means argmax."""

from __future__ import annotations

import numpy as np

from edgegen.errors import SamplingError


class Sampler:
    def __init__(
        self,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
    ) -> None:
        if not np.isfinite(temperature) or temperature < 0:
            raise SamplingError(f"temperature must be >= 0, got {temperature}")
        if top_k is not None and top_k < 1:
            raise SamplingError(f"top_k must be >= 1, got {top_k}")
        if top_p is not None and not 0.0 < top_p <= 1.0:
            raise SamplingError(f"top_p must be in (0, 1], got {top_p}")
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.rng = np.random.default_rng(seed)

    def __call__(self, logits: np.ndarray) -> np.ndarray:
        """logits [B, V] -> token ids [B]."""
        logits = np.asarray(logits, dtype=np.float64)
        if self.temperature == 0:
            return logits.argmax(axis=-1)
        return np.array([self._sample_row(row) for row in logits], dtype=np.int64)

    def _sample_row(self, logits: np.ndarray) -> int:
        probs = logits_to_probs(logits, self.temperature, self.top_k, self.top_p)
        return int(self.rng.choice(probs.shape[0], p=probs))


def logits_to_probs(logits: np.ndarray, temperature: float, top_k=None, top_p=None) -> np.ndarray:
    """Probabilities after temperature, then top-k, then nucleus (top-p) filtering."""
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
        keep = order[: int(np.searchsorted(cumulative, top_p)) + 1]
        filtered = np.zeros_like(probs)
        filtered[keep] = probs[keep]
        probs = filtered / filtered.sum()
    return probs

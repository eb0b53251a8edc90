import numpy as np
import pytest

from edgegen.errors import SamplingError
from edgegen.runtime import Sampler, generate_ids
from edgegen.runtime.sampler import logits_to_probs

LOGITS = np.array([[0.0, 3.0, 1.0, 2.5, -1.0]])


def test_temperature_zero_is_argmax():
    assert Sampler(temperature=0)(LOGITS).tolist() == [1]


def test_top_k_one_is_argmax():
    sampler = Sampler(temperature=1.5, top_k=1, seed=3)
    assert all(sampler(LOGITS)[0] == 1 for _ in range(50))


def test_top_k_keeps_only_the_k_best():
    probs = logits_to_probs(LOGITS[0], 1.0, top_k=2)
    assert set(np.flatnonzero(probs)) == {1, 3}
    assert probs.sum() == pytest.approx(1.0)


def test_top_p_keeps_the_smallest_nucleus():
    probs = logits_to_probs(np.log(np.array([0.5, 0.3, 0.15, 0.05])), 1.0, top_p=0.75)
    assert set(np.flatnonzero(probs)) == {0, 1}
    assert probs[0] == pytest.approx(0.5 / 0.8)


def test_same_seed_same_tokens():
    logits = np.random.default_rng(0).normal(size=(1, 259))
    runs = [[int(s(logits)[0]) for _ in range(40)] for s in (Sampler(seed=7), Sampler(seed=7))]
    assert runs[0] == runs[1]
    assert [int(Sampler(seed=8)(logits)[0]) for _ in range(40)] != runs[0]


def test_sampling_follows_the_distribution():
    sampler = Sampler(temperature=1.0, seed=0)
    draws = np.array([sampler(np.log([[0.7, 0.2, 0.1]]))[0] for _ in range(4000)])
    assert np.bincount(draws, minlength=3) / 4000 == pytest.approx([0.7, 0.2, 0.1], abs=0.03)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(temperature=-1), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_k=0), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
    ],
)
def test_invalid_values(kwargs, message):
    with pytest.raises(SamplingError, match=message):
        Sampler(**kwargs)


class CountingBackend:
    """Predicts (last token + 1) mod 5; records the calls it gets."""

    def __init__(self):
        self.calls = []

    def _logits(self, token):
        logits = np.zeros((1, 5))
        logits[0, (token + 1) % 5] = 10
        return logits

    def prefill(self, input_ids):
        self.calls.append(("prefill", input_ids.tolist()))
        return self._logits(input_ids[0, -1])

    def decode_one_token(self, token_ids):
        self.calls.append(("decode", token_ids.tolist()))
        return self._logits(token_ids[0])


def test_loop_prefills_once_then_decodes_each_token():
    backend = CountingBackend()
    out = generate_ids(backend, [0, 1], Sampler(temperature=0), max_new_tokens=3)
    assert out == [2, 3, 4]
    assert backend.calls == [("prefill", [[0, 1]]), ("decode", [2]), ("decode", [3])]


def test_loop_stops_at_eos():
    out = generate_ids(CountingBackend(), [0], Sampler(temperature=0), 10, eos_id=3)
    assert out == [1, 2]

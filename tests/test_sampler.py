import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgegen.errors import SamplingError
from edgegen.runtime import Sampler
from edgegen.runtime.sampler import SamplingParams, apply_penalties, logits_to_probs, top_k_ids

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
    "kwargs",
    [
        dict(temperature=0.7, top_k=5),
        dict(temperature=1.3, top_p=0.8),
        dict(temperature=1.0, top_k=6, top_p=0.9, min_p=0.05),
        dict(temperature=0.9, min_p=0.2),
    ],
)
def test_drawn_tokens_follow_the_filtered_distribution(kwargs):
    """The sampler's candidate-only draw and `logits_to_probs` describe one distribution."""
    logits = np.random.default_rng(1).normal(size=(1, 12)) * 2
    want = logits_to_probs(
        logits[0],
        kwargs["temperature"],
        kwargs.get("top_k"),
        kwargs.get("top_p"),
        kwargs.get("min_p"),
    )
    sampler = Sampler(seed=0, **kwargs)
    n = 6000
    draws = np.array([sampler(logits)[0] for _ in range(n)])
    got = np.bincount(draws, minlength=12) / n
    assert set(np.flatnonzero(got)) <= set(np.flatnonzero(want))
    assert got == pytest.approx(want, abs=0.025)


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


# --- properties -------------------------------------------------------------------

logit_rows = st.lists(st.floats(-20, 20), min_size=2, max_size=40).map(np.array)


@given(
    logit_rows,
    st.floats(0.05, 5),
    st.one_of(st.none(), st.integers(1, 50)),
    st.one_of(st.none(), st.floats(0.01, 1.0)),
    st.one_of(st.none(), st.floats(0, 1)),
)
def test_probabilities_stay_a_distribution(logits, temperature, top_k, top_p, min_p):
    probs = logits_to_probs(logits, temperature, top_k, top_p, min_p)
    assert np.all(probs >= 0) and probs.sum() == pytest.approx(1.0)
    best = np.argmax(logits_to_probs(logits, temperature))
    assert probs[best] > 0  # the most likely token always survives


@given(
    st.lists(st.floats(-20, 20), min_size=2, max_size=40, unique=True).map(np.array),
    st.integers(1, 40),
)
def test_top_k_keeps_exactly_k(logits, k):
    kept = set(np.flatnonzero(logits_to_probs(logits, 1.0, top_k=k)))
    assert kept == set(np.argsort(-logits)[: min(k, len(logits))].tolist())


@given(
    st.lists(st.floats(-10, 10), min_size=2, max_size=30, unique=True).map(np.array),
    st.floats(0.05, 0.99),
)
def test_top_p_keeps_the_smallest_prefix_reaching_p(logits, top_p):
    full = logits_to_probs(logits, 1.0)
    kept = np.flatnonzero(logits_to_probs(logits, 1.0, top_p=top_p))
    order = np.argsort(-full, kind="stable")
    assert set(kept) == set(order[: len(kept)].tolist())  # a prefix by probability
    assert full[kept].sum() >= top_p - 1e-9 or len(kept) == len(logits)
    assert len(kept) == 1 or full[order[: len(kept) - 1]].sum() < top_p + 1e-9  # nothing spare


@given(logit_rows, st.floats(0.0, 1.0))
def test_min_p_keeps_tokens_near_the_best(logits, min_p):
    full = logits_to_probs(logits, 1.0)
    kept = set(np.flatnonzero(logits_to_probs(logits, 1.0, min_p=min_p)))
    assert kept == set(np.flatnonzero(full >= min_p * full.max()))


@given(st.lists(st.floats(-20, 20), min_size=2, max_size=40).map(lambda v: np.array([v])))
def test_greedy_equals_temperature_zero(logits):
    a = Sampler(temperature=0)(logits)
    b = Sampler(do_sample=False, temperature=1.5)(logits)
    assert a.tolist() == b.tolist() == [int(np.argmax(logits))]


def test_repetition_penalty_pushes_seen_tokens_down():
    logits = np.array([[2.0, -2.0, 1.0, 0.5]])
    params = SamplingParams(repetition_penalty=2.0)
    row = logits[0].copy()
    apply_penalties(row, [0, 1], [], params)
    assert row.tolist() == [1.0, -4.0, 1.0, 0.5]  # positive halved, negative doubled, unseen kept
    assert Sampler(temperature=0, repetition_penalty=3.0)(logits, seen=[[0]]).tolist() == [2]


def test_presence_and_frequency_penalties():
    row = np.zeros(4)
    apply_penalties(
        row, [], [1, 1, 1, 2], SamplingParams(presence_penalty=0.5, frequency_penalty=1.0)
    )
    assert row.tolist() == [0.0, -3.5, -1.5, 0.0]


def test_min_new_tokens_suppresses_eos():
    logits = np.array([[0.0, 10.0]])
    sampler = Sampler(temperature=0, eos_token_id=1, min_new_tokens=2)
    assert sampler(logits, generated=[[0]]).tolist() == [0]
    assert sampler(logits, generated=[[0, 0]]).tolist() == [1]


def test_several_eos_ids_are_all_suppressed():
    logits = np.array([[0.0, 10.0, 9.0, 1.0]])
    sampler = Sampler(temperature=0, eos_token_id=[1, 2], min_new_tokens=1)
    assert sampler.params.eos_ids == (1, 2)
    assert sampler(logits, generated=[[]]).tolist() == [3]
    assert sampler(logits, generated=[[3]]).tolist() == [1]
    with pytest.raises(SamplingError, match="eos_token_id must be a token id or a list"):
        Sampler(eos_token_id=[1, -2])


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(min_p=1.5), "min_p"),
        (dict(repetition_penalty=0), "repetition_penalty"),
        (dict(max_new_tokens=-1), "max_new_tokens"),
        (dict(top_k=2.5), "top_k"),
        (dict(stop=[""]), "stop"),
        (dict(colour=1), "unknown sampling parameter"),
        (dict(seed=-1), "seed must be an integer >= 0"),
        (dict(temperature=5e-324), "temperature must be 0 .greedy. or at least 0.0001"),
        (dict(temperature=9e-5), "temperature must be 0 .greedy. or at least 0.0001"),
        (dict(repetition_penalty=1e-308), r"repetition_penalty must be in \[0.01, 100\]"),
        (dict(repetition_penalty=101), "repetition_penalty must be in"),
        (dict(frequency_penalty=-1e308), r"frequency_penalty must be in \[-2, 2\]"),
        (dict(presence_penalty=2.5), r"presence_penalty must be in \[-2, 2\]"),
        (dict(min_new_tokens=10, max_new_tokens=3), r"min_new_tokens \(10\) exceeds"),
        (dict(stop=["a", "\ud800"]), "stop strings must be valid text"),
    ],
)
def test_more_invalid_values(kwargs, message):
    with pytest.raises(SamplingError, match=message):
        Sampler(**kwargs)


@pytest.mark.parametrize("penalty", [0.01, 100.0])
@pytest.mark.parametrize("sign", [-1.0, 1.0])
def test_the_widest_allowed_values_cannot_overflow(penalty, sign):
    """At the edges of every range, on the largest float32 logits, no step warns."""
    big = np.finfo(np.float32).max
    logits = np.array([[big, -big, 0.0, big / 2, -big / 3]], dtype=np.float32)
    sampler = Sampler(
        temperature=1e-4,
        top_p=0.9,
        repetition_penalty=penalty,
        presence_penalty=2.0 * sign,
        frequency_penalty=2.0 * sign,
        seed=0,
    )
    with np.errstate(over="raise", invalid="raise", divide="raise"):  # underflow is harmless
        for _ in range(3):
            token = sampler(logits, seen=[[0, 1, 2, 3, 4]], generated=[[0, 1, 1, 3]])
            assert 0 <= token[0] < 5


def test_every_row_draws_from_its_own_stream_of_the_seed():
    logits = np.random.default_rng(0).normal(size=(1, 259))
    alone = Sampler(seed=7)
    batch = Sampler(seed=7)
    rows = np.repeat(logits, 3, axis=0)
    for _ in range(20):
        assert batch(rows).tolist() == [int(alone(logits)[0])] * 3


@pytest.mark.parametrize("vocab,k", [(49152, 40), (49152, 1), (5000, 50), (259, 40), (100, 99)])
def test_top_k_ids_finds_the_values_a_partial_sort_finds(vocab, k):
    """Over many rows, with ties and -inf among them: the same k values as argpartition."""
    rng = np.random.default_rng(vocab + k)
    for trial in range(50):
        row = rng.standard_normal(vocab)
        if trial % 3 == 0:
            row = np.round(row, 1)  # many ties, also at the k-th value
        if trial % 5 == 0:
            row[rng.random(vocab) < 0.9] = -np.inf
        ids = top_k_ids(row, k)
        assert len(ids) == len(set(ids.tolist())) == k
        want = np.sort(row[np.argpartition(row, -k)[-k:]])
        np.testing.assert_array_equal(np.sort(row[ids]), want)


@pytest.mark.parametrize(
    "sampling", [dict(temperature=0), dict(temperature=0.8, top_k=5, top_p=0.9, seed=0)]
)
@pytest.mark.parametrize(
    "bad,message",
    [
        ({1: np.nan}, "NaN"),
        ({1: np.nan, 7: np.inf}, "NaN"),
        ({7: np.inf}, r"\+inf"),
        ({"row": -np.inf}, "no finite value"),
    ],
)
def test_non_finite_logits_are_refused_on_every_path(sampling, bad, message):
    """NaN and +inf anywhere, or a row with no finite value, whether the row's maximum is
    read from argmax's pick (greedy) or from the row (sampling)."""
    logits = np.random.default_rng(0).standard_normal((2, 64)).astype(np.float32)
    for at, value in bad.items():
        if at == "row":
            logits[1] = value
        else:
            logits[1, at] = value
    with pytest.raises(SamplingError, match=message):
        Sampler(**sampling)(logits)
    logits[1, :3] = [-np.inf, 2.0, -np.inf]
    logits[1, 3:] = 0.0  # -inf among finite values is fine
    assert Sampler(**sampling)(logits).shape == (2,)

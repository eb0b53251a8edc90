import pytest
import torch

from edgegen.config import FAMILIES, POS_ENCODINGS, RNN_CELLS, preset
from edgegen.models import GPT, RNNLM, build_model, count_parameters
from tests.conftest import parametrized

TOL = 1e-5
GPT_VARIANTS = [
    dict(pos_encoding=p, tie_embeddings=t) for p in POS_ENCODINGS for t in (True, False)
]


def tiny(family, **overrides):
    torch.manual_seed(0)
    base = dict(dim=32, n_heads=4) if family == "gpt" else dict(dim=32, hidden_size=48)
    return build_model(preset(family, "tiny", **{**base, **overrides})).eval()


def test_every_family_and_cell_is_tested():
    """From the tests below: their names' family, their parametrized cells and variants."""
    tests = {name: test for name, test in globals().items() if name.startswith("test_")}
    assert {name.split("_")[1] for name in tests} >= set(FAMILIES)
    for name, test in tests.items():
        if name.startswith("test_rnn_") and name != "test_rnn_tied_head":
            assert set(parametrized(test, "cell")) == set(RNN_CELLS), name
    variants = parametrized(test_gpt_cached_decode_equals_full_forward, "variant")
    assert {v["pos_encoding"] for v in variants} == set(POS_ENCODINGS)


# --- GPT ------------------------------------------------------------------------


@pytest.mark.parametrize("variant", GPT_VARIANTS, ids=str)
@pytest.mark.parametrize("batch,prompt_len", [(1, 1), (1, 9), (3, 4), (2, 17)])
def test_gpt_cached_decode_equals_full_forward(variant, batch, prompt_len):
    model = tiny("gpt", **variant)
    ids = torch.randint(0, 256, (batch, prompt_len + 12))
    full = model(ids)[0]
    logits, *cache = model(ids[:, :prompt_len])  # prefill
    steps = [logits]
    for t in range(prompt_len, ids.shape[1]):  # decode one token at a time
        logits, *cache = model(ids[:, t : t + 1], *cache)
        steps.append(logits)
    assert (torch.cat(steps, dim=1) - full).abs().max() <= TOL
    assert cache[0].shape == (batch, 4, ids.shape[1], 8)


@pytest.mark.parametrize("variant", GPT_VARIANTS, ids=str)
def test_gpt_chunked_prefill_equals_full_forward(variant):
    model = tiny("gpt", **variant)
    ids = torch.randint(0, 256, (2, 20))
    logits_a, *cache = model(ids[:, :7])
    logits_b, *cache = model(ids[:, 7:], *cache)  # T > 1 with a non-empty cache
    assert (torch.cat([logits_a, logits_b], 1) - model(ids)[0]).abs().max() <= TOL


@pytest.mark.parametrize("variant", GPT_VARIANTS, ids=str)
def test_gpt_left_padded_batch_matches_each_prompt_alone(variant):
    model = tiny("gpt", **variant)
    prompts = [torch.randint(0, 256, (n,)) for n in (3, 8, 5)]
    width, new_tokens = 8, 6
    ids = torch.full((3, width), 258)
    mask = torch.zeros(3, width, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :], mask[row, width - len(p) :] = p, 1
    logits, *cache = model(ids, attention_mask=mask)
    continuation = torch.randint(0, 256, (3, new_tokens))
    batched = [logits[:, -1]]
    for t in range(new_tokens):
        mask = torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], dim=1)
        logits, *cache = model(continuation[:, t : t + 1], *cache, attention_mask=mask)
        batched.append(logits[:, -1])
    for row, p in enumerate(prompts):
        alone = model(torch.cat([p, continuation[row]])[None])[0][0, len(p) - 1 :]
        got = torch.stack([b[row] for b in batched])
        assert (got - alone).abs().max() <= TOL, f"row {row}"


def test_gpt_explicit_positions_match_defaults():
    model = tiny("gpt", pos_encoding="rope")
    ids = torch.randint(0, 256, (2, 6))
    positions = torch.arange(6).expand(2, 6)
    assert torch.equal(model(ids)[0], model(ids, position_ids=positions)[0])


def test_gpt_state_contract():
    model = tiny("gpt")
    state = model.init_state(3)
    assert len(state) == len(model.state_names) == 2 * model.config.n_layers
    assert all(s.shape == (3, 4, 0, 8) for s in state)
    assert model.state_names[:2] == ("0.key", "0.value")


def test_gpt_tied_head_shares_the_embedding():
    tied, untied = tiny("gpt", tie_embeddings=True), tiny("gpt", tie_embeddings=False)
    assert tied.head.weight is tied.tok_emb.weight
    assert count_parameters(untied) - count_parameters(tied) == 259 * 32


# --- RNN ------------------------------------------------------------------------


@pytest.mark.parametrize("cell", RNN_CELLS)
def test_rnn_stepwise_equals_sequence(cell):
    model = tiny("rnn", cell=cell)
    ids = torch.randint(0, 256, (3, 15))
    full, *full_state = model(ids)
    state = model.init_state(3)
    steps = []
    for t in range(ids.shape[1]):
        logits, *state = model(ids[:, t : t + 1], *state)
        steps.append(logits)
    assert (torch.cat(steps, 1) - full).abs().max() <= TOL
    for a, b in zip(state, full_state, strict=True):
        assert (a - b).abs().max() <= TOL


@pytest.mark.parametrize("cell", RNN_CELLS)
def test_rnn_state_contract(cell):
    model = tiny("rnn", cell=cell)
    state = model.init_state(2)
    assert len(state) == (2 if cell == "lstm" else 1) == len(model.state_names)
    assert all(s.shape == (2, 2, 48) for s in state)
    logits, *new_state = model(torch.randint(0, 256, (2, 5)), *state)
    assert logits.shape == (2, 5, 259) and len(new_state) == len(state)


@pytest.mark.parametrize("cell", RNN_CELLS)
def test_rnn_packed_batch_matches_each_row_alone(cell):
    model = tiny("rnn", cell=cell)
    lengths = torch.tensor([4, 11, 7])
    ids = torch.full((3, 11), 258)
    rows = [torch.randint(0, 256, (int(n),)) for n in lengths]
    for r, row in enumerate(rows):
        ids[r, : len(row)] = row
    logits, *state = model.forward_packed(ids, lengths)
    for r, row in enumerate(rows):
        alone, *alone_state = model(row[None])
        assert (logits[r, : len(row)] - alone[0]).abs().max() <= TOL
        for s, a in zip(state, alone_state, strict=True):
            assert (s[:, r] - a[:, 0]).abs().max() <= TOL  # the state stops at the row's end


def test_rnn_tied_head():
    model = tiny("rnn", hidden_size=32, tie_embeddings=True)
    assert model.head.weight is model.embed.weight


def test_build_model_dispatches_on_config():
    assert isinstance(tiny("gpt"), GPT) and isinstance(tiny("rnn"), RNNLM)
    with pytest.raises(TypeError):
        build_model({"family": "gpt"})

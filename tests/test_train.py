import json
import math

import pytest
import torch
from safetensors import safe_open

from edgegen.checkpoint import load_checkpoint
from edgegen.errors import CheckpointError, ConfigError, CorpusError, OutputError
from edgegen.train import TrainOptions, lr_at, train

FAMILIES = [("gpt", "gru"), ("rnn", "gru"), ("rnn", "lstm"), ("rnn", "rnn")]


def options(tmp_path, text_file, family="gpt", cell="gru", **kw):
    base = dict(
        family=family,
        cell=cell,
        data=str(text_file),
        out=str(tmp_path / f"{family}-{cell}"),
        steps=30,
        batch_size=8,
        seq_len=32,
        bptt=16,
        lr=1e-2,
        eval_interval=10,
        eval_tokens=2048,
        overrides=dict(dim=32, n_heads=4) if family == "gpt" else dict(dim=32, hidden_size=48),
    )
    return TrainOptions(**{**base, **kw})


@pytest.mark.parametrize("family,cell", FAMILIES)
def test_training_lowers_the_loss(tmp_path, text_file, family, cell):
    result = train(options(tmp_path, text_file, family, cell, steps=40), progress=False)
    val = [v["bpb"] for v in result.log["val"]]
    assert [v["step"] for v in result.log["val"]] == [0, 10, 20, 30, 40]
    assert val[-1] < 0.6 * val[0], val
    train_losses = [t["loss"] for t in result.log["train"]]
    assert sum(train_losses[-5:]) < 0.8 * sum(train_losses[:5])


@pytest.mark.parametrize("family,cell", FAMILIES[:2])
def test_checkpoint_is_complete_and_loads(tmp_path, text_file, family, cell):
    opts = options(tmp_path, text_file, family, cell, steps=5)
    train(opts, progress=False)
    names = {p.name for p in (tmp_path / f"{family}-{cell}").iterdir()}
    assert names == {
        "checkpoint.json",
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "train_state.json",
        "train_state.safetensors",
        "train_log.json",
    }
    model, tokenizer = load_checkpoint(opts.out)
    assert not model.training and tokenizer.vocab_size == model.config.vocab_size
    log = json.loads((tmp_path / f"{family}-{cell}" / "train_log.json").read_text())
    assert [v["step"] for v in log["val"]] == [0, 5]


@pytest.mark.parametrize("family,cell", FAMILIES[:3])
def test_interrupted_run_resumes_exactly(tmp_path, text_file, family, cell):
    whole = train(options(tmp_path / "a", text_file, family, cell, steps=12), progress=False)

    def stop_at_5(step, loss):
        return step == 5

    opts = options(tmp_path / "b", text_file, family, cell, steps=12)
    first = train(opts, progress=False, on_step=stop_at_5)
    assert first.interrupted and first.step == 5
    resumed = train(opts, resume=True, progress=False)
    assert resumed.step == 12 and not resumed.interrupted
    assert [t["loss"] for t in resumed.log["train"]] == [t["loss"] for t in whole.log["train"]]
    a, _ = load_checkpoint(whole.out)
    b, _ = load_checkpoint(resumed.out)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(p, q), name


def test_resume_extends_a_finished_run(tmp_path, text_file):
    opts = options(tmp_path, text_file, steps=5)
    train(opts, progress=False)
    opts.steps = 8
    result = train(opts, resume=True, progress=False)
    assert result.step == 8 and len(result.log["train"]) == 8


def test_same_seed_same_curve(tmp_path, text_file):
    a = train(options(tmp_path / "a", text_file, steps=8), progress=False)
    b = train(options(tmp_path / "b", text_file, steps=8), progress=False)
    c = train(options(tmp_path / "c", text_file, steps=8, seed=1), progress=False)
    assert [t["loss"] for t in a.log["train"]] == [t["loss"] for t in b.log["train"]]
    assert [t["loss"] for t in a.log["train"]] != [t["loss"] for t in c.log["train"]]


def test_existing_checkpoint_is_not_overwritten(tmp_path, text_file):
    opts = options(tmp_path, text_file, steps=3)
    train(opts, progress=False)
    before = (tmp_path / "gpt-gru" / "model.safetensors").read_bytes()
    with pytest.raises(OutputError, match="already exists"):
        train(opts, progress=False)
    assert (tmp_path / "gpt-gru" / "model.safetensors").read_bytes() == before
    train(opts, progress=False, force=True)


def test_resume_without_checkpoint(tmp_path, text_file):
    with pytest.raises(CheckpointError, match="nothing to resume"):
        train(options(tmp_path, text_file), resume=True)


def test_resume_refuses_changed_data(tmp_path, text_file):
    opts = options(tmp_path, text_file, steps=3)
    train(opts, progress=False)
    text_file.write_text(text_file.read_text() + "\n\nsomething new")
    with pytest.raises(CheckpointError, match="training text changed"):
        train(opts, resume=True)


def test_optimizer_state_is_saved(tmp_path, text_file):
    opts = options(tmp_path, text_file, steps=3)
    train(opts, progress=False)
    with safe_open(str(tmp_path / "gpt-gru" / "train_state.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "rng.cpu" in keys and any(k.endswith("exp_avg_sq") for k in keys)


@pytest.mark.parametrize(
    "change,error,message",
    [
        (dict(steps=0), ConfigError, "steps must be positive"),
        (dict(batch_size=-1), ConfigError, "batch_size must be positive"),
        (dict(preset="huge"), ConfigError, "unknown preset"),
        (dict(overrides={"dim": 0}), ConfigError, "dim must be positive"),
        (dict(seq_len=4096), ConfigError, "exceeds max_seq_len"),
        (dict(data="/nonexistent/text"), CorpusError, "does not exist"),
    ],
)
def test_bad_options(tmp_path, text_file, change, error, message):
    with pytest.raises(error, match=message):
        train(options(tmp_path, text_file, **change), progress=False)
    assert not (tmp_path / "gpt-gru").exists()


def test_schedule_warms_up_then_decays():
    opts = TrainOptions(steps=1000, lr=1.0, min_lr_ratio=0.1)
    assert lr_at(0, opts) == pytest.approx(0.01)
    assert lr_at(99, opts) == pytest.approx(1.0)
    assert lr_at(1000, opts) == pytest.approx(0.1)
    assert all(lr_at(s, opts) >= lr_at(s + 1, opts) for s in range(100, 1000))
    assert math.isclose(lr_at(550, opts), 0.55)


@pytest.mark.gpu
def test_cuda_training_step(tmp_path, text_file):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    result = train(options(tmp_path, text_file, steps=10, device="cuda"), progress=False)
    assert result.log["val"][-1]["bpb"] < result.log["val"][0]["bpb"]

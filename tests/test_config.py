import json

import pytest

from edgegen.config import (
    PRESETS,
    RNN_CELLS,
    GPTConfig,
    RNNConfig,
    config_from_dict,
    config_to_dict,
    load_config,
    parse_override,
    preset,
    save_config,
)
from edgegen.errors import ConfigError

ALL_PRESETS = [("gpt", None, name) for name in PRESETS["gpt"]] + [
    ("rnn", cell, name) for cell in RNN_CELLS for name in PRESETS["rnn"]
]


@pytest.mark.parametrize("family,cell,name", ALL_PRESETS)
def test_json_round_trip(tmp_path, family, cell, name):
    config = preset(family, name, **({"cell": cell} if cell else {}))
    save_config(config, tmp_path / "config.json")
    assert load_config(tmp_path / "config.json") == config
    assert config_from_dict(json.loads(json.dumps(config_to_dict(config)))) == config


def test_derived_fields_are_not_saved():
    data = config_to_dict(GPTConfig(dim=96, n_heads=3))
    assert "head_dim" not in data
    assert config_from_dict(data).head_dim == 32


@pytest.mark.parametrize("family,cell,name", ALL_PRESETS)
def test_preset_sizes(family, cell, name):
    torch = pytest.importorskip("torch")
    from edgegen.models import build_model, count_parameters

    with torch.device("meta"):  # sizes without allocating the base models
        model = build_model(preset(family, name, **({"cell": cell} if cell else {})))
    n = count_parameters(model)
    low, high = {"tiny": (10_000, 1_000_000), "small": (2.5e6, 3.5e6), "base": (25e6, 35e6)}[name]
    assert low <= n <= high, f"{family} {cell} {name}: {n:,} parameters"


def test_base_gpt_context_is_long_enough_for_the_benchmarks():
    assert preset("gpt", "base").max_seq_len >= 1024


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda: preset("gpt", "huge"), "unknown preset"),
        (lambda: preset("cnn"), "unknown family"),
        (lambda: preset("rnn", cell="transformer"), "cell must be one of"),
        (lambda: preset("gpt", dim=0), "dim must be positive"),
        (lambda: preset("gpt", dim=30, n_heads=4), "multiple of n_heads"),
        (lambda: preset("gpt", pos_encoding="alibi"), "pos_encoding"),
        (lambda: preset("gpt", dim="wide"), "must be int"),
        (lambda: preset("gpt", n_layers=True), "must be int"),
        (lambda: preset("gpt", colour=3), "unknown gpt config field"),
        (lambda: preset("rnn", tie_embeddings=True), "tie_embeddings needs"),
        (lambda: preset("rnn", dropout=1.5), "dropout"),
        (lambda: config_from_dict([1, 2]), "JSON object"),
    ],
)
def test_invalid_configs_raise_config_error(call, message):
    with pytest.raises(ConfigError, match=message):
        call()


def test_unreadable_config_file(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="cannot read model config"):
        load_config(tmp_path / "config.json")


def test_parse_override():
    assert parse_override("dim=96") == ("dim", 96)
    assert parse_override("tie_embeddings=false") == ("tie_embeddings", False)
    assert parse_override("pos_encoding=rope") == ("pos_encoding", "rope")
    with pytest.raises(ConfigError, match="name=value"):
        parse_override("dim")


def test_rnn_defaults():
    config = RNNConfig()
    assert config.family == "rnn" and config.cell == "gru"

"""The peer table's arithmetic (benchmarks/peers/bench.py): rounds pool into one row each,
and a target is the median of its rounds' ratios, each against the peers of that round."""

import importlib.util
import sys
from pathlib import Path

import pytest

PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "peers" / "bench.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("peer_bench", PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def measured(bench, tool, decode_ms, prefill_ms=100.0, rss=100):
    runs = [{"decode_s": [decode_ms / 1e3] * 4, "prefill_s": prefill_ms / 1e3}]
    figures = {
        "threads": 1,
        "row": {"tool": tool, "precision": "int8", "label": tool, "artifact": "a"},
        "runs": runs,
        "tokens": [1, 2],
        "peak_rss_bytes": rss,
        "size_bytes": 1,
    }
    figures["summary"] = bench.summarize(figures, 61)
    return figures


def test_rounds_pool_into_one_row_and_each_target_is_the_median_of_its_rounds(bench):
    rounds = [
        [measured(bench, "llama.cpp", 10.0), measured(bench, "edgegen", 8.0, rss=300)],
        [measured(bench, "llama.cpp", 8.0), measured(bench, "edgegen", 8.0, rss=200)],
        [measured(bench, "llama.cpp", 9.0), measured(bench, "edgegen", 8.5)],
    ]
    pooled = bench.pooled(rounds, 61)
    ours = pooled[1]
    assert len(ours["runs"]) == 3 and ours["peak_rss_bytes"] == 300
    assert ours["summary"]["decode_p50_ms"] == pytest.approx(8.0)
    target = next(t for t in bench.TARGETS if t.name.startswith("int8 decode"))
    ratios = [bench.target_ratio(target, 1, r) for r in rounds]
    assert ratios == pytest.approx([0.8, 1.0, 8.5 / 9.0])
    line = bench.target_line(target, 1, rounds)
    # the median round (0.94x) misses 0.9x, though the pooled rows (8.0 / 9.0) would meet it
    assert "| 0.94x | 0.80x, 1.00x, 0.94x | no |" in line
    assert bench.target_line(target, 1, rounds[:1]).endswith("| 0.80x | yes |")


def test_a_row_missing_from_every_round_is_not_measured(bench):
    rounds = [[measured(bench, "edgegen", 8.0)], [measured(bench, "edgegen", 8.0)]]
    target = next(t for t in bench.TARGETS if t.name.startswith("int8 decode"))
    assert bench.target_line(target, 1, rounds).endswith("| - | - | not measured |")
    assert bench.pooled(rounds, 61)[0]["summary"]["decode_p50_ms"] == pytest.approx(8.0)

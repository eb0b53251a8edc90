"""Print the decode fast-path targets as a Markdown table, from the JSON reports that
benchmarks/run.sh writes:  python benchmarks/targets.py runs/benchmarks"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def row(report, backend="onnx", precision="fp32"):
    return next(r for r in report["rows"] if (r["backend"], r["precision"]) == (backend, precision))


def targets(reports):
    """(target, wanted, measured, met) for each target of the decode fast path."""

    def speedup(name, precision="fp32"):
        return row(reports[name], precision=precision)["decode_speedup_vs_eager"]

    base, tiny, sample = reports["gpt-base"], reports["gpt-tiny"], reports["gpt-tiny-sample"]
    cold = reports["gpt-small"]["cold_start"]
    at_least = [
        ("1. GPT small ONNX fp32 vs eager", speedup("gpt-small"), 4.0),
        ("1. GPT base ONNX fp32 vs eager", speedup("gpt-base"), 2.5),
        ("1. GPT base ONNX int8 vs eager", speedup("gpt-base", "int8"), 5.0),
        ("1. GRU small ONNX fp32 vs eager", speedup("gru-small"), 4.0),
        ("1. LSTM small ONNX fp32 vs eager", speedup("lstm-small"), 4.0),
    ]
    at_most = [
        ("2. GPT base ONNX fp32, x floor", row(base)["floor_multiple"], 1.2),
        ("2. GPT base ONNX int8, x its floor", row(base, precision="int8")["floor_multiple"], 1.6),
        ("3. GPT base ONNX fp32, late/early", row(base)["context_growth"]["ratio"], 1.25),
        ("4. overhead, tiny, greedy, us/token", row(tiny)["overhead_per_token_s"] * 1e6, 15),
        ("4. overhead, tiny, top-k+top-p, us/token", row(sample)["overhead_per_token_s"] * 1e6, 40),
        ("5. cold start, small, first token s", cold["first_token_s"], 0.4),
        ("5. cold start, small, peak RSS MB", cold["peak_rss_bytes"] / 1e6, 100),
    ]
    return [(n, f">= {limit}x", f"{v:.2f}x", v >= limit) for n, v, limit in at_least] + [
        (n, f"<= {limit}", f"{v:.2f}", v <= limit) for n, v, limit in at_most
    ]


def main(out: str) -> None:
    reports = {p.stem: json.loads(p.read_text()) for p in Path(out).glob("*.json")}
    print("## Decode targets (after)")
    print()
    print("| target | wanted | measured | met |")
    print("|---|---|---|---|")
    for name, wanted, measured, met in targets(reports):
        print(f"| {name} | {wanted} | {measured} | {'yes' if met else 'no'} |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/benchmarks")

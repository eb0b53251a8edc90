"""The benchmark report as a terminal table, Markdown, JSON and a per-position plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from edgegen.bench.worker import SAMPLING

COLUMNS = (
    ("row", lambda r: f"{r['backend']} {r['precision']}"),
    ("load s", lambda r: f"{r['load_s']:.2f}"),
    ("TTFT ms", lambda r: f"{r['ttft_s'] * 1e3:.2f}"),
    ("decode p50 ms", lambda r: f"{r['decode_s']['p50'] * 1e3:.3f}"),
    ("p90", lambda r: f"{r['decode_s']['p90'] * 1e3:.3f}"),
    ("p99", lambda r: f"{r['decode_s']['p99'] * 1e3:.3f}"),
    ("tok/s", lambda r: f"{r['decode_tokens_per_s']:.0f}"),
    ("prefill tok/s", lambda r: f"{r['prefill_tokens_per_s']:.0f}"),
    ("overhead us/tok", lambda r: f"{r['overhead_per_token_s'] * 1e6:.0f}"),
    ("peak RSS MB", lambda r: f"{r['peak_rss_bytes'] / 1e6:.0f}"),
    ("size MB", lambda r: f"{r['weight_bytes'] / 1e6:.2f}"),
    ("x floor", lambda r: f"{r['floor_multiple']:.2f}"),
    (
        "late/early",
        lambda r: f"{r['context_growth']['ratio']:.2f}" if r.get("context_growth") else "-",
    ),
    (
        "vs eager",
        lambda r: f"{r['decode_speedup_vs_eager']:.2f}x" if "decode_speedup_vs_eager" in r else "-",
    ),
)


def _cells(report: dict[str, Any]) -> list[list[str]]:
    """The header, a row of figures per row run, then one per row skipped (its reason
    in the first figure's column, a dash in the others)."""
    skipped = [
        [f"{r['backend']} {r['precision']}", f"skipped: {r['skipped']}"]
        + ["-"] * (len(COLUMNS) - 2)
        for r in report.get("skipped", [])
    ]
    return [
        [name for name, _ in COLUMNS],
        *([cell(r) for _, cell in COLUMNS] for r in report["rows"]),
        *skipped,
    ]


def _footer(report: dict[str, Any]) -> str:
    o = report["options"]
    same = "the same tokens" if report["same_tokens"] else "DIFFERENT tokens (see the JSON)"
    quantized = [r for r in report["rows"] if r["precision"] != "fp32"]
    if quantized:
        agree = ", ".join(
            f"{r['backend']} {r['precision']} {r.get('token_agreement_vs_fp32', 0):.0%}"
            for r in quantized
        )
        same += f" (quantized rows agree with fp32 on: {agree})"
    counts = f"Rows: {len(report['rows'])} run, {len(report.get('skipped', []))} skipped. "
    return (
        counts
        + f"batch {o['batch']}, prompt {o['prompt_len']} tokens, {o['new_tokens']} new tokens, "
        f"{_decoding(o)}, {o['warmup']} warm-up + {o['repeat']} timed runs, "
        f"threads {o['threads']}; "
        f"every fp32 row produced {same}. Memory read bandwidth "
        f"{report['memory_read_bandwidth_bytes_per_s'] / 1e9:.1f} GB/s (best fp32 "
        "matrix-vector product over 256 MB, at the rows' thread count); "
        "floor = weight bytes / bandwidth."
        + _huge_pages_note(report)
        + _growth_note(report)
        + _cold_note(report)
    )


def _huge_pages_note(report: dict[str, Any]) -> str:
    moved = [r for r in report["rows"] if r.get("huge_page_bytes")]
    if not moved:
        return ""
    rows = ", ".join(
        f"{r['backend']} {r['precision']} {r['huge_page_bytes'] / 1e6:.0f} MB" for r in moved
    )
    return f" Loaded weights moved to 2 MB pages: {rows}."


def _growth_note(report: dict[str, Any]) -> str:
    growth = next((r["context_growth"] for r in report["rows"] if r.get("context_growth")), None)
    if growth is None:
        return ""
    return (
        f" late/early = decode latency near position {growth['late_position']} over "
        f"position {growth['early_position']}."
    )


def _cold_note(report: dict[str, Any]) -> str:
    cold = report.get("cold_start")
    if not cold:
        return ""
    return (
        f" Cold start (a fresh `edgegen generate` process, ONNX fp32): first token after "
        f"{cold['first_token_s']:.2f} s, peak RSS {cold['peak_rss_bytes'] / 1e6:.0f} MB."
    )


def _decoding(options: dict[str, Any]) -> str:
    if not options.get("sample"):
        return "greedy"
    return "seeded sampling (" + ", ".join(f"{k} {v}" for k, v in SAMPLING.items()) + ")"


def table(report: dict[str, Any]) -> str:
    cells = _cells(report)
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
    lines = [
        "  ".join(
            c.rjust(w) if i else c.ljust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in cells
    ]
    return "\n".join(lines) + "\n" + _footer(report)


def markdown(report: dict[str, Any]) -> str:
    cells = _cells(report)
    lines = ["| " + " | ".join(cells[0]) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row) + " |" for row in cells[1:]]
    machine = report["machine"]
    return (
        f"Bundle `{report['bundle']}` on {machine['cpu']} ({machine['cores']} cores)\n\n"
        + "\n".join(lines)
        + "\n\n"
        + _footer(report)
        + "\n"
    )


def write_json(report: dict[str, Any], path: str | Path) -> None:
    Path(path).write_text(json.dumps(report, indent=2) + "\n")


def plot(report: dict[str, Any], path: str | Path) -> bool:
    """Decode latency per position, one line per row. False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(8, 4.5))
    start = report["options"]["prompt_len"]
    for row in report["rows"]:
        ys = [t * 1e3 for t in row["per_position_decode_s"]]
        ax.plot(
            range(start + 1, start + 1 + len(ys)),
            ys,
            label=f"{row['backend']} {row['precision']}",
            lw=0.8,
        )
    ax.set_xlabel("position in the sequence")
    ax.set_ylabel("decode latency (ms)")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title(f"Decode latency per position: {Path(report['bundle']).name}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True

"""Measure every row of the peer table, serially, each in its own process and venv, then
write the table (markdown), its figures (JSON beside it) and every step's time (JSON in
the peers folder). Runs in edgegen's venv; run.sh prepares the models it reads.

    python benchmarks/peers/bench.py --peers DIR --gguf Q4_1.gguf --out RESULTS.md [--threads 1,2]

Decode p50/p90 are over every decode step of every timed generation (ms per token);
prefill is the median over the timed generations of the prompt's one call. Ratios
compare edgegen's rows with peers measured in this same run at the same thread count.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


# tool (measure.py's name) -> (the name in the table, the venv under the peers folder
# that runs it; "edgegen" is the Python running this script)
TOOLS = {
    "llama.cpp": ("llama.cpp", "llama"),
    "onnxruntime-genai": ("onnxruntime-genai", "ortgenai"),
    "optimum": ("Optimum ORTModelForCausalLM", "optimum"),
    "transformers": ("transformers eager", "ortgenai"),
    "edgegen": ("edgegen", "edgegen"),
}


@dataclass(frozen=True)
class Row:
    precision: str  # fp32, int8, int4: which weights
    tool: str  # a key of TOOLS
    artifact: str  # what the tool runs, as the table names it
    model: str  # path under the peers folder; "@gguf" for the shipped file

    @property
    def label(self) -> str:
        return TOOLS[self.tool][0]

    @property
    def venv(self) -> str:
        return TOOLS[self.tool][1]


BUNDLE = "models/smollm2.bundle"
ROWS = [
    Row("fp32", "llama.cpp", "F32 GGUF", "models/smollm2-f32.gguf"),
    Row("fp32", "onnxruntime-genai", "builder -p fp32", "models/ortgenai-fp32"),
    Row("fp32", "optimum", "optimum-cli export onnx", "models/optimum-fp32"),
    Row("fp32", "transformers", "safetensors", "models/hf"),
    Row("fp32", "edgegen", "ONNX fp32", BUNDLE),
    Row("int8", "llama.cpp", "Q8_0 GGUF", "models/smollm2-q8_0.gguf"),
    Row("int8", "onnxruntime-genai", "builder -p int8", "models/ortgenai-int8"),
    Row("int8", "edgegen", "ONNX int8", BUNDLE),
    Row("int4", "llama.cpp", "Q4_1 GGUF (as shipped)", "@gguf"),
    Row("int4", "onnxruntime-genai", "builder -p int4", "models/ortgenai-int4"),
    Row("int4", "edgegen", "ONNX int4", BUNDLE),
]


@dataclass(frozen=True)
class Target:
    name: str
    precision: str
    kind: str  # decode: edgegen's p50 / the best peer's <= limit; prefill: tok/s, >= limit
    peers: tuple[str, ...]  # the tools whose faster row is the reference
    limit: float


TARGETS = [
    Target("fp32 decode vs llama.cpp F32", "fp32", "decode", ("llama.cpp",), 0.95),
    Target("int8 decode vs llama.cpp Q8_0", "int8", "decode", ("llama.cpp",), 0.9),
    Target(
        "int4 decode vs faster of llama.cpp Q4_1, onnxruntime-genai int4",
        "int4",
        "decode",
        ("llama.cpp", "onnxruntime-genai"),
        0.85,
    ),
    Target("fp32 prefill tok/s vs llama.cpp", "fp32", "prefill", ("llama.cpp",), 1.0),
    Target("int8 prefill tok/s vs llama.cpp", "int8", "prefill", ("llama.cpp",), 1.0),
    Target("int4 prefill tok/s vs llama.cpp", "int4", "prefill", ("llama.cpp",), 1.0),
]


def python_of(row: Row, peers: Path) -> Path | None:
    if row.venv == "edgegen":
        return Path(sys.executable)
    python = peers / row.venv / "bin" / "python"
    return python if (peers / row.venv / ".installed").exists() and python.exists() else None


def model_of(row: Row, peers: Path, gguf: str) -> Path:
    return Path(gguf) if row.model == "@gguf" else peers / row.model


def run_row(row: Row, threads: int, args, prompt: dict) -> dict:
    python = python_of(row, args.peers)
    model = model_of(row, args.peers, args.gguf)
    if python is None or not model.exists():
        return {"skipped": f"not prepared ({model.name if python else row.venv + ' venv'})"}
    spec = {
        "tool": row.tool,
        "model": str(model),
        "precision": row.precision,
        "threads": threads,
        "prompt_ids": prompt["ids"],
        "new_tokens": args.new_tokens,
        "warmup": args.warmup,
        "repeat": args.repeat,
    }
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    with tempfile.TemporaryDirectory() as tmp:
        row_file, out_file = Path(tmp, "row.json"), Path(tmp, "figures.json")
        row_file.write_text(json.dumps(spec), encoding="utf-8")
        done = subprocess.run(
            [str(python), str(HERE / "measure.py"), str(row_file), str(out_file)],
            env=env,
            capture_output=True,
            text=True,
            cwd=REPO,
        )
        if not out_file.exists():
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            return {"error": f"exit {done.returncode}: {tail[0]}"}
        figures = json.loads(out_file.read_text(encoding="utf-8"))
    figures["size_bytes"] = artifact_bytes(row, model)
    return figures


def artifact_bytes(row: Row, model: Path) -> int:
    if model.is_file():
        return model.stat().st_size
    if row.tool == "edgegen":
        sys.path.insert(0, str(REPO))
        from edgegen.runtime import read_manifest

        manifest = read_manifest(model, verify_hashes=False)
        path = Path(manifest.path_of(manifest.artifact("onnx", row.precision)))
        files = [path, *path.parent.glob(path.name + ".data")]
        return sum(f.stat().st_size for f in files if f.is_file())
    weights = ("*.onnx", "*.onnx.data", "*.onnx_data", "*.safetensors")
    return sum(f.stat().st_size for pattern in weights for f in model.glob(pattern))


def summarize(figures: dict, prompt_len: int) -> dict:
    steps = np.concatenate([r["decode_s"] for r in figures["runs"]]) * 1e3
    prefill = float(np.median([r["prefill_s"] for r in figures["runs"]]))
    p50 = float(np.percentile(steps, 50))
    return {
        "decode_p50_ms": p50,
        "decode_p90_ms": float(np.percentile(steps, 90)),
        "decode_tok_s": 1e3 / p50,
        "prefill_ms": prefill * 1e3,
        "prefill_tok_s": prompt_len / prefill,
    }


def pooled(rounds: list[list[dict]], prompt_len: int) -> list[dict]:
    """Each row's figures over all rounds: every timed generation of every round (the
    first round's tokens and size, the largest peak RSS), summarized as one."""
    if len(rounds) == 1:
        return rounds[0]
    results = []
    for measured in zip(*rounds, strict=True):
        done = [r for r in measured if "runs" in r]
        if not done:
            results.append(measured[0])
            continue
        row = {**done[0], "runs": [run for r in done for run in r["runs"]]}
        row["peak_rss_bytes"] = max(r["peak_rss_bytes"] for r in done)
        row["summary"] = summarize(row, prompt_len)
        results.append(row)
    return results


def agreement(tokens: list[int], reference: list[int] | None) -> str:
    if not reference:
        return "-"
    pairs = enumerate(zip(tokens, reference, strict=False))
    same = next((i for i, (a, b) in pairs if a != b), None)
    return "all" if same is None and len(tokens) == len(reference) else str(same)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peers", type=Path, required=True)
    parser.add_argument("--gguf", required=True, help="the shipped Q4_1 GGUF")
    parser.add_argument("--out", type=Path, required=True, help="markdown table")
    parser.add_argument(
        "--json",
        type=Path,
        help="every figure, each step's time included [default: PEERS/results.json]",
    )
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--only", default="", help="comma-separated tools to measure")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="measure every row this many times, a round after another; the table pools "
        "a row's rounds, each target is the median of its rounds' ratios",
    )
    if sys.argv[1:] == ["--describe-tree"]:  # run.sh records it beside the bundle it exports
        print(edgegen_commit())
        return
    args = parser.parse_args()
    args.peers = args.peers.resolve()
    prompt = json.loads((args.peers / "models/reference/prompt.json").read_text(encoding="utf-8"))
    threads = [int(t) for t in args.threads.split(",")]
    only = set(filter(None, args.only.split(",")))
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    load = os.getloadavg()
    rounds = []  # each: every row's figures, as measured in that round
    for k in range(args.rounds):
        results = []
        for n in threads:
            for row in ROWS:
                if only and row.tool not in only:
                    continue
                tag = f"round {k + 1}/{args.rounds}, " if args.rounds > 1 else ""
                print(f"{tag}{n} thread(s): {row.label} {row.precision} ...", end=" ", flush=True)
                start = time.perf_counter()
                figures = run_row(row, n, args, prompt)
                if "runs" in figures:
                    figures["summary"] = summarize(figures, len(prompt["ids"]))
                    s = figures["summary"]
                    note = f"decode {s['decode_p50_ms']:.1f} ms, prefill {s['prefill_ms']:.0f} ms"
                else:
                    note = figures.get("error") or figures.get("skipped")
                print(f"{note} ({time.perf_counter() - start:.0f} s)", flush=True)
                results.append({"threads": n, "row": {**vars(row), "label": row.label}, **figures})
        rounds.append(results)
    results = pooled(rounds, len(prompt["ids"]))
    meta = {
        "started": started,
        "load_average_at_start": load,
        "machine": machine(),
        "edgegen_commit": edgegen_commit(),
        "bundle_exported_from": bundle_tree(args.peers),
        "prompt_tokens": len(prompt["ids"]),
        "prompt_text": prompt["text"],
        "new_tokens": args.new_tokens,
        "warmup": args.warmup,
        "repeat": args.repeat,
        "rounds": args.rounds,
        "command": " ".join(sys.argv[1:]),
    }
    full = args.json or args.peers / "results.json"
    full.write_text(
        json.dumps({"meta": meta, "rows": results, "rounds": rounds}) + "\n", encoding="utf-8"
    )
    brief = [{k: v for k, v in r.items() if k not in ("runs", "tokens")} for r in results]
    ratios = {  # every round's ratio of each target, as the table's median reads them
        f"{t.name}, {n} thread{'s' if n > 1 else ''}": [target_ratio(t, n, r) for r in rounds]
        for n in threads
        for t in TARGETS
    }
    summary = args.out.with_suffix(".json")
    summary.write_text(
        json.dumps({"meta": meta, "rows": brief, "target_ratios": ratios}, indent=1) + "\n",
        encoding="utf-8",
    )
    args.out.write_text(render(meta, results, threads, rounds), encoding="utf-8")
    print(f"wrote {args.out}, {summary} (summaries) and {full} (every step)")


def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        model = names[0] if names else model
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} logical CPUs, {platform.system()}"


def edgegen_commit() -> str:
    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)
        return done.stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", "edgegen")
    return commit + (" with uncommitted changes to edgegen/" if dirty else "")


def bundle_tree(peers: Path) -> str:
    stamp = peers / BUNDLE.replace(".bundle", ".bundle.tree")
    return stamp.read_text(encoding="utf-8").strip() if stamp.exists() else "unknown"


def render(meta: dict, results: list[dict], threads: list[int], rounds: list[list[dict]]) -> str:
    several = len(rounds) > 1
    lines = [
        f"Measured {meta['started']} on {meta['machine']} (load average "
        f"{meta['load_average_at_start'][0]:.1f} at the start), edgegen's bundle exported "
        f"from {meta['bundle_exported_from']}.",
        f"Batch 1, greedy, {meta['new_tokens']} new tokens after the "
        f"{meta['prompt_tokens']}-token chat prompt; {meta['warmup']} warm-up and "
        f"{meta['repeat']} timed generations per row, each row in its own process, rows one "
        + (
            f"after another, in {len(rounds)} rounds (every row once a round; a row's figures "
            "pool its rounds). "
            if several
            else "after another. "
        )
        + "Decode: ms per token over every step of the timed generations. "
        "Prefill: the prompt's one call, median. `agrees`: how many of the greedy tokens "
        "equal transformers eager fp32's before the first difference.",
        "",
    ]
    versions = sorted({r["version"] for r in results if r.get("version")})
    if versions:
        lines += ["Versions: " + ", ".join(versions) + ".", ""]
    reference = next(
        (r["tokens"] for r in results if r["row"]["tool"] == "transformers" and "tokens" in r),
        None,
    )
    for n in threads:
        lines += [
            f"### {n} thread{'s' if n > 1 else ''}",
            "",
            "| weights | tool | artifact | MB | decode p50 ms | decode p90 ms | decode tok/s "
            "| prefill ms | prefill tok/s | peak RSS MB | agrees |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in (r for r in results if r["threads"] == n):
            row = r["row"]
            head = f"| {row['precision']} | {row['label']} | {row['artifact']} "
            if "summary" not in r:
                why = r.get("error") or r.get("skipped")
                lines.append(head + f"| {why} |" + " |" * 7)
                continue
            s = r["summary"]
            lines.append(
                head + f"| {r['size_bytes'] / 1e6:.0f} | {s['decode_p50_ms']:.2f} "
                f"| {s['decode_p90_ms']:.2f} | {s['decode_tok_s']:.1f} | {s['prefill_ms']:.1f} "
                f"| {s['prefill_tok_s']:.0f} | {r['peak_rss_bytes'] / 1e6:.0f} "
                f"| {agreement(r['tokens'], reference)} |"
            )
        lines.append("")
    title = (
        "the peers of each round, the median of the rounds"
        if several
        else "the peers of the same run"
    )
    lines += [
        f"### Targets (edgegen against {title})",
        "",
        "| target | threads | wanted | measured | " + ("rounds | " if several else "") + "met |",
        "|---|---|---|---|" + ("---|" if several else "") + "---|",
    ]
    for n in threads:
        for target in TARGETS:
            lines.append(target_line(target, n, rounds))
    return "\n".join(lines) + "\n"


def target_ratio(target: Target, threads: int, results: list[dict]) -> float | None:
    """edgegen's figure over the best peer's, in one round (None: a row is missing)."""

    def summary(tool: str) -> dict | None:
        for r in results:
            row = r["row"]
            if (r["threads"], row["tool"], row["precision"]) == (threads, tool, target.precision):
                return r.get("summary")
        return None

    ours = summary("edgegen")
    peers = [s for s in map(summary, target.peers) if s]
    if not ours or not peers:
        return None
    if target.kind == "decode":
        return ours["decode_p50_ms"] / min(p["decode_p50_ms"] for p in peers)
    return ours["prefill_tok_s"] / max(p["prefill_tok_s"] for p in peers)


def target_line(target: Target, threads: int, rounds: list[list[dict]]) -> str:
    decode = target.kind == "decode"
    wanted = f"{'<=' if decode else '>='} {target.limit:.2f}x"
    head = f"| {target.name} | {threads} | {wanted} "
    ratios = [r for r in (target_ratio(target, threads, res) for res in rounds) if r is not None]
    each = f"| {', '.join(f'{r:.2f}x' for r in ratios)} " if len(rounds) > 1 else ""
    if not ratios:
        return head + "| - " + ("| - " if each else "") + "| not measured |"
    ratio = float(np.median(ratios))
    met = ratio <= target.limit if decode else ratio >= target.limit
    return head + f"| {ratio:.2f}x {each}| {'yes' if met else 'no'} |"


if __name__ == "__main__":
    main()

#!/usr/bin/env bash
# Benchmark the small and base presets end to end: train briefly (latency does not
# depend on how well a model is trained), export with int8, bench every backend and
# precision, then write BENCHMARKS.md beside this script with the decode targets.
#
#   make setup && bash benchmarks/run.sh            # about 20 minutes on 2 cores
#
# Absolute numbers are machine-specific; the ratios between rows of one run are the point.
# The int8 gates are opened here: a model trained for a few steps has near-uniform
# next-token distributions, so top-1 agreement says nothing about its quantization.
set -euo pipefail
cd "$(dirname "$0")/.."
EDGEGEN=${EDGEGEN:-.venv/bin/edgegen}
PYTHON=${PYTHON:-.venv/bin/python}
OUT=${OUT:-runs/benchmarks}
mkdir -p "$OUT"
RESULTS="$OUT/results.md"
REPORT_ONLY=${REPORT_ONLY:-0}  # 1: rebuild BENCHMARKS.md from the last run's reports
[ "$REPORT_ONLY" = 1 ] || : > "$RESULTS"

run() {  # name, family args..., then train args after --
    [ "$REPORT_ONLY" = 1 ] && return
    local name=$1; shift
    local train_args=()
    while [ "$1" != "--" ]; do train_args+=("$1"); shift; done; shift
    "$EDGEGEN" train "${train_args[@]}" --out "$OUT/$name" --force --quiet "$@"
    "$EDGEGEN" export "$OUT/$name" --out "$OUT/$name.bundle" --force --quantize int8 \
        --gate int8.top1=0 --gate int8.ppl_change=1
    "$EDGEGEN" bench "$OUT/$name.bundle" --checkpoint "$OUT/$name" --threads 1 \
        --precisions fp32,int8 --prompt-len 32 --new-tokens 64 --warmup 2 --repeat 5 \
        --long-tokens 1000 --quiet \
        --json "$OUT/$name.json" --markdown "$OUT/$name.md" --plot "$OUT/$name.png"
    { echo "### $name"; echo; cat "$OUT/$name.md"; echo; } >> "$RESULTS"
}

run gpt-tiny --family gpt --preset tiny -- --steps 30 --batch-size 4 --seq-len 64
# the sampler's overhead: the same tiny bundle, seeded top-k + top-p
[ "$REPORT_ONLY" = 1 ] || "$EDGEGEN" bench "$OUT/gpt-tiny.bundle" --checkpoint "$OUT/gpt-tiny" --threads 1 --sample \
    --backends onnx --prompt-len 32 --new-tokens 64 --warmup 2 --repeat 5 --long-tokens 64 \
    --cold-repeat 0 --quiet --json "$OUT/gpt-tiny-sample.json" --markdown "$OUT/gpt-tiny-sample.md"
[ "$REPORT_ONLY" = 1 ] || {
    echo "### gpt-tiny, sampling"; echo; cat "$OUT/gpt-tiny-sample.md"; echo
} >> "$RESULTS"
run gpt-small --family gpt --preset small -- --steps 30 --batch-size 4 --seq-len 128
run gru-small --family rnn --cell gru --preset small -- --steps 30 --batch-size 4 --bptt 32
run lstm-small --family rnn --cell lstm --preset small -- --steps 30 --batch-size 4 --bptt 32
run gpt-base --family gpt --preset base -- --steps 4 --batch-size 2 --seq-len 128
run gru-base --family rnn --cell gru --preset base -- --steps 4 --batch-size 2 --bptt 32

{
    echo "# Benchmarks"
    echo
    echo "Produced by \`bash benchmarks/run.sh\` on $(date -u +%Y-%m-%d)."
    echo "Single thread, batch 1, greedy; 2 warm-up and 5 timed generations of 64 tokens after"
    echo "a 32-token prompt; each row in its own process. Columns: time to first token"
    echo "(prefill), decode latency per token (median, p90, p99), decode and prefill"
    echo "tokens/s, loop overhead per token outside the model call, peak resident memory of"
    echo "the row's process, artifact size, decode latency as a multiple of the"
    echo "memory-bandwidth floor (weight bytes / measured read bandwidth), decode latency"
    echo "late in a long generation over early in it, and decode speed-up over eager"
    echo "PyTorch measured in the same run."
    echo
    echo "Reproduce: \`make setup && bash benchmarks/run.sh\` (each target's row is in \"Every"
    echo "row\" below, with the command line options in the footer of its table)."
    echo
    "$PYTHON" benchmarks/targets.py "$OUT"
    echo
    cat benchmarks/smollm2.md
    echo
    cat benchmarks/limits.md
    echo
    cat benchmarks/before.md
    echo
    cat benchmarks/kv_cache.md
    echo
    cat benchmarks/train_throughput.md
    echo
    echo "## Every row"
    echo
    cat "$RESULTS"
} > benchmarks/BENCHMARKS.md
# the peer table's section (benchmarks/peers/run.sh), as its last run left it
"$PYTHON" benchmarks/peers/section.py benchmarks/BENCHMARKS.md
echo "wrote benchmarks/BENCHMARKS.md"

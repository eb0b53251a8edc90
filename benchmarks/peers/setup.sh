#!/usr/bin/env bash
# Create the peers' virtual environments, outside the repository, each once:
#
#   $EDGEGEN_PEERS/llama      llama-cpp-python built from source for this CPU (about
#                             10 minutes on 2 cores)
#   $EDGEGEN_PEERS/ortgenai   onnxruntime-genai and its model builder (which needs
#                             transformers >= 5), and PyTorch for transformers eager
#   $EDGEGEN_PEERS/optimum    Optimum's ORTModelForCausalLM, which needs transformers < 4.58:
#                             optional, its row is skipped when it does not install
#
# None of this is an edgegen dependency: `make test` never sees these environments.
# A venv that is complete (its .installed stamp exists) is left alone; delete the
# folder to rebuild it.
set -euo pipefail
PEERS=${EDGEGEN_PEERS:-$HOME/.cache/edgegen-peers}
PYTHON=${PEERS_PYTHON:-python3}
LLAMA_CPP=${LLAMA_CPP:-llama-cpp-python==0.3.36}
ORT_GENAI=${ORT_GENAI:-onnxruntime-genai==0.18.0}
OPTIMUM=${OPTIMUM:-optimum-onnx[onnxruntime]==0.1.0}
# PyTorch pinned as the Makefile pins it. On Linux PyPI's torch is a multi-GB CUDA build;
# for the CPU one add TORCH_INDEX="--index-url https://download.pytorch.org/whl/cpu".
TORCH=${TORCH:-torch==2.13.0}
TORCH_INDEX=${TORCH_INDEX:-}
mkdir -p "$PEERS"

venv() {  # name: a fresh venv with a current pip
    rm -rf "${PEERS:?}/$1"
    "$PYTHON" -m venv "$PEERS/$1"
    "$PEERS/$1/bin/python" -m pip install --quiet --upgrade pip
}

if [ ! -e "$PEERS/llama/.installed" ]; then
    echo "building llama-cpp-python from source (about 10 minutes on 2 cores; log: $PEERS/llama-build.log)"
    venv llama
    # GGML_NATIVE: compile for this CPU's instruction set, as a llama.cpp user would
    CMAKE_ARGS=${CMAKE_ARGS:-"-DGGML_NATIVE=ON -DCMAKE_BUILD_TYPE=Release"} \
        CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} \
        "$PEERS/llama/bin/pip" install --verbose --no-cache-dir --no-binary llama-cpp-python \
        "$LLAMA_CPP" numpy > "$PEERS/llama-build.log" 2>&1 \
        || { tail -20 "$PEERS/llama-build.log"; exit 1; }
    touch "$PEERS/llama/.installed"
fi

if [ ! -e "$PEERS/ortgenai/.installed" ]; then
    echo "installing onnxruntime-genai, transformers and PyTorch (CPU)"
    venv ortgenai
    "$PEERS/ortgenai/bin/pip" install --quiet $TORCH_INDEX "$TORCH"
    "$PEERS/ortgenai/bin/pip" install --quiet "$ORT_GENAI" onnx-ir "transformers>=5,<6" "$TORCH" \
        onnx safetensors numpy
    touch "$PEERS/ortgenai/.installed"
fi

if [ ! -e "$PEERS/optimum/.installed" ] && [ ! -e "$PEERS/optimum/.failed" ]; then
    echo "installing Optimum (optional; log: $PEERS/optimum-install.log)"
    venv optimum
    if "$PEERS/optimum/bin/pip" install --quiet $TORCH_INDEX "$TORCH" \
        && "$PEERS/optimum/bin/pip" install "$OPTIMUM" "transformers<4.58" "$TORCH" \
        > "$PEERS/optimum-install.log" 2>&1; then
        touch "$PEERS/optimum/.installed"
    else
        echo "Optimum did not install: its row is skipped (delete $PEERS/optimum to retry)"
        touch "$PEERS/optimum/.failed"
    fi
fi

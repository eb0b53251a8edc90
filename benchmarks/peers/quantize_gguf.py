"""llama.cpp's own quantizer (llama_model_quantize, what `llama-quantize` runs) through
llama-cpp-python. Runs in the peers' llama venv.

    python benchmarks/peers/quantize_gguf.py F32.gguf OUT.gguf [Q8_0]
"""

from __future__ import annotations

import ctypes
import sys

import llama_cpp


def main() -> None:
    source, out = sys.argv[1], sys.argv[2]
    kind = sys.argv[3] if len(sys.argv) > 3 else "Q8_0"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{kind}")
    params.nthread = 0  # all cores
    status = llama_cpp.llama_model_quantize(source.encode(), out.encode(), ctypes.byref(params))
    if status != 0:
        raise SystemExit(f"llama_model_quantize returned {status}")


if __name__ == "__main__":
    main()

"""The runtime side must import without torch (DESIGN.md: dependency direction)."""

import subprocess
import sys

BLOCK_TORCH = "import sys; sys.modules['torch'] = None; "


def test_runtime_config_and_tokenizer_import_without_torch():
    code = BLOCK_TORCH + (
        "import edgegen.runtime, edgegen.runtime.manifest, edgegen.config, edgegen.tokenizer; "
        "import edgegen.corpus, edgegen.files, edgegen.cli; "
        "import sys; assert 'torch' not in [m for m in sys.modules if sys.modules[m]]"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_torch_side_fails_loudly_without_torch():
    code = BLOCK_TORCH + "import edgegen.models"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode != 0 and "torch" in result.stderr

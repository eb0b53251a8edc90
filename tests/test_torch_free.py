"""The runtime side must import without torch (DESIGN.md: dependency direction), and
without transformers, which is a test-time oracle only."""

import subprocess
import sys

BLOCK_TORCH = "import sys; sys.modules['torch'] = None; "
BLOCK_TRANSFORMERS = "sys.modules['transformers'] = None; "


def test_runtime_config_and_tokenizer_import_without_torch():
    code = (
        BLOCK_TORCH
        + BLOCK_TRANSFORMERS
        + "import edgegen.runtime, edgegen.runtime.manifest, edgegen.config, edgegen.tokenizer; "
        "import edgegen.corpus, edgegen.files, edgegen.cli; "
        "loaded = [m for m in sys.modules if sys.modules[m]]; "
        "assert 'torch' not in loaded and 'transformers' not in loaded"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_torch_side_fails_loudly_without_torch():
    code = BLOCK_TORCH + "import edgegen.models"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode != 0 and "torch" in result.stderr


def test_hf_tokenizer_runs_without_torch_or_transformers():
    code = (
        BLOCK_TORCH
        + BLOCK_TRANSFORMERS
        + "from tokenizers import Tokenizer, models, pre_tokenizers; "
        "from edgegen.tokenizer import HFTokenizer; "
        "t = Tokenizer(models.WordLevel({'a': 0, 'b': 1, '?': 2}, unk_token='?')); "
        "t.pre_tokenizer = pre_tokenizers.Whitespace(); "
        "tok = HFTokenizer(t.to_str(), {'type': 'hf', 'version': 1}); "
        "assert tok.decode(tok.encode('a b')) == 'a b'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)

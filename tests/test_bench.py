import json
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from edgegen.bench import BenchOptions, run_bench
from edgegen.bench import report as bench_report
from edgegen.cli import main
from edgegen.errors import BenchError
from tests.conftest import copy_with_fp16

ROW_KEYS = {
    "backend",
    "precision",
    "load_s",
    "huge_page_bytes",
    "ttft_s",
    "decode_s",
    "decode_tokens_per_s",
    "prefill_tokens_per_s",
    "overhead_per_token_s",
    "peak_rss_bytes",
    "weight_bytes",
    "floor_s",
    "floor_multiple",
    "runs",
    "tokens",
    "per_position_decode_s",
    "raw",
}


def quick(bundle, ckpt=None, **kw):
    base = dict(
        new_tokens=8, prompt_len=8, warmup=1, repeat=2, long_tokens=20, cold_repeat=0, long_repeat=2
    )
    return BenchOptions(bundle=str(bundle), checkpoint=ckpt and str(ckpt), **{**base, **kw})


@pytest.mark.parametrize("name", ["gpt", "lstm"])
def test_protocol(trained_bundles, name):
    ckpt, bundle = trained_bundles[name]
    report = run_bench(quick(bundle, ckpt, batch=2), progress=False)
    assert [(r["backend"], r["precision"]) for r in report["rows"]] == [
        ("eager", "fp32"),
        ("torchscript", "fp32"),
        ("onnx", "fp32"),
    ]
    assert report["same_tokens"]
    for row in report["rows"]:
        assert set(row) >= ROW_KEYS
        assert row["runs"] == len(row["raw"]) == 2  # warm-up runs are not reported
        assert row["token_agreement_vs_fp32"] == 1.0
        for run in row["raw"]:
            assert len(run["decode_s"]) == 7  # the first of 8 tokens comes from prefill
            prefill_calls = 1 if name == "gpt" else 2  # an RNN prefills each prompt alone
            assert run["model_calls"] == prefill_calls + 7
            assert run["model_s"] < run["wall_s"]
        assert len(row["tokens"]) == 2 and all(len(t) == 8 for t in row["tokens"])
        assert len(row["per_position_decode_s"]) == 19
        assert row["decode_s"]["p50"] <= row["decode_s"]["p90"] <= row["decode_s"]["p99"]
        assert row["floor_multiple"] == pytest.approx(row["decode_s"]["p50"] / row["floor_s"])
    eager, _, onnx_row = report["rows"]
    assert eager["decode_speedup_vs_eager"] == 1.0
    assert eager["huge_page_bytes"] == 0 and onnx_row["huge_page_bytes"] >= 0
    assert eager["torch_imported"] and not onnx_row["torch_imported"]
    assert report["memory_read_bandwidth_bytes_per_s"] > 1e8
    assert {"cpu", "cores", "threads"} <= set(report["machine"])
    json.loads(json.dumps(report))


def test_seeded_sampling_rows_draw_the_same_tokens(trained_bundles):
    ckpt, bundle = trained_bundles["gru"]
    sampled = run_bench(quick(bundle, ckpt, sample=True, new_tokens=24), progress=False)
    greedy = run_bench(quick(bundle, ckpt, backends=("onnx",), new_tokens=24), progress=False)
    assert sampled["same_tokens"] and len(sampled["rows"]) == 3
    assert sampled["rows"][0]["tokens"] != greedy["rows"][0]["tokens"]
    assert "seeded sampling (temperature 0.8" in bench_report.table(sampled)


def test_without_checkpoint_there_is_no_baseline(trained_bundles):
    report = run_bench(quick(trained_bundles["gru"][1], backends=("onnx",)), progress=False)
    (row,) = report["rows"]
    assert row["backend"] == "onnx" and "decode_speedup_vs_eager" not in row
    assert "-" in bench_report.table(report).splitlines()[1]


def test_bad_requests(trained_bundles):
    bundle = trained_bundles["gpt"][1]
    with pytest.raises(BenchError, match="exceeds the model's context"):
        run_bench(quick(bundle, new_tokens=500), progress=False)
    with pytest.raises(BenchError, match="unknown backend"):
        run_bench(quick(bundle, backends=("tflite",)), progress=False)
    with pytest.raises(BenchError, match="nothing to benchmark"):
        run_bench(quick(bundle, backends=("onnx",), precisions=("int8",)), progress=False)
    with pytest.raises(BenchError, match="repeat must be positive"):
        run_bench(quick(bundle, repeat=0), progress=False)


def test_cli_bench(trained_bundles, tmp_path):
    ckpt, bundle = trained_bundles["rnn"]
    args = [
        "bench",
        str(bundle),
        "--checkpoint",
        str(ckpt),
        "--new-tokens",
        "6",
        "--prompt-len",
        "6",
        "--repeat",
        "2",
        "--warmup",
        "0",
        "--long-tokens",
        "10",
        "--quiet",
        "--json",
        str(tmp_path / "r.json"),
        "--markdown",
        str(tmp_path / "r.md"),
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "decode p50 ms" in result.stdout and "vs eager" in result.stdout
    assert "the same tokens" in result.stdout
    assert len(json.loads((tmp_path / "r.json").read_text())["rows"]) == 3
    assert (tmp_path / "r.md").read_text().count("\n|") >= 4
    bad = CliRunner().invoke(main, ["bench", str(tmp_path / "nope")])
    assert bad.exit_code == 1 and bad.stderr.startswith("error: bundle directory not found")


def test_cold_start_and_context_growth(trained_bundles):
    options = quick(trained_bundles["gpt"][1], backends=("onnx",), long_tokens=100, cold_repeat=2)
    report = run_bench(options, progress=False)
    cold = report["cold_start"]
    assert 0 < cold["first_token_s"] < 30 and len(cold["runs"]) == 2
    assert 20e6 < cold["peak_rss_bytes"] < 1e9  # the child's own peak, not the parent's
    (row,) = report["rows"]
    growth = row["context_growth"]
    assert growth["early_position"] == 16 and growth["late_position"] == 8 + 99 - 8
    assert growth["ratio"] > 0
    text = bench_report.table(report)
    assert "Cold start" in text and "late/early" in text
    with pytest.raises(BenchError, match="long_repeat must be positive"):
        run_bench(quick(trained_bundles["gpt"][1], long_repeat=0), progress=False)
    with pytest.raises(BenchError, match="cold_repeat"):
        run_bench(quick(trained_bundles["gpt"][1], cold_repeat=-1), progress=False)


def test_plot_or_a_note(trained_bundles, tmp_path, monkeypatch):
    """The plot draws one line per row, its latency per position (matplotlib is a dev
    dependency); without matplotlib, plot() says so and writes nothing."""
    ckpt, bundle = trained_bundles["gru"]
    report = run_bench(quick(bundle, ckpt, backends=("eager", "onnx")), progress=False)
    import matplotlib.figure

    saved, savefig = [], matplotlib.figure.Figure.savefig

    def keep(fig, *args, **kwargs):
        saved.append([(line.get_label(), list(line.get_ydata())) for line in fig.axes[0].lines])
        return savefig(fig, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", keep)
    assert bench_report.plot(report, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert saved == [
        [
            (f"{r['backend']} {r['precision']}", [t * 1e3 for t in r["per_position_decode_s"]])
            for r in report["rows"]
        ]
    ]
    assert all(len(ys) == 19 for _, ys in saved[0])
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert not bench_report.plot(report, tmp_path / "q.png")
    assert not (tmp_path / "q.png").exists()


def test_rows_that_cannot_run_are_skipped_with_the_reason(trained_bundles, tmp_path):
    bundle = copy_with_fp16(trained_bundles["gru"][1], tmp_path / "b")
    options = quick(bundle, backends=("eager", "onnx"), precisions=("fp32", "int8", "fp16"))
    report = run_bench(options, progress=False)
    assert [(r["backend"], r["precision"]) for r in report["rows"]] == [("onnx", "fp32")]
    assert report["skipped"] == [
        {"backend": "eager", "precision": "fp32", "skipped": "no checkpoint given"},
        {"backend": "onnx", "precision": "int8", "skipped": "the bundle has no onnx int8 artifact"},
        {
            "backend": "onnx",
            "precision": "fp16",
            "skipped": "fp16 runs on a CUDA GPU (device cuda)",
        },
    ]
    assert report["counts"] == {"run": 1, "skipped": 3}
    lines = bench_report.table(report).splitlines()
    assert lines[2].split()[:4] == ["eager", "fp32", "skipped:", "no"]
    assert "Rows: 1 run, 3 skipped." in lines[-1]
    assert "| onnx fp16 | skipped: fp16 runs on a CUDA GPU" in bench_report.markdown(report)


@pytest.mark.gpu
def test_cuda_rows(trained_bundles):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    ckpt, bundle = trained_bundles["gpt"]
    report = run_bench(
        quick(bundle, ckpt, device="cuda", backends=("eager", "torchscript")), progress=False
    )
    assert report["same_tokens"]


@pytest.mark.parametrize("kind", ["byte", "hf"])
def test_bench_prompts_have_the_asked_length_in_tokens(kind):
    from edgegen.bench.worker import bench_prompts
    from edgegen.tokenizer import ByteTokenizer, HFTokenizer
    from tests.hf_tokenizers import byte_level_bpe

    tokenizer = ByteTokenizer() if kind == "byte" else HFTokenizer.from_hf(byte_level_bpe(), {}, {})
    prompts = bench_prompts(tokenizer, 3, 32)
    assert len(set(prompts)) == 3
    for prompt in prompts:
        assert len(tokenizer.encode(prompt, bos=tokenizer.add_bos)) == 32


def test_roofline_reads_like_a_decode_step():
    """The floor's bandwidth comes from one fp32 matrix-vector product (x @ w, w a graph
    input, so ONNX Runtime reads it where it lies), not from a sum."""
    import onnx
    import onnxruntime as ort

    from edgegen.bench.machine import MATVEC_MODEL, memory_read_bandwidth

    graph = onnx.load(str(MATVEC_MODEL)).graph
    assert [n.op_type for n in graph.node] == ["MatMul"]
    session = ort.InferenceSession(str(MATVEC_MODEL), providers=["CPUExecutionProvider"])
    x, w = np.arange(3, dtype=np.float32)[None], np.arange(12, dtype=np.float32).reshape(3, 4)
    np.testing.assert_array_equal(session.run(None, {"x": x, "w": w})[0], x @ w)
    assert 1e8 < memory_read_bandwidth(threads=1, nbytes=16 * 1024 * 1024, repeats=2) < 1e12


def test_the_footer_names_the_weights_moved_to_huge_pages():
    from edgegen.bench.report import _huge_pages_note

    rows = [
        {"backend": "onnx", "precision": "int8", "huge_page_bytes": 304 << 20},
        {"backend": "eager", "precision": "fp32", "huge_page_bytes": 0},
    ]
    note = _huge_pages_note({"rows": rows})
    assert note == " Loaded weights moved to 2 MB pages: onnx int8 319 MB."
    assert _huge_pages_note({"rows": rows[1:]}) == ""

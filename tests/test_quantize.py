import json
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

import edgegen.runtime
from edgegen.cli import main
from edgegen.errors import BackendError, BundleError, ExportError, ParityError, QualityGateError
from edgegen.export import FORMATS, QuantizeOptions, export_bundle, quantize_bundle
from edgegen.export.quantize import SUPPORTED
from edgegen.runtime.decoder import Decoder
from edgegen.verify import verify_bundle

FAMILIES = ["gpt", "gru", "lstm", "rnn"]
PRECISIONS = ("int8", "int4")  # every family's bundle below has these; fp16 in the GPU test
FP16 = ("onnx", "fp16")


def test_every_quantized_combination_is_tested(quantized):
    """What the bundles under test really hold, plus the GPU test's fp16."""
    for name in FAMILIES:
        _, manifest = quantized[name]
        made = {(a.format, a.precision) for a in manifest.artifacts if a.precision != "fp32"}
        assert made | {FP16} == SUPPORTED, name


@pytest.fixture(scope="module")
def quantized(trained_bundles, tmp_path_factory):
    """Each family exported with int8 and int4 artifacts (default gates)."""
    root = tmp_path_factory.mktemp("quantized")
    out = {}
    for name in FAMILIES:
        ckpt = trained_bundles[name][0]
        options = QuantizeOptions(precisions=PRECISIONS)
        out[name] = (ckpt, export_bundle(ckpt, root / name, quantize=options))
    return out


@pytest.mark.parametrize("name", FAMILIES)
def test_quantized_artifacts_pass_their_gates_and_shrink(quantized, name):
    _, manifest = quantized[name]
    kinds = {(a.format, a.precision) for a in manifest.artifacts}
    assert kinds == {(f, "fp32") for f in FORMATS} | (SUPPORTED - {FP16})
    fp32 = {a.format: a.bytes for a in manifest.artifacts if a.precision == "fp32"}
    reports = manifest.data["parity"]["artifacts"]
    for artifact in manifest.artifacts:
        if artifact.precision == "fp32":
            continue
        report = reports[artifact.path]
        assert report["passed"] and report["quality"]["tokens"] == 4096
        assert report["quality"]["ppl_change"] <= report["gate"]["ppl_change"]
        # dim-32 models: the graph (or TorchScript's code) is a good part of the file;
        # the `small` preset gets below 30%
        limit = 0.5 if artifact.format == "onnx" else 0.8  # a traced GPT's code is ~100 KB
        assert artifact.bytes <= limit * fp32[artifact.format], artifact.path
        assert artifact.quantization["method"]
    onnx_int8, onnx_int4 = manifest.artifact("onnx", "int8"), manifest.artifact("onnx", "int4")
    for artifact in (onnx_int8, onnx_int4):
        assert artifact.quantization["quantized_fraction"] > 0.95, artifact.path
    int8_op = "MatMulInteger" if name != "gpt" else "MatMulNBits"  # block-wise for transformers
    assert int8_op in onnx_int8.quantization["quantized_ops"]
    # int4 weights: a transformer's MatMuls as 4-bit MatMulNBits; an RNN's recurrent
    # weights as INT4 tensors behind the DequantizeLinear that feeds the native cell op
    graph = onnx.load(str(manifest.path_of(onnx_int4))).graph
    if name == "gpt":
        bits = [a.i for n in graph.node if n.op_type == "MatMulNBits" for a in n.attribute]
        assert 4 in bits and "MatMulNBits" in onnx_int4.quantization["quantized_ops"]
    else:
        types = {t.name: t.data_type for t in graph.initializer}
        source = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "DequantizeLinear"}
        cell = next(n for n in graph.node if n.op_type in ("RNN", "GRU", "LSTM"))
        w, r = (types.get(source.get(name)) for name in cell.input[1:3])
        assert w == onnx.TensorProto.INT4  # R is 48 wide, not a multiple of the block: int8
        assert r in (onnx.TensorProto.INT4, onnx.TensorProto.INT8)


def test_transformer_int8_is_block_wise_with_the_head(quantized):
    _, manifest = quantized["gpt"]
    model = onnx.load(str(manifest.path_of(manifest.artifact("onnx", "int8"))))
    nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert nbits and all(a.i == 8 for n in nbits for a in n.attribute if a.name == "bits")
    assert manifest.artifact("onnx", "int8").quantization["head"] == "int8"
    assert "the output head included" in manifest.artifact("onnx", "int8").quantization["method"]


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_tied_embedding_reads_the_heads_int8_blocks(quantized, precision):
    """One int8 copy of a tied table: the embedding gathers rows of the head's MatMulNBits
    weights, and no other copy of the table (float or int8) is stored."""
    _, manifest = quantized["gpt"]
    artifact = manifest.artifact("onnx", precision)
    graph = onnx.load(str(manifest.path_of(artifact))).graph
    head = next(n for n in graph.node if n.op_type == "MatMulNBits" and n.output[0] == "logits")
    gather = [n for n in graph.node if n.op_type == "GatherBlockQuantized"]
    assert len(gather) == 1 and gather[0].input[0] == head.input[1]
    vocab = manifest.data["model"]["config"]["vocab_size"]
    tables = [t.name for t in graph.initializer if t.dims and t.dims[0] == vocab]
    assert tables == [head.input[1], head.input[2]]  # its blocks and their scales
    assert "embedding read from the head's int8 blocks" in artifact.quantization["method"]


@pytest.mark.parametrize("name", ["lstm"])
def test_int8_ends_in_fused_integer_kernels(quantized, name, tmp_path):
    import onnxruntime as ort

    _, manifest = quantized[name]
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(manifest.path_of(manifest.artifact("onnx", "int8"))), options)
    ops = [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]
    assert "DynamicQuantizeMatMul" in ops and "MatMulInteger" not in ops


@pytest.mark.parametrize("name", FAMILIES)
def test_coverage_says_what_embedding_and_head_became(quantized, name):
    _, manifest = quantized[name]
    for precision in ("int8", "int4"):
        coverage = manifest.artifact("onnx", precision).quantization
        assert coverage["embedding"] == "int8" and coverage["head"] == "int8"
        assert coverage["kept_float32"] == []
    ts = manifest.artifact("torchscript", "int8").quantization
    assert ts["embedding"] == "int8" and ts["head"] == "int8"


def test_rnn_weights_stay_native_ops(quantized):
    _, manifest = quantized["gru"]
    graph = onnx.load(str(manifest.path_of(manifest.artifact("onnx", "int8")))).graph
    ops = {n.op_type for n in graph.node}
    assert "GRU" in ops and "DequantizeLinear" in ops
    gru = next(n for n in graph.node if n.op_type == "GRU")
    assert all(name.endswith("_dq") for name in gru.input[1:3])


def test_torchscript_int8_reports_what_it_quantized(quantized):
    _, manifest = quantized["rnn"]
    artifact = manifest.artifact("torchscript", "int8")
    coverage = artifact.quantization
    assert "WeightOnlyInt8RNN" in coverage["quantized_modules"] and not coverage["kept_float32"]
    assert artifact.bytes <= 0.5 * manifest.artifact("torchscript").bytes  # small: 25%
    _, gru = quantized["gru"]
    assert "GRU" in gru.artifact("torchscript", "int8").quantization["quantized_modules"]


@pytest.mark.parametrize("name", FAMILIES)
def test_weight_only_dequantization_is_folded_at_load(quantized, name):
    """ORT has no integer RNN kernels and a quantized GPT graph dequantizes its embedding:
    those artifacts ask ORT to fold their weight-only DequantizeLinear at load (a GPT's
    head is MatMulNBits, which stays), and the runtime and the gates open them so."""
    _, manifest = quantized[name]
    for precision in ("int8", "int4"):
        want = {"session.disable_quant_qdq": "1"}
        artifact = manifest.artifact("onnx", precision)
        assert artifact.session_config == want
        gen = edgegen.runtime.load(manifest.directory, precision=precision)
        entries = gen.runner.session.get_session_options()
        assert entries.get_session_config_entry("session.disable_quant_qdq") == "1"


@pytest.mark.parametrize("name", ["gpt", "lstm"])
@pytest.mark.parametrize(
    "backend,precision", [("onnx", "int8"), ("onnx", "int4"), ("torchscript", "int8")]
)
def test_runtime_runs_quantized_artifacts(quantized, name, backend, precision):
    """The quantized artifact is the one that runs (its logits are not fp32's), and its
    greedy tokens start as fp32's do."""
    _, manifest = quantized[name]
    gen = edgegen.runtime.load(manifest.directory, backend=backend, precision=precision)
    fp32 = edgegen.runtime.load(manifest.directory, backend=backend)
    prompts = [gen.encode_prompt(p) for p in ("The quick", "A")]
    logits = [Decoder(g.runner, g.signature, 0).prefill(prompts) for g in (gen, fp32)]
    assert 1e-6 < np.abs(logits[0] - logits[1]).max() < 0.5 * np.abs(logits[1]).max()
    params = dict(temperature=0, max_new_tokens=16, ignore_eos=True)
    result = gen.generate_batch(["The quick", "A"], **params)
    want = fp32.generate_batch(["The quick", "A"], **params)
    assert [r.token_ids[0] for r in result] == [w.token_ids[0] for w in want]


@pytest.mark.parametrize("name", FAMILIES)
def test_verify_covers_quantized_artifacts(quantized, name):
    ckpt, manifest = quantized[name]
    report = verify_bundle(manifest.directory, ckpt, levels=(4, 6))
    assert report.passed, report.table()
    checked = {c.artifact for c in report.checks if c.level == 4}
    assert checked == {a.path for a in manifest.artifacts}


def test_failing_gate_publishes_nothing(trained_bundles, tmp_path):
    ckpt = trained_bundles["gru"][0]
    out = tmp_path / "b"
    export_bundle(ckpt, out, formats=["onnx"])
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    impossible = QuantizeOptions(precisions=("int8",), gates={"int8": {"ppl_change": -1.0}})
    with pytest.raises(ParityError, match=r"model\.int8\.onnx fails its int8 quality gate"):
        quantize_bundle(out, ckpt, impossible)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    with pytest.raises(ParityError):
        export_bundle(ckpt, tmp_path / "new", quantize=impossible)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_quantize_adds_to_an_existing_bundle(trained_bundles, tmp_path):
    ckpt, bundle = trained_bundles["lstm"]
    shutil.copytree(bundle, tmp_path / "b")
    manifest = quantize_bundle(tmp_path / "b", ckpt, QuantizeOptions(precisions=("int8",)))
    assert [(a.format, a.precision) for a in manifest.artifacts] == [
        ("onnx", "fp32"),
        ("torchscript", "fp32"),
        ("onnx", "int8"),
        ("torchscript", "int8"),
    ]
    again = quantize_bundle(tmp_path / "b", ckpt, QuantizeOptions(precisions=("int8",)))
    assert len(again.artifacts) == 4  # replaced, not duplicated
    data = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert set(data["parity"]["artifacts"]) == {a.path for a in again.artifacts}


@pytest.mark.parametrize("name", ["gpt-rope", "rnn"])
def test_quantize_without_the_checkpoint_uses_the_traced_weights(trained_bundles, tmp_path, name):
    """The fp32 TorchScript artifact carries the exported weights: quantizing from it
    gives the same quality figures as quantizing from the checkpoint."""
    ckpt, bundle = trained_bundles[name]
    for copy, checkpoint in (("with", ckpt), ("without", None)):
        shutil.copytree(bundle, tmp_path / copy)
        quantize_bundle(tmp_path / copy, checkpoint, QuantizeOptions(precisions=("int8",)))
    reports = [
        json.loads((tmp_path / c / "manifest.json").read_text())["parity"]["artifacts"]
        for c in ("with", "without")
    ]
    for path in ("model.int8.onnx", "model.int8.ts"):
        assert reports[0][path]["quality"] == reports[1][path]["quality"]
    shutil.rmtree(tmp_path / "without")
    shutil.copytree(bundle, tmp_path / "without")
    (tmp_path / "without" / "model.ts").write_bytes(b"")  # the hash check comes first
    with pytest.raises(BundleError, match="does not match its manifest hash"):
        quantize_bundle(tmp_path / "without", None, QuantizeOptions(precisions=("int8",)))


def test_quantize_without_a_checkpoint_needs_torchscript(trained_bundles, tmp_path):
    ckpt, _ = trained_bundles["gru"]
    export_bundle(ckpt, tmp_path / "b", formats=["onnx"])
    with pytest.raises(ExportError, match="pass --checkpoint"):
        quantize_bundle(tmp_path / "b", None, QuantizeOptions(precisions=("int8",)))


def test_quantize_errors(trained_bundles, tmp_path):
    ckpt, bundle = trained_bundles["gru"]
    with pytest.raises(ExportError, match="configs differ"):
        quantize_bundle(bundle, trained_bundles["gpt"][0], QuantizeOptions(precisions=("int8",)))
    with pytest.raises(ExportError, match="unknown precision int3"):
        export_bundle(ckpt, tmp_path / "b", quantize=QuantizeOptions(precisions=("int3",)))
    for precision, block in (("int4", 24), ("int4", 0)):  # 0 is a size asked for, not "auto"
        with pytest.raises(ExportError, match="block size must be a power of two"):
            options = QuantizeOptions(precisions=(precision,), block_size=block)
            export_bundle(ckpt, tmp_path / "b", quantize=options)
    with pytest.raises(ExportError, match="int8 block size must be a power of two >= 16, got 0"):
        options = QuantizeOptions(precisions=("int8",), block_size=0)
        export_bundle(trained_bundles["gpt"][0], tmp_path / "b", formats=["onnx"], quantize=options)
    with pytest.raises(ExportError, match="none of the asked precisions exists"):
        export_bundle(
            ckpt,
            tmp_path / "b",
            formats=["torchscript"],
            quantize=QuantizeOptions(precisions=("int4",)),
        )
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(ExportError, match="fp16 artifacts are for GPUs"):
            export_bundle(ckpt, tmp_path / "b", quantize=QuantizeOptions(precisions=("fp16",)))
        with pytest.raises(BackendError, match="device='cuda'"):
            edgegen.runtime.load(bundle, precision="fp16")
    assert not (tmp_path / "b").exists()


QUANTIZE_ONE_MATMUL = """
import sys
from pathlib import Path
import numpy as np, onnx
from onnx import helper, numpy_helper, TensorProto
from edgegen.export.quantize import quantize_onnx
weight = numpy_helper.from_array(np.ones((64, 32), np.float32), "w")
graph = helper.make_graph(
    [helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
    [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
    [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32])], [weight])
onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), sys.argv[1])
quantize_onnx(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3])
"""


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_quantizing_says_nothing_in_a_fresh_process(tmp_path, precision):
    """ONNX Runtime's quantizer logs each node at INFO and, imported for the first time,
    turns the root logger up to INFO: none of it reaches the console."""
    paths = [str(tmp_path / "m.onnx"), str(tmp_path / "q.onnx")]
    done = subprocess.run(
        [sys.executable, "-c", QUANTIZE_ONE_MATMUL, *paths, precision],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "" and done.stderr == ""


def test_cli_quantize(trained_bundles, tmp_path):
    ckpt = trained_bundles["gru"][0]
    runner = CliRunner()
    out = tmp_path / "b"
    result = runner.invoke(main, ["export", str(ckpt), "--out", str(out), "--quantize", "int8"])
    assert result.exit_code == 0, result.output
    assert "model.int8.onnx" in result.stdout and "of fp32" in result.stdout
    result = runner.invoke(  # no checkpoint: the weights come from model.ts
        main, ["quantize", str(out), "--precision", "int4", "--gate", "int4.ppl_change=0.1"]
    )
    assert result.exit_code == 0, result.output
    assert "model.int4.onnx" in result.stdout
    for gate, message in [
        ("int8.top1", "--gate must look like"),
        ("int8.ppl_change=-1", "quality gate"),
    ]:
        args = ["quantize", str(out), "--checkpoint", str(ckpt), "--precision", "int8"]
        bad = runner.invoke(main, [*args, "--gate", gate])
        assert bad.exit_code == 1 and message in bad.stderr


@pytest.mark.gpu
def test_fp16_on_cuda(trained_bundles, tmp_path):
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("no CUDA execution provider")
    ckpt = trained_bundles["gpt"][0]
    manifest = export_bundle(ckpt, tmp_path / "b", quantize=QuantizeOptions(precisions=("fp16",)))
    assert manifest.artifact("onnx", "fp16").bytes < 0.6 * manifest.artifact("onnx", "fp32").bytes
    assert manifest.data["parity"]["artifacts"]["model.fp16.onnx"]["passed"]
    fmt, precision = FP16
    gen = edgegen.runtime.load(tmp_path / "b", fmt, precision=precision, device="cuda")
    fp32 = edgegen.runtime.load(tmp_path / "b")
    params = dict(temperature=0, max_new_tokens=8, ignore_eos=True)
    assert (
        gen.generate("The", **params).token_ids[:4] == fp32.generate("The", **params).token_ids[:4]
    )


def test_an_int4_fit_that_breaks_the_graph_is_not_taken_for_a_weak_fit(
    trained_bundles, tmp_path, monkeypatch
):
    """Only a failed quality gate moves on to the next fit; an artifact that cannot run
    the grid stops the export with its own reason."""
    from edgegen.export import writer

    calls = []

    def broken(spec, run, name, precision, gate, windows):
        calls.append(name)
        raise ParityError(f"{name}: batch 2, seq 3: wrong shape or non-finite output")

    monkeypatch.setattr(writer, "gate_quantized", broken)
    ckpt, _ = trained_bundles["gpt"]
    options = QuantizeOptions(precisions=("int4",))
    with pytest.raises(ParityError, match=r"^model\.int4\.onnx: batch 2, seq 3: wrong shape"):
        export_bundle(ckpt, tmp_path / "b", formats=["onnx"], quantize=options)
    assert calls == ["model.int4.onnx"]  # no other fit was tried
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize(
    "failures,used",
    [(0, "symmetric"), (1, "asymmetric"), (2, "HQQ-fitted asymmetric")],
    ids=["symmetric", "asymmetric", "hqq"],
)
def test_transformer_int4_tries_the_fits_fastest_first(
    trained_bundles, tmp_path, monkeypatch, failures, used
):
    """Symmetric round-to-nearest comes first, then asymmetric (both MatMulNBits' own
    kernel), then HQQ; each fit that fails the gate is named in the method."""
    from edgegen.export import writer

    real, calls = writer.gate_quantized, []

    def rounding_fails(spec, run, name, precision, gate, windows):
        calls.append(name)
        if len(calls) <= failures:
            figures = {"kl": float(len(calls)), "top1": 0.5, "ppl_change": 0.2}
            raise QualityGateError(f"{name} fails its gate; lower", figures)
        return real(spec, run, name, precision, gate, windows)

    monkeypatch.setattr(writer, "gate_quantized", rounding_fails)
    ckpt, _ = trained_bundles["gpt"]
    options = QuantizeOptions(precisions=("int4",))
    manifest = export_bundle(ckpt, tmp_path / "b", formats=["onnx"], quantize=options)
    method = manifest.artifact("onnx", "int4").quantization["method"]
    assert calls == ["model.int4.onnx"] * (failures + 1)
    assert method.startswith(f"MatMulNBits int4 ({used} blocks")
    failed = [
        "symmetric round-to-nearest in blocks of 32 failed the gate: KL 1.00e+00, top-1 50.00%, "
        "ppl +20.00%",
        "asymmetric round-to-nearest in blocks of 32 failed the gate: KL 2.00e+00",
    ][:failures]
    assert all(f in method for f in failed) and method.count("failed the gate") == failures
    graph = onnx.load(str(tmp_path / "b" / "model.int4.onnx")).graph
    inits = {t.name: t for t in graph.initializer}
    nbits = [n for n in graph.node if n.op_type == "MatMulNBits"]
    zero_points = [inits[n.input[3]] for n in nbits if len(n.input) > 3 and n.input[3]]
    assert bool(zero_points) == (used != "symmetric")
    assert all(z.data_type == onnx.TensorProto.UINT8 for z in zero_points)  # HQQ's rounded


def test_hqq_zero_points_moved_out_of_the_kernel_keep_the_logits(trained_bundles, tmp_path):
    """HQQ's float zero points are rounded for MatMulNBits' fast kernel, and their
    residuals ride along as an extra 4-bit block of weights over the block sums of each
    input: no float zero point is left, each input is summed once, and the logits stay
    close to those of the HQQ graph."""
    import numpy as np
    import onnxruntime as ort

    from edgegen.export import quantize as q

    _, bundle = trained_bundles["gpt"]
    moved, kept = tmp_path / "moved.onnx", tmp_path / "kept.onnx"
    fp32_compute = dict(accuracy_level=0, fit="hqq")  # so both sides compute alike
    q.quantize_onnx(bundle / "model.onnx", moved, "int4", **fp32_compute)
    original = q.move_zero_points_out
    try:
        q.move_zero_points_out = lambda model, accuracy_level=0: 0
        q.quantize_onnx(bundle / "model.onnx", kept, "int4", **fp32_compute)
    finally:
        q.move_zero_points_out = original
    graph = onnx.load(str(moved)).graph
    inits = {t.name: t for t in graph.initializer}
    nbits = [n for n in graph.node if n.op_type == "MatMulNBits"]
    corrected = [n for n in nbits if len(n.input) > 3 and n.input[3]]
    assert all(inits[n.input[3]].data_type == onnx.TensorProto.UINT8 for n in corrected)
    assert len(corrected) == len(nbits) - 1  # all but the head, which is 8-bit symmetric
    concats = {n.output[0]: n for n in graph.node if "/with_block_sums_" in n.output[0]}
    assert all(n.input[0] in concats for n in corrected)
    assert len(concats) == len({n.input[0] for n in corrected})  # one per input
    for node in corrected:  # the block sums' extra blocks
        attrs = {a.name: a.i for a in node.attribute}
        original_k = int(concats[node.input[0]].input[1].rsplit("_", 1)[1].split("x")[0])
        assert attrs["K"] % attrs["block_size"] == 0 and attrs["K"] > original_k
    unmoved = [n for n in onnx.load(str(kept)).graph.node if n.op_type == "MatMulNBits"]
    assert sum(bool(n.input[3:4] and n.input[3]) for n in unmoved) == len(corrected)
    session = ort.InferenceSession(str(moved))
    feeds = {"input_ids": np.array([[5, 6, 7, 8]]), "position_ids": np.arange(4)[None]}
    feeds["attention_mask"] = np.ones((1, 4), np.int64)
    for io in session.get_inputs()[3:]:
        feeds[io.name] = np.zeros((1, io.shape[1], 0, io.shape[3]), np.float32)
    a = session.run(None, feeds)[0]
    b = ort.InferenceSession(str(kept)).run(None, feeds)[0]
    # the residuals are kept to 1/14 of a column's largest: close, not exact
    assert np.abs(a - b).max() <= 2e-2 * np.abs(b).max()

import json
import shutil

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

import edgegen.runtime
import edgegen.verify as verify_module
from edgegen.cli import main
from edgegen.eager import load_eager
from edgegen.errors import VerifyError
from edgegen.export import FORMATS, parity
from edgegen.export.quantize import SUPPORTED
from edgegen.files import sha256_file
from edgegen.runtime.decoder import Decoder
from edgegen.runtime.manifest import PRECISIONS, read_manifest
from edgegen.verify import LEVELS, check_sampling, verify_bundle
from tests import test_quantize
from tests.conftest import copy_with_fp16, parametrized

MATRIX = ["gpt", "gpt-rope", "gru", "lstm", "rnn"]


def test_every_exportable_combination_is_verified(trained_bundles):
    """fp32: the matrix below verifies every artifact of its bundles; int8/int4:
    test_quantize.py verifies every family's quantized bundle, which holds every
    supported combination but fp16 (its GPU test)."""
    matrix = parametrized(test_matrix_passes_every_level, "name")
    fp32 = {
        (a.format, a.precision)
        for n in matrix
        for a in read_manifest(trained_bundles[n][1]).artifacts
    }
    assert fp32 == {(fmt, "fp32") for fmt in FORMATS}
    quantized = parametrized(test_quantize.test_verify_covers_quantized_artifacts, "name")
    assert quantized == test_quantize.FAMILIES
    assert {precision for _, precision in fp32 | SUPPORTED} == set(PRECISIONS)


@pytest.mark.parametrize("name", MATRIX)
def test_matrix_passes_every_level(trained_bundles, name):
    ckpt, bundle = trained_bundles[name]
    report = verify_bundle(bundle, ckpt, tokens=48)
    assert report.passed, report.table()
    assert {c.level for c in report.checks} == set(LEVELS)
    covered = {(c.artifact, c.level) for c in report.checks}
    for artifact in read_manifest(bundle).artifacts:
        assert {(artifact.path, level) for level in (1, 2, 3, 4, 6)} <= covered
    assert json.loads(json.dumps(report.to_dict()))["passed"]


def test_golden_greedy_continuation_on_every_backend(trained_bundles):
    ckpt, bundle = trained_bundles["gpt"]
    generators = [
        load_eager(ckpt),
        edgegen.runtime.load(bundle, backend="onnx"),
        edgegen.runtime.load(bundle, backend="torchscript"),
    ]
    for g in generators:
        text = g.generate("The quick", temperature=0, max_new_tokens=40, ignore_eos=True).text
        assert text == " brown fox jumps ove the lazy dog. The q", g.backend


# --- each level catches a fault of its own kind ---------------------------------------


@pytest.fixture
def gpt_copy(trained_bundles, tmp_path):
    ckpt, bundle = trained_bundles["gpt"]
    shutil.copytree(bundle, tmp_path / "b")
    return ckpt, tmp_path / "b"


def failed_levels(report):
    return {c.level for c in report.checks if not c.passed}


def test_level_1_catches_a_perturbed_weight(gpt_copy):
    ckpt, bundle = gpt_copy
    path = bundle / "model.onnx"
    model = onnx.load(str(path))
    init = max(model.graph.initializer, key=lambda t: np.prod(t.dims))
    values = onnx.numpy_helper.to_array(init).copy()
    values.flat[:50] += 0.05
    init.CopyFrom(onnx.numpy_helper.from_array(values, init.name))
    onnx.save(model, str(path))
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["artifacts"][0]["sha256"] = sha256_file(path)  # a consistent, wrong bundle
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    report = verify_bundle(bundle, ckpt, levels=(1, 6), tokens=8)
    assert failed_levels(report) == {1}
    failure = next(c for c in report.checks if not c.passed)
    assert failure.artifact == "model.onnx" and "differs from eager" in failure.detail


class StaleCacheDecoder(Decoder):
    """Loses each decoded token's keys and values (its cache slot stays zero)."""

    def decode_one_token(self, tokens):
        logits = super().decode_one_token(tokens)
        for buffer in self.state:
            buffer[:, :, self.length - 1] = 0
        return logits


class OffByOneRunner:
    """A backend whose decode steps see positions one too far."""

    def __init__(self, runner):
        self.runner = runner

    def run(self, feeds):
        if feeds["input_ids"].shape[1] == 1:
            feeds = {**feeds, "position_ids": feeds["position_ids"] + 1}
        return self.runner.run(feeds)


def test_level_2_catches_a_wrong_cache_update(trained_bundles, monkeypatch):
    ckpt, bundle = trained_bundles["gpt"]
    monkeypatch.setattr(parity, "Decoder", StaleCacheDecoder)
    report = verify_bundle(bundle, ckpt, levels=(1, 2), tokens=8)
    assert failed_levels(report) == {2}


@pytest.mark.parametrize("name", ["gru"])
def test_level_2_catches_a_wrong_state_update_in_rnns(trained_bundles, monkeypatch, name):
    ckpt, bundle = trained_bundles[name]
    monkeypatch.setattr(parity, "Decoder", StaleCacheDecoder)
    assert failed_levels(verify_bundle(bundle, ckpt, levels=(2,), tokens=8)) == {2}


def test_level_3_catches_an_off_by_one_position(trained_bundles, monkeypatch):
    ckpt, bundle = trained_bundles["gpt"]

    def load_off_by_one(*args):
        generator = edgegen.runtime.open_artifact(*args)
        generator.runner = OffByOneRunner(generator.runner)
        return generator

    monkeypatch.setattr(verify_module, "open_artifact", load_off_by_one)
    report = verify_bundle(bundle, ckpt, levels=(1, 3), tokens=32)
    assert failed_levels(report) == {3}  # every single step is right; the loop is not
    failure = next(c for c in report.checks if not c.passed)
    assert failure.figure.startswith("diverges at token")


def test_level_5_catches_a_diverging_sampler(trained_bundles):
    ckpt, bundle = trained_bundles["gpt"]
    honest = edgegen.runtime.load(bundle)

    class Diverging(type(honest)):
        def generate(self, prompt, **sampling):
            return super().generate(prompt, **{**sampling, "seed": sampling["seed"] + 1})

    liar = Diverging(honest.runner, honest.signature, honest.tokenizer, {}, "onnx")
    liar.context = honest.context
    good = check_sampling({"eager": load_eager(ckpt), "onnx": honest}, ["The "], 32)
    bad = check_sampling({"eager": load_eager(ckpt), "onnx": liar}, ["The "], 32)
    assert good.passed and not bad.passed and "onnx differ" in bad.figure


def test_level_6_catches_a_tampered_file(gpt_copy):
    ckpt, bundle = gpt_copy
    with open(bundle / "model.ts", "ab") as f:
        f.write(b"tampered")
    report = verify_bundle(bundle, ckpt)
    assert failed_levels(report) == {6}
    assert [c.level for c in report.checks] == [6, 6, 6]  # nothing loads a damaged file
    assert [c.artifact for c in report.checks if c.passed] == ["model.onnx", "tokenizer.json"]


def test_level_6_catches_a_damaged_tokenizer(gpt_copy):
    ckpt, bundle = gpt_copy
    (bundle / "tokenizer.json").write_text("{")
    report = verify_bundle(bundle, ckpt)
    assert [c.artifact for c in report.checks if not c.passed] == ["tokenizer.json"]
    assert "does not match its manifest hash" in report.checks[-1].detail


def test_level_4_gates_are_configurable(trained_bundles):
    ckpt, bundle = trained_bundles["lstm"]
    strict = {"fp32": {"kl": -1.0, "top1": 1.0, "ppl_change": 0.0}}
    report = verify_bundle(bundle, ckpt, levels=(4,), quality_gates=strict)
    assert failed_levels(report) == {4}
    assert all("KL" in c.figure and "top-1" in c.figure for c in report.checks)


def test_wrong_checkpoint_or_levels(trained_bundles):
    with pytest.raises(VerifyError, match="configs differ"):
        verify_bundle(trained_bundles["gpt"][1], trained_bundles["gru"][0])
    with pytest.raises(VerifyError, match="unknown level"):
        verify_bundle(trained_bundles["gpt"][1], trained_bundles["gpt"][0], levels=(7,))


def test_cli_verify(trained_bundles, tmp_path):
    ckpt, bundle = trained_bundles["rnn"]
    runner = CliRunner()
    out = tmp_path / "report.json"
    args = ["verify", str(bundle), "--checkpoint", str(ckpt), "--tokens", "16"]
    result = runner.invoke(main, [*args, "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "level" in result.stdout and "5 sampling" in result.stdout
    assert json.loads(out.read_text())["passed"] is True
    bad_levels = runner.invoke(main, [*args, "--levels", "1,x"])
    assert bad_levels.exit_code == 1 and "levels must be numbers" in bad_levels.stderr


def test_cli_verify_failure_exits_non_zero(gpt_copy):
    ckpt, bundle = gpt_copy
    (bundle / "model.onnx").write_bytes(b"not a model")
    result = CliRunner().invoke(main, ["verify", str(bundle), "--checkpoint", str(ckpt)])
    assert result.exit_code == 1
    assert "FAIL" in result.stdout and result.stderr.strip() == "error: 1 of 3 checks failed"


# --- a check that cannot run is skipped, never passed ------------------------------------


@pytest.fixture
def fp16_bundle(trained_bundles, tmp_path, monkeypatch):
    """The rnn bundle with an fp16 artifact listed, on a machine without a CUDA GPU."""
    ckpt, bundle = trained_bundles["rnn"]
    monkeypatch.setattr(verify_module, "cuda_provider_available", lambda: False)
    return ckpt, copy_with_fp16(bundle, tmp_path / "b")


def test_a_check_that_cannot_run_is_skipped_not_passed(fp16_bundle):
    ckpt, bundle = fp16_bundle
    report = verify_bundle(bundle, ckpt, levels=(4,))
    (check,) = [c for c in report.checks if c.artifact == "model.fp16.onnx"]
    assert check.skipped and not check.passed and check.result == "skipped"
    assert report.counts() == {"passed": 2, "skipped": 1, "failed": 0}
    assert not report.passed and not report.failed
    assert report.table().splitlines()[-1] == "2 passed, 1 skipped, 0 failed"
    data = json.loads(json.dumps(report.to_dict()))
    assert data["passed"] is False and data["counts"]["skipped"] == 1
    assert [c["result"] for c in data["checks"]].count("skipped") == 1


def test_cli_verify_exits_0_with_skips_unless_strict(fp16_bundle):
    ckpt, bundle = fp16_bundle
    args = ["verify", str(bundle), "--checkpoint", str(ckpt), "--levels", "4"]
    lenient = CliRunner().invoke(main, args)
    assert lenient.exit_code == 0, lenient.output
    assert "2 passed, 1 skipped, 0 failed" in lenient.stdout and "skipped" in lenient.stdout
    strict = CliRunner().invoke(main, [*args, "--strict"])
    assert strict.exit_code == 1
    assert strict.stderr.strip() == "error: 1 of 3 checks skipped (--strict)"

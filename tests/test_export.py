import json
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner

from edgegen.checkpoint import write_model_files
from edgegen.cli import main
from edgegen.config import FAMILIES, RNN_CELLS, preset
from edgegen.errors import ExportError, OutputError, ParityError
from edgegen.export import FORMATS, export_bundle, parity
from edgegen.export import writer as export_writer
from edgegen.export.onnx import export_onnx
from edgegen.export.parity import DECODE_CAPACITY, GRID, grid
from edgegen.export.spec import step_spec
from edgegen.models import build_model
from edgegen.runtime.decoder import Decoder
from edgegen.tokenizer import ByteTokenizer
from tests.conftest import parametrized

MODELS = {
    "gpt-learned": dict(family="gpt", dim=32, n_heads=4, pos_encoding="learned"),
    "gpt-rope": dict(family="gpt", dim=32, n_heads=4, pos_encoding="rope", tie_embeddings=False),
    "gru": dict(family="rnn", cell="gru", dim=32, hidden_size=48),
    "lstm": dict(family="rnn", cell="lstm", dim=32, hidden_size=48),
    "rnn": dict(family="rnn", cell="rnn", dim=32, hidden_size=48),
}
NATIVE_OP = {"gru": "GRU", "lstm": "LSTM", "rnn": "RNN"}


def make_checkpoint(path, family, preset_name="tiny", **overrides):
    torch.manual_seed(0)
    model = build_model(preset(family, preset_name, **overrides))
    path.mkdir(parents=True)
    write_model_files(path, model, ByteTokenizer())
    return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return {name: make_checkpoint(root / name, **kw) for name, kw in MODELS.items()}


def test_every_family_cell_and_format_has_an_export_test():
    tested = {(kw["family"], kw.get("cell")) for kw in MODELS.values()}
    assert {f for f, _ in tested} == set(FAMILIES)
    assert {c for f, c in tested if f == "rnn"} == set(RNN_CELLS)
    assert parametrized(test_export_passes_the_parity_gate, "fmt") == list(FORMATS)
    assert parametrized(test_export_passes_the_parity_gate, "name") == list(MODELS)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", MODELS)
def test_export_passes_the_parity_gate(tmp_path, checkpoints, name, fmt):
    manifest = export_bundle(checkpoints[name], tmp_path / "bundle", formats=[fmt])
    (artifact,) = manifest.artifacts
    assert artifact.format == fmt and artifact.precision == "fp32"
    report = manifest.data["parity"]["artifacts"][artifact.path]
    assert report["passed"] and report["max_abs_diff"] <= 1e-4
    cases = [c["case"] for c in report["checks"]]
    several_after_past = "step batch=3 seq=7 past=5"  # one row at a time for a GPT
    assert len(cases) == len(GRID) + 1 - (several_after_past not in cases)
    assert (several_after_past in cases) == (not name.startswith("gpt"))
    decode = report["checks"][-1]["case"]
    assert decode.startswith("prefill 7/3 + decode 5")
    if name.startswith("gpt"):  # the runtime's Decoder ran, and its KV buffer grew
        assert decode.endswith(f"(KV buffer {DECODE_CAPACITY} -> {2 * DECODE_CAPACITY} slots)")
    names = sorted(p.name for p in (tmp_path / "bundle").iterdir())
    assert names == sorted(["manifest.json", "tokenizer.json", artifact.path])
    assert not list(tmp_path.glob(".bundle.*"))  # no temporary directories left behind


class ForgetfulGrowth(Decoder):
    """Loses the cache whenever its buffer grows (the slots it had are not copied)."""

    def _reserve(self, needed):
        had = self.length
        super()._reserve(needed)
        if had:
            for buffer in self.state:
                buffer[:, :, :had] = 0


def test_the_gate_drives_the_runtime_decoder_past_its_first_capacity(
    tmp_path, checkpoints, monkeypatch
):
    monkeypatch.setattr(parity, "Decoder", ForgetfulGrowth)
    with pytest.raises(ParityError, match=r"prefill 7/3 \+ decode 5 .*KV buffer 8 -> 16"):
        export_bundle(checkpoints["gpt-learned"], tmp_path / "b", formats=["onnx"])
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("name", MODELS)
def test_onnx_graph_is_dynamic_and_runs_without_warnings(tmp_path, checkpoints, name, capfd):
    manifest = export_bundle(checkpoints[name], tmp_path / "b", formats=["onnx"])
    path = tmp_path / "b" / "model.onnx"
    graph = onnx.load(str(path)).graph
    ops = {n.op_type for n in graph.node}
    if name in NATIVE_OP:
        assert NATIVE_OP[name] in ops and not ops & {"Loop", "Scan"}
    declared = {io["name"]: io["shape"] for io in manifest.signature["inputs"]}
    for value in graph.input:
        dims = [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
        assert dims == declared[value.name]
    spec = step_spec(build_model(manifest.config))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    capfd.readouterr()
    for batch, seq, past in grid(spec):
        feeds = spec.example(batch, seq, past)
        session.run(None, {k: v.numpy() for k, v in feeds.items()})
    captured = capfd.readouterr()
    assert captured.err == "" and captured.out == ""


@pytest.mark.parametrize("name", ["gpt-rope", "lstm"])
def test_torchscript_loads_without_edgegen(tmp_path, checkpoints, name):
    export_bundle(checkpoints[name], tmp_path / "b", formats=["torchscript"])
    code = (
        "import sys; sys.modules['edgegen'] = None; import torch; "
        f"m = torch.jit.load({str(tmp_path / 'b' / 'model.ts')!r}); "
        "ids = torch.tensor([[256, 72, 105]]); "
        + (
            "out = m(ids, torch.arange(3)[None], torch.ones(1, 3, dtype=torch.long), "
            "*[torch.zeros(1, 4, 3, 8)] * 4)"
            if name.startswith("gpt")
            else "out = m(ids, torch.zeros(2, 1, 48), torch.zeros(2, 1, 48))"
        )
        + "; assert out[0].shape == (1, 3, 259), out[0].shape"
    )
    subprocess.run([sys.executable, "-W", "ignore", "-c", code], check=True)


def test_manifest_records_the_contract(tmp_path, checkpoints):
    manifest = export_bundle(checkpoints["gpt-learned"], tmp_path / "b", max_seq_len=64)
    data = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert data["format"] == "edgegen-bundle" and data["format_version"] == 4
    assert data["model"]["family"] == "gpt" and data["model"]["config"]["dim"] == 32
    assert data["tokenizer"]["spec"]["type"] == "byte"
    sig = data["signature"]
    assert sig["state"][0] == {"input": "past_key_values.0.key", "output": "present.0.key"}
    assert sig["layout"]["kv_axes"] == ["batch", "heads", "seq", "head_dim"]
    assert {a["format"]: a.get("opset") for a in data["artifacts"]} == {
        "onnx": 18,
        "torchscript": None,
    }
    assert data["generation"]["max_seq_len"] == 64 and data["generation"]["add_bos"]
    assert set(data["producer"]) >= {"edgegen", "torch", "onnx", "onnxruntime"}
    assert manifest.artifact("onnx").sha256 == data["artifacts"][0]["sha256"]


def test_rnn_manifest_names_its_state(tmp_path, checkpoints):
    manifest = export_bundle(checkpoints["lstm"], tmp_path / "b", formats=["onnx"])
    assert manifest.signature["state"] == [
        {"input": "state.h", "output": "state_out.h"},
        {"input": "state.c", "output": "state_out.c"},
    ]
    assert manifest.generation["max_seq_len"] is None


def test_existing_bundle_needs_force(tmp_path, checkpoints):
    out = tmp_path / "b"
    export_bundle(checkpoints["gru"], out, formats=["onnx"])
    before = (out / "manifest.json").read_bytes()
    with pytest.raises(OutputError, match="already exists"):
        export_bundle(checkpoints["gru"], out, formats=["onnx"])
    assert (out / "manifest.json").read_bytes() == before
    export_bundle(checkpoints["gru"], out, formats=["torchscript"], force=True)
    assert [a.format for a in export_bundle(checkpoints["gru"], out, force=True).artifacts] == [
        "onnx",
        "torchscript",
    ]


def _perturbed_onnx(spec, path, opset):
    export_onnx(spec, path, opset)
    model = onnx.load(str(path))
    init = max(model.graph.initializer, key=lambda t: np.prod(t.dims))
    values = onnx.numpy_helper.to_array(init).copy()
    values.flat[0] += 0.5
    init.CopyFrom(onnx.numpy_helper.from_array(values, init.name))
    onnx.save(model, str(path))


def test_perturbed_weight_fails_the_gate_and_publishes_nothing(tmp_path, checkpoints, monkeypatch):
    out = tmp_path / "b"
    export_bundle(checkpoints["gpt-learned"], out, formats=["torchscript"])
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    monkeypatch.setitem(export_writer.EXPORTERS, "onnx", _perturbed_onnx)
    with pytest.raises(ParityError, match=r"model\.onnx: step batch=1 seq=1 past=0: .* differs"):
        export_bundle(checkpoints["gpt-learned"], out, force=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # previous bundle intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]
    with pytest.raises(ParityError):
        export_bundle(checkpoints["gpt-learned"], tmp_path / "new")
    assert not (tmp_path / "new").exists()


def test_bad_export_requests(tmp_path, checkpoints):
    with pytest.raises(ExportError, match="unknown format"):
        export_bundle(checkpoints["gru"], tmp_path / "b", formats=["tflite"])
    with pytest.raises(ExportError, match="opset must be between 18 and 23, got 13"):
        export_bundle(checkpoints["gpt-learned"], tmp_path / "b", formats=["onnx"], opset=13)
    with pytest.raises(ExportError, match="exceeds the model's context"):
        export_bundle(checkpoints["gpt-learned"], tmp_path / "b", max_seq_len=4096)
    assert not (tmp_path / "b").exists()


def test_cli_export(tmp_path, checkpoints):
    runner = CliRunner()
    out = tmp_path / "b"
    result = runner.invoke(main, ["export", str(checkpoints["gru"]), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "model.onnx" in result.stdout and "model.ts" in result.stdout and "pass" in result.stdout
    again = runner.invoke(main, ["export", str(checkpoints["gru"]), "--out", str(out)])
    assert again.exit_code == 1 and again.stderr.startswith("error: ") and "--force" in again.stderr
    bad = runner.invoke(main, ["export", str(tmp_path / "nope"), "--out", str(tmp_path / "c")])
    assert bad.exit_code == 1 and "checkpoint directory not found" in bad.stderr
    fmt = runner.invoke(
        main,
        [
            "export",
            str(checkpoints["gru"]),
            "--out",
            str(tmp_path / "c"),
            "--format",
            "onnx,coreml",
        ],
    )
    assert fmt.exit_code == 1 and "unknown format coreml" in fmt.stderr


@pytest.mark.slow
@pytest.mark.parametrize("family,cell", [("gpt", None), *[("rnn", c) for c in RNN_CELLS]])
def test_small_presets_export(tmp_path, family, cell):
    ckpt = make_checkpoint(tmp_path / "ckpt", family, "small", **({"cell": cell} if cell else {}))
    manifest = export_bundle(ckpt, tmp_path / "b")
    reports = manifest.data["parity"]["artifacts"]
    assert all(r["passed"] and r["max_abs_diff"] <= 1e-4 for r in reports.values())


@pytest.mark.parametrize("pos_encoding", ["learned", "rope"])
def test_gpt_step_ignores_masked_cache_slots(pos_encoding):
    """The runtime passes its whole cache buffer; slots the mask marks empty (here
    filled with garbage) must not change any output."""
    torch.manual_seed(0)
    model = build_model(preset("gpt", "tiny", dim=32, n_heads=4, pos_encoding=pos_encoding))
    spec = step_spec(model)
    feeds = spec.example(batch=3, seq=2, past=5)  # slots 5 and 6 are garbage, masked
    names = spec.input_names
    trimmed = dict(feeds)
    trimmed["attention_mask"] = torch.cat(
        [feeds["attention_mask"][:, :5], feeds["attention_mask"][:, 7:]], dim=1
    )
    for name in names[3:]:
        trimmed[name] = torch.cat([feeds[name][:, :, :5], feeds[name][:, :, 7:]], dim=2)
    louder = {**feeds, **{n: feeds[n].clone() for n in names[3:]}}
    for name in names[3:]:
        louder[name][:, :, 5:7] = 1e4
    with torch.no_grad():
        want = spec.module(*trimmed.values())
        for variant in (feeds, louder):
            got = spec.module(*(t.clone() for t in variant.values()))
            torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
            for buffer, expected in zip(got[1:], want[1:], strict=True):  # the new slots
                torch.testing.assert_close(buffer[:, :, 7:9], expected[:, :, 5:7])

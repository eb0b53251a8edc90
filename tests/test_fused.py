"""The GPT's ONNX graph uses ONNX Runtime's fused kernels (export/fused.py), computes what
the eager model computes, and leaves the model as it was."""

import collections

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from edgegen.config import preset
from edgegen.export.fused import FusedRMSNorm, check_model, ort_kernels
from edgegen.export.onnx import export_onnx
from edgegen.export.parity import real_slots
from edgegen.export.spec import step_spec
from edgegen.models import build_model
from edgegen.models.gpt import Rotary
from edgegen.runtime.backends import OnnxRunner
from edgegen.runtime.decoder import in_place_state

LLAMA_LIKE = dict(
    dim=32, n_heads=4, n_kv_heads=2, pos_encoding="rope", norm="rmsnorm", mlp="gated",
    activation="silu",
)  # fmt: skip
UNFUSED_OPS = {"Pow", "ReduceMean", "Sqrt", "Reciprocal", "Sin", "Cos"}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model(preset("gpt", "tiny", **LLAMA_LIKE))
    spec = step_spec(model)
    path = tmp_path_factory.mktemp("fused") / "model.onnx"
    export_onnx(spec, path)
    return spec, path


def test_rmsnorm_rope_and_attention_become_one_kernel_each(exported):
    spec, path = exported
    layers = spec.module.model.config.n_layers
    nodes = onnx.load(str(path)).graph.node
    ops = collections.Counter(n.op_type for n in nodes)
    adds = {n.output[0] for n in nodes if n.op_type == "Add"}
    # two per block and the final, all but the first over a residual sum (one kernel)
    assert ops["SimplifiedLayerNormalization"] == 1
    assert ops["SkipSimplifiedLayerNormalization"] == 2 * layers
    assert not any(n.input[0] in adds for n in nodes if "LayerNorm" in n.op_type)
    assert ops["RotaryEmbedding"] == 2 * layers  # queries and keys
    assert ops["GroupQueryAttention"] == layers
    assert not (UNFUSED_OPS | {"Softmax"}) & set(ops)


@pytest.mark.parametrize("batch,seq,past", [(3, 1, 5), (1, 4, 5), (3, 4, 0)])
def test_fused_graph_matches_eager(exported, batch, seq, past):
    """Padded rows, a past with masked garbage slots, several tokens after a past."""
    spec, path = exported
    feeds = spec.example(batch=batch, seq=seq, past=past)
    with torch.no_grad():
        want = [t.numpy() for t in spec.module(*(t.clone() for t in feeds.values()))]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {k: v.numpy() for k, v in feeds.items()})
    mask = feeds["attention_mask"].numpy()
    assert len(got) == len(want)
    for g, w in zip(real_slots(got, mask), real_slots(want, mask), strict=True):
        np.testing.assert_allclose(g, w, atol=1e-4, rtol=1e-4)


def test_the_runner_binds_each_present_to_its_past(exported):
    """The runtime's ONNX backend hands back the caller's own buffers, written in place:
    the new slots hold the step's keys and values, every other slot is untouched."""
    spec, path = exported
    feeds = {k: v.numpy() for k, v in spec.example(batch=1, seq=1, past=5).items()}
    before = {k: v.copy() for k, v in feeds.items()}
    runner = OnnxRunner(path, spec.input_names, in_place=in_place_state(spec.signature()))
    got = runner.run(feeds)
    want = ort.InferenceSession(str(path)).run(None, before)
    total = before["attention_mask"].shape[1]  # batch 1: every slot it covers is real
    for name, out, expected in zip(spec.input_names[3:], got[1:], want[1:], strict=True):
        assert out is feeds[name]
        np.testing.assert_array_equal(out[:, :, :total], expected[:, :, :total])
        np.testing.assert_array_equal(out[:, :, total:], before[name][:, :, total:])
        assert not np.array_equal(out[:, :, total - 1], before[name][:, :, total - 1])
    np.testing.assert_array_equal(got[0], want[0])
    binding = runner._local.binding.binding
    binding.get_outputs = None  # the logits' shape follows from the inputs': never asked for
    feeds["input_ids"][0, 0] += 1  # mutated in place: still bound, read afresh
    again = runner.run(feeds)
    assert not np.array_equal(again[0], got[0])
    assert again[0] is not got[0] and again[0].shape == got[0].shape  # a fresh array a step


def test_the_runner_fetches_outputs_whose_shape_the_inputs_do_not_settle(tmp_path):
    """An output declared with a dimension no input names is allocated by ONNX Runtime and
    fetched; an input given as a non-contiguous view is bound as a copy, made again each
    run, so changes to the view are read."""
    f32 = onnx.TensorProto.FLOAT
    graph = onnx.helper.make_graph(
        [
            onnx.helper.make_node("Add", ["x", "x"], ["y"]),
            onnx.helper.make_node("Add", ["s", "x"], ["s2"]),
        ],
        "g",
        [onnx.helper.make_tensor_value_info(n, f32, ["b", 4]) for n in ("x", "s")],
        [
            onnx.helper.make_tensor_value_info("y", f32, ["rows", 4]),
            onnx.helper.make_tensor_value_info("s2", f32, ["b", 4]),
        ],
    )
    path = tmp_path / "g.onnx"
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]), path)
    runner = OnnxRunner(path, ["x", "s"], in_place={"s": "s2"})
    wide = np.arange(16, dtype=np.float32).reshape(2, 8)
    x, state = wide[:, ::2], np.zeros((2, 4), np.float32)
    y, s2 = runner.run({"x": x, "s": state})
    np.testing.assert_array_equal(y, 2 * x)
    assert s2 is state
    np.testing.assert_array_equal(state, x)
    wide += 1  # the view's values change; the array it was copied from is the same
    y, _ = runner.run({"x": x, "s": state})
    np.testing.assert_array_equal(y, 2 * x)
    np.testing.assert_array_equal(state, 2 * x - 1)


def test_the_model_is_restored_after_the_export(exported):
    model = exported[0].module.model
    assert isinstance(model.rope, Rotary)
    norms = [m for m in model.modules() if isinstance(m, nn.RMSNorm)]
    assert len(norms) == 2 * model.config.n_layers + 1
    assert not any(isinstance(m, FusedRMSNorm) for m in model.modules())


def test_swapped_modules_compute_the_models_own_values_outside_an_export():
    torch.manual_seed(0)
    model = build_model(preset("gpt", "tiny", **LLAMA_LIKE)).eval()
    ids = torch.randint(0, 200, (2, 6))
    with torch.no_grad():
        want = model(ids)[0]
        with ort_kernels(model):
            assert isinstance(model.blocks[0].norm1, FusedRMSNorm)
            got = model(ids)[0]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_check_model_knows_ort_ops_and_leaves_the_graph_as_it_was(exported):
    model = onnx.load(str(exported[1]))
    with pytest.raises(onnx.checker.ValidationError, match="SimplifiedLayerNormalization"):
        onnx.checker.check_model(model)
    before = model.SerializeToString()
    check_model(model)
    assert model.SerializeToString() == before


def test_a_tied_width_off_the_block_grid_keeps_its_own_int8_table(tmp_path):
    """MatMulNBits pads a width that is not a whole number of blocks (40 = 32 + 8): the
    embedding then keeps its own per-row table instead of gathering the padded blocks."""
    from edgegen.export.quantize import quantize_onnx

    torch.manual_seed(0)
    model = build_model(preset("gpt", "tiny", dim=40, n_heads=4, tie_embeddings=True))
    spec = step_spec(model)
    export_onnx(spec, tmp_path / "model.onnx")
    coverage = quantize_onnx(tmp_path / "model.onnx", tmp_path / "model.int8.onnx", "int8")
    assert "embedding int8 with per-row scales" in coverage["method"]
    feeds = {k: v.numpy() for k, v in spec.example(batch=2, seq=3, past=4).items()}
    options = ort.SessionOptions()
    for key, value in coverage["session_config"].items():
        options.add_session_config_entry(key, value)
    path = str(tmp_path / "model.int8.onnx")
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    logits = session.run(None, feeds)[0]
    assert logits.shape == (2, 3, model.config.vocab_size) and np.isfinite(logits).all()


def test_a_layernorm_gpt_with_biases_gets_skip_norms_and_packed_attention(tmp_path):
    """GPT-2's shape: LayerNorm over each residual sum becomes SkipLayerNormalization (a
    bias Add stays an Add), and attention without rotary takes the packed q/k/v."""
    torch.manual_seed(0)
    model = build_model(preset("gpt", "tiny", dim=32, n_heads=4, bias=True, head_bias=True))
    spec = step_spec(model)
    export_onnx(spec, tmp_path / "model.onnx")
    nodes = onnx.load(str(tmp_path / "model.onnx")).graph.node
    ops = collections.Counter(n.op_type for n in nodes)
    layers = model.config.n_layers
    assert ops["SkipLayerNormalization"] == 2 * layers + 1  # the embedding sum's too
    assert ops["GroupQueryAttention"] == layers and not ops["Split"]
    feeds = spec.example(batch=3, seq=1, past=5)
    with torch.no_grad():
        want = [t.numpy() for t in spec.module(*(t.clone() for t in feeds.values()))]
    session = ort.InferenceSession(str(tmp_path / "model.onnx"))
    got = session.run(None, {k: v.numpy() for k, v in feeds.items()})
    mask = feeds["attention_mask"].numpy()
    for g, w in zip(real_slots(got, mask), real_slots(want, mask), strict=True):
        np.testing.assert_allclose(g, w, atol=1e-4, rtol=1e-4)

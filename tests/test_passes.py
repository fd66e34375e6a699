"""Graph passes on small hand-built ONNX graphs: each rewrite keeps the outputs
(checked on ONNX Runtime) and changes what it says it changes."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from nemocompile.artifact.manifest import TensorSpec
from nemocompile.passes.base import PassContext, PassError
from nemocompile.passes.check_io import check_io
from nemocompile.passes.check_tensorrt import check_tensorrt, lint
from nemocompile.passes.fold_weight_transposes import fold_weight_transposes
from nemocompile.passes.lower_integer_clip import lower_integer_clip
from nemocompile.passes.pipeline import PIPELINE, STAGE_NAMES, PipelineOptions, run_pipeline
from nemocompile.passes.share_weights import INLINE_BYTES, WeightStore, share_weights


def build(nodes, inputs, outputs, initializers=(), opset=18) -> ir.Model:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    domains = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, 1) for d in {n.domain for n in nodes} if d]
    proto = helper.make_model(graph, opset_imports=domains)
    proto = onnx.shape_inference.infer_shapes(proto)
    return ir.serde.deserialize_model(proto)


def run(model: ir.Model, feeds: dict, directory) -> list[np.ndarray]:
    """Save (external data and all) and run on ORT CPU."""
    path = directory / f"m{len(list(directory.iterdir()))}.onnx"
    ir.save(model, path)
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)


def linear_model(weight: np.ndarray) -> ir.Model:
    """y = x @ W^T, exported the way torch exports nn.Linear: MatMul(x, Transpose(W))."""
    out_f, in_f = weight.shape
    return build(
        [helper.make_node("Transpose", ["W"], ["Wt"], perm=[1, 0]), helper.make_node("MatMul", ["x", "Wt"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, in_f])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, out_f])],
        [numpy_helper.from_array(weight, "W")],
    )


def ctx_for(model: ir.Model, weights=None, **kw) -> PassContext:
    def specs(values):
        return [TensorSpec(v.name, list(v.shape), {ir.DataType.FLOAT: "float32", ir.DataType.INT64: "int64"}[v.dtype])
                for v in values]
    return PassContext("test", specs(model.graph.inputs), specs(model.graph.outputs), weights=weights, **kw)


def test_fold_weight_transposes_keeps_outputs_and_drops_the_transpose(tmp_path):
    rng = np.random.default_rng(0)
    w, x = rng.standard_normal((24, 16)).astype(np.float32), rng.standard_normal((2, 16)).astype(np.float32)
    model = linear_model(w)
    before = run(model, {"x": x}, tmp_path)[0]
    result = fold_weight_transposes(model, ctx_for(model))
    assert result.modified and result.count == 1
    assert [n.op_type for n in model.graph] == ["MatMul"]
    assert list(model.graph.initializers) == ["W.T"]  # the untransposed weight is gone, not kept twice
    assert list(model.graph.initializers["W.T"].shape) == [16, 24]
    np.testing.assert_array_equal(run(model, {"x": x}, tmp_path)[0], before)


def test_share_weights_writes_each_distinct_tensor_once(tmp_path):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((32, 16)).astype(np.float32)
    x = rng.standard_normal((2, 16)).astype(np.float32)
    a, b = linear_model(w), linear_model(w)  # two graphs, the same weight
    small = build([helper.make_node("Add", ["x", "c"], ["y"])],
                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
                  [numpy_helper.from_array(np.ones(4, np.float32), "c")])
    expected = run(a, {"x": x}, tmp_path)[0]
    art = tmp_path / "artifact"
    art.mkdir()
    store = WeightStore(art)
    for m in (a, b, small):
        share_weights(m, ctx_for(m, weights=store))
    store.close()
    ta, tb = a.graph.initializers["W"].const_value, b.graph.initializers["W"].const_value
    assert isinstance(ta, ir.ExternalTensor) and (ta.offset, ta.length) == (tb.offset, tb.length)
    assert store.size == w.nbytes  # one copy on disk, although two graphs use it
    assert store.offered_bytes == 2 * w.nbytes
    assert small.graph.initializers["c"].const_value.nbytes < INLINE_BYTES
    assert not isinstance(small.graph.initializers["c"].const_value, ir.ExternalTensor)  # tiny stays inline
    for i, m in enumerate((a, b)):
        ir.save(m, art / f"g{i}.onnx")
        onnx.checker.check_model(str(art / f"g{i}.onnx"), full_check=True)
        got = ort.InferenceSession(str(art / f"g{i}.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})
        np.testing.assert_array_equal(got[0], expected)


def integer_clip_model() -> ir.Model:
    return build([helper.make_node("Clip", ["x", "lo", "hi"], ["y"])],
                 [helper.make_tensor_value_info("x", TensorProto.INT64, [6])],
                 [helper.make_tensor_value_info("y", TensorProto.INT64, [6])],
                 [numpy_helper.from_array(np.array(0, np.int64), "lo"),
                  numpy_helper.from_array(np.array(3, np.int64), "hi")])


def test_lower_integer_clip_makes_the_graph_tensorrt_parsable(tmp_path):
    model = integer_clip_model()
    x = np.array([-5, -1, 0, 2, 3, 9], np.int64)
    before = run(model, {"x": x}, tmp_path)[0]
    assert any("Clip" in f and "INT64" in f for f in lint(model))
    result = lower_integer_clip(model, ctx_for(model))
    assert result.count == 1 and [n.op_type for n in model.graph] == ["Max", "Min"]
    np.testing.assert_array_equal(run(model, {"x": x}, tmp_path)[0], before)
    np.testing.assert_array_equal(before, [0, 0, 0, 2, 3, 3])
    assert lint(model) == []


def test_lower_integer_clip_leaves_float_clip_alone():
    model = build([helper.make_node("Clip", ["x"], ["y"])],
                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])])
    assert not lower_integer_clip(model, ctx_for(model)).modified


def test_check_tensorrt_reports_what_the_parser_rejects():
    model = build(
        [helper.make_node("Unique", ["x"], ["u"]), helper.make_node("Relu", ["x"], ["y"]),
         helper.make_node("Softmax", ["i"], ["s"]), helper.make_node("Foo", ["x"], ["z"], domain="custom")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"]),
         helper.make_tensor_value_info("i", TensorProto.INT64, [4])],
        [helper.make_tensor_value_info(n, t, None) for n, t in
         (("u", TensorProto.FLOAT), ("y", TensorProto.FLOAT), ("s", TensorProto.INT64), ("z", TensorProto.FLOAT))],
    )
    result = check_tensorrt(model, PassContext("test", [], []))
    text = "\n".join(result.findings)
    assert not result.modified
    assert "Unique" in text and "not supported" in text
    assert "no optimization profile can bound" in text and "'x'" in text
    assert "Softmax" in text and "INT64" in text
    assert "custom domain" in text
    assert not any("Relu" in f and "type" in f for f in result.findings)  # supported op, supported type


def test_check_tensorrt_flags_an_opset_outside_the_parser_range():
    model = build([helper.make_node("Relu", ["x"], ["y"])],
                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])], opset=7)
    assert any("opset 7" in f for f in lint(model))


def test_check_io_rejects_a_broken_contract():
    model = linear_model(np.zeros((4, 3), np.float32))
    ctx = ctx_for(model)
    check_io(model, ctx)  # the contract it was built with holds
    renamed = PassContext("test", [TensorSpec("input_ids", [2, 3], "float32")], ctx.outputs)
    with pytest.raises(PassError, match=r"graph inputs are \['x'\].*needs \['input_ids'\]"):
        check_io(model, renamed)
    reshaped = PassContext("test", [TensorSpec("x", [2, 5], "float32")], ctx.outputs)
    with pytest.raises(PassError, match=r"shape \[2, 3\], expected \[2, 5\]"):
        check_io(model, reshaped)


def test_pipeline_order_and_dump(tmp_path):
    # the ordering constraints documented in pipeline.py
    order = STAGE_NAMES
    assert order[0] == "check_io_in" and order[-1] == "check_tensorrt"
    assert order.index("fold_weight_transposes") < order.index("share_weights") < order.index("simplify_graph")
    assert order.index("check_io_out") > order.index("lower_integer_clip")
    rng = np.random.default_rng(2)
    w, x = rng.standard_normal((40, 16)).astype(np.float32), rng.standard_normal((2, 16)).astype(np.float32)
    model = linear_model(w)
    expected = run(model, {"x": x}, tmp_path)[0]
    art = tmp_path / "art"
    art.mkdir()
    store = WeightStore(art)
    ctx = ctx_for(model, weights=store, dump_dir=tmp_path / "dump")
    results = dict(run_pipeline(model, ctx, PipelineOptions(), dump_after="fold_weight_transposes"))
    store.close()
    assert results["fold_weight_transposes"].count == 1 and results["share_weights"].count == 1
    assert results["check_tensorrt"].findings == []
    dumped = tmp_path / "dump" / "test.fold_weight_transposes.onnx"
    assert dumped.is_file()
    got = ort.InferenceSession(str(dumped), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_array_equal(got, expected)
    ir.save(model, art / "g.onnx")
    got = ort.InferenceSession(str(art / "g.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
    with pytest.raises(PassError, match="unknown stage 'nope'"):
        run_pipeline(linear_model(w), ctx, dump_after="nope")
    assert len(PIPELINE) == len(set(STAGE_NAMES))


def test_the_weight_store_tells_traced_constants_apart_by_content(tmp_path):
    """A constant the trace made (a layout's attention rule) is freed after its graph and the next
    graph's constant may get its address; only model parameters may be recognised by address."""
    import torch
    from torch.onnx._internal.exporter._core import TorchTensor  # what the exporter's initializers are

    from nemocompile.passes.share_weights import WeightStore, identity

    buffer = torch.zeros(32, 32, dtype=torch.bool)
    store = WeightStore(tmp_path)
    buffer.copy_(torch.ones(32, 32, dtype=torch.bool).tril())
    a = store.put(TorchTensor(buffer), "rule_prefill")
    buffer.fill_(True)  # the next graph's constant at the same address, other content
    b = store.put(TorchTensor(buffer), "rule_denoise")
    store.close()
    assert identity(TorchTensor(buffer)) is None
    assert identity(TorchTensor(torch.nn.Parameter(torch.ones(16, 16)))) is not None  # parameters live on
    assert a.offset != b.offset
    assert np.array_equal(a.numpy(), np.tril(np.ones((32, 32), bool))) and b.numpy().all()

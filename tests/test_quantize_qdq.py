"""TensorRT Q/DQ precisions (passes/quantize_qdq.py, NVIDIA Model Optimizer): which MatMuls are
quantized, scales finite and positive, the I/O contract unchanged, refusals before any work."""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import make_model
from tiny_artifacts import _ROOT, BLOCK, CAPACITY, PREFILL

from nemocompile.cli import main
from nemocompile.errors import NemocompileError
from nemocompile.graphs.export import export_artifact
from nemocompile.artifact.manifest import Manifest
from nemocompile.passes.check_tensorrt import lint_artifact
from nemocompile.passes.quantize_qdq import QdqSettings, load_modelopt

try:
    load_modelopt()
    HAVE_MODELOPT, WHY = True, ""
except NemocompileError as e:
    HAVE_MODELOPT, WHY = False, str(e)
needs_modelopt = pytest.mark.skipif(not HAVE_MODELOPT, reason=f"NVIDIA Model Optimizer is not installed: {WHY}")
MODES = ["ar", "linear-spec"]  # prefill, ar_step, draft (LoRA), verify: every kind of weight MatMul


@functools.cache
def exported(precision: str | None, dtype: str = "fp32") -> Path:
    """A LoRA model (batch 1, AR and linear self-speculation) exported as float or with ``precision``."""
    model = make_model(lora_rank=4)
    out = _ROOT / f"qdq_{precision or 'float'}_{dtype}"
    settings = None if precision is None else QdqSettings(precision=precision, block_size=32)
    export_artifact(model, out, modes=MODES, block_length=BLOCK, max_seq_len=CAPACITY, batch_size=1,
                    prefill_length=PREFILL, precision=settings, overwrite=True, dtype=dtype)
    return out


def _graph(path: Path) -> onnx.GraphProto:
    return onnx.load(str(path)).graph  # weights included: the scales live in the shared file


@needs_modelopt
@pytest.mark.parametrize("precision", ["fp8", "int4-awq"])
def test_qdq_graphs_quantize_every_base_weight_matmul_and_keep_the_io(precision):
    fdir, qdir = exported(None), exported(precision)
    fm, qm = Manifest.load(fdir), Manifest.load(qdir)
    assert (fm.precision, qm.precision) == ("float", precision)
    assert qm.precision_details["library"].startswith("nvidia-modelopt")
    assert qm.weight_precision == "float" and qm.opset == {"fp8": 19, "int4-awq": 21}[precision]
    layers = qm.model_config["num_hidden_layers"]
    for fg, qg in zip(fm.graphs, qm.graphs):
        assert (qg.step, qg.inputs, qg.outputs) == (fg.step, fg.inputs, fg.outputs), "Q/DQ changed the I/O"
        graph = _graph(qdir / qg.file)
        inits = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer}
        produced = {o: n for n in graph.node for o in n.output}
        quantized, floats = [], []
        for n in graph.node:
            if n.op_type != "MatMul":
                continue
            w = n.input[1]
            if w in inits:
                floats.append(w)
            elif w in produced and produced[w].op_type == "DequantizeLinear":
                quantized.append(produced[w])
        assert len(quantized) == 7 * layers, f"{qg.step}: q/k/v/o, gate/up/down per layer"
        head = [w for w in floats if "diffusion_head" in w or "embed_tokens" in w]
        assert len(head) == 1, f"{qg.step}: the output head stays float (as ModelOpt's default configs leave it)"
        assert len(floats) == 1 + (2 * layers if qg.lora else 0), f"{qg.step}: the head and the LoRA only are float"
        for dq in quantized:
            scale = inits[dq.input[1]]
            assert np.all(np.isfinite(scale)) and np.all(scale > 0), f"{dq.name}: scale not finite and positive"
            if precision == "int4-awq":  # weight-only: DQ reads the int4 weight itself, one scale per 32 along K
                assert onnx.TensorProto.INT4 == next(i.data_type for i in graph.initializer if i.name == dq.input[0])
                assert scale.ndim == 2
            else:  # fp8: the weight goes through an fp8 Q/DQ pair (TensorRT folds it at build time)
                q = produced[dq.input[0]]
                assert q.op_type == "QuantizeLinear" and inits[q.input[2]].dtype.name == "float8_e4m3fn"
        if precision == "fp8":  # ... and so does the activation feeding each quantized MatMul (per tensor)
            for n in graph.node:
                if n.op_type == "MatMul" and n.input[1] not in inits and produced[n.input[1]].op_type == "DequantizeLinear":
                    dq = produced[n.input[0]]
                    assert dq.op_type == "DequantizeLinear" and produced[dq.input[0]].op_type == "QuantizeLinear"
                    assert float(inits[dq.input[1]]) > 0 and np.isfinite(inits[dq.input[1]])
    assert not any(lint_artifact(qdir).values()), "the TensorRT lint must accept the Q/DQ graphs"


# teacher-forced against the float artifact on this random model (weights N(0, 0.5), K = 32: one int4 block per
# column); measured 0.92 / 0.15 nats (fp8) and 0.67 / 0.67 (int4-awq). A broken rewrite agrees ~1/96 of the time.
CLOSE = {"fp8": (0.75, 0.4), "int4-awq": (0.5, 1.2)}


@needs_modelopt
@pytest.mark.parametrize("precision", ["fp8", "int4-awq"])
def test_qdq_artifact_runs_on_onnxruntime_close_to_float_and_lossless(precision):
    from nemocompile.checks.quant_parity import artifact_teacher_forced, mean_kl, top1_agreement
    from nemocompile.runtime import Runtime

    ids = [int(i) for i in np.random.default_rng(1).integers(4, 96, 24)]
    with Runtime.load(exported(None), backend="onnxruntime") as rt:
        ref = artifact_teacher_forced(rt, ids)
    with Runtime.load(exported(precision), backend="onnxruntime") as rt:
        got = artifact_teacher_forced(rt, ids)
        ar = rt.generate(ids[:5], mode="ar", max_new_tokens=12).tokens
        spec = rt.generate(ids[:5], mode="linear-spec", max_new_tokens=12).tokens
    top1, kl = top1_agreement(ref, got), mean_kl(ref, got)
    assert np.all(np.isfinite(got)) and top1 >= CLOSE[precision][0] and kl <= CLOSE[precision][1], (top1, kl)
    assert spec == ar, "self-speculation must stay lossless against the artifact's own AR greedy output"


def _fp4_weight(graph: onnx.GraphProto, matmul: onnx.NodeProto, inits: dict) -> tuple[np.ndarray, list]:
    """The weight [K, N] a NVFP4 MatMul multiplies, decoded from its FP4 values and two levels of scales,
    and the nodes on its way: MatMul <- Cast <- Transpose <- DQ(fp4 [N, K], DQ(fp8 block scales, fp32))."""
    produced = {o: n for n in graph.node for o in n.output}
    cast = produced[matmul.input[1]]
    transpose = produced[cast.input[0]]
    dq = produced[transpose.input[0]]
    dq_scale = produced[dq.input[1]]
    path = [cast, transpose, dq, dq_scale]
    fp4 = next(i for i in graph.initializer if i.name == dq.input[0])
    assert fp4.data_type == onnx.TensorProto.FLOAT4E2M1 and dict((a.name, a.i) for a in dq.attribute)["block_size"] == 16
    values = inits[dq.input[0]].astype(np.float32)  # onnx unpacks FP4 to ml_dtypes' float4_e2m1fn
    block_scales = inits[dq_scale.input[0]].astype(np.float32)  # float8_e4m3fn, one per 16 along K
    tensor_scale = float(inits[dq_scale.input[1]].reshape(-1)[0])
    assert np.all(np.isfinite(block_scales)) and np.all(block_scales > 0) and tensor_scale > 0
    weight = values * np.repeat(block_scales, 16, axis=1) * tensor_scale
    return weight.T, path


@needs_modelopt
def test_nvfp4_graphs_pack_each_base_weight_in_fp4_and_quantize_its_activation_in_tensorrt():
    """nvfp4 (W4A4): every base weight MatMul reads FP4 weights (blocks of 16, FP8 scales under an fp32 one,
    decoding to the float weight within FP4's rounding) and an activation TensorRT quantizes at run time;
    head and LoRA stay fp16; I/O as the fp16 float artifact's; the lint accepts it; ONNX Runtime refuses it."""
    from nemocompile.runtime import Runtime

    fdir, qdir = exported(None, "fp16"), exported("nvfp4", "fp16")
    fm, qm = Manifest.load(fdir), Manifest.load(qdir)
    assert qm.precision == "nvfp4" and qm.opset == 23
    model = make_model(lora_rank=4)
    params = {f"model.{k}.T": v.detach().float().numpy().T for k, v in model.state_dict().items()}
    layers = qm.model_config["num_hidden_layers"]
    for fg, qg in zip(fm.graphs, qm.graphs):
        assert (qg.step, qg.inputs, qg.outputs) == (fg.step, fg.inputs, fg.outputs), "nvfp4 changed the I/O"
        proto = onnx.load(str(qdir / qg.file))
        assert {o.domain: o.version for o in proto.opset_import}.get("trt") == 1
        graph = proto.graph
        inits = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer}
        produced = {o: n for n in graph.node for o in n.output}
        quantized = [n for n in graph.node if n.op_type == "MatMul" and n.input[1] not in inits]
        quantized = [n for n in quantized if produced[n.input[1]].op_type == "Cast"]
        assert len(quantized) == 7 * layers, f"{qg.step}: q/k/v/o, gate/up/down per layer"
        floats = [n.input[1] for n in graph.node if n.op_type == "MatMul" and n.input[1] in inits]
        assert len(floats) == 1 + (2 * layers if qg.lora else 0), f"{qg.step}: the head and the LoRA only are float"
        for mm in quantized:
            weight, path = _fp4_weight(graph, mm, inits)
            name = path[2].input[0].removesuffix("_f4")
            ref = params[name[name.index("model."):]]
            assert weight.shape == ref.shape
            err = np.abs(weight - ref).mean() / np.abs(ref).mean()
            assert err < 0.15, f"{name}: decoded FP4 weight off by {err:.2f} of its mean magnitude"
            x = produced[produced[mm.input[0]].input[0]]  # Cast <- DQ(x_f4, DQ(block scales, x_scale))
            quant = produced[x.input[0]]
            assert (quant.op_type, quant.domain) == ("TRT_FP4DynamicQuantize", "trt")
            assert dict((a.name, a.i) for a in quant.attribute)["block_size"] == 16
            assert float(inits[quant.input[1]]) > 0 and np.isfinite(inits[quant.input[1]])
    assert not any(lint_artifact(qdir).values()), "the TensorRT lint must accept the nvfp4 graphs"
    for backend in ("onnxruntime", "torch"):
        with pytest.raises(NemocompileError, match="nvfp4 graphs run on TensorRT only"):
            Runtime.load(qdir, backend=backend)


@needs_modelopt
def test_nvfp4_quality_is_measured_by_emulating_the_artifact_in_eager():
    """TensorRT alone runs nvfp4, so quantized parity emulates it: the artifact's own FP4 weights in an fp32
    copy of the model, every base Linear's input quantized to NVFP4 under the artifact's activation scale."""
    import torch

    from nemocompile.checks.nvfp4_emulation import emulated_model
    from nemocompile.checks.quant_parity import check_quantized_parity, eager_teacher_forced, top1_agreement

    model = make_model(lora_rank=4).float()
    emulated = emulated_model(exported("nvfp4", "fp16"), model)
    layers = model.config.num_hidden_layers
    hooked = [n for n, m in emulated.named_modules() if m._forward_pre_hooks]
    assert len(hooked) == 7 * layers and not any("lora" in n or "head" in n for n in hooked)
    assert torch.equal(emulated.diffusion_head.weight, model.diffusion_head.weight)
    layer = emulated.encoder.layers[0].self_attn
    w, ref = layer.q_proj.weight, model.encoder.layers[0].self_attn.q_proj.weight
    assert not torch.equal(w, ref) and (w - ref).abs().mean() < 0.15 * ref.abs().mean()
    x = torch.randn(3, 32) * 2
    assert not torch.allclose(layer.q_proj(x), torch.nn.functional.linear(x, w)), "the input is quantized too"
    ids = [int(i) for i in np.random.default_rng(2).integers(4, 96, 24)]
    agree = top1_agreement(eager_teacher_forced(model, ids), eager_teacher_forced(emulated, ids))
    assert 0.2 < agree < 1.0, agree  # measured 0.375 (W4A4 at K = 32); a broken rewrite agrees ~1/96
    report = check_quantized_parity(exported("nvfp4", "fp16"), model, prompts=[ids[:12], ids[12:]],
                                    max_new_tokens=8)
    assert report.precision == "nvfp4" and "emulated" in report.method and report.acceptance is not None


def test_nvfp4_and_bad_combinations_are_refused_before_any_work(tmp_path, capsys):
    out = tmp_path / "a"
    for argv, match in ((["--precision", "nvfp4"], "nvfp4 needs --dtype fp16"),
                        (["--precision", "fp8", "--weights", "int4"], "exclude each other"),
                        (["--weights", "int4", "--quant-method", "awq_lite"], "use it with --precision int4-awq"),
                        (["--precision", "fp8", "--quant-block", "64"], "fp8 takes no --quant-method or"),
                        (["--precision", "int4-awq", "--quant-method", "gptq"], "awq_lite or awq_clip, not gptq"),
                        (["--precision", "int4-awq", "--quant-block", "256"], "block size 256 is not supported"),
                        (["--precision", "fp8", "--dtype", "bf16"], "needs --dtype fp16 or fp32")):
        assert main(["export", "--mode", "ar", "--out", str(out), *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and match in err[0], err
        assert not out.exists() and not list(tmp_path.iterdir()), "nothing is written for a refused export"


def test_missing_modelopt_is_one_line_naming_the_install(monkeypatch):
    import sys

    for name in [m for m in sys.modules if m == "modelopt" or m.startswith("modelopt.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "modelopt", None)
    with pytest.raises(NemocompileError, match=r"install it: pip install --no-deps nvidia-modelopt"):
        load_modelopt()


@needs_modelopt
def test_torch_backend_refuses_a_qdq_artifact():
    from nemocompile.runtime import Runtime

    with pytest.raises(NemocompileError, match="use --backend onnxruntime or tensorrt"):
        Runtime.load(exported("fp8"), backend="torch")


def test_lint_checks_qdq_data_types_and_wants_constant_scales():
    from onnx import TensorProto, helper

    import onnx_ir as ir

    from nemocompile.passes.check_tensorrt import lint

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])
    s = helper.make_tensor_value_info("s", TensorProto.FLOAT, [])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])
    zp = helper.make_tensor("zp", TensorProto.FLOAT8E4M3FN, [], [0.0])
    def model(scale_is_input: bool):
        scale = "s" if scale_is_input else "c"
        inits = [zp] + ([] if scale_is_input else [helper.make_tensor("c", TensorProto.FLOAT, [], [0.5])])
        g = helper.make_graph([helper.make_node("QuantizeLinear", ["x", scale, "zp"], ["q"], name="q"),
                               helper.make_node("DequantizeLinear", ["q", scale, "zp"], ["y"], name="dq")],
                              "g", [x] + ([s] if scale_is_input else []), [y], initializer=inits)
        return ir.serde.deserialize_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)]))
    assert lint(model(False)) == [], "fp8 Q/DQ with constant scales is TensorRT-parsable"
    found = lint(model(True))
    assert len(found) == 2 and all("input 1 must be a build-time constant" in f for f in found), found

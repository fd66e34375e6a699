"""TensorRT precisions: MatMul(x, W) -> Q/DQ around it, by NVIDIA Model Optimizer's ONNX PTQ.

The quantizer is ModelOpt's (``modelopt.onnx.quantization.quantize``, an
optional extra: ``pip install -e ".[modelopt]"``). As in quantize_weights.py,
each weight MatMul is cut out as a one-node model, quantized there with the
activations that weight saw on the calibration prompts (nemocompile/checks/calibration.py),
and its Q/DQ nodes are spliced back, so the graph's inputs and outputs never
change and one weight at a time is held by ModelOpt.

  * ``fp8``: per-tensor FP8 (E4M3) activations, per-channel FP8 weights
    (QuantizeLinear/DequantizeLinear pairs on both MatMul inputs; opset 19),
  * ``int4-awq``: INT4 weights per block along K, AWQ calibrated (awq_lite, or awq_clip)
    (DequantizeLinear(int4 W, scales) -> MatMul; opset 21); activations in float,
  * ``nvfp4`` (W4A4, as ModelOpt's NVFP4_DEFAULT_CFG): FP4 (E2M1) weights in
    blocks of 16 along K with FP8 block scales under an fp32 tensor scale
    (ModelOpt's NVFP4QuantExporter turns a TRT_FP4QDQ weight into its two
    DequantizeLinear nodes), activations quantized per block of 16 at run time by
    TensorRT's ``trt::TRT_FP4DynamicQuantize`` under an fp32 scale calibrated
    as ModelOpt's torch export sets it (amax / 6 / 448); fp16 graphs only, opset
    23. ModelOpt's ONNX ``quantize`` has no nvfp4 mode, so the activation nodes
    are the three its torch export emits (modelopt.torch.quantization.export_onnx),
    built here. ONNX Runtime has no kernel for TRT_FP4DynamicQuantize: these graphs
    run on TensorRT only (Blackwell).

Not quantized, as in ModelOpt's own default configs (which disable ``*lm_head*``):
the output head (on the embedded model int4 there cost the most top-1
agreement: 0.805 with it, see the README), the drafter LoRA (small, beside
the base weight), the embedding table (a Gather) and attention's activation x
activation products.
The graph's opset is raised to what the Q/DQ nodes need (19 or 21); the ops
this exporter emits mean the same there.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import warnings
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_ir as ir

from .base import PassContext, PassError, PassResult
from .quantize_weights import _is_head, one_matmul_model, weight_matmuls
from .share_weights import weight_key

# --precision -> (ModelOpt quantize_mode, the opset its Q/DQ needs)
PRECISIONS = {"fp8": ("fp8", 19), "int4-awq": ("int4", 21), "nvfp4": ("nvfp4", 23)}
HIGH_PRECISION = {"fp32": "fp32", "fp16": "fp16"}  # export dtype -> ModelOpt high_precision_dtype
NVFP4_BLOCK = 16  # NVFP4's block along K (fixed by the format)
AWQ_METHODS = ("awq_lite", "awq_clip")  # int4-awq calibrations (ModelOpt's ONNX int4 modes)
INSTALL = ('pip install --no-deps nvidia-modelopt onnx-graphsurgeon onnxslim lief cppimport nvidia-ml-py omegaconf '
           'antlr4-python3-runtime pulp (or pip install -e ".[modelopt]")')


@dataclass(frozen=True)
class QdqSettings:
    """Which TensorRT Q/DQ precision an export asks for (None: float graphs)."""

    precision: str = "fp8"  # "fp8" | "int4-awq" | "nvfp4"
    dtype: str = "fp32"  # the export dtype: what Q/DQ dequantize to (ModelOpt's high_precision_dtype)
    block_size: int = 128  # int4-awq: weights per scale along K (TensorRT's INT4 weight-only GEMM: 128)
    # int4-awq: ModelOpt's calibration_method. awq_lite (per-channel activation scales folded into a Mul before
    # the MatMul; ModelOpt's torch INT4_AWQ_CFG) kept top-1 0.854 on the embedded model, awq_clip 0.844 (README)
    method: str = "awq_lite"

    def check(self) -> None:
        """One-line errors before any work."""
        if self.precision not in PRECISIONS:
            raise PassError(f"unknown precision {self.precision!r}; use one of {', '.join(PRECISIONS)}")
        if self.precision == "nvfp4" and self.dtype != "fp16":
            raise PassError(f"--precision nvfp4 needs --dtype fp16 (TensorRT's strongly typed FP4 layers take "
                            f"fp16 around their Q/DQ, as ModelOpt exports them), got {self.dtype}")
        if self.dtype not in HIGH_PRECISION:
            raise PassError(f"--precision {self.precision} needs --dtype fp16 or fp32 (ModelOpt's ONNX Q/DQ "
                            f"dequantize to one of those), got {self.dtype}")
        if self.precision == "int4-awq" and self.method not in AWQ_METHODS:
            raise PassError(f"int4-awq calibration method {self.method!r} is not supported; use "
                            f"{' or '.join(AWQ_METHODS)}")
        if self.block_size not in (32, 64, 128):
            raise PassError(f"int4-awq block size {self.block_size!r} is not supported; use 32, 64 or 128")


@dataclass
class QdqQuantizer:
    """The settings, the calibration activations, and the one-MatMul models quantized so far."""

    settings: QdqSettings
    # weight name in the graph (model.<module>.weight.T) -> the activations [tokens, K] it multiplied
    calibration: dict[str, np.ndarray] = field(default_factory=dict)
    quantized: dict[tuple, onnx.ModelProto] = field(default_factory=dict)
    reused: int = 0

    def __post_init__(self) -> None:
        self.settings.check()
        load_modelopt()  # fail before any work when the extra is missing

    def quantize(self, weight: ir.TensorProtocol, name: str) -> onnx.ModelProto:
        """The one-MatMul model x @ ``weight`` with ModelOpt's Q/DQ (input "x", output "y")."""
        key = weight_key(weight)
        if key in self.quantized:
            self.reused += 1
            return self.quantized[key]
        activations = self.calibration.get(name)
        if activations is None:
            raise PassError(f"{name}: no calibration activations were collected for this weight; export through "
                            "export_artifact (it calibrates)")
        proto = _quantize_one(weight, name, self.settings, activations)
        self.quantized[key] = proto
        return proto


def quantize_qdq(model: ir.Model, ctx: PassContext) -> PassResult:
    """Outputs close to the float graph (TensorRT runs the quantized MatMuls in fp8/int4); inputs and
    outputs unchanged; every weight MatMul but the LoRA's gets ModelOpt's Q/DQ nodes."""
    quantizer: QdqQuantizer | None = ctx.qdq
    if quantizer is None:
        return PassResult(model, modified=False, notes=["declined: no Q/DQ precision for this export"])
    graph, done, notes = model.graph, 0, []
    for node, w in weight_matmuls(graph):
        if len(w.const_value.shape) != 2:
            notes.append(f"{node.name}: kept in float, not a 2-D weight")
            continue
        if "lora_" in w.name:
            notes.append(f"{node.name}: kept in float, drafter LoRA")
            continue
        if _is_head(w.name):
            notes.append(f"{node.name}: kept in float, output head (ModelOpt's default configs leave it unquantized)")
            continue
        _splice(graph, node, quantizer.quantize(w.const_value, w.name))
        if not w.uses() and w.name in graph.initializers:
            graph.initializers.pop(w.name)
        done += 1
    if done:
        opset = PRECISIONS[quantizer.settings.precision][1]
        model.opset_imports[""] = max(model.opset_imports.get("", 18), opset)
        if quantizer.settings.precision == "nvfp4":  # its TRT_FP4DynamicQuantize nodes
            model.opset_imports["trt"] = 1
    return PassResult(model, modified=done > 0, count=done, notes=notes)


def _splice(graph: ir.Graph, node: ir.Node, proto: onnx.ModelProto) -> None:
    """Replace ``node`` by the quantized one-MatMul model's nodes, its tensors renamed after the weight."""
    # a fresh copy: renaming an ir initializer renames the proto tensor it wraps, and the proto is reused
    one = ir.serde.deserialize_model(onnx.load_from_string(proto.SerializeToString())).graph
    prefix = node.inputs[1].name
    x, y = one.inputs[0], one.outputs[0]
    one.outputs.clear()  # y becomes this graph's value
    for name in list(one.initializers):
        value = one.initializers.pop(name)
        # named after the weight (ModelOpt names the activation's scale "x_scale" in every one-MatMul model)
        value.name = name if name.startswith(prefix) else f"{prefix}.{name}"
        if value.name in graph.initializers:
            old = graph.initializers[value.name]
            value.replace_all_uses_with(old)
        else:
            graph.register_initializer(value)
    x.replace_all_uses_with(node.inputs[0])
    nodes = list(one)
    for n in nodes:
        one.remove(n)
        n.name = f"{node.name}.{n.name}"
        for v in n.outputs:
            if v is not y:
                v.name = f"{node.name}.{v.name}"
                # the one-MatMul model's x is [tokens, K]; here it is [B, T, K]: a shape inferred there is stale
                v.shape = None
        graph.insert_before(node, n)
    old = node.outputs[0]
    y.shape, y.type = old.shape, old.type
    old.replace_all_uses_with(y, replace_graph_outputs=True)
    graph.remove(node, safe=True)
    y.name = old.name


def load_modelopt():
    """ModelOpt's ONNX ``quantize``, or a one-line error saying how to install it."""
    with without_tensorrt():
        try:
            from modelopt.onnx.quantization import quantize
        except ImportError as e:
            raise PassError(f"--precision needs NVIDIA Model Optimizer's ONNX quantizer ({e.msg.splitlines()[0]}); "
                            f"install it: {INSTALL}") from None
    return quantize


@contextlib.contextmanager
def without_tensorrt():
    """Hide ``tensorrt`` from ModelOpt: with only tensorrt-stubs installed it imports as an empty package and
    ModelOpt's TensorRT probes crash on it; calibration here runs on ONNX Runtime's CPU provider anyway."""
    saved = sys.modules.get("tensorrt", None)
    had = "tensorrt" in sys.modules
    sys.modules["tensorrt"] = None  # import tensorrt -> ImportError, which ModelOpt handles
    try:
        yield
    finally:
        if had:
            sys.modules["tensorrt"] = saved
        else:
            sys.modules.pop("tensorrt", None)


def _quantize_one(weight: ir.TensorProtocol, name: str, s: QdqSettings, activations: np.ndarray) -> onnx.ModelProto:
    """ModelOpt's quantize on a one-MatMul model holding just ``weight``, calibrated on ``activations``."""
    if s.precision == "nvfp4":
        return _nvfp4_one(weight, name, activations)
    quantize = load_modelopt()
    mode, opset = PRECISIONS[s.precision]
    k, n = weight.shape
    proto = one_matmul_model(weight, name)
    proto.ir_version = 10
    data = activations.astype(onnx.helper.tensor_dtype_to_np_dtype(weight.dtype.value))
    kwargs = {"high_precision_dtype": HIGH_PRECISION[s.dtype]}
    if mode == "fp8":
        # decode steps multiply 1..B rows: ModelOpt would skip them as GEMVs, but they are what an artifact runs
        kwargs.update(op_types_to_quantize=["MatMul"], enable_gemv_detection_for_trt=False)
    else:
        kwargs.update(calibration_method=s.method, block_size=s.block_size)
    quiet = [logging.getLogger(n) for n in ("modelopt", "root")]
    levels = [q.level for q in quiet]
    with tempfile.TemporaryDirectory(prefix="nemocompile-qdq-") as d, without_tensorrt(), \
            open(os.devnull, "w") as null, contextlib.redirect_stdout(null), contextlib.redirect_stderr(null):
        path = os.path.join(d, "one.onnx")
        onnx.save(proto, path)
        try:
            quantize(path, quantize_mode=mode, calibration_data={"x": data}, calibration_eps=["cpu"],
                     output_path=os.path.join(d, "q.onnx"), log_level="ERROR", **kwargs)
        except Exception as e:  # ModelOpt's own failure, named with the weight it was quantizing
            raise PassError(f"{name}: NVIDIA Model Optimizer failed to quantize this weight to {s.precision} "
                            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                            f"report it with the weight's shape {[k, n]}") from None
        finally:
            for q, level in zip(quiet, levels):
                q.setLevel(level)
        out = onnx.load(os.path.join(d, "q.onnx"))
    ops = [nd.op_type for nd in out.graph.node]
    if "MatMul" not in ops or not any(op in ("QuantizeLinear", "DequantizeLinear") for op in ops):
        raise PassError(f"{name}: NVIDIA Model Optimizer left this weight MatMul without Q/DQ (got {ops}); "
                        f"report it with the weight's shape {[k, n]}")
    return out


def _nvfp4_one(weight: ir.TensorProtocol, name: str, activations: np.ndarray) -> onnx.ModelProto:
    """x @ ``weight`` in NVFP4: the graph ModelOpt's torch export writes for a quantized Linear
    (x -> TRT_FP4DynamicQuantize -> DQ(scales) -> DQ; W [N, K] -> TRT_FP4QDQ -> Transpose),
    then ModelOpt's NVFP4QuantExporter packs W in FP4 with FP8 block scales."""
    with without_tensorrt(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # modelopt.torch warns about the installed transformers version
        try:
            from modelopt.onnx.export import NVFP4QuantExporter
        except ImportError as e:
            raise PassError(f"--precision nvfp4 needs NVIDIA Model Optimizer's NVFP4 exporter ({e.msg}); "
                            f"install it: {INSTALL}") from None
    k, n = weight.shape
    if k % NVFP4_BLOCK:
        raise PassError(f"{name}: K = {k} is not a multiple of NVFP4's block of {NVFP4_BLOCK}; "
                        "use --precision fp8 or int4-awq for this model")
    h = onnx.helper
    f16, f32 = onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT
    amax = float(np.max(np.abs(activations))) if activations.size else 0.0
    x_scale = amax / 6.0 / 448.0 if amax > 0 and np.isfinite(amax) else 1.0  # as ModelOpt's export_fp4
    w_nk = np.ascontiguousarray(weight.numpy().T).astype(np.float16)  # the Linear's [out, in]: blocks along K
    nodes = [
        h.make_node("TRT_FP4DynamicQuantize", ["x", "x_scale"], ["x_f4", "x_block_scale_f8"], domain="trt",
                    name="x_quantize", axis=-1, block_size=NVFP4_BLOCK,
                    scale_type=onnx.TensorProto.FLOAT8E4M3FN),
        h.make_node("DequantizeLinear", ["x_block_scale_f8", "x_scale"], ["x_block_scale"], name="x_scale_dq"),
        h.make_node("DequantizeLinear", ["x_f4", "x_block_scale"], ["x_dq"], name="x_dq", axis=-1,
                    block_size=NVFP4_BLOCK),
        # attribute 0 must be block_size: the exporter reads node.attribute[0].i
        h.make_node("TRT_FP4QDQ", [name], ["w_qdq"], domain="trt", name="w_qdq", block_size=NVFP4_BLOCK),
        h.make_node("Transpose", ["w_qdq"], ["w_t"], name="w_transpose", perm=[1, 0]),
        h.make_node("MatMul", ["x_dq", "w_t"], ["y"], name="mm"),
    ]
    graph = h.make_graph(
        nodes, "one", [h.make_tensor_value_info("x", f16, ["tokens", k])],
        [h.make_tensor_value_info("y", f16, ["tokens", n])],
        initializer=[onnx.numpy_helper.from_array(w_nk, name),
                     onnx.numpy_helper.from_array(np.array(x_scale, dtype=np.float32), "x_scale")],
        value_info=[h.make_tensor_value_info("w_qdq", f16, [n, k]), h.make_tensor_value_info("x_dq", f32, None)])
    proto = h.make_model(graph, opset_imports=[h.make_opsetid("", 23), h.make_opsetid("trt", 1)])
    quiet = logging.getLogger("modelopt.onnx")  # ModelOpt sets INFO on it
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with without_tensorrt():
            out = NVFP4QuantExporter.process_model(proto)
    except Exception as e:
        raise PassError(f"{name}: NVIDIA Model Optimizer failed to pack this weight in NVFP4 "
                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                        f"report it with the weight's shape {[k, n]}") from None
    finally:
        quiet.setLevel(level)
    for vi in list(out.graph.input):  # the exporter lists its new initializers as graph inputs
        if vi.name != "x":
            out.graph.input.remove(vi)
    ops = [nd.op_type for nd in out.graph.node]
    if "TRT_FP4QDQ" in ops or ops.count("DequantizeLinear") != 4:
        raise PassError(f"{name}: NVIDIA Model Optimizer did not turn this weight into NVFP4 (got {ops}); "
                        f"report it with the weight's shape {[k, n]}")
    return out


__all__ = ["quantize_qdq", "QdqSettings", "QdqQuantizer", "PRECISIONS", "AWQ_METHODS", "load_modelopt"]

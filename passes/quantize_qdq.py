"""TensorRT precisions: MatMul(x, W) -> Q/DQ around it, by NVIDIA Model Optimizer's ONNX PTQ.

The quantizer is ModelOpt's (``modelopt.onnx.quantization.quantize``, an
optional extra: ``pip install -e ".[modelopt]"``). As in quantize_weights.py,
each weight MatMul is cut out as a one-node model, quantized there with the
activations that weight saw on the calibration prompts (nemocompile/calibration.py),
and its Q/DQ nodes are spliced back, so the graph's inputs and outputs never
change and one weight at a time is held by ModelOpt.

  * ``fp8``: per-tensor FP8 (E4M3) activations, per-channel FP8 weights
    (QuantizeLinear/DequantizeLinear pairs on both MatMul inputs; opset 19),
  * ``int4-awq``: INT4 weights per block along K, AWQ-clip calibrated
    (DequantizeLinear(int4 W, scales) -> MatMul; opset 21); activations in float,
  * ``nvfp4``: refused before any work: ModelOpt 0.47's ONNX ``quantize``
    raises "Invalid quantization mode choice" for it (int8, fp8, int4 only).

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
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_ir as ir

from .base import PassContext, PassError, PassResult
from .quantize_weights import _is_head, one_matmul_model, weight_matmuls
from .share_weights import weight_key

# --precision -> (ModelOpt quantize_mode, the opset its Q/DQ needs)
PRECISIONS = {"fp8": ("fp8", 19), "int4-awq": ("int4", 21)}
REFUSED = {"nvfp4": "nvfp4 cannot be produced: NVIDIA Model Optimizer 0.47's ONNX quantizer has no nvfp4 mode "
                    "(modelopt.onnx.quantization.quantize takes int8, fp8 and int4 only); use --precision fp8 "
                    "or int4-awq"}
HIGH_PRECISION = {"fp32": "fp32", "fp16": "fp16"}  # export dtype -> ModelOpt high_precision_dtype
INSTALL = ('pip install --no-deps nvidia-modelopt onnx-graphsurgeon onnxslim lief cppimport nvidia-ml-py '
           '(or pip install -e ".[modelopt]")')


@dataclass(frozen=True)
class QdqSettings:
    """Which TensorRT Q/DQ precision an export asks for (None: float graphs)."""

    precision: str = "fp8"  # "fp8" | "int4-awq"
    dtype: str = "fp32"  # the export dtype: what Q/DQ dequantize to (ModelOpt's high_precision_dtype)
    block_size: int = 128  # int4-awq: weights per scale along K (TensorRT's INT4 weight-only GEMM: 128)

    def check(self) -> None:
        """One-line errors before any work."""
        if self.precision in REFUSED:
            raise PassError(REFUSED[self.precision])
        if self.precision not in PRECISIONS:
            raise PassError(f"unknown precision {self.precision!r}; use one of {', '.join(PRECISIONS)}")
        if self.dtype not in HIGH_PRECISION:
            raise PassError(f"--precision {self.precision} needs --dtype fp16 or fp32 (ModelOpt's ONNX Q/DQ "
                            f"dequantize to one of those), got {self.dtype}")
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
    quantizer = ctx.qdq
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
        graph.insert_before(node, n)
    old = node.outputs[0]
    y.shape, y.type = old.shape, old.type
    old.replace_all_uses_with(y, replace_graph_outputs=True)
    graph.remove(node, safe=True)
    y.name = old.name


def load_modelopt():
    """ModelOpt's ONNX ``quantize``, or a one-line error saying how to install it."""
    with _without_tensorrt():
        try:
            from modelopt.onnx.quantization import quantize
        except ImportError as e:
            raise PassError(f"--precision needs NVIDIA Model Optimizer's ONNX quantizer ({e.msg.splitlines()[0]}); "
                            f"install it: {INSTALL}") from None
    return quantize


@contextlib.contextmanager
def _without_tensorrt():
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
        kwargs.update(calibration_method="awq_clip", block_size=s.block_size)
    quiet = [logging.getLogger(n) for n in ("modelopt", "root")]
    levels = [q.level for q in quiet]
    with tempfile.TemporaryDirectory(prefix="nemocompile-qdq-") as d, _without_tensorrt(), \
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


__all__ = ["quantize_qdq", "QdqSettings", "QdqQuantizer", "PRECISIONS", "REFUSED", "load_modelopt"]

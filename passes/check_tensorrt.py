"""TensorRT readiness: would TensorRT's ONNX parser accept this graph?

The operator table is transcribed from onnx-tensorrt's ``docs/operators.md``
for TensorRT 10.15 ("supports operators in the inclusive range of opset 9 to
opset 24"): for each supported operator, the data types it takes, plus the
restrictions that can matter for decoder graphs (constant ``axes``, TopK's K,
the Attention op's inputs). TensorRT itself cannot run here (no GPU), so this
is a lint, not a build: a clean lint means no known parser rejection, the
engine build on the target GPU is still the final word.
"""

from __future__ import annotations

import re
from pathlib import Path

import onnx
import onnx_ir as ir

from .base import PassContext, PassResult

TENSORRT_VERSION = "10.15"
# the graphs' dynamic input dimensions (graphs/steps.py), which TensorRT's optimization profiles bound
PROFILE_DIMS = ("batch", "slots")
OPSET_RANGE = (9, 24)

_F = "FP32 FP16 BF16"
_FI = "FP32 FP16 BF16 INT32 INT64"
_FIB = "FP32 FP16 BF16 INT32 INT64 BOOL"
# operator -> data types its inputs may have (onnx-tensorrt docs/operators.md, TensorRT 10.15)
SUPPORTED: dict[str, str] = {
    "Abs": _FI, "Acos": _F, "Acosh": _F, "Add": _FI, "And": "BOOL", "ArgMax": _FI, "ArgMin": _FI, "Asin": _F,
    "Asinh": _F, "Atan": _F, "Atanh": _F, "Attention": _F + " INT8 FP8", "AveragePool": _F,
    "BatchNormalization": _F, "BlackmanWindow": "FP32 FP16", "Cast": _FIB + " UINT8",
    "CastLike": _FIB + " UINT8", "Ceil": _F, "Celu": _F, "Clip": _F, "Concat": _FIB,
    "Constant": _FIB + " FP8 FP4 INT4", "ConstantOfShape": _FIB + " FP8 FP4 INT4", "Conv": _F,
    "ConvTranspose": _F, "Cos": _F, "Cosh": _F, "CumSum": _F, "DeformConv": "FP32 FP16",
    "DepthToSpace": _FI, "DequantizeLinear": "INT8 FP8 FP4 INT4", "Div": _FI, "Dropout": _F, "Einsum": _F,
    "Elu": _F, "Equal": _FI, "Erf": _F, "Exp": _F, "Expand": _FIB, "EyeLike": _FIB, "Flatten": _FIB,
    "Floor": _F, "Gather": _FIB, "GatherElements": _FIB, "GatherND": _FIB, "Gelu": _FI + " INT8", "Gemm": _F,
    "GlobalAveragePool": _F, "GlobalLpPool": _F, "GlobalMaxPool": _F, "Greater": _FI, "GreaterOrEqual": _FI,
    "GridSample": "FP32 FP16", "GroupNormalization": _F, "GRU": _F, "HammingWindow": "FP32 FP16",
    "HannWindow": "FP32 FP16", "HardSigmoid": _F, "HardSwish": _F, "Hardmax": _F, "Identity": _FIB,
    "If": _FIB, "ImageScaler": _F, "InstanceNormalization": _F, "IsInf": _F, "IsNaN": _FI,
    "LayerNormalization": _F, "LeakyRelu": _F, "Less": _FI, "LessOrEqual": _FI, "Log": _F, "LogSoftmax": _F,
    "Loop": _FIB, "LRN": _F, "LSTM": _F, "LpNormalization": _F, "LpPool": _F, "MatMul": _F, "Max": _FI,
    "MaxPool": _F, "Mean": _FI + " FP8", "MeanVarianceNormalization": _F, "Min": _FI, "Mish": "FP32 FP16",
    "Mod": _FI, "Mul": _FI, "Neg": _FI, "NonMaxSuppression": "FP32 FP16", "NonZero": "FP32 FP16",
    "Not": "BOOL", "OneHot": _FIB, "Or": "BOOL", "Pad": _FI, "ParametricSoftplus": _F, "Pow": _FI,
    "PRelu": _F, "QuantizeLinear": _F, "RandomNormal": _F, "RandomNormalLike": _F, "RandomUniform": _F,
    "RandomUniformLike": _F, "Range": _FI, "Reciprocal": _F, "ReduceL1": _FI, "ReduceL2": _FI,
    "ReduceLogSum": _FI, "ReduceLogSumExp": _FI, "ReduceMax": _FI, "ReduceMean": _FI, "ReduceMin": _FI,
    "ReduceProd": _FI, "ReduceSum": _FI, "ReduceSumSquare": _FI, "Relu": _FI, "Reshape": _FIB,
    "Resize": _F, "ReverseSequence": _FIB, "RMSNormalization": _F, "RNN": _F, "RoiAlign": "FP32 FP16",
    "RotaryEmbedding": _F + " INT64", "Round": _F, "STFT": "FP32", "ScaledTanh": _F, "Scan": _F,
    "Scatter": _FI, "ScatterElements": _FI, "ScatterND": _FI, "Selu": _F, "Shape": _FIB, "Shrink": _FI,
    "Sigmoid": _F, "Sign": _FI, "Sin": _F, "Sinh": _F, "Size": _FIB, "Slice": _FIB, "Softmax": _F,
    "Softplus": _F, "Softsign": _F, "SpaceToDepth": _FI, "Split": _FIB, "Sqrt": _F, "Squeeze": _FIB,
    "Sub": _FI, "Sum": _FI, "Tan": _F, "Tanh": _F, "TensorScatter": _F + " INT32", "ThresholdedRelu": _F,
    "Tile": _FIB, "TopK": _FI, "Transpose": _FIB, "Trilu": _FIB, "Unsqueeze": _FIB, "Upsample": _F,
    "Where": _FIB, "Xor": "BOOL",
}
# TensorRT's own operators (domain "trt") that its ONNX parser reads as built-ins (docs/operators.md,
# "TensorRT-specific operators"), with the data types they take: what ModelOpt's NVFP4 export emits.
TENSORRT_OPS: dict[str, str] = {"TRT_FP4DynamicQuantize": "FP32 FP16 BF16"}
# Listed as unsupported ("N") in the same table; anything in neither list is unknown to the parser too.
UNSUPPORTED = set(
    "AffineGrid Bernoulli BitShift BitwiseAnd BitwiseNot BitwiseOr BitwiseXor Col2Im CenterCropPad Compress "
    "ConcatFromSequence ConvInteger DFT Det DynamicQuantizeLinear ImageDecoder MatMulInteger MaxRoiPool "
    "MaxUnpool MelWeightMatrix Multinomial NegativeLogLikelihoodLoss Optional OptionalGetElement "
    "OptionalHasElement QLinearConv QLinearMatMul RegexFullMatch SequenceAt SequenceConstruct SequenceEmpty "
    "SequenceErase SequenceInsert SequenceLength SequenceMap SoftmaxCrossEntropyLoss SplitToSequence "
    "StringConcat StringNormalizer StringSplit TfIdfVectorizer Unique".split()
)
_TYPE_NAMES = {
    ir.DataType.FLOAT: "FP32", ir.DataType.FLOAT16: "FP16", ir.DataType.BFLOAT16: "BF16",
    ir.DataType.INT32: "INT32", ir.DataType.INT64: "INT64", ir.DataType.BOOL: "BOOL", ir.DataType.INT8: "INT8",
    ir.DataType.UINT8: "UINT8", ir.DataType.FLOAT8E4M3FN: "FP8", ir.DataType.INT4: "INT4",
    ir.DataType.FLOAT4E2M1: "FP4", ir.DataType.DOUBLE: "DOUBLE",
}
# (operator, input index) that TensorRT needs as a build-time constant
_CONSTANT_INPUTS = {("CumSum", 1), ("Squeeze", 1), ("Unsqueeze", 1), ("TopK", 1), ("OneHot", 1),
                    ("Dropout", 2)} | {(op, 1) for op in SUPPORTED if op.startswith("Reduce")}
# the scale of a Q/DQ pair too (TensorRT folds it into the quantized layer)
_CONSTANT_INPUTS |= {("QuantizeLinear", 1), ("DequantizeLinear", 1)}
# operators whose type list applies to the data input only: a Q/DQ scale is float and its zero point has
# the quantized type whatever the data's (the onnx-tensorrt table lists the data's types)
_DATA_ONLY = {"QuantizeLinear", "DequantizeLinear"}


def check_tensorrt(model: ir.Model, ctx: PassContext) -> PassResult:
    """Changes nothing; ``findings`` lists every node, type or shape TensorRT
    10.15's ONNX parser would reject (empty: the graph is TensorRT-ready)."""
    return PassResult(model, modified=False, findings=lint(model))


def lint(model: ir.Model) -> list[str]:
    """What TensorRT's ONNX parser would reject in ``model``, one line each."""
    findings = []
    opset = model.opset_imports.get("", None)
    if opset is not None and not OPSET_RANGE[0] <= opset <= OPSET_RANGE[1]:
        findings.append(f"opset {opset} is outside TensorRT {TENSORRT_VERSION}'s range {OPSET_RANGE}; "
                        "re-export with --opset 18")
    for kind, values in (("input", model.graph.inputs), ("output", model.graph.outputs)):
        for v in values:
            if not _profiled(v.shape):
                findings.append(f"graph {kind} {v.name!r} has a shape {v.shape} that no optimization profile can "
                                f"bound; graph dimensions must be static or one of {', '.join(PROFILE_DIMS)}")
            if v.dtype is not None and _TYPE_NAMES.get(v.dtype) in (None, "DOUBLE", "INT4", "FP4"):
                findings.append(f"graph {kind} {v.name!r} has dtype {v.dtype}, which TensorRT cannot bind")
    for node in model.graph:
        findings.extend(_check_node(node))
    return findings


def _check_node(node: ir.Node) -> list[str]:
    where = f"{node.op_type} node {node.name!r}"
    if node.domain == "trt" and node.op_type in TENSORRT_OPS:
        return _check_types(node, where, TENSORRT_OPS[node.op_type], list(node.inputs)[:1])
    if node.domain not in ("", "ai.onnx"):
        return [f"{where}: custom domain {node.domain!r} needs a TensorRT plugin"]
    if node.op_type in UNSUPPORTED:
        return [f"{where}: operator {node.op_type} is not supported by TensorRT's ONNX parser"]
    if node.op_type not in SUPPORTED:
        return [f"{where}: operator {node.op_type} is not in TensorRT {TENSORRT_VERSION}'s operator table"]
    values = list(node.inputs) + (list(node.outputs) if node.op_type in ("Cast", "CastLike") else [])
    if node.op_type in _DATA_ONLY:
        values = values[:1]
    out = _check_types(node, where, SUPPORTED[node.op_type], values)
    for (op, idx) in _CONSTANT_INPUTS:
        if node.op_type == op and len(node.inputs) > idx and node.inputs[idx] is not None:
            if ir.convenience.get_const_tensor(node.inputs[idx]) is None and not _fp4_scale(node, idx):
                out.append(f"{where}: input {idx} must be a build-time constant for TensorRT")
    if node.op_type == "TopK":
        k = ir.convenience.get_const_tensor(node.inputs[1])
        if k is not None and int(k.numpy().reshape(-1)[0]) >= 3840:
            out.append(f"{where}: K must be less than 3840 for TensorRT")
        if node.attributes.get_int("sorted", 1) != 1:
            out.append(f"{where}: TensorRT needs sorted=1")
    if node.op_type == "Attention":
        if len(node.inputs) > 4 and any(v is not None for v in node.inputs[4:]):
            out.append(f"{where}: past_key/past_value/nonpad_kv_seqlen inputs are unsupported by TensorRT")
        if len(node.outputs) > 1 and any(v is not None and v.uses() for v in node.outputs[1:]):
            out.append(f"{where}: only the first output is supported by TensorRT")
    for v in node.outputs:
        if v.shape is not None and not _profiled(v.shape):
            out.append(f"{where}: output {v.name!r} has a data-dependent shape {v.shape}")
    return out


def _profiled(shape) -> bool:
    """Every dimension static, or derived from the graph inputs' dynamic dimensions (the forward's rows and
    the slots it reads: an optimization profile bounds them). A dimension named after anything else (the
    exporter's ``u0`` for a size read from data) has no bound TensorRT can plan for."""
    if shape is None:
        return False
    for d in shape:
        if isinstance(d, int):
            continue
        names = set(re.findall(r"[A-Za-z_]\w*", str(d)))
        if not names or not names <= set(PROFILE_DIMS):
            return False
    return True


def _fp4_scale(node: ir.Node, idx: int) -> bool:
    """NVFP4's second DequantizeLinear: its block scales are themselves dequantized (FP8 by an fp32
    scale), from constants for a weight, from TRT_FP4DynamicQuantize for an activation."""
    producer = node.inputs[idx].producer()
    return (node.op_type == "DequantizeLinear" and idx == 1 and producer is not None
            and producer.op_type == "DequantizeLinear")


def _check_types(node: ir.Node, where: str, types: str, values: list) -> list[str]:
    allowed, out = set(types.split()), []
    for v in values:
        if v is None or v.dtype is None:
            continue
        name = _TYPE_NAMES.get(v.dtype, str(v.dtype))
        if name not in allowed:
            out.append(f"{where}: {v.name!r} has type {name}; TensorRT's {node.op_type} takes {sorted(allowed)}")
    return out


def group_findings(findings: list[str]) -> list[str]:
    """Findings that differ only in quoted names (one per node of a quantized layer: 29 alike in
    an int4 graph) as one line with a count, in first-seen order."""
    import re

    groups: dict[str, list[str]] = {}
    for f in findings:
        groups.setdefault(re.sub(r"'[^']*'", "'...'", f), []).append(f)
    return [members[0] if len(members) == 1 else f"{members[0]} (and {len(members) - 1} more like it)"
            for members in groups.values()]


def lint_file(path: str | Path) -> list[str]:
    """Lint one saved graph (external data is not loaded)."""
    proto = onnx.load(str(path), load_external_data=False)
    proto = onnx.shape_inference.infer_shapes(proto, strict_mode=False, data_prop=True)
    return lint(ir.serde.deserialize_model(proto))


def lint_artifact(directory: str | Path) -> dict[str, list[str]]:
    """step kind -> findings, for every graph of an exported artifact."""
    from nemocompile.artifact.manifest import Manifest

    manifest = Manifest.load(directory)
    return {g.step: lint_file(Path(directory) / g.file) for g in manifest.graphs}

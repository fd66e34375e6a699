"""Weight-only quantization: MatMul(x, W) -> com.microsoft MatMulNBits(x, W packed, scales[, zero points]).

The quantizer is ONNX Runtime's (``onnxruntime.quantization.MatMulNBitsQuantizer``
with its RTN and HQQ configs): each weight MatMul is cut out as a one-node
model, quantized there and spliced back, so only one weight is ever held
unpacked in memory and the graph is rewritten in place. Activations stay in
float in the graph (``compute="int8"`` lets the CPU kernel quantize them per block inside MatMulNBits). A weight seen by an earlier graph of the same export is not quantized
again: its packed tensors are reused, and the shared weights file (which
deduplicates by content) then holds them once for every graph.

What is quantized (decided for these models, measured in the README):
  * every MatMul whose weight is a 2-D initializer (q/k/v/o, gate/up/down),
  * the output head at its own precision, int8 by default: it is the largest
    matrix of the real models and read in full every step (float would keep
    a third of the bytes an 8B int4 step reads), but on the embedded model
    int4 rounding there costs the most greedy agreement (teacher-forced top-1
    with fp32: 0.80 int4 head, 0.86 float head, block 32, RTN),
  * not the embedding table: a step gathers B of its rows, so quantizing it
    saves disk and RAM but no bandwidth; it stays in the export dtype,
  * not the drafter LoRA (lora_A / lora_B): rank-r matrices, a few percent of
    a layer's bytes, kept in float beside the quantized base weight so the
    draft graph shares that base weight with every other graph.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field, replace

import numpy as np
import onnx
import onnx_ir as ir

from .base import PassContext, PassError, PassResult
from .share_weights import weight_key

BITS = {"int4": 4, "int8": 8}
METHODS = ("rtn", "hqq", "gptq")
BLOCK_SIZES = (16, 32, 64, 128, 256)
COMPUTE = {"float": 0, "int8": 4}  # -> MatMulNBits accuracy_level  # MatMulNBits: a power of two, at least 16
# A weight whose fp32 copy passes this is quantized in slices of output columns: protobuf caps the
# one-MatMul model at 2 GiB (an 8B model's head is 4096 x 131072 = 2 GiB in fp32), and the slices
# bound the quantizer's own copies.
CHUNK_BYTES = 1 << 30
HEAD_WEIGHTS = ("diffusion_head", "lm_head")  # the output head's parameter names (tied: embed_tokens.weight.T)


@dataclass(frozen=True)
class QuantSettings:
    """Which weight-only quantization an export asks for (None in PipelineOptions: float weights)."""

    precision: str = "int4"  # "int4" | "int8": bits per weight in MatMulNBits
    # "rtn": round to nearest, min/max per block; "hqq": half-quadratic (no calibration data); "gptq": GPTQ on
    # the activations each weight saw on calibration prompts (WeightQuantizer.calibration), int4 only
    method: str = "rtn"
    block_size: int = 32  # weights per scale along K
    symmetric: bool = False  # rtn: zero point fixed at the middle (no zero-point tensor); hqq is always asymmetric
    head: str = "int8"  # the output head: "int4", "int8" or "float" (see the module docstring)
    # How ONNX Runtime's CPU kernel computes (MatMulNBits accuracy_level): "int8" quantizes each activation
    # block to int8 inside the kernel and multiplies integers (4); "float" unpacks each weight block to fp32
    # and multiplies fp32 activations (0). Measured (1 thread, [1,1024]x[1024,32000]): fp32 MatMul 11 ms;
    # int4 int8 1.5 ms, int4 float 6.4 ms; int8 int8 2.4 ms, int8 float 390 ms (no fast CPU kernel).
    # Teacher-forced top-1 on the embedded model moved by <= 0.007 between the two.
    compute: str = "int8"

    def check(self) -> None:
        """One-line errors for settings ONNX Runtime's quantizer would reject deep inside."""
        if self.precision not in BITS:
            raise PassError(f"unknown weight precision {self.precision!r}; use int4 or int8")
        if self.method not in METHODS:
            raise PassError(f"unknown quantization method {self.method!r}; use one of {', '.join(METHODS)}")
        if self.block_size not in BLOCK_SIZES:
            raise PassError(f"quantization block size {self.block_size!r} is not supported; use one of "
                            f"{', '.join(map(str, BLOCK_SIZES))}")
        if self.head not in (*BITS, "float"):
            raise PassError(f"unknown head precision {self.head!r}; use int4, int8 or float")
        if self.compute not in COMPUTE:
            raise PassError(f"unknown quantized compute {self.compute!r}; use one of {', '.join(COMPUTE)}")
        if self.method in ("hqq", "gptq") and self.precision != "int4":
            raise PassError(f"{self.method} quantizes to int4 only (ONNX Runtime packs its {self.method} weights "
                            "in 4 bits); use --quant-method rtn for int8")


@dataclass
class WeightQuantizer:
    """The settings plus what one export has quantized so far (weight -> packed tensors and attributes)."""

    settings: QuantSettings
    # gptq: weight name (as in the graph, e.g. model.encoder.layers.0.mlp.up_proj.weight.T) -> the activations
    # [tokens, K] that weight multiplied on the calibration prompts
    calibration: dict[str, np.ndarray] = field(default_factory=dict)
    quantized: dict[tuple, tuple[list[ir.TensorProtocol], dict]] = field(default_factory=dict)
    reused: int = 0  # weights another graph had already quantized

    def __post_init__(self) -> None:
        self.settings.check()

    def quantize(self, weight: ir.TensorProtocol, name: str, precision: str) -> tuple[list[ir.TensorProtocol], dict]:
        """(packed weight, scales[, zero points]) and MatMulNBits' attributes for ``weight`` [K, N]."""
        key = (*weight_key(weight), precision)
        if key in self.quantized:
            self.reused += 1
            return self.quantized[key]
        s = self.settings
        if precision != s.precision:  # the head at its own bits; hqq and gptq pack int4 only: int8 goes by rtn
            s = replace(s, precision=precision, method=s.method if precision == "int4" else "rtn")
        activations = None
        if s.method == "gptq":
            activations = self.calibration.get(name)
            if activations is None:
                raise PassError(f"{name}: gptq needs the activations this weight saw on calibration prompts and "
                                "none were collected; export through export_artifact (it calibrates) or use rtn")
        result = _quantize_one(weight, name, s, activations)
        self.quantized[key] = result
        return result


def quantize_weights(model: ir.Model, ctx: PassContext) -> PassResult:
    """Outputs close to the float graph (weights rounded to int4/int8 per block; activations in float);
    replaces every weight MatMul but the LoRA's (and the head's when its precision is float) by MatMulNBits."""
    quantizer: WeightQuantizer | None = ctx.quantizer
    if quantizer is None:
        return PassResult(model, modified=False, notes=["declined: no quantization settings for this export"])
    graph, done, notes = model.graph, 0, []
    for node, w in weight_matmuls(graph):
        why = _declined(w, quantizer.settings)
        if why:
            notes.append(f"{node.name}: kept in float, {why}")
            continue
        precision = quantizer.settings.head if _is_head(w.name) else quantizer.settings.precision
        tensors, attrs = quantizer.quantize(w.const_value, w.name, precision)
        inputs = [node.inputs[0]] + [_initializer(graph, t) for t in tensors]
        new = ir.Node("com.microsoft", "MatMulNBits", inputs, attributes=[_attr(k, v) for k, v in attrs.items()],
                      name=f"{node.name}_Q{attrs['bits']}", num_outputs=1)
        old = node.outputs[0]
        new.outputs[0].shape, new.outputs[0].type = old.shape, old.type
        graph.insert_before(node, new)
        old.replace_all_uses_with(new.outputs[0], replace_graph_outputs=True)
        graph.remove(node, safe=True)
        new.outputs[0].name = old.name
        if not w.uses() and w.name in graph.initializers:
            graph.initializers.pop(w.name)
        done += 1
    if done:
        model.opset_imports.setdefault("com.microsoft", 1)
    return PassResult(model, modified=done > 0, count=done, notes=notes)


def weight_matmuls(graph: ir.Graph):
    """(node, weight) for every MatMul by a constant weight, in graph order, safe to rewrite while
    iterating (attention's activation x activation products are skipped)."""
    for node in list(graph):
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx"):
            continue
        w = node.inputs[1]
        if w is not None and w.is_initializer() and w.const_value is not None:
            yield node, w


def _declined(w: ir.Value, settings: QuantSettings) -> str | None:
    shape = w.const_value.shape if w.const_value is not None else None
    if shape is None or len(shape) != 2:
        return "not a 2-D weight"
    if "lora_" in w.name:
        return "drafter LoRA (small; kept beside the shared quantized base weight)"
    if settings.head == "float" and _is_head(w.name):
        return "output head (head precision float)"
    if w.const_value.dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16):
        return f"weight dtype {w.const_value.dtype} is not a float"
    return None


def _is_head(name: str) -> bool:
    """The output head's MatMul weight: its own parameter, or the tied embedding transposed."""
    return any(h in name for h in HEAD_WEIGHTS) or "embed_tokens" in name


def _initializer(graph: ir.Graph, tensor: ir.TensorProtocol) -> ir.Value:
    if tensor.name in graph.initializers:  # q_proj and k_proj of one layer never collide; a re-run would
        return graph.initializers[tensor.name]
    value = ir.Value(name=tensor.name, shape=ir.Shape(tensor.shape), type=ir.TensorType(tensor.dtype),
                     const_value=tensor)
    graph.register_initializer(value)
    return value


def _attr(name: str, value) -> ir.Attr:
    return ir.AttrInt64(name, int(value))


def one_matmul_model(weight: ir.TensorProtocol, name: str) -> onnx.ModelProto:
    """``y = x @ weight`` alone (x: [tokens, k]): the model a quantizer sees for one weight,
    here and in passes/quantize_qdq.py."""
    k, n = weight.shape
    elem = weight.dtype.value  # ONNX TensorProto element type
    x = onnx.helper.make_tensor_value_info("x", elem, ["tokens", k])
    y = onnx.helper.make_tensor_value_info("y", elem, ["tokens", n])
    graph = onnx.helper.make_graph([onnx.helper.make_node("MatMul", ["x", name], ["y"], name="mm")], "one", [x], [y])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)])
    # the weight goes in last and once: make_graph and make_model would each copy it again (at 8B, gigabytes
    # per weight: a third of an int4 export's time)
    ir.serde.serialize_tensor_into(model.graph.initializer.add(), ir.Tensor(weight.numpy(), dtype=weight.dtype,
                                                                             name=name))
    return model


def _quantize_one(weight: ir.TensorProtocol, name: str, s: QuantSettings,
                  activations: np.ndarray | None = None) -> tuple[list[ir.TensorProtocol], dict]:
    """ONNX Runtime's quantizer on one-MatMul models holding ``weight`` (gptq: fed ``activations``),
    in slices of output columns when the whole would pass CHUNK_BYTES."""
    array = weight.numpy()  # read once (a streamed weight is read from the checkpoint on every access)
    k, n = array.shape
    step = max(1, CHUNK_BYTES // (k * max(array.itemsize, 4)))  # the quantizer works on fp32 copies
    if n <= step:
        return _quantize_slice(ir.Tensor(array, dtype=weight.dtype), name, s, activations)
    # MatMulNBits lays out its packed weight, scales and zero points by output column, and
    # each column's blocks are quantized on their own: slices along N concatenate exactly
    # (HQQ's early stop is then per slice).
    parts = [_quantize_slice(ir.Tensor(np.ascontiguousarray(array[:, i:i + step]), dtype=weight.dtype), name, s,
                             activations) for i in range(0, n, step)]
    tensors = [ir.Tensor(np.concatenate([p[0][j].numpy() for p in parts]), name=t.name)
               for j, t in enumerate(parts[0][0])]
    return tensors, {**parts[0][1], "N": n}


def _quantize_slice(weight: ir.TensorProtocol, name: str, s: QuantSettings,
                    activations: np.ndarray | None = None) -> tuple[list[ir.TensorProtocol], dict]:
    mnb = _ort_quantizer()
    proto = one_matmul_model(weight, name)
    bits = BITS[s.precision]
    if s.method == "hqq":
        config = mnb.HQQWeightOnlyQuantConfig(block_size=s.block_size, bits=bits)
    elif s.method == "gptq":
        config = mnb.GPTQWeightOnlyQuantConfig(calibration_data_reader=_Activations(activations))
    else:
        config = mnb.DefaultWeightOnlyQuantConfig(block_size=s.block_size, is_symmetric=s.symmetric, bits=bits)
    quiet = logging.getLogger("onnxruntime.quantization")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # HQQ wraps ONNX's read-only array in torch (never written)
            q = mnb.MatMulNBitsQuantizer(proto, bits=bits, block_size=s.block_size, is_symmetric=s.symmetric,
                                         algo_config=config)
            q.process()
    finally:
        quiet.setLevel(level)
    out = q.model.model if hasattr(q.model, "model") else q.model  # gptq hands back its own wrapper or a proto
    out = getattr(out, "model", out)
    nodes = list(out.graph.node)
    if len(nodes) != 1 or nodes[0].op_type != "MatMulNBits":
        raise PassError(f"{name}: ONNX Runtime's quantizer did not produce one MatMulNBits "
                        f"(got {[nd.op_type for nd in nodes]}); report this with the weight's shape {list(weight.shape)}")
    inits = {t.name: t for t in out.graph.initializer}
    tensors = [ir.Tensor(onnx.numpy_helper.to_array(inits[i]), name=i) for i in list(nodes[0].input)[1:]]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in nodes[0].attribute}
    attrs.pop("accuracy_level", None)
    if COMPUTE[s.compute]:
        attrs["accuracy_level"] = COMPUTE[s.compute]
    return tensors, attrs


def _ort_quantizer():
    """onnxruntime.quantization.matmul_nbits_quantizer, imported without the ``logging.basicConfig(level=INFO)``
    it runs at import: that would print every library's INFO lines (thousands per export) to stderr."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    from onnxruntime.quantization import matmul_nbits_quantizer

    root.handlers[:] = handlers
    root.setLevel(level)
    return matmul_nbits_quantizer


class _Activations:
    """ONNX Runtime's calibration-reader protocol over one weight's activations, in chunks of 256 tokens."""

    def __init__(self, activations: np.ndarray):
        self.chunks = [activations[i:i + 256] for i in range(0, len(activations), 256)]

    def get_next(self) -> dict | None:
        return {"x": self.chunks.pop(0)} if self.chunks else None

    def __iter__(self):
        return iter(lambda: self.get_next(), None)


__all__ = ["quantize_weights", "QuantSettings", "WeightQuantizer", "BITS", "METHODS", "BLOCK_SIZES"]

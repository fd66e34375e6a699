"""An nvfp4 artifact's arithmetic in eager PyTorch on the CPU, for measuring its quality.

nvfp4 graphs run on TensorRT only (their activations are quantized by
``trt::TRT_FP4DynamicQuantize``), so quantized parity cannot run them here.
This module rebuilds what they compute from the artifact itself: each base
weight MatMul's FP4 weight, decoded with its FP8 block scales and fp32 tensor
scale, replaces the float weight of an fp32 copy of the model, and the
Linear's input is quantized to NVFP4 per block of 16 under the artifact's own
activation scale by NVIDIA Model Optimizer's ``NVFP4QTensor`` (its torch
quantize/dequantize, which run on the CPU) before the matmul. What it does
not emulate: TensorRT's kernels and accumulation order, and the fp16 of the
rest of the graph (everything else runs in fp32 here).
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch

from nemocompile.errors import NemocompileError
from nemocompile.artifact.manifest import Manifest
from nemocompile.model import TriModeModel

BLOCK = 16


def emulated_model(artifact_dir: str | Path, fp32: TriModeModel) -> TriModeModel:
    """A copy of ``fp32`` that computes as the nvfp4 artifact at ``artifact_dir`` (see the module docstring)."""
    qtensor = _nvfp4_qtensor()
    manifest = Manifest.load(artifact_dir)
    graph = onnx.load(str(Path(artifact_dir) / manifest.graph("prefill").file)).graph  # with its weights
    model = copy.deepcopy(fp32).float().eval()
    found = 0
    for name, weight, x_scale in _quantized_matmuls(graph):
        module = model.get_submodule(name.removeprefix("model.").removesuffix(".weight.T"))
        if module.weight.shape != weight.T.shape:
            raise NemocompileError(f"{artifact_dir}: {name} holds {list(weight.shape)}, the model's weight is "
                                   f"{list(module.weight.shape)}; pass the checkpoint the artifact was exported from")
        module.weight = torch.nn.Parameter(torch.from_numpy(np.ascontiguousarray(weight.T)), requires_grad=False)
        module.register_forward_pre_hook(_quantize_input(qtensor, x_scale))
        found += 1
    if not found:
        raise NemocompileError(f"{artifact_dir}: its prefill graph has no NVFP4 MatMul; is it an nvfp4 artifact?")
    return model


def _quantized_matmuls(graph: onnx.GraphProto):
    """(weight name, decoded weight [K, N], activation scale) for every NVFP4 MatMul: MatMul(Cast(DQ(DQ(x_f4 ..))),
    Cast(Transpose(DQ(W_f4, DQ(fp8 block scales, fp32 scale)))))."""
    produced = {o: n for n in graph.node for o in n.output}
    inits = {i.name: i for i in graph.initializer}

    def array(name: str) -> np.ndarray:
        return onnx.numpy_helper.to_array(inits[name]).astype(np.float32)  # FP4 / FP8 decoded by ml_dtypes

    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] in inits:
            continue
        path = [produced.get(node.input[1])]
        for _ in range(2):  # Cast <- Transpose <- DQ
            path.append(produced.get(path[-1].input[0]) if path[-1] is not None else None)
        cast, transpose, dq = path
        if dq is None or dq.op_type != "DequantizeLinear" or transpose.op_type != "Transpose":
            continue
        if inits.get(dq.input[0]) is None or inits[dq.input[0]].data_type != onnx.TensorProto.FLOAT4E2M1:
            continue
        scale = produced[dq.input[1]]  # DQ(fp8 block scales, fp32 tensor scale)
        block_scales = np.repeat(array(scale.input[0]), BLOCK, axis=1) * float(array(scale.input[1]).reshape(-1)[0])
        weight = (array(dq.input[0]) * block_scales).T  # [N, K] -> [K, N]
        x = produced[produced[produced[node.input[0]].input[0]].input[0]]  # Cast <- DQ <- DQ... <- the quantizer
        while x.op_type != "TRT_FP4DynamicQuantize":
            x = produced[x.input[0]]
        yield dq.input[0].removesuffix("_f4"), weight, float(array(x.input[1]).reshape(-1)[0])


def _quantize_input(qtensor, x_scale: float):
    """A forward pre-hook: the Linear's input as TRT_FP4DynamicQuantize and its two DequantizeLinear make it."""
    double = torch.tensor(x_scale, dtype=torch.float32)

    def hook(module, args):
        (x, *rest) = args
        packed, block_scale, _ = qtensor.quantize(x.float(), BLOCK, weights_scaling_factor_2=double)
        y = packed.dequantize(dtype=torch.float32, scale=block_scale, double_scale=double, block_sizes={-1: BLOCK})
        return (y.to(x.dtype), *rest)

    return hook


def _nvfp4_qtensor():
    from nemocompile.passes.quantize_qdq import INSTALL, without_tensorrt

    try:
        with without_tensorrt(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # modelopt.torch warns about the installed transformers version
            from modelopt.torch.quantization.qtensor import NVFP4QTensor
    except ImportError as e:
        raise NemocompileError(f"measuring an nvfp4 artifact needs NVIDIA Model Optimizer's NVFP4QTensor ({e.msg}); "
                               f"install it: {INSTALL}") from None
    return NVFP4QTensor


__all__ = ["emulated_model"]

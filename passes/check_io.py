"""Invariant: the graph's inputs and outputs are exactly the manifest contract."""

from __future__ import annotations

import onnx_ir as ir

from nemocompile.graphs.steps import DYNAMIC_DIMS

from .base import PassContext, PassError, PassResult

_DTYPES = {"float32": ir.DataType.FLOAT, "float16": ir.DataType.FLOAT16, "bfloat16": ir.DataType.BFLOAT16,
           "int64": ir.DataType.INT64}


def check_io(model: ir.Model, ctx: PassContext) -> PassResult:
    """Raises PassError unless I/O names, order, shapes and dtypes match ctx (the batch dimension of the
    per-forward tensors may be dynamic, everything else static); changes nothing."""
    for kind, values, specs in (("input", model.graph.inputs, ctx.inputs), ("output", model.graph.outputs, ctx.outputs)):
        got = [v.name for v in values]
        want = [s.name for s in specs]
        if got != want:
            raise PassError(f"{ctx.name}: graph {kind}s are {got}, the manifest contract needs {want}")
        for v, s in zip(values, specs):
            shape = None if v.shape is None else [d if isinstance(d, int) else str(d) for d in v.shape]
            want = list(s.shape)
            if shape and shape[0] == DYNAMIC_DIMS.get(v.name):
                want[0] = shape[0]  # the forward's rows or slots: dynamic, 1 .. the manifest's size
            if shape != want:
                raise PassError(f"{ctx.name}: {kind} {v.name!r} has shape {shape}, expected {want}")
            if v.dtype != _DTYPES[s.dtype]:
                raise PassError(f"{ctx.name}: {kind} {v.name!r} has dtype {v.dtype}, expected {s.dtype}")
    return PassResult(model, modified=False)

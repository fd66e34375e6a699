"""Clip on integers -> Max/Min, which TensorRT takes for INT32/INT64."""

from __future__ import annotations

import onnx_ir as ir

from .base import PassContext, PassResult

_FLOATS = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE}


def lower_integer_clip(model: ir.Model, ctx: PassContext) -> PassResult:
    """Outputs identical (integer min/max is exact); TensorRT's Clip is float-only,
    and ``positions.clamp(min=0)`` exports as an INT64 Clip."""
    graph, count, notes = model.graph, 0, []
    for node in list(graph):
        if node.op_type != "Clip" or node.domain not in ("", "ai.onnx"):
            continue
        x = node.inputs[0]
        if x.dtype is None:
            notes.append(f"{node.name}: declined, input type unknown")
            continue
        if x.dtype in _FLOATS:
            continue
        y = x
        bounds = list(node.inputs[1:]) + [None, None]
        for op, bound in (("Max", bounds[0]), ("Min", bounds[1])):
            if bound is not None:
                new = ir.node(op, [y, bound], name=f"{node.name}_{op.lower()}")
                new.outputs[0].dtype, new.outputs[0].shape = x.dtype, x.shape
                graph.insert_before(node, new)
                y = new.outputs[0]
        out = node.outputs[0]
        if out.is_graph_output():  # the last new value takes the output's place and name
            graph.outputs[graph.outputs.index(out)] = y
            name, out.name = out.name, None
            y.name = name
        else:
            out.replace_all_uses_with(y)
        graph.remove(node, safe=True)
        count += 1
    return PassResult(model, modified=count > 0, count=count, notes=notes)

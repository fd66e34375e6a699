"""Transpose(weight) -> a pre-transposed weight, computed lazily one tensor at a time."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from .base import PassContext, PassResult


def fold_weight_transposes(model: ir.Model, ctx: PassContext) -> PassResult:
    """Outputs unchanged bit for bit; removes the Transpose in front of every
    weight MatMul (torch's ``linear`` exports as MatMul(x, Transpose(W))).

    The new initializer is a LazyTensor: the transposed bytes exist only while
    share_weights streams them to disk, so no second copy of the weights is
    ever held. Without this a backend transposes at load (ORT keeps a private
    copy per session) or, worse, per call.
    """
    graph = model.graph
    folded, notes = 0, []
    for node in list(graph):
        if node.op_type != "Transpose" or node.domain not in ("", "ai.onnx"):
            continue
        src = node.inputs[0]
        if src is None or not src.is_initializer() or src.const_value is None:
            continue
        if node.outputs[0].is_graph_output():
            notes.append(f"{node.name}: declined, its output is a graph output")
            continue
        perm_attr = node.attributes.get("perm")
        rank = len(src.const_value.shape)
        perm = tuple(perm_attr.as_ints()) if perm_attr is not None else tuple(reversed(range(rank)))
        tensor = src.const_value
        shape = ir.Shape([tensor.shape[p] for p in perm])
        name = f"{src.name}.T" if perm == (1, 0) else f"{src.name}.perm{''.join(map(str, perm))}"
        lazy = TransposedWeight(tensor, perm, shape, name)
        new = ir.Value(name=name, shape=shape, type=ir.TensorType(tensor.dtype), const_value=lazy)
        if name in graph.initializers:  # the same weight transposed twice the same way
            new = graph.initializers[name]
        else:
            graph.register_initializer(new)
        node.outputs[0].replace_all_uses_with(new)
        graph.remove(node, safe=True)
        if not src.uses():
            graph.initializers.pop(src.name)
        folded += 1
    return PassResult(model, modified=folded > 0, count=folded, notes=notes)


class TransposedWeight(ir.LazyTensor):
    """``source`` transposed by ``perm``, computed only when its bytes are read."""

    def __init__(self, source: ir.TensorProtocol, perm: tuple[int, ...], shape: ir.Shape, name: str):
        def run() -> ir.Tensor:
            return ir.Tensor(np.ascontiguousarray(source.numpy().transpose(perm)), dtype=source.dtype)

        super().__init__(run, dtype=source.dtype, shape=shape, name=name)
        self.source, self.perm = source, perm

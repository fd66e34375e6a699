"""THE ordered lists of passes: over step descriptions, then over every exported graph.

``DESCRIPTION_PIPELINE`` rewrites the export plan's step descriptions
(graphs/steps.py) before anything is lowered to ONNX.

Each stage is a pass ``(ir.Model, PassContext) -> PassResult``; ``when`` makes
a stage conditional on an export option. The graph's I/O contract is checked
on the way in and out; the saved file then goes through the ONNX checker and
strict shape inference (check_onnx). ``dump_after=NAME`` saves a snapshot of
the graph right after that stage.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import onnx_ir as ir

from .base import PassContext, PassError, PassResult
from .check_io import check_io
from .check_tensorrt import check_tensorrt
from .fold_weight_transposes import fold_weight_transposes
from .fuse_draft_verify import fuse_draft_verify
from .lower_integer_clip import lower_integer_clip
from .quantize_qdq import quantize_qdq
from .quantize_weights import quantize_weights
from .share_weights import share_weights
from .simplify_graph import simplify_graph
from .strip_metadata import strip_metadata


@dataclass(frozen=True)
class PipelineOptions:
    optimize: bool = True  # fold weight transposes and simplify the graph (off: the exporter's raw graph)
    share_weights: bool = True  # one external-data file for all graphs (off: weights stay in each graph)
    quantize_weights: bool = False  # int4/int8 MatMulNBits weights (settings: PassContext.quantizer)
    quantize_qdq: bool = False  # TensorRT fp8/int4-awq Q/DQ by ModelOpt (settings: PassContext.qdq)


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[ir.Model, PassContext], PassResult]
    when: Callable[[PipelineOptions], bool] = lambda opts: True


# Passes over step descriptions, in order, before lowering.
DESCRIPTION_PIPELINE = [
    # Must run before lowering: it resolves every Fuse request into a plain
    # StepSpec (the verify/draft fusion of quadratic self-speculation), and only
    # plain specs lower to ONNX.
    ("fuse_draft_verify", fuse_draft_verify),
]


def run_description_pipeline(specs: list) -> list:
    """The plan's descriptions after every description pass; a Fuse left unresolved is an error."""
    for _name, run in DESCRIPTION_PIPELINE:
        specs = run(specs).specs
    left = [s.step for s in specs if not hasattr(s, "layout")]
    if left:
        raise PassError(f"steps {left} are still fusion requests after the description passes")
    return specs


PIPELINE: list[Stage] = [
    # Invariant in: the exporter produced exactly the manifest's inputs and outputs.
    Stage("check_io_in", check_io),
    # Before share_weights, so the shared file holds the layout MatMul reads and
    # the transpose is computed while streaming (one tensor in memory at a
    # time); before simplify_graph, whose constant folder would transpose small
    # weights into new in-memory copies on its own.
    Stage("fold_weight_transposes", fold_weight_transposes, when=lambda o: o.optimize),
    # After fold_weight_transposes (MatMulNBits needs the weight as an initializer,
    # not Transpose(W)) and before share_weights, so the shared file holds the
    # packed weights (deduplicated across graphs: held once) and never the float ones.
    Stage("quantize_weights", quantize_weights, when=lambda o: o.quantize_weights),
    # Same place and reasons as quantize_weights (never both: export refuses --weights with --precision):
    # it needs each weight as a plain initializer, and share_weights must see the
    # Q/DQ weights (int4: packed) rather than the float ones.
    Stage("quantize_qdq", quantize_qdq, when=lambda o: o.quantize_qdq),
    # Before simplify_graph: from here on every weight is a reference into the
    # shared file, so no later stage can hold (or copy) weight bytes.
    Stage("share_weights", share_weights, when=lambda o: o.share_weights),
    Stage("simplify_graph", simplify_graph, when=lambda o: o.optimize),
    # After simplify_graph, which leaves the Clip's bounds as constants and the
    # types inferred; always on: it is what makes the graph TensorRT-parsable.
    Stage("lower_integer_clip", lower_integer_clip),
    # After every rewrite, so a dump_after of an earlier stage still shows
    # which torch line each node came from.
    Stage("strip_metadata", strip_metadata),
    # Invariant out: no rewrite renamed, reordered or reshaped an input or output.
    Stage("check_io_out", check_io),
    # Last: the lint must see exactly the graph that ships.
    Stage("check_tensorrt", check_tensorrt),
]

STAGE_NAMES = [s.name for s in PIPELINE]


def run_pipeline(model: ir.Model, ctx: PassContext, options: PipelineOptions = PipelineOptions(),
                 dump_after: str | None = None) -> list[tuple[str, PassResult]]:
    """Run every enabled stage in order; returns (stage name, result) per stage run."""
    if dump_after is not None and dump_after not in STAGE_NAMES:
        raise PassError(f"unknown stage {dump_after!r} for dump_after; stages are {STAGE_NAMES}")
    results = []
    for stage in PIPELINE:
        if not stage.when(options):
            continue
        result = stage.run(model, ctx)
        model = result.model
        results.append((stage.name, result))
        if stage.name == dump_after:
            dump(model, ctx, stage.name)
    return results


def dump(model: ir.Model, ctx: PassContext, stage: str) -> None:
    """Save a self-contained copy of the graph (weights included) for inspection."""
    if ctx.dump_dir is None:
        raise PassError("dump_after needs a dump directory (PassContext.dump_dir)")
    ctx.dump_dir.mkdir(parents=True, exist_ok=True)
    ir.save(model, ctx.dump_dir / f"{ctx.name}.{stage}.onnx", external_data=f"{ctx.name}.{stage}.data")

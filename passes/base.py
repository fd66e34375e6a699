"""What every pass shares: the result it returns and the context it reads.

A pass is ``def verb_object(model: ir.Model, ctx: PassContext) -> PassResult``:
it rewrites ``model`` in place, says whether it changed anything and how much
(``count``), and never raises for a pattern it declines to rewrite (it says why
in ``notes``). Lint passes report ``findings`` and leave the graph alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx_ir as ir

from nemocompile.errors import NemocompileError
from nemocompile.artifact.manifest import TensorSpec


class PassError(NemocompileError):
    """A graph broke an invariant on the way into or out of the pass pipeline."""


@dataclass
class PassResult:
    model: ir.Model
    modified: bool
    count: int = 0  # what changed: nodes removed, tensors moved, ...
    notes: list[str] = field(default_factory=list)  # declined rewrites and other remarks, in words
    findings: list[str] = field(default_factory=list)  # lint passes: problems found (empty = clean)


@dataclass
class PassContext:
    """What passes may read about the graph being rewritten."""

    name: str  # the graph's step kind, for messages
    inputs: list[TensorSpec]  # the manifest contract this graph must keep
    outputs: list[TensorSpec]
    # tools the export shares across its graphs, typed by the passes that use them (base imports no pass)
    weights: Any = None  # share_weights.WeightStore: the artifact's shared external-data file
    opset: int = 18
    dump_dir: Path | None = None  # where dump_after writes its snapshot
    quantizer: Any = None  # quantize_weights.WeightQuantizer: weight-only quantization
    qdq: Any = None  # quantize_qdq.QdqQuantizer: TensorRT Q/DQ precision (ModelOpt)

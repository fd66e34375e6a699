"""Fuse a causal step and a draft into one forward (quadratic self-speculation, spec 3.4).

A pass over step descriptions (graphs/steps.py), run before lowering: each
:class:`Fuse` request becomes one :class:`StepSpec` whose spine is the causal
step's tokens and whose branches are the draft's masks, anchored after every
spine token ("each") or after the last one ("last").
"""

from __future__ import annotations

from dataclasses import dataclass, field

from nemocompile.graphs.steps import Branch, Fuse, Layout, StepSpec

from .base import PassError


@dataclass
class DescriptionResult:
    specs: list[StepSpec]
    count: int = 0  # fusions made
    notes: list[str] = field(default_factory=list)


def fuse_draft_verify(specs: list[StepSpec | Fuse]) -> DescriptionResult:
    """Invariant: each spine row of the fused step computes exactly what the separate
    causal step computes on the same tokens; each mask row of the branch anchored at
    spine token j computes exactly what the separate draft computes with the cache
    extended by spine tokens 0..j. Fused steps return ids and confidences for every
    token, and logits for the spine rows only, when the causal step keeps them (to sample
    the verify; B x (B+1) rows of the vocabulary would dwarf the step)."""
    out, count = [], 0
    for spec in specs:
        if isinstance(spec, Fuse):
            spec = _fuse(spec)
            count += 1
        out.append(spec)
    return DescriptionResult(out, count)


def _fuse(request: Fuse) -> StepSpec:
    verify, draft = request.causal.layout, request.draft.layout
    if verify.branches or verify.spine < 1:
        raise PassError(f"{request.step}: cannot fuse: {request.causal.step} is not a plain causal step")
    if draft.spine or len(draft.branches) != 1:
        raise PassError(f"{request.step}: cannot fuse: {request.draft.step} is not one bidirectional block")
    masks = draft.branches[0]
    if masks.source != "mask" or masks.offset != 0 or masks.anchor != -1:
        raise PassError(f"{request.step}: cannot fuse: {request.draft.step} must be all masks at the block's "
                        "start (a draft conditioned only on its prefix)")
    if request.anchors == "each":
        groups = verify.spine if request.groups is None else request.groups
        if not 1 <= groups <= verify.spine:
            raise PassError(f"{request.step}: groups must be 1..{verify.spine}, got {groups}")
        anchors = range(groups)
    elif request.anchors == "last":
        anchors = [verify.spine - 1]
    else:
        raise PassError(f"{request.step}: anchors must be 'each' or 'last', got {request.anchors!r}")
    # the draft conditioned on spine 0..j sits right after spine token j
    branches = tuple(Branch(masks.length, j + 1, j, "mask", masks.lora) for j in anchors)
    return StepSpec(request.step, Layout(verify.spine, branches), logits="spine" if request.causal.logits else False,
                    logprobs=request.causal.logprobs)

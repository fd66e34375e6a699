"""What each decode mode's static graphs are: one module per mode lists its step kinds.

``plan`` merges the modes asked for into one list of graph descriptions (the
prefill graph is shared by every mode) with the modes each graph serves; fusion
requests in it are resolved by the description passes (passes/pipeline.py).
"""

from __future__ import annotations

import dataclasses

from . import ar, diffusion, linear_spec, quadratic_spec
from .steps import Fuse, StepModule, StepSpec

# mode name -> its module (each has MODE and steps(block_length=, prefill_length=, has_lora=))
MODES = {m.MODE: m for m in (ar, diffusion, linear_spec, quadratic_spec)}


def plan(modes: list[str], *, block_length: int, prefill_length: int, has_lora: bool,
         logits: bool = True, logprobs: bool = True, mode_options: dict[str, dict] | None = None
         ) -> list[tuple[StepSpec | Fuse, list[str]]]:
    """The graphs of ``modes``, each once, with the modes that use it, in mode order.
    ``logits=False``: no graph returns vocabulary-sized logits (a greedy-only artifact).
    ``logprobs``: every graph that picks emitted tokens (all but linear-spec's draft) also returns
    top-20 log-probs and the input's next-token log-probs (StepSpec.logprobs).
    ``mode_options``: extra keyword arguments of a mode's ``steps`` (quadratic-spec: draft_groups)."""
    graphs: dict[StepSpec | Fuse, list[str]] = {}
    for mode in modes:
        options = (mode_options or {}).get(mode, {})
        for spec in MODES[mode].steps(block_length=block_length, prefill_length=prefill_length, has_lora=has_lora,
                                      **options):
            if isinstance(spec, StepSpec) and not logits:
                spec = dataclasses.replace(spec, logits=False)
            elif isinstance(spec, Fuse) and not logits:  # the fused step keeps the causal step's choice
                spec = dataclasses.replace(spec, causal=dataclasses.replace(spec.causal, logits=False))
            if logprobs and isinstance(spec, StepSpec) and spec.step != "draft":
                spec = dataclasses.replace(spec, logprobs=True)
            elif logprobs and isinstance(spec, Fuse):
                spec = dataclasses.replace(spec, causal=dataclasses.replace(spec.causal, logprobs=True))
            graphs.setdefault(spec, []).append(mode)
    return list(graphs.items())


__all__ = ["MODES", "Fuse", "StepModule", "StepSpec", "plan"]

"""What each decode mode's static graphs are: one module per mode lists its step kinds.

``plan`` merges the modes asked for into one list of graphs (the prefill graph
is shared by every mode) with the modes each graph serves.
"""

from __future__ import annotations

from . import ar, diffusion, linear_spec
from .steps import StepModule, StepSpec

# mode name -> its module (each has MODE and steps(block_length=, prefill_length=, has_lora=))
MODES = {ar.MODE: ar, diffusion.MODE: diffusion, linear_spec.MODE: linear_spec}


def plan(modes: list[str], *, block_length: int, prefill_length: int,
         has_lora: bool) -> list[tuple[StepSpec, list[str]]]:
    """The graphs of ``modes``, each once, with the modes that use it, in mode order."""
    graphs: dict[StepSpec, list[str]] = {}
    for mode in modes:
        for spec in MODES[mode].steps(block_length=block_length, prefill_length=prefill_length, has_lora=has_lora):
            graphs.setdefault(spec, []).append(mode)
    return list(graphs.items())


__all__ = ["MODES", "StepModule", "StepSpec", "plan"]

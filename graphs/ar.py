"""Autoregressive mode (spec 3.1): the prompt in causal prefill chunks, then one
causal token per step. Both write the cache; LoRA is never on."""

from __future__ import annotations

from .steps import StepSpec

MODE = "ar"


def steps(*, block_length: int, prefill_length: int, has_lora: bool) -> list[StepSpec]:
    return [
        StepSpec.causal("prefill", prefill_length),  # P prompt tokens, causal, writes
        StepSpec.causal("ar_step", 1),  # the previous token, causal, writes
    ]

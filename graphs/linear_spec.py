"""Linear self-speculation (spec 3.3): draft a block bidirectionally with the
drafter LoRA (when the checkpoint has one), verify it causally with the base
weights while writing all B rows; the runtime rolls back by moving cache_len."""

from __future__ import annotations

from .steps import StepSpec

MODE = "linear-spec"


def steps(*, block_length: int, prefill_length: int, has_lora: bool) -> list[StepSpec]:
    return [
        StepSpec.causal("prefill", prefill_length),  # P prompt tokens, causal, LoRA off, writes
        StepSpec.bidirectional("draft", block_length, lora=has_lora),  # [p, MASK...]: no write
        StepSpec.causal("verify", block_length),  # the drafted block: causal, LoRA off, writes all B rows
    ]

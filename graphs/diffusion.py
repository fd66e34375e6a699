"""Block diffusion (spec 3.2): denoise a block bidirectionally without writing,
then commit the finished block causally into the cache. Base weights only."""

from __future__ import annotations

from .steps import StepSpec

MODE = "diffusion"


def steps(*, block_length: int, prefill_length: int, has_lora: bool) -> list[StepSpec]:
    return [
        StepSpec.causal("prefill", prefill_length),  # P prompt tokens, causal, writes
        StepSpec.bidirectional("denoise", block_length),  # [s, MASK...]: no write, run until unmasked
        StepSpec.causal("commit", block_length),  # the finished block: writes; its last token seeds the next
    ]

"""Quadratic self-speculation (spec 3.4): every forward verifies the current
draft and drafts the next block for every possible acceptance point.

Two fused steps, both built by passes/fuse_draft_verify.py from a causal step
and a draft of B masks:

- ``prefill_draft``: the last prompt chunk (causal, writes its rows) followed by
  B masks that see the whole prompt: the first token and the first draft in
  one forward. Earlier chunks of a long prompt run through ``prefill``.
- ``verify_draft``: the draft ``d`` (causal verify, writes its B rows) and,
  for each ``j``, B masks that see ``d_0..d_j``: the next draft for an
  acceptance of ``j + 1`` tokens.

The drafter LoRA stays off, as in the reference. ``draft_groups`` G < B
drafts only after the first G spine tokens (B + G x B tokens per forward
instead of B x (B+1)); the scheduler then accepts at most G tokens per cycle.
"""

from __future__ import annotations

from .steps import Fuse, StepSpec

MODE = "quadratic-spec"


def steps(*, block_length: int, prefill_length: int, has_lora: bool,
          draft_groups: int | None = None) -> list[StepSpec | Fuse]:
    prefill = StepSpec.causal("prefill", prefill_length)  # earlier chunks of a long prompt
    masks = StepSpec.bidirectional("draft_masks", block_length, source="mask")  # B masks, LoRA off
    return [
        prefill,
        Fuse("prefill_draft", prefill, masks, anchors="last"),  # last prompt chunk + the first draft
        # B x (B+1) tokens (B + G x B with draft_groups G)
        Fuse("verify_draft", StepSpec.causal("verify", block_length), masks, anchors="each", groups=draft_groups),
    ]

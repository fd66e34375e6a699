"""Linear self-speculation scheduler (spec 3.3).

Glossary:
- pending token ``p``: emitted, not yet in the cache; it opens the next block.
- draft: ``[p, MASK * (B-1)]`` filled by one bidirectional forward (drafter LoRA
  on, no cache write); with a threshold > 0, by several (iterative unmasking).
- verify: one causal forward (LoRA off) over the drafted block that writes all
  B rows into the cache; ``a[i]``, its choice at i, is the model's own token
  for position i+1.
- accepted: drafts ``x[1..n-1]`` equal to the verifier's ``a[0..n-2]``, counted
  from the left.
- bonus: ``a[n-1]``, the verifier's token after the last accepted draft; it is
  emitted and becomes the next ``p``.
- acceptance length: ``n`` = accepted drafts + the bonus, per verify.
- rollback: the cache row keeps ``p`` and the accepted drafts (crop to before + n),
  by moving its length; the bonus is written by the next verify.
Sampling (temperature > 0 or any control) accepts by nemocompile.sampling's rule against
the distribution AR samples from. At temperature 0 the output equals AR greedy decoding
token for token (lossless),
whatever the other rows of the batch do: drafts, acceptance and crop are per row.
"""

from __future__ import annotations

from ..row import Forward
from .diffusion import Block, as_float32, denoise


def decode_linear_spec(row):
    L = row.request.block_length
    threshold = as_float32(row.request.threshold)
    p = row.budgeted([(yield from row.prefill_token())])[0]
    row.emit((p,))
    while not row.done:
        new = yield from linear_cycle(row, p, L, threshold)
        row.emit(new)
        p = new[-1]


def linear_cycle(row, p: int, L: int, threshold: float | None):
    """Draft a block after ``p``, verify it, keep what is accepted: the new tokens."""
    drafted = yield from draft(row, p, L, threshold)
    before = row.length
    new = row.budgeted((yield from verify(row, drafted)))  # accepted drafts + the bonus
    row.crop(before + len(new))
    row.cycle("linear-spec", len(new))
    return new


def draft(row, p: int, L: int, threshold: float | None):
    """``[p, MASK...]`` filled: one forward at threshold 0, else iterative unmasking."""
    block = Block(p, L, row.mask_token_id)
    while block.masked:
        yield from denoise(row, "draft", block, threshold or 0.0, 0)
    return block.tokens


def verify(row, drafted: list[int]):
    """The causal forward over the drafted block (writes all L slots); the accepted drafts and
    the bonus (``Row.verify``: the spec's rule, or nemocompile.sampling's when sampling)."""
    io = yield Forward("verify", len(drafted), drafted, write=len(drafted))
    return row.verify(io, drafted)


def accept(x: list[int], a: list[int]) -> int:
    """n: leading drafts x[1..] matched by the verifier's a[0..], plus the bonus."""
    n = 0
    while n < len(x) - 1 and a[n] == x[n + 1]:
        n += 1
    return n + 1

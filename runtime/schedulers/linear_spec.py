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
- rollback: the cache keeps ``p`` and the accepted drafts (crop to before + n),
  by moving its length; the bonus is written by the next verify.
At temperature 0 the output equals AR greedy decoding token for token (lossless).
"""

from __future__ import annotations

from .diffusion import Block, as_float32, denoise


def decode_linear_spec(d):
    req = d.request
    L = req.block_length
    x = d.io("draft", L).input_ids  # [B, L]: row 0 is the block, other rows ride along; verify reads it too
    threshold = as_float32(req.threshold)
    p = d.budgeted(0, [int(d.prefill_tokens()[0])])[0]
    d.emit(0, (p,))
    yield
    while not d.done[0]:
        drafted = draft(d, x, p, threshold)
        before = d.cache.length
        a = verify(d, L)
        new = d.budgeted(0, a[:accept(drafted, a)])  # accepted drafts + the bonus
        n = len(new)
        d.cache.crop(before + n)
        d.stats.acceptance_lengths.append(n)
        d.emit(0, new)
        yield
        p = new[-1]


def draft(d, x, p: int, threshold: float) -> list[int]:
    """Fill ``x[0] = [p, MASK...]`` in place: one forward at threshold 0, else iterative unmasking."""
    block = Block(x, p, [0], d.mask_token_id)
    while block.any_masked():
        denoise(d, "draft", block, threshold, 0)
    return block.tokens[0]


def verify(d, L: int) -> list[int]:
    """The causal forward over the drafted block (writes all L rows); the verifier's tokens a [L]."""
    io = d.run("verify", L)
    d.cache.write(io.present_k, io.present_v)
    if d.sampler.greedy:
        return io.candidate[0].tolist()
    return d.sampler.sample(io.logits[0]).tolist()


def accept(x: list[int], a: list[int]) -> int:
    """n: leading drafts x[1..] matched by the verifier's a[0..], plus the bonus."""
    n = 0
    while n < len(x) - 1 and a[n] == x[n + 1]:
        n += 1
    return n + 1

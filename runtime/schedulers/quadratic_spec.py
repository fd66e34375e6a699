"""Quadratic self-speculation scheduler (spec 3.4): one fused forward per cycle.

Glossary:
- draft ``d``: B tokens in the ``verify_draft`` input; ``d_0`` is already emitted.
- fused step (``verify_draft``): the spine ``d`` is verified causally (its B slots
  are written to the cache row) and, after each ``d_j``, a branch of B masks drafts
  the block that would follow an acceptance of ``j + 1`` tokens. The graph
  returns only token ids: ``a[j]`` at spine row j, the branch's guesses after it.
- accepted: ``d_1..d_{cnt-1}`` while ``a[i-1] == d_i``; the bonus ``a[cnt-1]``.
- acceptance length: ``cnt`` per fused step.
- next draft: ``[a[cnt-1]] + branch[cnt-1][1:]``, the branch conditioned on exactly
  the accepted prefix, with the bonus in its first slot.
- rollback: the cache row keeps ``d_0..d_{cnt-1}`` (crop to before + cnt), by moving its length.
- draft groups: an artifact exported with ``--draft-groups G`` has branches after the
  first G spine tokens only, and a cycle accepts at most G tokens.
The first draft comes with the prompt: the last prefill chunk runs as
``prefill_draft`` (prompt + B masks), one forward. Entered from another mode
(``auto``), the first draft is ``[p, MASK...]``: its fused step accepts nothing
but drafts the next block. Greedy only; lossless per row.
"""

from __future__ import annotations

from nemocompile.decode.quadratic_spec import next_draft

from ..row import Forward


def decode_quadratic_spec(row):
    B = row.request.block_length
    tokens, last, first = yield from prefill_and_draft(row)
    first = row.budgeted([first])
    row.emit(first)
    draft = next_draft(first[0], tokens[last + 1:])
    while not row.done:
        new, draft = yield from quadratic_cycle(row, draft, B)
        row.emit(new)


def quadratic_cycle(row, draft: list[int], B: int):
    """Verify ``draft`` and draft after every acceptance point in one forward, keep what
    is accepted: the new tokens and the next draft."""
    before = row.length
    io, branches = yield from verify_and_draft(row, draft, B)
    new = row.budgeted(row.verify(io, draft[:len(branches)]))  # accepted drafts + the bonus
    row.crop(before + len(new))
    row.cycle("quadratic-spec", len(new))
    return new, next_draft(new[-1], branches[len(new) - 1])


def prefill_and_draft(row):
    """The prompt and the first draft's masks in one forward: the row's tokens (the
    prompt's argmaxes, then the B masks'), the column of the last prompt token and the
    first token (its argmax, or a draw from the spine's logits when sampling)."""
    io, last = yield from row.prefill(last="prefill_draft")
    return io.candidate[row.j].tolist(), last, row.choose(io, last)


def verify_and_draft(row, draft: list[int], B: int):
    """The fused forward (writes the spine's B slots): its outputs (the verifier's rows are
    the spine's) and each branch's B guesses."""
    io = yield Forward("verify_draft", B, draft, write=B)
    groups = row.rt.draft_groups[B]
    tokens = io.candidate[row.j].tolist()
    return io, [tokens[B + j * B: B + (j + 1) * B] for j in range(groups)]

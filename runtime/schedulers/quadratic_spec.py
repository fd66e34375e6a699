"""Quadratic self-speculation scheduler (spec 3.4): one fused forward per cycle.

Glossary:
- draft ``d``: B tokens in the ``verify_draft`` input; ``d_0`` is already emitted.
- fused step (``verify_draft``): the spine ``d`` is verified causally (its B rows
  are written to the cache) and, after each ``d_j``, a branch of B masks drafts
  the block that would follow an acceptance of ``j + 1`` tokens. The graph
  returns only token ids: ``a[j]`` at spine row j, the branch's guesses after it.
- accepted: ``d_1..d_{cnt-1}`` while ``a[i-1] == d_i``; the bonus ``a[cnt-1]``.
- acceptance length: ``cnt`` per fused step.
- next draft: ``[a[cnt-1]] + branch[cnt-1][1:]``, the branch conditioned on exactly
  the accepted prefix, with the bonus in its first slot.
- rollback: the cache keeps ``d_0..d_{cnt-1}`` (crop to before + cnt), by moving its length.
- draft groups: an artifact exported with ``--draft-groups G`` has branches after the
  first G spine tokens only, and a cycle accepts at most G tokens.
The first draft comes with the prompt: the last prefill chunk runs as
``prefill_draft`` (prompt + B masks), one forward. Greedy only; lossless.
"""

from __future__ import annotations

from nemocompile.decode.quadratic_spec import accept, next_draft


def decode_quadratic_spec(d):
    B = d.request.block_length
    groups = d.rt.draft_groups[B]
    x = d.io("verify_draft", B).input_ids  # [batch, B]: row 0 holds the draft
    tokens, last = prefill_and_draft(d)
    first = d.budgeted(0, [tokens[last]])
    d.emit(0, first)
    draft = next_draft(first[0], tokens[last + 1:])
    yield
    while not d.done[0]:
        before = d.cache.length
        x[0] = draft
        a, branches = verify_and_draft(d, B, groups)
        cnt = accept(draft, a, groups)
        new = d.budgeted(0, draft[1:cnt] + [a[cnt - 1]])  # accepted drafts + the bonus
        cnt = len(new)
        d.cache.crop(before + cnt)
        d.stats.acceptance_lengths.append(cnt)
        d.emit(0, new)
        yield
        draft = next_draft(new[-1], branches[cnt - 1])


def prefill_and_draft(d) -> tuple[list[int], int]:
    """The prompt and the first draft's masks in one forward: row 0's tokens (the
    prompt's argmaxes, then the B masks') and the column of the last prompt token."""
    io, last = d.prefill(last="prefill_draft")
    return io.candidate[0].tolist(), last


def verify_and_draft(d, B: int, groups: int) -> tuple[list[int], list[list[int]]]:
    """The fused forward (writes the spine's B rows): the verifier's tokens a [B] and
    each branch's B guesses."""
    io = d.run("verify_draft", B)
    d.cache.write(io.present_k, io.present_v)
    row = io.candidate[0].tolist()
    return row[:B], [row[B + j * B: B + (j + 1) * B] for j in range(groups)]

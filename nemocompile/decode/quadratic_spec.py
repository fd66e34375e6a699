"""Quadratic self-speculation (spec 3.4): draft and verify fused in one forward.

Glossary:
- draft ``d``: B tokens; ``d_0`` is already emitted, ``d_1..d_{B-1}`` are guesses.
- fused step: one forward over the spine ``d`` (causal verify, writes its B rows)
  and, for each j, a branch of B masks that sees ``d_0..d_j`` (the next draft,
  should ``j + 1`` tokens be accepted); masks write nothing.
- verifier's choice ``a[j]``: the argmax at ``d_j``, the AR token after it.
- accepted: ``d_1..d_{cnt-1}`` while ``a[i-1] == d_i``; the bonus is ``a[cnt-1]``.
- acceptance length: ``cnt`` (accepted drafts + the bonus), per fused step.
- next draft: ``[a[cnt-1], q[cnt-1][2..B]]`` from the branch conditioned on exactly
  the accepted prefix; the bonus replaces the branch's own guess for its first slot.
- draft groups G (a cost knob, default B = the spec): only the first G acceptance
  points get a branch (B + G x B tokens per forward instead of B x (B+1)), and a
  cycle accepts at most G tokens; still lossless, since every emitted token was verified.
- rollback: crop the cache to its length before the step plus ``cnt`` (it keeps
  ``d_0..d_{cnt-1}``).
Each cycle is one forward; the prefill and the first draft are one forward too.
At temperature 0 the output equals AR greedy decoding token for token. Sampling
accepts the spine by ``nemocompile.sampling``'s rule (the branches stay the drafter's
argmax): lossless in distribution.
"""

from __future__ import annotations

import torch

from ..model import TriModeModel
from ..model.layout import Branch, Layout
from ..sampling import History
from .common import DecodeArgs, GenerationStats, Sampler, budgeted, first_eos_trim, has_eos


def prefill_draft_layout(prompt: int, block: int) -> Layout:
    """The prompt (causal, written) and B masks after it that see all of it."""
    return Layout(prompt, (Branch(block, prompt, prompt - 1, "mask"),))


def verify_draft_layout(block: int, groups: int | None = None) -> Layout:
    """The draft (causal verify, written) and after each of its first ``groups`` (default:
    all) tokens j, B masks seeing d_0..d_j."""
    return Layout(block, tuple(Branch(block, j + 1, j, "mask") for j in range(groups or block)))


def accept(d: list[int], a: list[int], groups: int | None = None) -> int:
    """cnt: 1 + the leading drafts d[1..] matched by the verifier's a[0..], at most ``groups``
    (a next draft exists only for the acceptance points that have a branch)."""
    limit = min(len(d), groups or len(d))
    cnt = 1
    while cnt < limit and a[cnt - 1] == d[cnt]:
        cnt += 1
    return cnt


def next_draft(bonus: int, branch: list[int]) -> list[int]:
    """The bonus, then the branch's guesses for the slots after it."""
    return [bonus] + branch[1:]


@torch.no_grad()
def decode_quadratic_spec(model: TriModeModel, prompts: list[list[int]], args: DecodeArgs):
    stats = GenerationStats(mode="quadratic-spec", block_length=args.block_length)
    B, eos, prompt, groups = args.block_length, args.eos_ids, prompts[0], args.draft_groups
    G = groups or B
    sampler = Sampler(args.temperature, args.seed, model.device, args.sampling)
    history = History(prompt)
    cache = model.new_cache(1, len(prompt) + args.max_new_tokens + B)
    ids = torch.tensor([prompt], dtype=torch.long, device=model.device)

    logits, tokens = forward(model, cache, ids, prefill_draft_layout(len(prompt), B))  # prefill + first draft
    stats.forwards = 1
    first = int(sampler.sample(logits[len(prompt) - 1][None], [history])[0])
    a, branch = budgeted(args.budget, [], [first])[0], tokens[len(prompt):]
    d = next_draft(a, branch)
    out = [a]
    history.extend(out)
    while not has_eos(out, eos) and len(out) < args.max_new_tokens:
        before = cache.length
        logits, tokens = forward(model, cache, torch.tensor([d], device=model.device), verify_draft_layout(B, groups))
        stats.forwards += 1
        # accepted drafts + the bonus, from the spine (the verifier's rows); at most G per cycle
        new = budgeted(args.budget, out, sampler.verify(logits[:G], d[:G], history))
        cnt = len(new)
        cache.crop(before + cnt)
        stats.acceptance_lengths.append(cnt)
        out += new
        history.extend(new)
        j = cnt - 1  # the branch conditioned on exactly the accepted prefix
        d = next_draft(new[-1], tokens[B + j * B: B + (j + 1) * B])
    return [first_eos_trim(out, eos)[: args.max_new_tokens]], stats


def forward(model: TriModeModel, cache, ids: torch.Tensor, layout: Layout) -> tuple[torch.Tensor, list[int]]:
    """One forward of ``layout``: writes the spine into the cache, returns every token's logits
    [T, V] and argmax [T]."""
    logits, k, v = model.step(ids, cache.keys(), cache.values(), cache.length, cache.row_start, layout=layout)
    cache.write(k, v)
    logits = logits[0].float()
    return logits, logits.argmax(-1).tolist()

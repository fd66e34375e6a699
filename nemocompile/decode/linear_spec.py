"""Linear self-speculation (spec 3.3).

Glossary:
- draft: one bidirectional forward (drafter LoRA on, no cache write) fills the
  block ``[p, MASK * (B-1)]``; ``p`` is the pending token, emitted but not yet cached.
- verify: one causal forward (LoRA off) over the drafted block, writing all B rows;
  ``a[i]`` (its argmax at i) is the model's own choice for position i+1.
- accepted: drafts ``x[1..n-1]`` that equal the verifier's choices, counted from the left.
- bonus: ``a[n-1]``, the verifier's token after the last accepted draft; it is
  emitted and becomes the next ``p``.
- acceptance length: ``n`` = accepted drafts + the bonus, per verify.
- rollback: the cache keeps ``p`` and the accepted drafts (crop to before + n).
At temperature 0 the output equals AR greedy decoding token for token. Sampling
(temperature > 0, or any control of ``nemocompile.sampling``) accepts by that
module's rule, against the same distribution AR samples from: lossless in distribution.
"""

from __future__ import annotations

import torch

from ..model import TriModeModel
from ..sampling import History, greedy_accept
from .common import DecodeArgs, GenerationStats, Sampler, budgeted, first_eos_trim, has_eos, prefill
from .diffusion import denoise_step


def accept(x: list[int], a: list[int]) -> int:
    """n: leading drafts x[1..] matched by the verifier's a[0..], plus the bonus."""
    return len(greedy_accept(x, a))


@torch.no_grad()
def decode_linear_spec(model: TriModeModel, prompts: list[list[int]], args: DecodeArgs):
    cfg = model.config
    stats = GenerationStats(mode="linear-spec", block_length=args.block_length, threshold=args.threshold)
    sampler = Sampler(args.temperature, args.seed, model.device, args.sampling)
    history = History(prompts[0])
    L, eos = args.block_length, args.eos_ids
    cache, logits = prefill(model, prompts, len(prompts[0]) + args.max_new_tokens + L)
    stats.forwards = 1
    p = budgeted(args.budget, [], [int(sampler.sample(logits, [history])[0])])[0]
    out = [p]
    history.extend(out)
    while p not in eos and len(out) < args.max_new_tokens:
        x = draft(model, p, cache, sampler, args.threshold, L, stats)
        before = cache.length
        verify_logits = model(x, pattern="causal", cache=cache)[0].float()  # writes all L rows
        stats.forwards += 1
        new = budgeted(args.budget, out, sampler.verify(verify_logits, x[0].tolist(), history))  # accepted + bonus
        n = len(new)
        stats.acceptance_lengths.append(n)
        cache.crop(before + n)
        out.extend(new)
        history.extend(new)
        p = new[-1]
        if has_eos(new, eos):
            break
    out = first_eos_trim(out, eos)[: args.max_new_tokens]
    return [out], stats


def draft(model: TriModeModel, p: int, cache, sampler: Sampler, threshold: float, L: int,
          stats: GenerationStats) -> torch.Tensor:
    """The drafted block [1, L]: one-shot at threshold 0, else iterative unmasking."""
    lora = model.has_lora
    x = torch.full((1, L), model.config.mask_token_id, dtype=torch.long, device=model.device)
    x[0, 0] = p
    masked = torch.ones(1, L, dtype=torch.bool, device=model.device)
    masked[0, 0] = False
    while masked.any():
        # threshold 0 commits every mask in the first forward
        denoise_step(model, x, masked, cache, sampler, threshold, 0, lora=lora)
        stats.forwards += 1
    return x

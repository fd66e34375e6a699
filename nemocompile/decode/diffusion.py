"""Block diffusion (spec 3.2): denoise each block bidirectionally, then commit it causally."""

from __future__ import annotations

import torch

from ..model import TriModeModel
from ..sampling import History
from .common import DecodeArgs, GenerationStats, Sampler, first_eos_trim, has_eos, prefill, split_evenly


def denoise_step(
    model: TriModeModel,
    x: torch.Tensor,  # [B, L] block tokens, MASK where undecided (modified in place)
    masked: torch.Tensor,  # [B, L] bool (modified in place)
    cache,
    sampler: Sampler,
    threshold: float | None,
    k: int,  # fixed schedule: positions to commit this step (threshold None)
    lora: bool = False,
    histories=None,  # per row: the tokens the penalties see (nemocompile.sampling.History)
) -> None:
    """One bidirectional forward (no cache write) that unmasks positions of ``x``."""
    logits = model(x, pattern="bidirectional", cache=cache, write=False, lora=lora)
    cand, conf = sampler.candidates(logits, histories)  # [B, L]
    conf = conf.masked_fill(~masked, -1.0)
    if threshold is not None:
        commit = masked & (conf >= threshold)
        best = conf.argmax(-1)  # the always-one rule: the most confident masked position
        commit[torch.arange(x.shape[0]), best] |= masked.any(-1)
    else:
        commit = torch.zeros_like(masked)
        order = conf.argsort(dim=-1, descending=True, stable=True)[:, :k]
        commit.scatter_(1, order, True)
        commit &= masked
    x[commit] = cand[commit]
    masked &= ~commit


def block_finished(x: torch.Tensor, masked: torch.Tensor, eos: frozenset[int], need: int) -> torch.Tensor:
    """Per row [B]: no mask left, an EOS with no mask to its left, or the first ``need``
    positions (what max_new_tokens still wants) all decided."""
    no_mask = ~masked.any(-1)
    left_clear = torch.cumsum(masked.long(), dim=-1) == 0  # [B, L]: no mask at or before i
    eos_done = (torch.isin(x, torch.tensor(sorted(eos), dtype=x.dtype)) & left_clear).any(-1)
    need_done = ~masked[:, :need].any(-1)
    return no_mask | eos_done | need_done


@torch.no_grad()
def decode_diffusion(model: TriModeModel, prompts: list[list[int]], args: DecodeArgs):
    cfg = model.config
    stats = GenerationStats(mode="diffusion", block_length=args.block_length, threshold=args.threshold)
    sampler = Sampler(args.temperature, args.seed, model.device, args.sampling)
    histories = [History(p) for p in prompts]
    B, L, eos = len(prompts), args.block_length, args.eos_ids
    cache, logits = prefill(model, prompts, max(map(len, prompts)) + args.max_new_tokens + L)
    stats.forwards = 1
    seed = sampler.sample(logits, histories)  # [B]
    out: list[list[int]] = [[] for _ in range(B)]
    done = torch.zeros(B, dtype=torch.bool)
    schedule = split_evenly(L - 1, args.steps or L)
    while True:
        x = torch.full((B, L), cfg.mask_token_id, dtype=torch.long, device=model.device)
        x[:, 0] = seed
        masked = torch.ones(B, L, dtype=torch.bool, device=model.device)
        masked[:, 0] = False
        need = min(L, args.max_new_tokens - min(len(o) for o, d in zip(out, done) if not d))
        masked[done] = False  # finished rows ride along without deciding anything
        if args.budget is not None:  # spec 3.5: the budget's position is committed to E up front
            for b in range(B):
                pos = args.budget.forced_at(out[b], L)
                if pos is not None and not done[b]:
                    x[b, pos], masked[b, pos] = args.budget.end, False
        step = 0
        while not block_finished(x, masked, eos, need).all():
            k = schedule[step] if step < len(schedule) else L
            denoise_step(model, x, masked, cache, sampler, args.threshold, k, histories=histories)
            stats.forwards += 1
            step += 1
        for b in range(B):
            if not done[b]:
                row = first_eos_trim(_decided_prefix(x[b], masked[b]), eos)
                piece = row[: args.max_new_tokens - len(out[b])]
                out[b].extend(piece)
                histories[b].extend(piece)
                done[b] = has_eos(row, eos) or len(out[b]) >= args.max_new_tokens
        if done.all():
            break
        logits = model(x, pattern="causal", cache=cache)[:, -1].float()  # commit: writes the block
        stats.forwards += 1
        seed = sampler.sample(logits, histories)
    return [first_eos_trim(o, eos) for o in out], stats


def _decided_prefix(x: torch.Tensor, masked: torch.Tensor) -> list[int]:
    """The block's tokens up to the first still-masked position."""
    undecided = masked.nonzero()
    end = int(undecided[0]) if len(undecided) else x.shape[0]
    return x[:end].tolist()

"""Autoregressive decoding (spec 3.1): prefill, then one causal step per token."""

from __future__ import annotations

import torch

from ..model import TriModeModel
from ..sampling import History
from .common import DecodeArgs, GenerationStats, Sampler, budgeted, first_eos_trim, prefill


@torch.no_grad()
def decode_ar(model: TriModeModel, prompts: list[list[int]], args: DecodeArgs) -> tuple[list[list[int]], GenerationStats]:
    stats = GenerationStats(mode="ar")
    sampler = Sampler(args.temperature, args.seed, model.device, args.sampling)
    histories = [History(p) for p in prompts] if args.sampling is not None and args.sampling.penalised else None
    B = len(prompts)
    cache, logits = prefill(model, prompts, max(map(len, prompts)) + args.max_new_tokens)
    stats.forwards = 1
    out: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B
    while True:
        token = sampler.sample(logits, histories)  # [B]
        for b in range(B):
            if not done[b]:
                token[b] = budgeted(args.budget, out[b], [int(token[b])])[0]  # the next step runs it too
                out[b].append(int(token[b]))
                if histories is not None:
                    histories[b].extend(out[b][-1:])
                done[b] = out[b][-1] in args.eos_ids or len(out[b]) >= args.max_new_tokens
        if all(done):
            break
        logits = model(token[:, None], pattern="causal", cache=cache)[:, -1].float()
        stats.forwards += 1
    out = [first_eos_trim(t, args.eos_ids) for t in out]
    return out, stats

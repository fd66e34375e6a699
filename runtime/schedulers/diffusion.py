"""Block-diffusion scheduler (spec 3.2): denoise each block bidirectionally, commit it causally.

A block is the row's L tokens: ``denoise`` unmasks them, ``commit`` runs them
causally into the cache row. Which positions are still masked is tracked in
Python lists: for one block of a row that is cheaper than numpy calls per step.
Rows of a batch are independent: each stops denoising when its own block is
decided (all of it, up to an EOS, or as far as max_new_tokens wants).
"""

from __future__ import annotations

import numpy as np

from nemocompile.decode.common import first_eos_trim, has_eos, split_evenly

from ..row import Forward


def decode_diffusion(row):
    req = row.request
    L = req.block_length
    schedule = split_evenly(L - 1, req.steps or L)  # fixed schedule (no threshold)
    threshold = as_float32(req.threshold)
    seed = yield from row.prefill_token()
    while True:
        # below min_tokens no id stops a block early: the whole block is emitted and committed, and
        # emit stops at an EOS that min_tokens allows
        eos = req.eos if len(row.out) >= req.output.min_tokens else frozenset()
        block = Block(seed, L, row.mask_token_id, row.chosen)
        if req.budget is not None:  # spec 3.5: the budget's position is committed to E up front
            pos = req.budget.forced_at(row.out, L)
            if pos is not None:
                block.commit_to(pos, req.budget.end)
        need = min(L, req.max_new_tokens - len(row.out))
        step = 0
        while not block.finished(eos, need):
            k = schedule[step] if step < len(schedule) else L
            yield from denoise(row, "denoise", block, threshold, k)
            step += 1
        row.emit(first_eos_trim(block.decided_prefix(), eos), block.logprobs)
        row.cycle("diffusion")
        if row.done:
            return
        seed = yield from commit(row, block.tokens)


class Block:
    """A row's block being unmasked: its tokens and its still-masked positions (ascending)."""

    def __init__(self, first: int, L: int, mask_token_id: int, first_logprob=()):
        self.tokens = [int(first)] + [mask_token_id] * (L - 1)
        self.masked = list(range(1, L))
        # per position (requests with logprobs): the seed's from the forward that chose it
        self.logprobs = [first_logprob[0] if first_logprob else None] + [None] * (L - 1)

    def finished(self, eos: frozenset[int], need: int) -> bool:
        """No mask left, an EOS with no mask to its left, or the first ``need`` positions
        (what max_new_tokens still wants) all decided."""
        pos = self.masked
        return not (pos and pos[0] < need and not has_eos(self.tokens[: pos[0]], eos))

    def fill(self, picked: list[int], values: list[int], logprobs=None) -> None:
        """Decide positions ``masked[j]`` for j in ``picked`` (``logprobs``: theirs, in order)."""
        for i, (j, v) in enumerate(zip(picked, values)):
            self.tokens[self.masked[j]] = v
            if logprobs is not None:
                self.logprobs[self.masked[j]] = logprobs[i]
        drop = set(picked)
        self.masked = [p for j, p in enumerate(self.masked) if j not in drop]

    def commit_to(self, pos: int, token: int) -> None:
        """Decide position ``pos`` before any denoising (the seed too, at 0)."""
        if pos == 0:
            self.tokens[0] = token
        else:
            self.fill([self.masked.index(pos)], [token])

    def decided_prefix(self) -> list[int]:
        """The tokens up to the first still-masked position."""
        return self.tokens[: self.masked[0]] if self.masked else self.tokens


def denoise(row, step: str, block: Block, threshold: float | None, k: int):
    """One bidirectional forward (no cache write) that unmasks positions of the block:
    every masked position whose confidence reaches ``threshold`` and always the most
    confident one; with no threshold, the ``k`` most confident."""
    io = yield Forward(step, len(block.tokens), block.tokens)
    pos = block.masked
    if row.sampler.greedy:
        # the graph computed argmax and confidence: the host never touches the logits
        cand = io.candidate[row.j, pos].tolist()
        conf = io.confidence[row.j, pos].tolist()
    else:
        # candidates only where a mask is (the softmax over the vocabulary is the costly host
        # work); threshold 0 commits every masked position, so it needs no confidences
        logits = io.logits[row.j, pos]  # [n, V], a copy: the sampler may overwrite it
        cand, conf = row.sampler.candidates(logits, with_confidence=threshold != 0, scratch=True)
        cand = cand.tolist()
        conf = conf.tolist() if conf is not None else None
    n = len(pos)
    if threshold == 0:
        picked = list(range(n))
    elif threshold is not None:
        picked = [j for j in range(n) if conf[j] >= threshold]
        best = max(range(n), key=conf.__getitem__)  # the always-one rule; ties: leftmost
        if best not in picked:
            picked.append(best)
    else:
        picked = sorted(range(n), key=lambda j: -conf[j])[:k]  # stable: ties keep position order
    values = [cand[j] for j in picked]
    # the log-prob of a decided token: its denoising forward's distribution at its position (a
    # linear-spec draft's tokens are emitted by the verify, which says theirs)
    block.fill(picked, values, None if row.k is None or step != "denoise" else [row.logprob(io, pos[j], v) for j, v in zip(picked, values)])


def commit(row, tokens: list[int]):
    """One causal forward over the finished block that writes it into the cache row; the next seed."""
    io = yield Forward("commit", len(tokens), tokens, write=len(tokens))
    return row.choose(io, len(tokens) - 1)


def as_float32(threshold: float | None) -> float | None:
    """The threshold as the float32 value the eager decoders compare float32 confidences with."""
    return None if threshold is None else float(np.float32(threshold))

"""Block-diffusion scheduler (spec 3.2): denoise each block bidirectionally, commit it causally.

The block lives in the step buffer ``input_ids`` of its block length: ``denoise``
unmasks it in place and ``commit`` runs the very same buffer, so a block is
never copied. Which positions are still masked is tracked in Python lists:
for one block of a few rows that is cheaper than a dozen numpy calls per step.
"""

from __future__ import annotations

import numpy as np

from nemocompile.decode.common import first_eos_trim, has_eos, split_evenly


def decode_diffusion(d):
    req = d.request
    L, eos = req.block_length, req.eos
    x = d.io("denoise", L).input_ids  # [B, L]: commit reads the same buffer
    schedule = split_evenly(L - 1, req.steps or L)  # fixed schedule (no threshold)
    threshold = as_float32(req.threshold)
    seed = d.prefill_tokens()  # [B]
    while True:
        block = Block(x, seed, d.unfinished(), d.mask_token_id)  # finished rows ride along, deciding nothing
        if req.budget is not None:  # spec 3.5: the budget's position is committed to E up front
            for b in d.unfinished():
                pos = req.budget.forced_at(d.out[b], L)
                if pos is not None:
                    block.commit_to(b, pos, req.budget.end)
        need = min(L, req.max_new_tokens - min(len(d.out[b]) for b in d.unfinished()))
        step = 0
        while not block.finished(eos, need):
            k = schedule[step] if step < len(schedule) else L
            denoise(d, "denoise", block, threshold, k)
            step += 1
        for b in d.unfinished():
            d.emit(b, first_eos_trim(block.decided_prefix(b), eos))
        yield
        if d.all_done:
            return
        seed = commit(d, L)


class Block:
    """A block being unmasked: the step buffer ``x`` [B, L] the graphs read, plus per
    deciding row its tokens and its still-masked positions (ascending)."""

    def __init__(self, x: np.ndarray, first, rows: list[int], mask_token_id: int):
        x[:, 0] = first
        x[:, 1:] = mask_token_id
        self.x = x
        self.tokens = x.tolist()  # per row
        self.masked = {b: list(range(1, x.shape[1])) for b in rows}

    def any_masked(self) -> bool:
        return any(self.masked.values())

    def finished(self, eos: frozenset[int], need: int) -> bool:
        """Every row: no mask left, an EOS with no mask to its left, or its first ``need``
        positions (what max_new_tokens still wants) all decided."""
        for b, pos in self.masked.items():
            if pos and pos[0] < need and not has_eos(self.tokens[b][: pos[0]], eos):
                return False
        return True

    def fill(self, b: int, picked: list[int], values: list[int]) -> None:
        """Decide positions ``pos[j]`` for j in ``picked`` (indices into row b's masked list)."""
        pos, x, tokens = self.masked[b], self.x, self.tokens[b]
        for j, v in zip(picked, values):
            x[b, pos[j]] = v
            tokens[pos[j]] = v
        drop = set(picked)
        self.masked[b] = [p for j, p in enumerate(pos) if j not in drop]

    def commit_to(self, b: int, pos: int, token: int) -> None:
        """Decide position ``pos`` of row b before any denoising (the seed too, at 0)."""
        if pos == 0:
            self.x[b, 0] = self.tokens[b][0] = token
        else:
            self.fill(b, [self.masked[b].index(pos)], [token])

    def decided_prefix(self, b: int) -> list[int]:
        """Row b's tokens up to its first still-masked position."""
        pos = self.masked.get(b)
        return self.tokens[b][: pos[0]] if pos else self.tokens[b]


def denoise(d, step: str, block: Block, threshold: float | None, k: int) -> None:
    """One bidirectional forward (no cache write) that unmasks positions of the block:
    every masked position whose confidence reaches ``threshold`` and always the most
    confident one; with no threshold, the ``k`` most confident."""
    io = d.run(step, block.x.shape[1])
    L = block.x.shape[1]
    where = [b * L + p for b, pos in block.masked.items() for p in pos]
    if d.sampler.greedy and io.candidate is not None:
        # the graph computed argmax and confidence: the host never touches the logits
        cand = io.candidate.reshape(-1)[where].tolist()
        conf = io.confidence.reshape(-1)[where].tolist()
    else:
        logits = d.rt.scratch[: len(where)]  # [n, V]
        np.take(io.logits.reshape(-1, io.logits.shape[-1]), where, axis=0, out=logits)
        # candidates only where a mask is (the softmax over the vocabulary is the costly host
        # work); threshold 0 commits every masked position, so it needs no confidences
        cand, conf = d.sampler.candidates(logits, with_confidence=threshold != 0, scratch=True)
        cand = cand.tolist()
        conf = conf.tolist() if conf is not None else None
    i = 0
    for b, pos in list(block.masked.items()):
        n = len(pos)
        if n == 0:
            continue
        c = conf[i:i + n] if conf is not None else None
        if threshold == 0:
            picked = list(range(n))
        elif threshold is not None:
            picked = [j for j in range(n) if c[j] >= threshold]
            best = max(range(n), key=c.__getitem__)  # the always-one rule; ties: leftmost
            if best not in picked:
                picked.append(best)
        else:
            picked = sorted(range(n), key=lambda j: -c[j])[:k]  # stable: ties keep position order
        block.fill(b, picked, [cand[i + j] for j in picked])
        i += n


def commit(d, L: int) -> np.ndarray:
    """One causal forward over the finished block that writes it into the cache; the next seeds [B]."""
    io = d.run("commit", L)
    d.cache.write(io.present_k, io.present_v)
    return d.choose(io, L - 1)


def as_float32(threshold: float | None) -> float | None:
    """The threshold as the float32 value the eager decoders compare float32 confidences with."""
    return None if threshold is None else float(np.float32(threshold))

"""Decoder semantics on hand-made cases: a scripted model whose logits are chosen
per absolute position, so every count in spec section 3 can be asserted exactly."""

from __future__ import annotations

import math

import pytest
import torch

import nemocompile
from nemocompile.decode import accept
from nemocompile.decode.common import split_evenly
from nemocompile.errors import GenerationError
from nemocompile.model import KVCache

from conftest import make_config

V, MASK, EOS = 64, 3, 2


class ScriptedModel:
    """Causal logits at absolute position t point at ``ar[t + 1]``; bidirectional
    logits at t point at ``draft[t]`` with softmax probability ``conf[t]``."""

    def __init__(self, ar: list[int], draft: dict[int, int] | None = None, conf: dict[int, float] | None = None):
        self.config = make_config(vocab_size=V, mask_token_id=MASK, eos_token_id=EOS, num_hidden_layers=1)
        self.ar, self.draft, self.conf = ar, draft or {}, conf or {}
        self.device, self.dtype, self.has_lora, self.tokenizer = torch.device("cpu"), torch.float32, False, None
        self.calls: list[tuple[str, int, int]] = []  # (pattern, cache length before, block length)
        self.cache_lengths: list[int] = []

    def new_cache(self, batch_size, max_len):
        return KVCache(self.config, batch_size, max_len)

    @staticmethod
    def _peaked(token: int, p: float) -> torch.Tensor:
        # softmax(logits)[token] == p exactly: the other V-1 entries share the rest
        logits = torch.zeros(V)
        logits[token] = math.log(p * (V - 1) / (1 - p))
        return logits

    def __call__(self, x, pattern="causal", cache=None, write=None, lora=False):
        B, L = x.shape
        start = cache.length - int(cache.row_start[0])
        self.calls.append((pattern, cache.length, L))
        out = torch.zeros(B, L, V)
        for i in range(L):
            t = start + i
            if pattern == "causal":
                out[:, i] = self._peaked(self.ar[t + 1] if t + 1 < len(self.ar) else 0, 0.99)
            else:
                out[:, i] = self._peaked(self.draft.get(t, 0), self.conf.get(t, 0.99))
        write = pattern == "causal" if write is None else write
        if write:
            shape = (1, B, self.config.num_key_value_heads, L, self.config.head_dim)
            cache.write(torch.zeros(shape), torch.zeros(shape))
        self.cache_lengths.append(cache.length)
        return out


PROMPT = [10, 11, 12]  # positions 0..2; generation starts at position 3


def test_ar_counts_one_forward_per_token():
    ar = PROMPT + [20, 21, 22, 23, 24, 25]
    m = ScriptedModel(ar)
    r = nemocompile.generate(m, PROMPT, mode="ar", max_new_tokens=4)
    assert r.tokens == [20, 21, 22, 23]
    assert r.stats.forwards == 4 and r.stats.decode_forwards == 3 and r.stats.tokens_per_forward == 1.0


def test_ar_stops_at_eos_and_keeps_it():
    m = ScriptedModel(PROMPT + [20, EOS, 21, 22])
    r = nemocompile.generate(m, PROMPT, mode="ar", max_new_tokens=10)
    assert r.tokens == [20, EOS]
    assert r.stats.forwards == 2  # no forward after the EOS is known


def test_linear_spec_acceptance_bonus_and_crop():
    # AR continuation from position 3: 20 21 22 23 24 25 26 27 28 ...
    ar = PROMPT + list(range(20, 40))
    # drafts for the first block at positions 4..7 (position 3 holds p=20):
    # 21, 22 right, 99 wrong at position 6 -> accepted drafts 2, +1 bonus = 3
    draft = {4: 21, 5: 22, 6: 9, 7: 24}
    m = ScriptedModel(ar, draft=draft)
    r = nemocompile.generate(m, PROMPT, mode="linear-spec", block_length=4, max_new_tokens=6)
    assert r.stats.acceptance_lengths[0] == 3
    assert r.tokens == [20, 21, 22, 23, 24, 25]  # p, two accepted drafts, the bonus, then cycle 2
    verify_calls = [(c, L) for (pat, c, L) in m.calls if pat == "causal"][1:]
    assert verify_calls[0] == (3, 4)  # verify ran over 4 tokens from cache length 3
    # after the first verify the cache was cropped to 3 + n = 6 (p and accepted drafts, not the
    # bonus 23, which is the next pending token): the second draft starts there
    drafts = [c for (pat, c, L) in m.calls if pat == "bidirectional"]
    assert drafts == [3, 6]
    assert r.stats.forwards == 1 + 2 * len(r.stats.acceptance_lengths)


def test_linear_spec_all_wrong_drafts_still_progress_by_bonus():
    ar = PROMPT + list(range(20, 40))
    m = ScriptedModel(ar, draft={})  # every draft is token 0: never right
    r = nemocompile.generate(m, PROMPT, mode="linear-spec", block_length=4, max_new_tokens=5)
    assert r.tokens == [20, 21, 22, 23, 24]
    assert r.stats.acceptance_lengths == [1, 1, 1, 1]
    assert r.stats.acceptance_length == 1.0


def test_accept_counts_from_the_left_only():
    assert accept([5, 6, 7, 8], [6, 7, 9, 1]) == 3
    assert accept([5, 6, 7, 8], [1, 7, 8, 1]) == 1  # later matches do not count
    assert accept([5, 6, 7, 8], [6, 7, 8, 4]) == 4  # whole block + bonus


def test_diffusion_threshold_commits_confident_and_always_one():
    ar = PROMPT + [20] + [0] * 10 + [30] * 10
    # block of 4 at positions 3..6: seed 20, then 21 (0.95), 22 (0.5), 23 (0.3)
    draft = {4: 21, 5: 22, 6: 23}
    conf = {4: 0.95, 5: 0.5, 6: 0.3}
    m = ScriptedModel(ar, draft=draft, conf=conf)
    r = nemocompile.generate(m, PROMPT, mode="diffusion", block_length=4, threshold=0.9, max_new_tokens=4)
    assert r.tokens == [20, 21, 22, 23]
    # step 1 commits 21 (>= 0.9); step 2 none pass, the most confident (22) alone; step 3 the last
    denoise = [c for c in m.calls if c[0] == "bidirectional"]
    assert len(denoise) == 3
    assert r.stats.forwards == 1 + 3  # prefill + 3 denoise; no commit after max_new_tokens is reached


def test_diffusion_fixed_schedule_splits_masks_evenly():
    assert split_evenly(7, 3) == [3, 2, 2]
    assert split_evenly(3, 4) == [1, 1, 1, 0]
    ar = PROMPT + [20] + [0] * 20
    m = ScriptedModel(ar, draft={t: 21 for t in range(4, 12)}, conf={t: 0.5 for t in range(4, 12)})
    r = nemocompile.generate(m, PROMPT, mode="diffusion", block_length=8, threshold="none", steps=3,
                             max_new_tokens=8)
    assert len(r.tokens) == 8
    assert sum(1 for c in m.calls if c[0] == "bidirectional") == 3  # 7 masks over 3 steps: 3, 2, 2


def test_diffusion_commit_then_next_block_seed():
    ar = PROMPT + [20, 21, 22, 23, 40, 41, 42, 43]
    draft = {4: 21, 5: 22, 6: 23, 8: 41, 9: 42, 10: 43}
    m = ScriptedModel(ar, draft=draft)
    r = nemocompile.generate(m, PROMPT, mode="diffusion", block_length=4, threshold=0.9, max_new_tokens=8)
    # block 1 denoised in one step (all confident), committed causally; the commit's last
    # logits (position 6 -> 7) give the next seed 40
    assert r.tokens == [20, 21, 22, 23, 40, 41, 42, 43]
    assert [c[0] for c in m.calls] == ["causal", "bidirectional", "causal", "bidirectional"]
    assert m.calls[2] == ("causal", 3, 4)  # commit wrote block 1 at cache length 3
    assert r.stats.forwards == 4 and r.stats.tokens_per_forward == 2.0


def test_diffusion_block_ends_early_on_eos_and_trims():
    ar = PROMPT + [20] + [0] * 10
    draft = {4: 21, 5: EOS, 6: 25, 7: 26}
    conf = {4: 0.95, 5: 0.95, 6: 0.1, 7: 0.1}
    m = ScriptedModel(ar, draft=draft, conf=conf)
    r = nemocompile.generate(m, PROMPT, mode="diffusion", block_length=5, threshold=0.9, max_new_tokens=20)
    assert r.tokens == [20, 21, EOS]
    assert r.stats.forwards == 2  # prefill + one denoise: EOS with no mask to its left ends it, no commit


def test_bad_arguments_are_clear():
    m = ScriptedModel(PROMPT + [1] * 10)
    with pytest.raises(GenerationError, match="unknown mode"):
        nemocompile.generate(m, PROMPT, mode="beam")
    with pytest.raises(GenerationError, match="max_new_tokens"):
        nemocompile.generate(m, PROMPT, max_new_tokens=0)
    with pytest.raises(GenerationError, match="threshold"):
        nemocompile.generate(m, PROMPT, mode="diffusion", threshold=1.5)
    with pytest.raises(GenerationError, match="batch"):
        nemocompile.generate(m, [PROMPT, PROMPT], mode="linear-spec")
    with pytest.raises(GenerationError, match="empty prompt"):
        nemocompile.generate(m, [], mode="ar")
    with pytest.raises(GenerationError, match="outside the vocabulary"):
        nemocompile.generate(m, [V + 5], mode="ar")

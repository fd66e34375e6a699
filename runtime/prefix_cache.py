"""Prefix cache across requests: a new prompt starts from the K/V its longest cached
prefix already has in some cache row, and prefills only the rest.

Glossary:
- a row's tokens: the token ids whose keys and values the row's committed slots
  ``row_start .. cache_len-1`` hold (its prompt and the tokens it decoded), kept
  here per slot as the engine places each forward's rows.
- kept row: a row whose tokens may be reused: a row in flight, or a finished row
  still in the LRU (its slots stay as they are until the row is given out again).
- hit: a new prompt whose first n tokens equal a kept row's first n tokens; those
  n slots become the new row's own (in place when the new request gets that very
  row, else copied into its row at admission) and its prefill starts at n.
- evicted: tokens a finished row kept that are dropped (its row leaves the LRU over
  the token budget, or is given to a request that reuses less than it held).

The key of a slot is its token and the tokens before it (a prefix match) in one
runtime: one artifact, one precision, one backend. K/V also depend on the drafter
LoRA of the rows written: every writing graph of the contract writes its spine,
which never carries the LoRA (nemocompile/model/layout.py), so every cached slot is
base-weight K/V; a graph whose written rows did carry it would leave slots marked
unknown (-1), never reused.

Safety: a reused slot is never overwritten while a row reads it, because slots
are only written by their own row's request: reuse in place makes the slots the
new request's own, and reuse from another row copies them at once, before the
next forward, so later writes to the source row cannot reach the copy.
"""

from __future__ import annotations

import collections

import numpy as np

UNKNOWN = -1  # a slot whose K/V may not be reused (written with the LoRA on, or never tracked)


class PrefixCache:
    """Which tokens each cache row holds, and an LRU of finished rows under a token budget."""

    def __init__(self, cache, batch_size: int, budget: int | None = None, listeners=None):
        self.cache = cache
        self.ids = np.full((batch_size, cache.capacity), UNKNOWN, dtype=np.int64)  # [B, C]: token at each slot
        self.kept = np.zeros(batch_size, dtype=bool)  # [B]: rows whose tokens may be reused
        self.budget = budget  # tokens that finished rows may keep (None: every row's)
        self.idle: collections.OrderedDict[int, int] = collections.OrderedDict()  # finished row -> tokens, LRU first
        self._idle_tokens = 0  # sum of idle's values (read by the metrics thread)
        self.listeners = listeners if listeners is not None else []  # ("prefix", (event, tokens))
        self.hits = self.misses = 0  # sequences that reused a prefix / reused nothing
        self.evicted = 0  # tokens dropped from finished rows (over the budget, or their row given out)
        self.cached_prompt_tokens = 0  # prompt tokens served from the cache, summed
        self.unreusable_writes: set = set()  # graph keys whose written rows carry the LoRA
        # echo: per row, the TokenLogprob of each prompt token its scored prefill gave (entry i:
        # token i given those before it) and how many alternatives each carries; None: unscored
        self.scores: list = [None] * batch_size
        self.score_k = [0] * batch_size

    # ---- what rows hold ------------------------------------------------------------
    def written(self, key, row: int, start: int, tokens, n: int) -> None:
        """The engine placed ``n`` slots of a forward of graph ``key`` at ``start`` of ``row``."""
        if key in self.unreusable_writes:
            self.ids[row, start:start + n] = UNKNOWN
        elif n == 1:  # one slot (AR): a scalar store, the per-token path
            self.ids[row, start] = tokens[0]
        else:
            self.ids[row, start:start + n] = tokens[:n]

    def tokens(self, row: int) -> np.ndarray:
        """The token ids row ``row``'s committed slots hold (empty when it is not kept)."""
        if not self.kept[row]:
            return self.ids[row, :0]
        return self.ids[row, self.cache.row_start[row]:self.cache.cache_len[row]]

    @property
    def cached_tokens(self) -> int:
        """Tokens finished rows keep for reuse."""
        return self._idle_tokens

    def match(self, prompt: np.ndarray, rows) -> tuple[int, int]:
        """(row, n): among ``rows``, the one whose tokens share the longest prefix with ``prompt``."""
        best, best_n = -1, 0
        for r in rows:
            n = shared_prefix(self.tokens(r), prompt, best_n)
            if n > best_n:
                best, best_n = r, n
        return best, best_n

    # ---- admission -------------------------------------------------------------------
    def place(self, prompt, pad: int, limit: int, free: list[int], busy: list[int],
              scored_k: int | None = None) -> tuple[int, int]:
        """Give a new sequence one of the ``free`` rows, with the longest reusable prefix of
        ``prompt`` (at most ``limit`` tokens) already in its slots ``pad .. pad+n-1``: (row, n).

        A free row holding the best prefix is taken in place; a better prefix in a row in
        flight is copied into an empty free row, else the least recently used one. Copying
        into an empty row rather than reusing a finished row in place keeps that row's tail."""
        prompt = np.asarray(prompt, dtype=np.int64)
        rows = [*free, *busy]
        if scored_k is not None:  # echo: only rows that scored their prompt with enough alternatives
            rows = [r for r in rows if self.scores[r] is not None and self.score_k[r] >= scored_k]
        src, n = self.match(prompt, rows) if limit > 0 else (-1, 0)
        if scored_k is not None and n:
            # the entry of the first token prefilled again comes from the source too: it must be ours
            n = min(n - 1, len(self.scores[src]) - 1)
        n = min(n, limit)
        empty = [r for r in free if not self.kept[r]]
        if n and not empty and src in free:
            dst = src  # in place: it evicts only the row's tail past n
        elif empty:
            dst = empty[0]
        else:
            dst = next((r for r in self.idle if r in free and r != src), free[0])
        if n:
            start = int(self.cache.row_start[src])
            if (src, start) != (dst, pad):
                self.cache.copy(src, dst, n, start, pad)
                self.ids[dst, pad:pad + n] = self.ids[src, start:start + n]
            if src in self.idle:
                self.idle.move_to_end(src)
            self.hits += 1
            self.cached_prompt_tokens += n
        else:
            self.misses += 1
        self._event("hit" if n else "miss", n)
        self.scores[dst] = self.scores[src][:n + 1] if n and scored_k is not None else None
        held = self._unidle(dst)
        if held is not None:  # a finished row given out again: what it held is lost but the reused prefix
            self._evict(held - n if dst == src else held)
        self.kept[dst] = True
        return dst, n

    def release(self, row: int) -> None:
        """Row ``row`` finished: keep its tokens for reuse, most recently used, within the budget."""
        if not self.kept[row]:
            return
        self._unidle(row)
        self.idle[row] = len(self.tokens(row))
        self._idle_tokens += self.idle[row]
        self._enforce()

    def _enforce(self) -> None:
        while self.idle and self.budget is not None and self.cached_tokens > self.budget:
            row = next(iter(self.idle))
            held = self._unidle(row)
            self.kept[row] = False
            self._evict(held)

    def _unidle(self, row: int) -> int | None:
        held = self.idle.pop(row, None)
        if held is not None:
            self._idle_tokens -= held
        return held

    def _evict(self, tokens: int) -> None:
        if tokens > 0:
            self.evicted += tokens
            self._event("evict", tokens)

    def scored(self, row: int, entries: list, k: int) -> None:
        """Row ``row``'s echo prefill scored its prompt: ``entries`` per prompt token."""
        self.scores[row], self.score_k[row] = list(entries), k

    def clear(self) -> None:
        """Forget every row (someone else wrote the cache: timing, teacher-forced parity)."""
        self.scores = [None] * len(self.scores)
        self.kept[:] = False
        self.idle.clear()
        self._idle_tokens = 0
        self.ids[:] = UNKNOWN

    def _event(self, what: str, tokens: int) -> None:
        for listener in self.listeners:
            listener("prefix", (what, tokens))


def shared_prefix(a: np.ndarray, b: np.ndarray, at_least: int = 0) -> int:
    """Length of the common prefix of two id arrays (0 when it cannot exceed ``at_least``)."""
    m = min(len(a), len(b))
    if m <= at_least:
        return 0
    same = a[:m] == b[:m]
    return m if same.all() else int(np.argmin(same))

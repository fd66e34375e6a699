"""What a row hands back besides token ids: text cut at stop strings, and log-probabilities.

:class:`OutputOptions` is a request's output settings (``stop`` strings,
``stop_token_ids``, ``min_tokens``, ``logprobs``, ``echo``), checked once by
:func:`output_options` for every front door. :class:`StopText` turns a row's
tokens into text as they are committed: incremental detokenization, the cut
at the earliest stop string (which may span token boundaries and fall inside
a block that speculative or diffusion decoding committed at once), and the
hold-back of any tail that could still begin a stop string, so a stream never
shows text that a later token turns into a stop. :class:`TokenLogprob` is one
emitted token's log-probability and its most likely alternatives, read from
the graphs' ``top_logprobs``/``top_ids`` outputs (log-softmax at temperature 1
of the model's logits, computed on the device).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from nemocompile.text.request import RequestError

MAX_STOP = 4  # OpenAI's limit on stop strings
MAX_LOGPROBS = 20  # alternatives per token the graphs return (OpenAI's top_logprobs limit)


@dataclass(frozen=True)
class OutputOptions:
    """A request's output settings; the defaults mean "off"."""

    stop: tuple[str, ...] = ()  # cut the text before the first of these (excluded), finish "stop"
    stop_token_ids: frozenset[int] = frozenset()  # ids that stop like EOS (kept in the tokens, not in the text)
    min_tokens: int = 0  # no stop (EOS, stop ids, stop strings) before this many tokens
    logprobs: int | None = None  # alternatives per token (0: the chosen token's only); None: no log-probs
    echo: bool = False  # score the prompt too: each prompt token's log-prob (needs logprobs)


def output_options(stop=None, stop_token_ids=None, min_tokens=None, logprobs=None, echo=None, *,
                   vocab_size: int, max_new_tokens: int | None = None) -> OutputOptions:
    """Checked :class:`OutputOptions`; ``None`` means the default for every field.
    Raises :class:`RequestError` naming the field."""
    if stop is None:
        stop = ()
    elif isinstance(stop, str):
        stop = (stop,) if stop else ()
    elif isinstance(stop, (list, tuple)) and all(isinstance(s, str) for s in stop):
        stop = tuple(s for s in stop if s)
    else:
        raise RequestError(f"stop must be a string or a list of strings, got {stop!r:.60}", param="stop")
    if len(stop) > MAX_STOP:
        raise RequestError(f"stop takes at most {MAX_STOP} strings, got {len(stop)}", param="stop")
    ids = [] if stop_token_ids is None else stop_token_ids
    if not isinstance(ids, (list, tuple, set, frozenset)) or not all(
            isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab_size for t in ids):
        raise RequestError(f"stop_token_ids must be a list of token ids below {vocab_size}, got {ids!r:.60}",
                           param="stop_token_ids")
    min_tokens = 0 if min_tokens is None else min_tokens
    if isinstance(min_tokens, bool) or not isinstance(min_tokens, int) or min_tokens < 0:
        raise RequestError(f"min_tokens must be an integer >= 0, got {min_tokens!r:.60}", param="min_tokens")
    if max_new_tokens is not None and min_tokens > max_new_tokens:
        raise RequestError(f"min_tokens ({min_tokens}) exceeds max_new_tokens ({max_new_tokens})",
                           param="min_tokens")
    if logprobs is not None and (isinstance(logprobs, bool) or not isinstance(logprobs, int)
                                 or not 0 <= logprobs <= MAX_LOGPROBS):
        raise RequestError(f"logprobs must be an integer from 0 to {MAX_LOGPROBS}, got {logprobs!r:.60}",
                           param="logprobs")
    echo = bool(echo) if echo is not None else False
    if echo and logprobs is None:
        logprobs = 0  # the prompt's scores are what echo is for here
    return OutputOptions(stop, frozenset(ids), min_tokens, logprobs, echo)


# ---- text and stop strings ------------------------------------------------------------
class StopText:
    """A row's text, built token by token, cut at the earliest stop string.

    ``add(token)`` returns True when the text now contains a stop string: ``text``
    is then cut before it and no more tokens may follow. ``visible`` is the text a
    stream may show: everything except a tail that is a proper prefix of some
    stop string (it may still become one) and an incomplete UTF-8 character.
    Detokenization is incremental (a window of the last tokens, as vLLM does), so
    a long generation costs linear time."""

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.longest = max(map(len, self.stop), default=0)
        self.tokens: list[int] = []
        self.text = ""
        self._prefix = 0  # window start: tokens before it are fully in `text`
        self._read = 0  # tokens whose text is already in `text`
        self.stopped = False

    def add(self, token: int, check: bool = True) -> bool:
        """Append ``token``; True when a stop string now ends the text (``check`` False: the
        request's min_tokens are not reached yet, stop strings do not count)."""
        self.tokens.append(int(token))
        decode = self.tokenizer.decode
        before = decode(self.tokens[self._prefix:self._read])
        after = decode(self.tokens[self._prefix:])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return False  # no new text yet (a partial character, or a token with no text)
        piece = after[len(before):]
        self._prefix, self._read = self._read, len(self.tokens)
        start = max(0, len(self.text) - self.longest + 1)
        self.text += piece
        if not (check and self.stop):
            return False
        cut = min((i for i in (self.text.find(s, start) for s in self.stop) if i >= 0), default=-1)
        if cut < 0:
            return False
        self.text = self.text[:cut]
        self.stopped = True
        return True

    @property
    def visible(self) -> str:
        """The text a stream may show now."""
        if self.stopped or not self.stop:
            return self.text
        return self.text[:len(self.text) - held_back(self.text, self.stop)]

    def final(self) -> str:
        """The whole text once the row is done (a trailing partial character included)."""
        if self.stopped:
            return self.text
        return self.tokenizer.decode(self.tokens)


def held_back(text: str, stop: Sequence[str]) -> int:
    """Length of the longest tail of ``text`` that is a proper prefix of a stop string."""
    best = 0
    for s in stop:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


# ---- log-probabilities ------------------------------------------------------------------
@dataclass(frozen=True)
class TokenLogprob:
    """One token's log-probability under the model (log-softmax of its logits at temperature 1)
    and the most likely alternatives at its position, best first; ``logprob`` is None for the
    first prompt token (nothing predicts it)."""

    token: int
    logprob: float | None
    top: tuple[tuple[int, float], ...] = ()  # (token id, log-prob), best first


def token_logprob(io, j: int, column: int, token: int, k: int) -> TokenLogprob:
    """The log-prob of ``token`` at output ``column`` of forward entry ``j`` with the ``k`` best
    alternatives, from the graph's top-20. A token among them takes its value there (the same
    float as its entry among the alternatives); one outside them (a sampled rare token) is
    computed from the host logits, when the graph returns them."""
    ids = io.top_ids[j, column]
    values = io.top_logprobs[j, column]
    hit = np.flatnonzero(ids == token)
    if hit.size:
        value = float(values[hit[0]])
    elif io.logits is not None and column < io.logits.shape[1]:
        row = io.logits[j, column].astype(np.float64)
        top = row.max()
        value = float(row[token] - top - np.log(np.exp(row - top).sum()))
    else:
        value = float("-inf")  # below the 20 best and no logits to say how far: the graphs' limit
    return TokenLogprob(int(token), value, tuple(zip(ids[:k].tolist(), values[:k].tolist())))


__all__ = ["MAX_LOGPROBS", "MAX_STOP", "OutputOptions", "StopText", "TokenLogprob", "held_back", "output_options",
           "token_logprob"]

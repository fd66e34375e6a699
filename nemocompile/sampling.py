"""The sampling distribution of a request, and the speculative acceptance rule that keeps it.

One function, :func:`distribution`, turns a position's logits into the
distribution a token is drawn from; the eager decoders and the runtime's
schedulers all call it, so every mode samples from the same thing. Its steps,
in this order (vLLM's):

1. ``logit_bias``: add each listed token's bias.
2. penalties, from the tokens seen so far: ``repetition_penalty`` r divides a
   positive logit by r and multiplies a negative one by r, for every token of
   the prompt or the output; ``frequency_penalty`` subtracts f x (its count in
   the output); ``presence_penalty`` subtracts p once for a token that occurs in
   the output.
3. temperature: softmax(logits / T); T = 0 is greedy (all mass on the argmax of
   the biased, penalised logits; ties: the first index).
4. ``min_p``: drop tokens whose probability is below min_p x the top probability.
5. ``top_k``: keep the k most probable (vLLM's knob; -1 or 0: all).
6. ``top_p``: keep the smallest set of most probable tokens whose mass reaches
   top_p (the most probable token is always kept); renormalise.

Speculative sampling (linear-spec and quadratic-spec at temperature > 0, or with
any of the controls above). Glossary:

- draft ``x``: the block ``[p, x_1, ..., x_{B-1}]``; the drafts are the drafter's
  own choices (deterministic given the context), never a sample of the target.
- target ``p_i``: :func:`distribution` at verify position i, whose history (for
  the penalties) is the output so far followed by ``x_1..x_i``: exactly what AR
  sampling would use had it emitted those drafts.
- accept: draft ``x_{i+1}`` is accepted with probability ``p_i(x_{i+1})``, positions
  in order; the first rejection stops the cycle.
- bonus: at the first rejection at position i, a draw from ``p_i`` with
  ``x_{i+1}`` removed and renormalised; after the last draft (all accepted), a
  draw from ``p_{B-1}``.
- acceptance length: accepted drafts + the bonus.

Each emitted token is then distributed as ``p_i`` given the emitted prefix
(accepted: P = p(x); rejected: (1 - p(x)) x p(y) / (1 - p(x)) = p(y) for y != x), so
the output has AR sampling's distribution for any drafter (lossless in
distribution). At temperature 0, ``p_i`` is one-hot on the argmax and the rule is
the spec's greedy acceptance (``a[i] == x[i+1]``). A grammar (structured
output) masks ``p_i`` too, so a draft that breaks it has probability 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np

from nemocompile.text.request import RequestError

# the request fields of SamplingParams besides temperature and seed
FIELDS = ("top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias")


@dataclass(frozen=True)
class SamplingParams:
    """A request's sampling controls; every default means "off"."""

    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0  # (0, 1]
    top_k: int = -1  # -1 (or 0): no top-k
    min_p: float = 0.0  # [0, 1]
    presence_penalty: float = 0.0  # [-2, 2]
    frequency_penalty: float = 0.0  # [-2, 2]
    repetition_penalty: float = 1.0  # > 0; 1: none
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias in [-100, 100])
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0

    @property
    def penalised(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1

    @property
    def shapes_logits(self) -> bool:
        """Whether the controls can change the argmax (then greedy needs the logits too)."""
        return self.penalised or bool(self.logit_bias)

    @property
    def filters(self) -> bool:
        return self.top_p < 1 or self.top_k > 0 or self.min_p > 0

    @property
    def plain(self) -> bool:
        """softmax(logits / T) (or the argmax) as it stands: nothing to apply."""
        return not self.shapes_logits and not self.filters


def sampling_params(temperature: float = 0.0, seed: int | None = None, *, top_p=None, top_k=None, min_p=None,
                    presence_penalty=None, frequency_penalty=None, repetition_penalty=None, logit_bias=None,
                    vocab_size: int | None = None, **other) -> SamplingParams:
    """Checked :class:`SamplingParams` (None: the default); a bad value raises a one-line
    :class:`RequestError` naming the field. ``logit_bias`` maps token ids (ints or
    their decimal strings, as JSON sends them) to biases."""
    if other:
        raise RequestError(f"unknown sampling field(s) {sorted(other)}; known: {', '.join(FIELDS)}",
                           param=sorted(other)[0])

    def number(name, v, default, ok, rule):
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not ok(v):
            raise RequestError(f"{name} must be {rule}, got {v!r:.60}", param=name)
        return v

    top_p = float(number("top_p", top_p, 1.0, lambda v: 0 < v <= 1, "a number in (0, 1]"))
    min_p = float(number("min_p", min_p, 0.0, lambda v: 0 <= v <= 1, "a number in [0, 1]"))
    presence = float(number("presence_penalty", presence_penalty, 0.0, lambda v: -2 <= v <= 2, "a number in [-2, 2]"))
    frequency = float(number("frequency_penalty", frequency_penalty, 0.0, lambda v: -2 <= v <= 2,
                             "a number in [-2, 2]"))
    repetition = float(number("repetition_penalty", repetition_penalty, 1.0, lambda v: 0 < v <= 100,
                              "a number in (0, 100] (1: none)"))
    if top_k is None:
        top_k = -1
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < -1:
        raise RequestError(f"top_k must be an integer >= 1, or -1 (or 0) for all tokens, got {top_k!r:.60}",
                           param="top_k")
    bias: list[tuple[int, float]] = []
    if logit_bias is not None:
        if not isinstance(logit_bias, Mapping):
            raise RequestError("logit_bias must map token ids to biases in [-100, 100]", param="logit_bias")
        for key, value in logit_bias.items():
            try:
                token = int(key) if not isinstance(key, bool) and str(key).strip().lstrip("-").isdigit() else None
            except ValueError:
                token = None
            if token is None or token < 0 or (vocab_size is not None and token >= vocab_size):
                raise RequestError(f"logit_bias key {key!r:.40} is not a token id"
                                   + (f" in [0, {vocab_size})" if vocab_size else ""), param="logit_bias")
            number("logit_bias", value, 0.0, lambda v: -100 <= v <= 100, "a map of token id to a bias in [-100, 100]")
            bias.append((token, float(value)))
    return SamplingParams(float(temperature), top_p, top_k if top_k > 0 else -1, min_p, presence, frequency,
                          repetition, tuple(sorted(bias)), seed)


class History:
    """The tokens the penalties look at: the prompt's (a set) and the output's counts."""

    def __init__(self, prompt: Sequence[int] = (), output: Sequence[int] = ()):
        self.prompt = np.unique(np.asarray(prompt, dtype=np.int64))
        self.counts: dict[int, int] = {}
        self.extend(output)

    def extend(self, tokens: Sequence[int]) -> None:
        for t in tokens:
            t = int(t)
            self.counts[t] = self.counts.get(t, 0) + 1

    def plus(self, tokens: Sequence[int]) -> "History":
        """This history followed by ``tokens`` (a copy; the prompt set is shared)."""
        h = History.__new__(History)
        h.prompt, h.counts = self.prompt, dict(self.counts)
        h.extend(tokens)
        return h


def adjust(logits: np.ndarray, params: SamplingParams, history: History | None) -> np.ndarray:
    """Steps 1-2 on a float32 copy of ``logits`` [V]: logit_bias, then the penalties."""
    z = np.array(logits, dtype=np.float32)
    for token, bias in params.logit_bias:
        z[token] += bias
    if params.penalised and history is not None:
        if params.repetition_penalty != 1:
            seen = np.union1d(history.prompt, np.fromiter(history.counts, dtype=np.int64, count=len(history.counts)))
            v = z[seen]
            z[seen] = np.where(v > 0, v / params.repetition_penalty, v * params.repetition_penalty)
        if history.counts and (params.frequency_penalty or params.presence_penalty):
            ids = np.fromiter(history.counts, dtype=np.int64, count=len(history.counts))
            cnt = np.fromiter(history.counts.values(), dtype=np.float32, count=len(history.counts))
            z[ids] -= params.frequency_penalty * cnt + params.presence_penalty
    return z


def distribution(logits: np.ndarray, params: SamplingParams, history: History | None = None,
                 allowed: np.ndarray | None = None) -> np.ndarray:
    """The distribution a token at this position is drawn from: float64 [V] summing to 1
    (module docstring, steps 1-6). ``allowed``: a bool [V] grammar mask applied to the
    logits first (None: every token)."""
    z = adjust(logits, params, history).astype(np.float64)
    if allowed is not None:
        z[~allowed] = -np.inf
    if params.greedy:
        p = np.zeros_like(z)
        p[int(np.argmax(z))] = 1.0
        return p
    z /= params.temperature
    z -= z.max()
    p = np.exp(z)
    p /= p.sum()
    if params.min_p > 0:
        p[p < params.min_p * p.max()] = 0.0
    if params.top_k > 0 and params.top_k < p.size:
        kth = np.partition(p, p.size - params.top_k)[p.size - params.top_k]
        # ties at the k-th value: keep the first k by index, as a stable sort would
        keep = p > kth
        ties = np.flatnonzero(p == kth)[: params.top_k - int(keep.sum())]
        keep[ties] = True
        p[~keep] = 0.0
    if params.top_p < 1:
        p = _top_p(p, params.top_p)
    return p / p.sum()


def _top_p(p: np.ndarray, top_p: float) -> np.ndarray:
    """Keep the most probable tokens until their mass reaches ``top_p`` of the total. Sorts only
    the 1024 most probable (found by partition) when they hold that mass, as a language model's
    peaked distribution does; a vocabulary-wide sort costs tens of ms per token at 131k tokens."""
    total, k = p.sum(), min(p.size, 1024)
    while True:
        head = np.argpartition(-p, k - 1)[:k] if k < p.size else np.arange(p.size)
        order = head[np.argsort(-p[head], kind="stable")]
        mass = np.cumsum(p[order])
        if mass[-1] >= top_p * total or k == p.size:
            break
        k = p.size
    keep = order[: int(np.count_nonzero(mass - p[order] < top_p * total))]  # mass before it short of top_p
    out = np.zeros_like(p)
    out[keep] = p[keep]
    return out


def draw(p: np.ndarray, u: float) -> int:
    """The token at uniform ``u`` in [0, 1) of ``p``'s inverse CDF."""
    cdf = np.cumsum(p)
    return int(min(np.searchsorted(cdf, u * cdf[-1], side="right"), p.size - 1))


def greedy_accept(drafted: Sequence[int], argmax: Sequence[int]) -> list[int]:
    """The spec's greedy rule: ``drafted`` is ``x_0..x_{B-1}`` (``x_0`` already emitted),
    ``argmax[i]`` the verifier's choice after ``x_i``. Returns the accepted drafts and the
    bonus: ``argmax[0..k]`` while ``argmax[i] == x_{i+1}``."""
    k = 0
    while k < len(drafted) - 1 and argmax[k] == drafted[k + 1]:
        k += 1
    return [int(t) for t in argmax[: k + 1]]


def speculative_accept(drafts: Sequence[int], target: Callable[[int], np.ndarray],
                       uniform: Callable[[], float]) -> list[int]:
    """The module's acceptance rule: ``drafts`` are ``x_1..x_{B-1}``; ``target(i)`` is ``p_i``
    (called in order, only up to the first rejection, after the drafts before it were
    accepted); ``uniform()`` a draw in [0, 1). Returns the accepted drafts and the bonus."""
    out: list[int] = []
    for i, x in enumerate(drafts):
        p = target(i)
        if uniform() < p[x]:
            out.append(int(x))
            continue
        rest = p.copy()
        rest[x] = 0.0
        out.append(draw(rest, uniform()) if rest.sum() > 0 else int(x))
        return out
    out.append(draw(target(len(drafts)), uniform()))
    return out

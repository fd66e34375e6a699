"""What every eager decoder shares: arguments, sampling, results and statistics."""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np
import torch

from ..errors import GenerationError
from ..model import KVCache, TriModeModel
from ..sampling import History, SamplingParams, distribution, greedy_accept, speculative_accept

from ..text.request import check_eager_request, check_values
SPECULATIVE = ("linear-spec", "quadratic-spec")  # one sequence at a time


@dataclass
class GenerationStats:
    """Counting follows spec section 3: ``forwards`` includes the prefill."""

    mode: str
    forwards: int = 0
    decode_forwards: int = 0
    generated_tokens: int = 0
    tokens_per_forward: float = 0.0
    acceptance_length: float | None = None  # self-speculation: mean tokens accepted per verify
    acceptance_lengths: list[int] = field(default_factory=list)  # per cycle (accepted drafts + bonus)
    block_length: int | None = None
    threshold: float | None = None

    def finish(self, generated: int) -> "GenerationStats":
        self.generated_tokens = generated
        self.decode_forwards = self.forwards - 1
        self.tokens_per_forward = generated / self.forwards if self.forwards else 0.0
        if self.acceptance_lengths:
            self.acceptance_length = sum(self.acceptance_lengths) / len(self.acceptance_lengths)
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        s = (f"mode={self.mode} tokens={self.generated_tokens} forwards={self.forwards} "
             f"tokens/forward={self.tokens_per_forward:.2f}")
        if self.acceptance_length is not None:
            s += f" acceptance={self.acceptance_length:.2f}"
        return s


@dataclass
class GenerationResult:
    tokens: list[int]  # generated ids, prompt excluded, trimmed after the first EOS
    text: str | None
    stats: GenerationStats


@dataclass(frozen=True)
class DecodeArgs:
    """Knobs of all modes; ``block_length``/``threshold`` None take each mode's default."""

    mode: str = "ar"
    max_new_tokens: int = 64
    block_length: int | None = None
    threshold: float | str | None = None  # None: the mode's default; "none": fixed schedule
    steps: int | None = None  # diffusion without threshold: denoising steps per block (default: block length)
    temperature: float = 0.0
    seed: int | None = None
    eos_token_id: int | Sequence[int] | None = None  # default: the config's ids; -1 disables EOS stopping
    eos_ids: frozenset[int] = frozenset()  # filled by validate_args: every id that stops (empty: none)
    draft_groups: int | None = None  # quadratic-spec: branches per fused step (None: all B, the spec)
    budget: "ThinkingBudget | None" = None  # spec 3.5 (None: no thinking budget)
    sampling: SamplingParams | None = None  # top_p, penalties, ... (None: temperature and seed alone)


@dataclass(frozen=True)
class ThinkingBudget:
    """Spec 3.5: the token at output index ``limit`` (max_thinking_tokens N) is forced to
    ``end`` (end_think_token_id E) unless E is already among the first N tokens. Every mode
    applies it to what it is about to emit, so output and cache agree."""

    limit: int  # N
    end: int  # E

    def force(self, emitted: Sequence[int], new: list[int]) -> list[int]:
        """``new`` tokens about to follow ``emitted``: cut after index N, which becomes E
        (self-speculation then accepts drafts up to index N-1 and emits E as the bonus)."""
        m, N = len(emitted), self.limit
        if not m <= N < m + len(new) or self.end in emitted or self.end in new[:N - m]:
            return new
        return list(new[:N - m]) + [self.end]

    def forced_at(self, emitted: Sequence[int], length: int) -> int | None:
        """Block diffusion: the position in a block of ``length`` tokens after ``emitted`` that
        is committed to E before denoising, if any."""
        m = len(emitted)
        return self.limit - m if m <= self.limit < m + length and self.end not in emitted else None


class Sampler:
    """Greedy at temperature 0, else seeded sampling, from the request's
    :func:`nemocompile.sampling.distribution` (plain softmax(logits / T) needs none of it).
    Logits are float32 rows [..., V]."""

    def __init__(self, temperature: float, seed: int | None, device: torch.device | str = "cpu",
                 params: SamplingParams | None = None):
        self.params = params if params is not None else SamplingParams(temperature, seed=seed)
        self.temperature = self.params.temperature
        self.generator = torch.Generator(device=device)
        if seed is not None:
            self.generator.manual_seed(seed)
        else:
            self.generator.seed()

    def sample(self, logits: torch.Tensor, histories: Sequence[History] | None = None) -> torch.Tensor:
        """A token per row: argmax, or a draw from softmax(logits / T); with controls, from
        ``distribution`` (``histories``: one per row of a [B, V] batch, for the penalties)."""
        if self.params.plain:
            if self.temperature <= 0:
                return logits.argmax(-1)
            probs = torch.softmax(logits.float() / self.temperature, dim=-1)
            flat = probs.reshape(-1, probs.shape[-1])
            return torch.multinomial(flat, 1, generator=self.generator).view(probs.shape[:-1])
        flat = logits.float().reshape(-1, logits.shape[-1]).cpu().numpy()
        out = [self.pick(distribution(row, self.params, histories[i] if histories else None))
               for i, row in enumerate(flat)]
        return torch.tensor(out, dtype=torch.long, device=logits.device).view(logits.shape[:-1])

    def pick(self, p) -> int:
        """A draw from the distribution ``p`` [V] (its argmax when greedy)."""
        if self.temperature <= 0:
            return int(p.argmax())
        return torch.multinomial(torch.from_numpy(p), 1, generator=self.generator).item()

    def uniform(self) -> float:
        return torch.rand((), generator=self.generator).item()

    def verify(self, logits: torch.Tensor, x: list[int], history: History | None) -> list[int]:
        """Self-speculation's verify (nemocompile.sampling): the accepted drafts of ``x[1:]``
        and the bonus, from the verifier's logits [L, V] (position i predicts i+1)."""
        if self.params.plain and self.temperature <= 0:  # the spec's greedy rule
            return greedy_accept(x, logits.argmax(-1).tolist())
        rows = logits.float().cpu().numpy()
        history = history if history is not None else History()
        return speculative_accept(x[1:], lambda i: distribution(rows[i], self.params, history.plus(x[1:i + 1])),
                                  self.uniform)

    def candidates(self, logits: torch.Tensor, histories: Sequence[History] | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """Diffusion candidates and confidences: argmax (Gumbel-perturbed when sampling)
        and the candidate's softmax probability under the unperturbed logits. With
        controls, the candidates come from ``distribution`` (penalties: the row's history)."""
        logits = logits.float()
        scores, scale = logits, self.temperature  # Gumbel-max over logits / T ...
        if not self.params.plain:  # ... or over the log of the request's distribution (T inside it)
            with np.errstate(divide="ignore"):  # a filtered token's log-probability is -inf
                shaped = [[np.log(distribution(v, self.params, histories[b] if histories else None))
                           for v in row] for b, row in enumerate(logits.cpu().numpy())]
            scores, scale = torch.from_numpy(np.array(shaped, dtype=np.float32)).to(logits.device), 1.0
        if self.temperature <= 0:
            cand = scores.argmax(-1)
        else:
            u = torch.rand(scores.shape, generator=self.generator, device=scores.device)
            gumbel = -torch.log((-torch.log(u.clamp_min(1e-20))).clamp_min(1e-20))  # (-log u) before the clamp
            cand = (scores / scale + gumbel).argmax(-1)
        conf = torch.softmax(logits, dim=-1).gather(-1, cand[..., None])[..., 0]
        return cand, conf


def validate_args(model: TriModeModel, args: DecodeArgs, batch: int, width: int | None = None) -> DecodeArgs:
    """Fill per-mode defaults and reject bad values before any forward runs. With ``width``
    (the longest prompt) also what cannot fit: positions past max_position_embeddings, more
    memory than is available, a block longer than the tokens asked for."""
    check_values(mode=args.mode, max_new_tokens=args.max_new_tokens, block_length=args.block_length,
                 temperature=args.temperature, seed=args.seed, eos=args.eos_token_id, steps=args.steps,
                 vocab_size=model.config.vocab_size)
    block = args.block_length if args.block_length is not None else model.config.block_size
    if args.mode != "ar" and block < 2:
        raise GenerationError(f"block_length must be at least 2, got {block}")
    if width is not None:
        check_eager_request(model, args, block, batch, width)
    threshold = parse_threshold(args.threshold)
    if threshold is DEFAULT:
        # diffusion: 0.9 unless a fixed step count was asked for; self-speculation: one-shot draft
        threshold = (None if args.steps is not None else 0.9) if args.mode == "diffusion" else 0.0
    if args.mode == "linear-spec" and threshold is None:
        threshold = 0.0
    if args.steps is not None and args.steps < 1:
        raise GenerationError(f"steps must be at least 1, got {args.steps}")
    if args.mode in SPECULATIVE and batch != 1:
        raise GenerationError(f"{args.mode} decodes one sequence at a time (batch 1); use ar or diffusion for batches")
    if args.mode == "quadratic-spec":
        check_quadratic(args.threshold)
        threshold = None  # one-shot drafts: quadratic-spec has no threshold
        check_draft_groups(args.draft_groups, block)
    elif args.draft_groups is not None:
        raise GenerationError("draft_groups is a quadratic-spec knob; leave it unset for other modes")
    eos = model.config.eos_ids if args.eos_token_id is None else args.eos_token_id
    ids = eos_id_set(eos, model.config.vocab_size)
    first = eos if isinstance(eos, int) else (list(eos) or [-1])[0]  # single-id callers keep an int
    sampling = args.sampling if args.sampling is not None else SamplingParams(args.temperature, seed=args.seed)
    sampling = dataclasses.replace(sampling, temperature=float(args.temperature), seed=args.seed)
    return DecodeArgs(args.mode, args.max_new_tokens, block, threshold, args.steps, args.temperature,
                      args.seed, int(first), ids, args.draft_groups, args.budget, sampling)


def thinking_budget(max_thinking_tokens, end_think_token_id, tokenizer, vocab_size: int) -> ThinkingBudget | None:
    """The budget of a request (None without max_thinking_tokens); E defaults to the
    tokenizer's ``</think>`` id."""
    if max_thinking_tokens is None:
        if end_think_token_id is not None:
            raise GenerationError("end_think_token_id needs max_thinking_tokens (the budget it ends)")
        return None
    if isinstance(max_thinking_tokens, bool) or not isinstance(max_thinking_tokens, int) or max_thinking_tokens < 0:
        raise GenerationError(f"max_thinking_tokens must be an integer >= 0, got {max_thinking_tokens!r}")
    if end_think_token_id is None:
        end_think_token_id = tokenizer.token_to_id("</think>") if tokenizer is not None else None
        if end_think_token_id is None:
            raise GenerationError("max_thinking_tokens needs end_think_token_id: this tokenizer has no </think> "
                                  "token; pass the id that ends thinking")
    if isinstance(end_think_token_id, bool) or not isinstance(end_think_token_id, int) or \
            not 0 <= end_think_token_id < vocab_size:
        raise GenerationError(f"end_think_token_id must be a token id in [0, {vocab_size}), got {end_think_token_id!r}")
    return ThinkingBudget(max_thinking_tokens, end_think_token_id)


def eos_id_set(eos, vocab_size: int) -> frozenset[int]:
    """The ids that stop generation, from one id (-1: none) or a list of ids."""
    values = [eos] if isinstance(eos, int) and not isinstance(eos, bool) else eos
    try:
        ids = [int(v) for v in values if not isinstance(v, bool) and int(v) == v]
        ok = len(ids) == len(values) and all(-1 <= t < vocab_size for t in ids)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise GenerationError(f"eos must be a token id, a list of token ids or -1 (no EOS stop), got {eos!r}")
    return frozenset(t for t in ids if t >= 0)


def has_eos(tokens: Sequence[int], eos: int | frozenset[int]) -> bool:
    """Whether any of ``tokens`` is an EOS id (``eos``: one id, -1 for none, or a set)."""
    eos = {eos} if isinstance(eos, int) else eos
    return any(int(t) in eos for t in tokens)


DEFAULT = object()


def check_quadratic(threshold) -> None:
    """quadratic-spec drafts in one shot: it has no threshold."""
    if threshold is not None and parse_threshold(threshold) not in (DEFAULT, 0.0):
        raise GenerationError("quadratic-spec drafts every block in one forward and takes no threshold; "
                              "leave threshold unset (or use linear-spec for iterative drafting)")


def check_draft_groups(groups, block: int) -> None:
    if groups is not None and (isinstance(groups, bool) or not isinstance(groups, int) or not 1 <= groups <= block):
        raise GenerationError(f"draft_groups must be an integer from 1 to the block length {block}, got {groups!r}")


def parse_threshold(value: float | str | None):
    """None -> DEFAULT (the mode's default); "none" -> None (no threshold); else a float in [0, 1]."""
    if value is None:
        return DEFAULT
    if isinstance(value, str):
        if value.strip().lower() in ("none", "off"):
            return None
        try:
            value = float(value)
        except ValueError:
            raise GenerationError(f"threshold must be a number in [0, 1] or 'none', got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise GenerationError(f"threshold must be a number in [0, 1] or 'none', got {value!r}")
    return float(value)


def budgeted(budget: ThinkingBudget | None, emitted: Sequence[int], new: list[int]) -> list[int]:
    """``new`` with the thinking budget applied (unchanged without one)."""
    return new if budget is None else budget.force(emitted, new)


def split_evenly(total: int, steps: int) -> list[int]:
    """``total`` split over ``steps``, the remainder to the first steps."""
    base, rem = divmod(total, steps)
    return [base + (1 if i < rem else 0) for i in range(steps)]


def first_eos_trim(tokens: Sequence[int], eos: int | frozenset[int]) -> list[int]:
    """``tokens`` up to and including the first EOS (``eos``: one id, -1 for none, or a set)."""
    eos = {eos} if isinstance(eos, int) else eos
    tokens = list(tokens)
    for i, t in enumerate(tokens):
        if t in eos:
            return tokens[: i + 1]
    return tokens


def prefill(model: TriModeModel, prompts: list[list[int]], capacity: int) -> tuple[KVCache, torch.Tensor]:
    """Left-pad the prompts, run them causally into a new cache; last logits [B, V]."""
    if any(len(p) == 0 for p in prompts):
        raise GenerationError("empty prompt: give at least one token")
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long, device=model.device)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p, dtype=torch.long)
    cache = model.new_cache(len(prompts), capacity)
    cache.row_start = torch.tensor([width - len(p) for p in prompts], dtype=torch.long, device=model.device)
    logits = model(ids, pattern="causal", cache=cache)
    return cache, logits[:, -1].float()

"""What every eager decoder shares: arguments, sampling, results and statistics."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Sequence

import torch

from ..errors import GenerationError
from ..model import KVCache, TriModeModel

MODES = ("ar", "diffusion", "linear-spec")


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
    eos_token_id: int | None = None  # default: the config's; -1 disables EOS stopping


class Sampler:
    """Greedy at temperature 0, else seeded sampling. Logits are float32 rows [..., V]."""

    def __init__(self, temperature: float, seed: int | None, device: torch.device | str = "cpu"):
        self.temperature = temperature
        self.generator = torch.Generator(device=device)
        if seed is not None:
            self.generator.manual_seed(seed)
        else:
            self.generator.seed()

    def sample(self, logits: torch.Tensor) -> torch.Tensor:
        """A token per row: argmax, or a draw from softmax(logits / T)."""
        if self.temperature <= 0:
            return logits.argmax(-1)
        probs = torch.softmax(logits.float() / self.temperature, dim=-1)
        flat = probs.reshape(-1, probs.shape[-1])
        return torch.multinomial(flat, 1, generator=self.generator).view(probs.shape[:-1])

    def candidates(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Diffusion candidates and confidences: argmax (Gumbel-perturbed when sampling)
        and the candidate's softmax probability under the unperturbed logits."""
        logits = logits.float()
        if self.temperature <= 0:
            cand = logits.argmax(-1)
        else:
            u = torch.rand(logits.shape, generator=self.generator, device=logits.device)
            gumbel = -torch.log(-torch.log(u.clamp_min(1e-20)).clamp_min(1e-20))
            cand = (logits / self.temperature + gumbel).argmax(-1)
        conf = torch.softmax(logits, dim=-1).gather(-1, cand[..., None])[..., 0]
        return cand, conf


def validate_args(model: TriModeModel, args: DecodeArgs, batch: int, width: int | None = None) -> DecodeArgs:
    """Fill per-mode defaults and reject bad values before any forward runs. With ``width``
    (the longest prompt) also what cannot fit: positions past max_position_embeddings, more
    memory than is available, a block longer than the tokens asked for."""
    from ..request import check_eager_request, check_values

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
    if args.mode == "linear-spec" and batch != 1:
        raise GenerationError("linear-spec decodes one sequence at a time (batch 1); use ar or diffusion for batches")
    eos = model.config.eos_token_id if args.eos_token_id is None else args.eos_token_id
    return DecodeArgs(args.mode, args.max_new_tokens, block, threshold, args.steps, args.temperature,
                      args.seed, eos)


DEFAULT = object()


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


def split_evenly(total: int, steps: int) -> list[int]:
    """``total`` split over ``steps``, the remainder to the first steps."""
    base, rem = divmod(total, steps)
    return [base + (1 if i < rem else 0) for i in range(steps)]


def first_eos_trim(tokens: Sequence[int], eos: int) -> list[int]:
    tokens = list(tokens)
    if eos >= 0 and eos in tokens:
        return tokens[: tokens.index(eos) + 1]
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

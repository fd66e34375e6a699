"""Eager reference decoders: the spec's four algorithms, on the PyTorch model."""

from __future__ import annotations

import copy
from typing import Sequence

from ..model import TriModeModel
from ..sampling import FIELDS as SAMPLING_FIELDS
from ..sampling import sampling_params
from nemocompile.text.tokenizer import encode_prompts as _encode_prompts
from .ar import decode_ar
from ..text.request import MODES  # the one list of decode modes, kept with the request checks
from .common import DecodeArgs, GenerationResult, GenerationStats, thinking_budget, validate_args
from .diffusion import decode_diffusion
from .linear_spec import accept, decode_linear_spec
from .quadratic_spec import decode_quadratic_spec

_DECODERS = {"ar": decode_ar, "diffusion": decode_diffusion, "linear-spec": decode_linear_spec,
             "quadratic-spec": decode_quadratic_spec}


def encode_prompts(model: TriModeModel, prompt, chat: bool = False,
                   chat_template_kwargs: dict | None = None) -> tuple[list[list[int]], bool]:
    """Token lists for the prompt(s), and whether they were a batch."""
    return _encode_prompts(model.tokenizer, model.config.vocab_size, prompt, chat,
                           template_kwargs=chat_template_kwargs)


def generate(
    model: TriModeModel,
    prompt_or_ids,
    mode: str = "ar",
    max_new_tokens: int = 64,
    block_length: int | None = None,
    threshold: float | str | None = None,
    temperature: float = 0.0,
    seed: int | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    steps: int | None = None,
    chat: bool = False,
    chat_template_kwargs: dict | None = None,
    draft_groups: int | None = None,
    max_thinking_tokens: int | None = None,
    end_think_token_id: int | None = None,
    **sampling,
) -> GenerationResult | list[GenerationResult]:
    """Generate with the eager model. A single prompt (text or ids) returns one
    result; a list of prompts returns a list (ar and diffusion batch them).
    ``eos_token_id``: one id, a list (any stops) or -1 (none); default the config's.
    ``chat_template_kwargs`` reach the chat template (e.g. ``{"enable_thinking": False}``).
    ``draft_groups`` (quadratic-spec): acceptance points drafted per fused step (default: all).
    ``max_thinking_tokens`` N / ``end_think_token_id`` E (default: the tokenizer's ``</think>``):
    the thinking budget of spec 3.5, in every mode. ``sampling``: ``top_p``, ``top_k``,
    ``min_p``, ``presence_penalty``, ``frequency_penalty``, ``repetition_penalty``,
    ``logit_bias`` (nemocompile.sampling; every mode, self-speculation lossless in distribution)."""
    prompts, batched = encode_prompts(model, prompt_or_ids, chat, chat_template_kwargs)
    unknown = sorted(set(sampling) - set(SAMPLING_FIELDS))
    if unknown:
        raise TypeError(f"generate() got unexpected keyword argument(s) {unknown}")
    params = sampling_params(temperature, seed, **sampling, vocab_size=model.config.vocab_size) \
        if isinstance(temperature, (int, float)) and not isinstance(temperature, bool) else None
    args = validate_args(model, DecodeArgs(mode, max_new_tokens, block_length, threshold, steps, temperature,
                                           seed, eos_token_id, draft_groups=draft_groups,
                                           budget=thinking_budget(max_thinking_tokens, end_think_token_id,
                                                                  model.tokenizer, model.config.vocab_size),
                                           sampling=params),
                         len(prompts), max(map(len, prompts)))
    outs, stats = _DECODERS[args.mode](model, prompts, args)
    results = []
    for tokens in outs:
        text = model.tokenizer.decode(tokens) if model.tokenizer is not None else None
        results.append(GenerationResult(tokens, text, copy.deepcopy(stats).finish(len(tokens))))
    return results if batched else results[0]


__all__ = ["MODES", "DecodeArgs", "GenerationResult", "GenerationStats", "accept", "generate", "encode_prompts"]

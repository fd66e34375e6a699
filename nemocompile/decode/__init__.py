"""Eager reference decoders: the spec's three algorithms, on the PyTorch model."""

from __future__ import annotations

import copy
from typing import Sequence

from ..errors import GenerationError
from ..model import TriModeModel
from .ar import decode_ar
from .common import MODES, DecodeArgs, GenerationResult, GenerationStats, validate_args
from .diffusion import decode_diffusion
from .linear_spec import accept, decode_linear_spec

_DECODERS = {"ar": decode_ar, "diffusion": decode_diffusion, "linear-spec": decode_linear_spec}


def encode_prompts(model: TriModeModel, prompt, chat: bool = False) -> tuple[list[list[int]], bool]:
    """Token lists for a str, a list of str, a list of ids or a list of id lists; and whether it was a batch."""
    def one(p) -> list[int]:
        if isinstance(p, str):
            if model.tokenizer is None:
                raise GenerationError("this checkpoint has no tokenizer.json: pass token ids instead of text")
            text = model.tokenizer.apply_chat_template(p) if chat else p
            return model.tokenizer.encode(text)
        ids = [int(t) for t in p]
        bad = [t for t in ids if not 0 <= t < model.config.vocab_size]
        if bad:
            raise GenerationError(f"token id {bad[0]} is outside the vocabulary (size {model.config.vocab_size})")
        return ids

    if hasattr(prompt, "tolist"):
        prompt = prompt.tolist()
    if isinstance(prompt, str):
        return [one(prompt)], False
    prompt = list(prompt)
    if prompt and all(isinstance(p, (str, list, tuple)) for p in prompt):
        return [one(p) for p in prompt], True
    return [one(prompt)], False


def generate(
    model: TriModeModel,
    prompt_or_ids,
    mode: str = "ar",
    max_new_tokens: int = 64,
    block_length: int | None = None,
    threshold: float | str | None = None,
    temperature: float = 0.0,
    seed: int | None = None,
    eos_token_id: int | None = None,
    steps: int | None = None,
    chat: bool = False,
) -> GenerationResult | list[GenerationResult]:
    """Generate with the eager model. A single prompt (text or ids) returns one
    result; a list of prompts returns a list (ar and diffusion batch them)."""
    prompts, batched = encode_prompts(model, prompt_or_ids, chat)
    args = validate_args(model, DecodeArgs(mode, max_new_tokens, block_length, threshold, steps, temperature,
                                           seed, eos_token_id), len(prompts))
    outs, stats = _DECODERS[args.mode](model, prompts, args)
    results = []
    for tokens in outs:
        text = model.tokenizer.decode(tokens) if model.tokenizer is not None else None
        results.append(GenerationResult(tokens, text, copy.deepcopy(stats).finish(len(tokens))))
    return results if batched else results[0]


__all__ = ["MODES", "DecodeArgs", "GenerationResult", "GenerationStats", "accept", "generate", "encode_prompts"]

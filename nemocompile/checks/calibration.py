"""Calibration activations for data-aware weight quantization (GPTQ): what each weight multiplies.

The eager model runs the calibration prompts the two ways its graphs do, causally
(prefill, AR steps, verify) and bidirectionally with the last block masked (denoise,
draft), and a forward hook on every linear layer keeps its input rows. They are
keyed by the name the weight has in the exported graphs
(``model.<module>.weight.T``), which is what passes/quantize_weights.py looks up.

The default prompts are nemocompile's own source files: code, like what the
model writes, and never the held-out prompts that measure the result.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from nemocompile.model import TriModeModel

DEFAULT_TOKENS = 512  # per pattern; every linear layer keeps tokens x in_features floats


def default_calibration_prompts(model: TriModeModel, count: int = 4) -> list:
    """nemocompile's own modules as text, else seeded random token ids (a model without a tokenizer)."""
    if model.tokenizer is not None:
        files = sorted((Path(__file__).parent).glob("*.py"))[:count]
        return [f.read_text() for f in files]
    gen = torch.Generator().manual_seed(4321)
    return [torch.randint(0, model.config.vocab_size, (96,), generator=gen).tolist() for _ in range(count)]


def collect_activations(model: TriModeModel, prompts: Sequence, max_tokens: int = DEFAULT_TOKENS,
                        block_length: int | None = None) -> dict[str, np.ndarray]:
    """Graph weight name -> the rows [tokens, in_features] its linear layer saw on ``prompts`` (float32).

    LoRA layers are skipped (they stay in float). ``max_tokens`` caps the tokens
    per pattern, so memory stays tokens x the sum of in_features."""
    from nemocompile.decode import encode_prompts

    ids: list[int] = []
    for p in prompts:
        ids += encode_prompts(model, p)[0][0]
    ids = ids[:max_tokens]
    if not ids:
        raise ValueError("no calibration tokens: pass at least one non-empty prompt")
    block = block_length or model.config.block_size
    rows: dict[str, list[torch.Tensor]] = {}
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and "lora" not in name:
            key = f"model.{name}.weight.T"
            hooks.append(module.register_forward_hook(
                lambda _m, inputs, _out, key=key: rows.setdefault(key, []).append(
                    inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float().cpu())))
    try:
        with torch.no_grad():
            x = torch.tensor([ids], dtype=torch.long, device=model.device)
            model(x, pattern="causal")
            masked = x.clone()
            masked[0, -min(block, len(ids)):] = model.config.mask_token_id
            model(masked, pattern="bidirectional")
    finally:
        for h in hooks:
            h.remove()
    return {k: torch.cat(v).numpy() for k, v in rows.items()}


__all__ = ["collect_activations", "default_calibration_prompts", "DEFAULT_TOKENS"]

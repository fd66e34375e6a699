"""One static decode step as an exportable module: ``model.step`` with its step
kind's attention pattern, LoRA switch and shapes fixed at export time.

The graph's I/O follow the manifest contract (nemocompile/manifest.py): inputs
``input_ids, cache_len, row_start, cache_k, cache_v``; outputs ``logits`` and,
for steps that write the cache, the block's ``present_k, present_v`` rows. The
cache inputs are only read: the runtime places the present rows at
``cache_len`` itself, so a step never copies or returns the whole cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from nemocompile.manifest import STEP_KINDS, TensorSpec
from nemocompile.model import TriModeModel
from nemocompile.model.modeling import greedy_candidates

INPUT_NAMES = ("input_ids", "cache_len", "row_start", "cache_k", "cache_v")
OUTPUT_NAMES = ("logits", "present_k", "present_v")
# Bidirectional steps also return each position's greedy candidate and its softmax
# probability, so a greedy runtime never reads (or softmaxes) the full logits on the host.
CANDIDATE_NAMES = ("logits", "candidate", "confidence")
DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


@dataclass(frozen=True)
class StepSpec:
    """What one graph is: a step kind at a static block length, LoRA on or off."""

    step: str  # a manifest.STEP_KINDS key
    block_length: int  # L, tokens per call
    lora: bool = False  # drafter adapter active (only ever in draft)

    @property
    def pattern(self) -> str:
        return STEP_KINDS[self.step][0]

    @property
    def writes_cache(self) -> bool:
        return STEP_KINDS[self.step][1]

    @property
    def output_names(self) -> tuple[str, ...]:
        return OUTPUT_NAMES if self.writes_cache else CANDIDATE_NAMES


class StepModule(nn.Module):
    """``forward(input_ids, cache_len, row_start, cache_k, cache_v)`` -> logits (+ present rows)."""

    def __init__(self, model: TriModeModel, spec: StepSpec):
        super().__init__()
        if spec.lora and not model.has_lora:
            raise ValueError(f"{spec.step}: LoRA requested but the model has no drafter adapter")
        self.model = model
        self.spec = spec

    def forward(
        self,
        input_ids: torch.Tensor,  # [B, L] int64
        cache_len: torch.Tensor,  # [] int64
        row_start: torch.Tensor,  # [B] int64
        cache_k: torch.Tensor,  # [layers, B, kv_heads, C, head_dim]
        cache_v: torch.Tensor,  # [layers, B, kv_heads, C, head_dim]
    ) -> tuple[torch.Tensor, ...]:
        logits, k, v = self.model.step(input_ids, cache_k, cache_v, cache_len, row_start,
                                       pattern=self.spec.pattern, lora=self.spec.lora)
        logits = logits.float()  # [B, L, V]: float32 whatever the weights' dtype
        if self.spec.writes_cache:
            return logits, k, v
        return (logits, *greedy_candidates(logits))

    # ---- static shapes -----------------------------------------------------
    def cache_shape(self, batch_size: int, capacity: int) -> list[int]:
        cfg = self.model.config
        return [cfg.num_hidden_layers, batch_size, cfg.num_key_value_heads, capacity, cfg.head_dim]

    def example_inputs(self, batch_size: int, capacity: int) -> tuple[torch.Tensor, ...]:
        """Inputs with the export-time shapes (values are irrelevant: shapes are static)."""
        L, dtype = self.spec.block_length, self.model.dtype
        cache = torch.zeros(self.cache_shape(batch_size, capacity), dtype=dtype)
        return (torch.zeros(batch_size, L, dtype=torch.long), torch.tensor(0, dtype=torch.long),
                torch.zeros(batch_size, dtype=torch.long), cache, cache.clone())

    def io_specs(self, batch_size: int, capacity: int) -> tuple[list[TensorSpec], list[TensorSpec]]:
        """The graph's inputs and outputs as the manifest records them."""
        cfg, L = self.model.config, self.spec.block_length
        dt = DTYPE_NAMES[self.model.dtype]
        cache = self.cache_shape(batch_size, capacity)
        present = [*cache[:3], L, cache[4]]
        inputs = [TensorSpec("input_ids", [batch_size, L], "int64"), TensorSpec("cache_len", [], "int64"),
                  TensorSpec("row_start", [batch_size], "int64"), TensorSpec("cache_k", cache, dt),
                  TensorSpec("cache_v", cache, dt)]
        logits = TensorSpec("logits", [batch_size, L, cfg.vocab_size], "float32")
        if self.spec.writes_cache:
            return inputs, [logits, TensorSpec("present_k", present, dt), TensorSpec("present_v", present, dt)]
        return inputs, [logits, TensorSpec("candidate", [batch_size, L], "int64"),
                        TensorSpec("confidence", [batch_size, L], "float32")]



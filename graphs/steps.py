"""Steps as data: what one exported graph computes, and the one function that lowers it.

A :class:`StepSpec` names a step kind and holds its token :class:`Layout`
(nemocompile/model/layout.py: the spine written to the cache, the branches
that draft, positions relative to ``cache_len``, the attention rule, the rows
with the drafter LoRA) and what it returns. A :class:`Fuse` asks
passes/fuse_draft_verify.py for one forward doing a causal step's work and a
draft's at once; the pass turns it into a plain StepSpec before lowering.
:class:`StepModule` is the lowering: ``model.step`` with the layout fixed.

The graph's I/O follow the manifest contract (nemocompile/manifest.py): inputs
``input_ids, cache_len, row_start, cache_k, cache_v``; outputs ``candidate``
and ``confidence`` (every token's argmax and its softmax probability, so a
greedy runtime never reads vocabulary-sized tensors), ``logits`` only when the
spec keeps them (sampling), and the spine's ``present_k, present_v`` rows for
steps that write the cache. The cache inputs are only read: the runtime places
the present rows at ``cache_len`` itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from nemocompile.manifest import TensorSpec
from nemocompile.model import TriModeModel
from nemocompile.model.layout import Branch, Layout
from nemocompile.model.modeling import greedy_candidates

INPUT_NAMES = ("input_ids", "cache_len", "row_start", "cache_k", "cache_v")
DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


@dataclass(frozen=True)
class StepSpec:
    """What one graph is: a step kind, its token layout, and whether it returns full logits."""

    step: str  # a manifest.STEP_KINDS key
    layout: Layout
    logits: bool = True  # full logits [B, T, V] too (needed to sample); False: ids and confidences only

    @classmethod
    def causal(cls, step: str, length: int) -> "StepSpec":
        return cls(step, Layout.causal(length))

    @classmethod
    def bidirectional(cls, step: str, length: int, lora: bool = False, source: str = "input") -> "StepSpec":
        return cls(step, Layout.bidirectional(length, lora=lora, source=source))

    @property
    def block_length(self) -> int:
        """Tokens the graph reads from ``input_ids`` (its key in the manifest)."""
        return self.layout.input_length

    @property
    def pattern(self) -> str:
        return self.layout.pattern

    @property
    def writes_cache(self) -> bool:
        return self.layout.writes_cache

    @property
    def lora(self) -> bool:
        return self.layout.lora != "none"

    @property
    def output_names(self) -> tuple[str, ...]:
        return (("logits",) if self.logits else ()) + ("candidate", "confidence") + (
            ("present_k", "present_v") if self.writes_cache else ())


@dataclass(frozen=True)
class Fuse:
    """A request for ``passes/fuse_draft_verify``: one forward that runs ``causal``
    (a spine) and ``draft`` (a branch of masks) after each spine token ("each":
    the quadratic step, spec 3.4) or after the last one only ("last": the prefill
    that also drafts the first block)."""

    step: str
    causal: StepSpec
    draft: StepSpec
    anchors: str  # "each" | "last"
    groups: int | None = None  # "each": only the first ``groups`` spine tokens get a draft (None: all)


class StepModule(nn.Module):
    """``forward(input_ids, cache_len, row_start, cache_k, cache_v)`` -> the spec's outputs."""

    def __init__(self, model: TriModeModel, spec: StepSpec):
        super().__init__()
        if spec.lora and not model.has_lora:
            raise ValueError(f"{spec.step}: LoRA requested but the model has no drafter adapter")
        self.model = model
        self.spec = spec

    def forward(
        self,
        input_ids: torch.Tensor,  # [B, L] int64, L = layout.input_length
        cache_len: torch.Tensor,  # [B] int64: each row's committed slots
        row_start: torch.Tensor,  # [B] int64
        cache_k: torch.Tensor,  # [layers, B, kv_heads, C, head_dim]
        cache_v: torch.Tensor,  # [layers, B, kv_heads, C, head_dim]
    ) -> tuple[torch.Tensor, ...]:
        logits, k, v = self.model.step(input_ids, cache_k, cache_v, cache_len, row_start, layout=self.spec.layout)
        logits = logits.float()  # [B, T, V]: float32 whatever the weights' dtype
        out = (logits,) if self.spec.logits else ()
        out += greedy_candidates(logits)
        if self.spec.writes_cache:
            out += (k, v)
        return out

    # ---- static shapes -----------------------------------------------------
    def cache_shape(self, batch_size: int, capacity: int) -> list[int]:
        cfg = self.model.config
        return [cfg.num_hidden_layers, batch_size, cfg.num_key_value_heads, capacity, cfg.head_dim]

    def example_inputs(self, batch_size: int, capacity: int) -> tuple[torch.Tensor, ...]:
        """Inputs with the export-time shapes (values are irrelevant: shapes are static)."""
        L, dtype = self.spec.block_length, self.model.dtype
        cache = torch.zeros(self.cache_shape(batch_size, capacity), dtype=dtype)
        return (torch.zeros(batch_size, L, dtype=torch.long), torch.zeros(batch_size, dtype=torch.long),
                torch.zeros(batch_size, dtype=torch.long), cache, cache.clone())

    def io_specs(self, batch_size: int, capacity: int) -> tuple[list[TensorSpec], list[TensorSpec]]:
        """The graph's inputs and outputs as the manifest records them."""
        cfg, layout = self.model.config, self.spec.layout
        dt = DTYPE_NAMES[self.model.dtype]
        cache = self.cache_shape(batch_size, capacity)
        inputs = [TensorSpec("input_ids", [batch_size, layout.input_length], "int64"),
                  TensorSpec("cache_len", [batch_size], "int64"), TensorSpec("row_start", [batch_size], "int64"),
                  TensorSpec("cache_k", cache, dt), TensorSpec("cache_v", cache, dt)]
        T = layout.tokens
        shapes = {"logits": ([batch_size, T, cfg.vocab_size], "float32"), "candidate": ([batch_size, T], "int64"),
                  "confidence": ([batch_size, T], "float32"),
                  "present_k": ([*cache[:3], layout.spine, cache[4]], dt),
                  "present_v": ([*cache[:3], layout.spine, cache[4]], dt)}
        return inputs, [TensorSpec(n, *shapes[n]) for n in self.spec.output_names]


__all__ = ["Branch", "Fuse", "INPUT_NAMES", "Layout", "StepModule", "StepSpec"]

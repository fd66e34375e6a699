"""Steps as data: what one exported graph computes, and the one function that lowers it.

A :class:`StepSpec` names a step kind and holds its token :class:`Layout`
(nemocompile/model/layout.py: the spine written to the cache, the branches
that draft, positions relative to ``cache_len``, the attention rule, the rows
with the drafter LoRA) and what it returns. A :class:`Fuse` asks
passes/fuse_draft_verify.py for one forward doing a causal step's work and a
draft's at once; the pass turns it into a plain StepSpec before lowering.
:class:`StepModule` is the lowering: ``model.step`` with the layout fixed.

The graph's I/O follow the manifest contract (nemocompile/artifact/manifest.py): inputs
``input_ids, cache_len, row_start, rows`` for the b rows of one forward (b runs
from 1 to the artifact's batch: the batch dimension is dynamic), ``slots`` (the
n cache slots the forward reads, 0 .. n-1, n >= its longest row) and the whole
static cache ``cache_k, cache_v``; outputs ``candidate`` and ``confidence``
(every token's argmax and its softmax probability, so a greedy runtime never
reads vocabulary-sized tensors), ``logits`` only when the spec keeps them
(sampling), and the spine's ``present_k, present_v`` rows for steps that write
the cache. The cache inputs are only read, and only where they are used: each
forward gathers the ``slots`` of its own rows (``read_cache``), so its cost
follows the rows in flight and their lengths, never the capacity or the idle
rows. Both dynamic dimensions come from input shapes (never from data), so
TensorRT takes them as optimization-profile ranges. The runtime places the present rows at ``cache_len`` itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nemocompile.artifact.manifest import TensorSpec
from nemocompile.model import TriModeModel
from nemocompile.model.layout import Branch, Layout
from nemocompile.model.modeling import TOP_LOGPROBS, greedy_candidates, token_logprobs

INPUT_NAMES = ("input_ids", "cache_len", "row_start", "rows", "slots", "cache_k", "cache_v")
# inputs and outputs whose first dimension is the forward's rows (dynamic, 1 .. batch size); the cache is static
BATCH_NAMES = ("input_ids", "cache_len", "row_start", "rows", "logits", "candidate", "confidence", "top_logprobs",
               "top_ids", "next_logprob", "present_k", "present_v")
# tensor -> the name of its dynamic first dimension (the manifest records its largest size)
DYNAMIC_DIMS = {**{name: "batch" for name in BATCH_NAMES}, "slots": "slots"}
DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


@dataclass(frozen=True)
class StepSpec:
    """What one graph is: a step kind, its token layout, and whether it returns full logits."""

    step: str  # a manifest.STEP_KINDS key
    layout: Layout
    # full logits [B, T, V] too (needed to sample); "spine": the spine rows' only [B, spine, V] (a fused
    # step samples its verify, never its branches); False: ids and confidences only
    logits: bool | str = True
    # top-20 log-probs and ids [B, S, 20] of the S = spine (else all) positions and each input token's
    # log-prob given the tokens before it [B, L]: what an OpenAI client's logprobs/echo read, on the device
    logprobs: bool = False

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
            ("top_logprobs", "top_ids", "next_logprob") if self.logprobs else ()) + (
            ("present_k", "present_v") if self.writes_cache else ())

    @property
    def scored_positions(self) -> int:
        """Positions ``top_logprobs`` covers: the spine (a fused step's branches only draft), else every token."""
        return self.layout.spine or self.layout.tokens


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
    """``forward(input_ids, cache_len, row_start, rows, slots, cache_k, cache_v)`` -> the spec's outputs."""

    def __init__(self, model: TriModeModel, spec: StepSpec):
        super().__init__()
        if spec.lora and not model.has_lora:
            raise ValueError(f"{spec.step}: LoRA requested but the model has no drafter adapter")
        self.model = model
        self.spec = spec

    def forward(
        self,
        input_ids: torch.Tensor,  # [b, L] int64, L = layout.input_length
        cache_len: torch.Tensor,  # [b] int64: each row's committed slots
        row_start: torch.Tensor,  # [b] int64
        rows: torch.Tensor,  # [b] int64: the cache row each batch entry reads
        slots: torch.Tensor,  # [n] int64: 0 .. n-1, the slots read (n >= max(cache_len))
        cache_k: torch.Tensor,  # [layers, N, kv_heads, C, head_dim], N = the artifact's batch
        cache_v: torch.Tensor,  # [layers, N, kv_heads, C, head_dim]
    ) -> tuple[torch.Tensor, ...]:
        used = read_cache(cache_k, cache_v, rows, slots)
        logits, k, v = self.model.step(input_ids, *used, cache_len, row_start, layout=self.spec.layout)
        logits = logits.float()  # [b, T, V]: float32 whatever the weights' dtype
        out = ((logits[:, : self.spec.layout.spine] if self.spec.logits == "spine" else logits,)
               if self.spec.logits else ())
        out += greedy_candidates(logits)
        if self.spec.logprobs:
            out += token_logprobs(logits[:, :self.spec.scored_positions], input_ids)
        if self.spec.writes_cache:
            out += (k.transpose(0, 1), v.transpose(0, 1))  # batch first: b rows are a prefix of the buffer
        return out

    # ---- static shapes -----------------------------------------------------
    def cache_shape(self, batch_size: int, capacity: int) -> list[int]:
        cfg = self.model.config
        return [cfg.num_hidden_layers, batch_size, cfg.num_key_value_heads, capacity, cfg.head_dim]

    def example_inputs(self, batch_size: int, capacity: int) -> tuple[torch.Tensor, ...]:
        """Inputs to trace with: the static cache, 2 rows (1 for a batch-1 artifact) reading 2 slots
        (1 at capacity 1): sizes above 1, so the exporter keeps both dimensions dynamic."""
        L, dtype = self.spec.block_length, self.model.dtype
        cache = torch.zeros(self.cache_shape(batch_size, capacity), dtype=dtype)
        b, n = min(batch_size, 2), min(capacity, 2)
        return (torch.zeros(b, L, dtype=torch.long), torch.full((b,), n, dtype=torch.long),
                torch.zeros(b, dtype=torch.long), torch.arange(b, dtype=torch.long),
                torch.arange(n, dtype=torch.long), cache, cache.clone())

    def dynamic_shapes(self, batch_size: int, capacity: int):
        """torch.export's dynamic dimensions: the forward's rows (1 .. batch_size) and the slots it
        reads (1 .. capacity); a dimension whose range is one value stays static."""
        rows = torch.export.Dim("batch", min=1, max=batch_size) if batch_size > 1 else None
        slots = torch.export.Dim("slots", min=1, max=capacity) if capacity > 1 else None
        batch = {0: rows} if rows is not None else None
        return (batch, batch, batch, batch, {0: slots} if slots is not None else None, None, None)

    def io_specs(self, batch_size: int, capacity: int) -> tuple[list[TensorSpec], list[TensorSpec]]:
        """The graph's inputs and outputs as the manifest records them."""
        cfg, layout = self.model.config, self.spec.layout
        dt = DTYPE_NAMES[self.model.dtype]
        cache = self.cache_shape(batch_size, capacity)
        inputs = [TensorSpec("input_ids", [batch_size, layout.input_length], "int64"),
                  TensorSpec("cache_len", [batch_size], "int64"), TensorSpec("row_start", [batch_size], "int64"),
                  TensorSpec("rows", [batch_size], "int64"), TensorSpec("slots", [capacity], "int64"),
                  TensorSpec("cache_k", cache, dt), TensorSpec("cache_v", cache, dt)]
        T, K = layout.tokens, min(TOP_LOGPROBS, cfg.vocab_size)
        rows = layout.spine if self.spec.logits == "spine" else T
        shapes = {"logits": ([batch_size, rows, cfg.vocab_size], "float32"), "candidate": ([batch_size, T], "int64"),
                  "confidence": ([batch_size, T], "float32"),
                  "top_logprobs": ([batch_size, self.spec.scored_positions, K], "float32"),
                  "top_ids": ([batch_size, self.spec.scored_positions, K], "int64"),
                  "next_logprob": ([batch_size, layout.input_length], "float32"),
                  "present_k": ([batch_size, cache[0], cache[2], layout.spine, cache[4]], dt),
                  "present_v": ([batch_size, cache[0], cache[2], layout.spine, cache[4]], dt)}
        return inputs, [TensorSpec(n, *shapes[n]) for n in self.spec.output_names]


def read_cache(cache_k: torch.Tensor, cache_v: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor
               ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The slots a forward reads: for each layer, keys and values [b, kv_heads, n, head_dim] of
    cache rows ``rows`` [b] at ``slots`` [n] (0 .. n-1, n at least the forward's longest row; a
    shorter row's slots past its own length are masked by ``TriModeModel.step``).

    One Gather per layer and tensor over the flattened cache, with indices built from ``rows``
    and ``slots``, copies exactly the used slots: a Slice of the stacked cache per layer would
    copy the whole layer first, and a gather of whole rows their whole capacity."""
    layers, N, KV, C, D = cache_k.shape
    heads = torch.arange(KV, dtype=torch.long, device=rows.device)
    index = (rows[:, None, None] * KV + heads[None, :, None]) * C + slots[None, None, :]  # [b, KV, n]
    stride = N * KV * C
    flat_k, flat_v = cache_k.reshape(layers * stride, D), cache_v.reshape(layers * stride, D)
    # embedding is a Gather on axis 0 with a [b, KV, n] index: [b, KV, n, D] in one node, no reshapes
    keys = [F.embedding(index + i * stride, flat_k) for i in range(layers)]
    values = [F.embedding(index + i * stride, flat_v) for i in range(layers)]
    return keys, values


__all__ = ["BATCH_NAMES", "Branch", "DYNAMIC_DIMS", "Fuse", "INPUT_NAMES", "Layout", "StepModule", "StepSpec", "read_cache"]

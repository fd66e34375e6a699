"""The tri-mode network (spec section 2) in plain PyTorch.

One pure function, :meth:`TriModeModel.step`, runs a block of tokens against a
KV cache under one attention pattern and returns the block's logits and its new
key/value rows. The eager decoders call it through :class:`KVCache`, and the
graph exporter traces it with static shapes: both paths run the same code.

Attention over the cache and over the block are computed as two score
matrices joined before the softmax, so a step never concatenates (copies) the
cache; the mask is built inside from ``cache_len`` and the static shapes.
"""

from __future__ import annotations

import math
from typing import Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nemocompile.model.config import ModelConfig, RopeConfig
from .cache import KVCache
from .layout import Layout, full_input

Pattern = Literal["causal", "bidirectional"]
# A cache as the layers read it: [layers, B, kv_heads, C, head_dim] stacked, or one [B, kv_heads, C, head_dim]
# tensor per layer (an exported graph gathers each layer's used slots on its own: no stacked copy)
CacheLayers = torch.Tensor | Sequence[torch.Tensor]
PATTERNS = ("causal", "bidirectional")


def greedy_candidates(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per position the argmax [B, L] (int64) and its softmax probability [B, L] (float32)."""
    logits = logits.float()
    top = logits.max(dim=-1, keepdim=True).values
    return logits.argmax(dim=-1), 1.0 / torch.exp(logits - top).sum(dim=-1)


TOP_LOGPROBS = 20  # alternatives per position the graphs return (OpenAI's top_logprobs limit)


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, k: int = TOP_LOGPROBS
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probabilities without vocabulary-sized outputs: per position of ``logits`` [B, T, V]
    the ``k`` best log-probs (log-softmax at temperature 1) [B, T, k] float32 and their ids
    [B, T, k] int64, and per input position j < L-1 the log-prob of input token j+1
    [B, L] float32 (the last 0: its next token is not in the input). All three read one
    log-softmax tensor, so a token's value is the same float wherever it appears."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    top, ids = lp.topk(min(k, lp.shape[-1]), dim=-1)
    L = input_ids.shape[1]
    if L == 1:
        return top, ids, (input_ids * 0).float()  # from the input, not a constant: an output can't be one
    nxt = lp[:, :L - 1].gather(-1, input_ids[:, 1:, None])[..., 0]  # [B, L-1]
    return top, ids, F.pad(nxt, (0, 1))


# ----------------------------------------------------------------------------
# Rotary embeddings: YaRN frequencies and the llama-4 query scaling
# ----------------------------------------------------------------------------
def yarn_inv_freq(rope: RopeConfig, head_dim: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [head_dim/2] and the cos/sin attention factor (transformers' YaRN)."""
    base, dim = rope.rope_theta, head_dim
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    if rope.rope_type == "default":
        return 1.0 / pos_freqs, 1.0

    def get_mscale(scale: float, mscale: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    factor = rope.factor
    if rope.mscale and rope.mscale_all_dim:
        attention_factor = get_mscale(factor, rope.mscale) / get_mscale(factor, rope.mscale_all_dim)
    else:
        attention_factor = get_mscale(factor)

    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(rope.original_max_position_embeddings / (num_rotations * 2 * math.pi))) / (
            2 * math.log(base)
        )

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attention_factor)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class LoRA(nn.Module):
    """A PEFT-style low-rank delta ``scale * B(A(x))`` on one projection.

    As PEFT runs it: the weights stay fp32 whatever the model's dtype (PEFT's
    ``autocast_adapter_dtype``), the input is cast to fp32, and the delta is added
    to the base output in fp32 before casting the sum back (:meth:`add_to`).
    """

    def __init__(self, in_features: int, out_features: int, rank: int, scale: float):
        super().__init__()
        self.lora_A = nn.Linear(in_features, rank, bias=False)  # weight [r, in], fp32
        self.lora_B = nn.Linear(rank, out_features, bias=False)  # weight [out, r], fp32
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The delta [B, L, out] in the adapter's dtype for the projection's input x [B, L, in]."""
        return self.lora_B(self.lora_A(x.to(self.lora_A.weight.dtype))) * self.scale

    def add_to(self, base: torch.Tensor, x: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """``base`` [B, L, out] (the projection's output) plus the delta, summed in fp32, in base's
        dtype; ``rows`` [L] bool: only on those rows (a fused step's draft branches)."""
        delta = self(x)
        if rows is not None:
            delta = delta * rows[None, :, None].to(delta.dtype)
        return (base.to(self.lora_A.weight.dtype) + delta).to(base.dtype)

    def _apply(self, fn, recurse=True):
        # model.to(bf16) / .half() must not round the adapter (it never drops below fp32): apply
        # only the device move
        probe = fn(torch.zeros(1))
        if probe.dtype in (torch.float16, torch.bfloat16):
            device = probe.device
            return super()._apply(lambda t: t.to(device), recurse)
        return super()._apply(fn, recurse)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        h, d = config.hidden_size, config.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, d
        self.q_proj = nn.Linear(h, self.num_heads * d, bias=False)
        self.k_proj = nn.Linear(h, self.num_kv_heads * d, bias=False)
        self.v_proj = nn.Linear(h, self.num_kv_heads * d, bias=False)
        self.o_proj = nn.Linear(self.num_heads * d, h, bias=False)
        self.o_lora: LoRA | None = None  # the drafter adapter, attached by the loader

    def forward(
        self,
        x: torch.Tensor,  # [B, L, hidden]
        cos: torch.Tensor,  # [B, L, head_dim]
        sin: torch.Tensor,  # [B, L, head_dim]
        qscale: torch.Tensor,  # [B, L] llama-4 query scaling
        block_mask: torch.Tensor,  # [B, L, L] bool, True = may attend
        cache_k: torch.Tensor | None,  # [B, kv_heads, C, head_dim]
        cache_v: torch.Tensor | None,  # [B, kv_heads, C, head_dim]
        cache_mask: torch.Tensor | None,  # [B, C] bool
        lora: bool | torch.Tensor,  # True: every row; a [L] bool tensor: those rows
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, L, _ = x.shape
        H, KV, D = self.num_heads, self.num_kv_heads, self.head_dim
        G = H // KV
        q = self.q_proj(x).view(B, L, H, D).transpose(1, 2)
        k = self.k_proj(x).view(B, L, KV, D).transpose(1, 2)
        v = self.v_proj(x).view(B, L, KV, D).transpose(1, 2)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        q = q * qscale[:, None, :, None].to(q.dtype)

        # Grouped-query attention without repeating K/V: fold the G query heads
        # of each KV head into the row dimension.
        qg = q.reshape(B, KV, G * L, D)
        scale = 1.0 / math.sqrt(D)
        scores = [torch.matmul(qg, k.transpose(-1, -2)).view(B, KV, G, L, L)]
        masks = [block_mask]
        if cache_k is not None:
            scores.insert(0, torch.matmul(qg, cache_k.transpose(-1, -2)).view(B, KV, G, L, -1))
            masks.insert(0, cache_mask[:, None, :].expand(B, L, -1))
        s = torch.cat(scores, dim=-1).float() * scale  # [B, KV, G, L, C + L]
        m = torch.cat(masks, dim=-1)[:, None, None]  # [B, 1, 1, L, C + L]
        p = torch.softmax(s.masked_fill(~m, float("-inf")), dim=-1).to(q.dtype)
        C = 0 if cache_k is None else cache_k.shape[2]
        out = torch.matmul(p[..., C:].reshape(B, KV, G * L, L), v)
        if cache_k is not None:
            out = out + torch.matmul(p[..., :C].reshape(B, KV, G * L, C), cache_v)
        out = out.view(B, H, L, D).transpose(1, 2).reshape(B, L, H * D)
        o = self.o_proj(out)
        if self.o_lora is not None and (torch.is_tensor(lora) or lora):
            o = self.o_lora.add_to(o, out, rows=lora if torch.is_tensor(lora) else None)
        return o, k, v


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)


class Encoder(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class TriModeModel(nn.Module):
    """Embedding, decoder layers, final norm and the untied ``diffusion_head``.

    Parameter names match the checkpoint layout (``encoder.layers.{i}...``).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.diffusion_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        inv_freq, attention_factor = yarn_inv_freq(config.rope, config.head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.attention_factor = attention_factor
        self.tokenizer = None  # set by the loader
        self.source: str | None = None  # checkpoint directory, set by the loader
        # load(lazy=True): the parameters are fake and this reads each from the checkpoint (export only)
        self.weight_source = None

    # ---- properties --------------------------------------------------------
    @property
    def has_lora(self) -> bool:
        return self.encoder.layers[0].self_attn.o_lora is not None

    @property
    def dtype(self) -> torch.dtype:
        return self.diffusion_head.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.diffusion_head.weight.device

    # ---- building blocks ---------------------------------------------------
    def rotary(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """cos, sin [B, L, head_dim] and the llama-4 query scale [B, L] for positions [B, L]."""
        freqs = positions[..., None].float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * self.attention_factor).to(dtype)
        sin = (emb.sin() * self.attention_factor).to(dtype)
        rope = self.config.rope
        qscale = 1 + rope.llama_4_scaling_beta * torch.log(
            1 + torch.floor(positions.float() / rope.original_max_position_embeddings)
        )
        return cos, sin, qscale

    def run_layers(
        self,
        input_ids: torch.Tensor,  # [B, L]
        positions: torch.Tensor,  # [B, L]
        block_mask: torch.Tensor,  # [B, L, L] bool
        cache_k: CacheLayers | None = None,  # per layer [B, kv_heads, C, head_dim]
        cache_v: CacheLayers | None = None,
        cache_mask: torch.Tensor | None = None,  # [B, C] bool
        lora: bool | torch.Tensor = False,  # True: every row; a [L] bool tensor: those rows
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Logits [B, L, V] and the block's keys/values [layers, B, kv_heads, L, head_dim]."""
        h = self.encoder.embed_tokens(input_ids)
        cos, sin, qscale = self.rotary(positions, h.dtype)
        new_k, new_v = [], []
        for i, layer in enumerate(self.encoder.layers):
            ck = None if cache_k is None else cache_k[i]
            cv = None if cache_v is None else cache_v[i]
            a, k, v = layer.self_attn(
                layer.input_layernorm(h), cos, sin, qscale, block_mask, ck, cv, cache_mask, lora
            )
            h = h + a
            h = h + layer.mlp(layer.post_attention_layernorm(h))
            new_k.append(k)
            new_v.append(v)
        logits = self.diffusion_head(self.encoder.norm(h))
        return logits, torch.stack(new_k), torch.stack(new_v)

    def step(
        self,
        input_ids: torch.Tensor,  # [B, layout.input_length]
        cache_k: CacheLayers | None,  # per layer [B, kv_heads, C, head_dim]: a stacked tensor or a list
        cache_v: CacheLayers | None,
        cache_len: torch.Tensor | int,  # committed slots, [] or per row [B]; positions count from here
        row_start: torch.Tensor | None = None,  # [B] first real slot per row (left padding)
        *,
        pattern: Pattern | None = None,
        lora: bool = False,
        layout: Layout | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Run one forward of ``layout`` (see layout.py) against the cache. Returns
        logits [B, T, V] and the spine's new_k, new_v [layers, B, kv_heads, spine, head_dim].
        The cache itself is never modified.

        ``pattern`` (with ``lora``) is shorthand for the two basic layouts: "causal"
        (a spine of L tokens) and "bidirectional" (one branch of L input tokens).
        ``C`` (the cache tensors' slot count) may exceed ``cache_len``: slots at
        or beyond ``cache_len`` are masked. The caller decides how much of the cache
        a step reads: an exported graph gathers only the slots below the longest
        row's ``cache_len`` (graphs/steps.py), the eager cache passes its valid
        prefix, and work follows what is used, never the capacity.
        """
        B, n_in = input_ids.shape
        if layout is None:
            if pattern not in PATTERNS:
                raise ValueError(f"unknown attention pattern {pattern!r}; expected one of {PATTERNS}")
            layout = Layout.causal(n_in) if pattern == "causal" else Layout.bidirectional(n_in, lora=lora)
        if n_in != layout.input_length:
            raise ValueError(f"input_ids has {n_in} tokens but the layout reads {layout.input_length}")
        device = input_ids.device
        if row_start is None:
            row_start = torch.zeros(B, dtype=torch.long, device=device)
        if not torch.is_tensor(cache_len):
            cache_len = torch.tensor(cache_len, dtype=torch.long, device=device)
        cache_len = cache_len.reshape(-1, 1)  # [B or 1, 1]: every row has its own committed length
        ids = full_input(layout, input_ids, self.config.mask_token_id)  # [B, T]
        T = ids.shape[1]
        slots = cache_len + torch.tensor(layout.offsets(), dtype=torch.long, device=device)[None, :]  # [B, T]
        positions = (slots - row_start[:, None]).clamp(min=0)  # [B, T]
        # The attention rule among the forward's tokens (Layout.groups: a spine key k is seen by
        # queries whose reach is >= k, a branch key by its own branch) is a constant of the static
        # layout: one boolean initializer in an exported graph, which TensorRT parses whatever the
        # layout (the integer compares it replaced were narrowed to UINT16, which it does not take).
        allowed = torch.tensor(layout.allowed(), dtype=torch.bool, device=device)  # [T(query), T(key)]
        key_real = slots >= row_start[:, None]  # [B, T]
        # A padding query attends to itself only, so no softmax row is empty.
        itself = torch.from_numpy(np.eye(T, dtype=bool)).to(device)  # a constant too (torch.eye exports as compares)
        block_mask = (allowed[None] & key_real[:, None, :]) | itself[None]
        cache_mask = None
        if cache_k is not None:
            cslots = torch.arange(cache_k[0].shape[2], device=device)  # [C]
            cache_mask = (cslots[None, :] < cache_len) & (cslots[None, :] >= row_start[:, None])  # [B, C]
        rows = layout.lora
        lora_rows: bool | torch.Tensor = rows == "all" or (
            torch.tensor(layout.lora_rows(), device=device) if rows == "branches" else False)
        logits, k, v = self.run_layers(ids, positions, block_mask, cache_k, cache_v, cache_mask, lora_rows)
        if layout.spine < T:
            k, v = k[:, :, :, :layout.spine], v[:, :, :, :layout.spine]
        return logits, k, v

    # ---- convenience -------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,  # [B, L]
        pattern: Pattern = "causal",
        cache: KVCache | None = None,
        write: bool | None = None,
        lora: bool = False,
    ) -> torch.Tensor:
        """Logits [B, L, V] for a block; with a cache, attends to it and (by
        default for the causal pattern) writes the block into it."""
        if cache is None:
            logits, _, _ = self.step(input_ids, None, None, 0, pattern=pattern, lora=lora)
            return logits
        if write is None:
            write = pattern == "causal"
        logits, k, v = self.step(
            input_ids, cache.keys(), cache.values(), cache.length, cache.row_start, pattern=pattern, lora=lora
        )
        if write:
            cache.write(k, v)
        return logits

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        return KVCache(self.config, batch_size, max_len, dtype=self.dtype, device=self.device)

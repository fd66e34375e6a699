"""The network against independent references: transformers' Ministral3Model for
the causal pattern, a plain full-attention implementation for the bidirectional one."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from nemocompile.model.config import RopeConfig
from nemocompile.model.loader import load, save
from nemocompile.model.modeling import rotate_half

from conftest import TOLERANCE, make_config, make_model

FP32 = TOLERANCE[torch.float32]


def assert_close(a: torch.Tensor, b: torch.Tensor, tol: float, what: str) -> None:
    diff = (a.float() - b.float()).abs()
    where = tuple(int(i) for i in torch.nonzero(diff == diff.max())[0])
    assert diff.max() <= tol, f"{what}: max |diff| {diff.max():.3g} > {tol} at {where}"


@pytest.mark.parametrize("rope_type", ["yarn", "default"])
def test_causal_matches_transformers_ministral3(tmp_path, rope_type):
    transformers = pytest.importorskip("transformers", minversion="5")
    rope = dict(rope_type=rope_type, rope_theta=1e6, factor=16.0, original_max_position_embeddings=32,
                beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0, llama_4_scaling_beta=0.1)
    hf_config = transformers.Ministral3Config(
        vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5, max_position_embeddings=4096,
        rope_parameters=rope, sliding_window=None,
    )
    hf_config._attn_implementation = "eager"
    torch.manual_seed(0)
    hf = transformers.Ministral3Model(hf_config).eval()
    with torch.no_grad():  # non-trivial norm weights so a wrong norm would show
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)

    # save it under the spec's checkpoint names and load it back through nemocompile
    config = make_config(vocab_size=300, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, rope=RopeConfig(**rope))
    ours = make_model(config)
    ours.load_state_dict({**{f"encoder.{k}": v for k, v in hf.state_dict().items()},
                          "diffusion_head.weight": torch.randn(300, 64)})
    save(ours, tmp_path / "ckpt")
    model = load(tmp_path / "ckpt")

    # 200 positions: well past original_max_position_embeddings (32), so YaRN's
    # interpolated frequencies and the llama-4 query scaling (floor(pos/32) up to 6) matter
    ids = torch.randint(0, 300, (2, 200))
    with torch.no_grad():
        hidden = hf(ids).last_hidden_state
        logits = model(ids, pattern="causal")
        assert_close(logits, F.linear(hidden, model.diffusion_head.weight), FP32, "logits vs transformers")
        # the same through the cache, in three uneven chunks
        cache = model.new_cache(2, 256)
        chunks = [model(ids[:, a:b], cache=cache) for a, b in ((0, 37), (37, 38), (38, 200))]
        assert cache.length == 200
        assert_close(torch.cat(chunks, 1), logits, FP32, "chunked causal vs one shot")


def reference_bidirectional(model, ids: torch.Tensor, prefix: int) -> torch.Tensor:
    """Straightforward full attention: tokens < prefix causal (the committed context),
    tokens >= prefix see every context token and every block token."""
    cfg = model.config
    B, T = ids.shape
    pos = torch.arange(T)
    allowed = (pos[None, :] <= pos[:, None]) | ((pos[:, None] >= prefix) & (pos[None, :] >= prefix))
    h = model.encoder.embed_tokens(ids)
    freqs = pos[:, None].float() * model.inv_freq
    emb = torch.cat([freqs, freqs], -1)
    cos, sin = emb.cos() * model.attention_factor, emb.sin() * model.attention_factor
    qscale = 1 + cfg.rope.llama_4_scaling_beta * torch.log(
        1 + torch.floor(pos.float() / cfg.rope.original_max_position_embeddings))
    for layer in model.encoder.layers:
        at = layer.self_attn
        x = layer.input_layernorm(h)
        q = at.q_proj(x).view(B, T, -1, cfg.head_dim).transpose(1, 2)
        k = at.k_proj(x).view(B, T, -1, cfg.head_dim).transpose(1, 2)
        v = at.v_proj(x).view(B, T, -1, cfg.head_dim).transpose(1, 2)
        q = (q * cos + rotate_half(q) * sin) * qscale[None, None, :, None]
        k = k * cos + rotate_half(k) * sin
        k = k.repeat_interleave(cfg.kv_groups, 1)
        v = v.repeat_interleave(cfg.kv_groups, 1)
        s = (q @ k.transpose(-1, -2)) / math.sqrt(cfg.head_dim)
        a = torch.softmax(s.masked_fill(~allowed, float("-inf")), -1) @ v
        h = h + at.o_proj(a.transpose(1, 2).reshape(B, T, -1))
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    return model.diffusion_head(model.encoder.norm(h))


def test_bidirectional_block_against_full_attention(tiny_model):
    ids = torch.randint(0, 96, (2, 40))  # 40 positions > original max 16: llama-4 scaling active
    prefix = 29
    with torch.no_grad():
        ref = reference_bidirectional(tiny_model, ids, prefix)
        cache = tiny_model.new_cache(2, 64)
        tiny_model(ids[:, :prefix], cache=cache)
        block = tiny_model(ids[:, prefix:], pattern="bidirectional", cache=cache)
        assert_close(block, ref[:, prefix:], FP32, "bidirectional block")
        assert cache.length == prefix, "a bidirectional forward must not write the cache"
        # the whole sequence bidirectional with no cache equals prefix=0
        assert_close(tiny_model(ids, pattern="bidirectional"), reference_bidirectional(tiny_model, ids, 0),
                     FP32, "bidirectional without cache")


def test_cache_write_no_write_and_rollback(tiny_model):
    ids = torch.randint(0, 96, (1, 24))
    with torch.no_grad():
        full = tiny_model(ids)
        cache = tiny_model.new_cache(1, 32)
        tiny_model(ids[:, :10], cache=cache)
        snapshot = cache.data.clone()
        tiny_model(ids[:, 10:18], pattern="causal", cache=cache, write=False)
        assert cache.length == 10 and torch.equal(cache.data, snapshot)
        # write 8 speculative rows, then roll back 5 of them: O(1), no data moves
        tiny_model(torch.randint(0, 96, (1, 8)), cache=cache)
        assert cache.length == 18
        cache.crop(13)
        assert cache.length == 13
        # rows 10..12 hold the wrong tokens: recompute from 10 after cropping there
        cache.crop(10)
        rest = tiny_model(ids[:, 10:], cache=cache)
        assert_close(rest, full[:, 10:], FP32, "after rollback")
        with pytest.raises(ValueError):
            cache.crop(25)


def test_left_padded_batch_matches_single_rows(tiny_model):
    a, b = [5, 6, 7, 8, 9, 10, 11], [40, 41, 42]
    from nemocompile.decode.common import prefill

    with torch.no_grad():
        cache, last = prefill(tiny_model, [a, b], 32)
        for row, p in enumerate((a, b)):
            single = tiny_model(torch.tensor([p]))[0, -1]
            assert_close(last[row], single, FP32, f"row {row} prefill")
        # one more causal step and one bidirectional block keep agreeing
        nxt = torch.tensor([[12], [43]])
        step = tiny_model(nxt, cache=cache)
        blk = torch.tensor([[13, 3, 3], [44, 3, 3]])
        bid = tiny_model(blk, pattern="bidirectional", cache=cache)
        for row, p in enumerate((a, b)):
            c1 = tiny_model.new_cache(1, 32)
            tiny_model(torch.tensor([p]), cache=c1)
            assert_close(step[row], tiny_model(nxt[row:row + 1], cache=c1)[0], FP32, f"row {row} step")
            assert_close(bid[row], tiny_model(blk[row:row + 1], pattern="bidirectional", cache=c1)[0],
                         FP32, f"row {row} block")


def test_rows_at_their_own_cache_lengths_match_single_rows(tiny_model):
    """cache_len per row ([B], continuous batching): each row attends to its own slots only
    (the slots past its length hold another sequence's keys) and counts positions from them."""
    a, b = [5, 6, 7, 8, 9, 10, 11], [40, 41, 42]
    C = 32
    with torch.no_grad():
        ck = torch.zeros(tiny_model.config.num_hidden_layers, 2, tiny_model.config.num_key_value_heads, C,
                         tiny_model.config.head_dim)
        cv = ck.clone()
        for row, p in enumerate((a, b)):  # each row prefilled alone, from slot 0
            _, k, v = tiny_model.step(torch.tensor([p]), None, None, 0, pattern="causal")
            ck[:, row, :, :len(p)], cv[:, row, :, :len(p)] = k[:, 0], v[:, 0]
        ck[:, 1, :, len(b):len(a)] = ck[:, 0, :, len(b):len(a)]  # stale keys past row 1's length
        lengths = torch.tensor([len(a), len(b)])
        blk = torch.tensor([[12, 3, 3], [43, 3, 3]])
        for pattern in ("causal", "bidirectional"):
            got, _, _ = tiny_model.step(blk, ck, cv, lengths, pattern=pattern)
            for row, p in enumerate((a, b)):
                c1 = tiny_model.new_cache(1, C)
                tiny_model(torch.tensor([p]), cache=c1)
                single = tiny_model(blk[row:row + 1], pattern=pattern, cache=c1, write=False)[0]
                assert_close(got[row], single, FP32, f"row {row} {pattern}")


def test_lora_only_changes_lora_forwards(tiny_lora_model):
    ids = torch.randint(0, 96, (1, 12))
    with torch.no_grad():
        base = tiny_lora_model(ids, pattern="bidirectional")
        drafted = tiny_lora_model(ids, pattern="bidirectional", lora=True)
        assert (base - drafted).abs().max() > 1e-3, "the adapter had no effect"
        for layer in tiny_lora_model.encoder.layers:
            layer.self_attn.o_lora.lora_B.weight.zero_()
        assert_close(tiny_lora_model(ids, pattern="bidirectional", lora=True), base, FP32, "zero adapter")

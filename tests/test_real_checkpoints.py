"""Checkpoints as the published files write them (spec section 1): every config field,
EOS lists and generation_config.json, the real rope settings, the synthetic
checkpoint helper."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn.functional as F

import nemocompile
from nemocompile.model.config import ModelConfig
from nemocompile.errors import CheckpointError, GenerationError
from nemocompile.model.loader import load

from conftest import TOLERANCE

sc = pytest.importorskip("examples.synthetic_checkpoint")

# reduced depth and width; heads x head_dim (64) != hidden (80) as in the 3B and 14B
SMALL = dict(vocab_size=1040, hidden_size=80, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, mask_token_id=2)


def write_small(tmp_path, preset="8B", name="ckpt", **overrides):
    config = sc.make_config(preset, **{**SMALL, **overrides})
    return sc.write_checkpoint(tmp_path / name, config, std=0.5, lora_rank=8, lora_alpha=32)


def test_real_config_loads_silently_with_every_field(tmp_path):
    path = write_small(tmp_path, eos_token_id=[11, 2])
    raw = json.loads((path / "config.json").read_text())
    for field in ("model_type", "auto_map", "ar_loss_weight", "dlm_loss_weight", "dp_varying_mask_ratio",
                  "attn_implementation", "attention_bias", "mlp_bias", "attention_dropout", "sliding_window",
                  "initializer_range", "bos_token_id", "use_cache", "transformers_version", "torch_dtype"):
        assert field in raw, field
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = load(path)
    cfg = model.config
    assert cfg.eos_token_id == 11 and cfg.eos_ids == (11, 2)
    assert model.dtype == torch.bfloat16  # the checkpoint's torch_dtype
    assert load(path, dtype="fp32").dtype == torch.float32
    assert model.has_lora and model.tokenizer.chat_template == sc.CHAT_TEMPLATE


def test_eos_int_list_and_generation_config(tmp_path):
    base = sc.make_config("8B", **SMALL)
    assert ModelConfig.from_dict(base).eos_ids == (11,)
    assert ModelConfig.from_dict({**base, "eos_token_id": [2, 11, 2]}).eos_ids == (2, 11)
    assert ModelConfig.from_dict({**base, "eos_token_id": 2}).to_dict()["eos_token_id"] == 2
    with pytest.raises(CheckpointError, match="'eos_token_id' is an empty list"):
        ModelConfig.from_dict({**base, "eos_token_id": []})
    with pytest.raises(CheckpointError, match=r"'eos_token_id' \(5000\) must be a token id below vocab_size"):
        ModelConfig.from_dict({**base, "eos_token_id": [11, 5000]})
    path = write_small(tmp_path)
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [11, 7], "do_sample": False}))
    cfg = ModelConfig.from_file(path / "config.json")
    assert cfg.eos_token_id == 11 and cfg.eos_ids == (11, 7)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg  # what the manifest records reads back
    (path / "generation_config.json").write_text("{oops")
    with pytest.raises(CheckpointError, match="generation_config.json: not valid JSON"):
        ModelConfig.from_file(path / "config.json")


def test_generation_stops_at_either_eos(tmp_path):
    path = write_small(tmp_path)
    model = load(path, dtype="fp32")
    free = nemocompile.generate(model, [5, 6, 7, 8], max_new_tokens=24, eos_token_id=-1).tokens
    firsts = {t: free.index(t) for t in reversed(free)}  # token -> first index
    early, late = sorted((i, t) for t, i in firsts.items() if i >= 2)[:2]
    cfg = json.loads((path / "config.json").read_text())
    for config_eos, gen_eos, stop in (([late[1], 99], [late[1]], late), ([late[1]], [early[1]], early)):
        (path / "config.json").write_text(json.dumps({**cfg, "eos_token_id": config_eos}))
        (path / "generation_config.json").write_text(json.dumps({"eos_token_id": gen_eos}))
        m = load(path, dtype="fp32")
        for mode in ("ar", "linear-spec", "diffusion"):
            got = nemocompile.generate(m, [5, 6, 7, 8], mode=mode, max_new_tokens=24, block_length=4,
                                       threshold="none" if mode == "diffusion" else None).tokens
            if mode != "diffusion":  # lossless modes: AR's tokens up to the first EOS
                assert got == free[: stop[0] + 1], mode
            assert got[-1] in (early[1], late[1]) or len(got) == 24
    assert nemocompile.generate(model, [5, 6, 7, 8], max_new_tokens=24,
                                eos_token_id=[late[1], early[1]]).tokens == free[: early[0] + 1]
    with pytest.raises(GenerationError, match="eos must be a token id, a list of token ids or -1"):
        nemocompile.generate(model, [5, 6], eos_token_id=["x"])


def hf_reference(tmp_path, preset: str, rope_overrides: dict, beta_for_hf: float, **overrides):
    """Our checkpoint and transformers' Ministral3Model on the same weights and rope."""
    transformers = pytest.importorskip("transformers", minversion="5")
    config = sc.make_config(preset, **{**SMALL, **overrides})
    config["rope_parameters"].update(rope_overrides)
    rope = {k: v for k, v in config["rope_parameters"].items() if v is not None}
    if "llama_4_scaling_beta" in rope_overrides and rope_overrides["llama_4_scaling_beta"] is None:
        del config["rope_parameters"]["llama_4_scaling_beta"]
    rope["llama_4_scaling_beta"] = beta_for_hf
    path = sc.write_checkpoint(tmp_path / preset, config, std=0.1)
    model = load(path, dtype="fp32")
    hf_config = transformers.Ministral3Config(
        **{k: config[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                  "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
                                  "max_position_embeddings")}, rope_parameters=rope, sliding_window=None)
    hf_config._attn_implementation = "eager"
    hf = transformers.Ministral3Model(hf_config).eval()
    hf.load_state_dict({k.removeprefix("encoder."): v for k, v in model.state_dict().items()
                        if k.startswith("encoder.")})
    return model, hf


@pytest.mark.parametrize("preset, rope, hf_beta, positions", [
    ("14B", {}, 0.1, 200),  # rope_theta 1e9
    ("3B-Base", {}, 0.1, 200),  # YaRN factor 0.25, 4096 positions
    ("8B", {"original_max_position_embeddings": 32}, 0.1, 200),  # llama-4 scaling reached
    ("8B", {"original_max_position_embeddings": 32, "llama_4_scaling_beta": None}, 0.0, 200),  # missing: off
])
def test_real_rope_settings_match_transformers(tmp_path, preset, rope, hf_beta, positions):
    model, hf = hf_reference(tmp_path, preset, rope, hf_beta)
    if preset == "14B":
        assert model.config.rope.rope_theta == 1e9
    if preset == "3B-Base":
        assert model.config.rope.factor == 0.25 and model.config.max_position_embeddings == 4096
        assert model.config.eos_token_id == 2
    if rope.get("llama_4_scaling_beta", 0) is None:
        assert model.config.rope.llama_4_scaling_beta == 0.0
    ids = torch.randint(0, 1040, (1, positions), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = F.linear(hf(ids).last_hidden_state, model.diffusion_head.weight)
        got = model(ids, pattern="causal")
    diff = (got - want).abs().max()
    assert diff <= TOLERANCE[torch.float32], f"{preset} {rope}: max |diff| {diff:.3g}"


def test_missing_beta_differs_from_default_beta(tmp_path):
    """The rope test above can fail: with the scaling on, the same weights give other logits."""
    cfg = sc.make_config("8B", **SMALL)
    cfg["rope_parameters"]["original_max_position_embeddings"] = 32
    on = ModelConfig.from_dict(cfg)
    del cfg["rope_parameters"]["llama_4_scaling_beta"]
    off = ModelConfig.from_dict(cfg)
    assert on.rope.llama_4_scaling_beta == 0.1 and off.rope.llama_4_scaling_beta == 0.0


def test_synthetic_checkpoint_layout(tmp_path):
    path = write_small(tmp_path, preset="14B", num_hidden_layers=3)
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        names = list(f.keys())
        assert all(f.get_slice(n).get_dtype() == "BF16" for n in names)
    assert len(names) == 9 * 3 + 3
    with safe_open(str(path / "linear_spec_lora" / "adapter_model.safetensors"), framework="pt") as f:
        assert {f.get_slice(n).get_dtype() for n in f.keys()} == {"F32"}
    assert sc.make_config("8B")["num_hidden_layers"] == 34 and sc.make_config("3B")["hidden_size"] == 3072


def test_info_reports_what_an_export_needs(tmp_path):
    from nemocompile.commands.info import checkpoint_info

    path = write_small(tmp_path, preset="14B", eos_token_id=[11, 2])
    info = checkpoint_info(path, max_seq_len=1000, batch_size=2)
    cfg = load(path).config
    assert info["parameters"] == cfg.num_parameters() == info["config_parameters"]
    assert info["stored_weight_bytes"] == 2 * info["parameters"]  # bf16 on disk
    assert info["weight_bytes"]["fp32"] == 4 * info["parameters"] + 4 * info["lora_parameters"]
    per_token = 2 * 2 * 2 * 16 * 2  # k and v x layers x kv heads x head_dim x bf16
    assert info["kv_bytes_per_token"]["bf16"] == per_token
    assert info["kv_bytes_per_sequence"]["bf16"] == per_token * 1000
    assert info["kv_bytes_total"]["fp32"] == 2 * per_token * 1000 * 2
    assert info["lora"]["r"] == 8 and info["lora"]["parameters"] == 2 * (8 * 64 + 80 * 8)
    assert info["chat_template"] == {"source": "chat_template.jinja", "names": ["default"], "enable_thinking": True}
    tok = load(path).tokenizer
    assert info["thinking_tokens"] == {"<think>": tok.token_to_id("<think>"), "</think>": tok.token_to_id("</think>")}
    assert info["eos_token_ids"] == [11, 2] and info["torch_dtype"] == "bfloat16"

"""Shared fixtures: tiny random tri-mode models and checkpoints built on the fly."""

from __future__ import annotations

import pytest
import torch

from nemocompile.model.config import ModelConfig, RopeConfig
from nemocompile.model.loader import embedded_model_dir, save
from nemocompile.model import TriModeModel
from nemocompile.model.modeling import LoRA

# Tolerances per dtype for parity checks (max abs logit difference).
TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def make_config(**overrides) -> ModelConfig:
    """A tiny config; YaRN with a small original window so tests reach the llama-4 scaling."""
    base = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=4096,
                block_size=8, mask_token_id=3, eos_token_id=2,
                rope=RopeConfig(original_max_position_embeddings=16, factor=4.0, llama_4_scaling_beta=0.1))
    base.update(overrides)
    return ModelConfig(**base)


def make_model(config: ModelConfig | None = None, seed: int = 0, lora_rank: int = 0, scale: float = 0.5) -> TriModeModel:
    """A random model with weights large enough that argmax decisions are not ties."""
    config = config or make_config()
    torch.manual_seed(seed)
    model = TriModeModel(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith("norm.weight"):
                p.normal_(0.0, scale)
        if lora_rank:
            in_f = config.num_attention_heads * config.head_dim
            for layer in model.encoder.layers:
                layer.self_attn.o_lora = LoRA(in_f, config.hidden_size, lora_rank, 2.0)
                layer.self_attn.o_lora.lora_A.weight.normal_(0.0, scale)
                layer.self_attn.o_lora.lora_B.weight.normal_(0.0, scale)
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models run ~100x faster on one thread than on two contended ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_model() -> TriModeModel:
    return make_model()


@pytest.fixture
def tiny_lora_model() -> TriModeModel:
    return make_model(lora_rank=4)


@pytest.fixture
def tiny_checkpoint(tmp_path):
    """A random checkpoint directory in the real layout (with a drafter LoRA, no tokenizer)."""
    model = make_model(lora_rank=4)
    path = tmp_path / "ckpt"
    save(model, path)
    return path


@pytest.fixture(scope="session")
def embedded_dir():
    path = embedded_model_dir()
    if not (path / "config.json").is_file():
        pytest.skip("the embedded tiny model is not built yet (examples/train_tiny.py)")
    return path

"""Checkpoint loading: round trip, shards, the drafter adapter, and every bad input."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import nemocompile
from nemocompile.errors import CheckpointError
from nemocompile.model.loader import load, save

from conftest import make_model


def test_round_trip_with_lora(tiny_checkpoint):
    model = load(tiny_checkpoint)
    assert model.has_lora and model.dtype == torch.float32
    ref = make_model(lora_rank=4)
    ids = torch.randint(0, 96, (1, 10))
    for lora in (False, True):
        assert torch.allclose(model(ids, pattern="bidirectional", lora=lora),
                              ref(ids, pattern="bidirectional", lora=lora), atol=1e-5)
    assert not load(tiny_checkpoint, lora=False).has_lora
    assert load(tiny_checkpoint, dtype="bf16").dtype == torch.bfloat16


@pytest.mark.parametrize("lazy", [False, True])
def test_sharded_checkpoint(tiny_checkpoint, lazy):
    tensors = load_file(str(tiny_checkpoint / "model.safetensors"))
    names = sorted(tensors)
    half = len(names) // 2
    weight_map = {}
    for shard, part in (("model-00001-of-00002.safetensors", names[:half]),
                        ("model-00002-of-00002.safetensors", names[half:])):
        save_file({n: tensors[n] for n in part}, str(tiny_checkpoint / shard))
        weight_map.update({n: shard for n in part})
    (tiny_checkpoint / "model.safetensors").unlink()
    (tiny_checkpoint / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    model = load(tiny_checkpoint, lazy=lazy)
    head = model.weight_source.read("diffusion_head.weight") if lazy else model.diffusion_head.weight
    assert torch.equal(head, tensors["diffusion_head.weight"])
    (tiny_checkpoint / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="lists shard 'model-00002-of-00002.safetensors', which is missing"):
        load(tiny_checkpoint, lazy=lazy)


def edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (path / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("changes, message", [
    ({"architectures": ["LlamaForCausalLM"]}, "unsupported architecture"),
    ({"hidden_size": "wide"}, "field 'hidden_size' must be int"),
    ({"num_key_value_heads": 3}, "'num_key_value_heads' \\(3\\) must divide num_attention_heads"),
    ({"mask_token_id": 10_000}, "'mask_token_id' \\(10000\\) must be a token id below vocab_size"),
    ({"hidden_act": "gelu"}, "only 'silu'"),
])
def test_bad_config_is_named(tiny_checkpoint, changes, message):
    edit_config(tiny_checkpoint, **changes)
    with pytest.raises(CheckpointError, match=message) as err:
        load(tiny_checkpoint)
    assert "config.json" in str(err.value)


def test_unknown_config_field_warns(tiny_checkpoint):
    edit_config(tiny_checkpoint, shiny_new_field=1)
    with pytest.warns(UserWarning, match="ignoring unknown field 'shiny_new_field'"):
        load(tiny_checkpoint)


@pytest.mark.parametrize("lazy", [False, True])
def test_wrong_shape_and_missing_tensor(tiny_checkpoint, lazy):
    edit_config(tiny_checkpoint, intermediate_size=48)
    with pytest.raises(CheckpointError, match=r"mlp\.\w+_proj\.weight' has shape \[\d+, \d+\], config.json implies"):
        load(tiny_checkpoint, lazy=lazy)
    edit_config(tiny_checkpoint, intermediate_size=64)
    tensors = load_file(str(tiny_checkpoint / "model.safetensors"))
    save_file({**tensors, "encoder.norm.weight": torch.ones(32, dtype=torch.int32)},
              str(tiny_checkpoint / "model.safetensors"))
    with pytest.raises(CheckpointError, match="'encoder.norm.weight' has non-float dtype"):
        load(tiny_checkpoint, lazy=lazy)
    del tensors["encoder.norm.weight"]
    save_file(tensors, str(tiny_checkpoint / "model.safetensors"))
    with pytest.raises(CheckpointError, match="missing tensors \\['encoder.norm.weight'\\]"):
        load(tiny_checkpoint, lazy=lazy)


def test_lazy_load_reads_each_weight_on_demand_in_the_asked_dtype(tiny_checkpoint):
    from torch._subclasses.fake_tensor import FakeTensor

    eager = load(tiny_checkpoint, dtype="bf16")
    lazy = load(tiny_checkpoint, dtype="bf16", lazy=True)
    assert lazy.has_lora and lazy.config == eager.config and lazy.source == eager.source
    for name, p in lazy.named_parameters():
        if "lora_" in name:  # the small adapter is read for real, in fp32 as PEFT holds it
            assert not isinstance(p, FakeTensor) and torch.equal(p, eager.get_parameter(name))
            continue
        assert isinstance(p, FakeTensor) and p.dtype == torch.bfloat16
        assert torch.equal(lazy.weight_source.read(name), eager.get_parameter(name))
    assert torch.equal(lazy.inv_freq, eager.inv_freq)


@pytest.mark.parametrize("lazy", [False, True])
def test_missing_and_unsafe_files(tmp_path, tiny_checkpoint, lazy):
    with pytest.raises(CheckpointError, match="not a directory"):
        load(tmp_path / "nope", lazy=lazy)
    (tiny_checkpoint / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json: missing"):
        load(tiny_checkpoint, lazy=lazy)
    empty = tmp_path / "pickled"
    empty.mkdir()
    save(make_model(), empty)
    (empty / "model.safetensors").unlink()
    torch.save({}, empty / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="never unpickles"):
        load(empty, lazy=lazy)
    (empty / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load(empty, lazy=lazy)


def test_bad_dtype_and_lora(tiny_checkpoint):
    with pytest.raises(CheckpointError, match="unknown dtype 'int8'"):
        load(tiny_checkpoint, dtype="int8")
    cfg_path = tiny_checkpoint / "linear_spec_lora" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "target_modules": ["q_proj", "o_proj"]}))
    with pytest.raises(CheckpointError, match="the drafter adapts o_proj only"):
        load(tiny_checkpoint)
    cfg_path.write_text(json.dumps({**cfg, "r": 8}))
    with pytest.raises(CheckpointError, match="adapter shapes"):
        load(tiny_checkpoint)


def test_string_prompt_without_tokenizer_is_clear(tiny_checkpoint):
    model = load(tiny_checkpoint)
    with pytest.raises(nemocompile.NemocompileError, match="no tokenizer.json"):
        nemocompile.generate(model, "def f(")

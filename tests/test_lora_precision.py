"""The drafter adapter as PEFT runs it on a low-precision model: fp32 weights, the
delta computed and added in fp32, in eager and in the exported draft graph."""

from __future__ import annotations

import copy

import onnx
import pytest
import torch
from conftest import TOLERANCE, make_model

from nemocompile.graphs.export import cast_model, export_artifact
from nemocompile.model.loader import load, save
from nemocompile.artifact.manifest import Manifest
from nemocompile.checks.parity import step_parity

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def float64_reference(model):
    """``model`` in float64, the adapter included (softmax and norms still run in fp32)."""
    ref = copy.deepcopy(model).double()
    for layer in ref.encoder.layers:
        layer.self_attn.o_lora.double()
    return ref


def bf16_delta(model):
    """The old behaviour: the adapter rounded to bf16 and its delta summed in bf16."""
    low = copy.deepcopy(model)
    for layer in low.encoder.layers:
        for lin in (layer.self_attn.o_lora.lora_A, layer.self_attn.o_lora.lora_B):
            lin.weight.data = lin.weight.data.bfloat16()
    return low


def draft_error(model, ref, ids) -> float:
    with torch.no_grad():
        got = model(ids, pattern="bidirectional", lora=True).double()
        want = ref(ids, pattern="bidirectional", lora=True)
    return float((got - want).abs().mean())


def test_adapter_stays_fp32_on_a_bf16_model(tmp_path):
    model = make_model(lora_rank=8, scale=0.2)
    bf16 = cast_model(model, torch.bfloat16)
    lora = bf16.encoder.layers[0].self_attn.o_lora
    assert bf16.dtype == torch.bfloat16 and lora.lora_A.weight.dtype == torch.float32
    assert torch.equal(lora.lora_A.weight, model.encoder.layers[0].self_attn.o_lora.lora_A.weight)
    save(bf16, tmp_path / "ckpt")
    loaded = load(tmp_path / "ckpt")  # torch_dtype bfloat16 recorded, adapter stored fp32
    assert loaded.dtype == torch.bfloat16
    assert loaded.encoder.layers[0].self_attn.o_lora.lora_B.weight.dtype == torch.float32
    ids = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        assert loaded(ids, pattern="bidirectional", lora=True).dtype == torch.bfloat16


def test_fp32_delta_is_closer_to_float64_than_a_bf16_delta():
    torch.manual_seed(1)
    ids = torch.randint(0, 96, (4, 16))
    wins = 0
    for seed in range(4):
        model = make_model(seed=seed, lora_rank=8, scale=0.2)
        bf16 = cast_model(model, torch.bfloat16)  # the bf16 checkpoint
        ref = float64_reference(bf16)  # the same bf16 weights and fp32 adapter, computed in float64
        fp32_err, bf16_err = draft_error(bf16, ref, ids), draft_error(bf16_delta(bf16), ref, ids)
        wins += fp32_err < bf16_err
    assert wins == 4, f"the fp32 delta was closer in only {wins} of 4 models"


def test_exported_draft_graph_runs_the_fp32_delta(tmp_path):
    """fp16 (ORT CPU runs it; bf16 does not): the draft graph carries fp32 adapter weights
    and matches the eager fp16 model with its fp32 delta."""
    model = make_model(lora_rank=4, scale=0.2)
    art = tmp_path / "fp16"
    export_artifact(model, art, modes="linear-spec", block_length=4, max_seq_len=16, prefill_length=4,
                    dtype="fp16")
    draft = Manifest.load(art).graph("draft")
    proto = onnx.load(str(art / draft.file), load_external_data=False)
    lora_inits = [i for i in proto.graph.initializer if "lora" in i.name]
    assert lora_inits and {i.data_type for i in lora_inits} == {onnx.TensorProto.FLOAT}
    fp16 = cast_model(model, torch.float16)
    report = {s.step: s for s in step_parity(art, fp16)}
    assert report["draft"].ok and report["draft"].top1 == 1.0, report["draft"]
    assert report["draft"].logits_max <= TOLERANCE[torch.float16] * 10  # relative to the logits' scale

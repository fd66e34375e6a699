"""Parity of exported graphs on ONNX Runtime (CPU) against the eager model: per
step kind at several cache lengths, and whole generations token for token."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TOLERANCE, make_model
from tiny_artifacts import embedded, lora_batch2, plain_batch1

from nemocompile.cli import main
from nemocompile.graphs.export import export_artifact
from nemocompile.model.loader import save
from nemocompile.artifact.manifest import Manifest
from nemocompile.checks.parity import (ParityError, check_parity, generation_parity, read_prompts, reference_model,
                                step_parity)

FP32 = TOLERANCE[torch.float32]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def assert_steps_match(report, steps):
    assert [s.step for s in report] == steps
    for s in report:
        detail = f"{s.step}: logits max {s.logits_max:.2e} mean {s.logits_mean:.2e} cache {s.cache_max}"
        assert s.ok, detail
        assert s.logits_max <= FP32 and (s.cache_max is None or s.cache_max <= FP32), detail
        assert s.top1 == 1.0, detail
        # 0, mid and near capacity, each for one row and for every row of the artifact
        assert len({c.split()[1] for c in s.cases}) == 3 and s.cases[0] == "b=1 cache_len=0", s.cases


def test_every_step_kind_matches_eager_batch2_with_lora():
    model, art = lora_batch2()
    report = step_parity(art, model)  # cache lengths 0, mid and C - L; rows 0 and 1 (left padded)
    # the fused graphs, against the eager fused step and against the separate steps they replace
    assert_steps_match(report, ["prefill", "ar_step", "denoise", "commit", "draft", "verify", "prefill_draft",
                                "prefill_draft=separate", "verify_draft", "verify_draft=separate"])
    writes = {s.step: s.cache_max is not None for s in report}
    assert writes == {"prefill": True, "ar_step": True, "denoise": False, "commit": True, "draft": False,
                      "verify": True, "prefill_draft": True, "prefill_draft=separate": True, "verify_draft": True,
                      "verify_draft=separate": True}


def test_step_kinds_match_eager_batch1_without_lora():
    model, art = plain_batch1()
    assert not Manifest.load(art).graph("draft").lora
    assert_steps_match(step_parity(art, model), ["prefill", "draft", "verify"])


def test_draft_graph_really_runs_the_lora():
    """The draft graph must differ from the base model by exactly the adapter."""
    model, art = lora_batch2()
    base = make_model(lora_rank=4)
    for layer in base.encoder.layers:
        torch.nn.init.zeros_(layer.self_attn.o_lora.lora_B.weight)  # same config, adapter switched off
    report = {s.step: s for s in step_parity(art, base)}
    assert not report["draft"].ok  # the adapter changes the draft logits ...
    assert report["denoise"].ok and report["verify"].ok  # ... and nothing else


def test_whole_generations_are_token_identical_in_every_mode():
    model, art = lora_batch2()
    gen = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, model.config.vocab_size, (n,), generator=gen).tolist() for n in (3, 21)]
    # 21 tokens > the prefill length 16: the prompt is prefilled in two chunks
    batch = [prompts[0], prompts[1][:11]]  # ar and diffusion also decode a left-padded batch of 2
    modes = ["ar", "diffusion", "linear-spec", "quadratic-spec"]
    results = generation_parity(art, model, prompts, max_new_tokens=16, modes=modes)
    assert [r.mode for r in results] == modes
    for r in results:
        assert r.ok and r.identical == r.prompts == 2 and r.token_agreement == 1.0, r
    batched = generation_parity(art, model, [batch], max_new_tokens=12, modes=["ar", "diffusion"])
    for r in batched:
        assert r.ok and r.prompts == 2, r


def test_parity_fails_against_the_wrong_weights(tmp_path):
    """Same architecture, other weights: every step and the generations must fail."""
    _, art = lora_batch2()
    other = make_model(seed=11, lora_rank=4)
    report = check_parity(art, other, prompts=[[5, 6, 7, 8]], max_new_tokens=8)
    assert not report.ok
    assert not any(s.ok for s in report.steps)
    assert any(g.first_divergence for g in report.generations)
    d = next(g for g in report.generations if g.first_divergence).first_divergence[0]
    assert d["prompt"] == 0 and d["onnx"] != d["eager"]
    table = report.table()
    assert "FAIL" in table and "first divergence at token" in table


def test_parity_refuses_a_model_of_another_architecture():
    _, art = lora_batch2()
    from conftest import make_config

    with pytest.raises(ParityError, match="config hash"):
        reference_model(Manifest.load(art), make_model(make_config(num_hidden_layers=1), lora_rank=4))
    with pytest.raises(ParityError, match="drafter LoRA"):
        reference_model(Manifest.load(art), make_model())


def test_parity_cli_exit_codes(tmp_path, capsys):
    _, art = lora_batch2()
    good, bad = tmp_path / "good", tmp_path / "bad"
    save(lora_batch2()[0], good)
    save(make_model(seed=5, lora_rank=4), bad)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"ids": [4, 5, 6]}\n\n{"ids": [9, 10]}\n')
    assert main(["parity", "--artifact", str(art), "--model", str(good), "--prompts", str(prompts),
                 "--max-new-tokens", "6"]) == 0
    out, err = capsys.readouterr()
    assert "prefill" in out and "linear-spec" in out and out.strip().endswith("PASS")
    assert "parity: graph 1/" in err and "linear-spec generation 2/2" in err  # progress on stderr, not silence
    assert main(["parity", "--artifact", str(art), "--model", str(bad), "--steps-only", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False and report["generations"] == []
    assert main(["parity", "--artifact", str(tmp_path / "none")]) == 2
    assert "manifest.json: missing" in capsys.readouterr().err


def test_read_prompts(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text('{"prompt": "def f():"}\n{"ids": [1, 2]}\nplain text line\n')
    assert read_prompts(f) == ["def f():", [1, 2], "plain text line"]
    f.write_text('{"text": 1}\n')
    with pytest.raises(ParityError, match='"prompt" or an "ids"'):
        read_prompts(f)
    with pytest.raises(ParityError, match="no such prompts file"):
        read_prompts(tmp_path / "missing")


def test_fp16_artifact_matches_the_fp16_eager_model(tmp_path):
    model = make_model(scale=0.2)  # a well-conditioned model: fp16 rounding is not amplified 3x per layer
    art = tmp_path / "fp16"
    export_artifact(model, art, modes="ar", max_seq_len=24, prefill_length=1, dtype="fp16")
    report = check_parity(art, model, prompts=[[4, 5, 6, 7]], max_new_tokens=10)
    assert report.dtype == "fp16"
    assert report.ok, report.table()
    assert all(g.identical == g.prompts for g in report.generations)


def test_bf16_artifact_says_why_it_cannot_run_on_cpu(tmp_path):
    model = make_model()
    art = tmp_path / "bf16"
    export_artifact(model, art, modes="ar", max_seq_len=16, prefill_length=1, dtype="bf16")
    assert next(s for s in Manifest.load(art).graph("prefill").inputs if s.name == "cache_k").dtype == "bfloat16"
    with pytest.raises(ParityError, match="bf16 artifacts do not run on ORT's CPU provider"):
        check_parity(art, model)


def test_embedded_model_parity(embedded_dir):
    report = check_parity(embedded(), None, max_new_tokens=24)  # text prompts through the copied tokenizer
    assert report.ok, report.table()
    assert [g.mode for g in report.generations] == ["ar", "diffusion", "linear-spec", "quadratic-spec"]
    assert all(s.logits_max <= FP32 for s in report.steps)

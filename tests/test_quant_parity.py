"""Parity measures for quantized artifacts (nemocompile/checks/quant_parity.py) on cases with a known answer."""

from __future__ import annotations

import math

import numpy as np
import pytest
from test_quantize_weights import quantized
from tiny_artifacts import lora_batch2

from nemocompile.checks.quant_parity import (QUANT_THRESHOLDS, QuantParityReport, artifact_teacher_forced,
                                      check_quantized_parity, eager_teacher_forced, mean_acceptance, mean_kl,
                                      top1_agreement)
from nemocompile.runtime import Runtime


def test_top1_and_kl_on_a_hand_made_case():
    """Three positions over a 2-token vocabulary: known argmaxes and known KL in closed form."""
    log = np.log
    reference = log(np.array([[0.5, 0.5], [0.9, 0.1], [0.2, 0.8]]))
    test = log(np.array([[0.25, 0.75], [0.9, 0.1], [0.6, 0.4]]))
    # argmax: (0 vs 1), (0 vs 0), (1 vs 0): ties break to the first index on both sides
    assert top1_agreement(reference, test) == pytest.approx(1 / 3)
    kl = [0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75), 0.0,
          0.2 * math.log(0.2 / 0.6) + 0.8 * math.log(0.8 / 0.4)]
    assert mean_kl(reference, test) == pytest.approx(sum(kl) / 3, rel=1e-12)
    # logits shifted by a constant are the same distribution: KL 0, full agreement
    assert mean_kl(reference + 7.0, reference) == pytest.approx(0.0, abs=1e-12)
    assert top1_agreement(reference + 7.0, reference) == 1.0
    with pytest.raises(ValueError, match="one non-empty shape"):
        top1_agreement(reference, test[:2])


def test_acceptance_weights_prompts_by_their_cycles():
    assert mean_acceptance([[1, 3], [2]]) == pytest.approx(2.0)  # (1 + 3 + 2) / 3, not (2 + 2) / 2
    assert mean_acceptance([[4, 4, 4, 4], [1]]) == pytest.approx(17 / 5)


def _report(top1, kl, acc, ref, precision="int4"):
    return QuantParityReport("a", precision, "hqq", 2, 10, top1, kl, acc, ref, QUANT_THRESHOLDS[precision])


def test_the_verdict_applies_the_thresholds_of_the_precision():
    t4, t8 = QUANT_THRESHOLDS["int4"], QUANT_THRESHOLDS["int8"]
    assert t8.top1 > t4.top1 and t8.kl < t4.kl  # int8 is held to more
    assert _report(0.90, 0.01, 2.0, 2.1).ok  # acceptance 0.952 of fp32's
    assert not _report(0.90, 0.01, 1.7, 2.0).ok and _report(0.90, 0.01, 1.7, 2.0).checks["acceptance"] is False
    assert not _report(0.84, 0.01, 2.0, 2.0).ok
    assert not _report(0.90, 0.01, 2.0, 2.0, precision="int8").ok  # 0.90 passes int4, not int8
    assert _report(0.90, 0.01, None, None).checks.keys() == {"top1", "kl"}  # no linear-spec: no acceptance check
    table = _report(0.84, 0.01, 2.0, 2.0).table()
    assert "top-1 agreement" in table and "FAIL" in table.splitlines()[-1]


def test_teacher_forcing_through_the_artifact_matches_eager_on_a_float_artifact():
    """The measure's plumbing: the float artifact's prefill chunks reproduce the eager causal logits."""
    model, float_dir = lora_batch2()
    ids = [5, 9, 11, 7, 30, 2, 17, 40, 41, 42, 3, 8, 60, 61, 62, 63, 64, 65, 1, 4, 9]  # > one prefill chunk (16)
    with Runtime.load(float_dir, backend="onnxruntime", threads=1) as rt:
        got = artifact_teacher_forced(rt, ids)
    ref = eager_teacher_forced(model, ids)
    assert got.shape == ref.shape == (len(ids), model.config.vocab_size)
    np.testing.assert_allclose(got, ref, atol=1e-4)
    assert top1_agreement(ref, got) == 1.0 and mean_kl(ref, got) < 1e-8


def test_quantized_parity_on_a_quantized_artifact():
    model, _ = lora_batch2()
    prompts = [[5, 9, 11, 7, 30], [40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57]]
    report = check_quantized_parity(quantized("int4"), model, prompts, max_new_tokens=16)
    assert report.precision == "int4" and report.positions == 5 + 18
    # random weights of scale 0.5 sit far from int4's grid: well above chance (1/96), never identical
    assert 0.2 < report.top1 < 1.0 and 0.0 < report.kl < 5.0
    assert report.acceptance is not None and report.acceptance_reference is not None
    assert set(report.checks) == {"top1", "kl", "acceptance"}


def test_parity_command_uses_the_quantized_measures_on_a_quantized_artifact(tmp_path, capsys):
    import json

    from nemocompile.cli import main
    from nemocompile.model.loader import save

    model, _ = lora_batch2()
    save(model, tmp_path / "ckpt")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"ids": [5, 9, 11, 7, 30]}\n{"ids": [40, 41, 42, 43]}\n')
    code = main(["parity", "--artifact", str(quantized("int4")), "--model", str(tmp_path / "ckpt"),
                 "--prompts", str(prompts), "--max-new-tokens", "8", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert report["precision"] == "int4" and report["positions"] == 9 and set(report["checks"]) >= {"top1", "kl"}
    assert code == (0 if report["ok"] else 1)

"""Parity fails closed: NaN, inf or a top-1 flip beyond the tolerance is a FAIL with a non-zero exit."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from tiny_artifacts import plain_batch1

from nemocompile.cli import main
from nemocompile.model.loader import save
from nemocompile.artifact.manifest import Manifest
from nemocompile.checks.parity import OutputComparison

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _add(cmp: OutputComparison, got: np.ndarray, ref: np.ndarray) -> None:
    """A graph that returns logits [B, L, V] (and their argmax) against eager logits."""
    cmp.add("case", {"logits": got, "candidate": np.nan_to_num(got).argmax(-1)}, (torch.from_numpy(ref), None, None))


def test_a_nan_that_is_not_first_still_fails():
    cmp = OutputComparison()
    ref = np.zeros((1, 2, 4), np.float32)
    _add(cmp, ref.copy(), ref)  # a clean case first: the builtin max() would keep 0.0 and drop the NaN
    bad = ref.copy()
    bad[0, 1, 2] = np.nan
    _add(cmp, bad, ref)
    assert np.isnan(cmp.logits_max) and not cmp.logits_max <= 1.0
    assert cmp.nonfinite == 1 and not cmp.result().ok


def test_inf_is_counted():
    cmp = OutputComparison()
    ref = np.zeros((1, 1, 3), np.float32)
    bad = ref.copy()
    bad[0, 0, 0] = np.inf
    _add(cmp, bad, ref)
    assert cmp.nonfinite == 1 and cmp.logits_max == np.inf and not cmp.result().ok


def test_a_top1_flip_beyond_the_tolerance_counts_and_a_near_tie_does_not():
    t = 1e-4
    ref = np.array([[[1.0, 1.0 + 1.5 * t]]])  # eager prefers token 1 by 1.5 tolerances
    got = np.array([[[1.0 + 0.8 * t, 1.0 + 0.7 * t]]])  # every logit within tolerance, argmax flipped to 0
    cmp = OutputComparison()
    _add(cmp, got, ref)
    assert cmp.logits_max <= t and cmp.top1 == 0.0
    assert cmp.flips(t) == 1 and not cmp.result().ok  # fp32's tolerance is 1e-4
    assert cmp.flips(2 * t) == 0  # within a wider tolerance the two tokens are a tie


def test_a_graph_without_logits_is_judged_on_its_ids_and_confidences():
    """A fused graph returns ids and confidences only: a flipped id fails, a near tie does not."""
    ref = np.array([[[0.0, 3.0, 1.0]]])
    conf = float(np.exp(3.0) / np.exp(ref).sum())
    ok = OutputComparison()
    ok.add("case", {"candidate": np.array([[1]]), "confidence": np.array([[conf]])}, (torch.from_numpy(ref), None, None))
    assert ok.result().ok
    flipped = OutputComparison()
    flipped.add("case", {"candidate": np.array([[2]]), "confidence": np.array([[conf]])},
                (torch.from_numpy(ref), None, None))
    assert flipped.flips(1e-4) == 1 and not flipped.result().ok


def _damaged_copy(tmp_path, value: float):
    model, art = plain_batch1()
    save(model, tmp_path / "ckpt")
    copy = tmp_path / "art"
    shutil.copytree(art, copy)
    weights = copy / Manifest.load(copy).weights_file
    data = np.fromfile(weights, dtype=np.float32)
    data[len(data) // 2: len(data) // 2 + 64] = value  # same size: only the numbers are damaged
    data.tofile(weights)
    return copy


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_parity_cli_fails_on_nan_or_inf_weights(tmp_path, capsys, value):
    copy = _damaged_copy(tmp_path, value)
    code = main(["parity", "--artifact", str(copy), "--model", str(tmp_path / "ckpt"), "--steps-only"])
    captured = capsys.readouterr()
    out = captured.out
    assert code == 1, captured.err
    assert out.rstrip().endswith("FAIL") and "NaN/inf values in the graph's outputs" in out

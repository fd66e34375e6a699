"""mode="auto"'s policy (runtime/policy.py) on hand-made cost tables with known answers,
and `nemocompile calibrate` writing a table for a tiny artifact."""

from __future__ import annotations

import json
import math
import os
import shutil

import pytest
from tiny_artifacts import lora_batch2

from nemocompile.artifact.files import check_export_destination, damaged_files
from nemocompile.cli import main
from nemocompile.artifact.manifest import Manifest
from runtime.policy import (PRIOR_WEIGHT, Acceptance, CostTable, CostTableError, choose, cycle_graphs, cycle_s,
                            lossless_options)

MS = 1e-3
OPTIONS = [("ar", None), ("linear-spec", 8), ("quadratic-spec", 8)]


def table(linear: float = 2.0, quadratic: float = 1.5, backend: str = "onnxruntime", batch: int = 2,
          step_ms: dict | None = None) -> CostTable:
    """ar 1 ms, draft 2 ms + verify 2 ms (a linear cycle 4 ms), fused 5 ms; ``step_ms`` overrides."""
    ms = {"ar_step@1": 1.0, "draft@8": 2.0, "verify@8": 2.0, "verify_draft@8": 5.0, "prefill@16": 3.0,
          **(step_ms or {})}
    return CostTable(backend, 1, batch, {k: v * MS for k, v in ms.items()},
                     {"linear-spec@8": linear, "quadratic-spec@8": quadratic}, "2026-01-01T00:00:00+00:00")


def test_cycle_time_is_the_sum_of_the_cycle_graphs():
    t = table()
    assert cycle_graphs("linear-spec", 8) == ("draft@8", "verify@8")
    assert cycle_s(t, "ar", None) == pytest.approx(1 * MS)
    assert cycle_s(t, "linear-spec", 8) == pytest.approx(4 * MS)
    assert cycle_s(t, "quadratic-spec", 8) == pytest.approx(5 * MS)
    with pytest.raises(CostTableError, match="no time for graph draft@4.*nemocompile calibrate"):
        cycle_s(t, "linear-spec", 4)


def test_ar_wins_when_drafts_are_barely_accepted():
    c = choose(table(linear=1.1, quadratic=1.1), OPTIONS, [Acceptance()])
    assert (c.mode, c.block_length) == ("ar", None)
    assert c.scores == pytest.approx({"ar": 1000.0, "linear-spec@8": 275.0, "quadratic-spec@8": 220.0})
    assert c.reason.startswith("ar: 1.00 tok/cycle in 1.00 ms = 1000 tok/s > linear-spec@8: 1.10 tok/cycle")


def test_linear_spec_wins_at_high_acceptance():
    c = choose(table(linear=6.0, quadratic=5.5), OPTIONS, [Acceptance()])
    assert (c.mode, c.block_length) == ("linear-spec", 8)
    assert c.scores["linear-spec@8"] == pytest.approx(1500.0)  # 6 tokens / 4 ms
    assert c.scores["quadratic-spec@8"] == pytest.approx(1100.0)
    assert c.reason.startswith("linear-spec@8: 6.00 tok/cycle in 4.00 ms = 1500 tok/s > quadratic-spec@8")


def test_quadratic_spec_wins_when_its_fused_step_is_cheap_enough():
    c = choose(table(linear=3.0, quadratic=3.0, step_ms={"verify_draft@8": 2.5}), OPTIONS, [Acceptance()])
    assert c.mode == "quadratic-spec"  # 3 / 2.5 ms = 1200 > ar 1000 > linear 750


def test_every_auto_row_counts_and_a_graph_costs_the_same_for_all_rows():
    # two rows at acceptance 2: linear 4 tokens / 4 ms = 1000 < ar's 2 tokens / 1 ms = 2000
    rows = [Acceptance(), Acceptance()]
    c = choose(table(linear=2.0), OPTIONS, rows)
    assert c.mode == "ar" and c.scores["ar"] == pytest.approx(2000.0)
    assert c.scores["linear-spec@8"] == pytest.approx(1000.0)
    # eight rows at acceptance 5: linear 40 / 4 ms = 10000 > ar 8 / 1 ms
    c = choose(table(linear=5.0), OPTIONS, [Acceptance() for _ in range(8)])
    assert c.mode == "linear-spec" and c.scores["linear-spec@8"] == pytest.approx(10000.0)


def test_joining_graphs_other_rows_run_anyway_is_cheaper():
    t = table(linear=2.0)
    alone = choose(t, OPTIONS, [Acceptance()])
    assert alone.mode == "ar"  # 1 / 1 ms beats 2 / 4 ms
    # a fixed linear-spec row already runs draft@8 and verify@8 this cycle (2 expected tokens)
    fixed = frozenset({"draft@8", "verify@8"})
    joined = choose(t, OPTIONS, [Acceptance()], fixed_graphs=fixed, fixed_tokens=2.0)
    assert joined.mode == "linear-spec"
    assert joined.scores["linear-spec@8"] == pytest.approx(1000.0)  # (2 + 2) / 4 ms: no extra graph
    assert joined.scores["ar"] == pytest.approx(600.0)  # (1 + 2) / (4 + 1) ms: ar adds its own graph


def test_ties_go_to_ar():
    c = choose(table(linear=4.0, quadratic=5.0), OPTIONS, [Acceptance()])  # all three: 1000 tok/s
    assert c.scores == pytest.approx({"ar": 1000.0, "linear-spec@8": 1000.0, "quadratic-spec@8": 1000.0})
    assert c.mode == "ar" and "= (tie)" in c.reason
    no_rows = choose(table(), OPTIONS, [])  # nothing to decode: every option scores 0
    assert no_rows.mode == "ar"


def test_a_requests_own_record_moves_the_choice_off_the_prior():
    t = table(linear=3.0)  # prior: 3 / 4 ms = 750 < ar 1000
    row = Acceptance()
    for _ in range(8):
        row.add("linear-spec", 8, 8)  # this request's drafts are always fully accepted
    c = choose(t, OPTIONS, [row])
    expected = (3.0 * PRIOR_WEIGHT + 64) / (PRIOR_WEIGHT + 8)
    assert c.mode == "linear-spec" and c.scores["linear-spec@8"] == pytest.approx(expected / (4 * MS))


def test_acceptance_blends_the_prior_with_the_requests_cycles():
    a = Acceptance()
    assert a.expected("linear-spec", 8, 3.0) == 3.0  # no cycles yet: the prior
    a.add("linear-spec", 8, 5)
    a.add("linear-spec", 8, 6)
    assert a.cycles("linear-spec", 8) == 2
    assert a.expected("linear-spec", 8, 3.0) == pytest.approx((3.0 * 4 + 11) / (4 + 2))
    assert a.expected("linear-spec", 16, 3.0) == 3.0  # records are per block length
    assert a.expected("quadratic-spec", 8, 2.0) == 2.0  # and per mode
    assert a.expected("ar", None, 9.0) == 1.0  # ar: one token per cycle, whatever the prior
    heavy = Acceptance(weight=1.0)
    heavy.add("linear-spec", 8, 7)
    assert heavy.expected("linear-spec", 8, 1.0) == pytest.approx(4.0)


@pytest.fixture
def artifact(tmp_path):
    """A private copy of the tiny every-mode batch-2 artifact (calibration writes into it)."""
    _, src = lora_batch2()
    dst = tmp_path / "art"
    shutil.copytree(src, dst)
    return dst


def _tiny_table(artifact, **changes) -> CostTable:
    m = Manifest.load(artifact)
    fields = dict(backend="onnxruntime", threads=1, batch_size=m.batch_size,
                  step_s={f"{g.step}@{g.block_length}": 0.001 for g in m.graphs},
                  acceptance={"linear-spec@8": 2.5, "quadratic-spec@8": 3.0}, measured_at="2026-01-01T00:00:00Z")
    fields.update(changes)
    return CostTable(**fields)


def test_cost_table_roundtrips_through_costs_json(artifact):
    assert CostTable.load(artifact, "onnxruntime") is None  # none yet
    t = _tiny_table(artifact)
    path = t.save(artifact)
    assert path == artifact / "costs.json"
    assert CostTable.load(artifact, "onnxruntime") == t
    assert not [p for p in artifact.iterdir() if p.name.endswith(".tmp")]
    other = artifact.parent / "elsewhere.json"
    t.save(other)
    assert CostTable.load(artifact, "onnxruntime", file=other) == t


@pytest.mark.parametrize("text, complaint", [
    ("{not json", "not readable JSON"),
    ('{"format": "something-else"}', "not a cost table"),
    (None, "\"step_s\"\\['verify@8'\\] must be a finite number > 0, got -1"),
    (None, "\"batch_size\" must be an integer >= 1"),
])
def test_a_malformed_costs_json_says_to_recalibrate(artifact, text, complaint):
    if text is None:
        raw = _tiny_table(artifact).to_dict()
        if "step_s" in complaint:
            raw["step_s"]["verify@8"] = -1
        else:
            raw["batch_size"] = "2"
        text = json.dumps(raw)
    (artifact / "costs.json").write_text(text)
    with pytest.raises(CostTableError, match=complaint) as e:
        CostTable.load(artifact, "onnxruntime")
    assert "nemocompile calibrate" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("changes, why", [
    ({"backend": "torch"}, "measured on backend torch, not onnxruntime"),
    ({"batch_size": 8}, "measured at batch 8, the artifact's batch is 2"),
    ({"step_s": {"ar_step@1": 0.001}}, "has no cost for"),
])
def test_a_table_for_another_backend_batch_or_export_is_ignored_with_a_warning(artifact, capsys, changes, why):
    _tiny_table(artifact, **changes).save(artifact)
    assert CostTable.load(artifact, "onnxruntime") is None
    err = capsys.readouterr().err
    assert err.startswith("warning: ") and why in err and "nemocompile calibrate" in err
    assert len(err.strip().splitlines()) == 1


def test_calibrate_writes_every_graph_of_the_artifact(artifact, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"ids": [5 + i, 17, 40 + i, 9, 11 + i]}) + "\n" for i in range(2)))
    rc = main(["calibrate", "--artifact", str(artifact), "--threads", "1", "--repeats", "2",
               "--prompts", str(prompts), "--max-new-tokens", "12", "--quiet"])
    out = capsys.readouterr().out
    assert rc == 0
    manifest = Manifest.load(artifact)
    table = CostTable.load(artifact, "onnxruntime")
    assert table is not None and table.batch_size == 2 and table.threads == 1
    assert set(table.step_s) == {f"{g.step}@{g.block_length}" for g in manifest.graphs}
    assert all(math.isfinite(s) and 0 < s < 10 for s in table.step_s.values())
    assert set(table.acceptance) == {"linear-spec@8", "quadratic-spec@8"}
    assert lossless_options(manifest) == [("ar", None), ("linear-spec", 8), ("quadratic-spec", 8)]
    assert all(1 <= a <= 8 for a in table.acceptance.values())  # at least the bonus, at most a block
    assert "verify_draft@8" in out and "auto, one row at the priors: " in out and "wrote " in out
    # the artifact stays intact for `nemocompile check`, and `export --force` may still replace it
    assert damaged_files(artifact, manifest, hashes=True) == []
    check_export_destination(artifact, overwrite=True)


def test_calibrate_refuses_an_artifact_it_cannot_write_and_names_out(artifact, tmp_path, capsys, monkeypatch):
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(artifact) else real_access(p, mode))
    rc = main(["calibrate", "--artifact", str(artifact), "--repeats", "1", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "not writable" in err and "--out FILE" in err
    assert not (artifact / "costs.json").exists()

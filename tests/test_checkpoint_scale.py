"""Checkpoint-sized exports (slow: minutes to an hour, tens of GB of disk; not in CI).

    python -m pytest -m slow tests/test_checkpoint_scale.py -s

The 8B-shaped export writes the published 8B config with random bf16 weights
(about 16 GB), exports every mode in bf16 in a subprocess and prints its wall
time and peak RSS; the target is peak RSS <= 1.25x the checkpoint's bytes. The
two-layer cut checks per-step parity against eager at the real width and
vocabulary (fp16: ONNX Runtime's CPU provider does not run bf16 graphs).
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time

import pytest

sc = pytest.importorskip("examples.synthetic_checkpoint")

pytestmark = pytest.mark.slow


def checkpoint_bytes(path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*.safetensors"))


def test_8b_shaped_export_fits_in_memory(tmp_path_factory):
    root = tmp_path_factory.mktemp("nld-8b")
    ckpt = sc.write_checkpoint(root / "ckpt", sc.make_config("8B"), lora_rank=128, lora_alpha=512)
    size = checkpoint_bytes(ckpt)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "nemocompile", "export", "--model", str(ckpt), "--mode", "all",
                           "--dtype", "bf16", "--max-seq-len", "512", "--out", str(root / "art")],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    wall = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr[-2000:]
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # Linux reports KiB
    print(f"\n8B-shaped export: checkpoint {size / 1e9:.2f} GB, wall {wall / 60:.1f} min, "
          f"peak RSS {peak / 1e9:.2f} GB ({peak / size:.2f}x the checkpoint)")
    assert peak <= 1.25 * size, f"peak RSS {peak / 1e9:.2f} GB > 1.25 x {size / 1e9:.2f} GB"


def test_two_layer_cut_of_8b_matches_eager(tmp_path_factory):
    from nemocompile.graphs.export import export_artifact
    from nemocompile.loader import load
    from nemocompile.parity import step_parity

    root = tmp_path_factory.mktemp("nld-8b-cut")
    ckpt = sc.write_checkpoint(root / "ckpt", sc.make_config("8B", num_hidden_layers=2), lora_rank=128,
                               lora_alpha=512)
    model = load(ckpt, dtype="fp16")
    export_artifact(model, root / "art", modes="all", block_length=8, max_seq_len=32, prefill_length=8,
                    dtype="fp16")
    report = step_parity(root / "art", model)
    for s in report:
        print(f"{s.step:8} logits max {s.logits_max:.2e} (tol {s.tolerance:.2e}) top-1 {s.top1:.3f}")
    assert all(s.ok for s in report), [s.step for s in report if not s.ok]

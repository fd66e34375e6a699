"""Bench reports memory per precision: weight bytes and peak RSS beside tokens/s."""

from __future__ import annotations

from test_quantize_weights import quantized
from tiny_artifacts import lora_batch2

from nemocompile.artifact.manifest import Manifest
from nemocompile.runtime.bench import modes as bench


def test_bench_reports_weight_bytes_and_peak_rss_per_precision():
    _, float_dir = lora_batch2()
    int4_dir = quantized("int4")
    said: list[str] = []
    report = bench.run_bench([float_dir, int4_dir], [[5, 9, 11, 7, 30]], backends=("onnxruntime", "torch"),
                             max_new_tokens=4, diffusion_thresholds=[0.9], model=lora_batch2()[0], threads=1,
                             progress=said.append)
    rows = report["results"]
    by = {r["weights"]: r for r in rows if r["mode"] == "ar" and r["backend"] == "onnxruntime"}
    assert set(by) == {"fp32", "int4"}
    assert by["fp32"]["weight_bytes"] == (float_dir / "weights.bin").stat().st_size
    assert by["int4"]["weight_bytes"] == (int4_dir / "weights.bin").stat().st_size < by["fp32"]["weight_bytes"]
    assert all(r["peak_rss_bytes"] and r["peak_rss_bytes"] > 10 * 2**20 for r in rows)  # a Python process: > 10 MB
    assert {r["backend"] for r in rows if r["weights"] == "int4"} == {"onnxruntime"}  # torch cannot run int4
    assert any("int4 weights run on onnxruntime only; skipping torch" in s for s in said)
    table = bench.format_table(report)
    assert "wt_MB" in table and "rss_MB" in table and " int4 " in table


def test_weight_bytes_without_a_shared_file_counts_each_graph(tmp_path):
    from conftest import make_model

    from nemocompile.graphs.export import export_artifact

    out = tmp_path / "a"
    export_artifact(make_model(), out, modes="ar", max_seq_len=16, prefill_length=8, share_weights=False)
    manifest = Manifest.load(out)
    expected = sum(f.stat().st_size for f in out.iterdir() if f.suffix in (".onnx", ".data"))
    assert bench.weight_bytes(out, manifest) == expected > 0


def test_peak_rss_grows_with_an_allocation_and_resets():
    import numpy as np

    bench.reset_peak_rss()
    before = bench.peak_rss_bytes()
    block = np.ones(64 * 2**20 // 8)  # 64 MiB touched
    after = bench.peak_rss_bytes()
    del block
    assert after - before > 48 * 2**20
    if bench.reset_peak_rss():  # Linux: the high-water mark drops back once the block is freed
        assert bench.peak_rss_bytes() < after - 32 * 2**20

"""A forward pays for the work in flight (graph contract 4): it runs only the rows it names and reads
only the cache slots below its longest row. Proven by poisoning what it must not read, and by
watching what the engine asks the backend for."""

from __future__ import annotations

import time

import numpy as np
import onnxruntime as ort
import pytest
import tiny_artifacts
from test_engine import PROMPTS, reference, run_concurrently

from nemocompile.artifact.manifest import Manifest
from nemocompile.runtime import Runtime
from nemocompile.runtime.runtime import SLOT_STEP

BLOCK = tiny_artifacts.BLOCK


def _session(path, graph):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(str(path / graph.file), so, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("step", ["ar_step", "denoise", "verify_draft", "prefill_draft"])
def test_a_forward_never_reads_other_rows_or_slots_past_its_rows(step):
    """NaN everywhere a forward must not read (other rows' caches, slots at and past its longest
    row) leaves its outputs finite, and huge values where it reads but must mask (a shorter row's
    slots past its own length) leave them unchanged: equal to the same forward over a clean
    cache. A forward of one row equals that row's entry in a forward of two."""
    _, path = tiny_artifacts.lora_batch2()
    manifest = Manifest.load(path)
    graph = manifest.graph(step)
    session = _session(path, graph)
    rng = np.random.default_rng(0)
    cache_spec = next(s for s in graph.inputs if s.name == "cache_k")
    L = next(s for s in graph.inputs if s.name == "input_ids").shape[1]
    clean_k = rng.standard_normal(cache_spec.shape).astype(np.float32)
    clean_v = rng.standard_normal(cache_spec.shape).astype(np.float32)
    lens = np.array([20, 13], dtype=np.int64)  # cache rows 1 and 0 of the two-row forward below
    ids = rng.integers(0, 96, (2, L)).astype(np.int64)

    def poison(rows_lens, n, others=()):
        k, v = clean_k.copy(), clean_v.copy()
        for row, length in rows_lens:
            for t in (k, v):
                t[:, row, :, length:n] = 1e3  # read (below n) but masked
                t[:, row, :, n:] = np.nan  # never read
        for row in others:
            k[:, row], v[:, row] = np.nan, np.nan
        return k, v

    def run(k, v, rows, entries):
        feed = {"input_ids": ids[entries], "cache_len": lens[entries], "row_start": np.zeros(len(entries), np.int64),
                "rows": np.array(rows, np.int64), "slots": np.arange(int(lens[entries].max()), dtype=np.int64),
                "cache_k": k, "cache_v": v}
        names = [o.name for o in session.get_outputs()]
        return dict(zip(names, session.run(None, feed)))

    both = run(clean_k, clean_v, [1, 0], [0, 1])
    for name, value in run(*poison([(1, 20), (0, 13)], 20), [1, 0], [0, 1]).items():
        assert np.isfinite(value).all(), f"{name}: read a slot at or past the forward's longest row"
        np.testing.assert_allclose(value, both[name], atol=1e-5, err_msg=name)
    one = run(*poison([(0, 13)], 13, others=[1]), [0], [1])
    for name, value in one.items():
        assert value.shape[0] == 1, f"{name}: a forward of one row returned {value.shape[0]}"
        assert np.isfinite(value).all(), f"{name}: read another row or a slot past the row's length"
        np.testing.assert_allclose(value[0], both[name][1], atol=1e-5, err_msg=name)


def test_the_engine_runs_the_rows_in_flight_over_the_slots_they_hold():
    """One request on a batch-4 artifact runs forwards of one row; each forward reads the slots
    below its longest row, rounded up to a multiple of SLOT_STEP (at most the capacity);
    concurrent requests share forwards, and every output still equals its solo eager run."""
    model, path = tiny_artifacts.batch4()
    with Runtime.load(path, threads=1) as rt:
        seen = []
        run = rt.backend.run

        def spy(key, b, n):
            rows = rt.io[key].rows[:b].copy()
            seen.append((key, b, n, int(rt.cache.cache_len[rows].max())))
            time.sleep(0.003)  # rows stay a while, so concurrent requests meet in one forward
            return run(key, b, n)

        rt.backend.run = spy

        def bound(longest):
            return min(rt.capacity, max(1, -(-longest // SLOT_STEP) * SLOT_STEP))

        r = rt.generate(PROMPTS[0], mode="ar", max_new_tokens=6, eos=-1)
        assert {b for _, b, _, _ in seen} == {1}
        assert all(n == bound(longest) for _, _, n, longest in seen), seen
        assert r.stats.rows_per_forward == 1.0
        assert any(n < rt.capacity for _, _, n, _ in seen)
        seen.clear()
        calls = [dict(prompt_or_ids=p, mode="ar", max_new_tokens=12, eos=-1) for p in PROMPTS[:3]]
        results = run_concurrently(rt, calls)
        for call, result in zip(calls, results):
            assert result.tokens == reference(model, call["prompt_or_ids"], "ar", 12).tokens
        assert max(b for _, b, _, _ in seen) > 1, "concurrent requests never shared a forward"
        assert all(n == bound(longest) for _, _, n, longest in seen)

"""The continuous-batching engine: concurrent requests decode exactly as they would alone.

Greedy outputs are compared with the eager decoders run on one prompt at a time
(lossless per row), with rows of different modes in one batch, rows joining and
leaving mid-decode, a long prompt prefilled while other rows decode, and
``auto`` against AR greedy. Pressure: cancel, a full queue, timeouts.
"""

from __future__ import annotations

import json
import threading
import time

import pytest
import tiny_artifacts

import nemocompile
from nemocompile.runtime import Cancelled, Overloaded, RequestTimeout, Runtime

BLOCK = tiny_artifacts.BLOCK
PROMPTS = [[5, 9, 11, 20, 7], [3, 4], list(range(10, 40)), [7, 7, 7], [60, 61, 62, 63, 64, 65, 66, 67, 68]]


@pytest.fixture(scope="module")
def engine_artifact():
    return tiny_artifacts.batch4()


@pytest.fixture(scope="module")
def rt(engine_artifact):
    with Runtime.load(engine_artifact[1], threads=1) as runtime:
        yield runtime


def reference(model, prompt, mode, max_new_tokens):
    """The eager decoder on this prompt alone; auto's reference is AR greedy."""
    return nemocompile.generate(model, prompt, mode="ar" if mode == "auto" else mode, max_new_tokens=max_new_tokens,
                                block_length=BLOCK, eos_token_id=-1)


def run_concurrently(rt, calls: list[dict], stagger: float = 0.0) -> list:
    """Each call's generate() on its own thread (started ``stagger`` seconds apart)."""
    results: list = [None] * len(calls)

    def go(i):
        try:
            results[i] = rt.generate(**calls[i])
        except Exception as e:  # surfaced by the assertions
            results[i] = e

    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
        time.sleep(stagger)
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a request never finished"
    return results


@pytest.mark.parametrize("mode", ["ar", "diffusion", "linear-spec", "quadratic-spec", "auto"])
def test_concurrent_requests_of_one_mode_equal_their_solo_runs(mode, engine_artifact, rt):
    model, _ = engine_artifact
    calls = [dict(prompt_or_ids=p, mode=mode, max_new_tokens=n, eos=-1) for p, n in zip(PROMPTS, (19, 7, 13, 22, 9))]
    got = run_concurrently(rt, calls)  # 5 requests on 4 rows: one waits for a row, then joins
    for call, g in zip(calls, got):
        ref = reference(model, call["prompt_or_ids"], mode, call["max_new_tokens"])
        assert g.tokens == ref.tokens, f"{mode} {call['prompt_or_ids']}"
        if mode != "auto":
            assert g.stats.forwards == ref.stats.forwards
            assert g.stats.acceptance_lengths == ref.stats.acceptance_lengths
    if mode == "linear-spec":  # (this random model's quadratic drafts are never accepted)
        assert any(max(g.stats.acceptance_lengths) > 1 for g in got), "no draft was ever accepted: a weak test"


def test_modes_mixed_in_one_batch_and_rows_joining_mid_decode(engine_artifact, rt, monkeypatch):
    """Six requests of every mode (and a sampled one) on four rows, started apart: rows join as
    others decode and leave when they finish; each greedy output equals its solo eager run."""
    model, _ = engine_artifact
    run = rt.backend.run
    monkeypatch.setattr(rt.backend, "run", lambda key, *a: (time.sleep(0.003), run(key, *a))[1])  # rows stay a while
    modes = ["linear-spec", "ar", "quadratic-spec", "diffusion", "auto", "ar"]
    calls = [dict(prompt_or_ids=PROMPTS[i % len(PROMPTS)], mode=m, max_new_tokens=9 + 3 * i, eos=-1)
             for i, m in enumerate(modes)]
    calls.append(dict(prompt_or_ids=[1, 4], mode="ar", max_new_tokens=10, temperature=1.0, seed=3, eos=-1))
    sampled_alone = rt.generate(**calls[-1])
    got = run_concurrently(rt, calls, stagger=0.02)
    for call, g in zip(calls[:-1], got):
        ref = reference(model, call["prompt_or_ids"], call["mode"], call["max_new_tokens"])
        assert g.tokens == ref.tokens, call
    assert got[-1].tokens == sampled_alone.tokens  # a seeded draw never depends on the other rows
    assert any(g.stats.queue_s > 0.01 for g in got), "no request waited for a row: rows never joined mid-decode"


def test_a_long_prompt_is_prefilled_while_other_rows_decode(engine_artifact, rt):
    model, _ = engine_artifact
    log = []
    rt.engine.listeners.append(lambda kind, value: log.append(value[0][0]) if kind == "step" else None)
    try:
        short = rt.submit([5, 9], mode="ar", max_new_tokens=40, eos=-1)
        long = rt.submit(list(range(10, 50)), mode="ar", max_new_tokens=5, eos=-1)  # 3 prefill chunks
        got = [short.result()[0], long.result()[0]]
    finally:
        rt.engine.listeners.pop()
    assert got[0].tokens == reference(model, [5, 9], "ar", 40).tokens
    assert got[1].tokens == reference(model, list(range(10, 50)), "ar", 5).tokens
    # the long prompt's chunks run in ticks where the short request's ar steps run too
    chunks = [i for i, step in enumerate(log) if step == "prefill"]
    assert len(chunks) in (3, 4) and any(log[i] == "ar_step" for i in range(chunks[-3], chunks[-1])), log


def test_linear_spec_rows_that_join_apart_fall_into_one_phase(engine_artifact, rt, monkeypatch):
    """A row that joins while another drafts or verifies waits a tick rather than running its
    draft beside the other's verify every tick: the two share each forward from then on."""
    model, _ = engine_artifact
    run = rt.backend.run
    monkeypatch.setattr(rt.backend, "run", lambda key, *a: (time.sleep(0.003), run(key, *a))[1])
    log = []
    rt.engine.listeners.append(lambda kind, value: log.append(value[:2]) if kind == "step" else None)
    try:
        first = rt.generate(PROMPTS[0], mode="linear-spec", max_new_tokens=40, eos=-1, stream=True)
        next(first)
        second = rt.submit(PROMPTS[1], mode="linear-spec", max_new_tokens=30, eos=-1).result()[0]
        rest = [t for chunk in first for t in chunk]
    finally:
        rt.engine.listeners.pop()
    assert second.tokens == reference(model, PROMPTS[1], "linear-spec", 30).tokens
    assert len(rest) > 0 and first.result.tokens == reference(model, PROMPTS[0], "linear-spec", 40).tokens
    spec = [(key, rows) for key, rows in log if key[0] in ("draft", "verify")]
    shared = sum(rows == 2 for _, rows in spec)
    cycles = len(second.stats.acceptance_lengths)
    assert shared >= 2 * cycles - 4, f"{shared} shared forwards for {cycles} cycles of the joining row"


def test_auto_equals_ar_greedy_and_follows_the_cost_table(engine_artifact, tmp_path):
    """With a cost table that makes linear-spec cheap, auto runs it (and says why); with one
    that makes ar cheap, only ar. Either way the text is AR greedy's."""
    import shutil

    model, path = engine_artifact
    art = tmp_path / "art"
    shutil.copytree(path, art)
    graphs = json.loads((art / "manifest.json").read_text())["graphs"]
    base = {"format": "nemocompile-costs", "version": 1, "backend": "onnxruntime", "threads": 1, "batch_size": 4,
            "measured_at": "test"}
    for cheap, expect in (("linear-spec", {"linear-spec"}), ("ar", {"ar"})):
        step_s = {f"{g['step']}@{g['block_length']}": 1.0 for g in graphs}
        step_s["ar_step@1"] = 1.0 if cheap == "linear-spec" else 1e-4
        step_s["draft@8"] = step_s["verify@8"] = 0.1 if cheap == "linear-spec" else 1.0
        (art / "costs.json").write_text(json.dumps({**base, "step_s": step_s,
                                                     "acceptance": {"linear-spec@8": 2.0, "quadratic-spec@8": 1.5}}))
        with Runtime.load(art, threads=1) as rt:
            for prompt in PROMPTS[:3]:
                got = rt.generate(prompt, mode="auto", max_new_tokens=15, eos=-1)
                assert got.tokens == reference(model, prompt, "ar", 15).tokens
                assert set(got.stats.mode_mix) == expect, got.stats.mode_mix
                assert got.stats.auto_reason.startswith("linear-spec@8" if cheap == "linear-spec" else "ar")


def test_auto_switching_modes_mid_request_stays_lossless(engine_artifact, rt, monkeypatch):
    """A policy that rotates ar -> linear-spec -> quadratic-spec every cycle: each switch (quadratic
    entered from [p, MASK...], its draft dropped on leaving) keeps the AR greedy text."""
    model, _ = engine_artifact
    order = [("ar", None), ("linear-spec", BLOCK), ("quadratic-spec", BLOCK), ("quadratic-spec", BLOCK)]
    turn = iter(range(10**6))
    monkeypatch.setattr(rt.engine, "choose_mode", lambda row: order[next(turn) % len(order)])
    for prompt in PROMPTS[:3]:
        got = rt.generate(prompt, mode="auto", max_new_tokens=25, eos=-1)
        assert got.tokens == reference(model, prompt, "ar", 25).tokens
        assert set(got.stats.mode_mix) == {"ar", "linear-spec", "quadratic-spec"}


# ---- pressure -------------------------------------------------------------------------
def _slow(rt, seconds: float = 0.01):
    """Every forward takes at least ``seconds`` (this tiny model's take well under a millisecond),
    so requests hold their rows long enough to observe."""
    run = rt.backend.run
    rt.backend.run = lambda key, *a: (time.sleep(seconds), run(key, *a))[1]


def _hold_rows(rt, n: int, max_new_tokens: int = 80):
    """n streamed requests that keep rows busy until closed (on a _slow runtime)."""
    streams = []
    for _ in range(n):
        streams.append(rt.generate(PROMPTS[0], mode="ar", max_new_tokens=max_new_tokens, eos=-1, stream=True))
        next(streams[-1])  # it has a row
    return streams


def test_cancel_frees_the_row_for_a_waiting_request(engine_artifact):
    _, path = engine_artifact
    with Runtime.load(path, threads=1) as rt:
        _slow(rt)
        streams = _hold_rows(rt, 4)
        waiting = rt.submit(PROMPTS[1], mode="ar", max_new_tokens=3, eos=-1)
        time.sleep(0.05)
        assert waiting.started == 0 and rt.engine.queue_depth == 1  # every row is busy
        streams[2].close()
        assert len(waiting.result()[0].tokens) == 3  # it got the freed row
        with pytest.raises(Cancelled):
            list(streams[2])
        for s in streams[:2] + streams[3:]:
            assert sum(map(len, s)) + 1 == 80  # the others ran to the end (+ the first chunk read above)


def test_a_full_queue_refuses_with_overloaded(engine_artifact):
    _, path = engine_artifact
    with Runtime.load(path, threads=1, max_queue=1) as rt:
        _slow(rt)
        streams = _hold_rows(rt, 4)
        queued = rt.submit(PROMPTS[1], mode="ar", max_new_tokens=2, eos=-1)
        with pytest.raises(Overloaded, match="--max-queue 1"):
            rt.submit(PROMPTS[1], mode="ar", max_new_tokens=2, eos=-1)
        for s in streams:
            s.close()
        assert len(queued.result()[0].tokens) == 2


def test_a_timeout_ends_only_its_own_request(engine_artifact):
    model, path = engine_artifact
    with Runtime.load(path, threads=1) as rt:
        _slow(rt, 0.002)
        _timeout_ends_only_its_own(model, rt)


def _timeout_ends_only_its_own(model, rt):
    slow = rt.submit(PROMPTS[0], mode="ar", max_new_tokens=80, eos=-1, timeout=0.05)
    other = rt.submit(PROMPTS[1], mode="linear-spec", max_new_tokens=30, eos=-1)
    with pytest.raises(RequestTimeout, match="timeout of 0.05 s"):
        slow.result()
    assert other.result()[0].tokens == reference(model, PROMPTS[1], "linear-spec", 30).tokens


def test_async_iteration(engine_artifact, rt):
    import asyncio

    model, _ = engine_artifact

    async def main():
        jobs = [rt.submit(p, mode="quadratic-spec", max_new_tokens=12, eos=-1) for p in PROMPTS[:3]]

        async def collect(job):
            return [t for _, chunk in [e async for e in job] for t in chunk]

        return await asyncio.gather(*(collect(j) for j in jobs))

    for prompt, tokens in zip(PROMPTS, asyncio.run(main())):
        assert tokens == reference(model, prompt, "quadratic-spec", 12).tokens

"""The prefix cache: a request that starts from K/V an earlier request left in the cache
decodes exactly the tokens it decodes cold, in every mode, with rows joining and leaving,
under a token budget that evicts, and over HTTP (``usage.prompt_tokens_details``)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import tiny_artifacts

from nemocompile.runtime import Runtime
from nemocompile.runtime.cache import KVCache

MODES = ["ar", "diffusion", "linear-spec", "quadratic-spec", "auto"]
BASE = list(range(10, 40))  # 30 tokens: two prefill chunks (P = 16)
OTHER = [70, 71, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81]
P = tiny_artifacts.PREFILL


@pytest.fixture(scope="module")
def artifact():
    return tiny_artifacts.batch4()[1]  # batch 4, capacity 96, prefill chunks of 16, block 8


@pytest.fixture(scope="module")
def cold(artifact):
    with Runtime.load(artifact, threads=1, prefix_cache=False) as rt:
        yield rt


@pytest.fixture(scope="module")
def warm(artifact):
    with Runtime.load(artifact, threads=1) as rt:
        yield rt


def cold_tokens(cold, prompt, mode, n=8):
    return cold.generate(prompt, mode=mode, max_new_tokens=n, eos=-1).tokens


def limit(prompt, mode):
    """The most a prompt may reuse: its last token is always prefilled; quadratic-spec keeps a full last chunk."""
    return max(len(prompt) - (P if mode == "quadratic-spec" else 1), 0)


@pytest.mark.parametrize("mode", MODES)
def test_sharing_none_part_all_or_more_than_all_of_a_cached_prompt_decodes_as_cold(mode, cold, warm):
    warm.prefix.clear()
    hits = warm.prefix.hits
    cases = [  # (prompt, the prompt tokens the cache holds for it)
        (BASE, 0),
        (BASE[:20] + OTHER[:3], 20),  # part: the first 20 tokens
        (BASE, 30),  # all of it
        (BASE + [3, 4, 5, 6], 30),  # more than all: the cached prompt, then tokens it never had
        (OTHER, 0),  # nothing
        (BASE[:12], 12),  # a prefix of the cached prompt (its last token is prefilled again)
    ]
    for prompt, held in cases:
        got = warm.generate(prompt, mode=mode, max_new_tokens=8, eos=-1)
        assert got.tokens == cold_tokens(cold, prompt, mode), (mode, prompt)
        assert got.stats.cached_prompt_tokens == min(held, limit(prompt, mode)), (mode, prompt)
    assert warm.prefix.hits - hits == (3 if mode == "quadratic-spec" else 4)


def test_rows_joining_and_leaving_reuse_each_other_and_decode_as_cold(cold, warm, monkeypatch):
    """Nine requests of every mode on four rows, started apart, sharing prefixes with rows
    in flight and with rows that finished; a quadratic-spec prompt shorter than a chunk
    (left padded) lends its slots to rows that start at slot 0."""
    warm.prefix.clear()
    run = warm.backend.run
    monkeypatch.setattr(warm.backend, "run", lambda key, b, n: (time.sleep(0.002), run(key, b, n))[1])
    short = BASE[:10]
    calls = [(BASE, "ar", 20), (short, "quadratic-spec", 9), (BASE + [1, 2], "linear-spec", 12),
             (BASE[:25] + OTHER, "diffusion", 10), (short + [5, 6, 7], "ar", 6), (BASE, "auto", 14),
             (OTHER + BASE, "quadratic-spec", 8), (BASE[:18], "linear-spec", 9), (short, "ar", 5)]
    results: list = [None] * len(calls)

    def go(i):
        prompt, mode, n = calls[i]
        try:
            results[i] = warm.generate(prompt, mode=mode, max_new_tokens=n, eos=-1)
        except Exception as e:  # surfaced below
            results[i] = e

    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
        time.sleep(0.01)
    for t in threads:
        t.join(timeout=120)
    for (prompt, mode, n), got in zip(calls, results):
        assert not isinstance(got, Exception), got
        assert got.tokens == cold_tokens(cold, prompt, mode, n), (mode, prompt)
    assert sum(r.stats.cached_prompt_tokens > 0 for r in results) >= 4


def test_log_probs_after_a_reused_prefix_equal_cold_ones_to_fp32_tolerance(cold, warm, monkeypatch):
    """The first token's log-probs come from a prefill that starts after the reused slots (other
    chunk boundaries than cold's): equal to 1e-4, fp32's tolerance (measured: 4e-6)."""
    from nemocompile.runtime.row import Row

    seen: dict = {}
    choose = Row.choose

    def spy(self, io, column):
        seen.setdefault(self.rt is warm, []).append(np.array(io.logits[self.j, column], dtype=np.float64))
        return choose(self, io, column)

    monkeypatch.setattr(Row, "choose", spy)
    warm.prefix.clear()
    hits = warm.prefix.hits
    prompts = [BASE, BASE[:20] + OTHER[:5], BASE + OTHER[:3]]
    for prompt in prompts:
        assert warm.generate(prompt, max_new_tokens=1, eos=-1).tokens == cold_tokens(cold, prompt, "ar", 1)
    assert warm.prefix.hits - hits == 2
    for w, c in zip(seen[True], seen[False]):
        np.testing.assert_allclose(w - np.logaddexp.reduce(w), c - np.logaddexp.reduce(c), atol=1e-4)


def test_a_small_budget_evicts_the_least_recently_used_rows(artifact, cold):
    with Runtime.load(artifact, threads=1, prefix_cache_tokens=50) as rt:
        a, b = BASE, OTHER + BASE[:20]  # 30 and 32 tokens; each row keeps its prompt and 8 decoded tokens
        rt.generate(a, max_new_tokens=8, eos=-1)
        assert rt.prefix.cached_tokens == 37  # the last decoded token was never run: not in the cache
        rt.generate(b, max_new_tokens=8, eos=-1)  # 37 + 39 > 50: a's row, the least recently used, goes
        assert rt.prefix.cached_tokens == 39 and rt.prefix.evicted == 37
        again_a = rt.generate(a, max_new_tokens=8, eos=-1)
        assert again_a.stats.cached_prompt_tokens == 0 and again_a.tokens == cold_tokens(cold, a, "ar")
        # a's second run evicted b's row in turn
        again_b = rt.generate(b, max_new_tokens=8, eos=-1)
        assert again_b.stats.cached_prompt_tokens == 0
    with Runtime.load(artifact, threads=1, prefix_cache_tokens=0) as rt:
        rt.generate(a, max_new_tokens=4, eos=-1)
        assert rt.prefix.cached_tokens == 0
        assert rt.generate(a, max_new_tokens=4, eos=-1).stats.cached_prompt_tokens == 0


def test_a_row_reading_reused_slots_keeps_them_while_others_would_evict(artifact, cold):
    """Row A decodes from slots it reuses in place (every row holds a finished prompt, so none is
    empty); meanwhile five requests with other prompts take the other rows one after another,
    evicting what they held, and one more copies A's prompt out of A's busy row. A's slots are
    never given out while it reads them: every output is cold's."""
    with Runtime.load(artifact, threads=1) as rt:
        run = rt.backend.run
        rt.backend.run = lambda key, b, n: (time.sleep(0.002), run(key, b, n))[1]
        rt.generate([OTHER, [1, 2, 3] * 5, OTHER[:5] + BASE, BASE], max_new_tokens=4, eos=-1)  # every row kept
        job_a = rt.submit(BASE + [1], mode="linear-spec", max_new_tokens=40, eos=-1)
        time.sleep(0.05)
        others = [rt.submit([90 + i] + OTHER, max_new_tokens=6, eos=-1) for i in range(5)]
        twin = rt.submit(BASE + [2], mode="ar", max_new_tokens=6, eos=-1)
        a = job_a.result()[0]
        assert a.stats.cached_prompt_tokens == 30
        assert a.tokens == cold_tokens(cold, BASE + [1], "linear-spec", 40)
        for i, job in enumerate(others):
            assert job.result()[0].tokens == cold_tokens(cold, [90 + i] + OTHER, "ar", 6)
        t = twin.result()[0]
        assert t.stats.cached_prompt_tokens >= 30 and t.tokens == cold_tokens(cold, BASE + [2], "ar", 6)
        assert rt.prefix.evicted > 0


def test_a_left_padded_prompt_is_reused_in_place_by_a_row_that_starts_at_slot_zero(artifact, cold):
    """quadratic-spec pads a prompt shorter than a chunk on the left (row_start > 0); an ar request
    that shares it and gets that very row (no row is empty) moves the slots to start at 0."""
    short = BASE[:10]
    with Runtime.load(artifact, threads=1) as rt:
        rt.generate([OTHER, OTHER[1:], OTHER[2:]], max_new_tokens=2, eos=-1)  # three rows kept
        rt.generate(short, mode="quadratic-spec", max_new_tokens=2, eos=-1)  # the fourth, padded by 6
        assert rt.cache.row_start.tolist().count(P - len(short)) == 1 and rt.prefix.kept.all()
        got = rt.generate(short + [5, 6, 7], max_new_tokens=8, eos=-1)
        assert got.stats.cached_prompt_tokens >= 10 and rt.cache.row_start.tolist() == [0, 0, 0, 0]
        assert got.tokens == cold_tokens(cold, short + [5, 6, 7], "ar")


def test_a_row_copies_slots_within_itself_and_between_rows():
    data = np.random.default_rng(0).standard_normal((2, 1, 2, 1, 12, 3)).astype(np.float32)
    cache = KVCache(data, 2)
    want = data[:, :, 0, :, 2:9].copy()
    cache.copy(0, 0, 7, src_start=2, dst_start=0)  # overlapping ranges of one row, moved left
    np.testing.assert_array_equal(data[:, :, 0, :, 0:7], want)
    cache.copy(0, 1, 7, src_start=0, dst_start=5)
    np.testing.assert_array_equal(data[:, :, 1, :, 5:12], want)


def test_http_reports_cached_tokens_and_four_choices_reuse_their_context(warm, cold):
    """lm-eval scores a multiple-choice item as 4 requests: one context, 4 continuations."""
    from fastapi.testclient import TestClient

    from nemocompile.runtime.serve.http import create_app

    warm.prefix.clear()
    context = list(range(20, 60))
    choices = [[3, 4], [5], [6, 7, 8], [9, 10]]
    with TestClient(create_app(warm, "tiny")) as client:
        usages = []
        for choice in choices:
            r = client.post("/v1/completions", json={"prompt": context + choice, "max_tokens": 1, "eos": -1})
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["tokens"] == cold_tokens(cold, context + choice, "ar", 1)
            usages.append(r.json()["usage"])
        assert [u["prompt_tokens_details"]["cached_tokens"] for u in usages] == [0, 40, 40, 40]
        computed = sum(u["prompt_tokens"] - u["prompt_tokens_details"]["cached_tokens"] for u in usages)
        assert computed <= 0.35 * sum(u["prompt_tokens"] for u in usages)
        # the same four sent together: three wait for the first one's context, then copy it
        warm.prefix.clear()
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(4) as pool:
            replies = list(pool.map(lambda c: client.post("/v1/completions", json={
                "prompt": [1] + context + c, "max_tokens": 1, "eos": -1}).json(), choices))
        assert sorted(r["usage"]["prompt_tokens_details"]["cached_tokens"] for r in replies) == [0, 41, 41, 41]
        metrics = client.get("/metrics").text
        # lm-eval's loglikelihood: echo scores every prompt token; a row that scored its prompt lends
        # its slots and scores, up to the last shared token (whose own score comes with it)
        warm.prefix.clear()
        echoed = [client.post("/v1/completions", json={"prompt": context + c, "max_tokens": 0, "echo": True,
                                                       "logprobs": 1}).json() for c in choices]
    assert [e["usage"]["prompt_tokens_details"]["cached_tokens"] for e in echoed] == [0, 39, 39, 39]
    with TestClient(create_app(cold, "tiny")) as cold_client:
        for c, e in zip(choices, echoed):
            want = cold_client.post("/v1/completions", json={"prompt": context + c, "max_tokens": 0, "echo": True,
                                                              "logprobs": 1}).json()["choices"][0]["logprobs"]
            got = e["choices"][0]["logprobs"]
            assert got["tokens"] == want["tokens"] and got["token_logprobs"][0] is want["token_logprobs"][0] is None
            assert got["token_logprobs"][1:] == pytest.approx(want["token_logprobs"][1:], abs=1e-4)
            assert [list(t) for t in got["top_logprobs"][1:]] == [list(t) for t in want["top_logprobs"][1:]]
    values = {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines()
              if line.startswith("nemocompile_prefix_cache")}
    assert values['nemocompile_prefix_cache_requests_total{result="hit"}'] == 6
    assert values['nemocompile_prefix_cache_requests_total{result="miss"}'] == 2
    assert values["nemocompile_prefix_cache_hit_tokens_total"] == 3 * 40 + 3 * 41


def test_bench_shared_prefix_puts_the_same_tokens_before_every_prompt():
    from nemocompile.errors import NemocompileError
    from nemocompile.runtime.bench.load import with_shared_prefix

    got = with_shared_prefix([[5, 6, 7], [8, 9]], 7, None)
    assert got == [[5, 6, 7, 8, 9, 5, 6, 5, 6, 7], [5, 6, 7, 8, 9, 5, 6, 8, 9]]
    with pytest.raises(NemocompileError, match="token-id prompts"):
        with_shared_prefix(["def f():"], 4, None)

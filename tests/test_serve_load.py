"""Serving under load, over a real loopback HTTP server and a real stdio subprocess.

The HTTP server runs in this process (uvicorn on a loopback socket, the app
``serve --http`` runs) so its runtime's forwards can be slowed down: this tiny
model decodes a request in milliseconds, too fast to hold rows busy while a
test looks. Every request loop is bounded.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import tiny_artifacts

import nemocompile
from nemocompile.runtime import Runtime

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [[5, 9, 11, 20, 7], [3, 4], list(range(10, 40)), [7, 7, 7]]


@pytest.fixture(scope="module")
def served():
    """(model, base URL, runtime) of an in-process server over the batch-4 artifact, max queue 1."""
    import uvicorn

    from nemocompile.runtime.serve.http import create_app

    model, path = tiny_artifacts.batch4()
    rt = Runtime.load(path, threads=1, max_queue=1)
    run = rt.backend.run
    rt.delay = [0.004]  # seconds added to every forward: rows stay busy a while
    rt.backend.run = lambda key, *a: (time.sleep(rt.delay[0]), run(key, *a))[1]
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(rt, "tiny"), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "the server did not start"
    yield model, f"http://127.0.0.1:{sock.getsockname()[1]}", rt
    server.should_exit = True
    thread.join(timeout=30)
    rt.close()


def complete(url: str, **body) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", json={"max_tokens": 12, "eos": -1, **body}, timeout=60)


def hold(url: str, n: int) -> list:
    """n streamed requests that each hold a row until their stream is closed."""
    streams = []
    for _ in range(n):
        cm = httpx.stream("POST", f"{url}/v1/completions", timeout=60,
                          json={"prompt": PROMPTS[0], "max_tokens": 85, "eos": -1, "stream": True})
        response = cm.__enter__()
        lines = response.iter_lines()
        next(line for line in lines if line.startswith("data: "))  # it has a row and a first token
        streams.append((cm, lines))
    return streams


def wait_for(predicate, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return False


def test_concurrent_http_requests_of_mixed_modes_equal_their_solo_runs(served):
    model, url, _ = served
    jobs = [(m, p) for m in ("ar", "linear-spec", "quadratic-spec", "auto", "diffusion") for p in PROMPTS[:2]]

    def call(job):
        mode, prompt = job
        return complete(url, prompt=prompt, mode=mode).json()

    with ThreadPoolExecutor(4) as pool:  # 4 in flight: the queue (max 1) never overflows
        replies = list(pool.map(call, jobs))
    for (mode, prompt), reply in zip(jobs, replies):
        ref = nemocompile.generate(model, prompt, mode="ar" if mode == "auto" else mode, max_new_tokens=12,
                                   block_length=tiny_artifacts.BLOCK, eos_token_id=-1)
        assert reply["choices"][0]["tokens"] == ref.tokens, (mode, reply)
        assert sum(reply["usage"]["mode_mix"].values()) >= 1


def test_a_full_queue_is_a_429_and_a_disconnect_frees_its_row(served):
    _, url, rt = served
    rt.delay[0] = 0.05  # 85 tokens: over 4 s a row
    streams = hold(url, 4)  # every row busy
    try:
        queued = ThreadPoolExecutor(1).submit(complete, url, prompt=PROMPTS[1], max_tokens=3)
        assert wait_for(lambda: rt.engine.queue_depth == 1)
        refused = complete(url, prompt=PROMPTS[1], max_tokens=3)
        assert refused.status_code == 429
        error = refused.json()["error"]
        assert error["type"] == "overloaded" and "retry later" in error["message"]
        cm, _ = streams.pop()
        cm.__exit__(None, None, None)  # the client goes away mid-stream
        reply = queued.result(timeout=60)  # ... and the queued request gets its row
        assert reply.status_code == 200 and len(reply.json()["choices"][0]["tokens"]) == 3
        assert rt.engine.active_rows <= 3
    finally:
        for cm, _ in streams:
            cm.__exit__(None, None, None)
        rt.delay[0] = 0.004
    assert wait_for(lambda: rt.engine.active_rows == 0)  # every disconnect freed its row


def test_a_request_timeout_is_a_504_and_the_others_finish(served):
    model, url, _ = served
    with ThreadPoolExecutor(2) as pool:
        slow = pool.submit(complete, url, prompt=PROMPTS[0], max_tokens=85, timeout=0.05)
        fine = pool.submit(complete, url, prompt=PROMPTS[1], max_tokens=20)
        assert slow.result().status_code == 504 and slow.result().json()["error"]["type"] == "timeout"
        ref = nemocompile.generate(model, PROMPTS[1], mode="ar", max_new_tokens=20, eos_token_id=-1)
        assert fine.result().json()["choices"][0]["tokens"] == ref.tokens


def test_metrics_in_prometheus_text(served):
    from prometheus_client.parser import text_string_to_metric_families

    _, url, _ = served
    complete(url, prompt=PROMPTS[0], mode="linear-spec")
    text = httpx.get(f"{url}/metrics", timeout=30).text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in ("nemocompile_queue_depth", "nemocompile_active_rows", "nemocompile_tokens_per_second",
                 "nemocompile_time_to_first_token_seconds", "nemocompile_request_latency_seconds",
                 "nemocompile_mode_cycles", "nemocompile_generated_tokens", "nemocompile_requests_rejected"):
        assert name in families, name
    cycles = {s.labels["mode"]: s.value for s in families["nemocompile_mode_cycles"].samples
              if s.name.endswith("_total")}
    assert cycles.get("linear-spec", 0) >= 1
    ttft = [s for s in families["nemocompile_time_to_first_token_seconds"].samples if s.name.endswith("_count")]
    assert ttft and ttft[0].value >= 1


def test_stdio_cancel_frees_the_row(tmp_path):
    """A real `serve --stdio` on the embedded model (batch 1): a cancelled stream ends with a
    "cancelled" final line, and the next request gets the row."""
    art = tiny_artifacts.embedded()
    proc = subprocess.Popen([sys.executable, "-m", "nemocompile", "serve", "--stdio", "--artifact", str(art),
                             "--threads", "1"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, cwd=ROOT)
    try:
        send = lambda obj: (proc.stdin.write(json.dumps(obj) + "\n"), proc.stdin.flush())  # noqa: E731
        send({"id": "long", "prompt": "def f(", "max_new_tokens": 120, "eos": -1, "stream": True})
        assert json.loads(proc.stdout.readline())["event"] == "tokens"
        send({"cancel": "long"})
        send({"id": "next", "prompt": "def g(", "max_new_tokens": 4, "eos": -1})
        proc.stdin.close()
        finals = {}
        for line in proc.stdout:
            m = json.loads(line)
            if m.get("done"):
                finals[m["id"]] = m
        assert proc.wait(timeout=120) == 0
        assert finals["long"]["error"]["type"] == "cancelled"
        assert len(finals["next"]["tokens"]) == 4
    finally:
        if proc.poll() is None:
            proc.kill()

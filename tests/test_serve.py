"""The servers as real subprocesses: `serve --stdio` driven over pipes, `serve --http`
over loopback with an HTTP client (streaming included). Every answer is checked
against the in-process runtime on the same artifact."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from nemocompile.runtime import Runtime

from test_runtime import CAPACITY, PROMPTS, exported

ROOT = Path(__file__).resolve().parents[1]
SERVE = [sys.executable, "-m", "nemocompile", "serve"]


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    return exported(tmp_path_factory)


@pytest.fixture(scope="module")
def ort(artifact):
    with Runtime.load(artifact, threads=1) as rt:
        yield rt


# ---- stdio -----------------------------------------------------------------------------
def test_stdio_serves_valid_malformed_and_concurrent_requests(artifact, ort):
    requests = [
        '{"id": 1, "prompt": [5, 9, 11, 20, 7], "mode": "linear-spec", "max_new_tokens": 12, "eos": -1}',
        "this is not json",
        '{"id": "two", "prompt": "def f(", "mode": "diffusion", "max_new_tokens": 9, "stream": true, "eos": -1}',
        '{"id": 3, "prompt": [5], "temprature": 0.5}',
        '{"id": 4, "prompt": [5], "max_new_tokens": "ten"}',
        f'{{"id": 5, "prompt": [5], "max_new_tokens": {CAPACITY}}}',
        '[1, 2, 3]',
        '{"id": 6, "messages": [{"role": "user", "content": "hi"}], "max_new_tokens": 6, "eos": -1}',
        '{"id": 7, "prompt": [1, 4], "mode": "ar", "max_new_tokens": 10, "temperature": 1.0, "seed": 3, "eos": -1}',
        '{"id": 8, "prompt": [5], "mode": "diffusion", "block_length": 16}',
        '',
        '{"id": 9, "prompt": [60, 61, 62, 63, 64, 65, 66, 67, 68, 69], "max_new_tokens": 7, "eos": -1}',
        '{"id": 10, "messages": [{"role": "user", "content": "hi"}], "max_new_tokens": 6, "eos": -1, '
        '"chat_template_kwargs": {"enable_thinking": false}}',
        '{"id": 11, "prompt": "hi", "chat_template_kwargs": {"enable_thinking": false}}',
        '{"id": 12, "prompt": [5, 9, 11, 20, 7], "mode": "quadratic-spec", "max_new_tokens": 12, "eos": -1}',
        '{"id": 13, "prompt": [5, 9], "mode": "linear-spec", "max_new_tokens": 9, "eos": -1, '
        '"max_thinking_tokens": 3, "end_think_token_id": 4}',
    ]
    proc = subprocess.run(SERVE + ["--stdio", "--artifact", str(artifact), "--threads", "1"],
                          input="\n".join(requests) + "\n", capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr  # EOF on stdin ends the server cleanly
    lines = [json.loads(line) for line in proc.stdout.splitlines()]  # every stdout line is JSON
    finals = [m for m in lines if m.get("done")]
    # one final line per non-empty request line (requests run concurrently: in any order)
    assert sorted(map(str, (m["id"] for m in finals))) == sorted(
        map(str, [1, None, "two", 3, 4, 5, None, 6, 7, 8, 9, 10, 11, 12, 13]))

    def expect(rid, *args, **kw):
        got = next(m for m in finals if m["id"] == rid)
        assert "error" not in got, got
        ref = ort.generate(*args, **kw)
        assert got["tokens"] == ref.tokens and got["text"] == ref.text
        assert got["stats"]["forwards"] == ref.stats.forwards and got["finish_reason"] == ref.finish_reason

    expect(1, [5, 9, 11, 20, 7], mode="linear-spec", max_new_tokens=12, eos=-1)
    expect("two", "def f(", mode="diffusion", max_new_tokens=9, eos=-1)
    expect(6, [{"role": "user", "content": "hi"}], chat=True, max_new_tokens=6, eos=-1)
    expect(7, [1, 4], mode="ar", max_new_tokens=10, temperature=1.0, seed=3, eos=-1)
    expect(9, PROMPTS[2][:10], max_new_tokens=7, eos=-1)
    chat = [{"role": "user", "content": "hi"}]
    expect(10, chat, chat=True, chat_template_kwargs={"enable_thinking": False}, max_new_tokens=6, eos=-1)
    no_think = ort.encode(chat, True, {"enable_thinking": False})[0][0]
    assert no_think[:len(ort.encode(chat, True)[0][0])] == ort.encode(chat, True)[0][0] and len(no_think) == \
        len(ort.encode(chat, True)[0][0]) + len("<think></think>")  # the template saw the flag
    assert "only apply to chats" in next(m for m in finals if m["id"] == 11)["error"]["message"]
    expect(12, [5, 9, 11, 20, 7], mode="quadratic-spec", max_new_tokens=12, eos=-1)
    expect(13, [5, 9], mode="linear-spec", max_new_tokens=9, eos=-1, max_thinking_tokens=3, end_think_token_id=4)

    events = [m for m in lines if m.get("event") == "tokens"]
    assert events and all(m["id"] == "two" for m in events)
    final_two = next(m for m in finals if m["id"] == "two")
    assert [t for m in events for t in m["tokens"]] == final_two["tokens"]
    assert "".join(m["text"] for m in events) == final_two["text"]
    assert lines.index(events[-1]) < lines.index(final_two)

    errors = {m["id"]: m["error"] for m in finals if "error" in m}
    assert set(errors) == {None, 3, 4, 5, 8, 11}
    assert errors[3]["message"].startswith("unknown field(s) ['temprature']")
    assert "max_new_tokens must be an integer" in errors[4]["message"]
    assert "KV cache capacity" in errors[5]["message"]
    assert "block length(s) [4], not 16" in errors[8]["message"]
    assert all(e["message"] for e in errors.values())
    null_errors = [m["error"]["type"] for m in finals if m["id"] is None]
    assert null_errors == ["invalid_json", "invalid_request"]


def test_stdio_answers_each_request_before_the_next_arrives(artifact, ort):
    proc = subprocess.Popen(SERVE + ["--stdio", "--artifact", str(artifact), "--threads", "1"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT)
    try:
        for rid, mode in enumerate(["ar", "diffusion", "linear-spec"]):
            proc.stdin.write(json.dumps({"id": rid, "prompt": PROMPTS[0], "mode": mode, "max_new_tokens": 8,
                                         "eos": -1}) + "\n")
            proc.stdin.flush()
            reply = json.loads(proc.stdout.readline())  # answered while stdin stays open
            assert reply["id"] == rid and reply["tokens"] == ort.generate(PROMPTS[0], mode=mode, max_new_tokens=8,
                                                                          eos=-1).tokens
        proc.stdin.close()
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_the_example_client_runs(artifact):
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "stdio_client.py"), "--artifact", str(artifact),
                           "--prompt", "def f(", "--max-new-tokens", "8"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "[linear-spec:" in proc.stdout and "[ar:" in proc.stdout


# ---- HTTP ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(artifact):
    """`serve --http --port 0` as a subprocess; yields its base URL."""
    proc = subprocess.Popen(SERVE + ["--http", "--artifact", str(artifact), "--port", "0", "--threads", "1",
                                     "--model-name", "tiny"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    url, seen = None, []
    deadline = time.monotonic() + 90
    while url is None and time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        seen.append(line)
        if "listening on " in line:
            url = line.rsplit("listening on ", 1)[1].strip()
    if url is None:
        proc.kill()
        pytest.fail("the HTTP server did not start:\n" + "".join(seen))
    threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep its stderr pipe drained
    yield url
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def client(server):
    httpx = pytest.importorskip("httpx")
    with httpx.Client(base_url=server, timeout=60) as c:
        yield c


def sse(response) -> list:
    """The data payloads of a server-sent-event stream, [DONE] included."""
    out = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            payload = line[len("data: "):]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def test_http_binds_loopback_and_reports_health_and_models(server, client):
    assert server.startswith("http://127.0.0.1:")
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["modes"] == ["ar", "diffusion", "linear-spec", "quadratic-spec", "auto"]
    assert health["block_lengths"] == [4] and health["cache_capacity"] == CAPACITY
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["tiny"]


@pytest.mark.parametrize("mode", ["ar", "diffusion", "linear-spec", "quadratic-spec"])
def test_http_completions_match_the_runtime(mode, client, ort):
    body = {"model": "tiny", "prompt": "def f(x):", "max_tokens": 11, "mode": mode, "eos": -1}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    data = r.json()
    ref = ort.generate("def f(x):", mode=mode, max_new_tokens=11, eos=-1)
    choice = data["choices"][0]
    assert data["object"] == "text_completion" and choice["text"] == ref.text and choice["tokens"] == ref.tokens
    assert choice["finish_reason"] == "length"
    u = data["usage"]
    assert u["completion_tokens"] == 11 and u["prompt_tokens"] == len("def f(x):")
    assert u["forwards"] == ref.stats.forwards and u["tokens_per_forward"] == pytest.approx(11 / ref.stats.forwards)


def test_http_completion_streams_tokens_as_committed(client, ort):
    body = {"prompt": [5, 9, 11, 20, 7], "max_tokens": 14, "mode": "linear-spec", "eos": -1, "stream": True,
            "stream_options": {"include_usage": True}}
    with client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse(r)
    ref = ort.generate([5, 9, 11, 20, 7], mode="linear-spec", max_new_tokens=14, eos=-1)
    assert events[-1] == "[DONE]"
    chunks = [e for e in events[:-1] if e["choices"]]
    assert [t for c in chunks for t in c["choices"][0]["tokens"]] == ref.tokens
    assert "".join(c["choices"][0]["text"] for c in chunks) == ref.text
    assert len(chunks) >= 1 + len(ref.stats.acceptance_lengths)  # one chunk per commit, then the finish
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    usage = events[-2]["usage"]
    assert events[-2]["choices"] == [] and usage["forwards"] == ref.stats.forwards
    assert usage["acceptance_length"] == pytest.approx(ref.stats.acceptance_length)


def test_http_chat_completions_plain_and_streamed(client, ort):
    messages = [{"role": "user", "content": "hi"}]
    ref = ort.generate(messages, chat=True, mode="diffusion", max_new_tokens=9, eos=-1)
    body = {"messages": messages, "max_tokens": 9, "mode": "diffusion", "eos": -1}
    data = client.post("/v1/chat/completions", json=body).json()
    assert data["object"] == "chat.completion"
    assert data["choices"][0]["message"] == {"role": "assistant", "content": ref.text}
    assert data["usage"]["forwards"] == ref.stats.forwards
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        events = sse(r)
    deltas = [e["choices"][0]["delta"] for e in events[:-1]]
    assert deltas[0]["role"] == "assistant"
    assert "".join(d.get("content", "") for d in deltas) == ref.text
    assert events[-2]["choices"][0]["finish_reason"] == "length" and events[-2]["usage"]["forwards"] > 0


def test_http_chat_passes_chat_template_kwargs(client, ort):
    messages = [{"role": "user", "content": "hi"}]
    kwargs = {"enable_thinking": False}
    ref = ort.generate(messages, chat=True, chat_template_kwargs=kwargs, max_new_tokens=7, eos=-1)
    body = {"messages": messages, "max_tokens": 7, "eos": -1}
    plain = client.post("/v1/chat/completions", json=body).json()
    data = client.post("/v1/chat/completions", json={**body, "chat_template_kwargs": kwargs}).json()
    assert data["choices"][0]["message"]["content"] == ref.text
    assert data["usage"]["prompt_tokens"] == plain["usage"]["prompt_tokens"] + len("<think></think>")
    bad = client.post("/v1/chat/completions", json={**body, "chat_template_kwargs": ["enable_thinking"]})
    assert bad.status_code == 400 and "chat_template_kwargs must be an object" in bad.json()["error"]["message"]


@pytest.mark.parametrize("path,body,status,fragment", [
    ("/v1/completions", {"prompt": [5], "max_tokens": CAPACITY}, 400, "KV cache capacity"),
    ("/v1/completions", {"prompt": [5], "frequency_penalty": 5}, 400, "frequency_penalty must be a number in [-2, 2]"),
    ("/v1/completions", {"prompt": [5], "response_format": {"type": "json_object"}, "mode": "diffusion"}, 400,
     "response_format needs each token's grammar state"),
    ("/v1/completions", {"prompt": [5], "best": 1}, 400, "unsupported field(s) ['best']"),
    ("/v1/completions", {"prompt": [5], "model": "gpt-4"}, 404, "does not exist"),
    ("/v1/completions", {"prompt": [5], "mode": "diffusion", "block_length": 8}, 400, "block length(s) [4]"),
    ("/v1/completions", {"prompt": [5], "mode": "beam"}, 400, "unknown mode"),
    ("/v1/completions", {"prompt": ["a", 5]}, 400, "a list of those (one choice per prompt)"),
    ("/v1/completions", {"max_tokens": 3}, 400, "'prompt' must be"),
    ("/v1/chat/completions", {"messages": "hi"}, 400, "'messages' must be"),
    ("/v1/completions", {"prompt": [5], "max_tokens": 4, "stream": "yes"}, 400, "'stream' must be"),
])
def test_http_errors_are_openai_shaped_and_the_server_keeps_serving(path, body, status, fragment, client):
    r = client.post(path, json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert fragment in error["message"] and error["type"]
    ok = client.post("/v1/completions", json={"prompt": [5, 9], "max_tokens": 3})
    assert ok.status_code == 200 and len(ok.json()["choices"][0]["tokens"]) <= 3


def test_http_invalid_json_is_a_400(client):
    r = client.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]


def test_http_concurrent_requests_are_queued_not_interleaved(client, ort):
    jobs = [(mode, prompt, stream) for mode in ("ar", "diffusion", "linear-spec")
            for prompt, stream in ((PROMPTS[0], False), (PROMPTS[2], True))]

    def call(job):
        mode, prompt, stream = job
        body = {"prompt": prompt, "max_tokens": 10, "mode": mode, "eos": -1, "stream": stream}
        if not stream:
            return client.post("/v1/completions", json=body).json()["choices"][0]["tokens"]
        with client.stream("POST", "/v1/completions", json=body) as r:
            return [t for e in sse(r)[:-1] for t in e["choices"][0]["tokens"]]

    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(call, jobs))
    for (mode, prompt, _), tokens in zip(jobs, results):
        assert tokens == ort.generate(prompt, mode=mode, max_new_tokens=10, eos=-1).tokens, mode

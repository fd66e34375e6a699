"""Generated inputs at the three front doors (CLI argument values, stdio lines, HTTP bodies):
every input gets a valid answer or a one-line error, never a traceback; the server keeps
serving and memory stays bounded. A few hundred cases in the default suite, more under
``-m slow``."""

from __future__ import annotations

import io
import json
import resource

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nemocompile.cli import main
from nemocompile.runtime import Runtime
from nemocompile.runtime.serve.stdio import serve_stdio

from test_runtime import exported

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FAST = settings(max_examples=100, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
SLOW = settings(FAST, max_examples=1500, derandomize=False)

# values a user or a client might send: numbers at and past every edge, text with
# invalid UTF-8 (a surrogate-escaped byte), lone surrogates, control characters
EDGE_NUMBERS = st.one_of(st.integers(-3, 70), st.sampled_from([0, 1, 2, 4, 8, 10**9, -1, 2**63, 2**64]),
                         st.floats(allow_nan=True, allow_infinity=True))
TEXT = st.one_of(st.text(max_size=12), st.sampled_from(["\udcff", "\ud800", "def f(\x00", "", " ", "none", "1e999"]))
VALUE = st.one_of(EDGE_NUMBERS, TEXT, st.booleans(), st.none(), st.lists(st.integers(-2, 200), max_size=4))
FIELDS = ["prompt", "messages", "mode", "max_new_tokens", "max_tokens", "block_length", "threshold", "temperature",
          "seed", "eos", "steps", "chat", "stream", "id", "model", "n", "bogus"]
MODE = st.one_of(st.sampled_from(["ar", "diffusion", "linear-spec", "beam"]), TEXT)


@pytest.fixture(scope="module")
def runtime(tmp_path_factory):
    with Runtime.load(exported(tmp_path_factory), threads=1) as rt:
        rt.close = lambda: None  # shared by every example: the servers' close() must not end it
        yield rt
    Runtime.close(rt)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---- CLI argument values ----------------------------------------------------------------------
def _cli_case(runtime, monkeypatch, capsys, argv_values):
    import nemocompile.commands.run as run_cmd

    monkeypatch.setattr(run_cmd, "load_runtime", lambda args: runtime)
    argv = ["run", "--artifact", "A"]
    for flag, value in argv_values:
        argv += [flag, str(value)]
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's usage errors
        code = e.code
    out, err = capsys.readouterr()
    assert "Traceback" not in err, err
    if code == 0:
        assert out.strip() or "tokens=" in err
    else:
        assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, (argv, err)


CLI_ARGS = st.lists(st.tuples(st.sampled_from(["--max-new-tokens", "--block-length", "--threshold", "--temperature",
                                               "--seed", "--mode", "--threads"]), VALUE),
                    max_size=4).map(lambda xs: [("--prompt", "def f(")] + xs)


@FAST
@given(CLI_ARGS)
def test_cli_argument_values(runtime, monkeypatch, capsys, argv_values):
    _cli_case(runtime, monkeypatch, capsys, argv_values)


@pytest.mark.slow
@SLOW
@given(CLI_ARGS, st.tuples(st.just("--prompt"), TEXT))
def test_cli_argument_values_many(runtime, monkeypatch, capsys, argv_values, prompt):
    _cli_case(runtime, monkeypatch, capsys, [prompt, *argv_values[1:]])


# ---- stdio lines ------------------------------------------------------------------------------
REQUEST = st.dictionaries(st.sampled_from(FIELDS), VALUE, max_size=6).map(
    lambda d: {"prompt": [5, 6], "max_new_tokens": 3, **d})
LINE = st.one_of(REQUEST.map(lambda d: json.dumps(d).encode()), st.binary(max_size=40).filter(lambda b: b"\n" not in b),
                 st.sampled_from([b"[1,2]", b"null", b"{", b'{"id": 1e999}', b'"\xff"']))


def _stdio_case(runtime, lines):
    # blank as the server sees it: whitespace in Unicode's sense (a bare \x1c too)
    lines = [line for line in lines if line.decode("utf-8", "replace").strip()]
    lines.append(b'{"id": "last", "prompt": [5, 6], "max_new_tokens": 2}')
    out = io.StringIO()
    assert serve_stdio(runtime, stdin=io.BytesIO(b"\n".join(lines) + b"\n"), stdout=out) == 0
    replies = [json.loads(line) for line in out.getvalue().splitlines()]  # every line is JSON
    finals = [r for r in replies if r.get("done")]
    assert len(finals) == len(lines)  # exactly one final line per request
    for f in finals:
        if "error" in f:
            assert f["error"]["type"] in ("invalid_request", "invalid_json", "duplicate_id") and "\n" not in f["error"]["message"], f
    last = [f for f in finals if f["id"] == "last"]  # requests run concurrently: any order
    assert len(last) == 1 and len(last[0]["tokens"]) == 2  # still serving


@FAST
@given(st.lists(LINE, min_size=1, max_size=3))
def test_stdio_lines(runtime, lines):
    _stdio_case(runtime, lines)


@pytest.mark.slow
@SLOW
@given(st.lists(LINE, min_size=1, max_size=6))
def test_stdio_lines_many(runtime, lines):
    before = _peak_rss_mb()
    _stdio_case(runtime, lines)
    assert _peak_rss_mb() - before < 500


# ---- HTTP bodies ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def http(runtime):
    from fastapi.testclient import TestClient

    from nemocompile.runtime.serve.http import create_app

    with TestClient(create_app(runtime, "tiny", max_body_bytes=2048)) as c:
        yield c


CHAT = st.lists(st.fixed_dictionaries({"role": st.one_of(st.sampled_from(["user", "system", "wizard"]), VALUE),
                                       "content": st.one_of(TEXT, VALUE)}), max_size=2)
BODY = st.one_of(
    st.dictionaries(st.sampled_from(FIELDS), VALUE, max_size=6).map(lambda d: {"prompt": [5, 6], "max_tokens": 3, **d}),
    st.dictionaries(st.sampled_from(FIELDS), VALUE, max_size=4).flatmap(
        lambda d: CHAT.map(lambda m: {"messages": m, "max_tokens": 3, **d})),
)
RAW = st.one_of(BODY.map(lambda b: json.dumps(b).encode()), st.binary(max_size=60),
                st.just(b'{"prompt": "' + b"x" * 4000 + b'"}'))


def _http_case(http, path, raw):
    r = http.post(path, content=raw, headers={"content-type": "application/json"})
    if r.status_code == 200:
        body = r.text if "text/event-stream" in r.headers["content-type"] else r.json()
        assert body
    else:
        assert r.status_code in (400, 404, 413), (r.status_code, r.text)
        error = r.json()["error"]
        assert isinstance(error["message"], str) and "\n" not in error["message"]
    assert http.get("/health").status_code == 200


@FAST
@given(st.sampled_from(["/v1/completions", "/v1/chat/completions"]), RAW)
def test_http_bodies(http, path, raw):
    _http_case(http, path, raw)


@pytest.mark.slow
@SLOW
@given(st.sampled_from(["/v1/completions", "/v1/chat/completions"]), RAW)
def test_http_bodies_many(http, path, raw):
    _http_case(http, path, raw)


def test_after_the_generated_inputs_the_http_server_answers_and_memory_is_bounded(http):
    before = _peak_rss_mb()
    for _ in range(20):
        http.post("/v1/completions", content=b'{"prompt": "' + b"y" * 100_000 + b'"}')  # refused: 413
    ok = http.post("/v1/completions", json={"prompt": [5, 6], "max_tokens": 2, "eos": -1})
    assert ok.status_code == 200 and len(ok.json()["choices"][0]["tokens"]) == 2
    assert _peak_rss_mb() - before < 200, f"peak RSS grew by {_peak_rss_mb() - before:.0f} MB"

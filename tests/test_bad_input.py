"""Hostile input at every front door: one clear line, checked before any work, nothing
written or lost (issue 14, items 1 and 4-10)."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tiny_artifacts import lora_batch2

from nemocompile.cli import main
from nemocompile.errors import GenerationError, NemocompileError
from nemocompile.graphs.export import ExportError, export_artifact
from nemocompile.checks.parity import read_prompts
from nemocompile.runtime import Runtime
from nemocompile.runtime.bench import modes as bench
from nemocompile.runtime.serve.stdio import serve_stdio

from test_runtime import exported

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "nemocompile"]
pytestmark = pytest.mark.usefixtures("one_torch_thread")
# exit 130, or (seen now and then after "interrupted" was printed, when the interrupt landed in
# torch) death by SIGINT, which a shell reports as the same $? = 130
INTERRUPTED = (130, -signal.SIGINT)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    return exported(tmp_path_factory)  # every mode, batch 1, with a (character) tokenizer


@pytest.fixture(scope="module")
def runtime(artifact):
    with Runtime.load(artifact, threads=1) as rt:
        yield rt


def one_line_error(capsys, *fragments: str) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for f in fragments:
        assert f in err, err
    return err


# ---- 1: the eager path refuses what it cannot run -------------------------------------------
@pytest.mark.parametrize("argv, fragment", [
    (["--mode", "diffusion", "--block-length", "100000", "--max-new-tokens", "100000"],
     "exceed the model's max_position_embeddings"),
    (["--max-new-tokens", "100000000"], "exceed the model's max_position_embeddings"),
    (["--max-new-tokens", "70000"], "exceed the model's max_position_embeddings of 65536"),
    (["--mode", "diffusion", "--block-length", "1024", "--max-new-tokens", "8"],
     "block_length 1024 exceeds max_new_tokens 8 and the model's block_size 32"),
])
def test_eager_generate_refuses_requests_past_positions_memory_or_asked_tokens(embedded_dir, capsys, argv, fragment):
    assert main(["generate", "--prompt", "x", *argv]) == 2
    one_line_error(capsys, fragment)


def test_eager_generate_refuses_more_memory_than_available(tiny_model, monkeypatch):
    from nemocompile import generate
    from nemocompile.text import request

    monkeypatch.setattr(request, "_available_memory", lambda: 1 << 20)  # 1 MiB left
    with pytest.raises(GenerationError, match=r"needs about .* GiB but 0.0 GiB of memory is available"):
        generate(tiny_model, [5, 6], max_new_tokens=4000)
    assert len(generate(tiny_model, [5, 6], max_new_tokens=3).tokens) <= 3  # small requests still run


# ---- 4: arguments and destinations are checked before any work ------------------------------
def test_bench_checks_its_outputs_before_benchmarking(tmp_path, capsys, monkeypatch):
    missing = tmp_path / "no-such-folder"
    # the artifact does not exist either: an error about the destination proves nothing was loaded
    for flag in ("--json", "--plot"):
        assert main(["bench", "--artifact", str(tmp_path / "none"), flag, str(missing / "out")]) == 2
        one_line_error(capsys, f"{flag} {missing / 'out'}: the folder {missing} does not exist")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # not installed
    assert main(["bench", "--artifact", str(tmp_path / "none"), "--plot", str(tmp_path / "p.png")]) == 2
    one_line_error(capsys, "--plot needs matplotlib: pip install 'nemocompile[plot]'")
    assert not missing.exists() and not (tmp_path / "p.png").exists()


def test_bench_table_survives_a_failing_json_write(artifact, tmp_path, capsys, monkeypatch):
    def refuse(report, path):
        raise NemocompileError(f"--json {path}: cannot write it (disk full)")

    monkeypatch.setattr(bench, "write_json", refuse)
    code = main(["bench", "--artifact", str(artifact), "--limit", "1", "--max-new-tokens", "2", "--backends",
                 "onnxruntime", "--diffusion-thresholds", "0.9", "--quiet", "--json", str(tmp_path / "r.json"),
                 "--prompts", str(_prompts(tmp_path))])
    captured = capsys.readouterr()
    assert code == 2 and "disk full" in captured.err
    assert "tokens/s" in captured.out or "tok/s" in captured.out or "ar" in captured.out  # the table came first


def _prompts(tmp_path) -> Path:
    f = tmp_path / "prompts.jsonl"
    f.write_text('{"ids": [5, 9, 11]}\n')
    return f


def test_export_refuses_an_unknown_dump_stage_before_loading(tmp_path, capsys):
    # --model names no checkpoint: the stage error first proves nothing was loaded or traced
    assert main(["export", "--model", str(tmp_path / "none"), "--out", str(tmp_path / "a"),
                 "--dump-after", "bogus"]) == 2
    one_line_error(capsys, "unknown stage 'bogus' for --dump-after")
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("argv, fragment", [
    (["bench", "--artifact", "A", "--limit", "0"], "argument --limit: expected an integer >= 1, got '0'"),
    (["bench", "--artifact", "A", "--limit", "-2"], "argument --limit: expected an integer >= 1"),
    (["bench", "--artifact", "A", "--diffusion-thresholds", "0.9,high"], "threshold must be a number"),
    (["bench", "--artifact", "A", "--backends", "onnxruntime,cuda"], "unknown backend 'cuda'"),
    (["run", "--artifact", "A", "--prompt", "x", "--threads", "-3"], "argument --threads: expected an integer >= 1"),
    (["run", "--artifact", "A", "--prompt", "x", "--temperature", "inf"], "expected a finite number >= 0"),
    (["generate", "--prompt", "x", "--temperature", "nan"], "expected a finite number >= 0"),
    (["generate", "--prompt", "x", "--max-new-tokens", "0"], "argument --max-new-tokens"),
    (["serve", "--http", "--artifact", "A", "--port", "70000"], "expected a port number 0-65535"),
    (["export", "--out", "A", "--batch-size", "0"], "argument --batch-size"),
])
def test_bad_argument_values_are_one_line_usage_errors(capsys, argv, fragment):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    one_line_error(capsys, fragment)


# ---- 5: text that is not UTF-8 ------------------------------------------------------------------
def test_a_prompt_argument_with_invalid_utf8_is_one_line(artifact, embedded_dir):
    for argv in (["generate", "--max-new-tokens", "2"],
                 ["run", "--artifact", str(artifact), "--max-new-tokens", "2"]):
        proc = subprocess.run([*CLI, *argv, "--prompt", os.fsdecode(b"def f(\xff):")], capture_output=True,
                              timeout=120, cwd=ROOT)
        err = proc.stderr.decode()
        assert proc.returncode == 2 and err.startswith("error: the prompt is not valid UTF-8 text"), err
        assert err.count("\n") == 1 and not proc.stdout


def test_latin1_prompts_files_name_the_line(tmp_path):
    f = tmp_path / "p.txt"
    f.write_bytes("def f():\n# café\n".encode("latin-1"))
    for read in (read_prompts, bench.load_prompts):
        with pytest.raises(NemocompileError, match=r"p.txt:2: not UTF-8 text \(byte 0xe9\); convert the file"):
            read(f)


def test_parity_and_bench_read_the_same_prompts_file_alike(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text('{"prompt": "def f():"}\n\n{"ids": [1, 2]}\nplain text line\n')
    assert read_prompts(f) == bench.load_prompts(f) == ["def f():", [1, 2], "plain text line"]


def test_stdio_answers_non_utf8_lines_and_surrogates_and_keeps_serving(artifact):
    lines = [b'{"id": 1, "prompt": "caf\xe9"}\n', b'{"id": 2, "prompt": "\\ud800"}\n',
             b'{"id": 3, "messages": [{"role": "wizard", "content": "hi"}]}\n',
             b'{"id": 4, "prompt": [5, 6], "max_new_tokens": 2}\n']
    out = io.StringIO()
    runtime = Runtime.load(artifact, threads=1)  # serve_stdio closes it at EOF
    assert serve_stdio(runtime, stdin=io.BytesIO(b"".join(lines)), stdout=out) == 0
    finals = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [f["id"] for f in finals] == [None, 2, 3, 4]
    assert "not UTF-8" in finals[0]["error"]["message"]
    assert finals[1]["error"] == {"type": "invalid_request", "message": finals[1]["error"]["message"]}
    assert "not valid UTF-8" in finals[1]["error"]["message"]
    assert "chat role 'wizard'" in finals[2]["error"]["message"]
    assert len(finals[3]["tokens"]) == 2


# ---- HTTP (in process): surrogates, roles, field names, body size ------------------------------
@pytest.fixture(scope="module")
def http(runtime):
    from fastapi.testclient import TestClient

    from nemocompile.runtime.serve.http import create_app

    with TestClient(create_app(runtime, "tiny", max_body_bytes=4096)) as c:
        yield c


@pytest.mark.parametrize("path, body, status, fragment, param", [
    ("/v1/completions", '{"prompt": "\\ud800", "max_tokens": 2}', 400, "not valid UTF-8", None),
    ("/v1/chat/completions", '{"messages": [{"role": "wizard", "content": "hi"}]}', 400, "chat role 'wizard'", None),
    ("/v1/completions", '{"prompt": [5], "max_tokens": 0}', 400, "max_tokens must be an integer >= 1", "max_tokens"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": "x"}', 400,
     "max_completion_tokens must be", "max_completion_tokens"),
    ("/v1/completions", '{"prompt": [5], "max_tokens": 100000}', 400, "max_tokens (100000)", "max_tokens"),
    ("/v1/completions", '{"prompt": [5], "mode": "\\ud800"}', 400, "unknown mode '\\ud800'", "mode"),
])
def test_http_errors_are_json_with_the_clients_field_names(http, path, body, status, fragment, param):
    r = http.post(path, content=body.encode(), headers={"content-type": "application/json"})
    assert r.status_code == status and r.headers["content-type"] == "application/json", r.text
    error = r.json()["error"]
    assert fragment in error["message"] and error["param"] == param, error
    assert http.get("/health").status_code == 200


def test_http_refuses_large_bodies_with_413(http):
    big = json.dumps({"prompt": "x" * 10_000}).encode()
    r = http.post("/v1/completions", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "exceeds 4096 bytes" in r.json()["error"]["message"]

    def chunks():  # no content-length: counted as it arrives
        for _ in range(10):
            yield b" " * 1000

    r = http.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413
    ok = http.post("/v1/completions", json={"prompt": [5, 6], "max_tokens": 2})
    assert ok.status_code == 200 and len(ok.json()["choices"][0]["tokens"]) == 2


def test_http_tokenizes_off_the_event_loop(runtime, http, monkeypatch):
    """/health answers while a request's prompt is still being tokenized."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    started, release, finished = threading.Event(), threading.Event(), threading.Event()
    real = runtime.encode

    def slow_encode(*args, **kw):
        started.set()
        release.wait(10)  # held until /health has answered: on the event loop it would block /health
        finished.set()
        return real(*args, **kw)

    monkeypatch.setattr(runtime, "encode", slow_encode)
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(http.post, "/v1/completions", json={"prompt": "def f(", "max_tokens": 2})
        assert started.wait(30)
        assert http.get("/health").status_code == 200
        answered_while_encoding = not finished.is_set()
        release.set()
        assert pending.result(timeout=60).status_code == 200
    assert answered_while_encoding


def test_http_stops_a_generation_whose_client_is_gone(runtime):
    """A non-streaming request whose client disconnected: no tokens are decoded for it."""
    import asyncio

    from nemocompile.runtime.serve.http import create_app

    app = create_app(runtime, "tiny")
    commits = []
    real = runtime.generate

    def counting(*args, **kw):
        return _Counted(real(*args, **kw), commits)

    body = json.dumps({"prompt": [5, 6], "max_tokens": 20, "eos": -1}).encode()
    sent = []

    async def receive(messages=[{"type": "http.request", "body": body, "more_body": False}]):
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/completions", "raw_path": b"/v1/completions",
             "query_string": b"", "headers": [(b"content-type", b"application/json")], "http_version": "1.1",
             "scheme": "http", "server": ("test", 80), "client": ("test", 1), "root_path": "", "app": app}
    runtime.generate = counting
    try:
        asyncio.run(app(scope, receive, send))
        time.sleep(0.5)  # let the worker reach its next commit
    finally:
        runtime.generate = real
    assert sent[0]["status"] == 499
    assert len(commits) < 20  # stopped long before max_tokens


class _Counted:
    def __init__(self, stream, commits):
        self.stream, self.commits = stream, commits

    def __iter__(self):
        for c in self.stream:
            self.commits.append(c)
            yield c

    def close(self):
        self.stream.close()

    @property
    def result(self):
        return self.stream.result


# ---- 6 and 10: export destinations -----------------------------------------------------------
def test_export_out_beneath_a_regular_file_is_refused(tmp_path, capsys):
    (tmp_path / "file").write_text("mine")
    assert main(["export", "--model", str(tmp_path / "none"), "--out", str(tmp_path / "file" / "art")]) == 2
    one_line_error(capsys, f"{tmp_path / 'file'} is a file, not a folder; choose another --out")
    assert (tmp_path / "file").read_text() == "mine"


def test_export_force_never_deletes_files_it_did_not_write(tmp_path):
    model, src = lora_batch2()
    art = tmp_path / "art"
    shutil.copytree(src, art)
    (art / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match=r"holds files an export did not write \(notes.txt\); --force would "
                                          "delete them"):
        export_artifact(model, art, modes="ar", overwrite=True)
    assert (art / "notes.txt").read_text() == "mine" and (art / "manifest.json").is_file()


# ---- 7 and 9: a closed stdout, Ctrl-C ---------------------------------------------------------
def test_a_closed_stdout_ends_quietly_like_unix_tools(artifact):
    proc = subprocess.Popen([*CLI, "run", "--artifact", str(artifact), "--prompt", "def f(", "--stream",
                             "--max-new-tokens", "40"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    proc.stdout.read(1)
    proc.stdout.close()  # `| head -c 1`
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) in (0, 141) and "Traceback" not in err and "BrokenPipe" not in err, err


def test_stdio_server_with_a_closed_stdout_ends_quietly(artifact):
    proc = subprocess.Popen([*CLI, "serve", "--stdio", "--artifact", str(artifact)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    proc.stdout.close()
    _, err = proc.communicate(b'{"id": 1, "prompt": [5], "max_new_tokens": 2}\n' * 3, timeout=120)
    assert proc.returncode == 141 and "Traceback" not in err.decode(), err.decode()


def test_sigint_gives_the_request_in_flight_its_final_line(artifact):
    proc = subprocess.Popen([*CLI, "serve", "--stdio", "--artifact", str(artifact), "--threads", "1"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    proc.stdin.write(b'{"id": 7, "prompt": [5], "mode": "ar", "max_new_tokens": 40, "eos": -1, "stream": true}\n')
    proc.stdin.flush()
    first = json.loads(proc.stdout.readline())  # the request is in flight
    assert first["event"] == "tokens"
    proc.send_signal(signal.SIGINT)
    rest = [json.loads(line) for line in proc.stdout.read().splitlines()]
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) in INTERRUPTED and "Traceback" not in err, err
    finals = [m for m in rest if m.get("done")]
    assert len(finals) == 1 and finals[0]["id"] == 7  # exactly one final line, interrupted or complete
    assert "error" not in finals[0] or finals[0]["error"]["type"] == "interrupted"


def test_sigint_during_export_startup_is_one_line(tmp_path):
    proc = subprocess.Popen([*CLI, "export", "--mode", "ar", "--out", str(tmp_path / "a")], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=ROOT)
    time.sleep(0.5)  # importing torch
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode in INTERRUPTED and err.decode().strip().endswith("interrupted"), err.decode()
    assert "Traceback" not in err.decode() and not (tmp_path / "a").exists()


# ---- 10: where the stats line goes; a missing graph costs only its modes -------------------------
def test_generate_prints_only_the_text_on_stdout(embedded_dir, capsys):
    assert main(["generate", "--prompt", "def f(", "--max-new-tokens", "4"]) == 0
    captured = capsys.readouterr()
    assert "tokens/forward" not in captured.out and "mode=ar" in captured.err


def test_a_missing_graph_blocks_only_the_modes_that_use_it(tmp_path, capsys):
    _, src = lora_batch2()
    art = tmp_path / "art"
    shutil.copytree(src, art)
    (art / "draft.onnx").unlink()
    with Runtime.load(art) as rt:
        # quadratic-spec has its own fused graphs; auto chooses between ar and it
        assert rt.modes == ["ar", "diffusion", "quadratic-spec", "auto"]
        assert len(rt.generate([5, 6], mode="ar", max_new_tokens=3, eos=-1).tokens) == 3
        with pytest.raises(GenerationError, match="no linear-spec graphs"):
            rt.generate([5, 6], mode="linear-spec")
    assert "draft.onnx: missing: the artifact is damaged (linear-spec unavailable); re-export it" in \
        capsys.readouterr().err


def test_ctrl_c_while_swapping_in_a_new_artifact_keeps_the_old_one(tmp_path, monkeypatch):
    import nemocompile.graphs.export as export_module

    old, new = tmp_path / "art", tmp_path / ".art.partial"
    old.mkdir()
    (old / "manifest.json").write_text("old")
    new.mkdir()
    (new / "manifest.json").write_text("new")
    real, calls = os.rename, []

    def interrupted_second_rename(src, dst):
        calls.append(src)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real(src, dst)

    monkeypatch.setattr(export_module.os, "rename", interrupted_second_rename)
    with pytest.raises(KeyboardInterrupt):
        export_module._replace(new, old, overwrite=True)
    monkeypatch.undo()
    assert (old / "manifest.json").read_text() == "old"  # nothing lost

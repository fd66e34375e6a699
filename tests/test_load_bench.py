"""`nemocompile bench --serve`: the load benchmark against a real `serve --http` subprocess on a
tiny artifact (every field of the report, token counts as the server streamed them, the server
gone afterwards, also after Ctrl-C / SIGTERM), against a scripted fake server (skipped,
refused and overloaded modes, auto's mode mix and ratio), and its one-line errors."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from nemocompile.cli import main
from nemocompile.errors import NemocompileError
from nemocompile.runtime.bench.load import (LoadConfig, LocalServer, RequestRecord, compare, free_port,
                                            run_load_bench, summarize_level)

from test_runtime import exported

pytest.importorskip("httpx")
ROOT = Path(__file__).resolve().parents[1]
BENCH = [sys.executable, "-m", "nemocompile", "bench", "--serve"]


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    return exported(tmp_path_factory)  # every mode, batch 1, capacity 48, a character tokenizer


@pytest.fixture
def prompts_file(tmp_path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("def f(x):\nreturn a + b\n")
    return path


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def started_pid(stderr: str) -> int:
    match = re.search(r"started server pid (\d+)", stderr)
    assert match, f"no 'started server pid' line in:\n{stderr}"
    return int(match.group(1))


# ---- a real server ---------------------------------------------------------------------------
def test_bench_serve_reports_every_field_and_stops_its_server(artifact, prompts_file, tmp_path):
    out, png = tmp_path / "load.json", tmp_path / "load.png"
    proc = subprocess.run(BENCH + ["--artifact", str(artifact), "--concurrency", "1,2", "--requests", "2",
                                   "--modes", "ar", "--max-new-tokens", "6", "--eos", "-1", "--prompts",
                                   str(prompts_file), "--threads", "1", "--json", str(out), "--plot", str(png)],
                          capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert png.stat().st_size > 0

    server = report["server"]
    assert server["started"] and server["url"].startswith("http://127.0.0.1:") and server["health"]["status"] == "ok"
    assert gone(server["pid"]) and started_pid(proc.stderr) == server["pid"]
    assert f"stopped server pid {server['pid']}" in proc.stderr
    assert report["modes"] == {"ar": {"status": "ran", "reason": None}}
    assert report["settings"]["sequential_level"] == 2 and report["settings"]["requests"] == {"1": 2, "2": 2}

    rows = [*report["levels"], *report["sequential"]]
    assert [(r["concurrency"], r.get("sequential", False)) for r in rows] == [(1, False), (2, False), (2, True)]
    for row in rows:
        assert row["mode"] == "ar" and row["requests"] == row["completed"] == 2 and row["failed"] == 0
        for record, prompt in zip(row["records"], (0, 1)):
            # eos -1: exactly max_tokens, and the usage agrees with the token ids the stream carried
            assert record["prompt"] == prompt and record["status"] == 200 and record["error"] is None
            assert record["completion_tokens"] == record["streamed_tokens"] == 6
            assert record["finish_reason"] == "length"
            assert 0 < record["ttft_s"] <= record["latency_s"] <= row["wall_s"]
        assert row["completion_tokens"] == 12
        assert row["tokens_per_second"] == pytest.approx(12 / row["wall_s"])
        assert row["requests_per_second"] == pytest.approx(2 / row["wall_s"])
        latencies = sorted(r["latency_s"] for r in row["records"])
        assert latencies[0] <= row["latency_p50_s"] <= row["latency_p99_s"] <= latencies[1]
        assert row["ttft_p50_s"] <= row["ttft_p99_s"]
    (speedup,) = report["speedups"]
    assert speedup["speedup"] == pytest.approx(report["sequential"][0]["wall_s"] / report["levels"][1]["wall_s"])
    assert report["auto_vs_best"] == []  # auto was not asked for

    table = proc.stdout.splitlines()
    assert table[0].split()[:3] == ["mode", "C", "reqs"]
    assert [line.split()[:2] for line in table[1:4]] == [["ar", "1"], ["ar", "2"], ["ar", "seq"]]
    assert "ar: wall one at a time / wall at C=2 = " in proc.stdout
    assert report["server"]["batch_size"] == 1 and report["machine"]["cpus"] == os.cpu_count()


# SIGTERM takes bench's own handler (Python's default would skip the cleanup); slow: a second server start
@pytest.mark.parametrize("signum", [signal.SIGINT, pytest.param(signal.SIGTERM, marks=pytest.mark.slow)])
def test_an_interrupted_bench_stops_its_server(signum, artifact, prompts_file):
    proc = subprocess.Popen(BENCH + ["--artifact", str(artifact), "--concurrency", "1", "--requests", "200",
                                     "--modes", "ar", "--max-new-tokens", "16", "--eos", "-1", "--prompts",
                                     str(prompts_file)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        line = proc.stderr.readline()
        pid = started_pid(line)
        port = int(re.search(r"--port (\d+)", line).group(1))
        import httpx

        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:  # the benchmark is sending once the server answers
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        time.sleep(1.0)
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert "interrupted" in err and f"stopped server pid {pid}" in err
    assert gone(pid)


def test_a_server_that_is_not_healthy_in_time_is_a_clear_error_and_is_stopped(artifact, capsys):
    start = time.monotonic()
    code = main(["bench", "--serve", "--artifact", str(artifact), "--modes", "ar", "--health-timeout", "0.5"])
    err = capsys.readouterr().err
    assert code == 2 and time.monotonic() - start < 30
    assert "error: the server did not answer GET /health within the --health-timeout" in err
    assert gone(started_pid(err)) and "stopped server pid" in err


def test_a_server_that_exits_at_start_is_reported_with_its_own_error(artifact, capsys):
    code = main(["bench", "--serve", "--artifact", str(artifact), "--modes", "ar",
                 "--server-args", "--backend tensorrt --device cpu"])
    err = capsys.readouterr().err
    assert code == 2
    (line,) = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert line.startswith("error: the server exited with status 2 before it became healthy: error: ")
    assert gone(started_pid(err))


def test_a_server_that_dies_mid_run_is_an_error_not_a_table_of_failures():
    server = LocalServer("unused")
    server.proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(3)"])
    server.proc.wait()
    server._log.append("Segmentation fault\n")
    with pytest.raises(NemocompileError, match="the server exited with status 3 during the benchmark: "
                                               "Segmentation fault"):
        server.check_alive()


def test_the_python_api_refuses_what_the_command_line_refuses():
    for bad in ({"concurrency": (1, 0)}, {"concurrency": ()}, {"modes": ("ar", "fast")}, {"requests": 0}):
        with pytest.raises(NemocompileError):
            LoadConfig(**bad)


# ---- a scripted server -----------------------------------------------------------------------
class FakeServer(ThreadingHTTPServer):
    """Health says it serves ar and linear-spec; ar streams 3 tokens (but answers the prompt
    "busy" with 429 overloaded), linear-spec is refused, auto streams 4 tokens with a mode mix; /health of a
    ``hang`` server never answers."""

    daemon_threads = True
    hang = False


class FakeHandler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def send(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.server.hang:
            time.sleep(30)
        self.send(200, {"status": "ok", "model": "fake", "modes": ["ar", "linear-spec"]})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        assert body["stream"] and body["stream_options"] == {"include_usage": True} and body["model"] == "fake"
        if body["mode"] == "linear-spec" or (body["mode"] == "ar" and body["prompt"] == "busy"):
            kind = "invalid_request_error" if body["mode"] == "linear-spec" else "overloaded"
            return self.send(400 if body["mode"] == "linear-spec" else 429,
                             {"error": {"message": f"no {body['mode']} today", "type": kind}})
        n, mix = (3, {}) if body["mode"] == "ar" else (4, {"ar": 2, "linear-spec": 1})
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.end_headers()
        for i in range(n):
            chunk = {"choices": [{"text": "x", "tokens": [10 + i], "finish_reason": None}]}
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            self.wfile.flush()
            time.sleep(0.01)
        usage = {"completion_tokens": n, "prompt_tokens": 1, "mode_mix": mix}
        self.wfile.write(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\ndata: [DONE]\n\n".encode())


@pytest.fixture
def fake():
    server = FakeServer(("127.0.0.1", 0), FakeHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def test_skipped_refused_and_overloaded_modes_are_reported_not_raised(fake):
    url = f"http://127.0.0.1:{fake.server_address[1]}"
    config = LoadConfig(concurrency=(1, 2), requests=2, modes=("ar", "quadratic-spec", "linear-spec", "auto"),
                        max_new_tokens=4)
    lines: list[str] = []
    report = run_load_bench(["a", "busy"], config, url=url, progress=lines.append)
    assert report["modes"]["quadratic-spec"] == {
        "status": "skipped", "reason": "the server has no quadratic-spec graphs (it has: ar, linear-spec)"}
    assert report["modes"]["linear-spec"] == {"status": "refused", "reason": "HTTP 400: no linear-spec today"}
    assert report["modes"]["ar"]["status"] == report["modes"]["auto"]["status"] == "ran"
    assert not report["server"]["started"] and len(report["machine"]["load_average_1m"]) == 2

    ar = [r for r in report["levels"] if r["mode"] == "ar"]
    assert [(r["completed"], r["rejected"], r["failed"], r["completion_tokens"]) for r in ar] == [(1, 1, 1, 3)] * 2
    assert ar[0]["first_error"] == "HTTP 429: no ar today" and ar[0]["records"][1]["error_type"] == "overloaded"
    auto = [r for r in report["levels"] if r["mode"] == "auto"]
    assert [r["mode_mix"] for r in auto] == [{"ar": 4, "linear-spec": 2}] * 2  # summed over the 2 requests
    assert all(r["completion_tokens"] == 8 and r["records"][0]["streamed_tokens"] == 4 for r in auto)
    # a level with failures has no honest speedup; auto is compared only with a mode whose level completed
    assert [s["speedup"] for s in report["speedups"]] == [None, pytest.approx(
        report["sequential"][1]["wall_s"] / auto[1]["wall_s"])]
    assert report["auto_vs_best"] == []
    assert "quadratic-spec: skipped, the server has no quadratic-spec graphs (it has: ar, linear-spec)" in lines


def test_repeated_levels_keep_each_modes_median_run(fake):
    url = f"http://127.0.0.1:{fake.server_address[1]}"
    config = LoadConfig(concurrency=(1,), requests=1, modes=("ar", "auto"), max_new_tokens=4, repeats=3)
    lines: list[str] = []
    report = run_load_bench(["a"], config, url=url, progress=lines.append)
    assert [r["mode"] for r in report["levels"]] == ["ar", "auto"]  # one row per mode and level
    for r in report["levels"] + report["sequential"]:
        runs = r["tokens_per_second_runs"]
        assert len(runs) == 3 and r["tokens_per_second"] == sorted(runs)[1]
    # the modes took turns: ar, its baseline, auto, its baseline, three times over
    modes = [line.split()[0] for line in lines if "requests in" in line]
    assert modes == ["ar", "ar", "auto", "auto"] * 3, lines
    with pytest.raises(NemocompileError, match="repeats must be >= 1"):
        LoadConfig(repeats=0)


def test_auto_is_compared_with_the_best_fixed_mode_at_each_level():
    def row(mode, c, tokens, wall):
        record = RequestRecord(prompt=0, status=200, latency_s=wall, ttft_s=wall / 2, completion_tokens=tokens)
        return summarize_level(mode, c, [record], wall)

    levels = [row("ar", 1, 10, 1.0), row("linear-spec", 1, 10, 0.5), row("auto", 1, 10, 0.625),
              row("ar", 8, 80, 1.0), row("linear-spec", 8, 80, 2.0), row("auto", 8, 80, 1.25)]
    sequential = [{**row("ar", 8, 80, 4.0), "sequential": True}]
    speedups, auto = compare(levels, sequential)
    assert speedups == [{"mode": "ar", "concurrency": 8, "requests": 1, "sequential_wall_s": 4.0,
                         "concurrent_wall_s": 1.0, "speedup": 4.0}]
    assert [(a["concurrency"], a["best_mode"], a["ratio"]) for a in auto] == [(1, "linear-spec", pytest.approx(0.8)),
                                                                              (8, "ar", pytest.approx(0.8))]


# ---- errors ----------------------------------------------------------------------------------
def test_a_url_with_nothing_listening_fails_at_once(capsys):
    start = time.monotonic()
    assert main(["bench", "--serve", "--url", f"http://127.0.0.1:{free_port()}"]) == 2
    err = capsys.readouterr().err
    assert time.monotonic() - start < 10
    assert err.startswith("error: cannot reach http://127.0.0.1:") and "start the server first" in err
    assert err.count("\n") == 1


def test_a_url_whose_health_never_answers_fails_within_the_timeout(fake, capsys):
    fake.hang = True
    start = time.monotonic()
    assert main(["bench", "--serve", "--url", f"http://127.0.0.1:{fake.server_address[1]}",
                 "--health-timeout", "1"]) == 2
    assert time.monotonic() - start < 10
    assert capsys.readouterr().err.startswith("error: http://127.0.0.1:")


@pytest.mark.parametrize("argv, fragment", [
    (["--serve", "--concurrency", "0"], "--concurrency: expected comma-separated integers >= 1, got '0'"),
    (["--serve", "--concurrency", "1,x"], "expected comma-separated integers >= 1, got '1,x'"),
    (["--serve", "--modes", "ar,fast"], "unknown mode 'fast'; use a comma-separated list of ar, diffusion,"),
    (["--serve", "--health-timeout", "0"], "expected a number > 0, got '0'"),
    (["--concurrency", "2", "--artifact", "A"], "--concurrency belongs to the load benchmark; add --serve"),
    (["--serve", "--artifact", "A", "--backends", "torch"], "--backends does not apply to --serve"),
    (["--serve", "--url", "http://127.0.0.1:1", "--artifact", "A"], "--url drives a running server: drop --artifact"),
    (["--serve", "--url", "localhost:8000"], "--url 'localhost:8000': expected http://HOST:PORT"),
    (["--serve"], "bench --serve needs one --artifact DIR"),
    (["--serve", "--artifact", "/nonexistent"], "/nonexistent/manifest.json: missing; /nonexistent is not an exported"),
    ([], "bench needs --artifact DIR"),
])
def test_bad_arguments_are_one_line_errors(argv, fragment, capsys):
    try:
        code = main(["bench", *argv])
    except SystemExit as e:  # argparse's refusals exit while parsing
        code = e.code
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and fragment in err, err


def test_server_args_may_not_set_what_bench_sets(artifact, capsys):
    assert main(["bench", "--serve", "--artifact", str(artifact), "--server-args", "--port 9000"]) == 2
    assert capsys.readouterr().err == ("error: --server-args must not set --port: the benchmark sets it "
                                       "(--artifact and --threads are bench's own flags; the port is picked free)\n")



def test_auto_is_never_credited_with_a_gain_its_mode_mix_does_not_explain():
    """auto faster than the best fixed mode while running ar only: reported as run-to-run
    variation, not as a mode-choice gain (it had read "1.64x the best fixed mode")."""
    from nemocompile.runtime.bench.load import format_table

    def row(mode, tokens, wall, mix=None):
        record = RequestRecord(prompt=0, status=200, latency_s=wall, ttft_s=wall / 2, completion_tokens=tokens,
                               mode_mix=mix or {})
        return summarize_level(mode, 1, [record], wall)

    levels = [row("ar", 10, 1.0, {"ar": 10}), row("linear-spec", 10, 1.2, {"linear-spec": 4}),
              row("auto", 10, 0.61, {"ar": 10})]
    _, auto = compare(levels, [])
    assert auto[0]["ratio"] == pytest.approx(1.64, abs=0.01) and auto[0]["gain_explained_by_mix"] is False
    report = {"levels": levels, "sequential": [], "speedups": [], "auto_vs_best": auto, "modes": {},
              "settings": {"modes": ["ar", "linear-spec", "auto"]}, "machine": {"cpus": 2, "load_average_1m": [0, 0]}}
    text = format_table(report)
    assert "ran ar only, so no gain from choosing modes" in text and "x the throughput of" not in text, text

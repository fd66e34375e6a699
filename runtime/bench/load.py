"""`nemocompile bench --serve`: a load benchmark that drives a real HTTP server over loopback.

For each decode mode and each concurrency level C, a level sends its requests as
streamed ``/v1/completions`` (greedy, ``stream_options.include_usage``) with at
most C in flight. Per request it records the latency (request sent -> stream
closed), the time to first token (request sent -> first chunk carrying tokens),
the completion tokens and the mode mix the server reports in ``usage``; per
level the throughput (completion tokens / the level's wall time), requests/s,
p50/p99 latency and time to first token, and the mode mix summed over its
requests. Per mode a sequential baseline sends the reference level's requests
(C = 8, or the largest level below it) one at a time to the same server, so the
gain from concurrency is measured in one run; ``auto`` is compared with the best
fixed lossless mode at every level.

Without a URL the benchmark starts ``nemocompile serve --http`` itself on a free
loopback port, waits for ``GET /health`` (bounded) and always stops it: after the
run, on an error, on Ctrl-C and on SIGTERM.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from nemocompile.text.request import MODES as FIXED_MODES
from nemocompile.errors import NemocompileError
from nemocompile.runtime.policy import LOSSLESS  # the modes `auto` chooses among (greedy = AR's text)

MODES = (*FIXED_MODES, "auto")
DEFAULT_MODES = ("ar", "linear-spec", "quadratic-spec", "auto")
DEFAULT_CONCURRENCY = (1, 2, 4, 8, 16)
DEFAULT_MAX_NEW_TOKENS = 32
SEQUENTIAL_LEVEL = 8  # the target: 8 concurrent requests against the same 8 one at a time
HEALTH_TIMEOUT_S = 120.0  # a cold server loads every graph of the artifact before it answers
REQUEST_TIMEOUT_S = 600.0  # a request that streams nothing for this long is recorded as failed
STOP_TIMEOUT_S = 15.0  # SIGTERM, then SIGKILL after this long
# flags of `serve` the benchmark sets itself (a second value would be ambiguous)
OWN_SERVER_FLAGS = ("--http", "--stdio", "--artifact", "--host", "--port", "--threads")


def default_requests(concurrency: int) -> int:
    """Requests per level: two per slot, so every slot is refilled once (4 to 32)."""
    return min(max(2 * concurrency, 4), 32)


def median_run(tries: list[dict]) -> dict:
    """Of a level's repeated runs, the one with the median throughput (the lower middle of an
    even count), with every run's throughput beside it."""
    ranked = sorted(tries, key=lambda r: r["tokens_per_second"] or 0.0)
    keep = dict(ranked[(len(ranked) - 1) // 2])
    keep["tokens_per_second_runs"] = [r["tokens_per_second"] for r in tries]
    return keep


def sequential_level(levels: Sequence[int]) -> int:
    """The level the sequential baseline repeats: 8, else the largest level below 8, else the smallest."""
    below = [c for c in levels if c <= SEQUENTIAL_LEVEL]
    return max(below) if below else min(levels)


@dataclass(frozen=True)
class LoadConfig:
    """What one run of the load benchmark sends. Fields default to the issue's sweep."""

    concurrency: tuple[int, ...] = DEFAULT_CONCURRENCY  # levels: at most C requests in flight
    requests: int | None = None  # per level (None: default_requests(C)); the sequential baseline repeats its level's
    modes: tuple[str, ...] = DEFAULT_MODES
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS  # the requests' max_tokens
    extra_body: dict = field(default_factory=dict)  # more request fields: eos, max_thinking_tokens, ...
    request_timeout_s: float = REQUEST_TIMEOUT_S
    repeats: int = 1  # each level runs this many times, modes taking turns; the median-throughput run is kept

    def __post_init__(self):
        if not self.concurrency or any(not isinstance(c, int) or c < 1 for c in self.concurrency):
            raise NemocompileError(f"concurrency levels must be integers >= 1, got {list(self.concurrency)}")
        bad = [m for m in self.modes if m not in MODES]
        if bad or not self.modes:
            raise NemocompileError(f"unknown mode {bad[0] if bad else '(none)'!r}; use some of {', '.join(MODES)}")
        if self.requests is not None and self.requests < 1:
            raise NemocompileError(f"requests per level must be >= 1, got {self.requests}")
        if self.repeats < 1:
            raise NemocompileError(f"repeats must be >= 1, got {self.repeats}")

    def requests_at(self, concurrency: int) -> int:
        return self.requests if self.requests is not None else default_requests(concurrency)


@dataclass
class RequestRecord:
    """One streamed request, as the client saw it."""

    prompt: int  # index into the prompt list
    status: int  # HTTP status of the response (0: no response)
    latency_s: float  # sent -> stream closed
    ttft_s: float | None = None  # sent -> first chunk carrying tokens
    completion_tokens: int = 0  # usage.completion_tokens
    prompt_tokens: int = 0  # usage.prompt_tokens
    cached_tokens: int = 0  # usage.prompt_tokens_details.cached_tokens: prompt tokens the prefix cache served
    streamed_tokens: int | None = None  # token ids counted in the chunks (nemocompile's "tokens" field)
    finish_reason: str | None = None
    mode_mix: dict[str, int] = field(default_factory=dict)  # usage.mode_mix: cycles per mode
    rows_per_forward: float | None = None  # usage.rows_per_forward: the batch size its forwards ran at
    error: str | None = None  # why the request failed (None: it completed)
    error_type: str | None = None  # the OpenAI error type ("overloaded" for a full queue)


def with_shared_prefix(prompts: Sequence, n: int, artifact: str | Path | None) -> list[list[int]]:
    """``prompts`` as token ids, each after the same ``n`` tokens: the first ``n`` of the prompts
    one after the other (a system prompt every request shares; the prefix cache's case)."""
    tokenizer = None
    if any(isinstance(p, str) for p in prompts):
        from nemocompile.text.tokenizer import Tokenizer

        if artifact is None:
            raise NemocompileError("--shared-prefix with --url needs token-id prompts (a --prompts file of "
                                   '{"ids": [...]} lines): the client cannot tokenize text for a remote server')
        tokenizer = Tokenizer(artifact)
    ids = [tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts]
    pool = [t for p in ids for t in p]
    if not pool:
        raise NemocompileError("--shared-prefix: the prompts hold no tokens")
    prefix = (pool * (n // len(pool) + 1))[:n]
    return [prefix + p for p in ids]


# ---- one request -------------------------------------------------------------------------------
def send_completion(client, body: dict, prompt_index: int) -> RequestRecord:
    """POST one streaming completion and read it to the end; never raises for HTTP or transport errors."""
    import httpx

    start = time.perf_counter()
    record = RequestRecord(prompt=prompt_index, status=0, latency_s=0.0)
    usage = None
    try:
        with client.stream("POST", "/v1/completions", json=body) as response:
            record.status = response.status_code
            if response.status_code != 200:
                response.read()
                record.error, record.error_type = _error_body(response)
            else:
                streamed = 0
                counted = True
                for line in response.iter_lines():
                    if not line.startswith("data:"):
                        continue
                    payload = line[len("data:"):].strip()
                    if payload == "[DONE]":
                        break
                    chunk = json.loads(payload)
                    if not isinstance(chunk, dict):
                        record.error = f"the stream carried a chunk that is not a JSON object: {payload[:80]}"
                        break
                    if "error" in chunk:  # an error after the status line went out
                        record.error, record.error_type = _error_text(chunk), _error_type(chunk)
                        break
                    for choice in chunk.get("choices") or ():
                        ids = choice.get("tokens")
                        counted = counted and isinstance(ids, list)
                        if record.ttft_s is None and (ids or choice.get("text")):
                            record.ttft_s = time.perf_counter() - start
                        streamed += len(ids or ())
                        record.finish_reason = choice.get("finish_reason") or record.finish_reason
                    if chunk.get("usage"):
                        usage = chunk["usage"]
                record.streamed_tokens = streamed if counted else None
    except httpx.HTTPError as e:
        record.error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    except json.JSONDecodeError as e:
        record.error = f"the stream carried a chunk that is not JSON ({e})"
    record.latency_s = time.perf_counter() - start
    if record.error is None:
        if usage is None:
            record.error = "the stream ended without usage (the server ignored stream_options.include_usage)"
        else:
            record.completion_tokens = int(usage.get("completion_tokens") or 0)
            record.prompt_tokens = int(usage.get("prompt_tokens") or 0)
            record.cached_tokens = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
            record.mode_mix = dict(usage.get("mode_mix") or {})
            record.rows_per_forward = usage.get("rows_per_forward")
    return record


def _error_body(response) -> tuple[str, str | None]:
    try:
        body = response.json()
    except ValueError:
        return f"HTTP {response.status_code}: {response.text[:200]}", None
    return f"HTTP {response.status_code}: {_error_text(body)}", _error_type(body)


def _error_text(body) -> str:
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        return str(error.get("message"))
    return str(error if error is not None else body)[:200]


def _error_type(body) -> str | None:
    error = body.get("error") if isinstance(body, dict) else None
    return error.get("type") if isinstance(error, dict) else None


# ---- one level ---------------------------------------------------------------------------------
def run_level(client, bodies: Sequence[tuple[int, dict]], concurrency: int) -> tuple[list[RequestRecord], float]:
    """Send ``bodies`` with at most ``concurrency`` in flight; returns the records (in order) and the wall time."""
    pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="load-bench")
    start = time.perf_counter()
    try:
        futures = [pool.submit(send_completion, client, body, index) for index, body in bodies]
        records = [f.result() for f in futures]
    except BaseException:
        # Ctrl-C: queued requests are dropped; the ones in flight end when the server stops
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    wall = time.perf_counter() - start
    pool.shutdown(wait=True)
    return records, wall


def summarize_level(mode: str, concurrency: int, records: Sequence[RequestRecord], wall_s: float) -> dict:
    """A level's figures over the requests that completed (failures are counted, not averaged)."""
    import numpy as np

    done = [r for r in records if r.error is None]
    tokens = sum(r.completion_tokens for r in done)
    latencies = [r.latency_s for r in done]
    ttfts = [r.ttft_s for r in done if r.ttft_s is not None]
    mix: Counter = Counter()
    for r in done:
        mix.update(r.mode_mix)

    def pct(values: list, q: float) -> float | None:
        return float(np.percentile(values, q)) if values else None

    return {
        "mode": mode, "concurrency": concurrency, "requests": len(records), "completed": len(done),
        "rejected": sum(r.error_type == "overloaded" or r.status == 429 for r in records),
        "failed": sum(r.error is not None for r in records), "wall_s": wall_s,
        "completion_tokens": tokens, "tokens_per_second": tokens / wall_s if wall_s > 0 else None,
        "prompt_tokens": sum(r.prompt_tokens for r in done), "cached_tokens": sum(r.cached_tokens for r in done),
        "requests_per_second": len(done) / wall_s if wall_s > 0 else None,
        "latency_p50_s": pct(latencies, 50), "latency_p99_s": pct(latencies, 99),
        "ttft_p50_s": pct(ttfts, 50), "ttft_p99_s": pct(ttfts, 99),
        "mode_mix": dict(sorted(mix.items())),
        "rows_per_forward": pct([r.rows_per_forward for r in done if r.rows_per_forward is not None], 50),
        "first_error": next((r.error for r in records if r.error is not None), None),
        "records": [asdict(r) for r in records],
    }


def compare(levels: Sequence[dict], sequential: Sequence[dict]) -> tuple[list[dict], list[dict]]:
    """The two ratios the issue's targets ask for: wall(sequential) / wall(concurrent) per mode at the
    baseline's level, and auto's throughput / the best fixed lossless mode's at every level."""
    by_key = {(r["mode"], r["concurrency"]): r for r in levels}
    speedups = []
    for s in sequential:
        concurrent = by_key.get((s["mode"], s["concurrency"]))
        wall = concurrent["wall_s"] if concurrent is not None else None
        ok = concurrent is not None and not concurrent["failed"] and not s["failed"]
        speedups.append({"mode": s["mode"], "concurrency": s["concurrency"], "requests": s["requests"],
                         "sequential_wall_s": s["wall_s"], "concurrent_wall_s": wall,
                         "speedup": s["wall_s"] / wall if ok and wall else None})
    auto = []
    for c in sorted({r["concurrency"] for r in levels}):
        mine = by_key.get(("auto", c))
        fixed = [by_key[(m, c)] for m in LOSSLESS if (m, c) in by_key and not by_key[(m, c)]["failed"]]
        if mine is None or not fixed:
            continue
        best = max(fixed, key=lambda r: r["tokens_per_second"] or 0.0)
        ratio = (mine["tokens_per_second"] / best["tokens_per_second"]
                 if not mine["failed"] and best["tokens_per_second"] else None)
        # auto can beat every fixed mode only by mixing modes: a gain while it ran one mode is the
        # difference between two runs of that mode (noise, or a colder run), not its choice
        used = sorted(mine["mode_mix"])
        explained = ratio is None or ratio <= 1 or len(used) > 1
        auto.append({"concurrency": c, "auto_tokens_per_second": mine["tokens_per_second"],
                     "best_mode": best["mode"], "best_tokens_per_second": best["tokens_per_second"],
                     "ratio": ratio, "modes_used": used, "gain_explained_by_mix": explained})
    return speedups, auto


# ---- the server --------------------------------------------------------------------------------
def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def check_server_args(text: str | None) -> list[str]:
    """``--server-args`` as an argument list, refusing the flags the benchmark sets itself."""
    try:
        args = shlex.split(text or "")
    except ValueError as e:
        raise NemocompileError(f"--server-args {text!r}: {e}; quote it as one shell string") from None
    for a in args:
        flag = a.split("=", 1)[0]
        if flag in OWN_SERVER_FLAGS:
            raise NemocompileError(f"--server-args must not set {flag}: the benchmark sets it "
                                   "(--artifact and --threads are bench's own flags; the port is picked free)")
    return args


class LocalServer:
    """``nemocompile serve --http`` as a child process on a free loopback port; a context manager
    that stops it on the way out whatever happened (SIGTERM, then SIGKILL)."""

    def __init__(self, artifact: str | Path, threads: int = 1, server_args: Sequence[str] = (),
                 health_timeout_s: float = HEALTH_TIMEOUT_S, progress: Callable[[str], None] | None = None):
        self.artifact, self.threads, self.server_args = Path(artifact), threads, list(server_args)
        self.health_timeout_s, self.progress = health_timeout_s, progress
        self.proc: subprocess.Popen | None = None
        self.command: list[str] = []
        self.url = ""
        self.health: dict = {}  # the server's GET /health answer once it is up
        self.pid = 0  # the healthy server's process id
        self._log: deque[str] = deque(maxlen=50)  # the server's last stderr lines, for error messages

    def __enter__(self) -> LocalServer:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> dict:
        """Start the server and wait until it is healthy; returns its /health answer."""
        deadline = time.monotonic() + self.health_timeout_s
        for _ in range(3):  # another process may take the free port before the server binds it
            port = free_port()
            self.url = f"http://127.0.0.1:{port}"
            self.command = [sys.executable, "-m", "nemocompile", "serve", "--http", "--artifact", str(self.artifact),
                            "--host", "127.0.0.1", "--port", str(port), "--threads", str(self.threads),
                            *self.server_args]
            self._log.clear()
            self.proc = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.PIPE, text=True, errors="replace")
            threading.Thread(target=self._drain, args=(self.proc,), daemon=True).start()
            if self.progress:
                self.progress(f"started server pid {self.proc.pid}: {shlex.join(self.command[1:])}")
            try:
                self.health = wait_healthy(self.url, deadline, self.proc, self.last_line)
                self.pid = self.proc.pid
                return self.health
            except _PortTaken:
                self.stop()  # another process bound the port first: try another
        raise NemocompileError(f"the server could not listen on a free loopback port 3 times: {self.last_line()}")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self.progress:
            self.progress(f"stopped server pid {proc.pid}")

    def check_alive(self) -> None:
        """Raise if the server exited while the benchmark was using it (its requests would all fail)."""
        if self.proc is not None and self.proc.poll() is not None:
            raise NemocompileError(f"the server exited with status {self.proc.returncode} during the benchmark: "
                                   f"{self.last_line()}")

    def last_line(self) -> str:
        lines = [ln for ln in self._log if ln.strip()]
        return lines[-1].strip() if lines else "(it printed nothing)"

    def _drain(self, proc: subprocess.Popen) -> None:
        """Keep reading the server's stderr (a full pipe would block it) and remember the tail."""
        assert proc.stderr is not None
        with contextlib.suppress(ValueError, OSError):
            for line in proc.stderr:
                self._log.append(line)


class _PortTaken(Exception):
    """The started server could not bind its port (taken since it was found free)."""


def wait_healthy(url: str, deadline: float, proc: subprocess.Popen | None = None,
                 last_line: Callable[[], str] = lambda: "") -> dict:
    """Poll ``GET url/health`` until it answers 200 or ``deadline`` (monotonic) passes. With ``proc``
    (a server this benchmark started) a refused connection means "not up yet" and the process dying
    is an error; without it (``--url``) the server must answer now. Returns the health JSON; raises
    _PortTaken when the started server could not bind its port (the caller retries with another)."""
    import httpx

    timeout = max(deadline - time.monotonic(), 0.1)
    while True:
        try:
            with httpx.Client(timeout=min(timeout, 5.0) if proc else timeout, trust_env=False) as client:
                response = client.get(f"{url}/health")
        except httpx.HTTPError as e:
            if proc is None:
                if isinstance(e, httpx.TimeoutException):
                    raise NemocompileError(f"{url}/health did not answer within {timeout:g} s; "
                                           "check the server, or raise --health-timeout") from None
                raise NemocompileError(f"cannot reach {url}/health ({e}); start the server first, "
                                       "or drop --url to let bench start one") from None
        else:
            if response.status_code == 200:
                try:
                    health = response.json()
                except ValueError:
                    health = None
                if not isinstance(health, dict):
                    raise NemocompileError(f"{url}/health answered something that is not a JSON object; "
                                           "is this a nemocompile (OpenAI-compatible) server?")
                return health
            if proc is None:
                raise NemocompileError(f"{url}/health answered HTTP {response.status_code}; "
                                       "the server is not ready (wait for it or check its log)")
        if proc is not None and proc.poll() is not None:
            line = last_line()
            if "cannot listen on" in line:
                raise _PortTaken
            raise NemocompileError(f"the server exited with status {proc.returncode} before it became "
                                   f"healthy: {line}")
        if time.monotonic() >= deadline:
            raise NemocompileError(f"the server did not answer GET /health within the --health-timeout; "
                                   f"its last line: {last_line()}; raise --health-timeout on a slow machine")
        time.sleep(0.2)


@contextlib.contextmanager
def _terminate_as_interrupt():
    """SIGTERM raises KeyboardInterrupt while the benchmark runs, so the server is still stopped
    (Python's default SIGTERM exits without running finally blocks). Main thread only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_term(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# ---- the benchmark -----------------------------------------------------------------------------
def run_load_bench(prompts: Sequence, config: LoadConfig, *, artifact: str | Path | None = None,
                   url: str | None = None, threads: int = 1, server_args: Sequence[str] = (),
                   health_timeout_s: float = HEALTH_TIMEOUT_S,
                   progress: Callable[[str], None] | None = None) -> dict:
    """Run the sweep against ``url``, or against a server started on ``artifact`` (and stopped after)."""
    require_httpx()
    if not prompts:
        raise NemocompileError("no prompts to send; give a --prompts file with at least one line")
    if (artifact is None) == (url is None):
        raise NemocompileError("give an artifact to serve or the URL of a running server (one of them)")
    with _terminate_as_interrupt():
        if artifact is None:
            url = check_url(str(url))
            health = wait_healthy(url, time.monotonic() + health_timeout_s)
            server = {"url": url, "started": False, "health": health}
            return _sweep(url, health, server, prompts, config, progress, lambda: None)
        from nemocompile.artifact.manifest import Manifest

        manifest = Manifest.load(artifact)  # a missing or unreadable artifact fails before a server starts
        with LocalServer(artifact, threads, server_args, health_timeout_s, progress) as local:
            server = {"url": local.url, "started": True, "pid": local.pid, "command": local.command,
                      "health": local.health, "batch_size": manifest.batch_size}
            return _sweep(local.url, local.health, server, prompts, config, progress, local.check_alive)


def _sweep(url: str, health: dict, server: dict, prompts: Sequence, config: LoadConfig,
           progress: Callable[[str], None] | None, check_alive: Callable[[], None]) -> dict:
    import httpx

    say = progress or (lambda msg: None)
    load_before = os.getloadavg()[0]  # client and server share these cores with whatever else runs
    levels = sorted(set(config.concurrency))
    baseline = sequential_level(levels)
    served = health.get("modes")
    modes: dict[str, dict] = {}
    rows: list[dict] = []
    sequential: list[dict] = []
    limits = httpx.Limits(max_connections=max(levels) + 1, max_keepalive_connections=max(levels) + 1)
    timeout = httpx.Timeout(config.request_timeout_s, connect=10.0)
    with httpx.Client(base_url=url, timeout=timeout, limits=limits, trust_env=False) as client:
        bodies_of = {}
        for mode in config.modes:
            if isinstance(served, list) and mode != "auto" and mode not in served:
                modes[mode] = {"status": "skipped", "reason": f"the server has no {mode} graphs "
                                                              f"(it has: {', '.join(map(str, served))})"}
                say(f"{mode}: skipped, {modes[mode]['reason']}")
                continue

            def body(i: int, mode=mode) -> tuple[int, dict]:
                index = i % len(prompts)
                b = {"prompt": prompts[index], "max_tokens": config.max_new_tokens, "temperature": 0,
                     "stream": True, "stream_options": {"include_usage": True}, "mode": mode, **config.extra_body}
                if health.get("model"):
                    b["model"] = health["model"]
                return index, b

            # one untimed request first: it warms the mode's graphs and finds out whether the server takes it
            warm = send_completion(client, body(0)[1], 0)
            check_alive()
            if warm.error is not None:
                refused = 400 <= warm.status < 500 and warm.status != 429
                modes[mode] = {"status": "refused" if refused else "failed", "reason": warm.error}
                say(f"{mode}: {modes[mode]['status']} by the server ({warm.error})")
                continue
            modes[mode] = {"status": "ran", "reason": None}
            bodies_of[mode] = body
        # an untimed round at the first level for every mode: the first timed level must not pay for
        # thread pools, allocations, or auto's first cost estimates (its live step times need a few
        # forwards of each graph)
        for mode, body in bodies_of.items():
            say(f"{mode}: warming up at C={levels[0]} (untimed)")
            run_level(client, [body(i) for i in range(max(2, levels[0]))], levels[0])
            check_alive()
        # levels outside, modes inside: the modes compared at a level (auto against the best fixed
        # mode) run minutes apart at most, not a whole sweep apart, as the machine's load drifts
        for c in levels:
            runs: dict[tuple[str, int], list[dict]] = {}
            for _ in range(config.repeats):
                for mode, body in bodies_of.items():
                    bodies = [body(i) for i in range(config.requests_at(c))]
                    # the baseline runs right after its level: the machine's load drifts less in between
                    for one_at_a_time in (False, *([True] if c == baseline else [])):
                        records, wall = run_level(client, bodies, 1 if one_at_a_time else c)
                        check_alive()
                        row = summarize_level(mode, c, records, wall)
                        if one_at_a_time:
                            row["sequential"] = True
                        runs.setdefault((mode, one_at_a_time), []).append(row)
                        say(_progress_line(row))
            for (mode, one_at_a_time), tries in runs.items():
                (sequential if one_at_a_time else rows).append(median_run(tries))
    order = {m: i for i, m in enumerate(config.modes)}
    rows.sort(key=lambda r: (order[r["mode"]], r["concurrency"]))  # the table reads mode by mode
    sequential.sort(key=lambda r: order[r["mode"]])
    speedups, auto = compare(rows, sequential)
    return {"server": server,
            "machine": {"cpus": os.cpu_count(), "load_average_1m": [load_before, os.getloadavg()[0]]},
            "settings": {"concurrency": levels, "requests": {str(c): config.requests_at(c) for c in levels},
                         "modes": list(config.modes), "max_new_tokens": config.max_new_tokens,
                         "extra_body": config.extra_body, "prompts": len(prompts), "sequential_level": baseline},
            "modes": modes, "levels": rows, "sequential": sequential, "speedups": speedups, "auto_vs_best": auto}


def _progress_line(row: dict) -> str:
    how = "one at a time" if row.get("sequential") else f"C={row['concurrency']}"
    tps = row["tokens_per_second"]
    return (f"{row['mode']} {how}: {row['completed']}/{row['requests']} requests in {row['wall_s']:.2f} s"
            + (f", {tps:.1f} tok/s" if tps is not None else "")
            + (f", first error: {row['first_error']}" if row["first_error"] else ""))


def check_url(url: str) -> str:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise NemocompileError(f"--url {url!r}: expected http://HOST:PORT (the server's base URL)")
    try:
        parts.port
    except ValueError:
        raise NemocompileError(f"--url {url!r}: the port is not a number 0-65535") from None
    return url.rstrip("/")


def require_httpx():
    try:
        import httpx
    except ImportError:
        raise NemocompileError("bench --serve needs httpx: pip install 'nemocompile[serve]'") from None
    return httpx


# ---- output ------------------------------------------------------------------------------------
COLUMNS = ("mode", "C", "reqs", "done", "wall s", "tok/s", "req/s", "lat p50", "lat p99", "ttft p50", "ttft p99",
           "rows/fw", "mode mix")


def format_table(report: dict) -> str:
    """One line per mode x level (and the sequential baseline), then the target ratios and notes."""
    def num(v, fmt="{:.2f}") -> str:
        return "-" if v is None else fmt.format(v)

    lines = [" ".join(f"{c:>9}" if i else f"{c:<15}" for i, c in enumerate(COLUMNS[:-1])) + "  " + COLUMNS[-1]]
    for row in sorted([*report["levels"], *report["sequential"]],
                      key=lambda r: (report["settings"]["modes"].index(r["mode"]), r.get("sequential", False),
                                     r["concurrency"])):
        c = f"seq {row['concurrency']}" if row.get("sequential") else str(row["concurrency"])
        mix = ",".join(f"{m}:{n}" for m, n in row["mode_mix"].items()) or "-"
        cells = [c, str(row["requests"]), str(row["completed"]), num(row["wall_s"]),
                 num(row["tokens_per_second"], "{:.1f}"), num(row["requests_per_second"]),
                 num(row["latency_p50_s"], "{:.3f}"), num(row["latency_p99_s"], "{:.3f}"),
                 num(row["ttft_p50_s"], "{:.3f}"), num(row["ttft_p99_s"], "{:.3f}"),
                 num(row.get("rows_per_forward"))]
        lines.append(f"{row['mode']:<15} " + " ".join(f"{v:>9}" for v in cells) + f"  {mix}")
    for s in report["speedups"]:
        lines.append(f"{s['mode']}: wall one at a time / wall at C={s['concurrency']} = {num(s['speedup'])} "
                     f"({s['requests']} requests: {num(s['sequential_wall_s'])} s / "
                     f"{num(s['concurrent_wall_s'])} s)")
    for a in report["auto_vs_best"]:
        used = a.get("modes_used") or []
        if a.get("gain_explained_by_mix", True):
            lines.append(f"auto at C={a['concurrency']}: {num(a['ratio'])}x the throughput of the best fixed mode "
                         f"({a['best_mode']}; auto ran {', '.join(used) or '-'})")
        else:
            lines.append(f"auto at C={a['concurrency']}: ran {used[0]} only, so no gain from choosing modes; its "
                         f"{num(a['ratio'])}x the best fixed mode ({a['best_mode']}) is run-to-run variation")
    cached = sum(r.get("cached_tokens", 0) for r in report["levels"])
    if cached:
        prompt = sum(r.get("prompt_tokens", 0) for r in report["levels"])
        lines.append(f"prefix cache: {cached} of {prompt} prompt tokens reused ({100 * cached / prompt:.0f}%, "
                     "concurrent levels)")
    machine = report["machine"]
    lines.append(f"machine: {machine['cpus']} CPUs, 1-minute load average {machine['load_average_1m'][0]:.1f} "
                 f"before, {machine['load_average_1m'][1]:.1f} after (client and server included)")
    for mode, m in report["modes"].items():
        if m["status"] != "ran":
            lines.append(f"{mode}: {m['status']}: {m['reason']}")
    return "\n".join(lines)


def write_json(report: dict, path: str | Path) -> None:
    from nemocompile.runtime.bench.modes import write_json as write

    write(report, path)


def plot(report: dict, path: str | Path) -> None:
    """Throughput and p99 latency against concurrency, one line per mode."""
    from nemocompile.runtime.bench.modes import require_matplotlib

    matplotlib = require_matplotlib()
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    for mode in report["settings"]["modes"]:
        rows = sorted((r for r in report["levels"] if r["mode"] == mode), key=lambda r: r["concurrency"])
        if not rows:
            continue
        xs = [r["concurrency"] for r in rows]
        for ax, key in ((axes[0], "tokens_per_second"), (axes[1], "latency_p99_s")):
            ax.plot(xs, [r[key] if r[key] is not None else float("nan") for r in rows], marker="o", label=mode)
    for ax, title in ((axes[0], "throughput (completion tokens / s)"), (axes[1], "p99 latency (s)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(report["settings"]["concurrency"], [str(c) for c in report["settings"]["concurrency"]])
        ax.set_xlabel("concurrent requests")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

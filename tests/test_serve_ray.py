"""`serve --ray` on a real local Ray cluster: the command as a subprocess with two
replicas (one module-scoped cluster, shut down at the end). Every answer is checked
against the single-process server (`create_app` over the same artifact); then one
replica's process is killed during a burst. Bounded: every client call has a
timeout, the cluster starts within STARTUP_S and a replacement replica must answer
within RECOVERY_S. The KubeRay manifest and the flags are checked without Ray running."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from nemocompile.errors import NemocompileError

from test_runtime import exported

ROOT = Path(__file__).resolve().parents[1]
KUBERAY = ROOT / "examples" / "kuberay-rayservice.yaml"
STARTUP_S = 120  # local cluster + two replicas: about 30 s on a 2-core machine
RECOVERY_S = 30  # a killed replica: requests succeed again (the other replica), and Ray starts a new one
CALL_S = 60  # any one HTTP call; none may reach it (nothing hangs)
REQUESTS = [
    ("/v1/completions", {"prompt": "def f(x):", "max_tokens": 11, "mode": "linear-spec", "eos": -1}),
    ("/v1/completions", {"prompt": "print(", "max_tokens": 9, "mode": "ar", "eos": -1}),
    ("/v1/completions", {"prompt": "x = [1, 2", "max_tokens": 12, "mode": "diffusion", "eos": -1}),
    ("/v1/completions", {"prompt": "class A:", "max_tokens": 10, "mode": "quadratic-spec", "eos": -1}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "eos": -1}),
]


def _ray():
    return pytest.importorskip("ray.serve", reason="ray[serve] is not installed: pip install 'nemocompile[ray]'")


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    return exported(tmp_path_factory)


@pytest.fixture(scope="module")
def reference(artifact):
    """The single-process server: `create_app` over the same artifact, in this process."""
    from fastapi.testclient import TestClient

    from nemocompile.runtime import Runtime
    from nemocompile.runtime.serve.http import create_app

    with Runtime.load(artifact, threads=1) as rt, TestClient(create_app(rt)) as client:
        yield client


@pytest.fixture(scope="module")
def cluster(artifact, tmp_path_factory):
    """`nemocompile serve --ray --replicas 2` as a subprocess; yields its base URL.
    SIGINT at the end shuts its local Ray cluster down."""
    _ray()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path_factory.mktemp("ray") / "stderr.txt"
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "nemocompile", "serve", "--ray", "--artifact", str(artifact),
                                 "--replicas", "2", "--threads", "1", "--port", str(port)],
                                stdout=subprocess.DEVNULL, stderr=err, cwd=ROOT)
    try:
        deadline = time.monotonic() + STARTUP_S
        while "listening on" not in log.read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"serve --ray did not start within {STARTUP_S} s:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            pytest.fail("serve --ray did not stop within 60 s of SIGINT")
    assert proc.returncode == 130, log.read_text()[-3000:]


@pytest.fixture(scope="module")
def client(cluster):
    import httpx

    with httpx.Client(base_url=cluster, timeout=CALL_S) as c:
        yield c


def _same_answer(got: dict, ref: dict) -> None:
    """Equal generations: the choice (text or message, tokens, finish reason) and the decode counts."""
    for key in ("id", "created"):
        got.pop(key), ref.pop(key)
    assert got["choices"] == ref["choices"]
    for key in ("prompt_tokens", "completion_tokens", "forwards", "acceptance_length", "mode"):
        assert got["usage"][key] == ref["usage"][key], key


def _events(text: str) -> list:
    return [json.loads(line[6:]) if line != "data: [DONE]" else "[DONE]"
            for line in text.splitlines() if line.startswith("data: ")]


def test_two_replicas_answer_like_the_single_process_server(client, reference):
    replicas = set()
    for i in range(40):  # the router spreads load; 40 sequential requests reach both replicas
        path, body = REQUESTS[i % len(REQUESTS)]
        got = client.post(path, json=body)
        assert got.status_code == 200, got.text
        replicas.add(got.headers["x-nemocompile-replica"])
        if i < len(REQUESTS):  # each kind of request once against the reference
            _same_answer(got.json(), reference.post(path, json=body).json())
        if len(replicas) == 2 and i >= len(REQUESTS):
            break
    assert len(replicas) == 2, replicas
    host, pid = next(iter(replicas)).rsplit(":", 1)
    assert host == socket.gethostname() and pid.isdigit() and int(pid) != os.getpid()


def test_errors_and_health_come_from_the_same_app(client, reference):
    for path, body in [("/v1/completions", {"prompt": "x", "temprature": 1}),
                       ("/v1/completions", {"prompt": "x", "model": "other"})]:
        got, ref = client.post(path, json=body), reference.post(path, json=body)
        assert (got.status_code, got.json()) == (ref.status_code, ref.json())
    got = client.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert got.status_code == 400 and got.json()["error"]["type"] == "invalid_request_error"
    assert client.get("/health").json() == reference.get("/health").json()
    assert client.get("/v1/models").json()["data"][0]["id"] == reference.get("/v1/models").json()["data"][0]["id"]


@pytest.mark.parametrize("path, body", [REQUESTS[0], REQUESTS[4]], ids=["completion", "chat"])
def test_streaming_relays_every_event(client, reference, path, body):
    body = {**body, "stream": True}
    with client.stream("POST", path, json=body) as got:
        assert got.status_code == 200 and got.headers["content-type"].startswith("text/event-stream")
        assert got.headers["x-nemocompile-replica"]
        events = _events(got.read().decode())
    ref = _events(reference.post(path, json=body).text)
    assert events[-1] == "[DONE]" and len(events) == len(ref)
    tokens = [t for e in events[:-1] for t in e["choices"][0]["tokens"]]
    assert tokens == [t for e in ref[:-1] for t in e["choices"][0]["tokens"]]
    assert events[-2]["usage"]["forwards"] == ref[-2]["usage"]["forwards"]


def test_a_killed_replica_fails_its_requests_with_503_and_is_replaced(client, cluster, reference):
    import httpx

    path, body = REQUESTS[0][0], {**REQUESTS[0][1], "max_tokens": 24}
    expected = reference.post(path, json=body).json()["choices"][0]["tokens"]
    before = set()
    for _ in range(40):
        before.add(client.post(path, json=body).headers["x-nemocompile-replica"])
        if len(before) == 2:
            break
    victim = sorted(before)[0]

    def call(i: int):
        stream = i % 3 == 0
        with httpx.Client(base_url=cluster, timeout=CALL_S) as c:  # a timeout here is a hang: the test fails
            r = c.post(path, json={**body, "stream": stream})
            return stream, r.status_code, r.headers, r.text

    with ThreadPoolExecutor(8) as pool:
        burst = [pool.submit(call, i) for i in range(48)]
        while sum(f.done() for f in burst) < 8:  # kill mid-burst, while requests are queued on both replicas
            time.sleep(0.02)
        os.kill(int(victim.rsplit(":", 1)[1]), signal.SIGKILL)
        killed = time.monotonic()
        results = [f.result() for f in burst]
    failed = 0
    for stream, status, headers, text in results:
        if status == 503:  # the documented retryable error
            failed += 1
            assert headers["retry-after"] == "1"
            assert json.loads(text)["error"]["type"] == "replica_unavailable", text
        elif stream and "replica_unavailable" in text:  # the stream had started: the error is its last event
            failed += 1
            events = _events(text)
            assert events[-1] == "[DONE]" and events[-2]["error"]["type"] == "replica_unavailable"
        else:
            assert status == 200, text
            events = _events(text) if stream else None
            tokens = ([t for e in events[:-1] for t in e["choices"][0]["tokens"]] if stream
                      else json.loads(text)["choices"][0]["tokens"])
            assert tokens == expected
    print(f"\nburst of {len(results)}: {failed} failed with 503 after the kill of {victim}")
    # later requests succeed at once (the survivor), and Ray replaces the dead replica
    replaced = None
    while replaced is None:
        r = client.post(path, json=body)
        assert r.status_code == 200 and r.json()["choices"][0]["tokens"] == expected, r.text
        seen = r.headers["x-nemocompile-replica"]
        if seen not in before:
            replaced = time.monotonic() - killed
        assert time.monotonic() - killed < RECOVERY_S, f"no new replica answered within {RECOVERY_S} s"
        time.sleep(0.05)
    print(f"a new replica answered {replaced:.1f} s after the kill")


# ---- without a cluster --------------------------------------------------------------------
class _Relay:
    """A stand-in for the engine's streaming handle: yields ``items``, raising the exceptions among them."""

    def __init__(self, items: list, delay: float = 0.0):
        self.items, self.delay, self.cancelled = iter(items), delay, False

    def options(self, stream: bool):
        return self

    @property
    def relay(self):
        return self

    def remote(self, scope: dict, body: bytes):
        assert scope["path"] == "/v1/completions" and json.loads(body) == {"prompt": "x", "stream": True}
        return self

    def __aiter__(self):
        return self

    async def __anext__(self):
        await asyncio.sleep(self.delay)
        item = next(self.items, StopAsyncIteration())
        if isinstance(item, BaseException):
            raise item
        return item

    def cancel(self):
        self.cancelled = True


def _ingress_answer(items: list, timeout_s: float = 5.0, delay: float = 0.0) -> tuple[int, dict, bytes, _Relay]:
    """What the ingress answers when the engine's relay yields ``items``."""
    from starlette.requests import Request

    from nemocompile.runtime.serve.ray_serve import Ingress

    async def run():
        body = json.dumps({"prompt": "x", "stream": True}).encode()

        async def receive():
            return {"type": "http.request", "body": body, "more_body": False}

        scope = {"type": "http", "method": "POST", "path": "/v1/completions", "headers": [], "query_string": b""}
        engine = _Relay(items, delay)
        response = await Ingress(engine, timeout_s)(Request(scope, receive))
        content = b""
        if hasattr(response, "body_iterator"):
            async for part in response.body_iterator:
                content += part
        else:
            content = response.body
        return response.status_code, dict(response.headers), content, engine

    return asyncio.run(run())


def test_the_replica_relay_tells_the_app_when_its_caller_goes_away():
    """Closing the relay (Ray Serve cancels it when the client disconnects) reaches the app as
    ``http.disconnect``: its generation stops instead of running on for nobody."""
    from nemocompile.runtime.serve.ray_serve import EngineReplica

    seen = []

    async def app(scope, receive, send):
        seen.append(await receive())
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"first", "more_body": True})
        seen.append(await asyncio.wait_for(receive(), 5))  # blocks until the caller goes away

    async def run():
        replica = object.__new__(EngineReplica)
        replica.app, replica.runtime = app, None
        relay = replica.relay({"type": "http"}, b"{}")
        assert (await relay.__anext__())["status"] == 200
        assert (await relay.__anext__())["body"] == b"first"
        await relay.aclose()
        await asyncio.sleep(0.01)

    asyncio.run(run())
    assert seen == [{"type": "http.request", "body": b"{}", "more_body": False}, {"type": "http.disconnect"}]


def test_the_ingress_maps_a_dead_replica_to_a_retryable_503():
    _ray()
    from ray.exceptions import ActorDiedError
    from ray.serve.exceptions import BackPressureError

    status, headers, body, engine = _ingress_answer([ActorDiedError()])
    assert status == 503 and headers["retry-after"] == "1" and engine.cancelled
    error = json.loads(body)["error"]
    assert error["type"] == "replica_unavailable" and "retry the request" in error["message"]
    # a stream that had started: the error is its last event, then [DONE]
    start = {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]}
    chunk = {"type": "http.response.body", "body": b'data: {"choices": []}\n\n', "more_body": True}
    status, headers, body, engine = _ingress_answer([start, chunk, ActorDiedError()])
    events = _events(body.decode())
    assert status == 200 and events[0] == {"choices": []} and events[-1] == "[DONE]"
    assert events[-2]["error"]["type"] == "replica_unavailable" and engine.cancelled
    # full queues: 429 overloaded; no first message within the request timeout: 504
    status, _, body, _ = _ingress_answer([BackPressureError(num_queued_requests=3, max_queued_requests=3)])
    assert status == 429 and json.loads(body)["error"]["type"] == "overloaded"
    status, _, body, engine = _ingress_answer([start], timeout_s=0.05, delay=1.0)
    assert status == 504 and json.loads(body)["error"]["type"] == "timeout" and engine.cancelled
    status, _, body, _ = _ingress_answer([RuntimeError("boom")])  # the app failed: still an OpenAI body
    assert status == 500 and json.loads(body)["error"]["type"] == "server_error"
    # an answer relays the app's status, headers and body unchanged
    done = {"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False}
    status, headers, body, engine = _ingress_answer([start, chunk, done])
    assert (status, headers["content-type"], body) == (200, "text/event-stream", chunk["body"] + done["body"])


def test_without_ray_the_error_names_the_extra(monkeypatch):
    from nemocompile.runtime.serve import ray_serve as serve_ray

    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(NemocompileError, match=r"pip install 'nemocompile\[ray\]'"):
        serve_ray.check_dependencies()


@pytest.mark.parametrize("argv, message", [
    (["--replicas", "2", "--autoscale", "1:3"], "not allowed with argument"),
    (["--autoscale", "3:1"], "MIN:MAX"),
    (["--autoscale", "2"], "MIN:MAX"),
    (["--target-ongoing-requests", "0"], "number > 0"),
])
def test_bad_scale_flags_are_refused_while_parsing(argv, message, capsys):
    from nemocompile.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--ray", "--artifact", "a", *argv])
    assert message in capsys.readouterr().err


def test_ray_flags_need_ray(capsys):
    from nemocompile.cli import main

    assert main(["serve", "--http", "--artifact", "missing", "--replicas", "2"]) == 2
    assert "apply to serve --ray only" in capsys.readouterr().err


@pytest.mark.skipif(os.path.exists("/dev/nvidia0"), reason="this machine has an NVIDIA GPU")
def test_tensorrt_without_a_gpu_or_a_missing_artifact_stops_before_starting_ray(capsys):
    _ray()
    from nemocompile.cli import main

    started = time.monotonic()
    assert main(["serve", "--ray", "--backend", "tensorrt", "--artifact", "missing"]) == 2
    assert "use --backend onnxruntime" in capsys.readouterr().err and time.monotonic() - started < 5
    assert main(["serve", "--ray", "--artifact", "missing"]) == 2  # a local artifact is checked before Ray starts
    assert "not an exported artifact" in capsys.readouterr().err and time.monotonic() - started < 10


def test_kuberay_manifest_deploys_the_app_on_gpu_workers():
    service = yaml.safe_load(KUBERAY.read_text())
    assert service["apiVersion"] == "ray.io/v1" and service["kind"] == "RayService"
    (app,) = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
    module, _, name = app["import_path"].partition(":")
    assert (module, name) == ("nemocompile.runtime.serve.ray_serve", "build_app")
    assert app["route_prefix"] == "/" and app["args"]["backend"] == "tensorrt"
    cluster = service["spec"]["rayClusterConfig"]
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"  # engine replicas land on the GPU workers only
    (workers,) = cluster["workerGroupSpecs"]
    for spec in (head["template"]["spec"], workers["template"]["spec"]):
        (container,) = spec["containers"]
        assert "nemocompile" in container["image"]  # every node imports the app
    (container,) = workers["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    # the builder accepts the manifest's args: one GPU per engine replica, the ingress needs none
    serve = _ray()
    from nemocompile.runtime.serve.ray_serve import ENGINE_NAME, build_app

    application = build_app(app["args"])
    assert isinstance(application, serve.Application)
    ingress = application._bound_deployment
    engine = ingress.init_args[0]._bound_deployment
    assert engine.name == ENGINE_NAME and engine.ray_actor_options["num_gpus"] == 1
    assert engine._deployment_config.autoscaling_config.max_replicas == 4
    assert ingress.ray_actor_options["num_cpus"] == 0


def test_replicas_open_only_the_modes_a_config_lists():
    from nemocompile.errors import NemocompileError
    from nemocompile.runtime.serve.ray_serve import RayServeOptions

    assert RayServeOptions.from_args({"artifact": "A"}).modes is None
    assert RayServeOptions.from_args({"artifact": "A", "modes": "ar, linear-spec"}).modes == ("ar", "linear-spec")
    assert RayServeOptions.from_args({"artifact": "A", "modes": ["ar"]}).modes == ("ar",)
    with pytest.raises(NemocompileError, match="args.modes: unknown mode 'fast'"):
        RayServeOptions.from_args({"artifact": "A", "modes": "ar,fast"})

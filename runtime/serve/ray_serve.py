"""`nemocompile serve --ray`: the HTTP server of ``serve --http`` scaled out on Ray Serve.

Two deployments, one application:

- ``nemocompile-engine`` (N replicas, or autoscaled): each replica loads the
  artifact once and owns one ``create_app(runtime)``, the same FastAPI app as
  ``serve --http``; every API semantic lives there. A replica answers a relayed
  ASGI request with the app's own ASGI messages, and the app's responses carry
  ``x-nemocompile-replica: <host>:<pid>``.
- ``nemocompile`` (the ingress, one light replica): forwards each HTTP request
  to an engine replica through a deployment handle and relays the messages back.
  It exists to turn a replica's death into an answer: Ray Serve's own proxy
  answers a request whose replica died with a plain-text ``500 Internal Server
  Error`` (``ray.serve._private.http_util.get_http_response_status``: an
  ``ActorDiedError`` is neither a timeout nor back-pressure), which a client
  cannot tell from a bug. Here it is ``503`` with an OpenAI-style body of type
  ``replica_unavailable`` and ``Retry-After: 1``; a stream that already started
  ends with that body as its last event before ``[DONE]``.

Every wait on a replica is bounded by the request timeout (then ``504``). Ray
Serve restarts a dead replica; the new one loads the artifact afresh, so no row
or cache state of the dead one is ever reused. ``build_app(args)`` is also the
application builder a Ray Serve config (KubeRay ``RayService``) imports.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

from nemocompile.errors import NemocompileError

APP_NAME = "nemocompile"
ENGINE_NAME = "nemocompile-engine"
REPLICA_HEADER = "x-nemocompile-replica"
DEFAULT_REQUEST_TIMEOUT_S = 600.0
RETRY_AFTER_S = 1


def check_dependencies() -> None:
    try:
        import ray  # noqa: F401
        from ray import serve  # noqa: F401
    except ImportError:
        raise NemocompileError("serve --ray needs Ray Serve: pip install 'nemocompile[ray]'") from None
    from nemocompile.runtime.serve.http import check_dependencies as check_http

    check_http()


@dataclass(frozen=True)
class RayServeOptions:
    """What ``serve --ray`` deploys. Fields mirror the command's flags."""

    artifact: str  # a path every node of the cluster can read
    backend: str = "onnxruntime"
    device: str | None = None
    model: str | None = None  # torch backend: the checkpoint
    threads: int = 1  # intra-op threads per replica, also the CPUs each replica reserves
    model_name: str | None = None
    replicas: int = 1  # fixed replica count; ignored when autoscale is set
    autoscale: tuple[int, int] | None = None  # (min, max) replicas, Ray Serve's autoscaling
    target_ongoing_requests: float | None = None  # autoscaling: requests in flight per replica it aims for
    # (None: the artifact's batch rows, which one replica decodes together)
    max_queued_requests: int = -1  # requests waiting for a replica beyond which 429 (-1: no limit)
    request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S
    modes: tuple[str, ...] | None = None  # open only these modes' graphs in each replica (None: every mode)
    verify: bool = False  # each replica checks the files' SHA-256 before opening the graphs
    prefix_cache: bool = True  # each replica reuses prompt prefixes its own requests left in its cache
    prefix_cache_tokens: int | None = None  # tokens a replica's finished requests keep (None: all)

    @classmethod
    def from_args(cls, args: dict) -> "RayServeOptions":
        """From a Ray Serve config's ``args`` (strings from YAML are accepted)."""
        if "artifact" not in args:
            raise NemocompileError("the nemocompile Ray Serve app needs args.artifact (the artifact directory)")
        auto = args.get("autoscale")
        if isinstance(auto, str):
            auto = parse_autoscale(auto)
        return cls(artifact=str(args["artifact"]), backend=args.get("backend", "onnxruntime"),
                   device=args.get("device"), model=args.get("model"), threads=int(args.get("threads", 1)),
                   model_name=args.get("model_name"), replicas=int(args.get("replicas", 1)),
                   autoscale=tuple(auto) if auto else None,
                   target_ongoing_requests=(None if args.get("target_ongoing_requests") is None
                                            else float(args["target_ongoing_requests"])),
                   max_queued_requests=int(args.get("max_queued_requests", -1)),
                   request_timeout_s=float(args.get("request_timeout_s", DEFAULT_REQUEST_TIMEOUT_S)),
                   modes=_modes(args.get("modes")), verify=bool(args.get("verify", False)),
                   prefix_cache=_flag(args.get("prefix_cache", True)),
                   prefix_cache_tokens=(None if args.get("prefix_cache_tokens") is None
                                        else int(args["prefix_cache_tokens"])))


def _flag(value) -> bool:
    """A boolean of a Ray Serve config (YAML may give a string)."""
    if isinstance(value, str):
        return value.strip().lower() not in ("false", "0", "no", "off")
    return bool(value)


def _modes(value) -> tuple[str, ...] | None:
    """``modes`` of a Ray Serve config: a list or a comma-separated string (None: every mode)."""
    if value is None:
        return None
    from nemocompile.artifact.manifest import parse_modes

    try:
        return tuple(parse_modes(value))
    except ValueError as e:
        raise NemocompileError(f"args.modes: {e}") from None


def parse_autoscale(text: str) -> tuple[int, int]:
    """``MIN:MAX`` replicas, 0 <= MIN <= MAX, MAX >= 1."""
    lo, sep, hi = text.partition(":")
    if not sep or not lo.isdigit() or not hi.isdigit() or int(lo) > int(hi) or int(hi) < 1:
        raise ValueError(f"expected MIN:MAX replicas with 0 <= MIN <= MAX and MAX >= 1, got {text!r}")
    return int(lo), int(hi)


def _error(status: int, message: str, kind: str, headers: dict | None = None):
    from nemocompile.runtime.serve.http import APIError

    return _answer(status, APIError(message, status, kind).body(), headers)


def _replica_died_body(detail: str) -> dict:
    from nemocompile.runtime.serve.http import APIError

    return APIError(f"the replica serving this request stopped ({detail}); retry the request",
                    503, "replica_unavailable").body()


def _answer(status: int, body: dict, headers: dict | None = None):
    from starlette.responses import Response

    return Response(json.dumps(body), status_code=status, media_type="application/json", headers=headers)


class ReplicaHeader:
    """ASGI middleware: every HTTP response names the replica that produced it."""

    def __init__(self, app, value: str):
        self.app, self.header = app, (REPLICA_HEADER.encode(), value.encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def tagged(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        await self.app(scope, receive, tagged)


class EngineReplica:
    """One engine replica: the artifact loaded once, served by ``create_app``."""

    def __init__(self, options: dict):
        from nemocompile.runtime.runtime import Runtime
        from nemocompile.runtime.serve.http import create_app

        opts = RayServeOptions(**options)
        extra: dict[str, Any] = {"threads": opts.threads}
        if opts.backend == "torch" and opts.model:
            extra["model"] = opts.model
        if opts.modes:
            extra["modes"] = list(opts.modes)
        extra["prefix_cache"] = opts.prefix_cache
        if opts.prefix_cache_tokens is not None:
            extra["prefix_cache_tokens"] = opts.prefix_cache_tokens
        self.runtime = Runtime.load(opts.artifact, backend=opts.backend, device=opts.device, verify=opts.verify,
                                    **extra)
        self.app = create_app(self.runtime, opts.model_name)
        self.app.add_middleware(ReplicaHeader, value=f"{socket.gethostname()}:{os.getpid()}")

    async def relay(self, scope: dict, body: bytes):
        """Run one HTTP request through the app; yield its ASGI messages as they are sent.
        When the caller goes away (this generator is closed or cancelled) the app sees
        ``http.disconnect`` and its generation stops at the next commit."""
        sent: asyncio.Queue = asyncio.Queue()
        gone = asyncio.Event()
        delivered = False

        async def receive():
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        task = asyncio.create_task(self.app(scope, receive, sent.put))
        # the end of the messages; the exception (if any) is observed here and raised below
        task.add_done_callback(lambda t: (sent.put_nowait(None), t.cancelled() or t.exception()))
        try:
            while (message := await sent.get()) is not None:
                yield message
                if message["type"] == "http.response.body" and not message.get("more_body", False):
                    break
            if task.done() and task.exception() is not None:
                raise task.exception()
        finally:
            gone.set()

    def __del__(self):
        runtime = getattr(self, "runtime", None)
        if runtime is not None:
            runtime.close()


class Ingress:
    """The HTTP entry: each request relayed to an engine replica, a dead replica mapped to 503."""

    def __init__(self, engine, request_timeout_s: float):
        self.engine = engine.options(stream=True)
        self.timeout = request_timeout_s

    async def __call__(self, request):
        from ray.exceptions import RayActorError
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
        from starlette.responses import StreamingResponse

        from nemocompile.runtime.serve.http import MAX_BODY_BYTES

        deadline = time.monotonic() + self.timeout
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > MAX_BODY_BYTES:
                break  # the app refuses it (413); no need to carry the rest
        scope = {k: v for k, v in request.scope.items()
                 if k in ("type", "asgi", "http_version", "method", "scheme", "path", "raw_path", "query_string",
                          "headers", "client", "server")}
        scope["root_path"] = ""
        messages = self.engine.relay.remote(scope, bytes(body))
        lost = (RayActorError, ReplicaUnavailableError, DeploymentUnavailableError)

        async def next_message():
            return await asyncio.wait_for(messages.__anext__(), max(deadline - time.monotonic(), 0.001))

        try:
            start = await next_message()
        except BaseException as e:
            messages.cancel()
            if isinstance(e, lost):
                return _answer(503, _replica_died_body(type(e).__name__), {"retry-after": str(RETRY_AFTER_S)})
            if isinstance(e, BackPressureError):
                return _error(429, "every replica's queue is full; retry later", "overloaded",
                              {"retry-after": str(RETRY_AFTER_S)})
            if isinstance(e, (asyncio.TimeoutError, TimeoutError)):
                return _error(504, f"no answer within the request timeout ({self.timeout:g} s)", "timeout")
            if isinstance(e, Exception):  # the app itself failed (it answers its own errors): a bug, said in JSON
                return _error(500, f"the replica failed: {type(e).__name__}", "server_error")
            raise  # cancelled: the client went away
        headers = dict(start.get("headers", []))
        events = headers.get(b"content-type", b"").startswith(b"text/event-stream")

        async def rest():
            try:
                while True:
                    message = await next_message()
                    if message["type"] != "http.response.body":
                        continue
                    if message.get("body"):
                        yield message["body"]
                    if not message.get("more_body", False):
                        return
            except StopAsyncIteration:
                return
            except (*lost, asyncio.TimeoutError, TimeoutError) as e:
                if not events:
                    raise  # a plain body cut short: the connection closes, the client sees it truncated
                detail = "timeout" if isinstance(e, (asyncio.TimeoutError, TimeoutError)) else type(e).__name__
                yield f"data: {json.dumps(_replica_died_body(detail))}\n\ndata: [DONE]\n\n".encode()
            finally:
                messages.cancel()  # the client went away or the answer is complete: free the replica

        response = StreamingResponse(rest(), status_code=start["status"])
        response.raw_headers = list(start.get("headers", []))
        return response


def build_app(args: dict | RayServeOptions):
    """The Ray Serve application (ingress bound to the engine). ``args``: the fields of
    ``RayServeOptions``; a Ray Serve config's ``import_path`` points here."""
    from ray import serve

    opts = args if isinstance(args, RayServeOptions) else RayServeOptions.from_args(args)
    actor: dict[str, Any] = {"num_cpus": opts.threads}
    if opts.backend == "tensorrt":
        actor["num_gpus"] = 1  # one engine set per GPU
    scaling: dict[str, Any]
    if opts.autoscale:
        lo, hi = opts.autoscale
        scaling = {"autoscaling_config": {"min_replicas": lo, "max_replicas": hi, "initial_replicas": max(lo, 1),
                                          "target_ongoing_requests": opts.target_ongoing_requests
                                          or _max_ongoing(opts.artifact) / 2}}
    else:
        scaling = {"num_replicas": opts.replicas}
    engine = serve.deployment(EngineReplica, name=ENGINE_NAME, ray_actor_options=actor,
                              max_ongoing_requests=_max_ongoing(opts.artifact),
                              max_queued_requests=opts.max_queued_requests, health_check_period_s=2,
                              health_check_timeout_s=30, **scaling)
    # the ingress only relays: Ray Serve's default of 5 requests at once made it the bottleneck (8 in
    # flight ran at a quarter of one server's throughput); the replicas' own limits still apply
    ingress = serve.deployment(Ingress, name=APP_NAME, num_replicas=1, ray_actor_options={"num_cpus": 0},
                               max_ongoing_requests=INGRESS_MAX_ONGOING)
    return ingress.bind(engine.bind(asdict(opts)), opts.request_timeout_s)


INGRESS_MAX_ONGOING = 1024


def _max_ongoing(artifact: str) -> int:
    """Requests one replica takes at once: enough to fill the artifact's batch rows twice over
    (the engine batches concurrent requests), at least Ray Serve's default of 5 (half of it is
    autoscaling's default target: a replica's batch rows). Read from
    the manifest where this machine has it (a cluster's driver may not)."""
    from nemocompile.artifact.manifest import Manifest

    try:
        return max(5, 2 * Manifest.load(artifact).batch_size)
    except (NemocompileError, OSError):
        return 5


def _check_cluster(opts: RayServeOptions) -> None:
    import ray

    if opts.backend == "tensorrt" and ray.cluster_resources().get("GPU", 0) < 1:
        raise NemocompileError("no GPU in the Ray cluster: the TensorRT backend needs one NVIDIA GPU per replica; "
                               "use --backend onnxruntime to run on CPU")


def serve_ray(opts: RayServeOptions, address: str | None = None, host: str = "127.0.0.1", port: int = 8000,
              num_cpus: int | None = None) -> int:
    """Start (or join, with ``address``) a Ray cluster, deploy, and serve until interrupted.
    Leaving: a local cluster is shut down; on a joined cluster only this application is deleted."""
    check_dependencies()
    import ray
    from ray import serve

    needed = (opts.autoscale[1] if opts.autoscale else opts.replicas) * opts.threads
    started = time.monotonic()
    init: dict[str, Any] = {"include_dashboard": False, "logging_level": "WARNING", "log_to_driver": False}
    if address:
        init["address"] = address
    else:
        # a laptop with fewer cores than the replicas reserve still runs them (slower, never stuck waiting)
        init["num_cpus"] = num_cpus or max(os.cpu_count() or 1, needed)
    if address:
        _check_reachable(address)
    try:
        ray.init(**init)
    except (ConnectionError, RuntimeError, ValueError) as e:
        if not address:
            raise NemocompileError(f"cannot start a local Ray cluster ({str(e).splitlines()[0]})") from None
        if _auth_refused(e):
            raise NemocompileError(f"the Ray cluster at {address} uses token authentication: copy the head's "
                                   "~/.ray/auth_token to this machine and set RAY_AUTH_MODE=token") from None
        raise NemocompileError(f"cannot join the Ray cluster at {address} ({str(e).splitlines()[0]}); "
                               "check --address") from None
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        _check_cluster(opts)
        serve.start(http_options={"host": host, "port": port, "request_timeout_s": opts.request_timeout_s + 5})
        try:
            serve.run(build_app(opts), name=APP_NAME, route_prefix="/")
        except RuntimeError as e:
            raise NemocompileError(f"the deployment failed to start: {str(e).splitlines()[0]}") from None
        scale = f"{opts.autoscale[0]}-{opts.autoscale[1]} replicas" if opts.autoscale else f"{opts.replicas} replicas"
        print(f"nemocompile serve --ray: {scale} of {opts.artifact} on {opts.backend}, ready in "
              f"{time.monotonic() - started:.1f} s; listening on http://{host}:{port}", file=sys.stderr, flush=True)
        while True:
            time.sleep(3600)
    finally:
        signal.signal(signal.SIGTERM, previous)
        try:
            if address:
                serve.delete(APP_NAME)
            else:
                serve.shutdown()
        finally:
            ray.shutdown()


def _auth_refused(error: BaseException) -> bool:
    """Ray wraps the refusal twice (ConnectionError from RuntimeError, whose text quotes the
    AuthenticationError's traceback)."""
    from ray.exceptions import AuthenticationError

    while error is not None:
        if isinstance(error, AuthenticationError) or "InvalidAuthToken" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def _check_reachable(address: str, timeout_s: float = 10.0) -> None:
    """A host:port that nothing answers on fails here at once: Ray itself retries for minutes."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or "://" in address:
        return  # "auto", ray:// client addresses: Ray's own lookup
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise NemocompileError(f"nothing answers at --address {address} ({e.strerror or 'timed out'}): start the "
                               "head node with `ray start --head` and pass the address it prints") from None


def _interrupt(signum, frame):
    raise KeyboardInterrupt

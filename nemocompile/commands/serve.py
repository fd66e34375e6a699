"""`nemocompile serve`: the runtime as a JSON-lines subprocess (--stdio), an
OpenAI-compatible HTTP server (--http), or that server's app scaled out on Ray Serve (--ray)."""

from __future__ import annotations


def add_parser(sub) -> None:
    from .common import non_negative_int, port, positive_float
    from .run import add_runtime_args

    p = sub.add_parser("serve", help="serve an artifact over stdin/stdout (JSON lines) or HTTP (OpenAI API)")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--stdio", action="store_true", help="one JSON request per stdin line, responses on stdout")
    how.add_argument("--http", action="store_true", help="OpenAI-compatible HTTP API (needs nemocompile[serve])")
    how.add_argument("--ray", action="store_true",
                     help="the HTTP API on Ray Serve replicas, local or on a cluster (needs nemocompile[ray])")
    add_runtime_args(p)
    p.add_argument("--host", default="127.0.0.1", help="HTTP bind address (default loopback only)")
    p.add_argument("--port", type=port, default=8000, help="HTTP port (0: pick a free one)")
    p.add_argument("--model-name", default=None, help="model id the HTTP API reports (default: the checkpoint's name)")
    p.add_argument("--max-queue", type=non_negative_int, default=64, metavar="N",
                   help="requests that may wait for a free batch row; more are refused (HTTP 429, stdio 'overloaded')")
    p.add_argument("--request-timeout", type=positive_float, default=None, metavar="S",
                   help="end a request still running S seconds after it arrived (HTTP 504, stdio 'timeout'); "
                        "a request's own 'timeout' field overrides it")
    add_ray_args(p)
    p.set_defaults(func=run)


def add_ray_args(p) -> None:
    from .common import positive_float, positive_int

    ray = p.add_argument_group("--ray")
    scale = ray.add_mutually_exclusive_group()
    scale.add_argument("--replicas", type=positive_int, default=None, help="fixed number of replicas (default 1)")
    scale.add_argument("--autoscale", type=_autoscale, default=None, metavar="MIN:MAX",
                       help="Ray Serve autoscaling between MIN and MAX replicas")
    ray.add_argument("--target-ongoing-requests", type=positive_float, default=None, metavar="N",
                     help="--autoscale: requests in flight per replica that autoscaling aims for (default: the "
                          "artifact's batch rows, which a replica decodes together)")
    ray.add_argument("--address", default=None,
                     help="join the Ray cluster at ADDR (e.g. 10.0.0.1:6379 from `ray start --head`); "
                          "default: start a local one")


def _autoscale(text: str) -> tuple[int, int]:
    import argparse

    from nemocompile.runtime.serve.ray_serve import parse_autoscale

    try:
        return parse_autoscale(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def run(args) -> int:
    from .run import load_runtime

    if args.ray:
        return run_ray(args)
    if args.replicas or args.autoscale or args.address:
        from ..errors import NemocompileError

        raise NemocompileError("--replicas, --autoscale and --address apply to serve --ray only")

    if args.http:
        from nemocompile.runtime.serve.http import check_dependencies, serve_http

        check_dependencies()  # fail before loading anything
        with load_runtime(args, max_queue=args.max_queue) as runtime:
            return serve_http(runtime, host=args.host, port=args.port, model_name=args.model_name,
                              request_timeout=args.request_timeout)
    from nemocompile.runtime.serve.stdio import serve_stdio

    with load_runtime(args, max_queue=args.max_queue) as runtime:
        return serve_stdio(runtime, request_timeout=args.request_timeout)


def run_ray(args) -> int:
    from nemocompile.runtime.serve.ray_serve import DEFAULT_REQUEST_TIMEOUT_S, RayServeOptions, check_dependencies, serve_ray

    check_dependencies()  # fail before starting anything
    if args.backend == "tensorrt" and not args.address:  # a local cluster has this machine's GPUs or none
        from ..runtime.backends.tensorrt import import_tensorrt

        import_tensorrt()
    if not args.address:  # on a cluster the path is the nodes' business; here it can be checked at once
        from nemocompile.artifact.files import usable_graphs
        from nemocompile.artifact.manifest import Manifest

        from ..runtime.policy import CostTable

        usable_graphs(args.artifact, Manifest.load(args.artifact), hashes=args.verify)
        CostTable.load(args.artifact, args.backend)  # a malformed costs.json: one line now, not in each replica
    timeout = args.request_timeout or DEFAULT_REQUEST_TIMEOUT_S
    max_queue = args.max_queue
    opts = RayServeOptions(artifact=str(args.artifact), backend=args.backend, device=args.device, model=args.model,
                           threads=args.threads or 1, model_name=args.model_name, replicas=args.replicas or 1,
                           autoscale=args.autoscale, target_ongoing_requests=args.target_ongoing_requests,
                           max_queued_requests=-1 if max_queue is None else max_queue, request_timeout_s=timeout,
                           modes=tuple(args.modes) if args.modes else None, verify=args.verify,
                           prefix_cache=not args.no_prefix_cache, prefix_cache_tokens=args.prefix_cache_tokens)
    return serve_ray(opts, address=args.address, host=args.host, port=args.port or _free_port(args.host))


def _free_port(host: str) -> int:
    """--port 0: Ray Serve's proxy needs a number, so pick a free one here."""
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]

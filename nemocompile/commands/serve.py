"""`nemocompile serve`: the runtime as a JSON-lines subprocess (--stdio) or an
OpenAI-compatible HTTP server (--http)."""

from __future__ import annotations


def add_parser(sub) -> None:
    from .common import non_negative_int, port, positive_float
    from .run import add_runtime_args

    p = sub.add_parser("serve", help="serve an artifact over stdin/stdout (JSON lines) or HTTP (OpenAI API)")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--stdio", action="store_true", help="one JSON request per stdin line, responses on stdout")
    how.add_argument("--http", action="store_true", help="OpenAI-compatible HTTP API (needs nemocompile[serve])")
    add_runtime_args(p)
    p.add_argument("--host", default="127.0.0.1", help="HTTP bind address (default loopback only)")
    p.add_argument("--port", type=port, default=8000, help="HTTP port (0: pick a free one)")
    p.add_argument("--model-name", default=None, help="model id the HTTP API reports (default: the checkpoint's name)")
    p.add_argument("--max-queue", type=non_negative_int, default=64, metavar="N",
                   help="requests that may wait for a free batch row; more are refused (HTTP 429, stdio 'overloaded')")
    p.add_argument("--request-timeout", type=positive_float, default=None, metavar="S",
                   help="end a request still running S seconds after it arrived (HTTP 504, stdio 'timeout'); "
                        "a request's own 'timeout' field overrides it")
    p.set_defaults(func=run)


def run(args) -> int:
    from .run import load_runtime

    if args.http:
        from ..runtime.serve_http import check_dependencies, serve_http

        check_dependencies()  # fail before loading anything
        return serve_http(load_runtime(args, max_queue=args.max_queue), host=args.host, port=args.port,
                          model_name=args.model_name, request_timeout=args.request_timeout)
    from ..runtime.serve_stdio import serve_stdio

    return serve_stdio(load_runtime(args, max_queue=args.max_queue), request_timeout=args.request_timeout)

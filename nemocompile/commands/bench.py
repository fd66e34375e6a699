"""`nemocompile bench`: tokens/s, tokens per forward, acceptance and overhead for every mode;
`nemocompile bench --serve`: a load benchmark against a real HTTP server (runtime/bench/load.py)."""

from __future__ import annotations

import argparse

BACKENDS = ("onnxruntime", "torch", "tensorrt")
# The default in-process benchmark is a quick one (about a minute on the README's artifact on a
# 2-core CPU, where quadratic-spec's fused block-32 step runs at 5 to 7 tok/s); `--limit 24
# --max-new-tokens 64` is the full held-out set.
QUICK_PROMPTS = 4
QUICK_MAX_NEW_TOKENS = 32


def add_parser(sub) -> None:
    from .common import non_negative_int, positive_float, positive_int

    p = sub.add_parser("bench", help="benchmark an artifact's modes on onnxruntime against the eager backend")
    p.add_argument("--artifact", action="append", metavar="DIR",
                   help="exported artifact (repeat for more block lengths: one artifact per block length; "
                        "--serve: the one artifact the started server serves)")
    p.add_argument("--prompts", default=None, metavar="FILE",
                   help='JSON lines with "prompt" or "ids", or plain text lines, as for parity '
                        '(default: built-in held-out code prompts)')
    p.add_argument("--limit", type=positive_int, default=None,
                   help=f"use the first N prompts (default: {QUICK_PROMPTS} of the built-in ones, every line of "
                        "--prompts FILE; --serve: all)")
    p.add_argument("--max-new-tokens", type=positive_int, default=None,
                   help=f"default {QUICK_MAX_NEW_TOKENS} (--serve: 32); the full benchmark: --limit 24 "
                        "--max-new-tokens 64")
    # the next four are the in-process benchmark's (None: their default; --serve refuses them)
    p.add_argument("--backends", type=_backends, default=None,
                   help="comma-separated backends (default onnxruntime,torch: torch is the eager reference)")
    p.add_argument("--diffusion-thresholds", type=_thresholds, default=None,
                   help="comma-separated; 'none' = fixed schedule (default 0.9,0.7)")
    p.add_argument("--linear-spec-thresholds", type=_thresholds, default=None,
                   help="comma-separated (0: one-shot draft; the default)")
    p.add_argument("--model", default=None, metavar="DIR", help="torch backend's checkpoint (default: the source)")
    p.add_argument("--threads", type=positive_int, default=1,
                   help="intra-op threads, the same for every backend (default 1: tiny models gain nothing from "
                        "more, and thread pools stall on a busy machine)")
    p.add_argument("--eos", type=_eos, default=None, help="EOS id (-1: never stop early; default: the config's)")
    p.add_argument("--max-thinking-tokens", type=non_negative_int, default=None, metavar="N",
                   help="thinking budget of every request (spec 3.5)")
    p.add_argument("--end-think-token-id", type=non_negative_int, default=None, metavar="ID",
                   help="the token that ends thinking (default: the tokenizer's </think>)")
    p.add_argument("--json", default=None, metavar="FILE", help='write {"results": [...], "summary": {...}}')
    p.add_argument("--plot", default=None, metavar="FILE.png", help="draw tokens/s and tokens per forward by mode")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    load = p.add_argument_group("load benchmark (--serve)")
    load.add_argument("--serve", action="store_true",
                      help="drive an HTTP server with concurrent streamed requests: throughput, p50/p99 latency and "
                           "time to first token per mode and concurrency level (starts `serve --http` on "
                           "--artifact unless --url is given)")
    load.add_argument("--url", default=None, help="base URL of a running server to drive instead of starting one")
    load.add_argument("--concurrency", type=_levels, default=None, metavar="C,C,...",
                      help="comma-separated levels: at most C requests in flight (default 1,2,4,8,16)")
    load.add_argument("--requests", type=positive_int, default=None, metavar="N",
                      help="requests per level (default 2*C, at least 4, at most 32)")
    load.add_argument("--repeats", type=positive_int, default=None, metavar="R",
                      help="run each level R times, the modes taking turns, and keep each mode's median-throughput "
                           "run (default 1; a shared machine's load drifts)")
    load.add_argument("--modes", type=_modes, default=None, metavar="M,M,...",
                      help="comma-separated, of ar, diffusion, linear-spec, quadratic-spec, auto "
                           "(default ar,linear-spec,quadratic-spec,auto; without --serve: open and time only "
                           "these modes' graphs, default every mode)")
    load.add_argument("--shared-prefix", type=positive_int, default=None, metavar="N",
                      help="start every request with the same N tokens (a system prompt: the first N tokens of the "
                           "prompts file) before its own prompt, to measure the server's prefix cache; text prompts "
                           "need the artifact's tokenizer (--artifact)")
    load.add_argument("--server-args", default=None, metavar='"ARGS"',
                      help='more arguments for the started server, one shell string (e.g. "--backend torch")')
    load.add_argument("--health-timeout", type=positive_float, default=None, metavar="S",
                      help="how long to wait for the server's GET /health (default 120)")
    p.set_defaults(func=run)


SERVE_ONLY = ("url", "concurrency", "requests", "repeats", "server_args", "health_timeout", "shared_prefix")
TABLE_ONLY = ("backends", "diffusion_thresholds", "linear_spec_thresholds", "model")


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _levels(text: str) -> list[int]:
    from .common import positive_int

    parts = [t.strip() for t in text.split(",") if t.strip()]
    try:
        levels = [positive_int(t) for t in parts]
    except argparse.ArgumentTypeError:
        levels = []
    if not levels:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 1, got {text!r}")
    return sorted(set(levels))


def _modes(text: str) -> list[str]:
    from nemocompile.runtime.bench.load import MODES

    return _names(text, MODES, "mode")


def _names(text: str, allowed, what: str) -> list[str]:
    """A comma-separated list of names from ``allowed``, without repeats."""
    names = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in names if m not in allowed]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown {what} {bad[0] if bad else '(none)'!r}; "
                                         f"use a comma-separated list of {', '.join(allowed)}")
    return list(dict.fromkeys(names))


def _thresholds(text: str) -> list:
    from ..decode.common import DEFAULT, parse_threshold
    from ..errors import NemocompileError

    out = []
    for t in (t for t in text.split(",") if t.strip()):
        try:
            value = parse_threshold(t)
        except NemocompileError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        out.append(None if value is DEFAULT else value)
    if not out:
        raise argparse.ArgumentTypeError(f"expected comma-separated thresholds, got {text!r}")
    return out


def _backends(text: str) -> list[str]:
    return _names(text, BACKENDS, "backend")


def _eos(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -2
    if value < -1:
        raise argparse.ArgumentTypeError(f"expected a token id or -1, got {text!r}")
    return value


def run(args) -> int:
    from ..errors import NemocompileError
    from ..runtime.bench import modes as bench
    from .common import check_output_file

    if args.serve:
        return run_serve(args)
    given = [d for d in SERVE_ONLY if getattr(args, d) is not None]
    if given:
        raise NemocompileError(f"{_flag(given[0])} belongs to the load benchmark; add --serve")
    if not args.artifact:
        raise NemocompileError("bench needs --artifact DIR (an exported artifact)")
    # every destination and optional dependency is checked before the benchmark runs
    check_output_file(args.json, "--json")
    check_output_file(args.plot, "--plot")
    if args.plot:
        bench.check_plot_file(args.plot)
    limit = args.limit or (QUICK_PROMPTS if args.prompts is None else None)
    prompts = bench.load_prompts(args.prompts, limit)
    report = bench.run_bench(
        args.artifact, prompts, backends=args.backends or list(BACKENDS[:2]),
        max_new_tokens=args.max_new_tokens or QUICK_MAX_NEW_TOKENS,
        diffusion_thresholds=args.diffusion_thresholds or list(bench.DEFAULT_DIFFUSION_THRESHOLDS),
        linear_spec_thresholds=args.linear_spec_thresholds or list(bench.DEFAULT_LINEAR_SPEC_THRESHOLDS),
        model=args.model, threads=args.threads, eos=args.eos, progress=None if args.quiet else bench.stderr_progress,
        modes=[m for m in args.modes or () if m != "auto"] or None,
        thinking={"max_thinking_tokens": args.max_thinking_tokens, "end_think_token_id": args.end_think_token_id})
    return _report(bench, report, args)


def _report(module, report: dict, args) -> int:
    """Print ``report`` with ``module``'s table, then write its --json and --plot."""
    print(module.format_table(report), flush=True)  # first: a failing write below must not lose the table
    if args.json:
        module.write_json(report, args.json)
    if args.plot:
        module.plot(report, args.plot)
    return 0


def run_serve(args) -> int:
    """`bench --serve`: the load benchmark (runtime/bench/load.py)."""
    from ..errors import NemocompileError
    from ..runtime.bench import load as load_bench, modes as bench
    from .common import check_output_file

    # every argument, destination and dependency is checked before a server starts
    given = [d for d in TABLE_ONLY if getattr(args, d) is not None]
    if given:
        raise NemocompileError(f"{_flag(given[0])} does not apply to --serve (the server decides; pass its "
                               'options with --server-args "...")')
    if args.url is not None:
        if args.artifact or args.server_args is not None:
            raise NemocompileError(f"--url drives a running server: drop "
                                   f"{'--artifact' if args.artifact else '--server-args'}")
        load_bench.check_url(args.url)
    else:
        if not args.artifact or len(args.artifact) > 1:
            raise NemocompileError("bench --serve needs one --artifact DIR to serve (or --url of a running server)")
        from nemocompile.artifact.manifest import Manifest
        from nemocompile.runtime.serve.http import check_dependencies

        check_dependencies()
        Manifest.load(args.artifact[0])
    server_args = load_bench.check_server_args(args.server_args)
    load_bench.require_httpx()
    check_output_file(args.json, "--json")
    check_output_file(args.plot, "--plot")
    if args.plot:
        bench.check_plot_file(args.plot)
    prompts = bench.load_prompts(args.prompts, args.limit)
    if args.shared_prefix:
        prompts = load_bench.with_shared_prefix(prompts, args.shared_prefix, None if args.url else args.artifact[0])
    extra = {k: v for k, v in (("eos", args.eos), ("max_thinking_tokens", args.max_thinking_tokens),
                               ("end_think_token_id", args.end_think_token_id)) if v is not None}
    config = load_bench.LoadConfig(
        concurrency=tuple(args.concurrency or load_bench.DEFAULT_CONCURRENCY), requests=args.requests,
        modes=tuple(args.modes or load_bench.DEFAULT_MODES),
        max_new_tokens=args.max_new_tokens or load_bench.DEFAULT_MAX_NEW_TOKENS, extra_body=extra,
        repeats=args.repeats or 1)
    report = load_bench.run_load_bench(
        prompts, config, artifact=None if args.url else args.artifact[0], url=args.url, threads=args.threads,
        server_args=server_args, health_timeout_s=args.health_timeout or load_bench.HEALTH_TIMEOUT_S,
        progress=None if args.quiet else bench.stderr_progress)
    report["settings"]["shared_prefix"] = args.shared_prefix
    return _report(load_bench, report, args)

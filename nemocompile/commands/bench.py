"""`nemocompile bench`: tokens/s, tokens per forward, acceptance and overhead for every mode."""

from __future__ import annotations

import argparse

BACKENDS = ("onnxruntime", "torch", "tensorrt")


def add_parser(sub) -> None:
    from .common import non_negative_int, positive_int

    p = sub.add_parser("bench", help="benchmark an artifact's modes on onnxruntime against the eager backend")
    p.add_argument("--artifact", required=True, action="append", metavar="DIR",
                   help="exported artifact (repeat for more block lengths: one artifact per block length)")
    p.add_argument("--prompts", default=None, metavar="FILE",
                   help='JSON lines with "prompt" or "ids", or plain text lines, as for parity '
                        '(default: built-in held-out code prompts)')
    p.add_argument("--limit", type=positive_int, default=None, help="use the first N prompts")
    p.add_argument("--max-new-tokens", type=positive_int, default=64)
    p.add_argument("--backends", type=_backends, default="onnxruntime,torch",
                   help="comma-separated backends (default onnxruntime,torch: torch is the eager reference)")
    p.add_argument("--diffusion-thresholds", type=_thresholds, default="0.9,0.7",
                   help="comma-separated; 'none' = fixed schedule")
    p.add_argument("--linear-spec-thresholds", type=_thresholds, default="0",
                   help="comma-separated (0: one-shot draft)")
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
    p.set_defaults(func=run)


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
    names = [b.strip() for b in text.split(",") if b.strip()]
    bad = [b for b in names if b not in BACKENDS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown backend {bad[0] if bad else '(none)'!r}; "
                                         f"use a comma-separated list of {', '.join(BACKENDS)}")
    return list(dict.fromkeys(names))


def _eos(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -2
    if value < -1:
        raise argparse.ArgumentTypeError(f"expected a token id or -1, got {text!r}")
    return value


def run(args) -> int:
    from ..runtime import bench
    from .common import check_output_file

    # every destination and optional dependency is checked before the benchmark runs
    check_output_file(args.json, "--json")
    check_output_file(args.plot, "--plot")
    if args.plot:
        bench.require_matplotlib()
    prompts = bench.load_prompts(args.prompts, args.limit)
    report = bench.run_bench(
        args.artifact, prompts, backends=args.backends, max_new_tokens=args.max_new_tokens,
        diffusion_thresholds=args.diffusion_thresholds, linear_spec_thresholds=args.linear_spec_thresholds,
        model=args.model, threads=args.threads, eos=args.eos, progress=None if args.quiet else bench.stderr_progress,
        thinking={"max_thinking_tokens": args.max_thinking_tokens, "end_think_token_id": args.end_think_token_id})
    print(bench.format_table(report), flush=True)  # first: a failing write below must not lose the table
    if args.json:
        bench.write_json(report, args.json)
    if args.plot:
        bench.plot(report, args.plot)
    return 0

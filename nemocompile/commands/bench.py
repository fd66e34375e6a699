"""`nemocompile bench`: tokens/s, tokens per forward, acceptance and overhead for every mode."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="benchmark an artifact's modes on onnxruntime against the eager backend")
    p.add_argument("--artifact", required=True, action="append", metavar="DIR",
                   help="exported artifact (repeat for more block lengths: one artifact per block length)")
    p.add_argument("--prompts", default=None, metavar="FILE",
                   help='JSON lines of {"prompt": text} or {"ids": [...]} (default: built-in held-out code prompts)')
    p.add_argument("--limit", type=int, default=None, help="use the first N prompts")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--backends", default="onnxruntime,torch",
                   help="comma-separated backends (default onnxruntime,torch: torch is the eager reference)")
    p.add_argument("--diffusion-thresholds", default="0.9,0.7", help="comma-separated; 'none' = fixed schedule")
    p.add_argument("--linear-spec-thresholds", default="0", help="comma-separated (0: one-shot draft)")
    p.add_argument("--model", default=None, metavar="DIR", help="torch backend's checkpoint (default: the source)")
    p.add_argument("--threads", type=int, default=1,
                   help="intra-op threads, the same for every backend (default 1: tiny models gain nothing from "
                        "more, and thread pools stall on a busy machine)")
    p.add_argument("--eos", type=int, default=None, help="EOS id (-1: never stop early; default: the config's)")
    p.add_argument("--max-thinking-tokens", type=int, default=None, metavar="N",
                   help="thinking budget of every request (spec 3.5)")
    p.add_argument("--end-think-token-id", type=int, default=None, metavar="ID",
                   help="the token that ends thinking (default: the tokenizer's </think>)")
    p.add_argument("--json", default=None, metavar="FILE", help='write {"results": [...], "summary": {...}}')
    p.add_argument("--plot", default=None, metavar="FILE.png", help="draw tokens/s and tokens per forward by mode")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.set_defaults(func=run)


def _thresholds(text: str) -> list:
    return [None if t.strip().lower() == "none" else float(t) for t in text.split(",") if t.strip()]


def run(args) -> int:
    from ..runtime import bench

    prompts = bench.load_prompts(args.prompts, args.limit)
    report = bench.run_bench(
        args.artifact, prompts, backends=[b.strip() for b in args.backends.split(",") if b.strip()],
        max_new_tokens=args.max_new_tokens, diffusion_thresholds=_thresholds(args.diffusion_thresholds),
        linear_spec_thresholds=_thresholds(args.linear_spec_thresholds), model=args.model, threads=args.threads,
        eos=args.eos, progress=None if args.quiet else bench.stderr_progress,
        thinking={"max_thinking_tokens": args.max_thinking_tokens, "end_think_token_id": args.end_think_token_id})
    if args.json:
        bench.write_json(report, args.json)
    print(bench.format_table(report))
    if args.plot:
        bench.plot(report, args.plot)
    return 0

"""`nemocompile calibrate`: measure the cost table `mode="auto"` chooses by, into the artifact."""

from __future__ import annotations

import sys


def add_parser(sub) -> None:
    from .common import positive_int

    p = sub.add_parser("calibrate", help="time every graph and measure self-speculation acceptance: the cost "
                                         "table mode=auto reads (costs.json in the artifact)")
    p.add_argument("--artifact", required=True, metavar="DIR", help="exported artifact directory (nemocompile export)")
    p.add_argument("--backend", choices=["onnxruntime", "torch", "tensorrt"], default="onnxruntime",
                   help="the backend that will serve (a table holds for its backend only)")
    p.add_argument("--device", default=None,
                   help="cpu or cuda (default: cuda when onnxruntime-gpu sees an NVIDIA GPU, else cpu)")
    p.add_argument("--model", default=None, metavar="DIR",
                   help="torch backend: the checkpoint (default: the manifest's source)")
    p.add_argument("--threads", type=positive_int, default=1,
                   help="intra-op threads, as the server will run (default 1; recorded in the table)")
    from .run import mode_list

    p.add_argument("--modes", type=mode_list, default=None, metavar="M,M,...",
                   help="time only these modes' graphs (as the server will open them with --modes)")
    p.add_argument("--repeats", type=positive_int, default=20, help="timed forwards per graph, after 2 untimed (median; default 20)")
    p.add_argument("--prompts", default=None, metavar="FILE",
                   help='acceptance prompts: JSON lines with "prompt" or "ids", or plain text lines '
                        '(default: built-in held-out code prompts)')
    p.add_argument("--limit", type=positive_int, default=8, help="use the first N prompts (default 8)")
    p.add_argument("--max-new-tokens", type=positive_int, default=64, help="tokens per acceptance prompt")
    p.add_argument("--out", default=None, metavar="FILE",
                   help="write the table here instead of DIR/costs.json (e.g. a read-only artifact)")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.set_defaults(func=run)


def run(args) -> int:
    import os
    from pathlib import Path

    from ..errors import NemocompileError
    from nemocompile.artifact.manifest import Manifest
    from ..runtime.bench import modes as bench
    from nemocompile.runtime.bench.calibrate import calibrate, format_table, one_row_choice
    from ..runtime.policy import COSTS_FILE
    from .common import check_output_file
    from .run import load_runtime

    # the destination and the prompts are checked before anything is measured
    Manifest.load(args.artifact)
    if args.out is not None:
        check_output_file(args.out, "--out")
        target = Path(args.out)
    else:
        target = Path(args.artifact) / COSTS_FILE
        if not os.access(args.artifact, os.W_OK | os.X_OK) or (target.exists() and not os.access(target, os.W_OK)):
            raise NemocompileError(f"{args.artifact} is not writable: the cost table cannot go beside its "
                                   "manifest; pass --out FILE to write it elsewhere")
    prompts = bench.load_prompts(args.prompts, args.limit)
    runtime = load_runtime(args, costs=False)  # the table it replaces may be the malformed one
    try:
        progress = None if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
        table = calibrate(runtime, prompts, repeats=args.repeats,
                          max_new_tokens=args.max_new_tokens, threads=args.threads, progress=progress)
        print(format_table(table, one_row_choice(table, runtime)), flush=True)
        path = table.save(target)
    finally:
        runtime.close()
    print(f"wrote {path}")
    return 0

"""`nemocompile parity`: an artifact on ONNX Runtime against the eager PyTorch model."""

from __future__ import annotations


def add_parser(sub) -> None:
    from .common import positive_int

    p = sub.add_parser("parity", help="compare an artifact's graphs and generations with the eager model")
    p.add_argument("--artifact", required=True, metavar="DIR", help="directory written by `nemocompile export`")
    p.add_argument("--model", default=None, metavar="DIR",
                   help="checkpoint to compare with (default: the artifact's source, else the embedded model)")
    p.add_argument("--prompts", default=None, metavar="FILE",
                   help='prompts for whole generations: JSON lines with "prompt" or "ids", or plain text lines')
    p.add_argument("--max-new-tokens", type=positive_int, default=32)
    p.add_argument("--steps-only", action="store_true", help="skip the whole-generation comparison")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch threads for the eager model (1 is fastest for tiny models on a busy machine)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.set_defaults(func=run)


def run(args) -> int:
    from nemocompile.artifact.manifest import Manifest
    from nemocompile.checks.parity import check_parity, read_prompts

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    prompts = read_prompts(args.prompts) if args.prompts else None
    manifest = Manifest.load(args.artifact)
    from ..progress import Heartbeat, stderr

    say = (lambda msg: None) if args.quiet else stderr
    if manifest.weight_precision != "float" or manifest.precision != "float":  # quantized: own measures, thresholds
        from nemocompile.checks.quant_parity import check_quantized_parity

        with Heartbeat("parity: quantized measures", say=say):
            quant = check_quantized_parity(args.artifact, args.model, prompts, max_new_tokens=args.max_new_tokens)
        print(quant.to_json() if args.json else quant.table())
        return 0 if quant.ok else 1
    report = check_parity(args.artifact, args.model, prompts, max_new_tokens=args.max_new_tokens,
                          generations=not args.steps_only, progress=say)
    print(report.to_json() if args.json else report.table())
    return 0 if report.ok else 1

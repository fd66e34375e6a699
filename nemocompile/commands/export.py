"""`nemocompile export`: a checkpoint's static decode graphs as an ONNX artifact."""

from __future__ import annotations

import json
import sys


def add_parser(sub) -> None:
    from .common import add_model_arg, positive_int

    p = sub.add_parser("export", help="export static ONNX decode graphs (one per step kind) and a manifest")
    add_model_arg(p)
    p.add_argument("--mode", default="all", help="ar, diffusion, linear-spec or all (default: all)")
    p.add_argument("--block-length", type=positive_int, default=None,
                   help="B of denoise/commit/draft/verify (default: the config's block_size)")
    p.add_argument("--max-seq-len", type=positive_int, default=512, help="cache capacity C in tokens (default: 512)")
    p.add_argument("--batch-size", type=positive_int, default=1, help="static batch (default: 1)")
    p.add_argument("--prefill-length", type=positive_int, default=None, help="prompt chunk P (default: min(64, C))")
    p.add_argument("--dtype", default="fp32", help="fp32 (default), fp16 or bf16: weights and cache")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (default: 18; TensorRT parses 9-20 in full)")
    p.add_argument("--out", required=True, metavar="DIR", help="artifact directory (written atomically)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("--no-optimize", action="store_true", help="skip the graph passes (weight transposes, folding)")
    p.add_argument("--no-share-weights", action="store_true",
                   help="give every graph its own copy of the weights (larger; for comparison)")
    p.add_argument("--dump-after", default=None, metavar="STAGE",
                   help="save each graph after this pass-pipeline stage into DIR.dump/")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..graphs.export import export_artifact
    from ..passes.check_tensorrt import lint_artifact

    modes = [m.strip() for m in args.mode.split(",")] if "," in args.mode else args.mode
    manifest = export_artifact(
        args.model, args.out, modes=modes, block_length=args.block_length, max_seq_len=args.max_seq_len,
        batch_size=args.batch_size, dtype=args.dtype, prefill_length=args.prefill_length, progress=True,
        opset=args.opset, optimize=not args.no_optimize, share_weights=not args.no_share_weights,
        overwrite=args.force, dump_after=args.dump_after,
    )
    try:
        report = lint_artifact(args.out)
    except KeyboardInterrupt:  # the artifact is complete: say so rather than a bare "interrupted"
        print(f"interrupted after {args.out} was written in full; the TensorRT lint did not run "
              f"(nemocompile check --artifact {args.out})", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps({"manifest": manifest.to_dict(), "tensorrt": report}, indent=2))
        return 0
    print(f"artifact   {args.out}")
    print(f"modes      {', '.join(manifest.modes)}  (dtype {manifest.dtype}, batch {manifest.batch_size}, "
          f"capacity {manifest.cache_capacity}, block {manifest.block_length}, prefill {manifest.prefill_length}, "
          f"opset {manifest.opset})")
    for g in manifest.graphs:
        print(f"  {g.step:<8} L={g.block_length:<4} {g.pattern:<13} {'writes' if g.writes_cache else 'reads '} "
              f"{'LoRA' if g.lora else '    '}  {g.file}")
    bad = {k: v for k, v in report.items() if v}
    print("TensorRT   " + ("every graph passes the ONNX-parser lint" if not bad else
                           "; ".join(f"{k}: {len(v)} problem(s)" for k, v in bad.items())))
    return 0

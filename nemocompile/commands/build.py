"""`nemocompile build`: TensorRT engines for an exported artifact, built on the GPU that will run them."""

from __future__ import annotations

import json
import sys


def add_parser(sub) -> None:
    p = sub.add_parser("build", help="build TensorRT engines from an artifact's graphs (on the target GPU)")
    p.add_argument("--artifact", required=True, metavar="DIR", help="directory written by `nemocompile export`")
    p.add_argument("--workspace-gb", type=float, default=None,
                   help="TensorRT workspace limit in GiB (default: TensorRT's, the GPU's memory)")
    p.add_argument("--opt-level", type=int, default=3, choices=range(6), metavar="0-5",
                   help="builder optimization level (default 3; 5 searches longest)")
    p.add_argument("--timing-cache", default=None, metavar="FILE",
                   help="reuse and update kernel timings in FILE (faster rebuilds on the same GPU)")
    p.add_argument("--device", default="cuda", help="CUDA device to build on (default: cuda)")
    p.add_argument("--force", action="store_true", help="rebuild engines the build record says are up to date")
    p.add_argument("--json", action="store_true", help="print the build record as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from ..errors import NemocompileError
    from nemocompile.artifact.manifest import Manifest
    from ..runtime.backends.tensorrt import build_engines, import_tensorrt

    manifest = Manifest.load(args.artifact)  # bad input is reported before any GPU work
    if args.timing_cache and not Path(args.timing_cache).resolve().parent.is_dir():
        raise NemocompileError(f"--timing-cache {args.timing_cache}: its directory does not exist; create it or "
                               "name a file in an existing directory")
    import_tensorrt()  # no GPU or no TensorRT: one clear line naming the alternative
    print(f"building {len(manifest.graphs)} TensorRT engine(s) for {args.artifact} ({manifest.dtype})",
          file=sys.stderr)
    record = build_engines(args.artifact, manifest, workspace_gb=args.workspace_gb, opt_level=args.opt_level,
                           timing_cache=args.timing_cache, force=args.force, device=args.device,
                           log=lambda msg: print(msg, file=sys.stderr))
    if args.json:
        print(json.dumps(record, indent=2))
    else:
        print(f"engines for {record['gpu']['name']} (sm {record['gpu']['compute_capability']}, TensorRT "
              f"{record['tensorrt_version']}); run them with `nemocompile run --artifact {args.artifact} "
              f"--backend tensorrt`")
    return 0

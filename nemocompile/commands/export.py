"""`nemocompile export`: a checkpoint's static decode graphs as an ONNX artifact."""

from __future__ import annotations

import json
import sys


def add_parser(sub) -> None:
    from .common import add_model_arg, positive_int

    p = sub.add_parser("export", help="export static ONNX decode graphs (one per step kind) and a manifest")
    add_model_arg(p)
    p.add_argument("--mode", default="all",
                   help="ar, diffusion, linear-spec, quadratic-spec, a comma list, or all (default: all)")
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
    p.add_argument("--no-logprobs", action="store_true",
                   help="graphs return no top-20 log-probs (the OpenAI API's logprobs and echo then refuse); "
                        "they are small, so they are on by default")
    p.add_argument("--greedy-only", action="store_true",
                   help="no graph returns vocabulary-sized logits (token ids and confidences only): smaller "
                        "outputs for real vocabularies; temperature > 0 then needs another export")
    p.add_argument("--draft-groups", type=int, default=None, metavar="G",
                   help="quadratic-spec: draft for the first G acceptance points only (B + G*B tokens per fused "
                        "forward instead of B*(B+1); at most G tokens accepted per cycle; default: all B)")
    p.add_argument("--weights", default="float", choices=("float", "int4", "int8"),
                   help="weight-only quantization into ONNX Runtime's MatMulNBits (default: float, the --dtype)")
    p.add_argument("--quant-method", default=None, choices=("rtn", "hqq", "gptq", "awq_lite", "awq_clip"),
                   help="--weights: rtn, round to nearest per block (default); hqq: half-quadratic, int4, no "
                        "calibration data; gptq: int4 calibrated on --quant-calibration prompts. --precision int4-awq: "
                        "ModelOpt's awq_lite (default) or awq_clip")
    p.add_argument("--quant-calibration", default=None, metavar="FILE",
                   help="what gptq and --precision calibrate on: JSON lines with \"prompt\" or \"ids\", or text lines "
                        "(default: nemocompile's own source)")
    p.add_argument("--quant-block", type=int, default=None, metavar="N",
                   help="weights per scale along the input dimension: 16, 32 (default for --weights), 64, 128 "
                        "(default for --precision int4-awq, which takes 32, 64 or 128) or 256")
    p.add_argument("--quant-symmetric", action="store_true", help="rtn: no zero points (slightly less accurate)")
    p.add_argument("--quant-compute", default="int8", choices=("int8", "float"),
                   help="ONNX Runtime's CPU kernel: int8 (default: activations quantized per block inside "
                        "MatMulNBits, ~4x faster) or float (fp32 activations; int8 weights then run ~30x slower)")
    p.add_argument("--quant-head", default="int8", choices=("int4", "int8", "float"),
                   help="the output head's precision (default int8: int4 there costs the most top-1 agreement)")
    p.add_argument("--precision", default=None, choices=("fp8", "int4-awq", "nvfp4"),
                   help="TensorRT Q/DQ graphs by NVIDIA Model Optimizer (pip install -e \".[modelopt]\"), calibrated "
                        "on --quant-calibration prompts; excludes --weights; nvfp4 (W4A4, --dtype fp16) runs on TensorRT only "
                        "(Blackwell)")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..graphs.export import export_artifact
    from ..passes.check_tensorrt import lint_artifact

    from nemocompile.checks.parity import read_prompts
    from ..errors import NemocompileError
    from ..passes.quantize_qdq import AWQ_METHODS, QdqSettings
    from ..passes.quantize_weights import QuantSettings

    modes = [m.strip() for m in args.mode.split(",")] if "," in args.mode else args.mode
    if args.precision is not None and args.weights != "float":
        raise NemocompileError("--precision (TensorRT Q/DQ) and --weights (ONNX Runtime MatMulNBits) exclude each "
                               "other; choose one")
    awq = args.quant_method in AWQ_METHODS
    if awq and args.precision != "int4-awq":
        raise NemocompileError(f"--quant-method {args.quant_method} is ModelOpt's int4-awq calibration; use it with "
                               "--precision int4-awq (--weights takes rtn, hqq or gptq)")
    if args.precision in ("fp8", "nvfp4") and (args.quant_method or args.quant_block):
        raise NemocompileError(f"--precision {args.precision} takes no --quant-method or --quant-block")
    if args.precision == "int4-awq" and args.quant_method and not awq:
        raise NemocompileError(f"--precision int4-awq calibrates with --quant-method awq_lite or awq_clip, "
                               f"not {args.quant_method}")
    quantize = None if args.weights == "float" else QuantSettings(
        precision=args.weights, method=args.quant_method or "rtn", block_size=args.quant_block or 32,
        symmetric=args.quant_symmetric, head=args.quant_head, compute=args.quant_compute)
    precision = args.precision
    if precision == "int4-awq":
        precision = QdqSettings(precision=precision, method=args.quant_method or QdqSettings.method,
                                block_size=args.quant_block or QdqSettings.block_size)
    manifest = export_artifact(
        args.model, args.out, modes=modes, block_length=args.block_length, max_seq_len=args.max_seq_len,
        batch_size=args.batch_size, dtype=args.dtype, prefill_length=args.prefill_length, progress=True,
        opset=args.opset, optimize=not args.no_optimize, share_weights=not args.no_share_weights,
        overwrite=args.force, dump_after=args.dump_after, logits=not args.greedy_only, logprobs=not args.no_logprobs,
        draft_groups=args.draft_groups, quantize=quantize, precision=precision,
        calibration_prompts=read_prompts(args.quant_calibration) if args.quant_calibration else None,
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
    if manifest.quantization:
        q = manifest.quantization
        print(f"weights    {manifest.weight_precision} {q['method']} block {q['block_size']}, {q['compute']} compute, "
              f"head {q['head']} (MatMulNBits; embedding and LoRA float): runs on --backend onnxruntime only")
    if manifest.precision != "float":
        print(f"precision  {manifest.precision} Q/DQ by NVIDIA Model Optimizer (embedding and LoRA {manifest.dtype}): "
              f"for TensorRT (nemocompile build), not run on a GPU here")
    for g in manifest.graphs:
        print(f"  {g.step:<13} L={g.block_length:<4} {g.pattern:<13} {'writes' if g.writes_cache else 'reads '} "
              f"{'LoRA' if g.lora else '    '}  {g.file}")
    bad = {k: v for k, v in report.items() if v}
    print("TensorRT   " + ("every graph passes the ONNX-parser lint" if not bad else
                           "; ".join(f"{k}: {len(v)} problem(s)" for k, v in bad.items())))
    return 0

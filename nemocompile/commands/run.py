"""`nemocompile run`: one generation through the runtime (compiled graphs of an artifact)."""

from __future__ import annotations

import json
import sys


def add_runtime_args(p) -> None:
    """The arguments every runtime command takes: which artifact, on which backend."""
    p.add_argument("--artifact", required=True, metavar="DIR", help="exported artifact directory (nemocompile export)")
    p.add_argument("--backend", choices=["onnxruntime", "torch", "tensorrt"], default="onnxruntime")
    p.add_argument("--device", default=None,
                   help="cpu or cuda (default: cuda when onnxruntime-gpu sees an NVIDIA GPU, else cpu)")
    p.add_argument("--model", default=None, metavar="DIR",
                   help="torch backend: the checkpoint (default: the manifest's source)")
    from .common import non_negative_int, positive_int

    p.add_argument("--threads", type=positive_int, default=None, help="intra-op threads (default: the backend's)")
    p.add_argument("--verify", action="store_true",
                   help="check every file's SHA-256 against the manifest before opening the graphs (reads every "
                        "byte: use it for an artifact copied between machines; a load checks sizes only)")
    p.add_argument("--modes", type=mode_list, default=None, metavar="M,M,...",
                   help="open only these modes' graphs: less memory (ONNX Runtime holds a prepacked copy of "
                        "quantized weights per graph) and a faster start (default: every mode; run: its --mode)")
    p.add_argument("--no-prefix-cache", action="store_true",
                   help="prefill every prompt from scratch (default: reuse the K/V of a prompt prefix an earlier "
                        "request left in the cache)")
    p.add_argument("--prefix-cache-tokens", type=non_negative_int, default=None, metavar="N",
                   help="tokens finished requests keep for reuse, least recently used evicted first (default: "
                        "all their rows hold)")


def mode_list(text: str) -> list[str]:
    """--modes: a comma-separated list of decode modes (auto is not one: it picks among those opened)."""
    import argparse

    from nemocompile.artifact.manifest import parse_modes

    try:
        return parse_modes(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def load_runtime(args, **options):
    from ..runtime import Runtime

    if args.modes:
        options["modes"] = args.modes
    if args.threads:
        options["threads"] = args.threads
    if getattr(args, "no_prefix_cache", False):
        options["prefix_cache"] = False
    if getattr(args, "prefix_cache_tokens", None) is not None:
        options["prefix_cache_tokens"] = args.prefix_cache_tokens
    if getattr(args, "verify", False):
        options["verify"] = True
    if args.backend == "torch" and args.model:
        options["model"] = args.model
    return Runtime.load(args.artifact, backend=args.backend, device=args.device, **options)


def add_parser(sub) -> None:
    from .common import add_decode_args

    p = sub.add_parser("run", help="generate once with an exported artifact's compiled graphs")
    add_runtime_args(p)
    add_decode_args(p)
    p.add_argument("--stream", action="store_true", help="print tokens as they are committed")
    p.set_defaults(func=run)


def run(args) -> int:
    if args.modes is None and args.mode != "auto":
        args.modes = [args.mode]  # one generation: the graphs of its mode are all it needs
    with load_runtime(args) as runtime:
        return _run(args, runtime)


def _run(args, runtime) -> int:
    from .common import chat_options, sampling_options

    kw = dict(mode=args.mode, max_new_tokens=args.max_new_tokens, block_length=args.block_length,
              threshold=args.threshold, temperature=args.temperature, seed=args.seed,
              max_thinking_tokens=args.max_thinking_tokens, end_think_token_id=args.end_think_token_id,
              **chat_options(args))
    sampling = sampling_options(args)
    if sampling:
        kw["sampling"] = sampling
    if args.stream:
        stream = runtime.generate(args.prompt, stream=True, **kw)
        tokens: list[int] = []
        shown = ""
        for chunk in stream:
            tokens += chunk
            if runtime.tokenizer is not None and not args.json:
                text = runtime.tokenizer.decode(tokens)
                if not text.endswith("\ufffd"):  # hold back a partial UTF-8 character
                    sys.stdout.write(text[len(shown):])
                    sys.stdout.flush()
                    shown = text
            elif not args.json:
                print(" ".join(map(str, chunk)), flush=True)
        result = stream.result
        if not args.json and runtime.tokenizer is not None:
            sys.stdout.write(result.text[len(shown):] + "\n")
    else:
        result = runtime.generate(args.prompt, **kw)
    if args.json:
        print(json.dumps({"text": result.text, "tokens": result.tokens, "finish_reason": result.finish_reason,
                          "stats": result.stats.to_dict()}))
        return 0
    if not args.stream:
        print(result.text if result.text is not None else " ".join(map(str, result.tokens)))
    print(f"[{result.stats.summary()}]", file=sys.stderr)
    return 0

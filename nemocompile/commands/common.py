"""Argument helpers shared by subcommands."""

from __future__ import annotations

import argparse
import math
import os


def add_model_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, metavar="DIR",
                   help="checkpoint directory (default: the embedded tiny model)")


def add_decode_args(p: argparse.ArgumentParser) -> None:
    """The decoding knobs every generating command takes."""
    from ..text.request import MODES

    p.add_argument("--mode", choices=list(MODES), default="ar")
    p.add_argument("--prompt", required=True, help="prompt text")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the checkpoint's chat template")
    p.add_argument("--no-thinking", action="store_true",
                   help="chat with enable_thinking=false (implies --chat): the template skips the <think> block")
    p.add_argument("--max-new-tokens", type=positive_int, default=64)
    p.add_argument("--block-length", type=positive_int, default=None,
                   help="block / draft length (default: config block_size)")
    p.add_argument("--threshold", default=None,
                   help="confidence threshold in [0, 1] or 'none' (diffusion default 0.9, linear-spec 0)")
    p.add_argument("--temperature", type=non_negative_float, default=0.0)
    p.add_argument("--seed", type=non_negative_int, default=None)
    for flag, kind, what in (("--top-p", float, "keep the most probable tokens up to this mass, in (0, 1]"),
                             ("--top-k", int, "keep the k most probable tokens"),
                             ("--min-p", float, "drop tokens below min_p x the top probability"),
                             ("--presence-penalty", float, "subtract from every token already emitted, [-2, 2]"),
                             ("--frequency-penalty", float, "subtract per emission of a token, [-2, 2]"),
                             ("--repetition-penalty", float, "divide the logits of prompt and output tokens (> 0)")):
        p.add_argument(flag, type=kind, default=None, help=f"sampling: {what} (docs/decoding.md)")
    p.add_argument("--max-thinking-tokens", type=non_negative_int, default=None, metavar="N",
                   help="thinking budget: the token at output index N becomes --end-think-token-id unless it "
                        "was already emitted (every mode)")
    p.add_argument("--end-think-token-id", type=non_negative_int, default=None, metavar="ID",
                   help="the token that ends thinking (default: the tokenizer's </think>)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def sampling_options(args: argparse.Namespace) -> dict:
    """The sampling controls given on the command line (nemocompile.sampling checks them)."""
    from ..sampling import FIELDS

    return {f: getattr(args, f) for f in FIELDS if getattr(args, f, None) is not None}


def chat_options(args: argparse.Namespace) -> dict:
    """The generate() keywords of --chat / --no-thinking."""
    if args.no_thinking:
        return {"chat": True, "chat_template_kwargs": {"enable_thinking": False}}
    return {"chat": args.chat}


# ---- argument types: a bad value is refused while parsing, before any work ----
def positive_int(text: str) -> int:
    return _int(text, 1, "an integer >= 1")


def non_negative_int(text: str) -> int:
    return _int(text, 0, "an integer >= 0")


def port(text: str) -> int:
    value = _int(text, 0, "a port number 0-65535")
    if value > 65535:
        raise argparse.ArgumentTypeError(f"expected a port number 0-65535, got {text!r}")
    return value


def positive_float(text: str) -> float:
    value = non_negative_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    """A finite number >= 0 (inf and nan are refused: no decoder means anything by them)."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def _int(text: str, low: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def check_output_file(path: str | None, flag: str) -> None:
    """Refuse an output path that cannot be written, before the work that produces it runs."""
    if path is None:
        return
    from pathlib import Path

    from ..errors import NemocompileError

    target = Path(path)
    parent = target.parent if str(target.parent) else Path(".")
    if target.is_dir():
        raise NemocompileError(f"{flag} {path}: is a directory; give a file name")
    if not parent.is_dir():
        raise NemocompileError(f"{flag} {path}: the folder {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK | os.X_OK) or (target.exists() and not os.access(target, os.W_OK)):
        raise NemocompileError(f"{flag} {path}: not writable; choose another path")
    try:  # os.access can say yes where no file can be made (/proc, a read-only mount)
        import tempfile

        with tempfile.NamedTemporaryFile(dir=parent, prefix=f".{target.name}.check-"):
            pass
    except OSError as e:
        raise NemocompileError(f"{flag} {path}: cannot create a file in {parent} ({e.strerror}); "
                               "choose another path") from None

"""Argument helpers shared by subcommands."""

from __future__ import annotations

import argparse

from ..decode.common import MODES


def add_model_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, metavar="DIR",
                   help="checkpoint directory (default: the embedded tiny model)")


def add_decode_args(p: argparse.ArgumentParser) -> None:
    """The decoding knobs every generating command takes."""
    p.add_argument("--mode", choices=list(MODES), default="ar")
    p.add_argument("--prompt", required=True, help="prompt text")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the checkpoint's chat template")
    p.add_argument("--no-thinking", action="store_true",
                   help="chat with enable_thinking=false (implies --chat): the template skips the <think> block")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--block-length", type=int, default=None, help="block / draft length (default: config block_size)")
    p.add_argument("--threshold", default=None,
                   help="confidence threshold in [0, 1] or 'none' (diffusion default 0.9, linear-spec 0)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--max-thinking-tokens", type=int, default=None, metavar="N",
                   help="thinking budget: the token at output index N becomes --end-think-token-id unless it "
                        "was already emitted (every mode)")
    p.add_argument("--end-think-token-id", type=int, default=None, metavar="ID",
                   help="the token that ends thinking (default: the tokenizer's </think>)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def chat_options(args: argparse.Namespace) -> dict:
    """The generate() keywords of --chat / --no-thinking."""
    if args.no_thinking:
        return {"chat": True, "chat_template_kwargs": {"enable_thinking": False}}
    return {"chat": args.chat}

"""The `nemocompile` command line: one parser, one module per subcommand.

Subcommands (in pipeline order) are listed explicitly below; each module has
``add_parser(subparsers)`` and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .errors import NemocompileError

# name -> module under nemocompile.commands, in pipeline order
SUBCOMMANDS = {
    "info": "info",
    "generate": "generate",
    "export": "export",
    "check": "check",
    "build": "build",
    "parity": "parity",
    "run": "run",
    "serve": "serve",
    "bench": "bench",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nemocompile", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module in SUBCOMMANDS.items():
        importlib.import_module(f"nemocompile.commands.{module}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except NemocompileError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

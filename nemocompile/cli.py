"""The `nemocompile` command line: one parser, one module per subcommand.

Subcommands (in pipeline order) are listed explicitly below; each module has
``add_parser(subparsers)`` and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
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
    "calibrate": "calibrate",
}


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the CLI's error style: one line ``error: ...`` on stderr, exit 2
    (subcommand parsers inherit the class)."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="nemocompile", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module in SUBCOMMANDS.items():
        importlib.import_module(f"nemocompile.commands.{module}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    interrupted = []
    importing = [True]

    def on_sigint(signum, frame):
        interrupted.append(signum)
        if not importing[0]:
            raise KeyboardInterrupt

    # SIGTERM (kill, systemd, Kubernetes) ends a command as Ctrl-C does: requests get their
    # final lines, partial files are removed, "interrupted" and status 130
    try:
        previous = {sig: signal.signal(sig, on_sigint) for sig in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread: leave signals alone
        previous = None
    try:
        # building the parser imports torch: a Ctrl-C raised inside a native extension's import
        # can abort the interpreter, so it is only recorded there and raised right after
        parser = build_parser()
        importing[0] = False
        if interrupted:
            raise KeyboardInterrupt
        args = parser.parse_args(argv)
        return int(args.func(args) or 0)
    except NemocompileError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return _reader_went_away()
    except Exception:
        # a Ctrl-C that lands inside an import (torch, numpy) can leave the module half
        # initialised and surface as another error (RecursionError seen): still an interrupt
        if interrupted:
            print("interrupted", file=sys.stderr)
            return 130
        raise
    finally:
        for sig, handler in (previous or {}).items():
            signal.signal(sig, handler)


def _reader_went_away() -> int:
    """stdout's reader closed the pipe (``... | head``): stop quietly, as Unix tools do.
    Later writes, including the interpreter's final flush, go to /dev/null instead of
    raising again; the exit status is the shell's for a process killed by SIGPIPE."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    return 128 + signal.SIGPIPE


if __name__ == "__main__":
    sys.exit(main())

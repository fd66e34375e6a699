"""Progress lines on stderr for work that runs long without output (parity, eager generate)."""

from __future__ import annotations

import sys
import threading
import time
from typing import Callable


def stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Heartbeat:
    """While the ``with`` block runs, say ``label`` with the seconds so far (and ``count()``, if
    given) every ``every_s`` seconds once ``after_s`` have passed: quick work prints nothing."""

    def __init__(self, label: str, say: Callable[[str], None] = stderr, every_s: float = 10.0,
                 after_s: float = 3.0, count: Callable[[], str] | None = None):
        self.label, self.say, self.every_s, self.after_s, self.count = label, say, every_s, after_s, count
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="nemocompile-progress", daemon=True)

    def __enter__(self) -> "Heartbeat":
        self._start = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()

    def _run(self) -> None:
        wait = self.after_s
        while not self._done.wait(wait):
            extra = f", {self.count()}" if self.count is not None else ""
            self.say(f"{self.label}: {time.monotonic() - self._start:.0f} s{extra}")
            wait = self.every_s


def counting_forwards(model) -> tuple[Callable[[], str], Callable[[], None]]:
    """A count of ``model``'s forwards (its token embedding's calls: every forward and fused step
    embeds its input once) and a function that removes the hook."""
    calls = [0]

    def hook(*_):
        calls[0] += 1

    handle = model.encoder.embed_tokens.register_forward_hook(hook)
    return (lambda: f"{calls[0]} forwards"), handle.remove

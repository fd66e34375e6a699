"""A request submitted to the engine, as its callers see it: events, results, cancel.

The engine thread pushes each sequence's commits and the end; any number of
threads (or one event loop, with ``async for``) read them. Errors a caller can
get instead of results: :class:`Overloaded` (the queue is full, at submit),
:class:`RequestTimeout`, :class:`Cancelled`, :class:`ServerError` (the server failed this
request alone), or the runtime's own.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from dataclasses import dataclass
from typing import Iterator

from nemocompile.errors import NemocompileError

from .output import TokenLogprob
from .stats import RuntimeStats


class Overloaded(NemocompileError):
    """The request queue is full: retry later (HTTP 429)."""


class RequestTimeout(NemocompileError):
    """The request ran past its timeout."""


class Cancelled(NemocompileError):
    """The request was cancelled by its caller."""


class ServerError(NemocompileError):
    """The server failed this request (a bug, a backend failure, a bad cost table): not the
    caller's fault (HTTP 500, stdio "server_error"); the other requests go on."""


_END = object()


class Commit(tuple):
    """One event of a sequence: ``(index, tokens)`` (unpacks as a pair) with ``text``, the new
    text a stream may show (held back near a possible stop string; None without a tokenizer),
    ``logprobs``, the tokens' :class:`~.output.TokenLogprob` (None unless asked for), and
    ``prompt_logprobs`` (echo requests, first event only)."""

    def __new__(cls, index: int, tokens: list[int], text: str | None = None, logprobs=None, prompt_logprobs=None):
        self = super().__new__(cls, (index, tokens))
        self.text, self.logprobs = text, logprobs
        self.prompt_logprobs = prompt_logprobs  # echo: the prompt's, on a sequence's first event
        return self

    @property
    def index(self) -> int:
        return self[0]

    @property
    def tokens(self) -> list[int]:
        return self[1]


class Job:
    """A submitted request: its sequences' events and, once done, their results.

    Iterate it (any thread) for ``(index, tokens)`` events as sequences emit, or
    ``async for`` in an event loop; ``result()`` waits for the end. ``cancel()``
    frees its rows at the next step boundary.
    """

    def __init__(self, request, timeout: float | None):
        self.request = request
        self.submitted = time.perf_counter()
        self.deadline = None if timeout is None else self.submitted + timeout
        self.timeout = timeout
        self.results: list = [None] * len(request.prompts)
        self.error: BaseException | None = None
        self.cancelled = False
        self.started = 0  # sequences admitted to rows
        self._pending = len(request.prompts)
        self._events: collections.deque = collections.deque()
        self._cond = threading.Condition()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._async_wakeup: asyncio.Event | None = None
        self.finished = threading.Event()

    # ---- engine side ---------------------------------------------------------
    def emit(self, index: int, tokens: list[int], text: str | None = None, logprobs=None,
             prompt_logprobs=None) -> None:
        if tokens or text:
            self._push(Commit(index, tokens, text, logprobs, prompt_logprobs))

    def finish_row(self, index: int, result) -> None:
        self.results[index] = result
        self._pending -= 1
        if self._pending == 0:
            self._push(_END)
            self.finished.set()

    def fail(self, error: BaseException) -> None:
        if self.finished.is_set():
            return
        self.error = error
        self._push(_END)
        self.finished.set()

    def _push(self, event) -> None:
        with self._cond:
            self._events.append(event)
            self._cond.notify_all()
            if self._loop is not None:
                self._loop.call_soon_threadsafe(self._async_wakeup.set)

    # ---- caller side ---------------------------------------------------------
    def cancel(self) -> None:
        """Stop the request at the next step boundary and free its rows."""
        self.cancelled = True

    def __iter__(self) -> Iterator[tuple[int, list[int]]]:
        while True:
            with self._cond:
                while not self._events:
                    self._cond.wait()
                event = self._events.popleft()
            if event is _END:
                self._raise()
                return
            yield event

    async def __aiter__(self):
        with self._cond:
            self._loop = asyncio.get_running_loop()
            self._async_wakeup = asyncio.Event()
        while True:
            with self._cond:
                event = self._events.popleft() if self._events else None
                if event is None:
                    self._async_wakeup.clear()
            if event is None:
                await self._async_wakeup.wait()
                continue
            if event is _END:
                self._raise()
                return
            yield event

    def result(self) -> list:
        """Every sequence's :class:`RuntimeResult`, once the request is done."""
        self.finished.wait()
        self._raise()
        return self.results

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error


@dataclass
class RuntimeResult:
    """One sequence's outcome, as a job hands it back."""

    tokens: list[int]  # generated ids, prompt excluded, trimmed after the first EOS
    text: str | None  # decoded with the artifact's tokenizer, None without one
    stats: RuntimeStats
    finish_reason: str  # "stop" (EOS, a stop id or a stop string) or "length" (max_new_tokens)
    logprobs: list[TokenLogprob] | None = None  # per generated token (requests with logprobs)
    prompt_logprobs: list[TokenLogprob] | None = None  # per prompt token, the first None (echo)

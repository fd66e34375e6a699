"""Continuous batching: many requests share the batch graphs, one row each.

The engine owns the runtime's KV cache and graphs and runs on one thread. A
request (a :class:`Job`) waits in a bounded queue until enough rows are free,
then each of its sequences joins a free row at a step boundary and leaves it the
moment it finishes (EOS, max_new_tokens, cancel, timeout), freeing the row for
the next request. Which free row a sequence gets is the prefix cache's choice
(``runtime/prefix_cache.py``): the one that already holds the longest prefix of
its prompt, or one that prefix is copied into, so its prefill starts after it.

One tick: every active row states the graph it needs next (its scheduler yields
a :class:`~.row.Forward`), rows that need the same graph (step, block length)
share one forward, and each distinct graph runs once. So rows share a step when
they are at the same point of the same kind of cycle:

- every mode's prefill chunks share ``prefill`` (a new prompt is prefilled while
  the other rows keep decoding: their steps run in the same tick);
- ar rows share ``ar_step``; diffusion rows of one block length share ``denoise``
  and ``commit``; linear-spec rows share ``draft`` and ``verify``; quadratic-spec
  rows share ``verify_draft``: rows at different positions and lengths, since
  every row has its own ``cache_len``;
- different block lengths, or different phases of a cycle (one row drafting
  while another verifies), run as separate forwards of the same tick;
- sampling settings (temperature, seed) and thinking budgets are per row, on the
  host: they never split a step.
Rows a graph does not serve ride along idle: their outputs are ignored and
nothing of theirs is written.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import threading
import time
import traceback
from typing import Any, Callable

import numpy as np

from nemocompile.errors import GenerationError, NemocompileError

from .job import Cancelled, Job, Overloaded, RequestTimeout, RuntimeResult, ServerError
from .prefix_cache import shared_prefix
from .row import ALL_ALTERNATIVES, Forward, Row


CHOICE_TICKS = 16  # auto chooses again at least this often (ticks), and whenever rows join or leave


class Engine:
    """The scheduling thread: admission, ticks, and each row's scheduler."""

    def __init__(self, runtime, max_queue: int | None = None):
        self.rt = runtime
        self.max_queue = max_queue
        self.queue: collections.deque[Job] = collections.deque()
        self.rows: list[tuple[Row, Any, Forward] | None] = [None] * runtime.batch_size
        self._cond = threading.Condition()
        self._stop = False
        self._paused = 0
        self._thread: threading.Thread | None = None
        self.listeners: list[Callable[[str, Any], None]] = []  # metrics: ("step", ...), ("finish", ...)
        self.costs = None  # mode auto's cost table (runtime/policy.py), loaded at first use
        self.costs_read = False  # Runtime.load read (and checked) costs.json already: None then means "none usable"
        self.live_s: dict[tuple[str, int], collections.deque] = {}  # the last forwards' seconds per graph
        self._choices: dict = {}  # auto's current choice per option set
        self._ticks = 0
        self._joined_or_left = True

    # ---- submission --------------------------------------------------------------
    def submit(self, request, timeout: float | None = None) -> Job:
        job = Job(request, timeout)
        with self._cond:
            if self._stop:
                raise GenerationError("the runtime is closed")
            # requests that will wait for a row once the free rows are given out at the next step
            waiting = len(self.queue) - sum(r is None for r in self.rows)
            if self.max_queue is not None and waiting >= self.max_queue:
                raise Overloaded(f"the server is overloaded: {waiting} requests are already waiting for a row "
                                 f"(--max-queue {self.max_queue}); retry later")
            self.queue.append(job)
            self._start()
            self._cond.notify_all()
        return job

    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="nemocompile-engine", daemon=True)
            self._thread.start()
            # a process that exits without close() must not kill the thread inside a backend call
            atexit.register(self.close)

    def close(self) -> None:
        """Stop the thread after its current step; requests still running or queued fail."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
            atexit.unregister(self.close)

    @contextlib.contextmanager
    def exclusive(self):
        """Hold the cache and graphs outside the engine (timing a step, teacher-forced
        parity): new requests wait, running ones finish first."""
        with self._cond:
            self._paused += 1
            while any(self.rows):
                self._cond.wait()
            if self.rt.prefix is not None:
                self.rt.prefix.clear()  # the caller writes the cache as it likes
            try:
                yield
            finally:
                self._paused -= 1
                self.rt.cache.reset()
                if self.rt.prefix is not None:
                    self.rt.prefix.clear()
                self._cond.notify_all()

    @property
    def active_rows(self) -> int:
        return sum(r is not None for r in self.rows)

    @property
    def queue_depth(self) -> int:
        """Requests waiting for a row."""
        return len(self.queue)

    # ---- the loop ------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                # rows decode even while paused: exclusive() waits for them to finish
                while not self._stop and not any(self.rows) and (self._paused or not self.queue):
                    self._cond.wait()
                if self._stop:
                    self._fail_all(ServerError("the runtime was closed before the request finished"))
                    return
                if not self._paused:
                    self._admit()
            # the tick runs outside the lock (rows are this thread's alone): submit() and cancel()
            # never wait for a forward to end
            try:
                self._tick()
            except Exception as e:  # a failure outside any one row's forward or scheduler: fail the rows
                self._fail_all(server_error(e, "the runtime failed"), queued=False)
                if self.rt.prefix is not None:
                    self.rt.prefix.clear()  # a forward may have stopped half way: trust no slot
            with self._cond:
                self._cond.notify_all()  # exclusive() waits for the rows to drain

    def _admit(self) -> None:
        """Move queued jobs into free rows (a job's sequences together, in arrival order),
        and drop the cancelled and the timed out."""
        now = time.perf_counter()
        for job in list(self.queue):
            reason = self._stopped(job, now)
            if reason is not None:
                self.queue.remove(job)
                job.fail(reason)
        while self.queue:
            job = self.queue[0]
            free = [b for b, r in enumerate(self.rows) if r is None]
            if len(free) < len(job.request.prompts) or self._awaits_prefix(job):
                return
            self.queue.popleft()
            admitted = time.perf_counter()
            for index in range(len(job.request.prompts)):
                self._joined_or_left = True
                b, reused = self._place(job.request, index, free)
                free.remove(b)
                row = Row(self.rt, job.request, index, b, job)
                row.reused = reused
                row.stats.queue_s = admitted - job.submitted
                self._advance(b, row, self.rt.scheduler(row), None)
            job.started = len(job.request.prompts)

    def _place(self, request, index: int, free: list[int]) -> tuple[int, int]:
        """The free row for sequence ``index`` of ``request`` and the prompt tokens whose K/V it
        already holds (the prefix cache; else the first free row, nothing reused)."""
        prefix = self.rt.prefix
        if prefix is None:
            return free[0], 0
        prompt = request.prompts[index]
        pad = self.rt.prompt_width([prompt], request.mode) - len(prompt)
        busy = [b for b, r in enumerate(self.rows) if r is not None]
        echo = request.output.echo
        return prefix.place(prompt, pad, max(self._reuse_limit(request, prompt), 0), free, busy,
                            scored_k=_alternatives(request.output.logprobs) if echo else None)

    def _reuse_limit(self, request, prompt) -> int:
        """The most prompt tokens a sequence may take from the prefix cache: the prefill must
        compute the last one's logits; quadratic-spec's fused prefill-and-draft needs a full
        last chunk (echo, which scores every prompt token, reuses only rows that scored theirs)."""
        return len(prompt) - (self.rt.prefill_length if request.mode == "quadratic-spec" else 1)

    def _awaits_prefix(self, job) -> bool:
        """Whether ``job`` should wait for a row still prefilling a prompt that shares at least
        a prefill chunk more with one of its prompts than the prefix cache holds now (or the
        rest of what it shares comes with that row's next chunk): copying
        those slots once they are written costs less than computing them again beside them
        (lm-eval sends a question's choices together, one context each)."""
        prefix, P = self.rt.prefix, self.rt.prefill_length
        if prefix is None:
            return False
        prefilling = [r for r, _, _ in filter(None, self.rows)
                      if r.length - self.rt.cache.row_start[r.b] < len(r.prompt)]
        if not prefilling:
            return False
        for prompt in job.request.prompts:
            prompt = np.asarray(prompt, dtype=np.int64)
            limit = self._reuse_limit(job.request, prompt)
            _, now = prefix.match(prompt, range(len(self.rows)))
            for r in prefilling:
                if job.request.output.echo and not r.options.echo:
                    continue  # echo reuses only rows that scored their prompt
                gain = min(shared_prefix(np.asarray(r.prompt), prompt), limit) - now
                # worth a chunk, or the rest of it comes with the row's next chunk
                if gain >= P or 0 < gain <= P - (now - (r.length - self.rt.cache.row_start[r.b])):
                    return True
        return False

    def _tick(self) -> None:
        """One forward per graph that some row needs; each row advances past it."""
        now = time.perf_counter()
        for b, entry in enumerate(self.rows):
            if entry is not None:
                reason = self._stopped(entry[0].job, now)
                if reason is not None:
                    self._drop(b, reason)
        self._ticks += 1
        if self._joined_or_left or self._ticks % CHOICE_TICKS == 0:
            self._choices.clear()
            self._joined_or_left = False
        if self.costs is None and any(entry[0].acceptance is not None for entry in filter(None, self.rows)):
            self._ensure_costs()
        groups: dict[tuple[str, int], list[int]] = {}
        for b, entry in enumerate(self.rows):
            if entry is not None:
                groups.setdefault(entry[2].key, []).append(b)
        for key, members in groups.items():
            if not self._waits(key, groups):
                self._forward(key, members)

    @staticmethod
    def _waits(key: tuple[str, int], groups: dict) -> bool:
        """Keep linear-spec rows in one phase: a tick never runs both the draft and the verify
        of one block length (rows out of phase would pay both forwards every tick, twice a
        cycle's cost); the smaller group (a draft on a tie) waits one tick and then runs with
        the others."""
        step, L = key
        other = {"draft": "verify", "verify": "draft"}.get(step)
        if other is None or (other, L) not in groups:
            return False
        mine, theirs = len(groups[key]), len(groups[(other, L)])
        return mine < theirs or (mine == theirs and step == "draft")

    def _forward(self, key: tuple[str, int], members: list[int]) -> None:
        """Run graph ``key`` for the rows ``members`` only (entry j of the forward is row
        ``members[j]``, which its scheduler reads as ``row.j``): idle rows cost nothing."""
        rt, cache = self.rt, self.rt.cache
        io = rt.io[key]
        width = io.input_ids.shape[1]
        try:
            for j, b in enumerate(members):
                tokens = self.rows[b][2].tokens
                n = len(tokens)
                if n > width:
                    raise GenerationError(f"row {b} sent {n} tokens to the {key[0]!r} graph of width {width}")
                io.input_ids[j, :n] = tokens
                io.input_ids[j, n:] = 0  # right padding of a short chunk: computed, never placed in the cache
            t0, c0 = time.perf_counter(), time.process_time()
            rt.run(key, members)
        except Exception as e:  # a backend failure ends the requests of this forward's rows only
            error = server_error(e, f"the {key[0]!r} graph failed")
            for b in members:
                self._drop(b, error)
            return
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        self.live_s.setdefault(key, collections.deque(maxlen=16)).append(dt)
        for j, b in enumerate(members):
            row, _, forward = self.rows[b]
            row.j = j
            if forward.write:
                if rt.prefix is not None:
                    rt.prefix.written(key, b, cache.length(b), forward.tokens, forward.write)
                cache.write(io.present_k[j:j + 1], io.present_v[j:j + 1], forward.write, rows=(b,))
            timer = row.timer
            timer.graph_s += dt
            timer.graph_cpu_s += dc
            timer.calls += 1
            timer.rows += len(members)
            row.stats.forwards += 1
        for listener in self.listeners:
            listener("step", (key, len(members), dt))
        for b in members:
            row, scheduler, _ = self.rows[b]
            self._advance(b, row, scheduler, io)

    def _advance(self, b: int, row: Row, scheduler, io) -> None:
        """Run the row's scheduler up to its next forward, or finish the row. A scheduler or
        policy that raises ends this row's request only (:class:`ServerError`)."""
        try:
            forward = scheduler.send(io) if io is not None else next(scheduler)
        except StopIteration:
            self._finish(b, row)
            return
        except Exception as e:
            self.rows[b] = (row, scheduler, None)
            self._drop(b, server_error(e, f"request failed in its {row.mode} scheduler"))
            return
        self.rows[b] = (row, scheduler, forward)

    def _finish(self, b: int, row: Row) -> None:
        self.rows[b] = None  # its cache row stays as it is until the next request resets it
        if self.rt.prefix is not None:
            self.rt.prefix.release(b)
        self._joined_or_left = True
        stats = row.finished_stats()
        text = row.text.final() if row.text is not None else None

        result = RuntimeResult(row.out, text, stats, row.finish_reason,
                               row.logprobs if row.k is not None else None,
                               row.prompt_logprobs if row.options.echo else None)
        for listener in self.listeners:
            listener("finish", result)
        row.job.finish_row(row.index, result)

    def _drop(self, b: int, error: BaseException) -> None:
        row = self.rows[b][0]
        self.rows[b] = None
        if self.rt.prefix is not None:
            self.rt.prefix.release(b)  # what it committed stays valid
        self._joined_or_left = True
        for listener in self.listeners:
            listener("drop", error)
        row.job.fail(error)

    def _stopped(self, job: Job, now: float) -> BaseException | None:
        if job.cancelled:
            return Cancelled("the request was cancelled")
        if job.error is not None:  # a sibling row already failed the job
            return job.error
        if job.deadline is not None and now > job.deadline:
            return RequestTimeout(f"the request ran past its timeout of {job.timeout:g} s")
        return None

    # ---- mode "auto" ----------------------------------------------------------------
    def choose_mode(self, row: Row) -> tuple[str, int | None]:
        """mode "auto": the (mode, block length) of ``row``'s next cycle. One choice for all
        auto rows with the same options (they share its graphs), from the cost table and every
        row's acceptance so far (runtime/policy.py); it is made again when rows join or leave,
        and every ``CHOICE_TICKS`` ticks (a choice per row per tick cost ar a fifth of its
        throughput in host time on the embedded model)."""
        from .policy import choose

        if row.sampler.greedy is False:
            row.stats.auto_reason = "temperature > 0: ar (the only mode auto samples in)"
            return "ar", None
        if row.grammar is not None:
            row.stats.auto_reason = "response_format: ar (the mode that applies the grammar's mask)"
            return "ar", None
        if row.auto_options is None:
            row.auto_options = self._auto_options(row.request)
        key = row.auto_options
        if key not in self._choices:
            autos = [r.acceptance for r, _, _ in filter(None, self.rows) if r.auto_options == key]
            graphs, tokens = self._fixed_load()
            self._choices[key] = choose(self._live_costs(), key, autos or [row.acceptance], graphs, tokens)
        choice = self._choices[key]
        row.stats.auto_reason = choice.reason
        return choice.mode, choice.block_length

    def _live_costs(self):
        """The cost table with each graph's time replaced by the median of its last forwards here,
        once it has run a few: the table is the prior, what the engine measures under the load
        it actually serves is the truth (a calibration on a busy machine can be off by 2x)."""
        import dataclasses
        import statistics

        from .policy import graph_key

        live = {graph_key(*key): statistics.median(times) for key, times in self.live_s.items() if len(times) >= 4}
        return dataclasses.replace(self.costs, step_s={**self.costs.step_s, **live}) if live else self.costs

    def _auto_options(self, request) -> tuple[tuple[str, int | None], ...]:
        return tuple((m, L) for m, L in self.rt.auto_options if m == "ar" or request.block_length in (None, L))

    def _fixed_load(self) -> tuple[frozenset[str], float]:
        """The graphs that rows of fixed modes run per cycle, and the tokens they expect from it."""
        from .policy import cycle_graphs, graph_key

        graphs: set[str] = set()
        tokens = 0.0
        for row, _, _ in filter(None, self.rows):
            if row.acceptance is not None:
                continue
            L = row.request.block_length
            if row.mode == "diffusion":
                graphs |= {graph_key("denoise", L), graph_key("commit", L)}
            else:
                graphs |= set(cycle_graphs(row.mode, L))
            lengths = row.stats.acceptance_lengths
            tokens += sum(lengths) / len(lengths) if lengths else 1.0
        return frozenset(graphs), tokens

    def _ensure_costs(self) -> None:
        """Auto needs the artifact's cost table: its costs.json, else step times measured now
        (between two ticks, no output pending) and a neutral acceptance prior."""
        if self.costs is not None:
            return
        import sys

        from .timing import median_forward_s
        from .policy import DEFAULT_PRIOR, CostTable, graph_key

        table = None if self.costs_read else CostTable.load(self.rt.artifact_dir, self.rt.backend.name)
        if table is None:
            # the cache rows stay as they are: the forwards write nothing, and their outputs are
            # overwritten before any row reads them again
            step_s = {graph_key(*key): s for key, s in median_forward_s(self.rt, list(self.rt.io), 4).items()}
            prior = {f"{m}@{L}": DEFAULT_PRIOR for m, L in self.rt.auto_options if m != "ar"}
            table = CostTable(self.rt.backend.name, None, self.rt.batch_size, step_s, prior, "at first use")
            print(f"warning: {self.rt.artifact_dir}: no cost table for mode auto; step times measured now, "
                  f"acceptance prior {DEFAULT_PRIOR} (run `nemocompile calibrate --artifact DIR`)", file=sys.stderr)
        self.costs = table

    def _fail_all(self, error: BaseException, queued: bool = True) -> None:
        for b, entry in enumerate(self.rows):
            if entry is not None:
                self._drop(b, error)
        if queued:
            while self.queue:
                self.queue.popleft().fail(error)


def server_error(e: BaseException, what: str) -> ServerError:
    """``e`` as the request's :class:`ServerError`, with one line on stderr (a traceback only for
    an exception nemocompile did not raise itself: a bug to report)."""
    import sys

    if isinstance(e, ServerError):
        return e
    error = ServerError(f"{what}: {type(e).__name__}: {e}")
    if isinstance(e, NemocompileError):  # its message says what to do
        print(f"error: {error}", file=sys.stderr, flush=True)
    else:
        traceback.print_exception(e, file=sys.stderr)
    return error


def _alternatives(k: int | None) -> int:
    return ALL_ALTERNATIVES if k is None else k

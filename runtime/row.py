"""One sequence in flight: a row of the batch graphs, driven by its mode's scheduler.

A scheduler (``schedulers/``) is a generator over a :class:`Row`. It yields a
:class:`Forward` (which graph it needs next and the row's input tokens), and the
engine sends back that graph's outputs once it has run the graph for every row
that asked for it in the same tick; the row's outputs are entry ``row.j`` of
them (a forward runs only its own rows, in the order the engine lists them),
its cache row is ``row.b``. Between forwards the scheduler decides
tokens (``choose``), emits them (``emit``), and rolls its cache row back
(``crop``). It never sees the other rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from nemocompile.decode.common import budgeted
from nemocompile.sampling import History, distribution, greedy_accept, speculative_accept

from .backends import StepIO
from .output import StopText, TokenLogprob, token_logprob
from .sampling import Sampler
from .stats import RuntimeStats, StepTimer


@dataclass(frozen=True)
class Forward:
    """What a row needs next: graph ``step`` of block length ``L`` over ``tokens`` (the row's
    input, right-padded by the engine to the graph's width), placing the first ``write``
    present rows at the row's cache length (0: the step writes nothing)."""

    step: str
    L: int
    tokens: Sequence[int]
    write: int = 0

    @property
    def key(self) -> tuple[str, int]:
        return self.step, self.L


ALL_ALTERNATIVES = 1 << 30  # an echo request without logprobs keeps every alternative the graph gives


class Row:
    """A request's sequence in row ``b``: its prompt, sampler, output, stats and cache row."""

    def __init__(self, runtime, request, index: int, b: int, job):
        self.rt, self.request, self.index, self.b, self.job = runtime, request, index, b, job
        self.j = 0  # this row's entry in the outputs of its last forward (the engine sets it)
        self.prompt = request.prompts[index]
        self.mode = request.mode
        self.cache = runtime.cache
        self.mask_token_id = runtime.mask_token_id
        seed = request.seed if request.seed is None or len(request.prompts) == 1 else [request.seed, index]
        # per row: a draw never depends on the other rows
        self.sampler = Sampler(request.temperature, seed, request.sampling)
        penalised = request.sampling is not None and request.sampling.penalised
        self.history = History(self.prompt) if penalised else None  # what the penalties see
        self.grammar = request.grammar.matcher() if request.grammar is not None else None  # structured output
        self.stats = RuntimeStats(mode=request.mode, backend=runtime.backend.name, block_length=request.block_length,
                                  threshold=request.threshold, batch_size=len(request.prompts))
        self.timer = StepTimer(start=job.submitted)
        self.out: list[int] = []
        self.reused = 0  # prompt tokens whose K/V the engine put in the row's slots (the prefix cache)
        self.done = False
        self.finish_reason = "length"
        self.options = request.output
        # the text so far, cut at a stop string (None without a tokenizer: stop strings need one)
        self.text = StopText(runtime.tokenizer, self.options.stop) if runtime.tokenizer is not None else None
        self.shown = 0  # characters of the text already streamed
        self.k = self.options.logprobs  # alternatives per token; None: no log-probs
        self.logprobs: list[TokenLogprob] = []  # one per emitted token
        self.prompt_logprobs: list[TokenLogprob] = []  # echo: one per prompt token
        self.chosen: list[TokenLogprob] = []  # the log-probs of the tokens choose/note picked last
        self.acceptance = None  # mode auto: this row's acceptance record (runtime/policy.py)
        self.auto_options = None  # mode auto: the (mode, block length) pairs it may run, set by the engine
        if self.mode == "auto":
            from .policy import Acceptance

            self.acceptance = Acceptance()

    # ---- cache row -----------------------------------------------------------
    @property
    def length(self) -> int:
        return self.cache.length(self.b)

    def crop(self, length: int) -> None:
        self.cache.crop(self.b, length)

    # ---- named steps -----------------------------------------------------------
    def prefill(self, last: str = "prefill"):
        """Run the prompt causally into the row's cache in prefill-graph chunks, the last
        through graph ``last`` (quadratic-spec: the fused prefill that also drafts after
        the prompt, so the last chunk must be full: a short chunk goes first, and a prompt
        shorter than a chunk is left padded). The first ``reused`` prompt tokens are not
        run: the prefix cache put their slots in the row. Generator; returns the last
        chunk's outputs and the column of the last prompt token. Counts as one forward."""
        P = self.rt.prefill_length
        width = self.rt.prompt_width([self.prompt], self.mode if last == "prefill" else "quadratic-spec")
        pad = width - len(self.prompt)
        ids = [0] * pad + list(self.prompt)  # pad id 0: slots before row_start are masked
        n = self.reused  # slots pad .. pad+n-1 already hold the prompt's first n tokens
        self.cache.reset_row(self.b, row_start=pad, length=pad + n if n else 0)
        self.stats.cached_prompt_tokens = n
        if self.options.echo:
            return (yield from self._scored_prefill(ids))
        begin = pad + n if n else 0
        first = P if last == "prefill" else (width - begin) % P or P
        bounds = [begin, *range(begin + first, width, P), width]
        for start, end in zip(bounds, bounds[1:]):
            io = yield Forward(last if end == width else "prefill", P, ids[start:end], write=end - start)
        self.stats.forwards -= len(bounds) - 2  # the spec counts the prefill as one forward
        return io, end - start - 1

    def _scored_prefill(self, ids: list[int]):
        """The prefill of an echo request: every prompt token's log-prob given the tokens before
        it (the graph's ``next_logprob``, with the alternatives at the position before it). Each
        chunk but the last carries one token more than it writes, so the log-prob of the token
        after the chunk comes from the same forward as the rest (the extra token is computed
        causally after the others and never placed; the next chunk starts with it)."""
        P, k = self.rt.prefill_length, self.k
        self.prompt_logprobs = [TokenLogprob(ids[0], None)]
        start, chunks = 0, 0
        prefix = self.rt.prefix
        if self.reused:  # the prefix cache holds the first reused slots and the scores up to the next token
            self.prompt_logprobs = [TokenLogprob(t.token, t.logprob, t.top[:k])
                                    for t in prefix.scores[self.b][:self.reused + 1]]
            start = self.reused
        while True:
            end = min(start + P, len(ids))
            write = end - start if end == len(ids) else end - start - 1
            io = yield Forward("prefill", P, ids[start:end], write=write)
            chunks += 1
            nxt, top_ids, top_lp = io.next_logprob[self.j], io.top_ids[self.j], io.top_logprobs[self.j]
            for c in range(end - start - 1):
                self.prompt_logprobs.append(TokenLogprob(
                    ids[start + c + 1], float(nxt[c]), tuple(zip(top_ids[c, :k].tolist(), top_lp[c, :k].tolist()))))
            if end == len(ids):
                break
            start += write
        self.stats.forwards -= chunks - 1  # the spec counts the prefill as one forward
        if prefix is not None:
            prefix.scored(self.b, self.prompt_logprobs, ALL_ALTERNATIVES if k is None else k)
        return io, end - start - 1

    def prefill_token(self):
        """Prefill, then the row's first token (generator)."""
        io, last = yield from self.prefill()
        return int(self.choose(io, last))

    # ---- deciding and emitting ---------------------------------------------------
    @property
    def uses_logits(self) -> bool:
        """Whether choices read the logits: sampling, a control that moves the argmax, a grammar."""
        return not self.sampler.greedy or self.grammar is not None

    def distribution(self, logits, drafts=()):
        """The request's distribution (nemocompile.sampling) at a position whose history is the
        output so far followed by ``drafts``, masked by the grammar's state."""
        history = self.history.plus(drafts) if self.history is not None and len(drafts) else self.history
        allowed = self.grammar.allowed() if self.grammar is not None else None
        return distribution(logits, self.sampler.params, history, allowed)

    def choose(self, io: StepIO, column: int) -> int:
        """The row's token at ``column``: the graph's argmax when greedy (the host never
        reads the logits), else a draw from the request's distribution."""
        if not self.uses_logits:
            token = int(io.candidate[self.j, column])
        elif self.sampler.params.plain and self.grammar is None:
            token = int(self.sampler.sample(io.logits[self.j, column]))
        else:
            token = self.sampler.pick(self.distribution(io.logits[self.j, column]))
        self.note(io, [column], [token])
        return token

    def verify(self, io: StepIO, drafted: Sequence[int]) -> list[int]:
        """Self-speculation: the accepted drafts of ``drafted[1:]`` and the bonus, from the
        verifier's columns 0..n-1 (column i predicts position i+1). Greedy: the spec's rule
        on the graph's argmax; sampling: nemocompile.sampling's rule (lossless in distribution).
        The i-th token returned sits at column i (its log-prob is kept there)."""
        kept = self._verify(io, drafted)
        self.note(io, range(len(kept)), kept)
        return kept

    def _verify(self, io: StepIO, drafted: Sequence[int]) -> list[int]:
        n = len(drafted)
        if not self.uses_logits:
            return greedy_accept(drafted, io.candidate[self.j, :n].tolist())
        logits, x = io.logits[self.j], list(drafted[1:])
        if self.grammar is None:
            return speculative_accept(x, lambda i: self.distribution(logits[i], x[:i]), self.sampler.uniform)
        advanced = 0

        def target(i: int):
            # p_i is masked by the grammar's state after the accepted drafts x[:i] (a draft the
            # grammar forbids has probability 0, so it is never accepted and never advanced past)
            nonlocal advanced
            while advanced < i:
                self.grammar.accept(x[advanced])
                advanced += 1
            return self.distribution(logits[i], x[:i])

        try:
            return speculative_accept(x, target, self.sampler.uniform)
        finally:
            self.grammar.rollback(advanced)  # emit() advances it over what is kept

    def note(self, io: StepIO, columns, tokens) -> None:
        """Keep the log-probs of ``tokens`` picked at ``columns`` of ``io`` (requests with
        logprobs only): the next ``emit`` takes them, in order, for the tokens it emits."""
        if self.k is not None:
            self.chosen = [self.logprob(io, c, t) for c, t in zip(columns, tokens)]

    def logprob(self, io: StepIO, column: int, token: int) -> TokenLogprob:
        return token_logprob(io, self.j, column, token, self.k)

    def budgeted(self, new: list[int]) -> list[int]:
        """``new`` tokens about to be emitted, with the request's thinking budget applied."""
        return budgeted(self.request.budget, self.out, new)

    def emit(self, tokens: Sequence[int], logprobs: Sequence[TokenLogprob] | None = None) -> None:
        """Append ``tokens``, stopping after an EOS or a stop id (not before min_tokens), at a stop
        string (its token is the last; the text ends before it) or at max_new_tokens, and stream
        them. ``logprobs``: theirs (default: what ``choose``/``note`` kept, in order)."""
        out, eos, limit = self.out, self.request.eos, self.request.max_new_tokens
        least, text = self.options.min_tokens, self.text
        if self.k is not None:
            chosen = list(self.chosen if logprobs is None else logprobs)
            self.chosen = []
        sent = len(out)
        for i, t in enumerate(tokens):
            t = int(t)
            out.append(t)
            if self.grammar is not None:
                self.grammar.accept(t)
            if self.k is not None:
                lp = chosen[i] if i < len(chosen) else None
                self.logprobs.append(lp if lp is not None and lp.token == t else TokenLogprob(t, None))
            stop = len(out) >= least
            if text is not None and text.add(t, check=stop):
                self.done, self.finish_reason = True, "stop"
                break
            if stop and t in eos:
                self.done, self.finish_reason = True, "stop"
                break
            if self.grammar is not None and self.grammar.finished:  # the JSON is complete
                self.done, self.finish_reason = True, "stop"
                break
            if len(out) >= limit:
                self.done = True
                break
        if self.history is not None:
            self.history.extend(out[sent:])
        self.timer.mark_first_token()
        delta = None
        if text is not None:
            shown = text.final() if self.done else text.visible
            delta, self.shown = shown[self.shown:], len(shown)
        self.job.emit(self.index, out[sent:], delta, self.logprobs[sent:] if self.k is not None else None,
                      self.prompt_logprobs if sent == 0 and self.options.echo else None)
        for listener in self.rt.engine.listeners:
            listener("tokens", (self.mode, len(out) - sent))

    def cycle(self, mode: str, accepted: int | None = None) -> None:
        """Count one decode cycle of ``mode`` (and its acceptance length, for self-speculation)."""
        self.stats.mode_mix[mode] = self.stats.mode_mix.get(mode, 0) + 1
        if accepted is not None:
            self.stats.acceptance_lengths.append(accepted)

    def finished_stats(self) -> RuntimeStats:
        self.timer.fill(self.stats)
        return self.stats.finish(len(self.out))

"""The runtime: an exported artifact's graphs, scheduled for every decode mode.

``Runtime.load`` reads the manifest, opens every graph once on a backend and
allocates the KV cache and the step buffers once (static shapes from the
manifest). ``generate`` validates a request completely before any step runs,
then hands it to the mode's scheduler (``schedulers/``), which drives named
steps through a :class:`Decode`: the request's state (cache, sampler, output
rows, stats) and the one place where graphs are executed and timed.
"""

from __future__ import annotations

import dataclasses
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from nemocompile.artifact_files import usable_graphs
from nemocompile.decode.common import (DEFAULT, SPECULATIVE, ThinkingBudget, budgeted, check_quadratic, eos_id_set,
                                       parse_threshold, thinking_budget)
from nemocompile.errors import GenerationError, NemocompileError
from nemocompile.manifest import Manifest, ManifestError
from nemocompile.request import RequestError, check_room, check_values
from nemocompile.tokenizer import encode_prompts

from .backends import NUMPY_DTYPES, Backend, StepIO, create_backend
from .cache import KVCache
from .sampling import Sampler
from .stats import RuntimeStats, StepTimer

@dataclass(frozen=True)
class Request:
    """A validated request: every default filled, every value checked."""

    prompts: list[list[int]]  # token ids per prompt (1..batch_size prompts)
    mode: str
    max_new_tokens: int
    block_length: int | None  # None for ar
    threshold: float | None  # diffusion: None = fixed schedule; linear-spec: 0 = one-shot draft
    steps: int | None  # diffusion without threshold: denoising steps per block (default: block length)
    temperature: float
    seed: int | None
    eos: frozenset[int]  # the ids that stop generation; empty: never stop on EOS
    batched: bool  # the caller passed a list of prompts
    budget: ThinkingBudget | None = None  # spec 3.5: max_thinking_tokens and end_think_token_id


@dataclass
class RuntimeResult:
    tokens: list[int]  # generated ids, prompt excluded, trimmed after the first EOS
    text: str | None  # decoded with the artifact's tokenizer, None without one
    stats: RuntimeStats
    finish_reason: str  # "stop" (EOS) or "length" (max_new_tokens)


class Runtime:
    """Compiled graphs of one artifact on one backend, with one KV cache.

    One request runs at a time (a lock queues concurrent callers); the cache
    and buffers are reused by every request.
    """

    def __init__(self, artifact_dir: Path, manifest: Manifest, backend: Backend):
        self.artifact_dir = artifact_dir
        self.manifest = manifest
        self.backend = backend
        cfg = manifest.model_config
        self.vocab_size = int(cfg["vocab_size"])
        self.mask_token_id = int(cfg["mask_token_id"])
        self.eos_token_id = int(cfg["eos_token_id"])
        self.eos_token_ids = tuple(cfg.get("eos_token_ids") or [self.eos_token_id])  # any of them stops
        self.batch_size = manifest.batch_size
        self.modes = manifest.modes
        self.tokenizer = _tokenizer(artifact_dir, manifest)
        self._lock = threading.Lock()
        self._owner: int | None = None

        cache_spec = _tensor(manifest.graphs[0].inputs, "cache_k", manifest.graphs[0])
        self.capacity = cache_spec.shape[3]
        if cache_spec.shape[1] != self.batch_size:
            raise ManifestError(f"cache_k has batch {cache_spec.shape[1]} but the manifest's batch_size is "
                                f"{self.batch_size}; re-export the artifact")
        self.cache = KVCache(backend.allocate((2, *cache_spec.shape), cache_spec.dtype), self.batch_size)
        self.buffers: dict[tuple, object] = {}  # (name, shape, dtype) -> buffer, shared by graphs
        self.io: dict[tuple[str, int], StepIO] = {}  # (step, block length) -> its buffers
        for graph in manifest.graphs:
            if _tensor(graph.inputs, "cache_k", graph).shape != cache_spec.shape:
                raise ManifestError(f"graph {graph.step!r} has a different cache shape; every graph of an "
                                    "artifact must share one cache (re-export it)")
            io = self._step_io(graph)
            backend.open(graph, io, self.cache)
        self.sampling = manifest.sampling
        self.block_lengths = sorted({L for m in self.modes for L in manifest.block_lengths(m)})  # every mode's
        # quadratic-spec: branches of each fused step (its block length, unless exported with --draft-groups)
        self.draft_groups = {g.block_length: len(g.layout["branches"]) for g in manifest.graphs
                             if g.step == "verify_draft"}
        self.prefill_length = manifest.graph("prefill").block_length
        # host scratch for the candidates of a block's masked positions, touched once here so
        # denoising never allocates (a fresh multi-100 KB array per step costs page faults)
        longest = max((g.block_length for g in manifest.graphs if g.step in ("denoise", "draft")), default=1)
        self.scratch = np.zeros((self.batch_size * longest, self.vocab_size), np.float32) if self.sampling else None

    # ---- construction ------------------------------------------------------------
    @classmethod
    def load(cls, artifact_dir: str | Path, backend: str = "onnxruntime", device: str | None = None,
             **options) -> "Runtime":
        """Open an exported artifact. ``options``: ``threads`` (intra-op threads),
        ``model`` (torch backend: checkpoint path or loaded model; default the
        manifest's ``source``), ``providers`` (onnxruntime)."""
        artifact_dir = Path(artifact_dir)
        manifest = Manifest.load(artifact_dir)
        # sizes only (a stat per file; `nemocompile check` reads the digests). A damaged graph that
        # some modes do not use costs only those modes; anything else damaged stops here.
        manifest, damaged = usable_graphs(artifact_dir, manifest)
        for line in damaged:
            print(f"warning: {line}", file=sys.stderr)
        return cls(artifact_dir, manifest, create_backend(backend, artifact_dir, manifest, device=device, **options))

    def _step_io(self, graph) -> StepIO:
        """``graph``'s buffers. Graphs share a buffer where name, shape and dtype agree: a
        diffusion block is denoised and committed in one ``input_ids``, and every step of a
        block length places its present rows from the same device buffer."""
        L = graph.block_length
        ids = _tensor(graph.inputs, "input_ids", graph)
        if ids.shape != [self.batch_size, L]:
            raise ManifestError(f"graph {graph.step!r}: input_ids {ids.shape} does not match batch "
                                f"{self.batch_size}, block {L}; re-export the artifact")
        logits = graph.output("logits")
        if logits is not None and logits.shape[-1] != self.vocab_size:
            raise ManifestError(f"graph {graph.step!r}: logits {logits.shape} do not match vocab {self.vocab_size}")

        def buffer(spec, device: bool = False):
            if spec is None:
                return None
            key = (spec.name, tuple(spec.shape), spec.dtype)
            if key not in self.buffers:
                self.buffers[key] = (self.backend.allocate(tuple(spec.shape), spec.dtype) if device else
                                     np.zeros(spec.shape, NUMPY_DTYPES[spec.dtype]))
            return self.buffers[key]

        io = StepIO(buffer(ids), buffer(logits), buffer(graph.output("present_k"), device=True),
                    buffer(graph.output("present_v"), device=True), buffer(graph.output("candidate")),
                    buffer(graph.output("confidence")))
        if io.candidate is None:
            raise ManifestError(f"graph {graph.step!r} returns no 'candidate'; re-export the artifact")
        self.io[(graph.step, L)] = io
        return io

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> "Runtime":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def name(self) -> str:
        """The model's name: its source checkpoint's directory name, else the artifact's."""
        return Path(self.manifest.source or self.artifact_dir).name

    # ---- requests ----------------------------------------------------------------
    def prompt_width(self, prompts: list[list[int]], mode: str) -> int:
        """Cache slots the left-padded prompts take. quadratic-spec's fused prefill graph
        needs a full last chunk (its masks sit right after it), so a prompt shorter than
        one chunk is left padded to it."""
        width = max(map(len, prompts))
        return max(width, self.prefill_length) if mode == "quadratic-spec" else width

    def encode(self, prompt, chat: bool = False, chat_template_kwargs: dict | None = None
               ) -> tuple[list[list[int]], bool]:
        """Token lists for the prompt(s) (text, ids, a batch, or one chat), and whether they were a batch."""
        return encode_prompts(self.tokenizer, self.vocab_size, prompt, chat, owner="artifact",
                              template_kwargs=chat_template_kwargs)

    def validate(self, prompts: list[list[int]], batched: bool, mode: str = "ar", max_new_tokens: int = 64,
                 block_length: int | None = None, threshold=None, temperature: float = 0.0,
                 seed: int | None = None, eos: int | None = None, steps: int | None = None, *,
                 max_thinking_tokens: int | None = None, end_think_token_id: int | None = None,
                 names: dict[str, str] | None = None) -> Request:
        """Fill defaults and reject what cannot run, before any step does (spec defaults:
        diffusion threshold 0.9, linear-spec threshold 0; block length: the artifact's).
        Values are checked by ``nemocompile.request``, the checks every front door shares;
        ``names`` renames fields in its messages (HTTP: max_new_tokens -> max_tokens)."""
        check_values(mode=mode, max_new_tokens=max_new_tokens, block_length=block_length, temperature=temperature,
                     seed=seed, eos=eos, steps=steps, vocab_size=self.vocab_size, names=names)
        if mode not in self.modes:
            raise RequestError(f"this artifact has no {mode} graphs (it has: {', '.join(self.modes)}); "
                               f"re-export it with that mode", param="mode")
        eos = eos_id_set(self.eos_token_ids if eos is None else eos, self.vocab_size)
        if not prompts or any(len(p) == 0 for p in prompts):
            raise GenerationError("empty prompt: give at least one token")
        if temperature > 0 and not self.sampling:
            raise GenerationError("this artifact was exported with --greedy-only (its graphs return no logits): "
                                  "use temperature 0, or re-export without --greedy-only to sample")
        if mode == "quadratic-spec":
            check_quadratic(threshold, temperature)
        limit = 1 if mode in SPECULATIVE else self.batch_size
        if len(prompts) > limit:
            raise GenerationError(
                f"{mode} decodes one sequence at a time (batch 1); use ar or diffusion for batches"
                if mode in SPECULATIVE else
                f"{len(prompts)} prompts exceed the artifact's batch size {self.batch_size}; send at most "
                f"{self.batch_size} at a time or re-export with a larger batch size")

        block = None
        if mode != "ar":
            block = self.manifest.block_length if block_length is None else block_length
            if isinstance(block, bool) or not isinstance(block, int) or block < 2:
                raise GenerationError(f"block_length must be an integer >= 2, got {block!r}")
            lengths = self.manifest.block_lengths(mode)
            if block not in lengths:
                raise GenerationError(f"this artifact's {mode} graphs are for block length(s) {lengths}, not "
                                      f"{block}; pick one of those or re-export with --block-length {block}")
        thr = parse_threshold(threshold)
        if thr is DEFAULT:
            thr = (None if steps is not None else 0.9) if mode == "diffusion" else 0.0
        if mode == "linear-spec" and thr is None:
            thr = 0.0
        if mode in ("ar", "quadratic-spec"):
            thr = None

        check_room(self.prompt_width(prompts, mode), max_new_tokens, block, self.capacity,
                   "the artifact's KV cache capacity",
                   "shorten the prompt, lower max_new_tokens, or re-export with a larger --max-seq-len", names)
        budget = thinking_budget(max_thinking_tokens, end_think_token_id, self.tokenizer, self.vocab_size)
        return Request(prompts, mode, max_new_tokens, block, thr, steps, float(temperature), seed, eos, batched,
                       budget)

    def generate(self, prompt_or_ids, mode: str = "ar", max_new_tokens: int = 64, block_length: int | None = None,
                 threshold=None, temperature: float = 0.0, seed: int | None = None, eos: int | None = None,
                 stream: bool = False, steps: int | None = None, chat: bool = False,
                 chat_template_kwargs: dict | None = None, max_thinking_tokens: int | None = None,
                 end_think_token_id: int | None = None):
        """Generate for one prompt (text or ids) -> :class:`RuntimeResult`, or a list of
        prompts -> a list (ar and diffusion decode them as one batch).

        ``stream=True`` (one prompt) returns a :class:`TokenStream` that yields the
        token ids of each commit as it happens; its ``result`` is set at the end.
        """
        prompts, batched = self.encode(prompt_or_ids, chat, chat_template_kwargs)
        request = self.validate(prompts, batched, mode, max_new_tokens, block_length, threshold, temperature,
                                seed, eos, steps, max_thinking_tokens=max_thinking_tokens,
                                end_think_token_id=end_think_token_id)
        if stream:
            if batched:
                raise GenerationError("stream=True takes a single prompt; call generate once per prompt")
            return TokenStream(self, request)
        decode = Decode(self, request)
        for _ in decode:
            pass
        return decode.results if batched else decode.results[0]


class TokenStream:
    """Iterates a streamed generation: each item is the list of token ids one commit emitted.

    The runtime is held until the stream ends: iterate it to the end, or ``close()`` it.
    """

    def __init__(self, runtime: Runtime, request: Request):
        self._decode = Decode(runtime, request)
        self._events = iter(self._decode)
        self.result: RuntimeResult | None = None

    def __iter__(self) -> Iterator[list[int]]:
        return self

    def __next__(self) -> list[int]:
        try:
            return next(self._events)
        except StopIteration:
            self.result = self._decode.results[0]
            raise

    def close(self) -> None:
        """Abandon the generation and release the runtime."""
        self._events.close()


class Decode:
    """One request in flight: the runtime's buffers, its sampler, output rows and stats.

    Iterating it runs the mode's scheduler and yields row 0's newly emitted
    tokens at each commit. Schedulers call :meth:`run` for every graph step
    (timed, counted as a forward), :meth:`prefill`, and :meth:`emit`.
    """

    def __init__(self, runtime: Runtime, request: Request):
        self.rt, self.request = runtime, request
        self.results: list[RuntimeResult] = []

    # ---- the request's lifetime --------------------------------------------------
    def __iter__(self) -> Iterator[list[int]]:
        rt = self.rt
        if rt._owner == threading.get_ident():
            raise GenerationError("a streamed generation is still open on this runtime in this thread: iterate it "
                                  "to the end or close() it first")
        with rt._lock:
            rt._owner = threading.get_ident()
            try:
                yield from self._decode()
            finally:
                rt._owner = None

    def _decode(self) -> Iterator[list[int]]:
        from .schedulers import SCHEDULERS

        rt, req = self.rt, self.request
        B = rt.batch_size
        self.cache, self.backend = rt.cache, rt.backend
        self.mask_token_id = rt.mask_token_id
        self.sampler = Sampler(req.temperature, req.seed)
        self.stats = RuntimeStats(mode=req.mode, backend=rt.backend.name, block_length=req.block_length,
                                  threshold=req.threshold, batch_size=len(req.prompts))
        rows = len(req.prompts)
        self.out: list[list[int]] = [[] for _ in range(B)]
        # rows past the request's prompts ride along, finished from the start (plain lists:
        # per-token bookkeeping on a handful of rows is cheaper in Python than in numpy)
        self.done: list[bool] = [b >= rows for b in range(B)]
        self.timer = StepTimer()
        sent = 0
        for _ in SCHEDULERS[req.mode](self):
            if len(self.out[0]) > sent:
                yield self.out[0][sent:]
                sent = len(self.out[0])
        self.timer.fill(self.stats)
        eos = req.eos
        for b in range(rows):
            tokens = self.out[b]
            stats = dataclasses.replace(self.stats, acceptance_lengths=list(self.stats.acceptance_lengths))
            text = rt.tokenizer.decode(tokens) if rt.tokenizer is not None else None
            reason = "stop" if tokens and tokens[-1] in eos else "length"
            self.results.append(RuntimeResult(tokens, text, stats.finish(len(tokens)), reason))

    # ---- what schedulers call ----------------------------------------------------
    def io(self, step: str, block_length: int) -> StepIO:
        return self.rt.io[(step, block_length)]

    def run(self, step: str, block_length: int) -> StepIO:
        """Execute one graph step (a model forward) on its bound buffers."""
        timer = self.timer
        t0, c0 = time.perf_counter(), time.process_time()
        self.backend.run((step, block_length))
        timer.graph_cpu_s += time.process_time() - c0
        timer.graph_s += time.perf_counter() - t0
        timer.calls += 1
        self.stats.forwards += 1
        return self.rt.io[(step, block_length)]

    def choose(self, io: StepIO, column: int) -> np.ndarray:
        """Each row's token [B] at ``column`` of a step's output: the graph's argmax when
        greedy (the host never reads the logits), else a draw from the logits."""
        if self.sampler.greedy:
            return io.candidate[:, column]
        return self.sampler.sample(io.logits[:, column])

    def prefill(self, last: str = "prefill") -> tuple[StepIO, int]:
        """Run the (left-padded) prompts causally into the cache in prefill-graph chunks,
        the last chunk through the graph ``last`` (quadratic-spec: the fused prefill that
        also drafts). Returns the last chunk's outputs and the column of each row's last
        prompt token. Counts as one forward."""
        prompts, B, P = self.request.prompts, self.rt.batch_size, self.rt.prefill_length
        width = self.rt.prompt_width(prompts, self.request.mode)
        ids = np.zeros((B, width), dtype=np.int64)  # pad id 0: padded slots are masked
        row_start = np.full(B, width - 1, dtype=np.int64)  # spare rows: one pad token
        for b, p in enumerate(prompts):
            ids[b, width - len(p):] = p
            row_start[b] = width - len(p)
        self.cache.reset(row_start)
        # a fused last graph needs a full last chunk: then the short chunk goes first
        first = P if last == "prefill" else width % P or P
        bounds = [0, *range(first, width, P), width]
        for start, end in zip(bounds, bounds[1:]):
            n = end - start
            io = self.rt.io[("prefill", P)]  # every chunk's input buffer: prefill and `last` share it
            io.input_ids[:, :n] = ids[:, start:end]
            io.input_ids[:, n:] = 0  # right padding of a short chunk: computed, never placed in the cache
            io = self.run(last if end == width else "prefill", P)
            self.cache.write(io.present_k, io.present_v, n)
        self.stats.forwards -= len(bounds) - 2  # the spec counts the prefill as one forward
        return io, n - 1

    def prefill_tokens(self) -> np.ndarray:
        """Prefill, then each row's first token [B]."""
        io, last = self.prefill()
        return self.choose(io, last)

    def emit(self, row: int, tokens: Sequence[int]) -> None:
        """Append ``tokens`` to an unfinished row, stopping after an EOS or at max_new_tokens."""
        out, eos, limit = self.out[row], self.request.eos, self.request.max_new_tokens
        for t in tokens:
            t = int(t)
            out.append(t)
            if t in eos or len(out) >= limit:
                self.done[row] = True
                break
        self.timer.mark_first_token()

    def emit_rows(self, tokens: np.ndarray) -> None:
        """One token per unfinished row ([B]), the thinking budget applied in place (so the
        next step runs the token that was emitted)."""
        for b in self.unfinished():
            tokens[b] = self.budgeted(b, [int(tokens[b])])[0]
            self.emit(b, (tokens[b],))

    def budgeted(self, row: int, new: list[int]) -> list[int]:
        """``new`` tokens about to be emitted on ``row``, with the request's thinking budget applied."""
        return budgeted(self.request.budget, self.out[row], new)

    def unfinished(self) -> list[int]:
        return [b for b, done in enumerate(self.done) if not done]

    @property
    def all_done(self) -> bool:
        return all(self.done)


def _tensor(specs, name: str, graph):
    for t in specs:
        if t.name == name:
            return t
    raise ManifestError(f"graph {graph.step!r} ({graph.file}) has no {name!r} tensor in the manifest; re-export it")


def _tokenizer(artifact_dir: Path, manifest: Manifest):
    from nemocompile.tokenizer import Tokenizer

    for d in (artifact_dir, Path(manifest.source) if manifest.source else None):
        if d is not None and (d / "tokenizer.json").is_file():
            try:
                return Tokenizer(d)
            except NemocompileError:
                return None
    return None

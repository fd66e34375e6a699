"""The runtime: an exported artifact's graphs, scheduled for every decode mode.

``Runtime.load`` reads the manifest, opens every graph once on a backend and
allocates the KV cache and the step buffers once (static shapes from the
manifest). ``submit`` / ``generate`` validate a request completely before any
step runs, then hand it to the :class:`~.engine.Engine`, which gives each of its
sequences a row of the batch graphs and runs the mode's scheduler
(``schedulers/``) for it among the other requests' rows (continuous batching).
Any number of threads may call ``generate`` at once.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np

from nemocompile.artifact.files import usable_graphs
from nemocompile.decode.common import (DEFAULT, ThinkingBudget, check_quadratic, eos_id_set, parse_threshold,
                                       thinking_budget)
from nemocompile.sampling import SamplingParams, sampling_params
from nemocompile.errors import GenerationError, NemocompileError
from nemocompile.artifact.manifest import Manifest, ManifestError
from nemocompile.text.request import RequestError, check_room, check_values
from nemocompile.text.tokenizer import encode_prompts

from .backends import NUMPY_DTYPES, Backend, StepIO, create_backend
from .cache import KVCache
from .engine import Engine
from .job import Job, RuntimeResult
from .output import OutputOptions, output_options
from .policy import CostTable, lossless_options

if TYPE_CHECKING:  # an annotation only: the grammar module loads with the first response_format
    from .grammar import Grammar


@dataclass(frozen=True)
class Request:
    """A validated request: every default filled, every value checked."""

    prompts: list[list[int]]  # token ids per prompt (1..batch_size prompts)
    mode: str  # "auto": the engine picks a lossless mode per cycle
    max_new_tokens: int
    block_length: int | None  # None for ar
    threshold: float | None  # diffusion: None = fixed schedule; linear-spec: 0 = one-shot draft
    steps: int | None  # diffusion without threshold: denoising steps per block (default: block length)
    temperature: float
    seed: int | None
    eos: frozenset[int]  # the ids that stop generation; empty: never stop on EOS
    batched: bool  # the caller passed a list of prompts
    budget: ThinkingBudget | None = None  # spec 3.5: max_thinking_tokens and end_think_token_id
    output: OutputOptions = OutputOptions()  # stop strings, stop ids, min_tokens, log-probs, echo
    sampling: SamplingParams | None = None  # top_p, top_k, min_p, penalties, logit_bias (nemocompile.sampling)
    grammar: "Grammar | None" = None  # response_format: the compiled grammar every token must follow


# a forward reads its rows' slots rounded up to a multiple of this (see Runtime.run)
SLOT_STEP = 32


class Runtime:
    """Compiled graphs of one artifact on one backend, with one KV cache whose rows
    are shared out to concurrent requests by the engine (``max_queue``: requests that
    may wait for a row before ``submit`` refuses more; None: unbounded). ``prefix_cache``:
    reuse the K/V of prompt prefixes earlier requests left in the cache rows
    (runtime/prefix_cache.py), finished rows keeping at most ``prefix_cache_tokens``
    tokens (None: every row's)."""

    def __init__(self, artifact_dir: Path, manifest: Manifest, backend: Backend, max_queue: int | None = None,
                 prefix_cache: bool = True, prefix_cache_tokens: int | None = None):
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

        cache_spec = _tensor(manifest.graphs[0].inputs, "cache_k", manifest.graphs[0])
        self.capacity = cache_spec.shape[3]
        if cache_spec.shape[1] != self.batch_size:
            raise ManifestError(f"cache_k has batch {cache_spec.shape[1]} but the manifest's batch_size is "
                                f"{self.batch_size}; re-export the artifact")
        self.cache = KVCache(backend.allocate((2, *cache_spec.shape), cache_spec.dtype), self.batch_size)
        self.slots = np.arange(self.capacity, dtype=np.int64)  # graph input `slots`: a forward binds a prefix
        self.buffers: dict[tuple, object] = {}  # (name, shape, dtype) -> buffer, shared by graphs
        self.io: dict[tuple[str, int], StepIO] = {}  # (step, block length) -> its buffers
        for graph in manifest.graphs:
            if _tensor(graph.inputs, "cache_k", graph).shape != cache_spec.shape:
                raise ManifestError(f"graph {graph.step!r} has a different cache shape; every graph of an "
                                    "artifact must share one cache (re-export it)")
            io = self._step_io(graph)
            backend.open(graph, io, self.cache, self.slots)
        self.sampling = manifest.sampling
        # every graph that picks emitted tokens returns top_logprobs/top_ids (export's default)
        self.logprobs = all(g.output("top_logprobs") is not None for g in manifest.graphs if g.step != "draft")
        self.block_lengths = sorted({L for m in self.modes for L in manifest.block_lengths(m)})  # every mode's
        # quadratic-spec: branches of each fused step (its block length, unless exported with --draft-groups)
        self.draft_groups = {g.block_length: len(g.layout["branches"]) for g in manifest.graphs
                             if g.step == "verify_draft"}
        self.prefill_length = manifest.graph("prefill").block_length
        self.auto_options = lossless_options(manifest)  # the (mode, block length) pairs mode="auto" picks from
        if len({m for m, _ in self.auto_options}) > 1:
            self.modes = [*self.modes, "auto"]
        self.unopened_modes: list[str] = []  # the artifact's modes that load(modes=...) left closed
        self.engine = Engine(self, max_queue=max_queue)
        self.prefix = None  # the prefix cache (None: off)
        if prefix_cache:
            from .prefix_cache import PrefixCache

            self.prefix = PrefixCache(self.cache, self.batch_size, prefix_cache_tokens, self.engine.listeners)
            self.prefix.unreusable_writes = {(g.step, g.block_length) for g in manifest.graphs if _lora_writes(g)}

    # ---- construction ------------------------------------------------------------
    @classmethod
    def load(cls, artifact_dir: str | Path, backend: str = "onnxruntime", device: str | None = None, *,
             verify: bool = False, **options) -> "Runtime":
        """Open an exported artifact (a malformed costs.json is refused here, not at the first
        ``mode="auto"`` request). ``options``: ``threads`` (intra-op threads),
        ``model`` (torch backend: checkpoint path or loaded model; default the
        manifest's ``source``), ``providers`` (onnxruntime), ``modes`` (open only
        the graphs of these modes; default every mode of the artifact), ``costs``
        (False: do not read the cost table; ``nemocompile calibrate`` replaces it), ``verify``
        (True: check every file's recorded SHA-256 before opening a graph: reads every byte,
        for artifacts copied between machines)."""
        artifact_dir = Path(artifact_dir)
        manifest = Manifest.load(artifact_dir)
        modes = options.pop("modes", None)
        read_costs = options.pop("costs", True)
        unopened = []
        if modes:
            unopened = [m for m in manifest.modes if m not in modes]
            manifest = manifest.for_modes(modes)
        # sizes (a stat per file), and with verify the digests. A damaged graph that
        # some modes do not use costs only those modes; anything else damaged stops here.
        if verify and not any("sha256" in r for r in (manifest.files or {}).values()):
            print(f"warning: {artifact_dir}: the manifest records no SHA-256 digests (an older export); "
                  "--verify checks sizes only", file=sys.stderr)
        manifest, damaged = usable_graphs(artifact_dir, manifest, hashes=verify)
        for line in damaged:
            print(f"warning: {line}", file=sys.stderr)
        own = {k: options.pop(k) for k in ("max_queue", "prefix_cache", "prefix_cache_tokens") if k in options}
        tokens = own.get("prefix_cache_tokens")
        if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0):
            raise GenerationError(f"prefix_cache_tokens must be an integer >= 0, got {tokens!r:.60}")
        costs = None
        if read_costs and len({m for m, _ in lossless_options(manifest)}) > 1:  # auto will be served
            costs = CostTable.load(artifact_dir, backend)  # CostTableError: one line, before any graph opens
        runtime = cls(artifact_dir, manifest, create_backend(backend, artifact_dir, manifest, device=device, **options),
                      **own)
        runtime.unopened_modes = [m for m in unopened if m not in runtime.modes]
        runtime.engine.costs, runtime.engine.costs_read = costs, read_costs and "auto" in runtime.modes
        return runtime

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
                    buffer(graph.output("confidence")), top_logprobs=buffer(graph.output("top_logprobs")),
                    top_ids=buffer(graph.output("top_ids")), next_logprob=buffer(graph.output("next_logprob")))
        if io.candidate is None:
            raise ManifestError(f"graph {graph.step!r} returns no 'candidate'; re-export the artifact")
        self.io[(graph.step, L)] = io
        return io

    def run(self, key: tuple[str, int], rows) -> StepIO:
        """Run graph ``key`` for cache rows ``rows`` (a sequence of b distinct row indices, in the
        order of ``io``'s entries, whose ``input_ids`` the caller has filled), reading only the
        slots below their longest row, rounded up to a multiple of ``SLOT_STEP`` (the extra
        slots are masked like any past a row's length; the rounding saves rebinding ``slots``
        on every token). The presents are left in ``io`` for the caller to place."""
        io, lengths, starts = self.io[key], self.cache.cache_len.tolist(), self.cache.row_start
        longest = 0
        for j, row in enumerate(rows):  # a few rows: scalar stores beat numpy's fancy indexing here
            io.rows[j] = row
            io.cache_len[j] = length = lengths[row]
            io.row_start[j] = starts[row]
            longest = max(longest, length)
        self.backend.run(key, len(rows), min(self.capacity, max(1, -(-longest // SLOT_STEP) * SLOT_STEP)))
        return io

    def close(self) -> None:
        self.engine.close()
        self.backend.close()

    def exclusive(self):
        """A context in which the caller alone uses the cache and graphs (the engine
        waits; running requests finish first)."""
        return self.engine.exclusive()

    def scheduler(self, row):
        """The generator that decodes ``row`` in its request's mode."""
        from .schedulers import SCHEDULERS

        return SCHEDULERS[row.mode](row)

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
                 seed: int | None = None, eos: int | Sequence[int] | None = None, steps: int | None = None, *,
                 max_thinking_tokens: int | None = None, end_think_token_id: int | None = None,
                 names: dict[str, str] | None = None, stop=None, stop_token_ids=None, ignore_eos: bool = False,
                 min_tokens: int | None = None, logprobs: int | None = None, echo: bool = False,
                 sampling: dict | None = None, response_format: dict | None = None) -> Request:
        """Fill defaults and reject what cannot run, before any step does (spec defaults:
        diffusion threshold 0.9, linear-spec threshold 0; block length: the artifact's).
        Values are checked by ``nemocompile.request``, the checks every front door shares;
        ``names`` renames fields in its messages (HTTP: max_new_tokens -> max_tokens).
        ``sampling``: top_p, top_k, min_p, presence/frequency/repetition_penalty, logit_bias
        (nemocompile.sampling); ``response_format``: OpenAI's json_object / json_schema
        (runtime/grammar.py: constrained decoding in ar and auto)."""
        check_values(mode=mode, max_new_tokens=max_new_tokens, block_length=block_length, temperature=temperature,
                     seed=seed, eos=eos, steps=steps, vocab_size=self.vocab_size, names=names, auto=True)
        if mode in self.unopened_modes:
            raise RequestError(f"{mode} was not opened (only {', '.join(self.modes)}: --modes); its graphs are in "
                               f"the artifact: load it with {mode} in --modes", param="mode")
        if mode not in self.modes:
            raise RequestError(f"this artifact has no {mode} graphs (it has: {', '.join(self.modes)}); "
                               + ("auto needs two of ar, linear-spec, quadratic-spec: re-export with them"
                                  if mode == "auto" else "re-export it with that mode"), param="mode")
        eos = eos_id_set(self.eos_token_ids if eos is None else eos, self.vocab_size)
        output = self.check_output(stop, stop_token_ids, min_tokens, logprobs, echo, max_new_tokens, mode)
        # a stop id stops like an EOS (every scheduler's early ends see it); ignore_eos keeps only them
        eos = (frozenset() if ignore_eos else eos) | output.stop_token_ids
        if not prompts or any(len(p) == 0 for p in prompts):
            raise GenerationError("empty prompt: give at least one token")
        params = sampling_params(temperature, seed, **(sampling or {}), vocab_size=self.vocab_size)
        grammar = None
        if response_format is not None:
            from .grammar import compile_response_format

            grammar = compile_response_format(self, response_format, mode, eos)
        if (temperature > 0 or params.shapes_logits or grammar is not None) and not self.sampling:
            what = "sampling" if temperature > 0 else "this request (logit_bias, penalties or response_format)"
            raise GenerationError(f"this artifact was exported with --greedy-only (its graphs return no logits): "
                                  f"{what} needs them; re-export without --greedy-only")
        if mode == "quadratic-spec":
            check_quadratic(threshold)
            if (temperature > 0 or params.shapes_logits or grammar is not None) and \
                    self.manifest.graph("verify_draft").output("logits") is None:
                raise GenerationError("this artifact's quadratic-spec graphs return no logits (exported before fused "
                                      "steps kept their spine's): use temperature 0, another mode, or re-export")
        if len(prompts) > self.batch_size:
            raise GenerationError(f"{len(prompts)} prompts exceed the artifact's batch size {self.batch_size}; send "
                                  f"at most {self.batch_size} at a time or re-export with a larger batch size")

        block = None
        if mode == "auto":
            block = self._auto_block(block_length, threshold, steps)
        elif mode != "ar":
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
        if mode in ("ar", "quadratic-spec", "auto"):
            thr = None

        room = self._auto_room(block) if mode == "auto" else block
        check_room(self.prompt_width(prompts, mode), max_new_tokens, room, self.capacity,
                   "the artifact's KV cache capacity",
                   "shorten the prompt, lower max_new_tokens, or re-export with a larger --max-seq-len", names,
                   prompt=max(map(len, prompts)))
        budget = thinking_budget(max_thinking_tokens, end_think_token_id, self.tokenizer, self.vocab_size)
        return Request(prompts, mode, max_new_tokens, block, thr, steps, float(temperature), seed, eos, batched,
                       budget, output, None if params.plain else params, grammar)

    def check_output(self, stop, stop_token_ids, min_tokens, logprobs, echo, max_new_tokens, mode) -> OutputOptions:
        """The request's :class:`OutputOptions`, refused where this artifact cannot honour them."""
        output = output_options(stop, stop_token_ids, min_tokens, logprobs, echo, vocab_size=self.vocab_size,
                                max_new_tokens=max_new_tokens if isinstance(max_new_tokens, int) else None)
        if output.stop and self.tokenizer is None:
            raise RequestError("stop strings need the artifact's tokenizer, and this artifact has none; use "
                               "stop_token_ids", param="stop")
        if output.logprobs is not None and not self.logprobs:
            raise RequestError("this artifact's graphs return no log-probabilities (exported with --no-logprobs); "
                               "re-export it without that flag to get logprobs", param="logprobs")
        if output.echo and (mode == "quadratic-spec" or self.prefill_length < 2):
            raise RequestError("echo scores the prompt through the prefill graph, which quadratic-spec fuses with "
                               "its first draft" if mode == "quadratic-spec" else
                               "echo needs a prefill graph of at least 2 tokens; re-export with a larger "
                               "--prefill-length", param="echo")
        return output

    def _auto_block(self, block_length, threshold, steps) -> int | None:
        """mode="auto": the block length the request pins its self-speculation to (None: auto
        picks), after refusing the knobs auto sets itself."""
        if parse_threshold(threshold) is not DEFAULT or steps is not None:
            raise RequestError("mode auto sets its own drafting (one-shot drafts, no threshold or steps); drop "
                               "threshold/steps or name a mode", param="threshold" if steps is None else "steps")
        lengths = self._auto_lengths()
        if block_length is not None and block_length not in lengths:
            raise GenerationError(f"this artifact's self-speculation graphs are for block length(s) {lengths}, not "
                                  f"{block_length}; pick one of those or leave block_length unset")
        return block_length

    def _auto_lengths(self) -> list[int]:
        return sorted({L for m, L in self.auto_options if m != "ar"})

    def _auto_room(self, block: int | None) -> int | None:
        """The cache room auto keeps for one block: the pinned length, else the longest it may pick."""
        return block if block is not None else max(self._auto_lengths(), default=None)

    def submit(self, prompt_or_ids, mode: str = "ar", max_new_tokens: int = 64, block_length: int | None = None,
               threshold=None, temperature: float = 0.0, seed: int | None = None,
               eos: int | Sequence[int] | None = None, steps: int | None = None, chat: bool = False,
               chat_template_kwargs: dict | None = None, max_thinking_tokens: int | None = None,
               end_think_token_id: int | None = None, timeout: float | None = None,
               names: dict[str, str] | None = None, eos_token_id: int | Sequence[int] | None = None,
               **output) -> Job:
        """Validate a request and queue it for the engine without waiting: a :class:`Job`
        (iterate it, or ``async for``, for ``(sequence, tokens)`` commits; ``result()``).
        ``eos``: the ids that stop generation (one id, a list, or -1: never; default every EOS
        id of the checkpoint); ``eos_token_id`` is the same, as the eager ``generate`` names it.
        ``timeout``: seconds from now after which the request ends with ``RequestTimeout``.
        Raises ``Overloaded`` when ``max_queue`` requests already wait. ``output``: ``stop``,
        ``stop_token_ids``, ``ignore_eos``, ``min_tokens``, ``logprobs``, ``echo`` (see ``generate``),
        ``sampling``, ``response_format`` (see :meth:`validate`)."""
        return self._submit(prompt_or_ids, mode, max_new_tokens, block_length, threshold, temperature, seed,
                            _eos(eos, eos_token_id), steps, chat, chat_template_kwargs, max_thinking_tokens,
                            end_think_token_id, timeout, names, stream=False, **output)

    def _submit(self, prompt_or_ids, mode, max_new_tokens, block_length, threshold, temperature, seed, eos, steps,
                chat, chat_template_kwargs, max_thinking_tokens, end_think_token_id, timeout, names, stream,
                **output) -> Job:
        unknown = sorted(set(output) - OUTPUT_KEYWORDS)
        if unknown:
            raise TypeError(f"unexpected keyword argument(s) {unknown}")
        prompts, batched = self.encode(prompt_or_ids, chat, chat_template_kwargs)
        request = self.validate(prompts, batched, mode, max_new_tokens, block_length, threshold, temperature,
                                seed, eos, steps, max_thinking_tokens=max_thinking_tokens,
                                end_think_token_id=end_think_token_id, names=names, **output)
        if stream and batched:
            raise GenerationError("stream=True takes a single prompt; call generate once per prompt")
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                    or not timeout > 0):
            raise RequestError(f"timeout must be a number of seconds > 0, got {timeout!r:.60}", param="timeout")
        return self.engine.submit(request, timeout)

    def generate(self, prompt_or_ids, mode: str = "ar", max_new_tokens: int = 64, block_length: int | None = None,
                 threshold=None, temperature: float = 0.0, seed: int | None = None,
                 eos: int | Sequence[int] | None = None, stream: bool = False, steps: int | None = None,
                 chat: bool = False, chat_template_kwargs: dict | None = None,
                 max_thinking_tokens: int | None = None, end_think_token_id: int | None = None,
                 timeout: float | None = None, eos_token_id: int | Sequence[int] | None = None, stop=None,
                 stop_token_ids=None, ignore_eos: bool = False, min_tokens: int | None = None,
                 logprobs: int | None = None, echo: bool = False, sampling: dict | None = None,
                 response_format: dict | None = None):
        """Generate for one prompt (text or ids) -> :class:`RuntimeResult`, or a list of
        prompts -> a list (each prompt takes a row; they decode together, with any other
        caller's requests). Thread-safe: concurrent callers share the batch graphs.

        ``eos`` / ``eos_token_id``: as for :meth:`submit`. ``stream=True`` (one prompt) returns a
        :class:`TokenStream` that yields the token ids of each commit as it happens; its ``result``
        is set at the end.

        Output: ``stop`` (a string or up to 4) ends the text before the first occurrence of
        any (``finish_reason`` "stop"); ``stop_token_ids`` stop like an EOS; ``ignore_eos``
        keeps going past EOS; ``min_tokens``: no stop of any kind before that many tokens;
        ``logprobs`` k (0..20): each token's log-prob and its k best alternatives in
        ``result.logprobs``; ``echo``: the prompt's too, in ``result.prompt_logprobs``.
        """
        job = self._submit(prompt_or_ids, mode, max_new_tokens, block_length, threshold, temperature, seed,
                           _eos(eos, eos_token_id), steps, chat, chat_template_kwargs, max_thinking_tokens,
                           end_think_token_id, timeout, None, stream, stop=stop, stop_token_ids=stop_token_ids,
                           ignore_eos=ignore_eos, min_tokens=min_tokens, logprobs=logprobs, echo=echo,
                           sampling=sampling, response_format=response_format)
        if stream:
            return TokenStream(job)
        results = job.result()
        return results if job.request.batched else results[0]


OUTPUT_KEYWORDS = {"stop", "stop_token_ids", "ignore_eos", "min_tokens", "logprobs", "echo", "sampling",
                   "response_format"}


class TokenStream:
    """Iterates a streamed generation: each item is the list of token ids one commit emitted.

    ``result`` is set at the end; ``close()`` abandons the generation (its row is
    freed at the next step boundary).
    """

    def __init__(self, job):
        self.job = job
        self._events = iter(job)
        self.result: RuntimeResult | None = None

    def __iter__(self) -> Iterator[list[int]]:
        return self

    def __next__(self) -> list[int]:
        try:
            return next(self._events)[1]
        except StopIteration:
            self.result = self.job.results[0]
            raise

    def close(self) -> None:
        """Abandon the generation and free its row."""
        self.job.cancel()


def _eos(eos, eos_token_id):
    """``eos``, or its other name ``eos_token_id`` (the eager ``generate``'s); not two different values."""
    if eos_token_id is None:
        return eos
    if eos is not None and eos != eos_token_id:
        raise RequestError(f"eos={eos!r} and eos_token_id={eos_token_id!r} name the same setting: give one",
                           param="eos")
    return eos_token_id


def _tensor(specs, name: str, graph):
    for t in specs:
        if t.name == name:
            return t
    raise ManifestError(f"graph {graph.step!r} ({graph.file}) has no {name!r} tensor in the manifest; re-export it")


def _lora_writes(graph) -> bool:
    """Whether a graph writes cache rows that carry the drafter LoRA (its K/V then differ from
    the base weights', so the prefix cache must not reuse them)."""
    from nemocompile.model.layout import Layout

    layout = Layout.from_dict(graph.layout)
    return graph.writes_cache and any(layout.lora_rows()[:layout.spine])


def _tokenizer(artifact_dir: Path, manifest: Manifest):
    from nemocompile.text.tokenizer import Tokenizer

    for d in (artifact_dir, Path(manifest.source) if manifest.source else None):
        if d is not None and (d / "tokenizer.json").is_file():
            try:
                return Tokenizer(d)
            except NemocompileError:
                return None
    return None

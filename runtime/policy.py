"""`mode="auto"`: which lossless mode a decode cycle should run, from a cost table.

Glossary:
- graph key: ``"step@L"``, one exported graph (``"ar_step@1"``, ``"draft@8"``,
  ``"verify_draft@8"``); the cost table holds the median seconds of one forward
  of it at the artifact's static batch.
- cycle: what one row advances by in one engine step. ar: one ``ar_step`` (1
  token); linear-spec at L: one one-shot ``draft`` and one ``verify`` (threshold
  0); quadratic-spec at L: one fused ``verify_draft``.
- acceptance length: tokens a self-speculation cycle emits (accepted drafts +
  the bonus, spec 3.3); the table's prior per ``"mode@L"`` comes from
  calibration, a request's own cycles pull its estimate away from the prior.
- expected throughput of an option: expected tokens of the whole step (every
  auto row under that option, plus the tokens of rows whose mode is fixed)
  divided by the time of the union of graphs the step runs. At a static batch
  a graph costs the same however many rows use it, so joining a graph that
  other rows run anyway is free.

Pure: no threads, no I/O except :meth:`CostTable.save` / :meth:`CostTable.load`.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from nemocompile.errors import NemocompileError

COSTS_FILE = "costs.json"  # beside manifest.json
FORMAT, VERSION = "nemocompile-costs", 1
LOSSLESS = ("ar", "linear-spec", "quadratic-spec")  # the modes auto may pick (lossless at temperature 0)
# how many cycles the calibrated prior counts as: a request's first few cycles move the estimate
# only part way (one lucky or unlucky cycle does not flip the mode), after ~W cycles its own
# record weighs as much as the prior
PRIOR_WEIGHT = 4.0
# the acceptance prior of an artifact nobody calibrated: a guess that lets auto try self-speculation
# (a prior below what a mode achieves would keep auto from ever running it, and so from learning it)
DEFAULT_PRIOR = 2.0
_TIE = 1e-9  # relative: scores this close are equal (then ar: cheapest, always lossless)


class CostTableError(NemocompileError):
    """costs.json is malformed, or lacks what a choice needs."""


def graph_key(step: str, block_length: int) -> str:
    return f"{step}@{block_length}"


def option_key(mode: str, block_length: int | None) -> str:
    """``"ar"`` or ``"linear-spec@8"``: how options are named in scores and the acceptance priors."""
    return "ar" if mode == "ar" else f"{mode}@{block_length}"


def cycle_graphs(mode: str, block_length: int | None) -> tuple[str, ...]:
    """The graphs one cycle of ``mode`` runs (linear-spec: one-shot draft, threshold 0)."""
    if mode == "ar":
        return (graph_key("ar_step", 1),)
    if mode == "linear-spec":
        return (graph_key("draft", block_length), graph_key("verify", block_length))
    if mode == "quadratic-spec":
        return (graph_key("verify_draft", block_length),)
    raise ValueError(f"{mode!r} is not a lossless mode auto can pick ({', '.join(LOSSLESS)})")


def lossless_options(manifest) -> list[tuple[str, int | None]]:
    """The (mode, block length) pairs auto may pick on an artifact (ar's block length: None)."""
    return [(m, L) for m in LOSSLESS if m in manifest.modes
            for L in ((None,) if m == "ar" else manifest.block_lengths(m))]


@dataclass(frozen=True)
class CostTable:
    """What one artifact's graphs cost on one machine and backend, and how well it self-speculates."""

    backend: str  # "onnxruntime", "torch", "tensorrt": costs hold for this backend only
    threads: int | None  # intra-op threads during calibration (None: the backend's default)
    batch_size: int  # the artifact's static batch the graphs ran at
    step_s: dict[str, float]  # graph key "step@L" -> median seconds per forward
    acceptance: dict[str, float]  # "linear-spec@8" -> prior mean acceptance length per cycle
    measured_at: str  # ISO 8601 UTC

    def to_dict(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "backend": self.backend, "threads": self.threads,
                "batch_size": self.batch_size, "step_s": dict(self.step_s), "acceptance": dict(self.acceptance),
                "measured_at": self.measured_at}

    def save(self, target: str | Path) -> Path:
        """Write the table to ``target``: an artifact directory (its costs.json) or a file path.
        Written to a temporary file first and renamed: a failed write leaves no half table."""
        target = Path(target)
        path = target / COSTS_FILE if target.is_dir() else target
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(self.to_dict(), f, indent=2)
                f.write("\n")
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def from_dict(cls, raw, source: str = COSTS_FILE) -> "CostTable":
        """Validate a parsed costs.json; :class:`CostTableError` says what is wrong."""

        def bad(what: str) -> CostTableError:
            return CostTableError(f"{source}: {what}; recalibrate it (nemocompile calibrate --artifact DIR)")

        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise bad(f"not a cost table (no \"format\": \"{FORMAT}\")")
        if raw.get("version") != VERSION:
            raise bad(f"version {raw.get('version')!r}, this nemocompile reads version {VERSION}")
        backend, threads, batch = raw.get("backend"), raw.get("threads"), raw.get("batch_size")
        if not isinstance(backend, str) or not backend:
            raise bad("\"backend\" must be a backend name")
        if threads is not None and not _count(threads):
            raise bad(f"\"threads\" must be an integer >= 1 or null, got {threads!r}")
        if not _count(batch):
            raise bad(f"\"batch_size\" must be an integer >= 1, got {batch!r}")
        step_s = _positive_map(raw.get("step_s"), "step_s", bad)
        acceptance = _positive_map(raw.get("acceptance"), "acceptance", bad)
        if not step_s:
            raise bad("\"step_s\" is empty")
        measured_at = raw.get("measured_at")
        if not isinstance(measured_at, str):
            raise bad("\"measured_at\" must be a timestamp string")
        return cls(backend, threads, batch, step_s, acceptance, measured_at)

    @classmethod
    def load(cls, artifact_dir: str | Path, backend: str, file: str | Path | None = None) -> "CostTable | None":
        """The artifact's cost table for ``backend``, or None: no table (auto then has no costs),
        or a table that does not describe this artifact on this backend (a warning line on
        stderr says why and to recalibrate). ``file``: read it instead of the artifact's
        costs.json. A malformed file raises :class:`CostTableError`."""
        from nemocompile.artifact.manifest import Manifest

        artifact_dir = Path(artifact_dir)
        path = Path(file) if file is not None else artifact_dir / COSTS_FILE
        if not path.is_file():
            return None
        try:
            raw = json.loads(path.read_bytes().decode("utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise CostTableError(f"{path}: not readable JSON ({' '.join(str(e).split())[:120]}); recalibrate it "
                                 f"(nemocompile calibrate --artifact {artifact_dir})") from None
        table = cls.from_dict(raw, str(path))
        manifest = Manifest.load(artifact_dir)
        missing = sorted({graph_key(g.step, g.block_length) for g in manifest.graphs} - set(table.step_s))
        why = (f"measured on backend {table.backend}, not {backend}" if table.backend != backend else
               f"measured at batch {table.batch_size}, the artifact's batch is {manifest.batch_size}"
               if table.batch_size != manifest.batch_size else
               f"has no cost for {', '.join(missing)} (an older export?)" if missing else None)
        if why:
            print(f"warning: {path}: {why}; not used (recalibrate: nemocompile calibrate --artifact {artifact_dir} "
                  f"--backend {backend})", file=sys.stderr)
            return None
        return table


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _positive_map(value, name: str, bad) -> dict[str, float]:
    if not isinstance(value, dict):
        raise bad(f"\"{name}\" must be an object of name -> number")
    out = {}
    for k, v in value.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v > 0):
            raise bad(f"\"{name}\"[{k!r}] must be a finite number > 0, got {v!r}")
        out[k] = float(v)
    return out


def _cost(table: CostTable, key: str) -> float:
    try:
        return table.step_s[key]
    except KeyError:
        raise CostTableError(f"the cost table has no time for graph {key}; recalibrate it "
                             "(nemocompile calibrate --artifact DIR)") from None


def cycle_s(table: CostTable, mode: str, block_length: int | None) -> float:
    """Seconds of one cycle of ``mode`` at the table's static batch."""
    return sum(_cost(table, k) for k in cycle_graphs(mode, block_length))


def prior(table: CostTable, mode: str, block_length: int | None) -> float:
    """The calibrated mean acceptance length of a cycle (ar: 1 token)."""
    if mode == "ar":
        return 1.0
    key = option_key(mode, block_length)
    if key not in table.acceptance:
        raise CostTableError(f"the cost table has no acceptance prior for {key}; recalibrate it "
                             "(nemocompile calibrate --artifact DIR)")
    return table.acceptance[key]


@dataclass
class Acceptance:
    """One request's acceptance record per (mode, block length), blended with the prior:
    expected = (prior * PRIOR_WEIGHT + sum of its acceptance lengths) / (PRIOR_WEIGHT + cycles)."""

    weight: float = PRIOR_WEIGHT
    _sums: dict[tuple[str, int | None], list] = field(default_factory=dict, repr=False)  # -> [sum, cycles]

    def add(self, mode: str, block_length: int | None, n: int) -> None:
        """One cycle of ``mode`` at ``block_length`` emitted ``n`` tokens."""
        record = self._sums.setdefault((mode, block_length), [0, 0])
        record[0] += n
        record[1] += 1

    def cycles(self, mode: str, block_length: int | None) -> int:
        return self._sums.get((mode, block_length), (0, 0))[1]

    def expected(self, mode: str, block_length: int | None, prior: float) -> float:
        """Expected tokens of this request's next cycle of ``mode`` (ar: always 1)."""
        if mode == "ar":
            return 1.0
        total, count = self._sums.get((mode, block_length), (0, 0))
        return (prior * self.weight + total) / (self.weight + count)


@dataclass(frozen=True)
class Choice:
    mode: str
    block_length: int | None  # None for ar
    reason: str  # one human line: the winner against the runner-up
    scores: dict[str, float]  # option key ("ar", "linear-spec@8") -> expected tokens/s of the step


def choose(table: CostTable, options: Iterable[tuple[str, int | None]], rows: Sequence[Acceptance],
           fixed_graphs: frozenset[str] = frozenset(), fixed_tokens: float = 0.0) -> Choice:
    """The option (mode, block length) with the highest expected tokens/s of the whole step.

    ``options``: the lossless (mode, L) pairs the artifact has (ar's L is ignored);
    ``rows``: the Acceptance records of the auto rows that run this cycle;
    ``fixed_graphs`` / ``fixed_tokens``: graph keys and expected tokens of rows whose
    mode is fixed (they run anyway: the union of their ``cycle_graphs``, or a diffusion
    row's ``denoise@L``/``commit@L``). Ties go to ar.
    """
    options = list(dict.fromkeys((m, None if m == "ar" else L) for m, L in options))
    if not options:
        raise ValueError("choose() needs at least one option")
    scored = []  # (key, mode, L, tokens, seconds, tokens/s)
    for mode, L in options:
        p = prior(table, mode, L)
        tokens = sum(r.expected(mode, L, p) for r in rows) + fixed_tokens
        seconds = sum(_cost(table, k) for k in set(fixed_graphs) | set(cycle_graphs(mode, L)))
        scored.append((option_key(mode, L), mode, L, tokens, seconds, tokens / seconds))
    best_score = max(s[5] for s in scored)
    tied = [s for s in scored if s[5] >= best_score * (1 - _TIE)]
    # among equals: ar (cheapest, always lossless), else the shortest step
    best = min(tied, key=lambda s: (s[1] != "ar", s[4]))
    others = sorted((s for s in scored if s is not best), key=lambda s: -s[5])
    line = _describe(best)
    if others:
        line += f" {'>' if best[5] > others[0][5] * (1 + _TIE) else '= (tie)'} {_describe(others[0])}"
    else:
        line += " (the only option)"
    return Choice(best[1], best[2], line, {s[0]: s[5] for s in scored})


def _describe(s) -> str:
    key, _, _, tokens, seconds, rate = s
    return f"{key}: {tokens:.2f} tok/cycle in {seconds * 1e3:.2f} ms = {rate:.0f} tok/s"

"""Sizes and SHA-256 digests of an artifact's files, recorded at export and checked at load.

The manifest's ``files`` maps each file name (relative to the artifact
directory) to ``{"size": bytes, "sha256": hex}``. Loading checks the sizes (a
``stat`` per file: a truncated, empty or missing file is caught before ONNX
Runtime or protobuf trip over it); ``nemocompile check`` and ``Runtime.load(verify=True)``
(``run``/``serve --verify``) also check the digests (read every byte: a same-size
file damaged in a copy would otherwise run and print garbage). Either names the damaged file and says to
re-export. Manifests written before the field existed record nothing: then
only the files the manifest names must exist and be non-empty.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterable

from nemocompile.errors import NemocompileError


class ArtifactDamagedError(NemocompileError):
    """An artifact file is missing, truncated or altered since export."""


def describe_files(directory: str | Path, names: Iterable[str]) -> dict[str, dict]:
    """``{name: {"size", "sha256"}}`` of the named files of ``directory``."""
    directory = Path(directory)
    out = {}
    for name in sorted(names):
        path = directory / name
        with open(path, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        out[name] = {"size": path.stat().st_size, "sha256": digest}
    return out


def damaged_files(directory: str | Path, manifest, hashes: bool = False) -> list[str]:
    """One line per damaged file (empty: all intact). ``hashes`` also compares digests."""
    directory = Path(directory)
    records = dict(manifest.files or {})
    named = [g.file for g in manifest.graphs] + ([manifest.weights_file] if manifest.weights_file else [])
    problems = []
    for name in dict.fromkeys([*records, *named]):
        path = directory / name
        if not path.is_file():
            problems.append(f"{path}: missing")
            continue
        size = path.stat().st_size
        want = records.get(name)
        if want is None:
            if size == 0:
                problems.append(f"{path}: empty")
            continue
        if size != want["size"]:
            problems.append(f"{path}: {size} bytes, the manifest records {want['size']}")
        elif hashes and describe_files(directory, [name])[name]["sha256"] != want["sha256"]:
            problems.append(f"{path}: SHA-256 differs from the manifest's (the file was altered)")
    return problems


def usable_graphs(directory: str | Path, manifest, hashes: bool = False):
    """The manifest without graphs whose file is missing or damaged (sizes; with ``hashes``
    also the SHA-256 digests), and one line per dropped file: a mode that does not use a
    damaged graph still runs. Raises :class:`ArtifactDamagedError` when a file every mode
    needs (the weights, the tokenizer, the prefill graph) is damaged, or when no mode is left."""
    import dataclasses

    directory = Path(directory)
    problems = damaged_files(directory, manifest, hashes)
    if not problems:
        return manifest, []
    by_graph = {str(directory / g.file): g for g in manifest.graphs}
    dropped = {name for p in problems for name in by_graph if p.startswith(f"{name}:")}
    if len(dropped) < len(problems):  # a damaged file that is not a graph
        check_files(directory, dataclasses.replace(manifest, graphs=[g for g in manifest.graphs
                                                                     if str(directory / g.file) not in dropped]),
                    hashes)
    kept = dataclasses.replace(manifest, graphs=[g for g in manifest.graphs if str(directory / g.file) not in dropped])
    if not kept.graphs or not kept.modes:
        check_files(directory, manifest, hashes)
    lost = [m for m in manifest.modes if m not in kept.modes]
    return kept, [f"{p}: the artifact is damaged ({', '.join(lost)} unavailable); re-export it" for p in problems]


def check_files(directory: str | Path, manifest, hashes: bool = False) -> None:
    """Raise :class:`ArtifactDamagedError` naming the first damaged file (see :func:`damaged_files`)."""
    problems = damaged_files(directory, manifest, hashes)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ArtifactDamagedError(f"{problems[0]}{more}: the artifact is damaged; re-export it "
                                   f"(nemocompile export --out {directory} --force)")


# Files an export (or `build`, beside the graphs) writes into an artifact directory; --force
# replaces a directory holding only these and refuses to delete anything else.
_ARTIFACT_SUFFIXES = (".onnx", ".data", ".bin", ".engine")
# costs.json: `nemocompile calibrate` writes it beside the manifest; it describes the graphs it sits with
_ARTIFACT_NAMES = ("manifest.json", "engines.json", "tokenizer.json", "tokenizer_config.json", "costs.json")


def check_export_destination(out_dir: str | Path, overwrite: bool, error=NemocompileError) -> None:
    """Refuse an ``--out`` that cannot become an artifact, before any work: beneath a regular
    file, not writable, or (with ``overwrite``) holding files the export did not write."""
    out_dir = Path(out_dir)
    for parent in (out_dir, *out_dir.parents):
        if parent.exists():
            if parent != out_dir and not parent.is_dir():
                raise error(f"{out_dir}: {parent} is a file, not a folder; choose another --out")
            break
    existing = next(p for p in (out_dir.parent, *out_dir.parent.parents) if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise error(f"{out_dir}: {existing} is not writable; choose another --out")
    try:  # os.access can say yes where a folder cannot be made (/proc, a read-only mount)
        import tempfile

        os.rmdir(tempfile.mkdtemp(prefix=f".{out_dir.name}.check-", dir=existing))
    except OSError as e:
        raise error(f"{out_dir}: cannot create a folder in {existing} ({e.strerror}); choose another --out") from None
    if not out_dir.exists() or (out_dir.is_dir() and not any(out_dir.iterdir())):
        return
    if not overwrite:
        raise error(f"{out_dir} exists and is not empty; choose another --out or pass --force to replace it")
    if not (out_dir / "manifest.json").is_file():
        raise error(f"{out_dir} exists and is not an artifact (no manifest.json); --force only replaces "
                    "artifacts: choose another --out or remove it yourself")
    recorded = _recorded_names(out_dir)
    foreign = sorted(p.name for p in out_dir.iterdir()
                     if p.name not in recorded and not (p.is_file() and (p.name in _ARTIFACT_NAMES
                                                                          or p.suffix in _ARTIFACT_SUFFIXES)))
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise error(f"{out_dir} holds files an export did not write ({shown}); --force would delete them: "
                    "move them out or choose another --out")


def _recorded_names(directory: Path) -> set[str]:
    """The file names an existing artifact's manifest records (none if it cannot be read)."""
    import json

    try:
        raw = json.loads((directory / "manifest.json").read_bytes().decode("utf-8"))
        return set(raw.get("files") or {}) | set(raw.get("tokenizer_files") or [])
    except (OSError, ValueError, AttributeError, TypeError):
        return set()

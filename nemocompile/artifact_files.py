"""Sizes and SHA-256 digests of an artifact's files, recorded at export and checked at load.

The manifest's ``files`` maps each file name (relative to the artifact
directory) to ``{"size": bytes, "sha256": hex}``. Loading checks the sizes (a
``stat`` per file: a truncated, empty or missing file is caught before ONNX
Runtime or protobuf trip over it); ``nemocompile check`` also checks the
digests (reads every byte). Either names the damaged file and says to
re-export. Manifests written before the field existed record nothing: then
only the files the manifest names must exist and be non-empty.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterable

from .errors import NemocompileError


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


def check_files(directory: str | Path, manifest, hashes: bool = False) -> None:
    """Raise :class:`ArtifactDamagedError` naming the first damaged file (see :func:`damaged_files`)."""
    problems = damaged_files(directory, manifest, hashes)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ArtifactDamagedError(f"{problems[0]}{more}: the artifact is damaged; re-export it "
                                   f"(nemocompile export --out {directory} --force)")

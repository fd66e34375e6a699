"""The README's code blocks work as written: the Python API snippet runs, and every
`nemocompile ...` command line in a code block parses."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from tiny_artifacts import embedded

from nemocompile.cli import build_parser

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks(language: str | None = None) -> list[str]:
    fence = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
    return [body for lang, body in fence.findall(README.read_text()) if language is None or lang == language]


def test_the_python_snippet_runs_as_written(embedded_dir, tmp_path, monkeypatch, capsys, one_torch_thread):
    (snippet,) = _blocks("python")
    (tmp_path / "artifacts").mkdir()
    (tmp_path / "artifacts" / "tiny").symlink_to(embedded())  # what `nemocompile export --out artifacts/tiny` writes
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(snippet, str(README), "exec"), namespace)
    assert namespace["logits"].shape == (*namespace["input_ids"].shape, namespace["model"].config.vocab_size)
    assert capsys.readouterr().out.rstrip().endswith("True")  # the streamed ids decode to the result's text


def test_every_command_line_in_the_readme_parses():
    parser = build_parser()
    commands = []
    # fenced blocks, and inline spans that are whole command lines (not the table's synopses with [options])
    spans = [m for m in re.findall(r"`([^`\n]+)`", README.read_text()) if "[" not in m and "\\|" not in m]
    for block in [*_blocks(), *spans]:
        for line in block.splitlines():
            line = line.split("  #")[0].strip()
            for part in line.split("&&"):
                part = part.strip()
                if part.startswith("nemocompile "):
                    commands.append(shlex.split(part)[1:])
    assert len(commands) >= 8
    for argv in commands:
        try:
            parser.parse_args(argv)
        except SystemExit:
            pytest.fail(f"README command does not parse: nemocompile {' '.join(argv)}")

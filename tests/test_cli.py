"""The command line: real subprocesses, exit codes and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "nemocompile", *args], capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def test_info_on_a_checkpoint(tiny_checkpoint):
    out = json.loads(cli("info", "--model", str(tiny_checkpoint), "--json").stdout)
    assert out["config"]["num_hidden_layers"] == 2
    assert out["lora_parameters"] > 0
    text = cli("info", "--model", str(tiny_checkpoint)).stdout
    assert "parameters" in text and "drafter LoRA" in text and "per sequence of 512 tokens" in text


def test_bad_model_dir_is_one_line_error(tmp_path):
    proc = cli("info", "--model", str(tmp_path / "missing"), check=False)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr
    proc = cli("generate", "--model", str(tmp_path), "--prompt", "x", check=False)
    assert proc.returncode == 2 and "config.json: missing" in proc.stderr


@pytest.mark.parametrize("mode", ["ar", "diffusion", "linear-spec"])
def test_generate_on_embedded_model(embedded_dir, mode):
    out = json.loads(cli("generate", "--mode", mode, "--prompt", "def add(a, b):\n", "--max-new-tokens", "24",
                         "--json").stdout)
    assert 1 <= len(out["tokens"]) <= 24
    assert out["stats"]["forwards"] >= 1 and out["stats"]["tokens_per_forward"] > 0
    if mode == "linear-spec":
        assert out["stats"]["acceptance_length"] >= 1


def test_generate_chat_and_text_output(embedded_dir):
    proc = cli("generate", "--prompt", "Write a function.", "--chat", "--max-new-tokens", "8")
    assert "mode=ar" in proc.stderr.splitlines()[-1] and "mode=ar" not in proc.stdout  # stats on stderr
    # the embedded template ignores enable_thinking: --no-thinking renders the same chat
    quiet = cli("generate", "--prompt", "Write a function.", "--no-thinking", "--max-new-tokens", "8")
    assert quiet.stdout == proc.stdout
    bad = cli("generate", "--prompt", "x", "--threshold", "high", "--mode", "diffusion", check=False)
    assert bad.returncode == 2 and "threshold must be a number" in bad.stderr

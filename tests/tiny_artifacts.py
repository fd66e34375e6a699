"""Exported artifacts of tiny random models, built once per test session.

Tracing a graph takes seconds, so the export and parity tests share these
instead of exporting the same model in every test. Each builder returns
(model, artifact directory); the directories are removed at exit.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

from conftest import make_model

from nemocompile.graphs.export import export_artifact

_ROOT = Path(tempfile.mkdtemp(prefix="nemocompile-test-artifacts-"))
atexit.register(shutil.rmtree, _ROOT, True)

CAPACITY, BLOCK, PREFILL = 48, 8, 16


@functools.cache
def lora_batch2():
    """Every mode, batch 2, with a drafter LoRA."""
    model = make_model(lora_rank=4)
    out = _ROOT / "lora_batch2"
    export_artifact(model, out, modes="all", block_length=BLOCK, max_seq_len=CAPACITY, batch_size=2,
                    prefill_length=PREFILL)
    return model, out


@functools.cache
def plain_batch1():
    """Linear self-speculation only, batch 1, no LoRA (the draft graph runs the base weights);
    prefill chunks of one block, so prefill and verify are one traced graph."""
    model = make_model(seed=3)
    out = _ROOT / "plain_batch1"
    export_artifact(model, out, modes=["linear-spec"], block_length=BLOCK, max_seq_len=CAPACITY, batch_size=1,
                    prefill_length=BLOCK)
    return model, out


@functools.cache
def embedded():
    """The embedded tiny model, every mode (callers skip first if it is not built)."""
    out = _ROOT / "embedded"
    export_artifact(None, out, modes="all", max_seq_len=160, prefill_length=32)  # P = B: prefill traces once with commit
    return out


@functools.cache
def batch4():
    """Every mode, batch 4, with a drafter LoRA, room for long prompts: the engine's artifact."""
    model = make_model(lora_rank=4, seed=5)
    out = _ROOT / "batch4"
    export_artifact(model, out, modes="all", block_length=BLOCK, max_seq_len=96, batch_size=4,
                    prefill_length=PREFILL)
    return model, out

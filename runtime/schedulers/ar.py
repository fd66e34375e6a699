"""Autoregressive scheduler (spec 3.1): prefill, then one causal ``ar_step`` per token."""

from __future__ import annotations

import numpy as np


def decode_ar(d):
    token = d.sampler.sample(d.prefill())  # [B]
    while True:
        d.emit_rows(token)
        yield
        if d.all_done:  # no forward runs once the last token is known
            return
        token = ar_step(d, token)


def ar_step(d, token: np.ndarray) -> np.ndarray:
    """Run each row's last token causally (writes its cache row); the next token per row [B]."""
    io = d.io(1)
    io.input_ids[:, 0] = token
    d.run("ar_step", 1)
    d.cache.write(io.present_k, io.present_v)
    return d.sampler.sample(io.logits[:, 0])

"""Autoregressive scheduler (spec 3.1): prefill, then one causal ``ar_step`` per token."""

from __future__ import annotations

import numpy as np


def decode_ar(d):
    token = d.prefill_tokens()  # [B]
    while True:
        d.emit_rows(token)
        yield
        if d.all_done:  # no forward runs once the last token is known
            return
        token = ar_step(d, token)


def ar_step(d, token: np.ndarray) -> np.ndarray:
    """Run each row's last token causally (writes its cache row); the next token per row [B]."""
    d.io("ar_step", 1).input_ids[:, 0] = token
    io = d.run("ar_step", 1)
    d.cache.write(io.present_k, io.present_v)
    return d.choose(io, 0)

"""Autoregressive scheduler (spec 3.1): prefill, then one causal ``ar_step`` per token."""

from __future__ import annotations

from ..row import Forward


def decode_ar(row):
    token = yield from row.prefill_token()
    while True:
        token = row.budgeted([token])[0]  # the next step runs the token that was emitted
        row.emit((token,))
        if row.done:  # no forward runs once the last token is known
            return
        token = yield from ar_step(row, token)
        row.cycle("ar")


def ar_step(row, token: int):
    """Run the row's last token causally (writes its cache slot); the next token."""
    io = yield Forward("ar_step", 1, (token,), write=1)
    return row.choose(io, 0)

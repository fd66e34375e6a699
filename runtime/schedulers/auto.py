"""mode="auto": per cycle, the lossless mode the engine's policy expects to be fastest.

Every lossless mode leaves a row in the same state after a cycle: the cache holds
everything before the pending token ``p`` (emitted, not yet cached). So a row can
change mode at any cycle boundary and, at temperature 0, still emits exactly the
AR greedy text. The first prompt runs through the plain prefill graph; a
quadratic cycle entered from another mode starts from the draft ``[p, MASK...]``
(its fused step accepts nothing but drafts the next block), and leaving
quadratic-spec drops the pending draft. The policy (``runtime/policy.py``) sees
each row's acceptance so far and the step costs measured for the artifact; the
row's ``stats.mode_mix`` counts the cycles of each mode and ``auto_reason`` says
why the last one was chosen.
"""

from __future__ import annotations

from .ar import ar_step
from .linear_spec import linear_cycle
from .quadratic_spec import quadratic_cycle


def decode_auto(row):
    p = row.budgeted([(yield from row.prefill_token())])[0]
    row.emit((p,))
    draft = None  # quadratic-spec's next draft, while the previous cycle was quadratic
    while not row.done:
        mode, L = row.rt.engine.choose_mode(row)
        if mode == "ar":
            new = row.budgeted([(yield from ar_step(row, p))])
            row.cycle("ar")
        elif mode == "linear-spec":
            new = yield from linear_cycle(row, p, L, 0.0)
        else:
            if draft is None or len(draft) != L:
                draft = [p] + [row.mask_token_id] * (L - 1)
            new, draft = yield from quadratic_cycle(row, draft, L)
        if mode != "quadratic-spec":
            draft = None
        if row.acceptance is not None:
            row.acceptance.add(mode, L, len(new))
        row.emit(new)
        p = new[-1]

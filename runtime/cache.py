"""The runtime's KV cache: one static-capacity buffer per artifact, one length per row,
rollback by moving a length."""

from __future__ import annotations

import numpy as np

from nemocompile.errors import GenerationError


class KVCache:
    """Keys and values of the committed tokens, allocated once per :class:`Runtime`.

    Layout: ``data`` is ``[2, layers, B, kv_heads, C, head_dim]``; ``k = data[0]``
    and ``v = data[1]`` are the graphs' ``cache_k`` / ``cache_v`` inputs
    (``[layers, B, kv_heads, C, head_dim]``, contiguous views bound once to every
    graph). ``C`` is the manifest's ``cache_capacity``: memory only. A forward
    reads just its own rows' slots below their longest ``cache_len`` (the graphs
    gather them: graphs/steps.py ``read_cache``), so its cost follows the rows in
    flight and their lengths.

    Every row ``b`` is its own sequence (a request of a continuous batch): slots
    ``[row_start[b], cache_len[b])`` are valid, and the graphs mask every slot at
    or past ``cache_len[b]``, so stale rows from an earlier request are never read
    and nothing is ever cleared. A row's tokens start at ``row_start[b]`` (left
    padding, 0 unless a prompt is padded to a full chunk).

    ``cache_len`` ([B] int64) and ``row_start`` ([B] int64) are host arrays per
    cache row; a forward passes its own rows' entries to the graph.

    API: ``write`` places a step's present rows at each row's length (a slice
    assignment of n slots per row, never a whole-cache copy), ``crop`` rolls a
    row back by moving its length, ``reset_row`` starts a new request in a row
    (with slots it already holds: the prefix cache), ``copy`` puts one row's slots
    into another (or shifts them in a row), ``reset`` empties every row.

    ``data`` is a numpy array on the CPU, or a torch tensor on an accelerator
    (both support the slice assignment ``write`` does).
    """

    def __init__(self, data, batch_size: int):
        self.data = data  # [2, layers, B, kv_heads, C, head_dim]
        self.k, self.v = data[0], data[1]
        self.capacity = int(data.shape[4])
        self.cache_len = np.zeros(batch_size, dtype=np.int64)  # graph input [B]: committed slots per row
        self.row_start = np.zeros(batch_size, dtype=np.int64)  # graph input [B]

    def length(self, row: int) -> int:
        return int(self.cache_len[row])

    def write(self, present_k, present_v, n: int | None = None, rows=None) -> None:
        """Place the first ``n`` (default: all S) present slots of a forward's entries
        (``present_k`` ``[b, layers, kv_heads, S, head_dim]``, entry j for cache row ``rows[j]``;
        default: entry j is row j) at each row's slots ``length .. length+n-1``."""
        S = present_k.shape[3]
        n = S if n is None else n
        rows = range(len(self.cache_len)) if rows is None else rows
        for j, b in enumerate(rows):
            start = int(self.cache_len[b])
            end = start + n
            if end > self.capacity:
                # The runtime checks capacity before a request starts; reaching this is a bug.
                raise GenerationError(f"KV cache full: row {b} at {start} + {n} slots exceeds its capacity of "
                                      f"{self.capacity}")
            self.k[:, b, :, start:end] = present_k[j, :, :, :n]
            self.v[:, b, :, start:end] = present_v[j, :, :, :n]
            self.cache_len[b] = end

    def crop(self, row: int, length: int) -> None:
        """Roll row ``row`` back to ``length`` committed slots: O(1), nothing is copied."""
        if not 0 <= length <= self.cache_len[row]:
            raise ValueError(f"cannot crop row {row} of length {int(self.cache_len[row])} to {length}")
        self.cache_len[row] = length

    def reset_row(self, row: int, row_start: int = 0, length: int = 0) -> None:
        """Start a new request in one row, its tokens from slot ``row_start``; ``length`` > 0
        keeps slots ``row_start .. length-1`` as committed (a reused prefix they already hold)."""
        if length and not row_start <= length <= self.capacity:
            raise ValueError(f"cannot keep {length} slots of row {row} from slot {row_start}")
        self.cache_len[row] = length
        self.row_start[row] = row_start

    def copy(self, src: int, dst: int, n: int, src_start: int = 0, dst_start: int = 0) -> None:
        """Copy ``n`` slots of row ``src`` from ``src_start`` into row ``dst`` at ``dst_start``
        (lengths unchanged). A key's value depends on its position (slot - row_start), not
        its slot, so slots move between rows or within one as long as they keep their position."""
        if n <= 0:
            return
        for buf in (self.k, self.v):
            piece = buf[:, src, :, src_start:src_start + n]
            if src == dst:  # overlapping ranges of one row: read before writing
                piece = piece.clone() if hasattr(piece, "clone") else piece.copy()
            buf[:, dst, :, dst_start:dst_start + n] = piece

    def reset(self, row_start=None, length: int = 0) -> None:
        """Empty every row; ``row_start`` [B] sets the rows' left padding. ``length`` > 0 treats
        that many slots of every row as committed, whatever they hold (timing a step)."""
        if not 0 <= length <= self.capacity:
            raise ValueError(f"cannot reset a cache of capacity {self.capacity} to length {length}")
        self.cache_len[:] = length
        self.row_start[:] = 0 if row_start is None else row_start

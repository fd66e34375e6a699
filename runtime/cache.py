"""The runtime's KV cache: one static-capacity buffer per artifact, rollback by moving a length."""

from __future__ import annotations

import numpy as np

from nemocompile.errors import GenerationError


class KVCache:
    """Keys and values of the committed tokens, allocated once per :class:`Runtime`.

    Layout: ``data`` is ``[2, layers, B, kv_heads, C, head_dim]``; ``k = data[0]``
    and ``v = data[1]`` are the graphs' ``cache_k`` / ``cache_v`` inputs
    (``[layers, B, kv_heads, C, head_dim]``, contiguous views bound once to every
    graph). ``C`` is the manifest's ``cache_capacity``. Slots ``[0, length)`` are
    valid; the graphs mask every slot at or past ``cache_len``, so stale rows
    from an earlier request are never read and nothing is ever cleared.

    ``cache_len`` ([] int64) and ``row_start`` ([B] int64) are the graph inputs
    of the same names, host arrays updated in place. Row ``b`` of a left-padded
    batch holds real tokens from slot ``row_start[b]`` on.

    API: ``write`` places a step's present rows at ``length`` (a slice
    assignment of L rows, never a whole-cache copy), ``crop`` rolls back by
    moving ``length``, ``reset`` starts a new request.

    ``data`` is a numpy array on the CPU, or a torch tensor on an accelerator
    (both support the slice assignment ``write`` does).
    """

    def __init__(self, data, batch_size: int):
        self.data = data  # [2, layers, B, kv_heads, C, head_dim]
        self.k, self.v = data[0], data[1]
        self.capacity = int(data.shape[4])
        self.cache_len = np.zeros((), dtype=np.int64)  # graph input: committed slots
        self.row_start = np.zeros(batch_size, dtype=np.int64)  # graph input [B]
        self._length = 0

    @property
    def length(self) -> int:
        return self._length

    def __len__(self) -> int:
        return self._length

    def _set_length(self, n: int) -> None:
        self._length = n
        self.cache_len[()] = n

    def write(self, present_k, present_v, n: int | None = None) -> None:
        """Place the first ``n`` (default: all L) rows of a step's presents
        ``[layers, B, kv_heads, L, head_dim]`` at slots ``length .. length+n-1``."""
        if n is None:
            n = present_k.shape[3]
        start, end = self._length, self._length + n
        if end > self.capacity:
            # The runtime checks capacity before a request starts; reaching this is a bug.
            raise GenerationError(f"KV cache full: {start} + {n} slots exceed its capacity of {self.capacity}")
        if n == present_k.shape[3]:
            self.k[:, :, :, start:end] = present_k
            self.v[:, :, :, start:end] = present_v
        else:
            self.k[:, :, :, start:end] = present_k[:, :, :, :n]
            self.v[:, :, :, start:end] = present_v[:, :, :, :n]
        self._set_length(end)

    def crop(self, length: int) -> None:
        """Roll back to ``length`` committed slots: O(1), nothing is copied."""
        if not 0 <= length <= self._length:
            raise ValueError(f"cannot crop a cache of length {self._length} to {length}")
        self._set_length(length)

    def reset(self, row_start=None, length: int = 0) -> None:
        """Empty the cache for a new request; ``row_start`` [B] sets the rows' left padding.
        ``length`` > 0 treats that many slots as committed, whatever they hold (timing a step)."""
        if not 0 <= length <= self.capacity:
            raise ValueError(f"cannot reset a cache of capacity {self.capacity} to length {length}")
        self._set_length(length)
        self.row_start[:] = 0 if row_start is None else row_start

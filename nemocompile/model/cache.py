"""The eager KV cache: one preallocated buffer, rollback by moving a length."""

from __future__ import annotations

import torch

from nemocompile.model.config import ModelConfig
from ..errors import GenerationError


class KVCache:
    """Keys and values of the committed tokens.

    Layout: ``data`` is ``[layers, 2, B, kv_heads, max_len, head_dim]`` (index 0
    of dim 1 holds keys, 1 values). Slots ``[0, length)`` are valid for every
    row; all rows share ``length``. Batched prompts are left padded: row ``b``'s
    real tokens start at slot ``row_start[b]`` and its position ids count from
    there (slot ``s`` has position ``s - row_start[b]``), so padding never
    shifts a row's positions.

    API: ``write`` appends a block's rows, ``crop`` rolls back (O(1): it only
    moves ``length``), ``reset`` empties it.
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        self.max_len = max_len
        self.data = torch.zeros(
            config.num_hidden_layers, 2, batch_size, config.num_key_value_heads, max_len, config.head_dim,
            dtype=dtype, device=device,
        )
        self.length = 0
        self.row_start = torch.zeros(batch_size, dtype=torch.long, device=device)  # [B]

    @property
    def batch_size(self) -> int:
        return self.data.shape[2]

    def __len__(self) -> int:
        return self.length

    def keys(self) -> torch.Tensor:
        """Valid keys, a view: [layers, B, kv_heads, length, head_dim]."""
        return self.data[:, 0, :, :, : self.length]

    def values(self) -> torch.Tensor:
        """Valid values, a view: [layers, B, kv_heads, length, head_dim]."""
        return self.data[:, 1, :, :, : self.length]

    def write(self, new_k: torch.Tensor, new_v: torch.Tensor) -> None:
        """Append a block's keys/values ([layers, B, kv_heads, L, head_dim]) at ``length``."""
        n = new_k.shape[3]
        if self.length + n > self.max_len:
            raise GenerationError(
                f"KV cache full: {self.length} + {n} tokens exceed its capacity of {self.max_len}; "
                "use a shorter prompt or fewer new tokens, or a larger max length"
            )
        self.data[:, 0, :, :, self.length : self.length + n] = new_k
        self.data[:, 1, :, :, self.length : self.length + n] = new_v
        self.length += n

    def crop(self, length: int) -> None:
        """Roll back to ``length`` committed slots (drops everything after)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot crop a cache of length {self.length} to {length}")
        self.length = length

    def reset(self) -> None:
        self.length = 0
        self.row_start.zero_()

"""Token layouts: which tokens one forward processes, where they sit, who sees whom.

Every forward the model runs, eager or exported, is one :class:`Layout`:

- the **spine**: ``spine`` tokens taken from the front of ``input_ids``, at
  positions ``cache_len + 0 .. cache_len + spine - 1``. Spine token ``i`` sees
  spine tokens ``0..i`` (causal). Spine tokens are the ones written to the KV
  cache (prefill, AR step, commit, verify).
- **branches**: runs of tokens that see the spine up to an ``anchor`` and every
  token of their own branch (bidirectional), and write nothing. A branch's
  tokens come from ``input_ids`` (after the spine, in branch order) or are
  MASK tokens made inside the graph; the drafter LoRA can be on per branch.

Every token also sees every committed cache slot of its row. The attention rule
is computed from this static description and ``cache_len`` (never a host-built
mask). Token order in a forward: the spine, then each branch in turn.

    prefill / ar_step / commit / verify   spine L
    denoise / draft                       one branch of L input tokens, anchor -1 (sees only the cache)
    quadratic fused step (spec 3.4)       spine B (the draft), branch j of B masks anchored at spine j
    fused prefill + first draft           spine P (the prompt), one branch of B masks anchored at P-1
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Branch:
    length: int  # tokens in the branch
    offset: int  # position of its first token, relative to cache_len
    anchor: int  # sees spine tokens 0..anchor (-1: none, only the cache)
    source: str = "input"  # "input": the next tokens of input_ids; "mask": MASK tokens made in the graph
    lora: bool = False  # drafter adapter on for these rows


@dataclass(frozen=True)
class Layout:
    spine: int = 0  # causal tokens from the front of input_ids, written to the cache
    branches: tuple[Branch, ...] = ()

    def __post_init__(self):
        if self.spine < 0 or not (self.spine or self.branches):
            raise ValueError("a layout needs a spine or at least one branch")
        for b in self.branches:
            if b.length < 1 or b.source not in ("input", "mask") or not -1 <= b.anchor < self.spine:
                raise ValueError(f"bad branch {b} for a spine of {self.spine}")

    # ---- constructors of the basic steps -------------------------------------
    @classmethod
    def causal(cls, length: int) -> "Layout":
        return cls(spine=length)

    @classmethod
    def bidirectional(cls, length: int, lora: bool = False, source: str = "input") -> "Layout":
        return cls(branches=(Branch(length, 0, -1, source, lora),))

    # ---- derived facts -------------------------------------------------------
    @property
    def tokens(self) -> int:
        """T: tokens in the forward."""
        return self.spine + sum(b.length for b in self.branches)

    @property
    def input_length(self) -> int:
        """Tokens read from input_ids: the spine and the input branches."""
        return self.spine + sum(b.length for b in self.branches if b.source == "input")

    @property
    def writes_cache(self) -> bool:
        return self.spine > 0

    @property
    def lora(self) -> str:
        """"none", "all" (every token) or "branches" (some rows)."""
        rows = [b.lora for b in self.branches]
        if not any(rows):
            return "none"
        return "all" if all(rows) and self.spine == 0 else "branches"

    @property
    def pattern(self) -> str:
        """A name for the attention pattern: causal, bidirectional, or fused (both)."""
        if not self.branches:
            return "causal"
        if self.spine == 0 and len(self.branches) == 1:
            return "bidirectional"
        return "fused"

    def branch_starts(self) -> list[int]:
        """Index of each branch's first token in the forward."""
        starts, i = [], self.spine
        for b in self.branches:
            starts.append(i)
            i += b.length
        return starts

    # ---- what the forward computes from it -------------------------------------
    def offsets(self) -> list[int]:
        """Each token's position relative to cache_len [T]."""
        out = list(range(self.spine))
        for b in self.branches:
            out += range(b.offset, b.offset + b.length)
        return out

    def groups(self) -> tuple[list[int], list[int]]:
        """Per token: its branch index (-1 on the spine) and the last spine index it sees.
        The attention rule is these two vectors: query q sees key k when k is on the spine
        and k <= reach[q], or when both are in the same branch."""
        group, reach = [-1] * self.spine, list(range(self.spine))
        for n, b in enumerate(self.branches):
            group += [n] * b.length
            reach += [b.anchor] * b.length
        return group, reach

    def allowed(self) -> list[list[bool]]:
        """[T(query)][T(key)]: the attention rule among the forward's own tokens, spelled out."""
        group, reach = self.groups()
        T = self.tokens
        return [[(group[k] < 0 and k <= reach[q]) or (group[q] >= 0 and group[k] == group[q]) for k in range(T)]
                for q in range(T)]

    def lora_rows(self) -> list[bool]:
        """[T]: tokens whose attention output gets the drafter delta."""
        out = [False] * self.spine
        for b in self.branches:
            out += [b.lora] * b.length
        return out

    def to_dict(self) -> dict:
        return {"spine": self.spine, "branches": [vars(b) for b in self.branches]}

    @classmethod
    def from_dict(cls, raw: dict) -> "Layout":
        return cls(int(raw["spine"]), tuple(Branch(**b) for b in raw.get("branches", ())))

    def describe(self) -> str:
        parts = [f"spine {self.spine}"] if self.spine else []
        if self.branches:
            b0 = self.branches[0]
            same = all((b.length, b.source, b.lora) == (b0.length, b0.source, b0.lora) for b in self.branches)
            what = f"{b0.length} {b0.source}{' +LoRA' if b0.lora else ''}"
            parts.append(f"{len(self.branches)} x branch[{what}]" if same else f"{len(self.branches)} branches")
        return ", ".join(parts)


def full_input(layout: Layout, input_ids: torch.Tensor, mask_token_id: int) -> torch.Tensor:
    """The forward's T token ids [B, T] from ``input_ids`` [B, input_length]: the spine,
    then each branch from the next input tokens or as MASK tokens."""
    B = input_ids.shape[0]
    parts, i = [input_ids[:, :layout.spine]], layout.spine
    for b in layout.branches:
        if b.source == "input":
            parts.append(input_ids[:, i:i + b.length])
            i += b.length
        else:
            parts.append(torch.full((B, b.length), mask_token_id, dtype=input_ids.dtype, device=input_ids.device))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

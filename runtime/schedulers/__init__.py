"""One scheduler per decode mode; each is a generator over one :class:`~..row.Row` that
yields the :class:`~..row.Forward` it needs next and receives that graph's outputs
(the engine runs each graph once for every row that needs it)."""

from __future__ import annotations

from .ar import decode_ar
from .auto import decode_auto
from .diffusion import decode_diffusion
from .linear_spec import decode_linear_spec
from .quadratic_spec import decode_quadratic_spec

SCHEDULERS = {"ar": decode_ar, "diffusion": decode_diffusion, "linear-spec": decode_linear_spec,
              "quadratic-spec": decode_quadratic_spec, "auto": decode_auto}

__all__ = ["SCHEDULERS", "decode_ar", "decode_auto", "decode_diffusion", "decode_quadratic_spec", "decode_linear_spec"]

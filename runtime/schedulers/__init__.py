"""One scheduler per decode mode; each is a generator over a :class:`~..runtime.Decode`
that yields after every commit (so a caller can stream the emitted tokens)."""

from __future__ import annotations

from .ar import decode_ar
from .diffusion import decode_diffusion
from .linear_spec import decode_linear_spec
from .quadratic_spec import decode_quadratic_spec

SCHEDULERS = {"ar": decode_ar, "diffusion": decode_diffusion, "linear-spec": decode_linear_spec,
              "quadratic-spec": decode_quadratic_spec}

__all__ = ["SCHEDULERS", "decode_ar", "decode_diffusion", "decode_quadratic_spec", "decode_linear_spec"]

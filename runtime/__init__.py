"""The runtime: compiled graphs scheduled for every decode mode (see ``runtime.py``)."""

from .runtime import Decode, Request, Runtime, RuntimeResult, TokenStream
from .stats import RuntimeStats

__all__ = ["Decode", "Request", "Runtime", "RuntimeResult", "RuntimeStats", "TokenStream"]

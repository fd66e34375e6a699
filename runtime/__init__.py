"""The runtime: compiled graphs scheduled for every decode mode (see ``runtime.py``)."""

from .job import Cancelled, Job, Overloaded, RequestTimeout, ServerError
from .runtime import Request, Runtime, RuntimeResult, TokenStream
from .stats import RuntimeStats

__all__ = ["Cancelled", "Job", "Overloaded", "Request", "RequestTimeout", "Runtime", "RuntimeResult", "RuntimeStats",
           "ServerError", "TokenStream"]

from .cache import KVCache
from .modeling import PATTERNS, TriModeModel

__all__ = ["KVCache", "PATTERNS", "TriModeModel"]

"""nemocompile: static decode graphs, passes and a runtime for tri-mode language models."""

from .config import ModelConfig, RopeConfig
from .decode import GenerationResult, GenerationStats, generate
from .errors import NemocompileError
from .loader import embedded_model_dir, load
from .model import KVCache, TriModeModel

__version__ = "0.1.0"

__all__ = [
    "GenerationResult", "GenerationStats", "KVCache", "ModelConfig", "NemocompileError", "RopeConfig",
    "TriModeModel", "embedded_model_dir", "generate", "load",
]

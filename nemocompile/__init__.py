"""nemocompile: static decode graphs, passes and a runtime for tri-mode language models."""

# The public names are imported on first use (PEP 562): `nemocompile.cli` must start without
# importing torch, so that a Ctrl-C or a usage error in the first second is handled by the CLI
# (one line) instead of landing in the middle of torch's import.
import importlib

__version__ = "0.1.0"

_PUBLIC = {
    "ModelConfig": "model.config", "RopeConfig": "model.config", "GenerationResult": "decode", "GenerationStats": "decode",
    "generate": "decode", "NemocompileError": "errors", "embedded_model_dir": "model.loader", "load": "model.loader",
    "KVCache": "model", "TriModeModel": "model",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted({*globals(), *_PUBLIC})

"""Invariant on the saved file: the ONNX checker and strict shape inference pass."""

from __future__ import annotations

from pathlib import Path

import onnx

from .base import PassError


def check_onnx(path: str | Path) -> None:
    """Raises PassError unless ``path`` (with its external data beside it) is a
    valid model whose every value gets a shape from strict ONNX shape inference."""
    try:
        # by path, so external data is checked where it lies and never loaded
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise PassError(f"{path}: the ONNX checker rejects the graph: {e}") from None

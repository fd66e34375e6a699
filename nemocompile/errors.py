"""Errors users see. Each message says what is wrong and what to do next."""


class NemocompileError(Exception):
    """Base class: the CLI prints these as one line, without a traceback."""


class CheckpointError(NemocompileError):
    """A checkpoint directory is missing files or holds inconsistent data."""


class GenerationError(NemocompileError):
    """Bad generation arguments (mode, lengths, capacity)."""


class BackendUnavailableError(NemocompileError):
    """A backend (TensorRT, a GPU provider) cannot run on this machine."""

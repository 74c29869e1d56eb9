"""Exceptions raised by lifelong-engine (besides ValueError/TypeError for bad arguments)."""

__all__ = ["LifelongError", "BackendUnavailableError"]


class LifelongError(Exception):
    """Base class of the engine's own errors."""


class BackendUnavailableError(LifelongError, RuntimeError):
    """An explicitly requested op backend cannot run the given inputs here; the message says why."""

"""Exceptions raised by lifelong-engine (besides ValueError/TypeError for bad arguments)."""

__all__ = ["LifelongError", "BackendUnavailableError", "ConceptStoreError", "ConceptNotFoundError"]


class LifelongError(Exception):
    """Base class of the engine's own errors."""


class BackendUnavailableError(LifelongError, RuntimeError):
    """An explicitly requested op backend cannot run the given inputs here; the message says why."""


class ConceptStoreError(LifelongError):
    """A concept in a ConceptStore cannot be read or written; the message names it and says why."""


class ConceptNotFoundError(ConceptStoreError, KeyError):
    """No concept with that name (namespace, version) is in the store."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class EngineClosedError(LifelongError, RuntimeError):
    """The serving engine is closed (or closing) and takes no more requests."""


class EngineBusyError(LifelongError, RuntimeError):
    """The serving engine's queue stayed full for the whole submit timeout."""

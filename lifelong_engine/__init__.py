"""lifelong-engine: lifelong customization of text-to-image diffusion models with fused kernels.

Importing the package registers the fused ops as ``torch.ops.lifelong.<name>``
(see :mod:`lifelong_engine.ops`). Names that need diffusers (``LifelongPipeline``) are
imported on first use, so ``import lifelong_engine`` stays light.
"""

import importlib

from . import ops
from .concepts import ConceptAdapter
from .errors import BackendUnavailableError, ConceptNotFoundError, ConceptStoreError, LifelongError
from .store import ConceptStore

__version__ = "0.1.0"

_LAZY = {"LifelongPipeline": "pipeline", "LifelongPipelineOutput": "pipeline", "AttentionGuidance": "guidance"}

__all__ = [
    "ops",
    "ConceptAdapter",
    "ConceptStore",
    "LifelongPipeline",
    "LifelongPipelineOutput",
    "AttentionGuidance",
    "BackendUnavailableError",
    "ConceptNotFoundError",
    "ConceptStoreError",
    "LifelongError",
    "__version__",
]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

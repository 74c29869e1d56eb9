"""lifelong-engine: lifelong customization of text-to-image diffusion models with fused kernels.

Importing the package registers the fused ops as ``torch.ops.lifelong.<name>``
(see :mod:`lifelong_engine.ops`).
"""

from . import ops
from .errors import BackendUnavailableError, LifelongError

__version__ = "0.1.0"

__all__ = ["ops", "BackendUnavailableError", "LifelongError", "__version__"]

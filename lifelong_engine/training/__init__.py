"""Lifelong training: losses and regularisers of the continual methods (DESIGN §4)."""

from . import losses

__all__ = ["losses"]

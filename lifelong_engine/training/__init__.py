"""Lifelong training (DESIGN §4): the ContinualTrainer, its losses, L2DM's rainbow memory and Custom
Diffusion's closed-form composition of concepts."""

from . import losses, methods
from .memory import MemorySample, RainbowMemory
from .merge import compose_concepts
from .trainer import METHODS, ContinualTrainer, TrainingError, TrainingStats

__all__ = [
    "losses",
    "methods",
    "ContinualTrainer",
    "TrainingStats",
    "TrainingError",
    "METHODS",
    "RainbowMemory",
    "MemorySample",
    "compose_concepts",
]

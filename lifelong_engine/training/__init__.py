"""Lifelong training (DESIGN §4): the ContinualTrainer, its losses and L2DM's rainbow memory."""

from . import losses
from .memory import MemorySample, RainbowMemory
from .trainer import METHODS, ContinualTrainer, TrainingError, TrainingStats

__all__ = ["losses", "ContinualTrainer", "TrainingStats", "TrainingError", "METHODS", "RainbowMemory", "MemorySample"]

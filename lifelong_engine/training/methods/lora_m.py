"""lora-m: a separate LoRA per task, merged by plain sum at inference (LoRA-M)."""

from __future__ import annotations

import dataclasses

from .base import Method, MethodConfig


@dataclasses.dataclass
class LoraMConfig(MethodConfig):
    """No hyperparameters."""


class LoraM(Method):
    name = "lora-m"
    Config = LoraMConfig


METHOD = LoraM

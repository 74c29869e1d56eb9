"""finetune: one LoRA trained task after task, nothing against forgetting (the lower bound)."""

from __future__ import annotations

import dataclasses

from .base import Method, MethodConfig


@dataclasses.dataclass
class FinetuneConfig(MethodConfig):
    """No hyperparameters."""


class Finetune(Method):
    name = "finetune"
    Config = FinetuneConfig
    shares_lora = True


METHOD = Finetune

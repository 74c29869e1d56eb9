"""lwf: learning without forgetting on the shared LoRA, λ·‖ε_θ − ε_θ_prev‖² on the task's own inputs
(θ_prev: the shared LoRA before this task, frozen)."""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from .. import losses
from .base import Batch, Method, MethodConfig, TaskState


@dataclasses.dataclass
class LwFConfig(MethodConfig):
    """lam: weight λ of the distillation."""

    lam: float = 1.0


class LwF(Method):
    name = "lwf"
    Config = LwFConfig
    shares_lora = True
    keeps_teacher = True

    def regulariser(self, task, state: TaskState, batch: Batch, gen) -> Tensor | None:
        if state.teacher is None:
            return None
        with torch.no_grad():
            old = self.trainer.predict(state, task, batch.captions, batch.noisy, batch.t, teacher=True)
        return self.config.lam * losses.distillation_loss(batch.pred, old)


METHOD = LwF

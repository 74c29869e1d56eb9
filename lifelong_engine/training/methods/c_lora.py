"""c-lora (Smith et al., C-LoRA): past LoRAs summed in the forward, W_t = W_init + Σ_{t'<t} ΔW_t' + ΔW_t,
and the self-regularisation λ·‖(Σ_{t'<t} ΔW_t') ⊙ ΔW_t‖² on every K and V."""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from .. import losses
from .base import KV, Batch, Method, MethodConfig, TaskState


@dataclasses.dataclass
class CLoraConfig(MethodConfig):
    """lam: weight λ of the forgetting penalty (untuned default)."""

    lam: float = 1.0


class CLora(Method):
    name = "c-lora"
    Config = CLoraConfig
    sums_past = True

    def init_task(self, task, state: TaskState, gen: torch.Generator) -> None:
        # Σ_past ΔW of every K and V, fixed for the whole task
        kv = [key for key in self.trainer.widths if key[1] in KV]
        self.prev_delta = {key: sum(c.delta(*key).float() for c in state.past) for key in kv} if state.past else {}

    def regulariser(self, task, state: TaskState, batch: Batch, gen) -> Tensor | None:
        if not state.past:
            return None
        reg = batch.pred.new_zeros(())
        for layer in self.trainer.pipeline.layers:
            for proj in KV:
                a, b = self.forward_factors(state.params, layer, proj)
                reg = reg + losses.c_lora_forget_loss(self.prev_delta[layer, proj], b @ a)
        return self.config.lam * reg


METHOD = CLora

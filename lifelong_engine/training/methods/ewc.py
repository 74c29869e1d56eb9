"""ewc: elastic weight consolidation on the shared LoRA, λ·Σ F ⊙ (θ − θ*)² with F the diagonal Fisher
of the past tasks (summed) and θ* the weights after the previous task."""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from .. import losses
from .base import Batch, Method, MethodConfig, TaskState


@dataclasses.dataclass
class EWCConfig(MethodConfig):
    """lam: weight λ of the penalty; fisher_batches: batches the Fisher of a task is estimated on."""

    lam: float = 100.0
    fisher_batches: int = 4


class EWC(Method):
    name = "ewc"
    Config = EWCConfig
    shares_lora = True

    def __init__(self, config, trainer):
        super().__init__(config, trainer)
        self.fisher: dict[str, Tensor] = {}
        self.anchors: dict[str, Tensor] = {}

    def regulariser(self, task, state: TaskState, batch: Batch, gen) -> Tensor | None:
        if not self.fisher:
            return None
        live = {k: v for k, v in state.params.items() if k in self.fisher}
        return self.config.lam * losses.ewc_penalty(live, self.anchors, self.fisher)

    def finish(self, task, state: TaskState, adapter):
        """Diagonal Fisher of this task (squared gradients of the diffusion loss), summed into the past ones."""
        tr = self.trainer
        params = {k: v for k, v in state.params.items() if k != "tokens"}
        gen = torch.Generator().manual_seed(0)
        fisher: dict[str, Tensor] = {}
        for i in range(self.config.fisher_batches):
            idx = torch.randint(0, len(task.captions), (tr.batch_size,), generator=gen)
            noisy, t, target = tr.noised(tr.sample_latents(task, idx, gen), gen)
            pred = tr.predict(state, task, [task.captions[j] for j in idx], noisy, t)
            grads = torch.autograd.grad(losses.diffusion_loss(pred, target), list(params.values()))
            fisher = losses.update_fisher(fisher, dict(zip(params, grads)), i + 1)
        for k, f in fisher.items():
            self.fisher[k] = self.fisher.get(k, torch.zeros_like(f)) + f
        self.anchors = {k: v.detach().clone() for k, v in params.items()}
        return adapter

    def state_dict(self) -> dict:
        return {"fisher": self.fisher, "anchors": self.anchors}

    def load_state_dict(self, state: dict) -> None:
        self.fisher, self.anchors = state["fisher"], state["anchors"]


METHOD = EWC

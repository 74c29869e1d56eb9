"""l2dm (L2DM, "Create your world"): on the shared LoRA, replay of images generated for past concepts
chosen by the rainbow memory, μ-weighted (task-aware memory enhancement), plus elastic concept
distillation: the previous model's noise predictions on the replayed past-concept prompts, each
weighted by that concept's similarity to the new one."""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from .. import losses
from ..memory import MemorySample, RainbowMemory
from .base import Batch, Method, MethodConfig, TaskState, rehearsal_captions


@dataclasses.dataclass
class L2DMConfig(MethodConfig):
    """replay_weight: μ of the replay loss; replay_per_concept: memory slots per past concept
    (twice as many candidates are generated); distill_weight: weight of the distillation."""

    replay_weight: float = 0.5
    replay_per_concept: int = 2
    distill_weight: float = 0.5


class L2DM(Method):
    name = "l2dm"
    Config = L2DMConfig
    shares_lora = True
    keeps_teacher = True

    def __init__(self, config, trainer):
        super().__init__(config, trainer)
        self.memory = RainbowMemory(capacity_per_concept=config.replay_per_concept)

    def init_task(self, task, state: TaskState, gen: torch.Generator) -> None:
        """Generate candidates of every past concept with the current model, propose, consolidate."""
        self.similarity = None
        if not state.past:
            return
        for concept in state.past:
            captions = rehearsal_captions(concept, 2 * self.config.replay_per_concept)  # as it was taught
            latents = self.trainer.generate_latents(captions, 1, gen)
            self.memory.propose(
                concept.name,
                [MemorySample(concept.name, z.cpu(), c, z.flatten().float().cpu()) for z, c in zip(latents, captions)],
            )
        self.memory.consolidate()

    def regulariser(self, task, state: TaskState, batch: Batch, gen) -> Tensor | None:
        if not len(self.memory):
            return None
        tr = self.trainer
        samples = self.memory.replay_batch(tr.batch_size, gen)
        latents = torch.stack([s.image for s in samples]).to(batch.pred.device)
        caps = [s.caption for s in samples]
        r_noisy, r_t, r_target = tr.noised(latents, gen)
        r_pred = tr.predict(state, task, caps, r_noisy, r_t)
        reg = self.config.replay_weight * losses.diffusion_loss(r_pred, r_target)
        if state.teacher is not None:
            with torch.no_grad():
                old = tr.predict(state, task, caps, r_noisy, r_t, teacher=True)
            if self.similarity is None:
                self.similarity = self.memory.concept_similarity(task.latents_mean.flatten(1).mean(0))
            w = torch.tensor([self.similarity.get(s.concept, 0.0) for s in samples], device=batch.pred.device)
            reg = reg + self.config.distill_weight * losses.distillation_loss(r_pred, old, w)
        return reg

    def state_dict(self) -> dict:
        return {"memory": self.memory.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.memory.load_state_dict(*state["memory"])


METHOD = L2DM

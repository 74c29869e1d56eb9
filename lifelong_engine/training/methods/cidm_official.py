"""cidm-official: CIDM as its released code does it (github.com/JiahuaDong/CIFC @ 9819aa8), which differs
from the paper (the ``cidm`` method):

- LoRA on ``to_q``, ``to_k``, ``to_v`` and ``to_out.0`` of every attn2 layer (trained at strength 1.0),
  and layer-wise concept tokens as in the paper;
- consolidation = ``orth_weight``·mean_{i<g, l} mean|B_g^l·(B_i^l)ᵀ| + ``enhancement_weight``·mean_l mse(B_g^l, 1)
  with B = lora_up (peft ``lora_B``, Dout×r) over every adapted projection l, both weights 0.1; the
  "enhancement" term pulls every up weight towards 1 from the first step of the first task;
- no R2 (its call is commented out in the released code);
- inference: LoRA strength 0.8 (stored as the adapter's alpha = 0.8·rank) and the official EWA
  (``LifelongPipeline(..., ewa="official")``, :func:`lifelong_engine.ops.ewa_weights_rows`).

Readings where the code leaves a choice: the orth mean runs over past tasks learned with this method and
every adapted projection (a mean of per-layer means over past tasks, equal to the mean over (task,
layer) pairs); ranks of different tasks are zero-padded to a common one for B_g·B_iᵀ; the
enhancement mse is averaged per projection, then over projections.
"""

from __future__ import annotations

import dataclasses

from torch import Tensor

from .. import losses
from .base import Batch, Method, MethodConfig, TaskState


@dataclasses.dataclass
class CIDMOfficialConfig(MethodConfig):
    """orth_weight, enhancement_weight: the released code's 0.1 and 0.1; strength: the LoRA scale at
    inference (0.8); layerwise_tokens: one token row per attn2 layer; ewa: the pipeline's default merge."""

    orth_weight: float = 0.1
    enhancement_weight: float = 0.1
    strength: float = 0.8
    layerwise_tokens: bool = True
    ewa: str = "official"


class CIDMOfficial(Method):
    name = "cidm-official"
    Config = CIDMOfficialConfig
    projections = ("to_k", "to_v", "to_q", "to_out.0")

    def __init__(self, config: CIDMOfficialConfig, trainer):
        super().__init__(config, trainer)
        self.layerwise_tokens = config.layerwise_tokens

    def regulariser(self, task, state: TaskState, batch: Batch, gen) -> Tensor | None:
        past = [c for c in state.past if c.method == self.name]
        orth, enh, n = 0.0, 0.0, 0
        for layer in self.trainer.pipeline.layers:
            for proj in self.projections:
                _, b = self.forward_factors(state.params, layer, proj)
                if past:
                    orth = orth + losses.up_overlap_loss([c.factors(layer, proj)[1].float() for c in past], b)
                enh = enh + losses.enhancement_loss(b)
                n += 1
        return self.config.orth_weight * orth / n + self.config.enhancement_weight * enh / n

    def finish(self, task, state: TaskState, adapter):
        adapter.alpha = self.config.strength * adapter.rank
        adapter.metadata["ewa"] = self.config.ewa
        return adapter


METHOD = CIDMOfficial

"""cidm: Concept-Incremental text-to-image Diffusion Models (Dong et al., NeurIPS 2024), as the paper writes it.

Notation of the paper: task g learns a low-rank update ΔW_g^l = A_g^l·B_g^l of every adapted weight
W^l ∈ R^{a×b} (A ∈ R^{a×r}, B ∈ R^{r×b}) and layer-wise concept tokens y_g^l; past learners
Z_i = {ΔW_i^l, y_i^l} (i < g) are frozen. In ``nn.Linear`` layout a = Dout, so the paper's A is
peft's ``lora_B`` (Dout×r, the up projection) and its B is ``lora_A`` (r×Din).

- Adapted weights: K and V of every attn2 layer (LoRA rank r, alpha = r), and the concept's token rows
  y_g^l, one per attn2 layer (``layerwise_tokens``).
- Concept consolidation loss: L = L_diff + γ1·R1 + γ2·R2 with
  R1 = Σ_{i<g} Σ_l ‖A_i^l·(A_g^l)ᵀ‖_F² (orthogonal subspace regulariser; a×a per pair, A = lora_B);
  R2 = Σ_{i≤g} Σ_l ‖ΔW_i^l − H_i^l·W_*^l‖_F² (task-shared knowledge; W_*^l ∈ R^{a×b}, H_i^l ∈ R^{a×a}).
- Two-step optimisation: (1) H, W_* fixed: a gradient step on ΔW_g and y_g (every step); (2) ΔW_g and
  y_g fixed: closed-form alternating least squares on R2 for H_i, W_* (every ``r2_every`` steps).
- Inference: elastic weight aggregation (EWA) with power 2 and the Frobenius (L2) normaliser over
  tasks, ê_g^l = the task's tokens encoded alone per layer, averaged (``ewa="paper"``).

Where the paper is ambiguous, and what is chosen:
- R1 is written as the matrix Σ A_i·A_gᵀ "= 0", minimised as R1; we minimise the sum of squared
  Frobenius norms (a scalar, zero exactly when every product is zero). A_i·A_gᵀ pairs the rank
  components index by index, so it needs equal ranks: a smaller rank is zero-padded to the larger one.
  R1 is only over past tasks learned with this method (other methods' adapters are not CIDM learners).
- The paper does not say which weights are adapted beyond "low-rank weights of the cross-attention";
  K/V (its Fig. 2 and Custom Diffusion's choice) is used. The released code adapts q/k/v/out: that is
  the ``cidm-official`` method.
- R2 as written is nearly free: with H_i a full a×a matrix, a few alternating least-squares rounds drive
  it to ~1e-12, so it constrains almost nothing; it is kept as the paper states it (and the released
  code does not call it).
- H_i starts at I and W_* at the mean of the deltas once ΔW_g is non-zero (B starts at zero).
- γ1, γ2 = 0.1 and r2_every = 10 are untuned defaults (the paper gives no values).

Ablations (the paper's Table 3) are options: ``gamma1=0`` (no R1), ``gamma2=0`` (no R2, and no
closed-form step), ``ewa="sum"`` (merged by plain sum at inference), ``layerwise_tokens=False`` (one
token row shared by all layers); "no regional aggregation" is the pipeline's ``alpha=1``.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from .. import losses
from .base import Batch, Method, MethodConfig, TaskState

EWA_VARIANTS = ("paper", "official", "sum")


@dataclasses.dataclass
class CIDMConfig(MethodConfig):
    """gamma1, gamma2: weights of R1 and R2; r2_every: steps between closed-form updates of H_i, W_*;
    layerwise_tokens: one token row per attn2 layer (False: one row shared by all layers);
    ewa: how the pipeline merges these concepts by default ("paper", "official" or "sum")."""

    gamma1: float = 0.1
    gamma2: float = 0.1
    r2_every: int = 10
    layerwise_tokens: bool = True
    ewa: str = "paper"

    def __post_init__(self):
        if self.ewa not in EWA_VARIANTS:
            raise ValueError(f"cidm: ewa={self.ewa!r}; expected one of {EWA_VARIANTS}")
        if self.r2_every < 1:
            raise ValueError(f"cidm: r2_every must be at least 1, got {self.r2_every}")


class CIDM(Method):
    name = "cidm"
    Config = CIDMConfig

    def __init__(self, config: CIDMConfig, trainer):
        super().__init__(config, trainer)
        self.layerwise_tokens = config.layerwise_tokens
        self.r2: dict[tuple[str, str], dict] = {}  # (layer, proj) → {"w": W_*, "h": {concept: H_i}}

    def _past(self, state: TaskState) -> list:
        return [c for c in state.past if c.method == self.name]

    def _r2_items(self):
        for layer in self.trainer.pipeline.layers:
            for proj in self.projections:
                yield (layer, proj), self.r2.setdefault((layer, proj), {"w": None, "h": {}})

    def regulariser(self, task, state: TaskState, batch: Batch, gen) -> Tensor | None:
        params, past = state.params, self._past(state)
        zero = batch.pred.new_zeros(())
        r1 = r2 = zero
        for layer in self.trainer.pipeline.layers:
            for proj in self.projections:
                a, b = self.forward_factors(params, layer, proj)
                if self.config.gamma1:
                    r1 = r1 + losses.orthogonal_subspace_loss([c.factors(layer, proj)[1].float() for c in past], b)
                shared = self.r2.get((layer, proj))
                h = shared["h"].get(task.name) if shared is not None else None
                if h is not None and self.config.gamma2:
                    r2 = r2 + losses.shared_subspace_loss([b @ a], [h], shared["w"])
        return self.config.gamma1 * r1 + self.config.gamma2 * r2

    @torch.no_grad()
    def after_step(self, task, state: TaskState, step: int) -> None:
        """Step (2): with ΔW_g and the tokens fixed, the closed-form least-squares update of H_i, W_*."""
        if not self.config.gamma2 or step % self.config.r2_every:
            return
        params, past = state.params, self._past(state)
        for (layer, proj), shared in self._r2_items():
            a, b = self.forward_factors(params, layer, proj)
            current = (b @ a).detach()
            if not current.abs().sum():
                continue  # ΔW_g is still zero (B starts at zero): nothing to share yet
            names = [c.name for c in past] + [task.name]
            deltas = [c.delta(layer, proj).float() for c in past] + [current]
            if shared["w"] is None:
                h, w = losses.init_shared_subspace(deltas)
            else:
                eye = torch.eye(current.shape[0], device=current.device)
                h = [shared["h"].get(n, eye) for n in names]
                w = shared["w"]
            h, w = losses.shared_subspace_update(deltas, h, w)
            shared["w"], shared["h"] = w, dict(zip(names, h))

    def finish(self, task, state: TaskState, adapter):
        adapter.metadata["ewa"] = self.config.ewa
        return adapter

    def state_dict(self) -> dict:
        return {"r2": {f"{layer}|{proj}": v for (layer, proj), v in self.r2.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.r2 = {tuple(k.split("|")): v for k, v in state["r2"].items()}

    checkpoint_state = state_dict
    load_checkpoint_state = load_state_dict


METHOD = CIDM

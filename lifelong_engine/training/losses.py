"""Losses and regularisers of the lifelong training methods (DESIGN §4), one layer at a time.

- Regularisers on weights (CIDM's R1 and R2, C-LoRA, EWC) are sums of squares, never means,
  computed in the dtype of their inputs (trainable weights are fp32 or wider in practice).
- Losses on noise predictions (diffusion, prior preservation, distillation) are means, the
  standard diffusion MSE, computed in at least float32 as diffusers does, since predictions
  often come out of a half-precision UNet.
- Closed-form steps (CIDM's shared subspace, Custom Diffusion's merge) run in float64 under
  ``torch.no_grad`` and return the input dtype.

Weights use the ``nn.Linear`` layout: W is (Dout, Din), y = x·Wᵀ; LoRA is ΔW = B·A with
A (r, Din) and B (Dout, r). Bad arguments raise ValueError naming them (TypeError for a
non-tensor or non-floating input).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

__all__ = [
    "orthogonal_subspace_loss",
    "up_overlap_loss",
    "enhancement_loss",
    "shared_subspace_loss",
    "init_shared_subspace",
    "shared_subspace_update",
    "c_lora_forget_loss",
    "diffusion_loss",
    "prior_preservation_loss",
    "distillation_loss",
    "ewc_penalty",
    "update_fisher",
    "custom_diffusion_merge",
    "custom_diffusion_merge_factors",
]


# ----------------------------------------------------------------------------- checks


def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _tensor(fn: str, name: str, t: object, ndim: int | None = None, layout: str = "") -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor {layout}, got {type(t).__name__}")
    if ndim is not None and t.ndim != ndim:
        raise ValueError(f"{fn}: {name} must be {ndim}-D {layout}, got shape {_shape(t)}")
    if not t.dtype.is_floating_point:
        raise TypeError(f"{fn}: {name} must be a floating-point tensor, got {t.dtype}")
    return t


def _like(fn: str, name: str, t: Tensor, shape: tuple[int, ...], ref_name: str, ref: Tensor) -> None:
    """t has the given shape and lives on ref's device."""
    if _shape(t) != shape:
        raise ValueError(f"{fn}: {name} has shape {_shape(t)}; expected {shape} ({ref_name})")
    if t.device != ref.device:
        raise ValueError(f"{fn}: {name} is on {t.device}; expected {ref.device}, the device of {ref_name}")


def _eps(fn: str, eps: float) -> None:
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"{fn}: eps must be a finite number >= 0, got {eps}")


def _zero(t: Tensor) -> Tensor:
    """A 0-dim zero in t's dtype and device that still backpropagates (a zero gradient) into t,
    even where t holds inf or nan (unlike ``t.sum() * 0``)."""
    return t.flatten()[:0].sum()


def _loss_dtype(t: Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


# ------------------------------------------------------------------------------- CIDM


def _pad_ranks(fn: str, b_prev: Sequence[Tensor], b_new: Tensor) -> tuple[list[Tensor], Tensor]:
    """Check up projections (Dout, r_i) against b_new (Dout, r) and zero-pad all to the largest rank."""
    _tensor(fn, "b_new", b_new, 2, "(Dout, r)")
    for i, b in enumerate(b_prev):
        _tensor(fn, f"b_prev[{i}]", b, 2, "(Dout, r_i)")
        _like(fn, f"b_prev[{i}]", b, (b_new.shape[0], b.shape[1]), "(Dout, r_i), Dout of b_new", b_new)
    r = max([b_new.shape[1], *(b.shape[1] for b in b_prev)])

    def pad(b: Tensor) -> Tensor:
        return torch.nn.functional.pad(b, (0, r - b.shape[1]))

    return [pad(b) for b in b_prev], pad(b_new)


def orthogonal_subspace_loss(b_prev: Sequence[Tensor], b_new: Tensor) -> Tensor:
    """CIDM's R1 on one layer (the paper's eq.): overlap of the new task's up projection with past ones.

    The paper's A ∈ R^{a×r} of ΔW = A·B is, in nn.Linear layout, the up projection: peft's ``lora_B``.
    b_prev: [(Dout, r_i)], the lora_B of each past task (usually frozen); b_new: (Dout, r), the one
    being trained. Semantics: R1 = Σ_i ‖b_i·b_newᵀ‖_F² (each product Dout×Dout; a sum of squares), ranks
    zero-padded to the largest (b_i·b_newᵀ pairs rank components index by index). Computed through the
    r×r Gram matrices, ‖b_i·b_newᵀ‖_F² = ⟨b_iᵀ·b_i, b_newᵀ·b_new⟩_F, never forming Dout×Dout. A 0-dim zero
    that still backpropagates into b_new when b_prev is empty.
    """
    fn = "orthogonal_subspace_loss"
    b_prev, b_new = _pad_ranks(fn, b_prev, b_new)
    if len(b_prev) == 0:
        return _zero(b_new)
    gram_prev = sum(b.T @ b for b in b_prev)
    return (gram_prev * (b_new.T @ b_new)).sum()


def up_overlap_loss(b_prev: Sequence[Tensor], b_new: Tensor) -> Tensor:
    """The released CIDM code's orthogonality term on one layer: mean_i mean|b_new·b_iᵀ|.

    b_prev: [(Dout, r_i)] lora_B (lora_up) of past tasks; b_new: (Dout, r). Ranks zero-padded to the
    largest. A mean (unlike R1), as the released code computes it; a 0-dim zero (with gradient) when
    b_prev is empty.
    """
    fn = "up_overlap_loss"
    b_prev, b_new = _pad_ranks(fn, b_prev, b_new)
    if len(b_prev) == 0:
        return _zero(b_new)
    return torch.stack([(b_new @ b.T).abs().mean() for b in b_prev]).mean()


def enhancement_loss(b_new: Tensor) -> Tensor:
    """The released CIDM code's "enhancement" term on one layer: mse(b_new, 1) = mean((b_new − 1)²).

    b_new: (Dout, r) lora_B (lora_up). A mean, as in the released code.
    """
    _tensor("enhancement_loss", "b_new", b_new, 2, "(Dout, r)")
    return (b_new - 1).square().mean()


def _check_shared(fn: str, deltas: Sequence[Tensor], h: Sequence[Tensor], w_shared: Tensor) -> None:
    _tensor(fn, "w_shared", w_shared, 2, "(Dout, Din)")
    dout, din = w_shared.shape
    if len(h) != len(deltas):
        raise ValueError(f"{fn}: h has {len(h)} matrices; expected {len(deltas)}, one per entry of deltas")
    for i, (d, hi) in enumerate(zip(deltas, h)):
        _tensor(fn, f"deltas[{i}]", d, 2, "(Dout, Din)")
        _like(fn, f"deltas[{i}]", d, (dout, din), "(Dout, Din) of w_shared", w_shared)
        _tensor(fn, f"h[{i}]", hi, 2, "(Dout, Dout)")
        _like(fn, f"h[{i}]", hi, (dout, dout), "(Dout, Dout), Dout of w_shared", w_shared)


def _r2_terms(d: Tensor, h: Tensor, w: Tensor) -> Tensor:
    """‖Δ_i − H_i·W_*‖_F² per task i. d: (n, Dout, Din); h: (n, Dout, Dout); w: (Dout, Din) → (n,)."""
    return (d - h @ w).square().sum(dim=(-2, -1))


def shared_subspace_loss(deltas: Sequence[Tensor], h: Sequence[Tensor], w_shared: Tensor) -> Tensor:
    """CIDM's R2 on one layer: distance of each task's update from the task-shared subspace.

    deltas: [(Dout, Din)], ΔW_i of tasks i ≤ g; h: [(Dout, Dout)], one projection H_i per task;
    w_shared: (Dout, Din), the shared W_*.
    Semantics: R2 = Σ_i ‖Δ_i − H_i·W_*‖_F² (a sum of squares); a 0-dim zero that still
    backpropagates into w_shared when deltas is empty.
    """
    fn = "shared_subspace_loss"
    _check_shared(fn, deltas, h, w_shared)
    if len(deltas) == 0:
        return _zero(w_shared)
    return _r2_terms(torch.stack(list(deltas)), torch.stack(list(h)), w_shared).sum()


def init_shared_subspace(deltas: Sequence[Tensor]) -> tuple[list[Tensor], Tensor]:
    """A starting point for :func:`shared_subspace_update`: H_i = I, W_* = mean_i Δ_i.

    deltas: [(Dout, Din)], non-empty. Returns (h, w_shared): h a list of (Dout, Dout)
    identities, w_shared (Dout, Din), in the deltas' dtype and device, without gradients.
    With H_i = I, the mean is the exact least-squares W_*, so R2 starts at Σ_i ‖Δ_i − mean‖².
    W_* = 0 is a fixed point of the alternating updates (it gives H = 0, which gives W_* = 0),
    so a zero mean, e.g. before the first step of training with LoRA's B = 0, raises ValueError:
    initialise once the deltas have been trained.
    """
    fn = "init_shared_subspace"
    if len(deltas) == 0:
        raise ValueError(f"{fn}: deltas is empty; expected at least one (Dout, Din) update")
    for i, d in enumerate(deltas):
        _tensor(fn, f"deltas[{i}]", d, 2, "(Dout, Din)")
        _like(fn, f"deltas[{i}]", d, _shape(deltas[0]), "the shape of deltas[0]", deltas[0])
    with torch.no_grad():
        w_shared = torch.stack(list(deltas)).mean(0)
    if not bool(w_shared.any()):
        raise ValueError(
            f"{fn}: the mean of deltas is zero, and W_* = 0 is a fixed point of shared_subspace_update; "
            "initialise after the deltas have been trained"
        )
    eye = torch.eye(w_shared.shape[0], dtype=w_shared.dtype, device=w_shared.device)
    return [eye.clone() for _ in deltas], w_shared


def shared_subspace_update(
    deltas: Sequence[Tensor],
    h: Sequence[Tensor],
    w_shared: Tensor,
    iters: int = 1,
    eps: float = 1e-6,
) -> tuple[list[Tensor], Tensor]:
    """CIDM's step (2): closed-form alternating least squares on R2 with the deltas fixed.

    deltas: [(Dout, Din)], non-empty; h: [(Dout, Dout)], one per delta; w_shared: (Dout, Din).
    Each of the ``iters`` rounds does
      H_i ← Δ_i·W_*ᵀ·(W_*·W_*ᵀ + eps·I)⁻¹               (W_* fixed; exact LS as eps → 0)
      W_* ← (Σ_i H_iᵀ·H_i + eps·I)⁻¹·Σ_i H_iᵀ·Δ_i       (H fixed)
    eps is absolute: it keeps the solves defined when W_*·W_*ᵀ is singular (Dout > Din). A
    half-step that would raise R2 (the ridge biases each step by O(eps)) or is not finite keeps the
    previous value (per task for H), so R2 never increases.
    Computed in float64 with linalg.solve under no_grad. Returns (h, w_shared) in w_shared's dtype.
    """
    fn = "shared_subspace_update"
    _check_shared(fn, deltas, h, w_shared)
    if len(deltas) == 0:
        raise ValueError(f"{fn}: deltas is empty; expected at least one (Dout, Din) update")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ValueError(f"{fn}: iters must be an integer >= 1, got {iters!r}")
    _eps(fn, eps)
    f64 = torch.float64
    with torch.no_grad():
        d = torch.stack([t.to(f64) for t in deltas])
        hh = torch.stack([t.to(f64) for t in h])
        w = w_shared.to(f64)
        eye = torch.eye(w.shape[0], dtype=f64, device=w.device)
        res = _r2_terms(d, hh, w)
        try:
            for _ in range(iters):
                h_new = torch.linalg.solve(w @ w.T + eps * eye, d @ w.T, left=False)
                res_new = _r2_terms(d, h_new, w)
                better = res_new <= res  # False on nan
                hh = torch.where(better[:, None, None], h_new, hh)
                res = torch.where(better, res_new, res)

                w_new = torch.linalg.solve((hh.mT @ hh).sum(0) + eps * eye, (hh.mT @ d).sum(0))
                res_new = _r2_terms(d, hh, w_new)
                better = res_new.sum() <= res.sum()
                w = torch.where(better, w_new, w)
                res = torch.where(better, res_new, res)
        except torch.linalg.LinAlgError as e:
            raise ValueError(f"{fn}: singular normal equations with eps={eps}; use eps > 0 ({e})") from None
        dtype = w_shared.dtype
        return [t.to(dtype) for t in hh.unbind(0)], w.to(dtype)


# ----------------------------------------------------------------------------- C-LoRA


def c_lora_forget_loss(prev_delta_sum: Tensor, delta: Tensor) -> Tensor:
    """C-LoRA's self-regularisation on one K or V projection.

    prev_delta_sum: (Dout, Din), Σ_{t'<t} ΔW_t' of the past tasks (usually frozen);
    delta: (Dout, Din), the current task's ΔW_t = B·A.
    Semantics: ‖prev_delta_sum ⊙ delta‖_F² (a sum of squares): updates on entries that past
    tasks already changed are penalised.
    """
    fn = "c_lora_forget_loss"
    _tensor(fn, "delta", delta, 2, "(Dout, Din)")
    _tensor(fn, "prev_delta_sum", prev_delta_sum, 2, "(Dout, Din)")
    _like(fn, "prev_delta_sum", prev_delta_sum, _shape(delta), "the shape of delta", delta)
    return (prev_delta_sum * delta).square().sum()


# ------------------------------------------------------------------- diffusion losses


def diffusion_loss(pred: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
    """The diffusion training loss: MSE between the model's prediction and its target (ε or v).

    pred, target: same shape, (B, C, H, W) when a mask is given; mask: (B, 1, H, W) or
    (B, H, W), the concept mask at latent resolution (bool or float ≥ 0), broadcast over channels.
    Semantics (a mean, unlike the regularisers): mean((pred − target)²) without a mask;
    Σ mask·(pred − target)² / (Σ mask·C) with one. Computed and returned in at least float32.
    Raises ValueError when the mask sums to zero.
    """
    return _mse("diffusion_loss", pred, target, mask)


def prior_preservation_loss(pred: Tensor, target: Tensor, weight: float = 1.0, mask: Tensor | None = None) -> Tensor:
    """Prior preservation (DreamBooth / Custom Diffusion): the diffusion MSE on class images, weighted.

    pred, target, mask: as in :func:`diffusion_loss`, on the batch of class (prior) images.
    Semantics (a mean): weight · diffusion_loss(pred, target, mask).
    """
    fn = "prior_preservation_loss"
    if not math.isfinite(weight):
        raise ValueError(f"{fn}: weight must be a finite number, got {weight}")
    return weight * _mse(fn, pred, target, mask)


def _mse(fn: str, pred: Tensor, target: Tensor, mask: Tensor | None) -> Tensor:
    _tensor(fn, "pred", pred)
    _tensor(fn, "target", target)
    _like(fn, "target", target, _shape(pred), "the shape of pred", pred)
    dtype = _loss_dtype(pred)
    err = (pred.to(dtype) - target.to(dtype)).square()
    if mask is None:
        return err.mean()
    if pred.ndim != 4:
        raise ValueError(f"{fn}: pred must be 4-D (B, C, H, W) when a mask is given, got shape {_shape(pred)}")
    if not isinstance(mask, Tensor):
        raise TypeError(f"{fn}: mask must be a torch.Tensor (B, 1, H, W) or (B, H, W), got {type(mask).__name__}")
    b, c, hgt, wid = pred.shape
    if _shape(mask) not in ((b, 1, hgt, wid), (b, hgt, wid)):
        raise ValueError(
            f"{fn}: mask has shape {_shape(mask)}; expected {(b, 1, hgt, wid)} or {(b, hgt, wid)} "
            "(B, H, W of pred: resize the mask to the latent size)"
        )
    if mask.device != pred.device:
        raise ValueError(f"{fn}: mask is on {mask.device}; expected {pred.device}, the device of pred")
    m = mask.reshape(b, 1, hgt, wid).to(dtype)
    denom = m.sum() * c
    if not bool(denom > 0):
        raise ValueError(f"{fn}: mask sums to {float(m.sum())}; expected a positive sum (an empty concept mask?)")
    return (m * err).sum() / denom


def distillation_loss(student: Tensor, teacher: Tensor, weights: Tensor | None = None) -> Tensor:
    """Distillation of noise predictions (LwF; L2DM's elastic concept distillation).

    student: (B, ...), the current model's prediction; teacher: same shape, the frozen previous
    model's prediction on the same inputs, treated as a constant (detached); weights: (B,) or
    None, e.g. each past concept's similarity to the new one.
    Semantics (a mean): (1/B)·Σ_b weights[b]·mean((student[b] − teacher[b])²); weights are not
    normalised, so all ones give the plain MSE. Computed and returned in at least float32.
    """
    fn = "distillation_loss"
    _tensor(fn, "student", student)
    _tensor(fn, "teacher", teacher)
    _like(fn, "teacher", teacher, _shape(student), "the shape of student", student)
    if student.ndim == 0 or student.shape[0] == 0:
        raise ValueError(f"{fn}: student must be (B, ...) with B >= 1, got shape {_shape(student)}")
    dtype = _loss_dtype(student)
    err = (student.to(dtype) - teacher.detach().to(dtype)).square().reshape(student.shape[0], -1).mean(1)
    if weights is None:
        return err.mean()
    _tensor(fn, "weights", weights, 1, "(B,)")
    _like(fn, "weights", weights, (student.shape[0],), "(B,), B of student", student)
    return (weights.to(dtype) * err).mean()


# --------------------------------------------------------------------------------- EWC


def _same_keys(fn: str, name: str, d: Mapping[str, Tensor], ref_name: str, ref: Mapping[str, Tensor]) -> None:
    if set(d) != set(ref):
        missing, extra = sorted(set(ref) - set(d)), sorted(set(d) - set(ref))
        raise ValueError(f"{fn}: {name} keys differ from {ref_name} keys: missing {missing}, unexpected {extra}")


def ewc_penalty(params: Mapping[str, Tensor], anchors: Mapping[str, Tensor], fisher: Mapping[str, Tensor]) -> Tensor:
    """Elastic weight consolidation: a Fisher-weighted pull towards the previous task's weights.

    params: {name: θ_k}, the trainable parameters; anchors: {name: θ*_k}, their values after
    the previous task; fisher: {name: F_k}, the diagonal Fisher; same keys and shapes.
    Semantics: Σ_k Σ F_k ⊙ (θ_k − θ*_k)² (a sum; the conventional λ/2 is the caller's).
    """
    fn = "ewc_penalty"
    if len(params) == 0:
        raise ValueError(f"{fn}: params is empty; expected at least one parameter")
    _same_keys(fn, "anchors", anchors, "params", params)
    _same_keys(fn, "fisher", fisher, "params", params)
    total = None
    for k, theta in params.items():
        _tensor(fn, f"params[{k!r}]", theta)
        for name, t in ((f"anchors[{k!r}]", anchors[k]), (f"fisher[{k!r}]", fisher[k])):
            _tensor(fn, name, t)
            _like(fn, name, t, _shape(theta), f"the shape of params[{k!r}]", theta)
        term = (fisher[k] * (theta - anchors[k]).square()).sum()
        total = term if total is None else total + term
    return total


def update_fisher(fisher: Mapping[str, Tensor], grads: Mapping[str, Tensor], n: int) -> dict[str, Tensor]:
    """Fold one more squared gradient into the running-mean diagonal Fisher.

    fisher: {name: F_k}, the mean of g² over the n − 1 samples so far (ignored, may be empty,
    when n = 1); grads: {name: g_k}, the gradient of the n-th sample's loss; n: samples seen,
    this one included. Semantics: F_k ← F_k + (g_k² − F_k)/n. Returns a new dict, no gradients.
    """
    fn = "update_fisher"
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"{fn}: n must be an integer >= 1 (samples seen, this one included), got {n!r}")
    if n > 1:
        _same_keys(fn, "grads", grads, "fisher", fisher)
    out = {}
    with torch.no_grad():
        for k, g in grads.items():
            _tensor(fn, f"grads[{k!r}]", g)
            if n == 1:
                out[k] = g.square()
                continue
            _like(fn, f"grads[{k!r}]", g, _shape(fisher[k]), f"the shape of fisher[{k!r}]", fisher[k])
            out[k] = fisher[k] + (g.square() - fisher[k]) / n
    return out


# ------------------------------------------------------------------- Custom Diffusion


def custom_diffusion_merge(
    w0: Tensor,
    c_reg: Tensor,
    finetuned: Sequence[tuple[Tensor, Tensor]],
    eps: float = 1e-6,
) -> Tensor:
    """Custom Diffusion's closed-form merge of several fine-tuned K (or V) projections into one.

    w0: (Dout, Din), the pretrained weight; c_reg: (n_reg, Din), text features of the
    regularisation prompts (one row per token); finetuned: [(W_i (Dout, Din), C_i (n_i, Din))],
    each concept's fine-tuned weight and the features of its prompts' tokens.
    Semantics: W = argmin_W ‖W·C_regᵀ − W0·C_regᵀ‖_F  s.t.  W·C_iᵀ = W_i·C_iᵀ for every i.
    With C = [C_1; …; C_N] (m, Din), V = [W_1·C_1ᵀ, …, W_N·C_Nᵀ] (Dout, m) and
    M = C_regᵀ·C_reg + eps·I, stationarity of ‖(W − W0)·C_regᵀ‖² − 2·tr(Λᵀ·(W·Cᵀ − V)) gives
    (W − W0)·M = Λ·C, and the constraints give Λ = (V − W0·Cᵀ)·(C·M⁻¹·Cᵀ)⁻¹, so
      W = W0 + (V − W0·Cᵀ)·(C·M⁻¹·Cᵀ)⁻¹·C·M⁻¹          (Kumari et al., CVPR 2023, eq. 4).
    eps keeps M invertible when C_reg has fewer than Din independent rows. Computed in
    float64 with linalg.solve under no_grad; returned in w0's dtype; W = W0 for no concepts.
    Raises ValueError when C lacks full row rank (m > Din, duplicated or collinear token rows):
    the constraints are then redundant or contradictory and C·M⁻¹·Cᵀ is singular.
    """
    lam, d = custom_diffusion_merge_factors(w0, c_reg, finetuned, eps)
    return (w0.to(torch.float64) + lam @ d).to(w0.dtype)


def custom_diffusion_merge_factors(
    w0: Tensor, c_reg: Tensor, finetuned: Sequence[tuple[Tensor, Tensor]], eps: float = 1e-6
) -> tuple[Tensor, Tensor]:
    """The merge's update W − W0 = Λ·D as its two factors, float64: Λ = (V − W0·Cᵀ)·(C·M⁻¹·Cᵀ)⁻¹ (Dout, m)
    and D = C·M⁻¹ (m, Din), with the m rows of C = [C_1; …; C_N] in order, so the columns of Λ and
    rows of D that belong to C_i give concept i's share Λ_i·D_i of the update (rank ≤ n_i).
    Arguments and errors as :func:`custom_diffusion_merge`; no concepts give m = 0 (no update)."""
    fn = "custom_diffusion_merge_factors"
    _tensor(fn, "w0", w0, 2, "(Dout, Din)")
    _tensor(fn, "c_reg", c_reg, 2, "(n_reg, Din)")
    dout, din = w0.shape
    _like(fn, "c_reg", c_reg, (c_reg.shape[0], din), "(n_reg, Din), Din of w0", w0)
    _eps(fn, eps)
    for i, item in enumerate(finetuned):
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise ValueError(f"{fn}: finetuned[{i}] must be a pair (W_i, C_i), got {type(item).__name__}")
        w_i, c_i = item
        _tensor(fn, f"finetuned[{i}][0]", w_i, 2, "(Dout, Din)")
        _like(fn, f"finetuned[{i}][0]", w_i, (dout, din), "(Dout, Din), the shape of w0", w0)
        _tensor(fn, f"finetuned[{i}][1]", c_i, 2, "(n_i, Din)")
        if c_i.shape[0] == 0:
            raise ValueError(f"{fn}: finetuned[{i}][1] has shape {_shape(c_i)}; expected at least one token row")
        _like(fn, f"finetuned[{i}][1]", c_i, (c_i.shape[0], din), "(n_i, Din), Din of w0", w0)
    f64 = torch.float64
    if len(finetuned) == 0:
        return torch.zeros(dout, 0, dtype=f64, device=w0.device), torch.zeros(0, din, dtype=f64, device=w0.device)
    with torch.no_grad():
        w0d = w0.to(f64)
        c = torch.cat([c_i.to(f64) for _, c_i in finetuned])  # (m, Din)
        v = torch.cat([w_i.to(f64) @ c_i.to(f64).T for w_i, c_i in finetuned], dim=1)  # (Dout, m)
        rank = int(torch.linalg.matrix_rank(c))
        if rank < c.shape[0]:
            hint = f"m = {c.shape[0]} > Din = {din}" if c.shape[0] > din else "duplicated or collinear token rows?"
            raise ValueError(
                f"{fn}: the stacked concept features C (m = {c.shape[0]} rows from finetuned) have rank {rank}; "
                f"the constraints W·C_iᵀ = W_i·C_iᵀ must be linearly independent ({hint})"
            )
        if eps == 0 and int(torch.linalg.matrix_rank(c_reg.to(f64))) < din:
            raise ValueError(
                f"{fn}: c_reg has fewer than Din = {din} independent rows, so C_regᵀ·C_reg is singular; use eps > 0"
            )
        m_reg = c_reg.to(f64).T @ c_reg.to(f64) + eps * torch.eye(din, dtype=f64, device=w0.device)
        try:
            d = torch.linalg.solve(m_reg, c.T).T  # C·M⁻¹ (M is symmetric), (m, Din)
            lam = torch.linalg.solve(d @ c.T, v - w0d @ c.T, left=False)  # (V − W0·Cᵀ)·(C·M⁻¹·Cᵀ)⁻¹
        except torch.linalg.LinAlgError as e:
            raise ValueError(f"{fn}: C_regᵀ·C_reg + eps·I is singular with eps={eps}; use eps > 0 ({e})") from None
        return lam, d

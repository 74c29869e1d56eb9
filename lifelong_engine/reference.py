"""Plain-PyTorch semantics of every fused op: the ground truth the kernels are checked against.

Each forward is the formula of DESIGN §3 written as directly as PyTorch allows; each
``*_backward`` is the hand-derived vector-Jacobian product of that forward (the math a
backward kernel must reproduce), checked in the tests against autograd of the forward.

These functions do no input validation; the public ops in :mod:`lifelong_engine.ops`
validate and then call them (the ``reference`` backend) or a faster kernel.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "NORM_EPS",
    "lora_kv_projection",
    "lora_kv_projection_backward",
    "lora_kv_projection_grouped",
    "lora_kv_projection_grouped_backward",
    "lora_kv_projection_grouped_packed",
    "regional_cross_attention",
    "regional_cross_attention_backward",
    "ewa_weights",
    "ewa_weights_backward",
    "ewa_similarity",
    "ewa_merge",
    "ewa_merge_backward",
    "ewa_weights_rows",
    "ewa_weights_rows_backward",
]

#: Floor on vector norms in ``ewa_weights`` (cosine denominators and the ψ normaliser),
#: so that zero vectors give ψ = 0 instead of NaN.
NORM_EPS = 1e-12


# --------------------------------------------------------------------------- lora_kv


def _gather_adapters(a: Tensor, b: Tensor, ids: Tensor) -> tuple[Tensor, Tensor]:
    """a[ids], b[ids] per slot, with empty slots (-1) gathered as zeros (never as adapter 0)."""
    valid = (ids >= 0)[..., None, None]
    idx = ids.clamp(min=0).long()
    return torch.where(valid, a[idx], 0), torch.where(valid, b[idx], 0)


def _slot_weights(ids: Tensor, weights: Tensor, scale: float, dtype: torch.dtype) -> Tensor:
    return torch.where(ids >= 0, weights.to(dtype) * scale, 0)


def lora_kv_projection(
    c: Tensor,
    w_k: Tensor,
    w_v: Tensor,
    a_k: Tensor,
    b_k: Tensor,
    a_v: Tensor,
    b_v: Tensor,
    ids: Tensor,
    weights: Tensor,
    scale: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Base K/V projection plus a weighted sum of LoRA adapters picked per sample.

    c: (B, T, Din); w_k, w_v: (Dout, Din); a_k, a_v: (N, r, Din); b_k, b_v: (N, Dout, r);
    ids: (B, S) int, -1 = empty slot; weights: (B, S) float.
    Semantics: k[b] = c[b]·W_kᵀ + Σ_s weights[b,s]·scale·(c[b]·a_k[ids[b,s]]ᵀ)·b_k[ids[b,s]]ᵀ,
    v likewise with w_v, a_v, b_v. Returns (k, v), each (B, T, Dout).
    """
    return c @ w_k.T + lora_term(c, a_k, b_k, ids, weights, scale), c @ w_v.T + lora_term(
        c, a_v, b_v, ids, weights, scale
    )


def lora_kv_projection_grouped(
    c: Tensor,
    w_k: list[Tensor],
    w_v: list[Tensor],
    a_k: list[Tensor],
    b_k: list[Tensor],
    a_v: list[Tensor],
    b_v: list[Tensor],
    ids: Tensor,
    weights: Tensor,
    scale: float = 1.0,
    project=None,
) -> tuple[Tensor, Tensor]:
    """:func:`lora_kv_projection` of all L layers, each with its own ids and weights.

    c: (L, B, T, Din); w_k, w_v, a_k, b_k, a_v, b_v: L per-layer tensors; ids, weights: (L, B, S).
    Semantics: (k_l, v_l) = lora_kv_projection(c[l], w_k[l], w_v[l], a_k[l], b_k[l], a_v[l], b_v[l],
    ids[l], weights[l], scale). Returns flat (k_all, v_all), each (B·T·ΣDout_l,): k_l flattened, in
    layer order (the layout of the grouped kernel's output buffer). ``project`` is the per-layer op
    (this module's by default; a backend passes its own fast path).
    """
    project = project or lora_kv_projection
    outs = [
        project(c[layer], w_k[layer], w_v[layer], a_k[layer], b_k[layer], a_v[layer], b_v[layer], ids[layer],
                weights[layer], scale)
        for layer in range(c.shape[0])
    ]  # fmt: skip
    if not outs:
        return c.new_empty(0), c.new_empty(0)
    return torch.cat([k.reshape(-1) for k, _ in outs]), torch.cat([v.reshape(-1) for _, v in outs])


def lora_kv_projection_grouped_packed(c, w_k, w_v, douts, a_k, b_k, a_v, b_v, ids, weights, scale=1.0, project=None):
    """:func:`lora_kv_projection_grouped` with the base weights packed: w_k, w_v (ΣDout_l, Din), layer l's
    rows at [Σ_{j<l} Dout_j, … + Dout_l); douts: (Dout_0, …, Dout_{L-1})."""
    w_k, w_v = list(w_k.split(list(douts))), list(w_v.split(list(douts)))
    return lora_kv_projection_grouped(c, w_k, w_v, a_k, b_k, a_v, b_v, ids, weights, scale, project)


def split_layers(flat: Tensor, bsz: int, t_len: int, douts) -> list[Tensor]:
    """Layer l's (B, T, Dout_l) view of a flat (B·T·ΣDout_l,) grouped buffer."""
    parts = flat.split([bsz * t_len * d for d in douts])
    return [part.view(bsz, t_len, d) for part, d in zip(parts, douts)]


def lora_kv_projection_grouped_backward(
    grad_k: Tensor,
    grad_v: Tensor,
    c: Tensor,
    w_k: list[Tensor],
    w_v: list[Tensor],
    a_k: list[Tensor],
    b_k: list[Tensor],
    a_v: list[Tensor],
    b_v: list[Tensor],
    ids: Tensor,
    weights: Tensor,
    scale: float = 1.0,
    project_backward=None,
) -> tuple[Tensor, list[Tensor], list[Tensor], list[Tensor], list[Tensor], Tensor]:
    """Gradients of :func:`lora_kv_projection_grouped`: layer l's are :func:`lora_kv_projection_backward`'s
    of its part of the flat grad_k, grad_v (B·T·ΣDout_l,). Returns (dc (L, B, T, Din), [da_k_l], [db_k_l],
    [da_v_l], [db_v_l], dweights (L, B, S)). ``project_backward``: the per-layer backward (this module's by
    default; a backend passes its own)."""
    project_backward = project_backward or lora_kv_projection_backward
    douts = [w.shape[0] for w in w_k]
    gks = split_layers(grad_k, c.shape[1], c.shape[2], douts)
    gvs = split_layers(grad_v, c.shape[1], c.shape[2], douts)
    per_layer = [
        project_backward(gks[l], gvs[l], c[l], w_k[l], w_v[l], a_k[l], b_k[l], a_v[l], b_v[l], ids[l], weights[l],
                         scale)
        for l in range(c.shape[0])
    ]  # fmt: skip
    if not per_layer:
        return torch.zeros_like(c), [], [], [], [], torch.zeros_like(weights)
    grads = list(zip(*per_layer))
    return torch.stack(grads[0]), *(list(g) for g in grads[1:5]), torch.stack(grads[5])


def lora_term(x: Tensor, a: Tensor, b: Tensor, ids: Tensor, weights: Tensor, scale: float = 1.0) -> Tensor:
    """The adapters' part of one projection: Σ_s weights[b,s]·scale·(x[b]·a[ids[b,s]]ᵀ)·b[ids[b,s]]ᵀ.

    x: (B, T, Din); a: (N, r, Din); b: (N, Dout, r); ids, weights: (B, S). Returns (B, T, Dout).
    """
    if ids.numel() == 0 or a.shape[0] == 0:
        return x.new_zeros(*x.shape[:-1], b.shape[1])
    a_s, b_s = _gather_adapters(a, b, ids)  # (B, S, r, Din), (B, S, Dout, r)
    u = torch.einsum("btd,bsrd->bstr", x, a_s) * _slot_weights(ids, weights, scale, x.dtype)[:, :, None, None]
    return torch.einsum("bstr,bsor->bto", u, b_s)


def lora_kv_projection_backward(
    grad_k: Tensor,
    grad_v: Tensor,
    c: Tensor,
    w_k: Tensor,
    w_v: Tensor,
    a_k: Tensor,
    b_k: Tensor,
    a_v: Tensor,
    b_v: Tensor,
    ids: Tensor,
    weights: Tensor,
    scale: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of :func:`lora_kv_projection`.

    With u_s = c·A_sᵀ (B, S, T, r), ω = weights·scale (0 on empty slots), per projection:
      dc      = dK·W_k + Σ_s ω_s·(dK·B_s)·A_s              (+ the same for V)
      dA[n]   = Σ_{(b,s): ids=n} ω_bs·(dK[b]·B_n)ᵀ·c[b]
      dB[n]   = Σ_{(b,s): ids=n} ω_bs·dK[b]ᵀ·u_bs
      dweights[b,s] = scale·Σ_{t,o} dK[b,t,o]·(u_bs·B_sᵀ)[t,o]  (+ V), 0 on empty slots
    The base weights' gradient, dW_k = Σ_b dK[b]ᵀ·c[b], is a plain GEMM left to the caller.
    Returns (dc, da_k, db_k, da_v, db_v, dweights).
    """
    dc = grad_k @ w_k + grad_v @ w_v
    dc_k, da_k, db_k, dw_k = lora_term_backward(grad_k, c, a_k, b_k, ids, weights, scale)
    dc_v, da_v, db_v, dw_v = lora_term_backward(grad_v, c, a_v, b_v, ids, weights, scale)
    return dc + dc_k + dc_v, da_k, db_k, da_v, db_v, dw_k + dw_v


def lora_term_backward(
    grad: Tensor, x: Tensor, a: Tensor, b: Tensor, ids: Tensor, weights: Tensor, scale: float = 1.0
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of :func:`lora_term`: (dx, da, db, dweights), with u_s = x·A_sᵀ, ω = weights·scale
    (0 on empty slots): dx = Σ_s ω_s·(dY·B_s)·A_s; dA[n] = Σ_{(b,s): ids=n} ω_bs·(dY[b]·B_n)ᵀ·x[b];
    dB[n] = Σ_{(b,s): ids=n} ω_bs·dY[b]ᵀ·u_bs; dweights[b,s] = scale·Σ dY[b]·(u_bs·B_sᵀ), 0 on empty slots."""
    dx = torch.zeros_like(x)
    da, db = torch.zeros_like(a), torch.zeros_like(b)
    dweights = torch.zeros(weights.shape, dtype=x.dtype, device=x.device)
    if ids.numel() and a.shape[0]:
        idx = ids.clamp(min=0).long().reshape(-1)
        wts = _slot_weights(ids, weights, scale, x.dtype)
        a_s, b_s = _gather_adapters(a, b, ids)
        u = torch.einsum("btd,bsrd->bstr", x, a_s)  # (B, S, T, r)
        gb = torch.einsum("bto,bsor->bstr", grad, b_s)  # dY·B_s
        dx = torch.einsum("bstr,bs,bsrd->btd", gb, wts, a_s)
        da.index_add_(0, idx, torch.einsum("bstr,bs,btd->bsrd", gb, wts, x).reshape(-1, *a.shape[1:]))
        db.index_add_(0, idx, torch.einsum("bto,bs,bstr->bsor", grad, wts, u).reshape(-1, *b.shape[1:]))
        dweights = torch.where(ids >= 0, torch.einsum("bstr,bstr->bs", gb, u) * scale, 0)
    return dx, da, db, dweights.to(weights.dtype)


# ------------------------------------------------------------------ regional attention


def _regional_scores(q: Tensor, k: Tensor, region_ids: Tensor, kv_len: Tensor | None, scale: float) -> Tensor:
    """Scores of every query against every slot's keys, flattened to (B, H, N, P·T),
    with -inf on keys of other slots than the query's region and on keys ≥ kv_len."""
    bsz, n_slots, heads, t_len, _ = k.shape
    s = torch.einsum("bhnd,bphtd->bhnpt", q, k) * scale
    slot = torch.arange(n_slots, device=q.device)
    allowed = region_ids[:, None, :, None, None] == slot[:, None]  # (B, 1, N, P, 1)
    if kv_len is not None:
        allowed = allowed & (torch.arange(t_len, device=q.device) < kv_len[:, None, None, :, None])
    return s.masked_fill(~allowed, float("-inf")).flatten(-2)


def _valid_kv(k: Tensor, v: Tensor, kv_len: Tensor | None) -> tuple[Tensor, Tensor]:
    """k, v with the keys and values ≥ kv_len zeroed: they are masked out of the softmax, and
    where() keeps a NaN or inf stored there from reaching the output as 0·NaN."""
    if kv_len is None:
        return k, v
    keep = (torch.arange(k.shape[3], device=k.device) < kv_len[:, :, None])[:, :, None, :, None]
    return torch.where(keep, k, 0), torch.where(keep, v, 0)


def _flat_kv(x: Tensor) -> Tensor:
    """(B, P, H, T, d) → (B, H, P·T, d), slot-major, matching ``_regional_scores``."""
    return x.transpose(1, 2).flatten(2, 3)


def regional_cross_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    region_ids: Tensor,
    kv_len: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """Cross-attention in which every query attends only to its region's prompt slot.

    q: (B, H, N, d); k, v: (B, P, H, T, d), slot 0 = global prompt; region_ids: (B, N) int in
    [0, P); kv_len: (B, P) int in [1, T] or None (all T keys valid); scale: d**-0.5 if None.
    Semantics: out[b,h,n] = softmax(q[b,h,n]·k[b,p,h,:L]ᵀ·scale)·v[b,p,h,:L],
               p = region_ids[b,n], L = kv_len[b,p]. Keys and values ≥ L never reach the output
               (not even a NaN stored there). Returns (B, H, N, d).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    k, v = _valid_kv(k, v, kv_len)
    probs = torch.softmax(_regional_scores(q, k, region_ids, kv_len, scale), dim=-1)
    return probs @ _flat_kv(v)


def regional_cross_attention_backward(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    region_ids: Tensor,
    kv_len: Tensor | None = None,
    scale: float | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of :func:`regional_cross_attention` (the softmax-attention backward on the
    masked scores): with P = softmax(S), O = P·V and D = rowsum(dO ⊙ O),
      dV = Pᵀ·dO,  dS = P ⊙ (dO·Vᵀ − D),  dQ = scale·dS·K,  dK = scale·dSᵀ·Q.
    Returns (dq, dk, dv) shaped like q, k, v.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    k, v = _valid_kv(k, v, kv_len)
    probs = torch.softmax(_regional_scores(q, k, region_ids, kv_len, scale), dim=-1)
    kf, vf = _flat_kv(k), _flat_kv(v)
    out = probs @ vf
    d_s = probs * (grad_out @ vf.transpose(-1, -2) - (grad_out * out).sum(-1, keepdim=True))
    dq = scale * d_s @ kf
    dk = scale * d_s.transpose(-1, -2) @ q
    dv = probs.transpose(-1, -2) @ grad_out

    def unflat(x: Tensor) -> Tensor:
        return x.unflatten(2, (k.shape[1], k.shape[3])).transpose(1, 2)

    return dq, unflat(dk), unflat(dv)


# ------------------------------------------------------------------------------- EWA


def _normalize(x: Tensor) -> Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS)


def _unmasked(prompt: Tensor, prompt_mask: Tensor | None) -> Tensor:
    """prompt with the tokens outside prompt_mask zeroed (where(): a NaN in padding reaches nothing)."""
    return prompt if prompt_mask is None else torch.where(prompt_mask[:, None, :, None], prompt, 0)


def _ewa_similarity(prompt: Tensor, concepts: Tensor, prompt_mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """M[b,l,g] = max over allowed t of cos(prompt[b,l,t], concepts[l,g]), and the argmax t."""
    cos = torch.einsum("bltd,lgd->bltg", _normalize(prompt), _normalize(concepts))
    if prompt_mask is not None:
        cos = cos.masked_fill(~prompt_mask[:, None, :, None], float("-inf"))
    return cos.max(dim=2)


def ewa_similarity(prompt: Tensor, concepts: Tensor, prompt_mask: Tensor | None = None) -> Tensor:
    """M of :func:`ewa_weights`, (B, L, G): max over the allowed tokens t of cos(prompt[b,l,t], concepts[l,g])
    (-inf where no token is allowed); what ψ is made of, for diagnostics."""
    return _ewa_similarity(_unmasked(prompt, prompt_mask), concepts, prompt_mask)[0]


def _ewa_normaliser(m_pow: Tensor, norm: str) -> Tensor:
    n = m_pow.norm(dim=-1, keepdim=True) if norm == "fro" else m_pow.abs().sum(-1, keepdim=True)
    return n.clamp_min(NORM_EPS)


def ewa_weights(
    prompt: Tensor,
    concepts: Tensor,
    prompt_mask: Tensor | None = None,
    power: float = 2.0,
    norm: str = "fro",
) -> Tensor:
    """Elastic weight aggregation weights ψ of each concept for each sample and layer.

    prompt: (B, L, T, D) per-layer prompt embeddings ĉ^l; concepts: (L, G, D) per-layer concept
    embeddings ê^l_g; prompt_mask: (B, T) bool, tokens that count (None = all).
    Semantics: M[b,l,g] = max_t cos(prompt[b,l,t], concepts[l,g]);  M⁺ = max(M, 0);
               psi[b,l,g] = M⁺^power / ‖M⁺[b,l,:]^power‖, the norm L2 ("fro") or L1 ("l1").
    A concept no prompt token points towards (M ≤ 0) gets ψ = 0, so ψ is a finite, non-negative
    weighting for every power > 0 (M^1.5 of a negative M would be NaN, M^1 negative); a row
    whose M are all ≤ 0 is all zeros (no concept applies). Cosines use max(‖x‖, NORM_EPS) as each
    norm, and the normaliser is floored at NORM_EPS, so zero vectors give ψ = 0. Returns psi (B, L, G).
    """
    m_pow = ewa_similarity(prompt, concepts, prompt_mask).clamp_min(0).pow(power)
    return m_pow / _ewa_normaliser(m_pow, norm)


def ewa_weights_backward(
    grad_psi: Tensor,
    prompt: Tensor,
    concepts: Tensor,
    prompt_mask: Tensor | None = None,
    power: float = 2.0,
    norm: str = "fro",
) -> tuple[Tensor, Tensor]:
    """Gradients of :func:`ewa_weights` (the max routes the gradient to its argmax token t*):
      P = M⁺^power, n = ‖P‖:  dP = (dψ − s·Σ_g dψ·ψ) / n,  s = ψ ("fro") or sign(P) ("l1")
      dM = dP·power·M^(power−1) where M > 0, else 0;  dcos[b,l,t*,g] = dM
      dx̂ = Σ_g dcos·ê,  dê = Σ_{b,t} dcos·x̂;  through x̂ = x / ‖x‖:  dx = (dx̂ − x̂·(x̂·dx̂)) / ‖x‖
    Returns (dprompt, dconcepts).
    """
    prompt = _unmasked(prompt, prompt_mask)
    xh, eh = _normalize(prompt), _normalize(concepts)
    m, t_star = _ewa_similarity(prompt, concepts, prompt_mask)
    m_pow = m.clamp_min(0).pow(power)
    n = _ewa_normaliser(m_pow, norm)
    psi = m_pow / n
    s = psi if norm == "fro" else m_pow.sign()
    s = torch.where(n > NORM_EPS, s, 0)  # a floored normaliser is a constant
    d_pow = (grad_psi - s * (grad_psi * psi).sum(-1, keepdim=True)) / n
    d_m = torch.where(m > 0, d_pow * power * torch.where(m > 0, m, 1).pow(power - 1), 0)
    d_cos = torch.zeros(*prompt.shape[:3], concepts.shape[1], dtype=prompt.dtype, device=prompt.device)
    d_cos.scatter_(2, t_star.unsqueeze(2), d_m.unsqueeze(2))  # (B, L, T, G)
    d_xh = torch.einsum("bltg,lgd->bltd", d_cos, eh)
    d_eh = torch.einsum("bltg,bltd->lgd", d_cos, xh)

    def through_normalize(x: Tensor, xh: Tensor, d_xh: Tensor) -> Tensor:
        nx = x.norm(dim=-1, keepdim=True)
        inside = nx > NORM_EPS  # below the floor the norm is a constant
        d = torch.where(inside, d_xh - xh * (xh * d_xh).sum(-1, keepdim=True), d_xh)
        return d / nx.clamp_min(NORM_EPS)

    return through_normalize(prompt, xh, d_xh), through_normalize(concepts, eh, d_eh)


def ewa_merge(psi: Tensor, a: Tensor, b: Tensor, scale: float = 1.0) -> Tensor:
    """Merge G LoRA adapters into one dense weight delta per sample.

    psi: (B, G) float; a: (G, r, Din); b: (G, Dout, r).
    Semantics: delta[b] = Σ_g psi[b,g]·scale·b[g]·a[g]. Returns delta (B, Dout, Din).
    """
    return torch.einsum("bg,gor,grd->bod", psi.to(a.dtype) * scale, b, a)


def ewa_merge_backward(
    grad_delta: Tensor, psi: Tensor, a: Tensor, b: Tensor, scale: float = 1.0
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of :func:`ewa_merge`:
    dpsi[b,g] = scale·⟨dΔ[b], b[g]·a[g]⟩,  da[g] = scale·Σ_b psi[b,g]·b[g]ᵀ·dΔ[b],
    db[g] = scale·Σ_b psi[b,g]·dΔ[b]·a[g]ᵀ.  Returns (dpsi, da, db).
    """
    w = psi.to(a.dtype) * scale
    d_ba = torch.einsum("bod,grd->bgor", grad_delta, a)  # dΔ[b]·a[g]ᵀ
    dpsi = torch.einsum("bgor,gor->bg", d_ba, b) * scale
    da = torch.einsum("bg,gor,bod->grd", w, b, grad_delta)
    db = torch.einsum("bg,bgor->gor", w, d_ba)
    return dpsi.to(psi.dtype), da, db


def ewa_weights_rows(
    prompt: Tensor,
    concepts: Tensor,
    concept_rows: Tensor,
    prompt_mask: Tensor | None = None,
    power: float = 4.0,
    norm: str = "l1",
) -> Tensor:
    """EWA weights ψ from each concept's token rows (the released CIDM code's EWA).

    prompt: (B, L, T, D) per-layer prompt embeddings ĉ^l; concepts: (L, G, W, D) per layer, the W token
    rows of each concept (padded); concept_rows: (G, W) bool, the rows each concept has (≥ 1 each);
    prompt_mask: (B, T) bool, tokens that count (None = all positions, as the released code).
    Semantics: S[b,l,g,w] = max_t cos(prompt[b,l,t], concepts[l,g,w]);
               M[b,l,g] = mean over the rows w of concept g of S[b,l,g,w];
               psi[b,l,g] = M^power / ‖M[b,l,:]^power‖, the norm L1 ("l1") or L2 ("fro").
    Norms floored at NORM_EPS as in :func:`ewa_weights`. Returns psi (B, L, G).
    """
    cos = torch.einsum("bltd,lgwd->bltgw", _normalize(prompt), _normalize(concepts))
    if prompt_mask is not None:
        cos = cos.masked_fill(~prompt_mask[:, None, :, None, None], float("-inf"))
    s = cos.amax(dim=2)  # (B, L, G, W)
    rows = concept_rows.to(s.dtype)
    m = torch.where(concept_rows, s, 0).sum(-1) / rows.sum(-1)
    m_pow = m.pow(power)
    n = m_pow.norm(dim=-1, keepdim=True) if norm == "fro" else m_pow.abs().sum(-1, keepdim=True)
    return m_pow / n.clamp_min(NORM_EPS)


def ewa_weights_rows_backward(
    grad_psi: Tensor,
    prompt: Tensor,
    concepts: Tensor,
    concept_rows: Tensor,
    prompt_mask: Tensor | None = None,
    power: float = 4.0,
    norm: str = "l1",
) -> tuple[Tensor, Tensor]:
    """Gradients of :func:`ewa_weights_rows`; as :func:`ewa_weights_backward` through P = M^power and its
    norm to dM, then the mean spreads dM over each concept's rows, dS[b,l,g,w] = dM·rows[g,w]/n_g, and
    the max routes dS to its argmax token t*: dcos[b,l,t*,g,w] = dS; then through the normalisations.
    Returns (dprompt, dconcepts)."""
    L, G, W, D = concepts.shape
    xh, eh = _normalize(prompt), _normalize(concepts).reshape(L, G * W, D)
    s, t_star = _ewa_similarity(prompt, concepts.reshape(L, G * W, D), prompt_mask)  # (B, L, G·W)
    rows = concept_rows.to(s.dtype)
    count = rows.sum(-1)
    m = torch.where(concept_rows.reshape(-1), s, 0).unflatten(-1, (G, W)).sum(-1) / count
    m_pow = m.pow(power)
    n = m_pow.norm(dim=-1, keepdim=True) if norm == "fro" else m_pow.abs().sum(-1, keepdim=True)
    n = n.clamp_min(NORM_EPS)
    psi = m_pow / n
    sgn = psi if norm == "fro" else m_pow.sign()
    sgn = torch.where(n > NORM_EPS, sgn, 0)
    d_pow = (grad_psi - sgn * (grad_psi * psi).sum(-1, keepdim=True)) / n
    d_m = d_pow * power * m.pow(power - 1)
    d_s = (d_m[..., None] * rows / count[:, None]).flatten(-2)  # (B, L, G·W)
    d_cos = torch.zeros(*prompt.shape[:3], G * W, dtype=prompt.dtype, device=prompt.device)
    d_cos.scatter_(2, t_star.unsqueeze(2), d_s.unsqueeze(2))
    d_xh = torch.einsum("bltg,lgd->bltd", d_cos, eh)
    d_eh = torch.einsum("bltg,bltd->lgd", d_cos, xh).reshape(L, G, W, D)

    def through_normalize(x: Tensor, xh: Tensor, d_xh: Tensor) -> Tensor:
        nx = x.norm(dim=-1, keepdim=True)
        d = torch.where(nx > NORM_EPS, d_xh - xh * (xh * d_xh).sum(-1, keepdim=True), d_xh)
        return d / nx.clamp_min(NORM_EPS)

    return through_normalize(prompt, xh, d_xh), through_normalize(concepts, eh.reshape(L, G, W, D), d_eh)

"""The ``torch`` backend: fast plain-PyTorch implementations of the fused ops for CPU tensors.

``auto`` picks it for CPU tensors (before the reference, which stays the readable definition and
the test oracle). Same semantics as :mod:`lifelong_engine.reference`, computed another way:

- ``regional_cross_attention``: the queries of each (row, slot) are gathered once and attended with
  SDPA against that slot's first ``kv_len`` keys (a length, not a mask: keys past it are never read);
  P = 1 with full keys is one SDPA call. The op's backward runs SDPA's CPU backward kernel per group
  (its forward re-run for the log-sum-exp the backward needs); the trusted entry the processors call
  in training runs the forward under autograd instead (SDPA's own backward, nothing re-run).
- ``lora_kv_projection``: when every row uses the same adapters with the same weights (a training
  batch, one prompt), they are folded into the base weight: one GEMM per projection for base and all
  slots, and a backward through the rank-r factors. Otherwise each row's adapters are gathered once as
  one (S·r, Din) down and (S·r, Dout) up matrix (one batched GEMM down and one up per projection,
  added in place onto the base GEMM). The backward computes only the gradients asked for (``needs``).
  All layers at once (``lora_kv_projection_grouped_layers``, what the trusted entry calls, under
  autograd too): per-layer outputs with no flat buffer; when the factors train (a training step) the
  projection is unfolded, c·Wᵀ + (ω·c·Aᵀ)·Bᵀ, so autograd forms no Dout × Din gradient, and a text
  shared by every layer is projected by one GEMM for all layers' base weights and one for their
  down factors.

``lora_term`` (image-side LoRA) is the reference's (one gather and two einsums per call). The EWA ops
are the reference's: its einsums already run as batched GEMMs (bench/cpu/test_ewa.py: a
stacked-factor bmm version of ``ewa_merge`` measured no faster), and ``ewa_weights`` runs once per
generation.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from . import reference
from .backends import Backend, register_backend

__all__ = [
    "lora_kv_projection",
    "lora_kv_projection_backward",
    "regional_cross_attention",
    "regional_cross_attention_backward",
]

_sdpa_cpu = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_sdpa_cpu_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def _takes_needs(fn):
    """Mark a ``*_backward`` impl that takes ``needs`` (one bool per gradient it returns) and does
    no work for the gradients not needed (it returns zeros there; the ops layer drops them)."""
    fn.takes_needs = True
    return fn


# --------------------------------------------------------------------------- lora_kv


def _row_adapters(a: Tensor, b: Tensor, ids: Tensor, weights: Tensor, scale: float, dtype: torch.dtype):
    """Each row's adapters stacked: down (B, S·r, Din), up (B, S·r, Dout) and the weight of every
    stacked rank row, ω = weights·scale, (B, 1, S·r); empty slots (-1) are zeros (never adapter 0)."""
    bsz, n_slots = ids.shape
    r = a.shape[1]
    valid = ids >= 0
    idx = ids.clamp(min=0).long()
    down = torch.where(valid[..., None, None], a[idx], 0).reshape(bsz, n_slots * r, a.shape[2])
    up = torch.where(valid[..., None, None], b[idx], 0).transpose(-1, -2).reshape(bsz, n_slots * r, b.shape[1])
    omega = torch.where(valid, weights.to(dtype) * scale, 0).repeat_interleave(r, dim=1)[:, None, :]
    return down, up, omega


@dataclasses.dataclass
class _Shared:
    """Adapters used by every row with the same weights (a training batch, one prompt): their pool
    indices and ω = weight·scale, as host values."""

    idx: list[int]
    omega: list[float]

    @staticmethod
    def of(ids: Tensor, weights: Tensor, scale: float) -> _Shared | None:
        rows, row_weights = ids.tolist(), weights.tolist()
        if any(r != rows[0] for r in rows) or any(w != row_weights[0] for w in row_weights):
            return None  # rows differ (a NaN weight differs from itself: the general path)
        used = [(n, w * scale) for n, w in zip(rows[0], row_weights[0]) if n >= 0]
        return _Shared([n for n, _ in used], [w for _, w in used])

    def _whole_pool(self, pool: Tensor) -> bool:
        return self.idx == list(range(pool.shape[0]))

    def stack(self, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        """down (J·r, Din) and up (Dout, J·r) of the used adapters (views when they are the whole pool)."""
        n, r = len(self.idx), a.shape[1]
        if not self._whole_pool(a):
            t = torch.tensor(self.idx, device=a.device)
            a, b = a[t], b[t]
        return a.reshape(n * r, a.shape[2]), b[0] if n == 1 else b.transpose(0, 1).reshape(b.shape[1], n * r)

    def rank_weights(self, r: int, like: Tensor) -> Tensor | None:
        """ω of every stacked rank row (J·r,), or None when every ω is 1."""
        if all(w == 1.0 for w in self.omega):
            return None
        return torch.tensor(self.omega, dtype=like.dtype, device=like.device).repeat_interleave(r)

    def folded(self, w: Tensor, a: Tensor, b: Tensor) -> Tensor:
        """W + Σ_j ω_j·b[idx_j]·a[idx_j], (Dout, Din): one GEMM then serves base and adapters."""
        if not self.idx:
            return w
        down, up = self.stack(a, b)
        om = self.rank_weights(a.shape[1], w)
        return torch.addmm(w, up if om is None else up * om, down)

    def scatter(self, grad: Tensor, pool: Tensor) -> Tensor:
        """The gradient of the pool from the used adapters' (J, …) gradients."""
        if self._whole_pool(pool):
            return grad
        return torch.zeros_like(pool).index_add_(0, torch.tensor(self.idx, device=pool.device), grad)


def _tracked(*tensors: Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def lora_kv_projection(c, w_k, w_v, a_k, b_k, a_v, b_v, ids, weights, scale=1.0):
    if ids.numel() == 0 or a_k.shape[0] == 0:
        return c @ w_k.T, c @ w_v.T
    # Folding reads the weights as host values and, under autograd, would form a Dout × Din gradient of the
    # folded weight: only for factors and weights that nothing trains.
    fold = not _tracked(w_k, w_v, a_k, b_k, a_v, b_v, weights)
    shared = _Shared.of(ids, weights, scale) if fold else None
    if shared is not None:  # one GEMM per projection for base + adapters
        return c @ shared.folded(w_k, a_k, b_k).T, c @ shared.folded(w_v, a_v, b_v).T
    k, v = c @ w_k.T, c @ w_v.T
    for out, a, b in ((k, a_k, b_k), (v, a_v, b_v)):
        down, up, omega = _row_adapters(a, b, ids, weights, scale, c.dtype)
        out.baddbmm_(torch.bmm(c, down.transpose(1, 2)) * omega, up)
    return k, v


def _shared_projection(shared: _Shared, c: Tensor, w: Tensor, douts, a: list, b: list) -> list[Tensor]:
    """One projection (K or V) of every layer, [x_l] (B, T, Dout_l), when every row of every layer uses the
    same adapters with the same weights (a training step) and the factors train: x_l = c_l·W_lᵀ +
    (ω·c_l·A_lᵀ)·B_lᵀ, unfolded, so that autograd never forms a Dout × Din gradient. With one text for
    every layer (c (B, T, Din)) the base projections of all layers are one GEMM against the packed
    weights, and the down projections one more."""
    bsz, t_len, din = c.shape[-3:]
    if c.dim() == 3:
        c2 = c.reshape(-1, din)
        base = (c2 @ w.T).split(list(douts), dim=1)
    else:
        c2 = [c_l.reshape(-1, din) for c_l in c]
        base = [x @ w_l.T for x, w_l in zip(c2, w.split(list(douts)))]
    if not shared.idx:
        return [x.view(bsz, t_len, -1) for x in base]
    downs, ups = zip(*(shared.stack(a_l, b_l) for a_l, b_l in zip(a, b)))
    if c.dim() == 3:
        us = (c2 @ torch.cat(downs).T).split([d.shape[0] for d in downs], dim=1)
    else:
        us = [x @ down.T for x, down in zip(c2, downs)]
    om = shared.rank_weights(a[0].shape[1], c)
    return [torch.addmm(x, u if om is None else u * om, up.T).view(bsz, t_len, -1) for x, u, up in zip(base, us, ups)]


def lora_kv_projection_grouped_layers(c, w_k, w_v, douts, a_k, b_k, a_v, b_v, ids, weights, scale=1.0):
    """:func:`lora_kv_projection_grouped_packed` layer by layer, ([k_l], [v_l]) each (B, T, Dout_l), with no
    flat buffer in between, built from differentiable PyTorch ops: the trusted entry runs it under autograd
    directly (no custom backward). c: (L, B, T, Din), or (B, T, Din) when every layer reads the same text.
    Factors that train, shared by every row and layer with weights that do not: the unfolded, layer-batched
    :func:`_shared_projection`; otherwise :func:`lora_kv_projection` per layer."""
    n_layers = len(douts)
    if n_layers and _tracked(*a_k, *b_k, *a_v, *b_v) and not _tracked(weights):
        shared = _Shared.of(ids.reshape(-1, ids.shape[-1]), weights.reshape(-1, ids.shape[-1]), scale)
        if shared is not None:
            return _shared_projection(shared, c, w_k, douts, a_k, b_k), _shared_projection(
                shared, c, w_v, douts, a_v, b_v
            )
    texts = [c] * n_layers if c.dim() == 3 else c
    ws_k, ws_v = w_k.split(list(douts)), w_v.split(list(douts))
    ks, vs = [], []
    for layer in range(n_layers):
        k, v = lora_kv_projection(
            texts[layer], ws_k[layer], ws_v[layer], a_k[layer], b_k[layer], a_v[layer], b_v[layer], ids[layer],
            weights[layer], scale,
        )  # fmt: skip
        ks.append(k)
        vs.append(v)
    return ks, vs


def lora_kv_projection_grouped(c, w_k, w_v, a_k, b_k, a_v, b_v, ids, weights, scale=1.0):
    """The per-layer fast path above, once per layer (on CPU one launch buys nothing)."""
    return reference.lora_kv_projection_grouped(
        c, w_k, w_v, a_k, b_k, a_v, b_v, ids, weights, scale, lora_kv_projection
    )


def lora_kv_projection_grouped_packed(c, w_k, w_v, douts, a_k, b_k, a_v, b_v, ids, weights, scale=1.0):
    """Packed base weights split into per-layer views (no copy), then the per-layer fast path."""
    ks, vs = lora_kv_projection_grouped_layers(c, w_k, w_v, douts, a_k, b_k, a_v, b_v, ids, weights, scale)
    if not ks:
        return c.new_empty(0), c.new_empty(0)
    return torch.cat([k.reshape(-1) for k in ks]), torch.cat([v.reshape(-1) for v in vs])


lora_kv_projection_grouped_packed.layers = lora_kv_projection_grouped_layers


@_takes_needs
def lora_kv_projection_grouped_backward(
    grad_k, grad_v, c, w_k, w_v, a_k, b_k, a_v, b_v, ids, weights, scale=1.0, needs=None
):
    """The per-layer backward above, once per layer, computing only the gradients in ``needs``."""
    return reference.lora_kv_projection_grouped_backward(
        grad_k, grad_v, c, w_k, w_v, a_k, b_k, a_v, b_v, ids, weights, scale,
        functools.partial(lora_kv_projection_backward, needs=needs),
    )  # fmt: skip


def _shared_backward(shared: _Shared, c, g, w, a, b, need_c, need_a, need_b) -> tuple:
    """(dc part, da, db) of one projection when every row shares its adapters, the rows flattened to
    (B·T, ·): dc = dK·W' (W' the folded weight), and through the rank-r factors (never a Dout × Din
    gradient): dA_j = ω_j·(dK·B_j)ᵀ·c, dB_j = ω_j·dKᵀ·(c·A_jᵀ). Not needed: None."""
    g2, c2 = g.reshape(-1, g.shape[-1]), c.reshape(-1, c.shape[-1])
    dc = g2 @ shared.folded(w, a, b) if need_c else None
    if not shared.idx or not (need_a or need_b):
        return dc, None, None
    n, r = len(shared.idx), a.shape[1]
    down, up = shared.stack(a, b)
    om = shared.rank_weights(r, c)
    da = db = None
    if need_a:
        gu = g2 @ up  # (B·T, J·r)
        da = shared.scatter((gu if om is None else gu * om).T.mm(c2).reshape(n, r, a.shape[2]), a)
    if need_b:
        u = c2 @ down.T  # (B·T, J·r)
        db = g2.T.mm(u if om is None else u * om).reshape(b.shape[1], n, r).transpose(0, 1)
        db = shared.scatter(db, b)
    return dc, da, db


@_takes_needs
def lora_kv_projection_backward(grad_k, grad_v, c, w_k, w_v, a_k, b_k, a_v, b_v, ids, weights, scale=1.0, needs=None):
    """(dc, da_k, db_k, da_v, db_v, dweights), the reference's formulas by stacked GEMMs; with u = c·Aᵀ
    and gu = dK·B per stacked rank row: dc += (ω·gu)·A, dA = (ω·gu)ᵀ·c, dB = dKᵀ·(ω·u), dω = Σ gu·u.
    When every row shares its adapters and weights and dweights is not needed: by the folded weight."""
    need_c, need_ak, need_bk, need_av, need_bv, need_w = (True,) * 6 if needs is None else needs
    dweights = torch.zeros(weights.shape, dtype=c.dtype, device=c.device)
    bsz, n_slots = ids.shape
    shared = None if need_w or ids.numel() == 0 or a_k.shape[0] == 0 else _Shared.of(ids, weights, scale)
    if shared is not None:
        dc_k, da_k, db_k = _shared_backward(shared, c, grad_k, w_k, a_k, b_k, need_c, need_ak, need_bk)
        dc_v, da_v, db_v = _shared_backward(shared, c, grad_v, w_v, a_v, b_v, need_c, need_av, need_bv)
        dc = (dc_k + dc_v).view_as(c) if need_c else torch.zeros_like(c)
        grads = [
            g if g is not None else torch.zeros_like(t) for g, t in zip((da_k, db_k, da_v, db_v), (a_k, b_k, a_v, b_v))
        ]
        return (dc, *grads, dweights.to(weights.dtype))
    grads = [torch.zeros_like(t) for t in (a_k, b_k, a_v, b_v)]
    if ids.numel() == 0 or a_k.shape[0] == 0:
        dc = grad_k @ w_k + grad_v @ w_v if need_c else torch.zeros_like(c)
        return (dc, *grads, dweights.to(weights.dtype))
    dc = grad_k @ w_k + grad_v @ w_v if need_c else torch.zeros_like(c)
    idx = ids.clamp(min=0).long().reshape(-1)
    for j, (a, b, g) in enumerate(((a_k, b_k, grad_k), (a_v, b_v, grad_v))):
        need_a, need_b = (need_ak, need_bk) if j == 0 else (need_av, need_bv)
        if not (need_c or need_a or need_b or need_w):
            continue
        down, up, omega = _row_adapters(a, b, ids, weights, scale, c.dtype)
        r = a.shape[1]
        gu = torch.bmm(g, up.transpose(1, 2)) if need_c or need_a or need_w else None  # (B, T, S·r)
        u = torch.bmm(c, down.transpose(1, 2)) if need_b or need_w else None
        if need_c or need_a:
            gu_w = gu * omega
            if need_c:
                dc.baddbmm_(gu_w, down)
            if need_a:
                da = torch.bmm(gu_w.transpose(1, 2), c).reshape(bsz * n_slots, r, a.shape[2])
                grads[2 * j].index_add_(0, idx, da)
        if need_b:
            db = torch.bmm((u * omega).transpose(1, 2), g).reshape(bsz * n_slots, r, b.shape[1])
            grads[2 * j + 1].index_add_(0, idx, db.transpose(1, 2))
        if need_w:
            dweights += (gu * u).sum(1).reshape(bsz, n_slots, r).sum(-1) * scale
    dweights = torch.where(ids >= 0, dweights, 0)
    return (dc, *grads, dweights.to(weights.dtype))


# ------------------------------------------------------------------ regional attention


def _groups(region_ids: Tensor, kv_len: Tensor | None, n_slots: int, t_len: int):
    """Queries of each row ordered by slot (stable), and per row the (slot, start, count, keys) of
    each non-empty group of queries. One host sync for the counts, one for kv_len."""
    bsz, n_q = region_ids.shape
    order = torch.argsort(region_ids, dim=1, stable=True)
    key = region_ids.long() + n_slots * torch.arange(bsz, device=region_ids.device)[:, None]
    counts = torch.bincount(key.flatten(), minlength=bsz * n_slots).view(bsz, n_slots).tolist()
    lens = [[t_len] * n_slots] * bsz if kv_len is None else kv_len.tolist()
    groups = []
    for row in range(bsz):
        start, row_groups = 0, []
        for slot in range(n_slots):
            if counts[row][slot]:
                row_groups.append((slot, start, counts[row][slot], lens[row][slot]))
            start += counts[row][slot]
        groups.append(row_groups)
    return order, groups


def _single_slot(k: Tensor, kv_len: Tensor | None) -> int | None:
    """The key count shared by every row when P = 1 and every row has the same kv_len, else None."""
    if k.shape[1] != 1:
        return None
    if kv_len is None:
        return k.shape[3]
    lens = kv_len.unique()
    return int(lens) if lens.numel() == 1 else None


def regional_cross_attention(q, k, v, region_ids, kv_len=None, scale=None):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    keys = _single_slot(k, kv_len)
    if keys is not None:  # plain cross-attention
        return F.scaled_dot_product_attention(q, k[:, 0, :, :keys], v[:, 0, :, :keys], scale=scale)
    order, groups = _groups(region_ids, kv_len, k.shape[1], k.shape[3])
    # Rows and slots are taken apart by unbind/split; under autograd each row's output is its own
    # tensor and the rows are joined by stack: one backward node each, where indexing a row (k[row],
    # out[row]) would write a gradient of the whole batch per row and slot (a training batch of 32
    # rows spent a third of its step there). Without autograd rows are written straight into the output.
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    out = None if grad else torch.empty_like(q)
    rows = []
    for row, (q_row, k_row, v_row, order_row, row_groups) in enumerate(
        zip(q.unbind(0), k.split(1), v.split(1), order, groups)
    ):
        k_slots, v_slots = k_row.split(1, dim=1), v_row.split(1, dim=1)  # (1, 1, H, T, d) each; SDPA gets 4-D
        if len(row_groups) == 1:  # every query of the row reads one slot: no gather
            slot, _, _, keys = row_groups[0]
            kk, vv = k_slots[slot][:, 0, :, :keys], v_slots[slot][:, 0, :, :keys]
            part = F.scaled_dot_product_attention(q_row[None], kk, vv, scale=scale)[0]
            if grad:
                rows.append(part)
            else:
                out[row].copy_(part)
            continue
        dest = torch.empty_like(q_row) if grad else out[row]
        qs = q_row.index_select(1, order_row)  # (H, N, d), grouped by slot
        for slot, start, n, keys in row_groups:  # each slot's queries (a strided view) against its keys
            kk, vv = k_slots[slot][:, 0, :, :keys], v_slots[slot][:, 0, :, :keys]
            part = F.scaled_dot_product_attention(qs[None, :, start : start + n], kk, vv, scale=scale)
            dest.index_copy_(1, order_row[start : start + n], part[0])
        rows.append(dest)
    if not grad:
        return out
    return torch.stack(rows) if rows else torch.empty_like(q)  # B = 0


regional_cross_attention.differentiable = True  # SDPA, unbind/split/stack, index_select, slices


def _attention_vjp(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, scale: float):
    """(dq, dk, dv) of SDPA by its CPU kernels: the forward re-run for the log-sum-exp, then the backward."""
    q, k, v, grad_out = (t.contiguous() for t in (q, k, v, grad_out))
    out, lse = _sdpa_cpu(q, k, v, 0.0, False, scale=scale)
    return _sdpa_cpu_backward(grad_out, q, k, v, out, lse, 0.0, False, scale=scale)


def regional_cross_attention_backward(grad_out, q, k, v, region_ids, kv_len=None, scale=None):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    dk, dv = torch.zeros_like(k), torch.zeros_like(v)
    keys = _single_slot(k, kv_len)
    if keys is not None:
        dq, dk[:, 0, :, :keys], dv[:, 0, :, :keys] = _attention_vjp(
            grad_out, q, k[:, 0, :, :keys], v[:, 0, :, :keys], scale
        )
        return dq, dk, dv
    order, groups = _groups(region_ids, kv_len, k.shape[1], k.shape[3])
    dq = torch.empty_like(q)
    for row, row_groups in enumerate(groups):
        rows = slice(row, row + 1)
        if not row_groups:  # no queries
            continue
        if len(row_groups) == 1:
            slot, _, _, keys = row_groups[0]
            dq[rows], dk[rows, slot, :, :keys], dv[rows, slot, :, :keys] = _attention_vjp(
                grad_out[rows], q[rows], k[rows, slot, :, :keys], v[rows, slot, :, :keys], scale
            )
            continue
        qs, gs = q[row].index_select(1, order[row]), grad_out[row].index_select(1, order[row])
        parts = []
        for slot, start, n, keys in row_groups:
            span = slice(start, start + n)
            dq_g, dk[rows, slot, :, :keys], dv[rows, slot, :, :keys] = _attention_vjp(
                gs[None, :, span], qs[None, :, span], k[rows, slot, :, :keys], v[rows, slot, :, :keys], scale
            )
            parts.append(dq_g[0])
        dq[row].index_copy_(1, order[row], torch.cat(parts, dim=1))
    return dq, dk, dv


def why_not(op: str, args: tuple) -> str | None:
    device = next(a.device for a in args if isinstance(a, Tensor))
    if device.type != "cpu":
        return f"tensors are on {device}; it runs CPU tensors (its attention backward is SDPA's CPU kernel)"
    return None


def register() -> None:
    impls = {name: globals()[name] for op in ("lora_kv_projection", "regional_cross_attention")
             for name in (op, op + "_backward")}  # fmt: skip
    for name in (
        "lora_kv_projection_grouped",
        "lora_kv_projection_grouped_packed",
        "lora_kv_projection_grouped_backward",
    ):
        impls[name] = globals()[name]
    impls |= {name: getattr(reference, name) for op in ("lora_term", "ewa_weights", "ewa_merge")
              for name in (op, op + "_backward")}  # fmt: skip
    register_backend(Backend("torch", impls, why_not, auto_devices=("cpu",)))


register()

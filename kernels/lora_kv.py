"""Base K/V projection plus many LoRA adapters per sample, fused (DESIGN §3.1).

Semantics (c: (B, T, Din); W: (Dout, Din); a: (N, r, Din); b: (N, Dout, r); ids, weights: (B, S)):
  u_bs   = c[b]·a[ids[b,s]]ᵀ                      (T, r)   the shrink, one per used slot
  ω_bs   = weights[b,s]·scale, 0 on empty slots (ids = -1)
  k[b]   = c[b]·W_kᵀ + Σ_s ω_bs·u_bs·b_k[ids[b,s]]ᵀ   (T, Dout); v likewise with W_v, a_v, b_v
Backward (g = dK, and the same terms for V added):
  gb_bs  = g[b]·b[ids[b,s]]                       (T, r)
  dc[b]  = g[b]·W + Σ_s ω_bs·gb_bs·a[ids[b,s]]
  da[n]  = Σ_{(b,s): ids=n} ω_bs·gb_bsᵀ·c[b],   db[n] = Σ_{(b,s): ids=n} ω_bs·g[b]ᵀ·u_bs
  dweights[b,s] = scale·Σ_{t,ρ} gb_bs[t,ρ]·u_bs[t,ρ]   (0 on empty slots)

Layout trick used by every kernel: the used slots of a sample are compacted to the front of
its row on the host (a stable sort of ``ids < 0``, no device sync), and slot s, rank row ρ
become one "slot-rank" axis j = s·r + ρ of length J_b = n_valid[b]·r. Along it the gathered
adapters form A_cat (J, Din) and B_cat (Dout, J), so the shrink of all slots is ONE GEMM
c·A_catᵀ and the expand ONE GEMM (ω ⊙ u)·B_catᵀ, tensor-core sized (j is padded to ≥ 16 with
masks; r = 4 and S = 4 fill exactly one 16-wide block). Loops over j run to J_b, read from
memory: empty slots cost no FLOPs and no bytes, and a sample without adapters skips the
low-rank part entirely.

Forward, one launch (``_lora_kv_fwd_kernel``), grid (tiles, T / BLOCK_T, B), a tile being
(layer, Dout block): per program, a Din loop accumulates c·W_kᵀ and c·W_vᵀ in fp32, then for
each BLOCK_J chunk of slot-ranks a second Din loop accumulates u_k, u_v (fp32), which are
scaled by ω in-kernel and expanded into the same K/V accumulators; one store per output.
The shrink is recomputed by every Dout block of a row tile: J/BLOCK_O more FLOPs than the base
GEMM (25 % at J = 16, BLOCK_O = 64), whose c and A reads hit L2. The op is bound by reading the
weights (B·T FLOP per weight byte: 154 for SD-1.5 at B = 2, below a GPU's ridge point), so this
is cheaper than a second launch plus a round trip of u through memory for the typical serving
shape (few slots, r ≤ 16). A two-stage design (shrink kernel writing u, then base + expand)
would win for J in the hundreds (EWA over very many concepts without top-k).
The Din loops of the base GEMM and of the shrink are kept apart so that the base GEMM stays a
plain, well-pipelined loop and the low-rank loop can run a data-dependent trip count.

Grouped forward (all L cross-attention layers of a UNet in one launch): the per-layer weights
are packed — W_k, W_v concatenated along Dout to (ΣDout, Din), a stacked to (L, N, r, Din),
b concatenated along Dout to (N, ΣDout, r) — and a tile table lists (layer, first column) of
every BLOCK_O-wide column block of every layer; layer l's columns start at col_l = Σ_{l'<l}
Dout_l', and its output (B, T, Dout_l) sits at offset B·T·col_l of one flat buffer. The
single-layer op is the L = 1 case of the same kernel (no packing copy). :func:`pack_layers`
packs once for reuse (frozen base weights, a fixed serving pool).

Backward, four launches: ``_lora_kv_bwd_lowrank_kernel`` (grid (T / 16, B)) writes
u and gb for every used slot-rank to fp32 scratch (B, T, S·r) and atomically adds the
per-slot-rank partial sums of gb ⊙ u (dweights); ``_lora_kv_bwd_dc_kernel`` (grid
(Din / BLOCK_D, T / BLOCK_T, B)) computes dc = dK·W_k + dV·W_v + (ω ⊙ gb)·A_cat (K and V);
``_lora_kv_bwd_adapter_kernel`` runs twice (da: X = gb, Y = c; db: X = u, Y = dK/dV) and
adds ω·Xᵀ·Y of each sample with fp32 atomics into one fp32 row per slot of the batch (the row
of the first slot holding the same adapter, so repeated ids just add); those rows are then
added into zero gradients of the pool's shape in the adapters' dtype. Scratch follows the
slots used (B·S rows), not the pool size N.
Determinism: the fp32 atomic adds (adapter rows shared by several slots; dweights over T
blocks) run in an order the GPU does not fix, so adapter gradients and dweights may differ in
the last bits run to run (within rtol 1e-5, tested); dc, u and gb are deterministic.

Precision: operands enter tl.dot in their own dtype (fp16/bf16 tensor cores); fp32 inputs use
TF32 only when PyTorch would (:func:`.precision.fp32_matmul_allows_tf32`), else IEEE fp32.
Accumulation is fp32; the low-rank intermediates (u, gb, fp32) are rounded to the input dtype
before their second GEMM, as a PyTorch computation in that dtype does.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from .precision import fp32_matmul_allows_tf32

__all__ = [
    "LayerPack",
    "TileConfig",
    "default_config",
    "lora_kv_projection",
    "lora_kv_projection_backward",
    "lora_kv_projection_grouped",
    "pack_layers",
    "why_not",
]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_GRID_YZ = 65535  # CUDA's limit on grid dims 1 and 2


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _mma(a, b, acc, IEEE: tl.constexpr):
    """acc + a·b with fp32 accumulation; IEEE fp32 products when asked (else TF32 for fp32)."""
    return tl.dot(a, b, acc, input_precision="ieee") if IEEE else tl.dot(a, b, acc)


@triton.jit
def _slot_ranks(ids_ptr, wts_ptr, b, j0, n_j, R, S, scale, BLOCK_J: tl.constexpr):
    """One chunk of the compacted slot-rank axis of row b of ids: for j = s·R + ρ in
    [j0, j0 + BLOCK_J), the adapter id (int64), rank row ρ, ω = weights·scale, and j < n_j."""
    offs_j = j0 + tl.arange(0, BLOCK_J)
    j_ok = offs_j < n_j
    slot = offs_j // R
    rho = offs_j % R
    idx = tl.load(ids_ptr + b * S + slot, mask=j_ok, other=0).to(tl.int64)
    omega = tl.load(wts_ptr + b * S + slot, mask=j_ok, other=0.0) * scale
    return offs_j, j_ok, idx, rho, omega


@triton.jit
def _shrink(
    c_base,
    ak_base,
    av_base,
    a_offs,
    j_ok,
    offs_t,
    t_ok,
    DIN,
    stride_ct,
    stride_cd,
    stride_ad,
    IEEE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_J: tl.constexpr,
):
    """u_k, u_v = c·A_catᵀ for one chunk of slot-ranks ((BLOCK_T, BLOCK_J), fp32).
    a_offs (1, BLOCK_J): element offset of row (id_j, ρ_j) in a; masked columns are 0."""
    u_k = tl.zeros((BLOCK_T, BLOCK_J), dtype=tl.float32)
    u_v = tl.zeros((BLOCK_T, BLOCK_J), dtype=tl.float32)
    for d0 in range(0, DIN, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_ok = offs_d < DIN
        x = tl.load(
            c_base + offs_t[:, None] * stride_ct + offs_d[None, :] * stride_cd,
            mask=t_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        a_ptrs = a_offs + offs_d[:, None].to(tl.int64) * stride_ad
        a_mask = d_ok[:, None] & j_ok[None, :]
        u_k = _mma(x, tl.load(ak_base + a_ptrs, mask=a_mask, other=0.0), u_k, IEEE)
        u_v = _mma(x, tl.load(av_base + a_ptrs, mask=a_mask, other=0.0), u_v, IEEE)
    return u_k, u_v


@triton.jit
def _lora_kv_fwd_kernel(
    c_ptr,
    wk_ptr,
    wv_ptr,
    ak_ptr,
    bk_ptr,
    av_ptr,
    bv_ptr,
    ids_ptr,
    wts_ptr,
    nvalid_ptr,
    tiles_ptr,
    layers_ptr,
    k_ptr,
    v_ptr,
    B,
    T,
    DIN,
    R,
    S,
    ids_layer_rows,
    scale,
    stride_cl,
    stride_cb,
    stride_ct,
    stride_cd,
    stride_wo,
    stride_wd,
    stride_al,
    stride_an,
    stride_ar,
    stride_ad,
    stride_bn,
    stride_bo,
    stride_br,
    IEEE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_O: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_J: tl.constexpr,
):
    """One (BLOCK_T × BLOCK_O) tile of K and of V of one sample and one layer.

    c (L, B, T, Din); packed W_k, W_v (ΣDout, Din); a (L, N, R, Din); b (N, ΣDout, R);
    ids, wts (L·B, S) compacted (used slots first, int32 / fp32), nvalid (L·B,) int32: layer l's rows
    start at l·ids_layer_rows (B: per-layer ids; 0: one (B, S) set shared by all layers);
    tiles (n_tiles, 2) int32 = (layer, first column in the layer); layers (L, 2) int64 =
    (Dout_l, col_l). Output of layer l: (B, T, Dout_l) contiguous at offset B·T·col_l.
      acc = c·W[col_l + o]ᵀ + Σ_j ω_j·(c·a[l, id_j, ρ_j]ᵀ)·b[id_j, col_l + o, ρ_j]
    """
    pid_tile = tl.program_id(0)
    pid_t = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    layer = tl.load(tiles_ptr + 2 * pid_tile).to(tl.int64)
    o_start = tl.load(tiles_ptr + 2 * pid_tile + 1)
    dout = tl.load(layers_ptr + 2 * layer)
    col = tl.load(layers_ptr + 2 * layer + 1)

    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = offs_t < T
    offs_o = o_start + tl.arange(0, BLOCK_O)
    o_ok = offs_o < dout
    rows = col + offs_o.to(tl.int64)  # column index in the packed weights
    c_base = c_ptr + layer * stride_cl + b * stride_cb

    acc_k = tl.zeros((BLOCK_T, BLOCK_O), dtype=tl.float32)
    acc_v = tl.zeros((BLOCK_T, BLOCK_O), dtype=tl.float32)
    for d0 in range(0, DIN, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_ok = offs_d < DIN
        x = tl.load(
            c_base + offs_t[:, None] * stride_ct + offs_d[None, :] * stride_cd,
            mask=t_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        w_offs = rows[None, :] * stride_wo + offs_d[:, None] * stride_wd  # (BLOCK_D, BLOCK_O) = Wᵀ
        w_mask = d_ok[:, None] & o_ok[None, :]
        acc_k = _mma(x, tl.load(wk_ptr + w_offs, mask=w_mask, other=0.0), acc_k, IEEE)
        acc_v = _mma(x, tl.load(wv_ptr + w_offs, mask=w_mask, other=0.0), acc_v, IEEE)

    id_row = layer * ids_layer_rows + b  # this sample's slots in this layer
    n_j = tl.load(nvalid_ptr + id_row) * R  # used slot-ranks of this sample; 0 skips the low-rank part
    for j0 in range(0, n_j, BLOCK_J):
        offs_j, j_ok, idx, rho, omega = _slot_ranks(ids_ptr, wts_ptr, id_row, j0, n_j, R, S, scale, BLOCK_J)
        a_offs = (idx * stride_an + rho * stride_ar)[None, :]
        u_k, u_v = _shrink(
            c_base,
            ak_ptr + layer * stride_al,
            av_ptr + layer * stride_al,
            a_offs,
            j_ok,
            offs_t,
            t_ok,
            DIN,
            stride_ct,
            stride_cd,
            stride_ad,
            IEEE,
            BLOCK_T,
            BLOCK_D,
            BLOCK_J,
        )
        b_offs = (idx * stride_bn + rho * stride_br)[:, None] + rows[None, :] * stride_bo  # (BLOCK_J, BLOCK_O)
        b_mask = j_ok[:, None] & o_ok[None, :]
        bk = tl.load(bk_ptr + b_offs, mask=b_mask, other=0.0)
        bv = tl.load(bv_ptr + b_offs, mask=b_mask, other=0.0)
        acc_k = _mma((u_k * omega[None, :]).to(bk.dtype), bk, acc_k, IEEE)
        acc_v = _mma((u_v * omega[None, :]).to(bv.dtype), bv, acc_v, IEEE)

    out_offs = B * T * col + b * T * dout + offs_t[:, None].to(tl.int64) * dout + offs_o[None, :]
    out_mask = t_ok[:, None] & o_ok[None, :]
    tl.store(k_ptr + out_offs, acc_k.to(k_ptr.dtype.element_ty), mask=out_mask)
    tl.store(v_ptr + out_offs, acc_v.to(v_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _lora_kv_bwd_lowrank_kernel(
    c_ptr,
    gk_ptr,
    gv_ptr,
    ak_ptr,
    bk_ptr,
    av_ptr,
    bv_ptr,
    ids_ptr,
    wts_ptr,
    nvalid_ptr,
    u_ptr,
    gb_ptr,
    dw_ptr,
    B,
    T,
    DIN,
    DOUT,
    R,
    S,
    stride_cb,
    stride_ct,
    stride_cd,
    stride_gb,
    stride_gt,
    stride_go,
    stride_an,
    stride_ar,
    stride_ad,
    stride_bn,
    stride_bo,
    stride_br,
    IEEE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_O: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_J: tl.constexpr,
):
    """For one (sample, T block), every used slot-rank j = s·R + ρ:
      u[kv, b, t, j]  = c[b, t]·a_kv[id_j, ρ]        gb[kv, b, t, j] = g_kv[b, t]·b_kv[id_j, :, ρ]
      dw[b, j]       += Σ_t (gb·u)[k] + (gb·u)[v]    (fp32 atomics across T blocks)
    u, gb: (2, B, T, S·R) fp32 scratch; only the n_valid[b]·R first j are written."""
    pid_t = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    JP = S * R
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = offs_t < T
    c_base = c_ptr + b * stride_cb
    n_j = tl.load(nvalid_ptr + b) * R
    for j0 in range(0, n_j, BLOCK_J):
        offs_j, j_ok, idx, rho, _ = _slot_ranks(ids_ptr, wts_ptr, b, j0, n_j, R, S, 1.0, BLOCK_J)
        a_offs = (idx * stride_an + rho * stride_ar)[None, :]
        u_k, u_v = _shrink(
            c_base,
            ak_ptr,
            av_ptr,
            a_offs,
            j_ok,
            offs_t,
            t_ok,
            DIN,
            stride_ct,
            stride_cd,
            stride_ad,
            IEEE,
            BLOCK_T,
            BLOCK_D,
            BLOCK_J,
        )
        gb_k = tl.zeros((BLOCK_T, BLOCK_J), dtype=tl.float32)
        gb_v = tl.zeros((BLOCK_T, BLOCK_J), dtype=tl.float32)
        b_offs = (idx * stride_bn + rho * stride_br)[None, :]
        for o0 in range(0, DOUT, BLOCK_O):
            offs_o = o0 + tl.arange(0, BLOCK_O)
            o_ok = offs_o < DOUT
            g_offs = b * stride_gb + offs_t[:, None] * stride_gt + offs_o[None, :] * stride_go
            g_mask = t_ok[:, None] & o_ok[None, :]
            bt_offs = b_offs + offs_o[:, None].to(tl.int64) * stride_bo  # (BLOCK_O, BLOCK_J) = B_cat
            bt_mask = o_ok[:, None] & j_ok[None, :]
            gk = tl.load(gk_ptr + g_offs, mask=g_mask, other=0.0)
            gv = tl.load(gv_ptr + g_offs, mask=g_mask, other=0.0)
            gb_k = _mma(gk, tl.load(bk_ptr + bt_offs, mask=bt_mask, other=0.0), gb_k, IEEE)
            gb_v = _mma(gv, tl.load(bv_ptr + bt_offs, mask=bt_mask, other=0.0), gb_v, IEEE)
        s_offs = b * T * JP + offs_t[:, None].to(tl.int64) * JP + offs_j[None, :]
        s_mask = t_ok[:, None] & j_ok[None, :]
        kv_stride = B * T * JP
        tl.store(u_ptr + s_offs, u_k, mask=s_mask)
        tl.store(u_ptr + kv_stride + s_offs, u_v, mask=s_mask)
        tl.store(gb_ptr + s_offs, gb_k, mask=s_mask)
        tl.store(gb_ptr + kv_stride + s_offs, gb_v, mask=s_mask)
        dw = tl.sum(gb_k * u_k + gb_v * u_v, axis=0)  # masked rows are 0
        tl.atomic_add(dw_ptr + b * JP + offs_j, dw, mask=j_ok)


@triton.jit
def _lora_kv_bwd_dc_kernel(
    gk_ptr,
    gv_ptr,
    wk_ptr,
    wv_ptr,
    ak_ptr,
    av_ptr,
    ids_ptr,
    wts_ptr,
    nvalid_ptr,
    gb_ptr,
    dc_ptr,
    B,
    T,
    DIN,
    DOUT,
    R,
    S,
    scale,
    stride_gb,
    stride_gt,
    stride_go,
    stride_wo,
    stride_wd,
    stride_an,
    stride_ar,
    stride_ad,
    IEEE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_O: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_J: tl.constexpr,
):
    """dc[b, t, d] = dK·W_k + dV·W_v + Σ_j ω_j·(gb_k[b, t, j]·a_k[id_j, ρ_j, d] + gb_v·a_v),
    one (BLOCK_T × BLOCK_D) tile; dc (B, T, Din) contiguous, gb the fp32 scratch of the
    low-rank kernel."""
    pid_d = tl.program_id(0)
    pid_t = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    JP = S * R
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = offs_t < T
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = offs_d < DIN

    acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    for o0 in range(0, DOUT, BLOCK_O):
        offs_o = o0 + tl.arange(0, BLOCK_O)
        o_ok = offs_o < DOUT
        g_offs = b * stride_gb + offs_t[:, None] * stride_gt + offs_o[None, :] * stride_go
        g_mask = t_ok[:, None] & o_ok[None, :]
        w_offs = offs_o[:, None].to(tl.int64) * stride_wo + offs_d[None, :] * stride_wd
        w_mask = o_ok[:, None] & d_ok[None, :]
        gk = tl.load(gk_ptr + g_offs, mask=g_mask, other=0.0)
        gv = tl.load(gv_ptr + g_offs, mask=g_mask, other=0.0)
        acc = _mma(gk, tl.load(wk_ptr + w_offs, mask=w_mask, other=0.0), acc, IEEE)
        acc = _mma(gv, tl.load(wv_ptr + w_offs, mask=w_mask, other=0.0), acc, IEEE)

    n_j = tl.load(nvalid_ptr + b) * R
    for j0 in range(0, n_j, BLOCK_J):
        offs_j, j_ok, idx, rho, omega = _slot_ranks(ids_ptr, wts_ptr, b, j0, n_j, R, S, scale, BLOCK_J)
        s_offs = b * T * JP + offs_t[:, None].to(tl.int64) * JP + offs_j[None, :]
        s_mask = t_ok[:, None] & j_ok[None, :]
        a_offs = (idx * stride_an + rho * stride_ar)[:, None] + offs_d[None, :] * stride_ad  # (BLOCK_J, BLOCK_D)
        a_mask = j_ok[:, None] & d_ok[None, :]
        ak = tl.load(ak_ptr + a_offs, mask=a_mask, other=0.0)
        av = tl.load(av_ptr + a_offs, mask=a_mask, other=0.0)
        gbk = tl.load(gb_ptr + s_offs, mask=s_mask, other=0.0) * omega[None, :]
        gbv = tl.load(gb_ptr + B * T * JP + s_offs, mask=s_mask, other=0.0) * omega[None, :]
        acc = _mma(gbk.to(ak.dtype), ak, acc, IEEE)
        acc = _mma(gbv.to(av.dtype), av, acc, IEEE)

    out_offs = b * T * DIN + offs_t[:, None].to(tl.int64) * DIN + offs_d[None, :]
    tl.store(dc_ptr + out_offs, acc.to(dc_ptr.dtype.element_ty), mask=t_ok[:, None] & d_ok[None, :])


@triton.jit
def _lora_kv_bwd_adapter_kernel(
    xk_ptr,
    xv_ptr,
    yk_ptr,
    yv_ptr,
    outk_ptr,
    outv_ptr,
    ids_ptr,
    wts_ptr,
    nvalid_ptr,
    T,
    X,
    R,
    S,
    scale,
    stride_yb,
    stride_yt,
    stride_yx,
    stride_on,
    stride_or,
    stride_ox,
    IEEE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_X: tl.constexpr,
    BLOCK_J: tl.constexpr,
):
    """out_kv[id_j, ρ_j, x] += ω_j·Σ_t xs_kv[b, t, j]·y_kv[b, t, x] for one sample b and one
    BLOCK_X block of x, over every used slot-rank j (fp32 atomics: repeated ids add up).
      da: xs = gb, y = c  (x over Din, out (N, R, Din));  db: xs = u, y = dK / dV (x over Dout,
      out (N, Dout, R), i.e. stride_or = 1, stride_ox = R).
    xs: (B, T, S·R) fp32 scratch; y: (B, T, X) with strides; out: fp32."""
    pid_x = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    JP = S * R
    offs_x = pid_x * BLOCK_X + tl.arange(0, BLOCK_X)
    x_ok = offs_x < X
    n_j = tl.load(nvalid_ptr + b) * R
    for j0 in range(0, n_j, BLOCK_J):
        offs_j, j_ok, idx, rho, omega = _slot_ranks(ids_ptr, wts_ptr, b, j0, n_j, R, S, scale, BLOCK_J)
        acc_k = tl.zeros((BLOCK_J, BLOCK_X), dtype=tl.float32)
        acc_v = tl.zeros((BLOCK_J, BLOCK_X), dtype=tl.float32)
        for t0 in range(0, T, BLOCK_T):
            offs_t = t0 + tl.arange(0, BLOCK_T)
            t_ok = offs_t < T
            xs_offs = b * T * JP + offs_t[None, :].to(tl.int64) * JP + offs_j[:, None]  # (BLOCK_J, BLOCK_T)
            xs_mask = j_ok[:, None] & t_ok[None, :]
            y_offs = b * stride_yb + offs_t[:, None] * stride_yt + offs_x[None, :] * stride_yx
            y_mask = t_ok[:, None] & x_ok[None, :]
            yk = tl.load(yk_ptr + y_offs, mask=y_mask, other=0.0)
            yv = tl.load(yv_ptr + y_offs, mask=y_mask, other=0.0)
            xk = tl.load(xk_ptr + xs_offs, mask=xs_mask, other=0.0).to(yk.dtype)
            xv = tl.load(xv_ptr + xs_offs, mask=xs_mask, other=0.0).to(yv.dtype)
            acc_k = _mma(xk, yk, acc_k, IEEE)
            acc_v = _mma(xv, yv, acc_v, IEEE)
        o_offs = (idx * stride_on + rho * stride_or)[:, None] + offs_x[None, :].to(tl.int64) * stride_ox
        o_mask = j_ok[:, None] & x_ok[None, :]
        tl.atomic_add(outk_ptr + o_offs, acc_k * omega[:, None], mask=o_mask)
        tl.atomic_add(outv_ptr + o_offs, acc_v * omega[:, None], mask=o_mask)


# ---------------------------------------------------------------------------- launchers


@dataclass(frozen=True)
class TileConfig:
    """Tile sizes of the kernels (all powers of two ≥ 16, as tl.dot needs): rows of T, columns
    of Dout, the Din step, slot-ranks per chunk; and warps per program."""

    block_t: int
    block_o: int
    block_d: int
    block_j: int
    num_warps: int = 4
    num_stages: int = 3  # forward; the backward kernels use 2


def _pow2(n: int, lo: int, hi: int) -> int:
    return min(max(lo, triton.next_power_of_2(max(n, 1))), hi)


def default_config(t_len: int, dout: int, din: int, slot_ranks: int, dtype: torch.dtype) -> TileConfig:
    """Heuristic tiles: up to 64 × 64 output tiles for 16-bit inputs (a 77-token text is two T
    blocks) with a Din step of 64; 32-wide Dout and Din blocks for fp32, whose operand tiles are
    twice the bytes (the backward kernels reduce over Dout blocks, and three pipelined stages
    of fp32 (64 × 64) tiles would not fit the shared memory of most GPUs); up to 32 slot-ranks
    per chunk (four fp32 (64 × 32) low-rank accumulators stay in registers in the backward).
    No autotuning: shapes vary per layer and the CPU interpreter cannot autotune."""
    wide = 64 if dtype.itemsize <= 2 else 32
    return TileConfig(
        block_t=_pow2(t_len, 16, 64),
        block_o=_pow2(dout, 16, wide),
        block_d=_pow2(din, 16, wide),
        block_j=_pow2(slot_ranks, 16, 32),
        # fp32 (IEEE dots on FMA units, operand tiles in registers): 4 warps spill in the forward
        # on sm_90, 8 do not (bench/aot_sm90.py).
        num_warps=4 if dtype.itemsize <= 2 else 8,
    )


def _ieee(dtype: torch.dtype) -> bool:
    """Exact fp32 products unless PyTorch itself allows TF32 for fp32 matmuls."""
    return dtype == torch.float32 and not fp32_matmul_allows_tf32()


def _launchable(grid: tuple[int, ...]) -> bool:
    return all(g > 0 for g in grid)


@dataclass(frozen=True)
class _Slots:
    """Used slots compacted to the front of each row (see the module docstring)."""

    ids: Tensor  # (B, S) int32, used slots first
    wts: Tensor  # (B, S) fp32, same order
    nvalid: Tensor  # (B,) int32
    order: Tensor | None  # (B, S) original slot of each compacted slot
    rank: int  # r, ≥ 1

    @property
    def width(self) -> int:
        return self.ids.shape[1] * self.rank


def _compact_slots(ids: Tensor, weights: Tensor, n_adapters: int, rank: int) -> _Slots:
    bsz, n_slots = ids.shape
    if n_slots == 0 or n_adapters == 0 or rank == 0:  # nothing to add: zero used slots everywhere
        zeros = torch.zeros(bsz, dtype=torch.int32, device=ids.device)
        return _Slots(zeros[:, None], zeros[:, None].float(), zeros, None, 1)
    used = ids >= 0
    order = torch.argsort((~used).to(torch.int32), dim=1, stable=True)
    return _Slots(
        ids.gather(1, order).to(torch.int32).contiguous(),
        weights.gather(1, order).to(torch.float32).contiguous(),
        used.sum(1, dtype=torch.int32),
        order,
        rank,
    )


@functools.lru_cache(maxsize=64)
def _tables(douts: tuple[int, ...], block_o: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Tile table (n_tiles, 2) int32 = (layer, first column) and layer table (L, 2) int64 =
    (Dout_l, first packed column col_l), on ``device``."""
    tiles, layers, col = [], [], 0
    for layer, dout in enumerate(douts):
        tiles += [(layer, o) for o in range(0, dout, block_o)]
        layers.append((dout, col))
        col += dout
    tiles_t = torch.tensor(tiles, dtype=torch.int32).reshape(-1, 2)
    return tiles_t.to(device), torch.tensor(layers, dtype=torch.int64).reshape(-1, 2).to(device)


def _forward(
    c: Tensor,
    w_k: Tensor,
    w_v: Tensor,
    a_k: Tensor,
    b_k: Tensor,
    a_v: Tensor,
    b_v: Tensor,
    ids: Tensor,
    weights: Tensor,
    scale: float,
    douts: tuple[int, ...],
) -> tuple[Tensor, Tensor]:
    """Launch the forward on packed operands: c (L, B, T, Din), W (ΣDout, Din), a (L, N, r, Din),
    b (N, ΣDout, r), all but c contiguous; ids, weights (B, S) shared by all layers or (L, B, S)
    per layer. Returns flat K and V buffers (B·T·ΣDout,)."""
    n_layers, bsz, t_len, din = c.shape
    total = sum(douts)
    k = c.new_empty(bsz * t_len * total)
    v = c.new_empty(bsz * t_len * total)
    ids_layer_rows = bsz if ids.dim() == 3 else 0
    if ids.dim() == 3:  # per-layer ids: rows (L·B, S)
        ids, weights = ids.flatten(0, 1), weights.flatten(0, 1)
    slots = _compact_slots(ids, weights, a_k.shape[1], a_k.shape[2])
    cfg = default_config(t_len, max(douts, default=1), din, slots.width, c.dtype)
    tiles, layers = _tables(douts, cfg.block_o, c.device)
    grid = (tiles.shape[0], triton.cdiv(t_len, cfg.block_t), bsz)
    if not _launchable(grid):
        return k, v
    if a_k.numel() == 0 or b_k.numel() == 0:  # never read (no used slot-ranks): any valid pointer
        a_k = a_v = b_k = b_v = w_k.new_empty((1, 1, 1, 1))
    _lora_kv_fwd_kernel[grid](
        c,
        w_k,
        w_v,
        a_k,
        b_k,
        a_v,
        b_v,
        slots.ids,
        slots.wts,
        slots.nvalid,
        tiles,
        layers,
        k,
        v,
        bsz,
        t_len,
        din,
        slots.rank,
        slots.ids.shape[1],
        ids_layer_rows,
        float(scale),
        *c.stride(),
        *w_k.stride(),
        *a_k.stride(),
        *b_k.stride()[-3:],
        IEEE=_ieee(c.dtype),
        BLOCK_T=cfg.block_t,
        BLOCK_O=cfg.block_o,
        BLOCK_D=cfg.block_d,
        BLOCK_J=cfg.block_j,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return k, v


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
    """(k, v), each (B, T, Dout) in c's dtype; same semantics as reference.lora_kv_projection.

    c: (B, T, Din); w_k, w_v: (Dout, Din); a_k, a_v: (N, r, Din); b_k, b_v: (N, Dout, r);
    ids: (B, S) int, -1 = empty slot; weights: (B, S) float. One launch (L = 1 of the grouped kernel).
    """
    bsz, t_len, _ = c.shape
    dout = w_k.shape[0]
    k, v = _forward(
        c.unsqueeze(0),
        w_k.contiguous(),
        w_v.contiguous(),
        a_k.contiguous().unsqueeze(0),
        b_k.contiguous(),
        a_v.contiguous().unsqueeze(0),
        b_v.contiguous(),
        ids,
        weights,
        scale,
        (dout,),
    )
    return k.view(bsz, t_len, dout), v.view(bsz, t_len, dout)


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
    """(dc, da_k, db_k, da_v, db_v, dweights); same math as reference.lora_kv_projection_backward.

    dc in c's dtype, adapter grads in the adapters' dtype (zero for adapters no slot uses),
    dweights in weights' dtype (zero on empty slots). The base weights' gradient is not
    computed here (a plain GEMM the caller does when W is trainable).
    """
    bsz, t_len, din = c.shape
    n_adapters, rank, _ = a_k.shape
    dout = w_k.shape[0]
    grad_k = grad_k.to(c.dtype).contiguous()
    grad_v = grad_v.to(c.dtype).contiguous()
    c = c.contiguous()
    w_k, w_v = w_k.contiguous(), w_v.contiguous()
    a_k, a_v, b_k, b_v = a_k.contiguous(), a_v.contiguous(), b_k.contiguous(), b_v.contiguous()
    slots = _compact_slots(ids, weights, n_adapters, rank)
    cfg = default_config(t_len, dout, din, slots.width, c.dtype)
    ieee = _ieee(c.dtype)
    n_tb = triton.cdiv(t_len, cfg.block_t)
    # Two stages: the backward loops are short (T, or one BLOCK_J chunk), and a third stage of
    # operand tiles costs registers that the low-rank accumulators need (spills otherwise).
    meta = dict(IEEE=ieee, num_warps=cfg.num_warps, num_stages=2)
    # Low-rank kernel: 16-row T blocks, for enough programs (its grid has no Dout/Din axis).
    lowrank_grid = (triton.cdiv(t_len, 16), bsz)

    # fp32 atomics targets of the adapter gradients: one row per slot of the batch, not per
    # adapter of the pool (a pool of N = 1000 would be ≈ 1.7 GB of fp32 zeros per layer and call).
    # Each slot adds into the row of the first slot holding the same adapter, so no two rows
    # belong to one adapter; the rows are then added into the pool-shaped gradients (rows of
    # slots that are not first stay zero and add exactly nothing, in any order).
    flat_ids = slots.ids.reshape(-1)
    first = (flat_ids[:, None] == flat_ids[None, :]).to(torch.int8).argmax(1).to(torch.int32).view(bsz, -1)
    n_rows = flat_ids.numel()
    da = [torch.zeros((n_rows, rank, din), dtype=torch.float32, device=c.device) for _ in range(2)]
    db = [torch.zeros((n_rows, dout, rank), dtype=torch.float32, device=c.device) for _ in range(2)]
    dw = torch.zeros((bsz, slots.width), dtype=torch.float32, device=c.device)
    scratch_shape = (2, bsz, t_len, slots.width)
    u = torch.empty(scratch_shape, dtype=torch.float32, device=c.device) if slots.order is not None else dw
    gb = torch.empty(scratch_shape, dtype=torch.float32, device=c.device) if slots.order is not None else dw
    if slots.order is not None and _launchable(lowrank_grid):
        _lora_kv_bwd_lowrank_kernel[lowrank_grid](
            c,
            grad_k,
            grad_v,
            a_k,
            b_k,
            a_v,
            b_v,
            slots.ids,
            slots.wts,
            slots.nvalid,
            u,
            gb,
            dw,
            bsz,
            t_len,
            din,
            dout,
            slots.rank,
            slots.ids.shape[1],
            *c.stride(),
            *grad_k.stride(),
            *a_k.stride(),
            *b_k.stride(),
            BLOCK_T=16,
            BLOCK_O=cfg.block_o,
            BLOCK_D=cfg.block_d,
            BLOCK_J=cfg.block_j,
            **meta,
        )
        for xs, (y_k, y_v), out, width, block_x, strides in (
            (gb, (c, c), da, din, cfg.block_d, (rank * din, din, 1)),
            (u, (grad_k, grad_v), db, dout, cfg.block_o, (dout * rank, 1, rank)),
        ):
            grid = (triton.cdiv(width, block_x), bsz)
            if not _launchable(grid):
                continue
            _lora_kv_bwd_adapter_kernel[grid](
                xs[0],
                xs[1],
                y_k,
                y_v,
                out[0],
                out[1],
                first,
                slots.wts,
                slots.nvalid,
                t_len,
                width,
                slots.rank,
                slots.ids.shape[1],
                float(scale),
                *y_k.stride(),
                *strides,
                BLOCK_T=cfg.block_t,
                BLOCK_X=block_x,
                BLOCK_J=cfg.block_j,
                **meta,
            )

    dc = torch.empty_like(c)
    grid = (triton.cdiv(din, cfg.block_d), n_tb, bsz)
    if _launchable(grid):
        no_adapters = a_k.numel() == 0  # never read then: any valid pointer
        _lora_kv_bwd_dc_kernel[grid](
            grad_k,
            grad_v,
            w_k,
            w_v,
            c if no_adapters else a_k,
            c if no_adapters else a_v,
            slots.ids,
            slots.wts,
            slots.nvalid,
            gb,
            dc,
            bsz,
            t_len,
            din,
            dout,
            slots.rank,
            slots.ids.shape[1],
            float(scale),
            *grad_k.stride(),
            *w_k.stride(),
            *(a_k.stride() if not no_adapters else (0, 0, 0)),
            BLOCK_T=cfg.block_t,
            BLOCK_O=cfg.block_o,
            BLOCK_D=cfg.block_d,
            BLOCK_J=cfg.block_j,
            **meta,
        )

    dweights = torch.zeros(weights.shape, dtype=torch.float32, device=c.device)
    if slots.order is not None:
        dweights.scatter_(1, slots.order, dw.view(bsz, -1, rank).sum(-1) * scale)
    # Separate allocations: a custom op's outputs must not alias each other.
    grads = [torch.zeros_like(t) for t in (a_k, b_k, a_v, b_v)]
    if slots.order is not None:
        rows = flat_ids.clamp_min(0).long()  # empty slots' rows are zero: any valid target
        for grad, part in zip(grads, (da[0], db[0], da[1], db[1])):
            grad.index_add_(0, rows, part.to(grad.dtype))
    return (dc, *grads, dweights.to(weights.dtype))


# ------------------------------------------------------------------------------ grouped


@dataclass(frozen=True)
class LayerPack:
    """Per-layer K/V weights of L layers packed for one launch (see :func:`pack_layers`).

    w_k, w_v: (ΣDout, Din), layer l's rows at [col_l, col_l + Dout_l); a_k, a_v: (L, N, r, Din);
    b_k, b_v: (N, ΣDout, r); douts: (Dout_0, …, Dout_{L-1}). Adapter fields may be None when
    only the base weights were packed."""

    w_k: Tensor | None
    w_v: Tensor | None
    a_k: Tensor | None
    b_k: Tensor | None
    a_v: Tensor | None
    b_v: Tensor | None
    douts: tuple[int, ...]


def _pack_w(ws: Sequence[Tensor]) -> Tensor:
    return torch.cat(list(ws), dim=0).contiguous()


def _pack_a(as_: Sequence[Tensor]) -> Tensor:
    return torch.stack(list(as_), dim=0).contiguous()


def _pack_b(bs: Sequence[Tensor]) -> Tensor:
    return torch.cat(list(bs), dim=1).contiguous()


def pack_layers(
    w_k: Sequence[Tensor] | None,
    w_v: Sequence[Tensor] | None,
    a_k: Sequence[Tensor] | None = None,
    b_k: Sequence[Tensor] | None = None,
    a_v: Sequence[Tensor] | None = None,
    b_v: Sequence[Tensor] | None = None,
) -> LayerPack:
    """Pack per-layer lists (layer order down → mid → up) once, for reuse across calls of
    :func:`lora_kv_projection_grouped` (frozen base weights; a serving pool that does not
    change). Lists left None are not packed. Packing copies; re-pack after editing weights."""
    douts = None
    if w_k is not None:
        douts = tuple(w.shape[0] for w in w_k)
    elif b_k is not None:
        douts = tuple(b.shape[1] for b in b_k)
    if douts is None:
        raise ValueError("pack_layers: give at least w_k or b_k, to know each layer's Dout")
    return LayerPack(
        _pack_w(w_k) if w_k is not None else None,
        _pack_w(w_v) if w_v is not None else None,
        _pack_a(a_k) if a_k is not None else None,
        _pack_b(b_k) if b_k is not None else None,
        _pack_a(a_v) if a_v is not None else None,
        _pack_b(b_v) if b_v is not None else None,
        douts,
    )


def lora_kv_projection_grouped(
    c: Tensor,
    w_k: Sequence[Tensor] | None,
    w_v: Sequence[Tensor] | None,
    a_k: Sequence[Tensor] | None,
    b_k: Sequence[Tensor] | None,
    a_v: Sequence[Tensor] | None,
    b_v: Sequence[Tensor] | None,
    ids: Tensor,
    weights: Tensor,
    scale: float = 1.0,
    *,
    packed: LayerPack | None = None,
    flat: bool = False,
) -> tuple[list[Tensor], list[Tensor]] | tuple[Tensor, Tensor]:
    """K and V of all L cross-attention layers in ONE launch.

    c: (L, B, T, Din) per-layer text embeddings; w_k, w_v: L tensors (Dout_l, Din);
    a_k, a_v: L tensors (N, r, Din); b_k, b_v: L tensors (N, Dout_l, r) (same N, r in every
    layer); ids, weights: (L, B, S) per layer (EWA gives each layer its own ψ).
    Semantics: for every l, (k[l], v[l]) = lora_kv_projection(c[l], w_k[l], w_v[l], a_k[l],
    b_k[l], a_v[l], b_v[l], ids[l], weights[l], scale). Returns ([k_0 … k_{L-1}], [v_0 … v_{L-1}]),
    each (B, T, Dout_l), contiguous views into one buffer.
    Any list may be None when ``packed`` (from :func:`pack_layers`) holds it; lists given
    are packed on the fly (a copy of the weights per call: pack frozen weights once instead).
    ``flat``: return the two (B·T·ΣDout,) buffers instead (the registered op's outputs).
    """
    packed = packed or LayerPack(None, None, None, None, None, None, ())
    n_layers, bsz, t_len, din = c.shape
    given = dict(w_k=w_k, w_v=w_v, a_k=a_k, b_k=b_k, a_v=a_v, b_v=b_v)
    for name, lst in given.items():
        if lst is None and getattr(packed, name) is None:
            raise ValueError(f"lora_kv_projection_grouped: {name} is None and not in packed")
        if lst is not None and len(lst) != n_layers:
            raise ValueError(f"lora_kv_projection_grouped: {name} has {len(lst)} layers; expected L = {n_layers}")
    douts = tuple(w.shape[0] for w in w_k) if w_k is not None else packed.douts
    if packed.douts and douts != packed.douts:
        raise ValueError(f"lora_kv_projection_grouped: layer widths {douts} differ from the packed {packed.douts}")
    wk = _pack_w(w_k) if w_k is not None else packed.w_k
    wv = _pack_w(w_v) if w_v is not None else packed.w_v
    ak = _pack_a(a_k) if a_k is not None else packed.a_k
    bk = _pack_b(b_k) if b_k is not None else packed.b_k
    av = _pack_a(a_v) if a_v is not None else packed.a_v
    bv = _pack_b(b_v) if b_v is not None else packed.b_v
    if wk.shape != (sum(douts), din) or wv.shape != wk.shape:
        raise ValueError(
            f"lora_kv_projection_grouped: packed base weights {tuple(wk.shape)}, {tuple(wv.shape)}; "
            f"expected {(sum(douts), din)}"
        )
    n_adapters, rank = ak.shape[1], ak.shape[2]
    if ak.shape != (n_layers, n_adapters, rank, din) or av.shape != ak.shape:
        raise ValueError(
            f"lora_kv_projection_grouped: a_k/a_v pack to {tuple(ak.shape)}, {tuple(av.shape)}; "
            f"expected {(n_layers, n_adapters, rank, din)}"
        )
    if bk.shape != (n_adapters, sum(douts), rank) or bv.shape != bk.shape:
        raise ValueError(
            f"lora_kv_projection_grouped: b_k/b_v pack to {tuple(bk.shape)}, {tuple(bv.shape)}; "
            f"expected {(n_adapters, sum(douts), rank)}"
        )
    for name, t in dict(c=c, w_k=wk, w_v=wv, a_k=ak, b_k=bk, a_v=av, b_v=bv).items():
        if t.dtype not in _DTYPES:
            raise TypeError(f"lora_kv_projection_grouped: {name} has dtype {t.dtype}; supported: {_DTYPES}")
        if t.dtype != c.dtype:
            raise TypeError(f"lora_kv_projection_grouped: {name} has dtype {t.dtype}; expected {c.dtype} (c's)")
    if ids.shape[:2] != (n_layers, bsz) or ids.dim() != 3 or weights.shape != ids.shape:
        raise ValueError(
            f"lora_kv_projection_grouped: ids {tuple(ids.shape)}, weights {tuple(weights.shape)}; "
            f"expected both (L, B, S) with L = {n_layers}, B = {bsz}"
        )
    k, v = _forward(c, wk, wv, ak, bk, av, bv, ids, weights, scale, douts)
    if flat:
        return k, v
    ks, vs, offset = [], [], 0
    for dout in douts:
        size = bsz * t_len * dout
        ks.append(k[offset : offset + size].view(bsz, t_len, dout))
        vs.append(v[offset : offset + size].view(bsz, t_len, dout))
        offset += size
    return ks, vs


# -------------------------------------------------------------------------------- checks


def why_not(args: tuple) -> str | None:
    """Why these kernels cannot run the forward's (10) or backward's (12) positional
    arguments, or None. Devices are checked by the backend, not here."""
    names = ("c", "w_k", "w_v", "a_k", "b_k", "a_v", "b_v", "ids", "weights", "scale")
    if len(args) == len(names) + 2:
        names = ("grad_k", "grad_v", *names)
    named = dict(zip(names, args))
    for name, t in named.items():
        if name in ("ids", "scale") or not isinstance(t, Tensor):
            continue
        if name == "weights":
            if not t.dtype.is_floating_point:
                return f"weights has dtype {t.dtype}; expected a floating-point dtype"
        elif t.dtype not in _DTYPES:
            return f"{name} has dtype {t.dtype}; these kernels support float16, bfloat16 and float32"
    c = named["c"]
    bsz, t_len = c.shape[0], c.shape[1]
    if bsz > _MAX_GRID_YZ:
        return f"batch B = {bsz} exceeds {_MAX_GRID_YZ}, the CUDA grid limit these kernels put it on"
    if triton.cdiv(t_len, 64) > _MAX_GRID_YZ:
        return f"sequence length T = {t_len} exceeds {_MAX_GRID_YZ * 64} (grid limit of 64-row blocks)"
    return None

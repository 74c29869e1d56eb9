"""Regional cross-attention in Triton: every query attends to the prompt slot of its region.

q: (B, H, N, d) image queries; k, v: (B, P, H, T, d), P prompt slots, slot 0 = global prompt;
region_ids: (B, N) int in [0, P); kv_len: (B, P) int in [1, T] or None; scale: d**-0.5 if None.
Semantics (:func:`lifelong_engine.reference.regional_cross_attention`):
    out[b,h,n] = softmax(q[b,h,n]·k[b,p,h,:L]ᵀ·scale)·v[b,p,h,:L],  p = region_ids[b,n], L = kv_len[b,p]

Design. One program owns a block of BLOCK_N queries of one (b, h). It walks the P slots and
skips a slot at the cost of one reduction over the block's region ids when none of its queries
use it; regions are spatially compact, so most blocks touch one or two slots and the cost stays
≈ one plain cross-attention whatever P is. For a used slot the whole block is scored against
that slot's keys (one tile for T = 77), rows of other regions masked to −∞. Each row keeps one
online-softmax state (m, l, acc) that only its own slot's tiles move (rows of other slots see
α = 1 and no new mass), so rows select their slot without a pass per region and without
rescaling across slots. This beats computing each slot's softmax apart and picking rows with
``tl.where``: that needs a second [BLOCK_N, BLOCK_D] accumulator, which spills on sm_90.

Backward (same math as :func:`lifelong_engine.reference.regional_cross_attention_backward`):
dq is per query, but dk, dv reduce over every query of a slot. One program owns a
(chunk of query blocks, slot p, key tile, b·h) and loops over the chunk's blocks that use p:
it accumulates dk, dv in registers and writes dq rows of its slot directly (each row belongs
to one slot, so no two programs write the same dq row). Chunks give the parallelism that the
short key axis lacks; their partial dk, dv go to an fp32 buffer summed afterwards, which keeps
the result deterministic (atomics would not). When the keys fit one tile the backward is this
single kernel (row softmax and D = rowsum(dO ⊙ O) recomputed in place); otherwise a first
pass of the forward kernel stores the log-sum-exp and D per row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from .precision import fp32_matmul_allows_tf32

__all__ = [
    "TileConfig",
    "tile_config",
    "regional_cross_attention",
    "regional_cross_attention_backward",
    "why_not",
]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256
_MAX_GRID_YZ = 65535  # CUDA limit on grid axes 1 and 2


# ------------------------------------------------------------------------------ kernels


@triton.jit
def _rows(stride, VEC: tl.constexpr):
    """stride, stated to be a multiple of VEC elements (the launcher checked it). Triton only
    learns "multiple of 16" from an int argument; at d = 40 the row stride is 40 and its loads
    along d fall back to 2-byte scalars. (s // VEC) * VEC proves 16-byte alignment of each row
    to the compiler, so the loads become 16-byte vectors (tl.multiple_of on an argument does not)."""
    return (stride // VEC) * VEC


@triton.jit
def _regional_attn_fwd_kernel(
    Q,
    K,
    V,
    RID,
    KVLEN,
    OUT,
    DO,
    LSE,
    DELTA,
    sm_scale,
    H,
    N,
    T,
    P,
    stride_qb,
    stride_qh,
    stride_qn,
    stride_qd,
    stride_kb,
    stride_kp,
    stride_kh,
    stride_kt,
    stride_kd,
    stride_vb,
    stride_vp,
    stride_vh,
    stride_vt,
    stride_vd,
    stride_rb,
    stride_rn,
    stride_lb,
    stride_lp,
    stride_ob,
    stride_oh,
    stride_on,
    stride_od,
    stride_dob,
    stride_doh,
    stride_don,
    stride_dod,
    D: tl.constexpr,
    VEC: tl.constexpr,
    HAS_KV_LEN: tl.constexpr,
    PREP_BWD: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Forward of one block of queries of one (b, h): out = Σ_p [region = p]·softmax(q·k_pᵀ·scale)·v_p.

    Each row runs an online softmax (base 2) over the key tiles j of its own slot p = region[n],
    visiting the slots used by the block in turn and leaving rows of other slots untouched:
        s_j = q·k_jᵀ·scale·log2(e),   m' = max(m, rowmax s_j),   α = 2^(m − m'),
        l ← α·l + rowsum 2^(s_j − m'),   acc ← α·acc + 2^(s_j − m')·v_j,   out = acc / l,
    keys t ≥ L = kv_len[b,p] scored −∞ (L ≥ 1, so m is finite after the slot's first tile).
    PREP_BWD (first pass of the backward when the keys span several tiles): write nothing to OUT;
    store per row lse = m + log2(l) (base 2, of the scaled scores) and D = rowsum(dO ⊙ out).
    """
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    stride_qb, stride_qh, stride_qn = _rows(stride_qb, VEC), _rows(stride_qh, VEC), _rows(stride_qn, VEC)
    stride_kb, stride_kp, stride_kh = _rows(stride_kb, VEC), _rows(stride_kp, VEC), _rows(stride_kh, VEC)
    stride_vb, stride_vp, stride_vh = _rows(stride_vb, VEC), _rows(stride_vp, VEC), _rows(stride_vh, VEC)
    stride_kt, stride_vt = _rows(stride_kt, VEC), _rows(stride_vt, VEC)
    stride_ob, stride_oh, stride_on = _rows(stride_ob, VEC), _rows(stride_oh, VEC), _rows(stride_on, VEC)
    stride_dob, stride_doh, stride_don = _rows(stride_dob, VEC), _rows(stride_doh, VEC), _rows(stride_don, VEC)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_t = tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    rows = offs_n.to(tl.int64)
    row_ok = offs_n < N
    d_ok = offs_d < D
    io_mask = row_ok[:, None] & d_ok[None, :]

    q_ptrs = Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qn + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=io_mask, other=0.0)
    rid = tl.load(RID + b * stride_rb + rows * stride_rn, mask=row_ok, other=-1)
    qk_scale = sm_scale * 1.4426950408889634  # log2(e): exp2 instead of exp

    # One online softmax per row over the keys of its own slot only. The slots are visited in
    # turn; a row outside slot p keeps its state (α = 1, no new mass), so one accumulator serves
    # every slot, and a row's m is −∞ until its slot comes (then α = 2^(−∞) = 0).
    m_i = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for p in range(0, P):
        mine = rid == p
        # Skip slots no query of this block uses: the cost follows the slots used, not P.
        if tl.sum(mine.to(tl.int32), axis=0) > 0:
            kv_len = T
            if HAS_KV_LEN:
                kv_len = tl.load(KVLEN + b * stride_lb + p * stride_lp).to(tl.int32)
            k_base = K + b * stride_kb + p * stride_kp + h * stride_kh
            v_base = V + b * stride_vb + p * stride_vp + h * stride_vh
            for t0 in range(0, kv_len, BLOCK_T):
                t = t0 + offs_t
                t_ok = t < kv_len
                kv_mask = t_ok[:, None] & d_ok[None, :]
                k = tl.load(k_base + t[:, None] * stride_kt + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
                v = tl.load(v_base + t[:, None] * stride_vt + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
                s = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * qk_scale
                s = tl.where(mine[:, None] & t_ok[None, :], s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, axis=1))  # rows of other slots: max(m, −∞) = m
                # Rows of other slots: α = 2^0 = 1, e = 2^(−∞) = 0, with no −∞ − (−∞) on the way.
                m_ref = tl.where(mine, m_new, 0.0)
                alpha = tl.exp2(tl.where(mine, m_i, 0.0) - m_ref)
                e = tl.exp2(s - m_ref[:, None])
                l_i = l_i * alpha + tl.sum(e, axis=1)
                acc = acc * alpha[:, None] + tl.dot(e.to(v.dtype), v, input_precision=INPUT_PRECISION)
                m_i = m_new
    l_safe = tl.where(row_ok, l_i, 1.0)  # padded rows saw no slot
    acc = acc / l_safe[:, None]

    if PREP_BWD:
        do_ptrs = DO + b * stride_dob + h * stride_doh + rows[:, None] * stride_don + offs_d[None, :] * stride_dod
        do = tl.load(do_ptrs, mask=io_mask, other=0.0).to(tl.float32)
        stat = (b * H + h) * N + rows  # LSE, DELTA: contiguous (B, H, N)
        tl.store(LSE + stat, m_i + tl.log2(l_safe), mask=row_ok)
        tl.store(DELTA + stat, tl.sum(do * acc, axis=1), mask=row_ok)
    else:
        o_ptrs = OUT + b * stride_ob + h * stride_oh + rows[:, None] * stride_on + offs_d[None, :] * stride_od
        tl.store(o_ptrs, acc.to(OUT.dtype.element_ty), mask=io_mask)


@triton.jit
def _regional_attn_bwd_kernel(
    Q,
    K,
    V,
    RID,
    KVLEN,
    DO,
    LSE,
    DELTA,
    DQ,
    DK,
    DV,
    sm_scale,
    H,
    N,
    T,
    P,
    blocks_per_chunk,
    stride_qb,
    stride_qh,
    stride_qn,
    stride_qd,
    stride_kb,
    stride_kp,
    stride_kh,
    stride_kt,
    stride_kd,
    stride_vb,
    stride_vp,
    stride_vh,
    stride_vt,
    stride_vd,
    stride_rb,
    stride_rn,
    stride_lb,
    stride_lp,
    stride_dob,
    stride_doh,
    stride_don,
    stride_dod,
    stride_dqj,
    stride_dqb,
    stride_dqh,
    stride_dqn,
    stride_dkc,
    stride_dkb,
    stride_dkp,
    stride_dkh,
    stride_dkt,
    D: tl.constexpr,
    VEC: tl.constexpr,
    HAS_KV_LEN: tl.constexpr,
    PRECOMPUTED: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Backward of one key tile j of slot p of one (b, h), over one chunk c of query blocks.

    For each block of the chunk with queries in region p (rows n ∉ p and keys t ≥ L are masked):
        P = softmax(q·k_pᵀ·scale) restricted to the rows of p,   dP = dO·v_jᵀ,
        dS = P ⊙ (dP − D),   D = rowsum(dO ⊙ out) = rowsum(P ⊙ dP),
        dv_j += Pᵀ·dO,   dk_j += scale·dSᵀ·q,   dq[rows of p] (+)= scale·dS·k_j.
    PRECOMPUTED (keys span several tiles): P = 2^(s − lse) and D are read from the first pass,
    and DQ holds one fp32 partial per key tile j. Otherwise the row softmax and D come from the
    one tile in hand, and DQ is the output itself. DK, DV hold one partial per chunk c (the
    output itself when there is one chunk); every program writes its whole tile, zeros included.
    """
    pid_c = tl.program_id(0)
    pid_pj = tl.program_id(1)
    pid_bh = tl.program_id(2)
    stride_qb, stride_qh, stride_qn = _rows(stride_qb, VEC), _rows(stride_qh, VEC), _rows(stride_qn, VEC)
    stride_kb, stride_kp, stride_kh = _rows(stride_kb, VEC), _rows(stride_kp, VEC), _rows(stride_kh, VEC)
    stride_vb, stride_vp, stride_vh = _rows(stride_vb, VEC), _rows(stride_vp, VEC), _rows(stride_vh, VEC)
    stride_kt, stride_vt = _rows(stride_kt, VEC), _rows(stride_vt, VEC)
    stride_dob, stride_doh, stride_don = _rows(stride_dob, VEC), _rows(stride_doh, VEC), _rows(stride_don, VEC)
    stride_dqj, stride_dqb = _rows(stride_dqj, VEC), _rows(stride_dqb, VEC)
    stride_dqh, stride_dqn = _rows(stride_dqh, VEC), _rows(stride_dqn, VEC)
    stride_dkc, stride_dkb, stride_dkp = _rows(stride_dkc, VEC), _rows(stride_dkb, VEC), _rows(stride_dkp, VEC)
    stride_dkh, stride_dkt = _rows(stride_dkh, VEC), _rows(stride_dkt, VEC)
    n_t = tl.cdiv(T, BLOCK_T)
    p = pid_pj // n_t
    j = pid_pj % n_t
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)

    kv_len = T
    if HAS_KV_LEN:
        kv_len = tl.load(KVLEN + b * stride_lb + p * stride_lp).to(tl.int32)
    offs_t = j * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    t_ok = offs_t < kv_len
    kv_mask = t_ok[:, None] & d_ok[None, :]
    k_base = K + b * stride_kb + p * stride_kp + h * stride_kh
    v_base = V + b * stride_vb + p * stride_vp + h * stride_vh
    k = tl.load(k_base + offs_t[:, None] * stride_kt + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
    v = tl.load(v_base + offs_t[:, None] * stride_vt + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
    qk_scale = sm_scale * 1.4426950408889634

    dk_acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    dv_acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    blk_start = pid_c * blocks_per_chunk
    blk_end = tl.minimum(blk_start + blocks_per_chunk, tl.cdiv(N, BLOCK_N))
    if j * BLOCK_T < kv_len:  # a tile past kv_len has zero gradients
        for blk in range(blk_start, blk_end):
            offs_n = blk * BLOCK_N + tl.arange(0, BLOCK_N)
            rows = offs_n.to(tl.int64)
            row_ok = offs_n < N
            rid = tl.load(RID + b * stride_rb + rows * stride_rn, mask=row_ok, other=-1)
            mine = rid == p
            if tl.sum(mine.to(tl.int32), axis=0) > 0:
                io_mask = row_ok[:, None] & d_ok[None, :]
                q_ptrs = Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qn + offs_d[None, :] * stride_qd
                q = tl.load(q_ptrs, mask=io_mask, other=0.0)
                do_ptrs = (
                    DO + b * stride_dob + h * stride_doh + rows[:, None] * stride_don + offs_d[None, :] * stride_dod
                )
                do = tl.load(do_ptrs, mask=io_mask, other=0.0)
                # Keys along rows, queries along columns: dk, dv take the products without transposes.
                st = tl.dot(k, tl.trans(q), input_precision=INPUT_PRECISION) * qk_scale
                valid = t_ok[:, None] & mine[None, :]
                dpt = tl.dot(v, tl.trans(do), input_precision=INPUT_PRECISION)
                if PRECOMPUTED:
                    stat = (b * H + h) * N + rows
                    lse = tl.load(LSE + stat, mask=row_ok, other=0.0)
                    delta = tl.load(DELTA + stat, mask=row_ok, other=0.0)
                    pt = tl.where(valid, tl.exp2(st - lse[None, :]), 0.0)
                else:
                    st = tl.where(valid, st, float("-inf"))
                    m = tl.where(mine, tl.max(st, axis=0), 0.0)  # queries of other slots: all −∞
                    pt = tl.exp2(st - m[None, :])
                    pt = pt / tl.where(mine, tl.sum(pt, axis=0), 1.0)[None, :]
                    delta = tl.sum(pt * dpt, axis=0)
                dst = pt * (dpt - delta[None, :])
                dv_acc += tl.dot(pt.to(do.dtype), do, input_precision=INPUT_PRECISION)
                dk_acc += tl.dot(dst.to(q.dtype), q, input_precision=INPUT_PRECISION)
                dq = tl.dot(tl.trans(dst.to(k.dtype)), k, input_precision=INPUT_PRECISION) * sm_scale
                dq_ptrs = (
                    DQ + j.to(tl.int64) * stride_dqj + b * stride_dqb + h * stride_dqh + rows[:, None] * stride_dqn
                )
                tl.store(dq_ptrs + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=mine[:, None] & d_ok[None, :])

    out_mask = (offs_t < T)[:, None] & d_ok[None, :]
    dkv_off = pid_c.to(tl.int64) * stride_dkc + b * stride_dkb + p * stride_dkp + h * stride_dkh
    dkv_off += offs_t[:, None] * stride_dkt + offs_d[None, :]
    tl.store(DK + dkv_off, (dk_acc * sm_scale).to(DK.dtype.element_ty), mask=out_mask)
    tl.store(DV + dkv_off, dv_acc.to(DV.dtype.element_ty), mask=out_mask)


# ----------------------------------------------------------------------------- launchers


@dataclass(frozen=True)
class TileConfig:
    """Launch parameters: block_n queries × block_t keys × block_d head-dim columns per tile
    (each a power of two ≥ 16, as tl.dot needs); num_chunks (backward only): how many chunks
    the query blocks are split into for the dk/dv reduction, i.e. the parallelism along N."""

    block_n: int
    block_t: int
    block_d: int
    num_warps: int
    num_stages: int = 2
    num_chunks: int = 1


def _pow2(x: int, floor: int = 16) -> int:
    return max(floor, triton.next_power_of_2(x))


# (block_n, block_t cap, num_warps) by block_d, chosen on sm_90 compile reports (bench/aot_sm90.py,
# Triton 3.9: no spills and shared memory under 227 KiB, except fp32 at d = 160, whose 3×TF32
# dots hold hi/lo parts of 16 × 256 fp32 tiles at the minimum tile sizes); tune on the GPU.
_FWD_TILES = {
    "half": {64: (128, 128, 8), 128: (64, 128, 8), 256: (32, 64, 8)},
    "fp32": {64: (32, 32, 4), 128: (16, 64, 8), 256: (16, 64, 8)},
}
_BWD_TILES = {
    "half": {64: (64, 128, 8), 128: (16, 64, 8), 256: (16, 32, 8)},
    "fp32": {64: (16, 16, 8), 128: (16, 16, 8), 256: (16, 16, 8)},
}


def tile_config(q: Tensor, k: Tensor, backward: bool = False) -> TileConfig:
    """Heuristic default tiles for q (B, H, N, d), k (B, P, H, T, d), fixed per head-dim class
    (no autotuning).

    The head dim is one tile, padded to a power of two (40 → 64, 80 → 128, 160 → 256); the keys
    of a slot are one tile when they fit the cap (T = 77 → 128 for d ≤ 64), else several. The
    backward keeps dk, dv of its key tile in registers, so its tiles are smaller; it splits the
    query blocks into chunks so that about two programs per SM run even when B·H is small,
    keeping at least 8 blocks per chunk (each chunk's fp32 dk/dv partial costs memory traffic).
    fp32 operands (3×tf32 dots) take smaller tiles and no pipelining, to stay in registers.
    """
    bsz, heads, n_q, d = q.shape
    t_len = k.shape[3]
    block_d = _pow2(d)
    kind = "fp32" if q.dtype == torch.float32 else "half"
    block_n, t_cap, num_warps = (_BWD_TILES if backward else _FWD_TILES)[kind][max(block_d, 64)]
    block_t = min(_pow2(t_len), t_cap)
    if _pow2(t_len) * block_d <= 32 * 64:
        num_warps = 4  # short prompts: small key tiles
    # Pipelining double-buffers the operands of a loop: none for fp32 (shared memory), and none
    # in the forward when the keys are one tile (T = 77), whose loop runs once per slot.
    num_stages = 1 if kind == "fp32" or (not backward and t_len <= block_t) else 2
    if not backward:
        return TileConfig(block_n, block_t, block_d, num_warps, num_stages)
    num_chunks = 1
    if q.is_cuda:
        programs = bsz * heads * triton.cdiv(t_len, block_t)
        target = 2 * torch.cuda.get_device_properties(q.device).multi_processor_count
        num_chunks = max(1, min(triton.cdiv(target, max(programs, 1)), triton.cdiv(n_q, block_n) // 8))
    return TileConfig(block_n, block_t, block_d, num_warps, num_stages, num_chunks)


def _input_precision(dtype: torch.dtype) -> str:
    """fp32 dots follow torch's matmul precision: 3×tf32 (≈ fp32 accuracy on tensor cores) under
    "highest", the default; plain tf32 when the user allowed it."""
    if dtype == torch.float32 and not fp32_matmul_allows_tf32():
        return "tf32x3"
    return "tf32"  # ignored for fp16/bf16 operands


def _vec(*tensors: Tensor) -> int:
    """Elements in 16 bytes of the first tensor's dtype when every tensor has unit stride along
    d and all its other strides (of dims longer than 1) are multiples of that, else 1: rows then
    start 16-byte aligned (Triton checks the base pointers itself) and loads along d vectorise."""
    n = 16 // tensors[0].element_size()
    for t in tensors:
        if t.stride(-1) != 1 or any(s % n for s, size in zip(t.stride()[:-1], t.shape[:-1]) if size > 1):
            return 1
    return n


def _kv_len_args(kv_len: Tensor | None, region_ids: Tensor) -> tuple:
    if kv_len is None:
        return region_ids, 0, 0  # unread placeholder pointer
    return kv_len, kv_len.stride(0), kv_len.stride(1)


def _forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    region_ids: Tensor,
    kv_len: Tensor | None,
    scale: float,
    cfg: TileConfig,
    grad_out: Tensor | None = None,
):
    """Launch the forward kernel: out, or (lse, delta) per row when grad_out is given."""
    bsz, heads, n_q, d = q.shape
    n_slots, t_len = k.shape[1], k.shape[3]
    prep = grad_out is not None
    out = q.new_empty(q.shape)
    stats = torch.empty((2, bsz, heads, n_q), dtype=torch.float32, device=q.device) if prep else out
    do = grad_out if prep else q
    kvl, stride_lb, stride_lp = _kv_len_args(kv_len, region_ids)
    grid = (triton.cdiv(n_q, cfg.block_n), bsz * heads)
    _regional_attn_fwd_kernel[grid](
        q,
        k,
        v,
        region_ids,
        kvl,
        out,
        do,
        stats[0] if prep else out,
        stats[1] if prep else out,
        float(scale),
        heads,
        n_q,
        t_len,
        n_slots,
        *q.stride(),
        *k.stride(),
        *v.stride(),
        *region_ids.stride(),
        stride_lb,
        stride_lp,
        *out.stride(),
        *do.stride(),
        D=d,
        VEC=_vec(q, k, v, out, do),
        HAS_KV_LEN=kv_len is not None,
        PREP_BWD=prep,
        INPUT_PRECISION=_input_precision(q.dtype),
        BLOCK_N=cfg.block_n,
        BLOCK_T=cfg.block_t,
        BLOCK_D=cfg.block_d,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return (stats[0], stats[1]) if prep else out


def _backward(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    region_ids: Tensor,
    kv_len: Tensor | None,
    scale: float,
    cfg: TileConfig,
) -> tuple[Tensor, Tensor, Tensor]:
    """Launch the backward: (first pass for lse, D if the keys span several tiles), then one
    kernel for dq, dk, dv; partials over key tiles (dq) or chunks (dk, dv) summed in fp32."""
    bsz, heads, n_q, d = q.shape
    n_slots, t_len = k.shape[1], k.shape[3]
    grad_out = grad_out.to(q.dtype)
    n_t = triton.cdiv(t_len, cfg.block_t)
    n_blocks = triton.cdiv(n_q, cfg.block_n)
    blocks_per_chunk = triton.cdiv(n_blocks, max(1, min(cfg.num_chunks, n_blocks)))
    n_chunks = triton.cdiv(n_blocks, blocks_per_chunk)
    precomputed = n_t > 1
    if precomputed:
        lse, delta = _forward(q, k, v, region_ids, kv_len, scale, tile_config(q, k), grad_out=grad_out)
        # Rows write only their own slot's share into each key tile's partial: start from zero.
        dq_buf = torch.zeros((n_t, bsz, heads, n_q, d), dtype=torch.float32, device=q.device)
    else:
        lse = delta = q  # unread placeholders
        dq_buf = q.new_empty((1, bsz, heads, n_q, d))
    # Every program writes its whole dk/dv tile, so the buffers need no zeroing.
    part_dtype = k.dtype if n_chunks == 1 else torch.float32
    dk_buf = torch.empty((n_chunks, *k.shape), dtype=part_dtype, device=k.device)
    dv_buf = torch.empty((n_chunks, *k.shape), dtype=part_dtype, device=k.device)
    kvl, stride_lb, stride_lp = _kv_len_args(kv_len, region_ids)
    grid = (n_chunks, n_slots * n_t, bsz * heads)
    _regional_attn_bwd_kernel[grid](
        q,
        k,
        v,
        region_ids,
        kvl,
        grad_out,
        lse,
        delta,
        dq_buf,
        dk_buf,
        dv_buf,
        float(scale),
        heads,
        n_q,
        t_len,
        n_slots,
        blocks_per_chunk,
        *q.stride(),
        *k.stride(),
        *v.stride(),
        *region_ids.stride(),
        stride_lb,
        stride_lp,
        *grad_out.stride(),
        *dq_buf.stride()[:4],
        *dk_buf.stride()[:5],
        D=d,
        VEC=_vec(q, k, v, grad_out, dq_buf, dk_buf),
        HAS_KV_LEN=kv_len is not None,
        PRECOMPUTED=precomputed,
        INPUT_PRECISION=_input_precision(q.dtype),
        BLOCK_N=cfg.block_n,
        BLOCK_T=cfg.block_t,
        BLOCK_D=cfg.block_d,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    dq = dq_buf.sum(0).to(q.dtype) if precomputed else dq_buf[0]
    if n_chunks > 1:
        return dq, dk_buf.sum(0).to(k.dtype), dv_buf.sum(0).to(v.dtype)
    return dq, dk_buf[0], dv_buf[0]


# ---------------------------------------------------------------------------- public API


def regional_cross_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    region_ids: Tensor,
    kv_len: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """Cross-attention in which every query attends only to its region's prompt slot (Triton).

    q: (B, H, N, d); k, v: (B, P, H, T, d), slot 0 = global prompt; region_ids: (B, N) int in
    [0, P); kv_len: (B, P) int in [1, T] or None (all T keys valid); scale: d**-0.5 if None.
    Semantics: out[b,h,n] = softmax(q[b,h,n]·k[b,p,h,:L]ᵀ·scale)·v[b,p,h,:L],
               p = region_ids[b,n], L = kv_len[b,p]. Returns (B, H, N, d) in q's dtype.
    Inputs are validated by the caller; any strides are accepted.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if q.numel() == 0:
        return q.new_empty(q.shape)
    return _forward(q, k, v, region_ids, kv_len, scale, tile_config(q, k))


def regional_cross_attention_backward(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    region_ids: Tensor,
    kv_len: Tensor | None = None,
    scale: float | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of :func:`regional_cross_attention` (softmax-attention backward on the masked
    scores): with P = softmax(S), O = P·V and D = rowsum(dO ⊙ O),
      dV = Pᵀ·dO,  dS = P ⊙ (dO·Vᵀ − D),  dQ = scale·dS·K,  dK = scale·dSᵀ·Q.
    Returns (dq, dk, dv) shaped like q, k, v, in their dtypes.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if q.numel() == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    return _backward(grad_out, q, k, v, region_ids, kv_len, scale, tile_config(q, k, backward=True))


def why_not(args: tuple) -> str | None:
    """Why these kernels cannot run the forward's (q, k, v, region_ids, kv_len, scale) or the
    backward's (grad_out, q, …) arguments, or None when they can. Device checks live elsewhere."""
    if len(args) == 7:
        grad_out, q, k, v = args[:4]
        named = (("grad_out", grad_out), ("q", q), ("k", k), ("v", v))
    elif len(args) == 6:
        q, k, v = args[:3]
        named = (("q", q), ("k", k), ("v", v))
    else:
        return f"expected the 6 forward or 7 backward arguments of regional_cross_attention, got {len(args)}"
    for name, t in named:
        if t.dtype not in _DTYPES:
            return f"{name} has dtype {t.dtype}; the Triton kernels support float16, bfloat16 and float32"
    bsz, heads, _, d = q.shape
    if d > MAX_HEAD_DIM:
        return f"head dim d = {d}; the Triton kernels support d <= {MAX_HEAD_DIM}"
    if bsz * heads > _MAX_GRID_YZ:
        return f"B·H = {bsz * heads}; the Triton kernels support at most {_MAX_GRID_YZ}"
    n_t = math.ceil(k.shape[3] / tile_config(q, k, backward=True).block_t)
    if k.shape[1] * n_t > _MAX_GRID_YZ:
        return f"P·ceil(T / tile) = {k.shape[1] * n_t}; the Triton backward supports at most {_MAX_GRID_YZ}"
    return None

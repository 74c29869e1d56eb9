"""Elastic weight aggregation (EWA): ψ weights of G concepts, and ψ-weighted adapter merge.

ewa_weights, two launches for any B, L, G:
  1. ``_cos_max_kernel``, grid (B·L, G / BLOCK_G): one tile of concepts against all prompt
     tokens of one (sample, layer); the dot products, the token norms and the concept norms
     accumulate in the same pass over D, so every input byte is read once per tile.
       M[b,l,g] = max_{t: mask[b,t]} (x_t·e_g) / (max(‖x_t‖, ε)·max(‖e_g‖, ε))
  2. ``_pow_normalize_kernel``, grid (B·L,): ψ[b,l,:] = M⁺^p / max(‖M⁺^p‖, ε), M⁺ = max(M, 0),
     ‖·‖ L2 or L1.
ewa_merge, one launch: for each sample a GEMM with K = G·r whose left operand is scaled on
the fly, delta[b] = (B_cat·diag(ψ_b ⊗ 1_r)·scale)·A_cat, B_cat = [b_1 … b_G] (Dout × G·r),
A_cat = [a_1; …; a_G] (G·r × Din). Bandwidth-bound: a and b are read once per output tile
(and stay in L2 across the B·Dout tiles).

Backward passes are the reference formulas (plain PyTorch ops, any device): EWA is an
inference-time op whose gradient is needed only for analysis.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lifelong_engine import reference

from . import ewa_common as common
from .ewa_common import block_size

__all__ = ["ewa_weights", "ewa_weights_backward", "ewa_merge", "ewa_merge_backward", "why_not"]

_EPS = common.EPS
# Concepts per step of _pow_normalize_kernel's loops, fixed: one binary for every G (a power of
# two above G recompiled the kernel each time G crossed one); a row's loop runs ⌈G / 1024⌉ times.
_NORM_BLOCK = 1024


@triton.jit
def _cos_max_kernel(
    prompt_ptr,
    concepts_ptr,
    mask_ptr,
    m_ptr,
    L,
    T,
    D,
    G,
    stride_pb,
    stride_pl,
    stride_pt,
    stride_cl,
    stride_cg,
    stride_mb,
    eps,
    HAS_MASK: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """M[b,l,g] = max over allowed tokens t of cos(prompt[b,l,t], concepts[l,g]) (fp32 out).
    prompt (B, L, T, D) and concepts (L, G, D) have unit stride in D; M is (B, L, G) contiguous."""
    pid_bl = tl.program_id(0)
    pid_g = tl.program_id(1)
    b = pid_bl // L
    l = pid_bl % L
    offs_g = pid_g * BLOCK_G + tl.arange(0, BLOCK_G)
    g_ok = offs_g < G
    p_base = prompt_ptr + b.to(tl.int64) * stride_pb + l.to(tl.int64) * stride_pl
    c_base = concepts_ptr + l.to(tl.int64) * stride_cl
    best = tl.full((BLOCK_G,), float("-inf"), tl.float32)
    for t0 in range(0, T, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        t_ok = offs_t < T
        dots = tl.zeros((BLOCK_T, BLOCK_G), tl.float32)
        x_sq = tl.zeros((BLOCK_T,), tl.float32)
        e_sq = tl.zeros((BLOCK_G,), tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            d_ok = offs_d < D
            x_ptrs = p_base + offs_t[:, None] * stride_pt + offs_d[None, :]
            e_ptrs = c_base + offs_g[:, None] * stride_cg + offs_d[None, :]
            x = tl.load(x_ptrs, mask=t_ok[:, None] & d_ok[None, :], other=0.0)
            e = tl.load(e_ptrs, mask=g_ok[:, None] & d_ok[None, :], other=0.0)
            if IEEE:
                dots += tl.dot(x, tl.trans(e), input_precision="ieee")
            else:
                dots += tl.dot(x, tl.trans(e))
            xf = x.to(tl.float32)
            ef = e.to(tl.float32)
            x_sq += tl.sum(xf * xf, axis=1)
            e_sq += tl.sum(ef * ef, axis=1)
        x_norm = tl.maximum(tl.sqrt(x_sq), eps)
        e_norm = tl.maximum(tl.sqrt(e_sq), eps)
        cos = dots / x_norm[:, None] / e_norm[None, :]
        allowed = t_ok
        if HAS_MASK:
            allowed = allowed & (tl.load(mask_ptr + b.to(tl.int64) * stride_mb + offs_t, mask=t_ok, other=0) != 0)
        cos = tl.where(allowed[:, None], cos, float("-inf"))
        best = tl.maximum(best, tl.max(cos, axis=0))
    tl.store(m_ptr + pid_bl.to(tl.int64) * G + offs_g, best, mask=g_ok)


@triton.jit
def _pow_normalize_kernel(m_ptr, psi_ptr, G, power, eps, L1: tl.constexpr, BLOCK_G: tl.constexpr):
    """ψ[row, :] = M⁺^p / max(‖M⁺^p‖, eps) for one (sample, layer) row; M⁺^p is staged in m_ptr.
    M⁺^p = 2^(p·log2 M) for M ≥ 0 (0 at M = 0), 0 for M < 0, NaN for a NaN M."""
    row = tl.program_id(0).to(tl.int64)
    total = tl.zeros((BLOCK_G,), tl.float32)
    for g0 in range(0, G, BLOCK_G):
        offs = g0 + tl.arange(0, BLOCK_G)
        ok = offs < G
        m = tl.load(m_ptr + row * G + offs, mask=ok, other=0.0)
        mp = tl.where(ok, common.power(m, power, common.CLAMP), 0.0)
        tl.store(m_ptr + row * G + offs, mp, mask=ok)
        total = common.add_to_norm(total, mp, L1)
    common.store_normalized(m_ptr, psi_ptr, row, G, total, eps, L1, BLOCK_G)


@triton.jit
def _merge_kernel(
    psi_ptr,
    a_ptr,
    b_ptr,
    out_ptr,
    G,
    R,
    DOUT,
    DIN,
    stride_psi_b,
    stride_bg,
    stride_bo,
    scale,
    IEEE: tl.constexpr,
    BLOCK_O: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """delta[s, o, d] = Σ_k ψ[s, k // R]·scale·b[k // R, o, k % R]·a_flat[k, d], k < G·R;
    a is contiguous (G, R, DIN) = a_flat (G·R, DIN); b has unit stride in r; out (B, DOUT, DIN)."""
    pid_so = tl.program_id(0)
    pid_d = tl.program_id(1)
    n_o = tl.cdiv(DOUT, BLOCK_O)
    s = pid_so // n_o
    offs_o = (pid_so % n_o) * BLOCK_O + tl.arange(0, BLOCK_O)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    o_ok = offs_o < DOUT
    d_ok = offs_d < DIN
    acc = tl.zeros((BLOCK_O, BLOCK_D), tl.float32)
    for k0 in range(0, G * R, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < G * R
        g = offs_k // R
        w = tl.load(psi_ptr + s.to(tl.int64) * stride_psi_b + g, mask=k_ok, other=0.0).to(tl.float32) * scale
        b_offs = g.to(tl.int64)[None, :] * stride_bg + offs_o[:, None] * stride_bo + (offs_k % R)[None, :]
        bt = tl.load(b_ptr + b_offs, mask=o_ok[:, None] & k_ok[None, :], other=0.0)
        a_offs = offs_k.to(tl.int64)[:, None] * DIN + offs_d[None, :]
        at = tl.load(a_ptr + a_offs, mask=k_ok[:, None] & d_ok[None, :], other=0.0)
        bw = (bt.to(tl.float32) * w[None, :]).to(at.dtype)
        if IEEE:
            acc += tl.dot(bw, at, input_precision="ieee")
        else:
            acc += tl.dot(bw, at)
    out_offs = s.to(tl.int64) * DOUT * DIN + offs_o.to(tl.int64)[:, None] * DIN + offs_d[None, :]
    tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=o_ok[:, None] & d_ok[None, :])


def ewa_weights(prompt, concepts, prompt_mask=None, power=2.0, norm="fro"):
    """psi (B, L, G) in prompt's dtype; same semantics as reference.ewa_weights."""
    bsz, layers, t_len, dim = prompt.shape
    n_concepts = concepts.shape[1]
    psi = prompt.new_empty((bsz, layers, n_concepts))
    if psi.numel() == 0:
        return psi
    prompt = prompt if prompt.stride(-1) == 1 else prompt.contiguous()
    concepts = concepts if concepts.stride(-1) == 1 else concepts.contiguous()
    m = torch.empty((bsz, layers, n_concepts), dtype=torch.float32, device=prompt.device)
    mask = prompt_mask.to(torch.int8).contiguous() if prompt_mask is not None else m
    block_t, block_g, block_d = (
        block_size(t_len, hi=128),
        block_size(n_concepts, hi=64),
        block_size(dim, hi=64),
    )
    _cos_max_kernel[(bsz * layers, triton.cdiv(n_concepts, block_g))](
        prompt,
        concepts,
        mask,
        m,
        layers,
        t_len,
        dim,
        n_concepts,
        prompt.stride(0),
        prompt.stride(1),
        prompt.stride(2),
        concepts.stride(0),
        concepts.stride(1),
        mask.stride(0) if prompt_mask is not None else 0,
        _EPS,
        HAS_MASK=prompt_mask is not None,
        IEEE=prompt.dtype == torch.float32,
        BLOCK_T=block_t,
        BLOCK_G=block_g,
        BLOCK_D=block_d,
        # fp32 IEEE dots run on FMA units with the (128 × 64) fp32 dot tile in registers: 4 warps
        # spill 544 B on sm_90, 8 warps none (bench/aot_sm90.py).
        num_warps=8 if prompt.dtype == torch.float32 else 4,
    )
    _pow_normalize_kernel[(bsz * layers,)](
        m,
        psi,
        n_concepts,
        float(power),
        _EPS,
        L1=norm == "l1",
        BLOCK_G=_NORM_BLOCK,
    )
    return psi


def ewa_merge(psi, a, b, scale=1.0):
    """delta (B, Dout, Din) in a's dtype; same semantics as reference.ewa_merge."""
    bsz, n_concepts = psi.shape
    rank, din, dout = a.shape[1], a.shape[2], b.shape[1]
    out = a.new_empty((bsz, dout, din))
    if out.numel() == 0:
        return out
    if n_concepts == 0 or rank == 0:
        return out.zero_()
    psi, a = psi.contiguous(), a.contiguous()
    b = b if b.stride(-1) == 1 else b.contiguous()
    block_o, block_d, block_k = (
        block_size(dout, hi=64),
        block_size(din, hi=64),
        block_size(n_concepts * rank, hi=32),
    )
    grid = (bsz * triton.cdiv(dout, block_o), triton.cdiv(din, block_d))
    _merge_kernel[grid](
        psi,
        a,
        b,
        out,
        n_concepts,
        rank,
        dout,
        din,
        psi.stride(0),
        b.stride(0),
        b.stride(1),
        float(scale),
        IEEE=a.dtype == torch.float32,
        BLOCK_O=block_o,
        BLOCK_D=block_d,
        BLOCK_K=block_k,
        num_warps=4,
    )
    return out


ewa_weights_backward = reference.ewa_weights_backward
ewa_merge_backward = reference.ewa_merge_backward


why_not = common.why_not

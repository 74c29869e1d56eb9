"""What the two EWA kernel modules share (:mod:`.ewa`, the paper's op; :mod:`.ewa_official`, the
released code's): dtypes, block sizes, the cosine-max tile loop, the power step and the normalise pass of ψ."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lifelong_engine import reference

__all__ = [
    "DTYPES",
    "EPS",
    "CLAMP",
    "block_size",
    "pow_mode",
    "cos_max",
    "power",
    "add_to_norm",
    "store_normalized",
    "why_not",
]

EPS = reference.NORM_EPS
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
CLAMP = 3  # pow_mode of the paper's op: M⁺^p, negative similarities clamped to 0


def block_size(n: int, lo: int = 16, hi: int | None = None) -> int:
    """The power of two ≥ n, at least ``lo`` and at most ``hi``."""
    p = max(lo, triton.next_power_of_2(max(n, 1)))
    return min(p, hi) if hi else p


def pow_mode(p: float) -> int:
    """:func:`power`'s mode for M^p as torch.pow: 0 even integer p, 1 odd integer p, 2 real p."""
    if float(p).is_integer():
        return 1 if int(p) % 2 else 0
    return 2


@triton.jit
def cos_max(
    p_base,
    e_base,
    mask_row,
    offs_g,
    g_ok,
    T,
    D,
    stride_pt,
    stride_cg,
    eps,
    HAS_MASK: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """max over the allowed tokens t < T of cos(x_t, e_g) (fp32; -inf where no token is allowed) for one
    prompt, x_t at p_base + t·stride_pt, and the BLOCK_G concept vectors e_g at e_base + offs_g·stride_cg
    (unit stride in D); with HAS_MASK, token t is allowed where mask_row[t] != 0."""
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
            x = tl.load(
                p_base + offs_t[:, None] * stride_pt + offs_d[None, :], mask=t_ok[:, None] & d_ok[None, :], other=0.0
            )
            e = tl.load(
                e_base + offs_g[:, None] * stride_cg + offs_d[None, :], mask=g_ok[:, None] & d_ok[None, :], other=0.0
            )
            if IEEE:
                dots += tl.dot(x, tl.trans(e), input_precision="ieee")
            else:
                dots += tl.dot(x, tl.trans(e))
            xf = x.to(tl.float32)
            ef = e.to(tl.float32)
            x_sq += tl.sum(xf * xf, axis=1)
            e_sq += tl.sum(ef * ef, axis=1)
        cos = dots / tl.maximum(tl.sqrt(x_sq), eps)[:, None] / tl.maximum(tl.sqrt(e_sq), eps)[None, :]
        allowed = t_ok
        if HAS_MASK:
            allowed = allowed & (tl.load(mask_row + offs_t, mask=t_ok, other=0) != 0)
        cos = tl.where(allowed[:, None], cos, float("-inf"))
        best = tl.maximum(best, tl.max(cos, axis=0))
    return best


@triton.jit
def power(m, p, MODE: tl.constexpr):
    """|M|^p = 2^(p·log2|M|), then: MODE 1 times sign(M); MODE 2 NaN for M < 0; MODE 3 (CLAMP) 0 for M < 0."""
    mp = tl.exp2(p * tl.log2(tl.abs(m)))
    if MODE == 1:
        mp = tl.where(m < 0, -mp, mp)
    if MODE == 2:
        mp = tl.where(m < 0, float("nan"), mp)
    if MODE == 3:
        mp = tl.where(m < 0, 0.0, mp)
    return mp


@triton.jit
def add_to_norm(total, mp, L1: tl.constexpr):
    """``total`` plus this tile's share of ‖M^p‖ (|·| for L1, squares for L2)."""
    if L1:
        return total + tl.abs(mp)
    return total + mp * mp


@triton.jit
def store_normalized(staged_ptr, psi_ptr, row, G, total, eps, L1: tl.constexpr, BLOCK_G: tl.constexpr):
    """psi[row·G + g] = staged[row·G + g] / max(‖M^p‖, eps) for g < G, ‖M^p‖ from the summed ``total``."""
    norm = tl.sum(total, axis=0)
    if not L1:
        norm = tl.sqrt(norm)
    norm = tl.maximum(norm, eps)
    for g0 in range(0, G, BLOCK_G):
        offs = g0 + tl.arange(0, BLOCK_G)
        ok = offs < G
        mp = tl.load(staged_ptr + row * G + offs, mask=ok, other=0.0)
        tl.store(psi_ptr + row * G + offs, (mp / norm).to(psi_ptr.dtype.element_ty), mask=ok)


def why_not(args: tuple) -> str | None:
    """Why an EWA kernel cannot run the (forward or backward) arguments, or None."""
    for t in args:
        if isinstance(t, torch.Tensor) and t.dtype.is_floating_point and t.dtype not in DTYPES:
            return f"dtype {t.dtype} is not supported (float16, bfloat16, float32)"
    return None

"""What the two EWA kernel modules share (:mod:`.ewa`, the paper's op; :mod:`.ewa_official`, the
released code's): dtypes, block sizes, the power step and the normalise pass of ψ."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lifelong_engine import reference

__all__ = ["DTYPES", "EPS", "CLAMP", "block_size", "pow_mode", "power", "add_to_norm", "store_normalized", "why_not"]

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

"""EWA over concept token rows (the released CIDM code's EWA): ψ of G concepts from their W token rows each.

ewa_weights_rows, one launch, grid (B·L,): one program per (sample, layer) walks the concepts in
tiles of BLOCK_G; for each token row w of the tile it takes the max cosine over the allowed prompt
tokens (dot products and both norms accumulated in one pass over D, tiles of BLOCK_T × BLOCK_D),
averages the rows each concept has, and stages M^p in an fp32 scratch row; a second pass over the
row divides by the L1 or L2 norm of M^p:
    S[b,l,g,w] = max_{t: mask[b,t]} (x_t·e_gw) / (max(‖x_t‖, ε)·max(‖e_gw‖, ε))
    M[b,l,g]   = mean_{w: rows[g,w]} S[b,l,g,w];   ψ[b,l,:] = M^p / max(‖M^p‖, ε)
M^p = |M|^p = 2^(p·log2|M|), times sign(M) for odd integer p, NaN for M < 0 and real p (as torch.pow).
The backward is the reference's (plain PyTorch, any device): EWA is an inference-time op.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lifelong_engine import reference

from . import ewa_common as common
from .ewa_common import block_size

__all__ = ["ewa_weights_rows", "ewa_weights_rows_backward", "why_not"]

_EPS = common.EPS


@triton.jit
def _rows_kernel(
    prompt_ptr,
    concepts_ptr,
    rows_ptr,
    mask_ptr,
    scratch_ptr,
    psi_ptr,
    L,
    T,
    D,
    G,
    W,
    stride_pb,
    stride_pl,
    stride_pt,
    stride_cl,
    stride_cg,
    stride_cw,
    stride_mb,
    power,
    eps,
    HAS_MASK: tl.constexpr,
    IEEE: tl.constexpr,
    POW_MODE: tl.constexpr,
    L1: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """ψ[b,l,:] for one (sample, layer) = program_id(0); prompt (B, L, T, D) and concepts (L, G, W, D) have
    unit stride in D; rows (G, W) int8 contiguous; scratch fp32 and psi (B·L, G) contiguous."""
    pid = tl.program_id(0)
    b = pid // L
    l = pid % L
    p_base = prompt_ptr + b.to(tl.int64) * stride_pb + l.to(tl.int64) * stride_pl
    c_base = concepts_ptr + l.to(tl.int64) * stride_cl
    out_row = pid.to(tl.int64) * G
    total = tl.zeros((BLOCK_G,), tl.float32)
    for g0 in range(0, G, BLOCK_G):
        offs_g = g0 + tl.arange(0, BLOCK_G)
        g_ok = offs_g < G
        m_sum = tl.zeros((BLOCK_G,), tl.float32)
        count = tl.zeros((BLOCK_G,), tl.float32)
        for w in range(0, W):
            row_ok = tl.load(rows_ptr + offs_g * W + w, mask=g_ok, other=0) != 0
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
                        p_base + offs_t[:, None] * stride_pt + offs_d[None, :],
                        mask=t_ok[:, None] & d_ok[None, :],
                        other=0.0,
                    )
                    e = tl.load(
                        c_base + offs_g[:, None] * stride_cg + w * stride_cw + offs_d[None, :],
                        mask=g_ok[:, None] & d_ok[None, :],
                        other=0.0,
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
                    keep = tl.load(mask_ptr + b.to(tl.int64) * stride_mb + offs_t, mask=t_ok, other=0)
                    allowed = allowed & (keep != 0)
                cos = tl.where(allowed[:, None], cos, float("-inf"))
                best = tl.maximum(best, tl.max(cos, axis=0))
            m_sum += tl.where(row_ok, best, 0.0)
            count += row_ok.to(tl.float32)
        m = m_sum / tl.maximum(count, 1.0)
        mp = tl.where(g_ok, common.power(m, power, POW_MODE), 0.0)
        tl.store(scratch_ptr + out_row + offs_g, mp, mask=g_ok)
        total = common.add_to_norm(total, mp, L1)
    common.store_normalized(scratch_ptr, psi_ptr, pid.to(tl.int64), G, total, eps, L1, BLOCK_G)


def ewa_weights_rows(prompt, concepts, concept_rows, prompt_mask=None, power=4.0, norm="l1"):
    """psi (B, L, G) in prompt's dtype; same semantics as reference.ewa_weights_rows."""
    bsz, layers, t_len, dim = prompt.shape
    n_concepts, n_rows = concept_rows.shape
    psi = prompt.new_empty((bsz, layers, n_concepts))
    if psi.numel() == 0:
        return psi
    prompt = prompt if prompt.stride(-1) == 1 else prompt.contiguous()
    concepts = concepts if concepts.stride(-1) == 1 else concepts.contiguous()
    rows = concept_rows.to(torch.int8).contiguous()
    mask = prompt_mask.to(torch.int8).contiguous() if prompt_mask is not None else rows
    scratch = torch.empty((bsz * layers, n_concepts), dtype=torch.float32, device=prompt.device)
    _rows_kernel[(bsz * layers,)](
        prompt,
        concepts,
        rows,
        mask,
        scratch,
        psi,
        layers,
        t_len,
        dim,
        n_concepts,
        n_rows,
        prompt.stride(0),
        prompt.stride(1),
        prompt.stride(2),
        concepts.stride(0),
        concepts.stride(1),
        concepts.stride(2),
        mask.stride(0) if prompt_mask is not None else 0,
        float(power),
        _EPS,
        HAS_MASK=prompt_mask is not None,
        IEEE=prompt.dtype == torch.float32,
        POW_MODE=common.pow_mode(power),
        L1=norm == "l1",
        BLOCK_T=block_size(t_len, hi=32),
        BLOCK_G=block_size(n_concepts, hi=32),
        BLOCK_D=block_size(dim, hi=64),
        num_warps=4,
    )
    return psi


ewa_weights_rows_backward = reference.ewa_weights_rows_backward


why_not = common.why_not

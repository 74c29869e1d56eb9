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
    mask_row = mask_ptr + b.to(tl.int64) * stride_mb
    total = tl.zeros((BLOCK_G,), tl.float32)
    for g0 in range(0, G, BLOCK_G):
        offs_g = g0 + tl.arange(0, BLOCK_G)
        g_ok = offs_g < G
        m_sum = tl.zeros((BLOCK_G,), tl.float32)
        count = tl.zeros((BLOCK_G,), tl.float32)
        for w in range(0, W):
            row_ok = tl.load(rows_ptr + offs_g * W + w, mask=g_ok, other=0) != 0
            e_base = c_base + w * stride_cw
            best = common.cos_max(
                p_base, e_base, mask_row, offs_g, g_ok, T, D, stride_pt, stride_cg, eps, HAS_MASK, IEEE, BLOCK_T,
                BLOCK_G, BLOCK_D,
            )  # fmt: skip
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
        # fp16/bf16 with 4 warps spilled 32 B under Triton 3.6's ptxas (the H200 machine's; 3.9 did not):
        # 8 warps hold the tiles without spills under both; fp32 spills with 8 and not with 4 (aot_sm90)
        num_warps=4 if prompt.dtype == torch.float32 else 8,
    )
    return psi


ewa_weights_rows_backward = reference.ewa_weights_rows_backward


why_not = common.why_not

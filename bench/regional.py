"""Kernel benchmark, regional cross-attention: the fused op against the baselines a user would
otherwise reach for, at the SD-1.5 / SDXL cross-attention layers, B 1/2/8/16, P 1/3/5 prompt slots.

    python bench/regional.py [--quick] [--dtype bf16|fp16|fp32] [--model sd15,sdxl] [--out DIR] [--list]

Writes regional_cross_attention.jsonl under bench/results/<device-slug>/. The checks, the timing,
the records and the options are shared by every kernel benchmark (bench/common.py, kernel_main);
see bench/README.md for what each provider is.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable

import common
import torch
import torch.nn.functional as F
from common import (
    BATCHES,
    TEXT_LEN,
    Case,
    Prepared,
    Provider,
    Skip,
    compiled,
    kernel,
    ours,
    ours_cpu,
    randn,
    short_error,
)

common.ensure_engine_importable()


from lifelong_engine import ops, reference  # noqa: E402

# Cross-attention (attn2) layers of the UNets: (queries N, heads H, head dim d).
# SD-1.5 at 512 px: 64² / 32² / 16² latents with 320 / 640 / 1280 channels, 8 heads; mid block 8².
# SDXL at 1024 px: 64² with 640 channels (10 heads) and 32² with 1280 (20 heads), head dim 64.
ATTN_LAYERS = {
    "sd15": ((4096, 8, 40), (1024, 8, 80), (256, 8, 160), (64, 8, 160)),
    "sdxl": ((4096, 10, 64), (1024, 20, 64)),
}
PROMPT_SLOTS = (1, 3, 5)

# ------------------------------------------------------------------ regional attention


def region_layout(bsz: int, n_q: int, n_slots: int, device) -> torch.Tensor:
    """region_ids (B, N): slots 1..P−1 as side-by-side boxes over the middle 80% of a square
    latent (rows 10–90%), slot 0 elsewhere, as a user's region boxes would be; each sample's
    boxes are shifted a little so the samples differ."""
    side = math.isqrt(n_q)
    if side * side != n_q:
        raise ValueError(f"N = {n_q}: expected a square latent")
    ids = torch.zeros(bsz, side, side, dtype=torch.int64)
    boxes = n_slots - 1
    for b in range(bsz):
        shift = (b % 3) * side // 32
        for p in range(1, n_slots):
            x0 = int(side * (0.1 + 0.8 * (p - 1) / boxes)) + shift
            x1 = int(side * (0.1 + 0.8 * p / boxes)) - max(1, side // 32) + shift
            ids[b, side // 10 : side - side // 10, x0 : max(x1, x0 + 1)] = p
    return ids.reshape(bsz, n_q).to(device)


def _allowed_keys(region_ids: torch.Tensor, kv_len: torch.Tensor | None, n_slots: int, t_len: int) -> torch.Tensor:
    """(B, N, P·T) bool: key j (slot j // T, position j % T) is attended by query n."""
    j = torch.arange(n_slots * t_len, device=region_ids.device)
    allowed = region_ids[:, :, None] == (j // t_len)
    if kv_len is not None:
        allowed = allowed & ((j % t_len) < kv_len[:, j // t_len])[:, None, :]
    return allowed


def _flat_kv(x: torch.Tensor) -> torch.Tensor:
    """(B, P, H, T, d) → (B, H, P·T, d) contiguous: the keys of all slots concatenated."""
    return x.transpose(1, 2).flatten(2, 3).contiguous()


def _key_mask(kv_len: torch.Tensor | None, p: int, t_len: int) -> torch.Tensor | None:
    """(B, 1, 1, T) bool SDPA mask of slot p's valid keys, or None when all are valid."""
    if kv_len is None:
        return None
    return (torch.arange(t_len, device=kv_len.device) < kv_len[:, p, None])[:, None, None, :]


def _regional_args(i: dict) -> tuple:
    return i["q"], i["k"], i["v"], i["region_ids"], i["kv_len"], i["scale"]


def _p_ours(i, ctx):
    return ours(ops.regional_cross_attention, *_regional_args(i), ctx=ctx)


def _p_trusted(i, ctx):
    return ours(ops.regional_cross_attention_trusted, *_regional_args(i), ctx=ctx)


def _p_cpu(i, ctx):
    return ours_cpu(ops.regional_cross_attention, *_regional_args(i), ctx=ctx)


def _p_kernel(i, ctx):
    return kernel("regional_attention", "regional_cross_attention", *_regional_args(i), ctx=ctx)


def _p_reference(i, ctx):
    args = _regional_args(i)
    return Prepared(lambda: reference.regional_cross_attention(*args))


def _p_compile(i, ctx):
    return compiled(reference.regional_cross_attention, *_regional_args(i))


def _p_sdpa(i, ctx):
    q, k, v, _, kv_len, scale = _regional_args(i)
    if k.shape[1] != 1:
        raise Skip("plain SDPA has no notion of regions: only P = 1")
    k0, v0, mask = k[:, 0], v[:, 0], _key_mask(kv_len, 0, k.shape[3])
    return Prepared(lambda: F.scaled_dot_product_attention(q, k0, v0, attn_mask=mask, scale=scale))


def _p_sdpa_mask(i, ctx):
    q, k, v, region_ids, kv_len, scale = _regional_args(i)
    n_slots, t_len = k.shape[1], k.shape[3]
    kc, vc = _flat_kv(k), _flat_kv(v)
    allowed = _allowed_keys(region_ids, kv_len, n_slots, t_len)[:, None]  # (B, 1, N, P·T)
    bias = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device).masked_fill(~allowed, float("-inf"))
    return Prepared(lambda: F.scaled_dot_product_attention(q, kc, vc, attn_mask=bias, scale=scale))


def _p_sdpa_per_region(i, ctx):
    q, k, v, region_ids, kv_len, scale = _regional_args(i)
    n_slots, t_len = k.shape[1], k.shape[3]
    if n_slots == 1:
        raise Skip("the same as sdpa when P = 1")
    masks = [_key_mask(kv_len, p, t_len) for p in range(n_slots)]
    rows = [(region_ids == p)[:, None, :, None] for p in range(n_slots)]

    def call():
        out = F.scaled_dot_product_attention(q, k[:, 0], v[:, 0], attn_mask=masks[0], scale=scale)
        for p in range(1, n_slots):
            out_p = F.scaled_dot_product_attention(q, k[:, p], v[:, p], attn_mask=masks[p], scale=scale)
            out = torch.where(rows[p], out_p, out)
        return out

    return Prepared(call)


_FLEX: dict[str, Callable] = {}


def _p_flex(i, ctx):
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as e:
        raise Skip(f"FlexAttention is not available in torch {torch.__version__}") from e
    q, k, v, region_ids, kv_len, scale = _regional_args(i)
    bsz, n_slots, _, t_len, _ = k.shape
    n_q = q.shape[2]
    kc, vc = _flat_kv(k), _flat_kv(v)

    def mask_mod(b, h, q_idx, kv_idx):
        # Indices are clamped so that no lookup can leave the tensors (a device assert would
        # end the whole run), whatever padding the kernel applies.
        slot = torch.clamp(kv_idx // t_len, max=n_slots - 1)
        ok = region_ids[b, torch.clamp(q_idx, max=n_q - 1)] == slot
        if kv_len is not None:
            ok = ok & (kv_idx - slot * t_len < kv_len[b, slot])
        return ok

    try:
        block_mask = create_block_mask(mask_mod, bsz, None, n_q, n_slots * t_len, device=str(q.device))
        if "fn" not in _FLEX:
            _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
        flex = _FLEX["fn"]

        def call():
            return flex(q, kc, vc, block_mask=block_mask, scale=scale)

        call()
    except Exception as e:
        raise Skip(f"FlexAttention failed: {short_error(e)}") from e
    return Prepared(call)


def _p_xformers(i, ctx):
    try:
        import xformers.ops as xops
    except Exception as e:  # ImportError, or a build for another torch
        raise Skip(f"xformers is not importable: {short_error(e)}") from e
    q, k, v, region_ids, kv_len, scale = _regional_args(i)
    if q.device.type != "cuda":
        raise Skip("xformers runs CUDA tensors")
    if kv_len is not None:
        raise Skip("ragged kv_len is not wired up for xformers in this benchmark")
    n_slots = k.shape[1]
    # xformers' layout is (B, N, H, d); converted once, outside the timed call.
    qx = q.transpose(1, 2).contiguous()
    kx = [k[:, p].transpose(1, 2).contiguous() for p in range(n_slots)]
    vx = [v[:, p].transpose(1, 2).contiguous() for p in range(n_slots)]
    rows = [(region_ids == p)[:, :, None, None] for p in range(n_slots)]

    def call():
        out = xops.memory_efficient_attention(qx, kx[0], vx[0], scale=scale)
        for p in range(1, n_slots):  # one pass per region, then select rows
            out = torch.where(rows[p], xops.memory_efficient_attention(qx, kx[p], vx[p], scale=scale), out)
        return out

    return Prepared(call, canonical=lambda out: out.transpose(1, 2))


REGIONAL_PROVIDERS = [
    Provider("ours", _p_ours),
    Provider("ours_trusted", _p_trusted),
    Provider("ours_cpu", _p_cpu),
    Provider("ours_kernel", _p_kernel),
    Provider("reference", _p_reference),
    Provider("compile", _p_compile),
    Provider("sdpa", _p_sdpa),
    Provider("sdpa_mask", _p_sdpa_mask),
    Provider("sdpa_per_region", _p_sdpa_per_region),
    Provider("flex", _p_flex),
    Provider("xformers", _p_xformers),
]


def regional_case(model: str, n_q: int, heads: int, d: int, bsz: int, n_slots: int, ragged: bool = False) -> Case:
    t_len = TEXT_LEN

    def make(device, dtype):
        kv_len = None
        if ragged:  # prompts of 8..T tokens, slot by slot
            kv_len = torch.randint(8, t_len + 1, (bsz, n_slots)).to(device)
        return {
            "q": randn(bsz, heads, n_q, d, device=device, dtype=dtype),
            "k": randn(bsz, n_slots, heads, t_len, d, device=device, dtype=dtype),
            "v": randn(bsz, n_slots, heads, t_len, d, device=device, dtype=dtype),
            "region_ids": region_layout(bsz, n_q, n_slots, device),
            "kv_len": kv_len,
            "scale": d**-0.5,
        }

    def cost(i):
        elt = i["q"].element_size()
        n_bytes = elt * (2 * bsz * heads * n_q * d + 2 * bsz * n_slots * heads * t_len * d)  # q, k, v, out
        keys = bsz * n_q * t_len
        if i["kv_len"] is not None:  # only the valid keys of each query's own slot are useful work
            keys = int(torch.gather(i["kv_len"], 1, i["region_ids"]).sum())
        return n_bytes, 4 * heads * d * keys

    shape = {"model": model, "B": bsz, "H": heads, "N": n_q, "d": d, "P": n_slots, "T": t_len, "ragged": ragged}
    label = f"{model} N={n_q} H={heads} d={d} B={bsz} P={n_slots}" + (" ragged" if ragged else "")
    ref = lambda i: reference.regional_cross_attention(*_regional_args(i))  # noqa: E731
    return Case("regional_cross_attention", label, shape, make, ref, cost, REGIONAL_PROVIDERS)


def regional_cases(quick: bool, models: set[str], batches: set[int]) -> list[Case]:
    if quick:
        return [
            regional_case("tiny", 64, 2, 40, 1, 1),
            regional_case("tiny", 256, 2, 64, 2, 3, ragged=True),
        ]
    return [
        regional_case(model, n_q, heads, d, bsz, n_slots)
        for model, layers in ATTN_LAYERS.items()
        if model in models
        for n_q, heads, d in layers
        for bsz in BATCHES
        if bsz in batches
        for n_slots in PROMPT_SLOTS
    ]


SUBJECTS = {"regional_cross_attention": (regional_cases, REGIONAL_PROVIDERS)}

if __name__ == "__main__":
    sys.exit(common.kernel_main(__doc__, SUBJECTS))

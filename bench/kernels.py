"""Kernel benchmark: each fused op against the baselines a user would otherwise reach for.

    python bench/kernels.py [--quick] [--subject regional|lora_kv|ewa|all] [--dtype bf16|fp16|fp32] [--out DIR]

Subjects (one JSON-lines file each under bench/results/<device-slug>/):
  regional_cross_attention   SD-1.5 / SDXL cross-attention layers, B 1/2/8/16, P 1/3/5 prompt slots
  lora_kv_projection         one attn2 K/V projection, B 1/2/8/16, 1/4/16 adapters per sample
  lora_kv_projection_unet    all 16 SD-1.5 attn2 K/V projections (grouped launch vs 16 launches)
  ewa_weights                ψ of G = 10/100/1000 concepts for B samples × 16 layers
  ewa_merge                  ψ-weighted merge of G = 10/100/1000 adapters into dense deltas

Every provider is first checked against the fp32 reference (lifelong_engine.reference on the
same inputs upcast): its max abs error must be ≤ 2 × the error of the reference run in the
benchmark dtype + rtol(dtype) × max|ref|. Only providers that pass are timed. A provider that
cannot run here (package missing, CPU without the Triton interpreter, compile failure) is
recorded as skipped with the reason. See bench/README.md for what each provider is.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import sys
import time
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import common
import torch
import torch.nn.functional as F

try:
    from tqdm.auto import tqdm
except ImportError:  # a bare GPU box may lack it: no progress bar then

    def tqdm(iterable, **kwargs):
        return iterable


common.ensure_engine_importable()

from lifelong_engine import ops, reference  # noqa: E402
from lifelong_engine.errors import BackendUnavailableError  # noqa: E402

# ------------------------------------------------------------------------------ shapes

TEXT_LEN = 77  # CLIP prompt length, SD-1.5 and SDXL
BATCHES = (1, 2, 8, 16)

# Cross-attention (attn2) layers of the UNets: (queries N, heads H, head dim d).
# SD-1.5 at 512 px: 64² / 32² / 16² latents with 320 / 640 / 1280 channels, 8 heads; mid block 8².
# SDXL at 1024 px: 64² with 640 channels (10 heads) and 32² with 1280 (20 heads), head dim 64.
ATTN_LAYERS = {
    "sd15": ((4096, 8, 40), (1024, 8, 80), (256, 8, 160), (64, 8, 160)),
    "sdxl": ((4096, 10, 64), (1024, 20, 64)),
}
PROMPT_SLOTS = (1, 3, 5)

# K/V projections: text width Din → layer widths Dout.
KV_LAYERS = {"sd15": (768, (320, 640, 1280)), "sdxl": (2048, (640, 1280))}
# SD-1.5's 16 attn2 layers in order: down 320 ×2, 640 ×2, 1280 ×2; mid 1280; up 1280 ×3, 640 ×3, 320 ×3.
SD15_KV_DOUT = (320, 320, 640, 640, 1280, 1280, 1280, 1280, 1280, 1280, 640, 640, 640, 320, 320, 320)
ADAPTERS_PER_SAMPLE = (1, 4, 16)
LORA_RANK, LORA_ALPHA, ADAPTER_POOL = 4, 8.0, 16  # scale = alpha / rank = 2, as peft computes it

EWA_LAYERS, EWA_DIM = 16, 768
EWA_CONCEPTS = (10, 100, 1000)
MERGE_SHAPES = ((320, 768), (1280, 768), (1280, 2048))  # (Dout, Din)
MERGE_BATCHES = (1, 8)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Correctness: |provider − ref32| ≤ 2·|ref_same_dtype − ref32| + RTOL·max|ref32|.
RTOL = {torch.float32: 1e-3, torch.float16: 5e-3, torch.bfloat16: 2e-2}

SUBJECTS = {
    "regional": ("regional_cross_attention",),
    "lora_kv": ("lora_kv_projection", "lora_kv_projection_unet"),
    "ewa": ("ewa_weights", "ewa_merge"),
}
COMPILING = ("compile", "flex")  # providers that need a torch.compile per case


# ---------------------------------------------------------------------------- plumbing


class Skip(Exception):
    """The provider cannot run here; the message says why."""


@dataclass
class Context:
    device: torch.device
    dtype: torch.dtype
    quick: bool
    interpret: bool  # TRITON_INTERPRET=1 was set before Python started

    def require_triton(self) -> None:
        """Raise Skip unless our Triton kernels can run meaningfully here."""
        if self.device.type == "cuda":
            return
        if not self.interpret:
            raise Skip("Triton kernels run on CUDA, or on CPU only with TRITON_INTERPRET=1 set before Python starts")
        if not self.quick:
            raise Skip("the Triton CPU interpreter is a correctness check, not a speed: only with --quick")
        if self.dtype == torch.bfloat16:
            raise Skip("the Triton CPU interpreter mishandles bf16 tl.dot: use --dtype fp32 or fp16")

    @property
    def interpreted(self) -> bool:
        return self.device.type == "cpu" and self.interpret


@dataclass
class Prepared:
    """call(): the timed work; canonical(out): its output in the reference's layout (untimed)."""

    call: Callable[[], Any]
    canonical: Callable[[Any], Any] = lambda out: out
    interpreted: bool = False


@dataclass(frozen=True)
class Provider:
    name: str
    build: Callable[[dict, Context], Prepared]  # raises Skip when it cannot run


@dataclass
class Case:
    """One shape of one subject. make(device, dtype) → inputs; reference(inputs) → outputs
    (run on the inputs upcast to fp32 for the ground truth); cost(inputs) → (bytes, flops)
    that the op must at least move and compute (the same for every provider)."""

    subject: str
    label: str
    shape: dict
    make: Callable[[torch.device, torch.dtype], dict]
    reference: Callable[[dict], Any]
    cost: Callable[[dict], tuple[int, int | None]]
    providers: list[Provider] = field(default_factory=list)


def _randn(*shape: int, device, dtype, std: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, device=device) * std).to(dtype)


def _upcast(x):
    if isinstance(x, torch.Tensor):
        return x.float() if x.is_floating_point() else x
    if isinstance(x, dict):
        return {k: _upcast(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return type(x)(_upcast(v) for v in x)
    return x


def _tensors(out) -> list[torch.Tensor]:
    """The output tensors in order, however nested in tuples / lists."""
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for o in out for t in _tensors(o)]


def _max_err(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    if [tuple(t.shape) for t in got] != [tuple(t.shape) for t in want]:
        raise ValueError(f"output shapes {[tuple(t.shape) for t in got]}; expected {[tuple(t.shape) for t in want]}")
    return max((g.float() - w.float()).abs().max().item() for g, w in zip(got, want))


def _short(e: BaseException, limit: int = 300) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    text = f"{type(e).__name__}: {text}" if not isinstance(e, Skip) else text
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _compiled(fn: Callable, *args) -> Prepared:
    """torch.compile(fn) (default mode, static shapes) called on args; compiled by a first call
    here, so a compiler failure becomes a Skip."""
    compiled = torch.compile(fn, dynamic=False)

    def call():
        return compiled(*args)

    try:
        call()
    except Exception as e:  # inductor raises many types (BackendCompilerFailed, CppCompileError, ...)
        raise Skip(f"torch.compile failed: {_short(e)}") from e
    return Prepared(call)


def _ours(op: Callable, *args, ctx: Context) -> Prepared:
    """The public op under use_backend("triton") (validation + dispatch + kernel)."""
    ctx.require_triton()

    def call():
        with ops.use_backend("triton"):
            return op(*args)

    return Prepared(call, interpreted=ctx.interpreted)


def _cpu(op: Callable, *args, ctx: Context) -> Prepared:
    """The public op under use_backend("torch"), the fast plain-PyTorch CPU backend (validation +
    dispatch + implementation)."""
    if ctx.device.type != "cpu":
        raise Skip("the torch backend runs CPU tensors")

    def call():
        with ops.use_backend("torch"):
            return op(*args)

    return Prepared(call)


def _launcher(module: str, name: str, ctx: Context) -> Callable:
    """lifelong_engine.kernels.<module>.<name>, or Skip when it cannot run here or does not exist."""
    ctx.require_triton()
    try:
        return getattr(importlib.import_module(f"lifelong_engine.kernels.{module}"), name)
    except (ImportError, AttributeError) as e:
        raise Skip(f"lifelong_engine.kernels.{module}.{name} is not available: {_short(e)}") from e


def _kernel(module: str, name: str, *args, ctx: Context) -> Prepared:
    """The Triton launcher called directly (no validation, no dispatch): the gap to `ours` is
    the op wrapper's overhead."""
    fn = _launcher(module, name, ctx)
    return Prepared(lambda: fn(*args), interpreted=ctx.interpreted)


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
    return _ours(ops.regional_cross_attention, *_regional_args(i), ctx=ctx)


def _p_cpu(i, ctx):
    return _cpu(ops.regional_cross_attention, *_regional_args(i), ctx=ctx)


def _p_kernel(i, ctx):
    return _kernel("regional_attention", "regional_cross_attention", *_regional_args(i), ctx=ctx)


def _p_reference(i, ctx):
    args = _regional_args(i)
    return Prepared(lambda: reference.regional_cross_attention(*args))


def _p_compile(i, ctx):
    return _compiled(reference.regional_cross_attention, *_regional_args(i))


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
        raise Skip(f"FlexAttention failed: {_short(e)}") from e
    return Prepared(call)


def _p_xformers(i, ctx):
    try:
        import xformers.ops as xops
    except Exception as e:  # ImportError, or a build for another torch
        raise Skip(f"xformers is not importable: {_short(e)}") from e
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
            "q": _randn(bsz, heads, n_q, d, device=device, dtype=dtype),
            "k": _randn(bsz, n_slots, heads, t_len, d, device=device, dtype=dtype),
            "v": _randn(bsz, n_slots, heads, t_len, d, device=device, dtype=dtype),
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


# ----------------------------------------------------------------------------- lora_kv


def _lora_layer(din: int, dout: int, n_adapters: int, device, dtype) -> dict:
    """Base K/V weights and a pool of n_adapters rank-LORA_RANK adapters of one layer. The
    adapters are as large as the base path (not peft's zero init), so a wrong one shows."""
    r = LORA_RANK
    return {
        "w_k": _randn(dout, din, device=device, dtype=dtype, std=din**-0.5),
        "w_v": _randn(dout, din, device=device, dtype=dtype, std=din**-0.5),
        "a_k": _randn(n_adapters, r, din, device=device, dtype=dtype, std=din**-0.5),
        "b_k": _randn(n_adapters, dout, r, device=device, dtype=dtype, std=r**-0.5),
        "a_v": _randn(n_adapters, r, din, device=device, dtype=dtype, std=din**-0.5),
        "b_v": _randn(n_adapters, dout, r, device=device, dtype=dtype, std=r**-0.5),
    }


def _adapter_ids(bsz: int, per_sample: int, n_adapters: int, device) -> torch.Tensor:
    """One adapter per sample (each sample its own, peft's mixed batch), or the same
    `per_sample` adapters for every sample (peft's several active adapters)."""
    if per_sample == 1:
        return (torch.arange(bsz) % n_adapters)[:, None].to(device)
    return torch.arange(per_sample).repeat(bsz, 1).to(device)


_LAYER_KEYS = ("w_k", "w_v", "a_k", "b_k", "a_v", "b_v")


def _lora_cost(elt: int, bsz: int, t_len: int, din: int, dout: int, ids: torch.Tensor) -> tuple[int, int]:
    used = int(torch.unique(ids[ids >= 0]).numel())
    slots = int((ids >= 0).sum())
    r = LORA_RANK
    n_bytes = elt * (bsz * t_len * din + 2 * dout * din + 2 * used * r * (din + dout) + 2 * bsz * t_len * dout)
    flops = 2 * (2 * bsz * t_len * din * dout) + 2 * (2 * slots * t_len * r * (din + dout))
    return n_bytes, flops


def _lora_args(i: dict) -> tuple:
    return (i["c"], *(i[key] for key in _LAYER_KEYS), i["ids"], i["weights"], i["scale"])


class _KV(torch.nn.Module):
    def __init__(self, din: int, dout: int):
        super().__init__()
        self.to_k = torch.nn.Linear(din, dout, bias=False)
        self.to_v = torch.nn.Linear(din, dout, bias=False)


def _peft_module(layer: dict, device, dtype) -> torch.nn.Module:
    """An attn2-like module whose to_k / to_v carry the layer's adapter pool as peft LoRA
    adapters c0, c1, … (r = LORA_RANK, lora_alpha = LORA_ALPHA, so scaling = our scale)."""
    from peft import LoraConfig, inject_adapter_in_model

    n_adapters, r, din = layer["a_k"].shape
    module = _KV(din, layer["w_k"].shape[0])
    config = LoraConfig(r=r, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=["to_k", "to_v"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Already found a peft_config attribute": intended, one per adapter
        for n in range(n_adapters):
            inject_adapter_in_model(config, module, adapter_name=f"c{n}")
    module = module.to(device=device, dtype=dtype).eval().requires_grad_(False)
    with torch.no_grad():
        for proj, w, a, b in ((module.to_k, "w_k", "a_k", "b_k"), (module.to_v, "w_v", "a_v", "b_v")):
            proj.base_layer.weight.copy_(layer[w])
            for n in range(n_adapters):
                proj.lora_A[f"c{n}"].weight.copy_(layer[a][n])
                proj.lora_B[f"c{n}"].weight.copy_(layer[b][n])
    return module


def _peft_plan(ids: torch.Tensor, weights: torch.Tensor) -> tuple[str, list[str]]:
    """('mixed', adapter name per sample) or ('shared', names active for every sample)."""
    if not bool((weights == 1).all()):
        raise Skip("peft has no per-sample adapter weights")
    rows = ids.tolist()
    if ids.shape[1] == 1:
        return "mixed", [f"c{row[0]}" if row[0] >= 0 else "__base__" for row in rows]
    if any(row != rows[0] for row in rows) or min(rows[0]) < 0:
        raise Skip("peft cannot give each sample its own set of several adapters")
    return "shared", [f"c{n}" for n in rows[0]]


def _peft(layers: list[dict], c_per_layer: list[torch.Tensor], ids, weights, ctx: Context) -> Prepared:
    try:
        import peft  # noqa: F401
    except Exception as e:  # ImportError, or a peft that does not work with this torch
        raise Skip(f"peft is not importable: {_short(e)}") from e
    mode, names = _peft_plan(ids, weights)
    modules = [_peft_module(layer, ctx.device, ctx.dtype) for layer in layers]
    if mode == "shared":
        for m in modules:
            m.to_k.set_adapter(names)
            m.to_v.set_adapter(names)
        return Prepared(lambda: [(m.to_k(c), m.to_v(c)) for m, c in zip(modules, c_per_layer)])

    def mixed():
        return [(m.to_k(c, adapter_names=names), m.to_v(c, adapter_names=names)) for m, c in zip(modules, c_per_layer)]

    return Prepared(mixed)


def _l_ours(i, ctx):
    return _ours(ops.lora_kv_projection, *_lora_args(i), ctx=ctx)


def _l_cpu(i, ctx):
    return _cpu(ops.lora_kv_projection, *_lora_args(i), ctx=ctx)


def _l_kernel(i, ctx):
    return _kernel("lora_kv", "lora_kv_projection", *_lora_args(i), ctx=ctx)


def _l_reference(i, ctx):
    args = _lora_args(i)
    return Prepared(lambda: reference.lora_kv_projection(*args))


def _l_compile(i, ctx):
    return _compiled(reference.lora_kv_projection, *_lora_args(i))


def _l_peft(i, ctx):
    return _peft([{key: i[key] for key in _LAYER_KEYS}], [i["c"]], i["ids"], i["weights"], ctx)


LORA_PROVIDERS = [
    Provider("ours", _l_ours),
    Provider("ours_cpu", _l_cpu),
    Provider("ours_kernel", _l_kernel),
    Provider("reference", _l_reference),
    Provider("compile", _l_compile),
    Provider("peft", _l_peft),
]


def lora_case(model: str, din: int, dout: int, bsz: int, per_sample: int, pool: int = ADAPTER_POOL) -> Case:
    t_len, pool = TEXT_LEN, max(pool, per_sample)

    def make(device, dtype):
        ids = _adapter_ids(bsz, per_sample, pool, device)
        return {
            "c": _randn(bsz, t_len, din, device=device, dtype=dtype),
            **_lora_layer(din, dout, pool, device, dtype),
            "ids": ids,
            "weights": torch.ones(ids.shape, device=device, dtype=dtype),
            "scale": LORA_ALPHA / LORA_RANK,
        }

    def cost(i):
        return _lora_cost(i["c"].element_size(), bsz, t_len, din, dout, i["ids"])

    shape = {"model": model, "B": bsz, "T": t_len, "Din": din, "Dout": dout, "S": per_sample, "N": pool}
    shape["r"] = LORA_RANK
    label = f"{model} Din={din} Dout={dout} B={bsz} S={per_sample}"
    ref = lambda i: reference.lora_kv_projection(*_lora_args(i))  # noqa: E731
    return Case("lora_kv_projection", label, shape, make, ref, cost, LORA_PROVIDERS)


def lora_cases(quick: bool, models: set[str], batches: set[int]) -> list[Case]:
    if quick:
        return [lora_case("tiny", 96, 48, 2, 1, pool=4), lora_case("tiny", 96, 48, 2, 4, pool=4)]
    return [
        lora_case(model, din, dout, bsz, per_sample)
        for model, (din, douts) in KV_LAYERS.items()
        if model in models
        for dout in douts
        for bsz in BATCHES
        if bsz in batches
        for per_sample in ADAPTERS_PER_SAMPLE
    ]


# ---------------------------------------------------------------- lora_kv, all layers


def _unet_layers(i: dict) -> list[dict]:
    return [{key: i[key][n] for key in _LAYER_KEYS} for n in range(len(i["w_k"]))]


def _unet_per_layer(op: Callable, i: dict) -> list:
    c, ids, weights, scale = i["c"], i["ids"], i["weights"], i["scale"]
    layers = _unet_layers(i)
    return [op(c[n], *(layer[key] for key in _LAYER_KEYS), ids, weights, scale) for n, layer in enumerate(layers)]


def _unet_reference(i: dict) -> list:
    return _unet_per_layer(reference.lora_kv_projection, i)


def _u_grouped(i, ctx):
    lists = [list(i[key]) for key in _LAYER_KEYS]
    grouped = _launcher("lora_kv", "lora_kv_projection_grouped", ctx)
    lora_kv = importlib.import_module("lifelong_engine.kernels.lora_kv")
    if hasattr(lora_kv, "pack_layers"):  # frozen weights and the adapter pool packed once, as a server does
        packed = lora_kv.pack_layers(*lists)
        args, kwargs = (i["c"], *([None] * len(lists)), i["ids"], i["weights"], i["scale"]), {"packed": packed}
    else:
        args, kwargs = (i["c"], *lists, i["ids"], i["weights"], i["scale"]), {}

    def call():
        return grouped(*args, **kwargs)

    def canonical(out):  # (k_list, v_list) → [(k_0, v_0), (k_1, v_1), …] like the per-layer calls
        k_list, v_list = out
        return list(zip(k_list, v_list))

    return Prepared(call, canonical=canonical, interpreted=ctx.interpreted)


def _u_ours(i, ctx):
    ctx.require_triton()

    def call():
        with ops.use_backend("triton"):
            return _unet_per_layer(ops.lora_kv_projection, i)

    return Prepared(call, interpreted=ctx.interpreted)


def _u_reference(i, ctx):
    return Prepared(lambda: _unet_reference(i))


def _u_compile(i, ctx):
    return _compiled(_unet_reference, i)


def _u_peft(i, ctx):
    layers = _unet_layers(i)
    return _peft(layers, [i["c"][n] for n in range(len(layers))], i["ids"], i["weights"], ctx)


UNET_PROVIDERS = [
    Provider("ours_grouped", _u_grouped),
    Provider("ours", _u_ours),
    Provider("reference", _u_reference),
    Provider("compile", _u_compile),
    Provider("peft", _u_peft),
]


def unet_case(model: str, din: int, douts: tuple[int, ...], bsz: int, per_sample: int, pool=ADAPTER_POOL) -> Case:
    t_len, pool = TEXT_LEN, max(pool, per_sample)

    def make(device, dtype):
        layers = [_lora_layer(din, dout, pool, device, dtype) for dout in douts]
        ids = _adapter_ids(bsz, per_sample, pool, device)
        return {
            "c": _randn(len(douts), bsz, t_len, din, device=device, dtype=dtype),  # layer-wise text embeddings
            **{key: [layer[key] for layer in layers] for key in _LAYER_KEYS},
            "ids": ids,
            "weights": torch.ones(ids.shape, device=device, dtype=dtype),
            "scale": LORA_ALPHA / LORA_RANK,
        }

    def cost(i):
        costs = [_lora_cost(i["c"].element_size(), bsz, t_len, din, dout, i["ids"]) for dout in douts]
        return sum(b for b, _ in costs), sum(f for _, f in costs)

    shape = {"model": model, "L": len(douts), "B": bsz, "T": t_len, "Din": din, "Dout": list(douts)}
    shape.update(S=per_sample, N=pool, r=LORA_RANK)
    label = f"{model} {len(douts)} layers B={bsz} S={per_sample}"
    return Case("lora_kv_projection_unet", label, shape, make, _unet_reference, cost, UNET_PROVIDERS)


def unet_cases(quick: bool, models: set[str], batches: set[int]) -> list[Case]:
    if quick:
        return [unet_case("tiny", 96, (32, 48, 32), 2, 1, pool=4)]
    if "sd15" not in models:
        return []
    return [
        unet_case("sd15", 768, SD15_KV_DOUT, bsz, per_sample)
        for bsz in BATCHES
        if bsz in batches
        for per_sample in ADAPTERS_PER_SAMPLE
    ]


# ---------------------------------------------------------------------------------- EWA


def _ewa_args(i: dict) -> tuple:
    return i["prompt"], i["concepts"], i["prompt_mask"], i["power"], i["norm"]


def ewa_weights_loop(prompt, concepts, prompt_mask=None, power=2.0, norm="fro"):
    """What one writes without a fused op: a Python loop over concepts, cosine max per concept."""
    m = prompt.new_empty(prompt.shape[0], prompt.shape[1], concepts.shape[1])
    keep = None if prompt_mask is None else prompt_mask[:, None, :]
    for g in range(concepts.shape[1]):
        cos = F.cosine_similarity(prompt, concepts[None, :, None, g], dim=-1)  # (B, L, T)
        if keep is not None:
            cos = cos.masked_fill(~keep, float("-inf"))
        m[..., g] = cos.amax(-1)
    m_pow = m.pow(power)
    total = m_pow.norm(dim=-1, keepdim=True) if norm == "fro" else m_pow.abs().sum(-1, keepdim=True)
    return m_pow / total


def _w_ours(i, ctx):
    return _ours(ops.ewa_weights, *_ewa_args(i), ctx=ctx)


def _w_kernel(i, ctx):
    return _kernel("ewa", "ewa_weights", *_ewa_args(i), ctx=ctx)


def _w_reference(i, ctx):
    args = _ewa_args(i)
    return Prepared(lambda: reference.ewa_weights(*args))


def _w_compile(i, ctx):
    return _compiled(reference.ewa_weights, *_ewa_args(i))


def _w_loop(i, ctx):
    args = _ewa_args(i)
    return Prepared(lambda: ewa_weights_loop(*args))


EWA_WEIGHTS_PROVIDERS = [
    Provider("ours", _w_ours),
    Provider("ours_kernel", _w_kernel),
    Provider("reference", _w_reference),
    Provider("compile", _w_compile),
    Provider("loop", _w_loop),
]


def ewa_weights_case(bsz: int, layers: int, dim: int, n_concepts: int, t_len: int = TEXT_LEN) -> Case:
    def make(device, dtype):
        lengths = torch.randint(6, 21, (bsz,))  # a prompt of 6–20 tokens, the rest padding
        return {
            "prompt": _randn(bsz, layers, t_len, dim, device=device, dtype=dtype),
            "concepts": _randn(layers, n_concepts, dim, device=device, dtype=dtype),
            "prompt_mask": (torch.arange(t_len)[None, :] < lengths[:, None]).to(device),
            "power": 2.0,
            "norm": "fro",
        }

    def cost(i):
        elt = i["prompt"].element_size()
        n_bytes = elt * (bsz * layers * t_len * dim + layers * n_concepts * dim + bsz * layers * n_concepts)
        return n_bytes + bsz * t_len, 2 * bsz * layers * t_len * n_concepts * dim

    shape = {"B": bsz, "L": layers, "T": t_len, "D": dim, "G": n_concepts, "power": 2.0, "norm": "fro"}
    label = f"B={bsz} L={layers} D={dim} G={n_concepts}"
    ref = lambda i: reference.ewa_weights(*_ewa_args(i))  # noqa: E731
    return Case("ewa_weights", label, shape, make, ref, cost, EWA_WEIGHTS_PROVIDERS)


def ewa_merge_loop(psi, a, b, scale=1.0):
    """The per-adapter loop: delta += psi[:, g]·scale·(b[g] @ a[g]). Accumulates in fp32: in
    bf16 the running sum drifts by several % over 1000 adapters and fails the check."""
    delta = torch.zeros(psi.shape[0], b.shape[1], a.shape[2], dtype=torch.float32, device=a.device)
    for g in range(a.shape[0]):
        delta += psi[:, g, None, None].to(a.dtype) * scale * (b[g] @ a[g])
    return delta.to(a.dtype)


def _m_ours(i, ctx):
    return _ours(ops.ewa_merge, i["psi"], i["a"], i["b"], i["scale"], ctx=ctx)


def _m_cpu(i, ctx):
    return _cpu(ops.ewa_merge, i["psi"], i["a"], i["b"], i["scale"], ctx=ctx)


def _m_kernel(i, ctx):
    return _kernel("ewa", "ewa_merge", i["psi"], i["a"], i["b"], i["scale"], ctx=ctx)


def _m_reference(i, ctx):
    return Prepared(lambda: reference.ewa_merge(i["psi"], i["a"], i["b"], i["scale"]))


def _m_loop(i, ctx):
    return Prepared(lambda: ewa_merge_loop(i["psi"], i["a"], i["b"], i["scale"]))


EWA_MERGE_PROVIDERS = [
    Provider("ours", _m_ours),
    Provider("ours_cpu", _m_cpu),
    Provider("ours_kernel", _m_kernel),
    Provider("reference", _m_reference),
    Provider("loop", _m_loop),
]


def ewa_merge_case(bsz: int, n_concepts: int, dout: int, din: int, rank: int = LORA_RANK) -> Case:
    def make(device, dtype):
        psi = torch.rand(bsz, n_concepts, device=device)
        return {
            "psi": (psi / psi.norm(dim=-1, keepdim=True)).to(dtype),  # like ewa_weights' L2-normalised ψ
            "a": _randn(n_concepts, rank, din, device=device, dtype=dtype, std=din**-0.5),
            "b": _randn(n_concepts, dout, rank, device=device, dtype=dtype, std=rank**-0.5),
            "scale": LORA_ALPHA / LORA_RANK,
        }

    def cost(i):
        elt = i["a"].element_size()
        n_bytes = elt * (bsz * n_concepts + n_concepts * rank * (din + dout) + bsz * dout * din)
        return n_bytes, 2 * bsz * dout * din * n_concepts * rank

    shape = {"B": bsz, "G": n_concepts, "r": rank, "Dout": dout, "Din": din}
    label = f"Dout={dout} Din={din} B={bsz} G={n_concepts}"
    ref = lambda i: reference.ewa_merge(i["psi"], i["a"], i["b"], i["scale"])  # noqa: E731
    return Case("ewa_merge", label, shape, make, ref, cost, EWA_MERGE_PROVIDERS)


def ewa_weights_cases(quick: bool, models: set[str], batches: set[int]) -> list[Case]:
    if quick:
        return [ewa_weights_case(2, 4, 64, 10)]
    return [ewa_weights_case(bsz, EWA_LAYERS, EWA_DIM, g) for bsz in BATCHES if bsz in batches for g in EWA_CONCEPTS]


def ewa_merge_cases(quick: bool, models: set[str], batches: set[int]) -> list[Case]:
    if quick:
        return [ewa_merge_case(2, 10, 32, 64), ewa_merge_case(2, 100, 32, 64)]
    return [
        ewa_merge_case(bsz, g, dout, din)
        for dout, din in MERGE_SHAPES
        for bsz in MERGE_BATCHES
        if bsz in batches
        for g in EWA_CONCEPTS
    ]


PROVIDERS = {
    "regional_cross_attention": REGIONAL_PROVIDERS,
    "lora_kv_projection": LORA_PROVIDERS,
    "lora_kv_projection_unet": UNET_PROVIDERS,
    "ewa_weights": EWA_WEIGHTS_PROVIDERS,
    "ewa_merge": EWA_MERGE_PROVIDERS,
}
CASES: dict[str, Callable[[bool, set[str], set[int]], list[Case]]] = {
    "regional_cross_attention": regional_cases,
    "lora_kv_projection": lora_cases,
    "lora_kv_projection_unet": unet_cases,
    "ewa_weights": ewa_weights_cases,
    "ewa_merge": ewa_merge_cases,
}


# ------------------------------------------------------------------------------ runner


def _release(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_case(
    case: Case, ctx: Context, wanted: Callable[[str], bool], base: dict, info: common.DeviceInfo, rep_ms: float
) -> list[dict]:
    """Check every wanted provider against the fp32 reference, time those that pass; one
    record per provider."""
    providers = [p for p in case.providers if wanted(p.name)]
    if any(p.name in COMPILING for p in providers):
        torch._dynamo.reset()  # static shapes: a fresh compile per case, and no recompile limit to hit
    empty = {"subject": case.subject, "case": case.label, "shape": case.shape, "provider": None, "dtype": ctx.dtype}
    empty["status"] = "ok"
    empty.update(dict.fromkeys(("reason", "correct", "max_abs_err", "tolerance", "ref_err", "bytes", "flops")))
    empty.update(dict.fromkeys(("ms", "ms_p20", "ms_p80", "timing", "gbps", "tflops", "frac_hbm", "frac_tflops")))
    empty.update(roofline_fraction=None, interpreted=False, **base)
    torch.manual_seed(0)
    try:
        inputs = case.make(ctx.device, ctx.dtype)
        want = _tensors(case.reference(_upcast(inputs)))
        ref_err = _max_err(_tensors(case.reference(inputs)), want)
        ref_max = max(t.abs().max().item() for t in want)
        n_bytes, flops = case.cost(inputs)
        common.synchronize(ctx.device)
    except Exception as e:  # e.g. out of memory for the fp32 reference: every provider of the case is left out
        status = "skipped" if isinstance(e, torch.cuda.OutOfMemoryError) else "error"
        reason = f"case setup (inputs, fp32 reference) failed: {_short(e)}"
        _release(ctx.device)
        return [{**empty, "provider": p.name, "status": status, "reason": reason} for p in providers]
    tol = 2 * ref_err + RTOL[ctx.dtype] * ref_max
    records = []
    for provider in providers:
        rec = {
            **empty,
            "provider": provider.name,
            "tolerance": tol,
            "ref_err": ref_err,
            "bytes": n_bytes,
            "flops": flops,
        }
        prepared = out = None
        try:
            prepared = provider.build(inputs, ctx)
            rec["interpreted"] = prepared.interpreted
            start = time.perf_counter()
            out = prepared.call()
            common.synchronize(ctx.device)
            first_ms = (time.perf_counter() - start) * 1e3
            out = prepared.canonical(out)
            err = _max_err(_tensors(out), want)
            rec["max_abs_err"], rec["correct"] = err, err <= tol  # False for NaN
            if not rec["correct"]:
                rec["status"], rec["reason"] = "incorrect", f"max abs error {err:.3g} > tolerance {tol:.3g}"
            else:
                out = None
                if prepared.interpreted:  # the checked call's time: the interpreter's time means nothing
                    timing = common.Timing(first_ms, first_ms, first_ms, "time.perf_counter, one interpreted call")
                else:
                    timing = common.bench(prepared.call, ctx.device, rep_ms=rep_ms)
                    rec.update(common.roofline(timing.ms, n_bytes, flops, info, ctx.dtype))
                rec.update(ms=timing.ms, ms_p20=timing.ms_p20, ms_p80=timing.ms_p80, timing=timing.method)
        except (Skip, BackendUnavailableError, ImportError) as e:
            rec["status"], rec["reason"] = "skipped", _short(e)
        except torch.cuda.OutOfMemoryError as e:
            rec["status"], rec["reason"] = "skipped", f"out of memory: {_short(e, 120)}"
        except Exception as e:  # a provider that breaks is reported, and the run goes on
            rec["status"], rec["reason"] = "error", _short(e)
        del prepared, out
        records.append(rec)
        _release(ctx.device)
    del inputs, want
    _release(ctx.device)
    return records


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a handful of tiny shapes (runs on a CPU in seconds)")
    parser.add_argument("--subject", choices=[*SUBJECTS, "all"], default="all")
    parser.add_argument("--dtype", choices=list(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument(
        "--out", default=None, help="results folder (default bench/results/<device-slug>/, with --quick …/quick/)"
    )
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--model", default="sd15,sdxl", help="comma list of sd15, sdxl (regional, lora_kv)")
    parser.add_argument("--batch", default=",".join(map(str, BATCHES)), help="comma list of batch sizes")
    parser.add_argument("--providers", default=None, help="comma list: only these providers")
    parser.add_argument("--exclude", default="", help="comma list: leave these providers out (e.g. compile,flex)")
    parser.add_argument("--rep-ms", type=float, default=None, help="timing budget per provider and case")
    parser.add_argument(
        "--fresh", action="store_true", help="empty the subjects' results files first (default: replace same cases)"
    )
    parser.add_argument("--list", action="store_true", help="print the cases and exit")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    ctx = Context(device, dtype, args.quick, os.environ.get("TRITON_INTERPRET", "0") == "1")
    models, batches = set(_csv(args.model)), {int(b) for b in _csv(args.batch)}
    only, exclude = (set(_csv(args.providers)) if args.providers else None), set(_csv(args.exclude))
    known = {p.name for providers in PROVIDERS.values() for p in providers}
    unknown = ((only or set()) | exclude) - known
    if unknown:
        raise SystemExit(f"unknown provider(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}")
    unknown = set(_csv(args.model)) - set(ATTN_LAYERS)
    if unknown:
        raise SystemExit(f"unknown model(s) {', '.join(sorted(unknown))}; known: {', '.join(ATTN_LAYERS)}")

    def wanted(name: str) -> bool:
        return (only is None or name in only) and name not in exclude

    subjects = [s for key, names in SUBJECTS.items() if args.subject in (key, "all") for s in names]
    cases = {s: CASES[s](args.quick, models, batches) for s in subjects}
    if args.list:
        for subject, subject_cases in cases.items():
            print(f"{subject}: {len(subject_cases)} cases")
            for case in subject_cases:
                print(f"  {case.label}")
        return 0

    info = common.describe_device(device)
    default_out = common.BENCH_DIR / "results" / info.slug / ("quick" if args.quick else "")
    out_dir = Path(args.out) if args.out else default_out
    env = common.environment(sys.argv[1:] if argv is None else argv)
    base = {**info.as_record(), **env, "quick": args.quick, "run_id": f"{env['date']}-{uuid.uuid4().hex[:6]}"}
    rep_ms = args.rep_ms or (100.0 if device.type == "cuda" else (30.0 if args.quick else 500.0))
    dtype_name = str(dtype).removeprefix("torch.")
    print(f"device: {info.name} ({info.slug}), dtype {dtype_name}, git {env['git_sha'][:12]}, results in {out_dir}")
    if ctx.interpreted:
        print("TRITON_INTERPRET=1: Triton kernels run in the CPU interpreter; their times mean nothing")

    failures = 0
    writer = common.ResultWriter(out_dir, fresh=args.fresh)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        warnings.filterwarnings("ignore", category=RuntimeWarning, module=r"triton\.")  # interpreter: masked lanes
        for subject, subject_cases in cases.items():
            records = []
            for case in tqdm(subject_cases, desc=subject, unit="case", file=sys.stderr, dynamic_ncols=True):
                for rec in run_case(case, ctx, wanted, base, info, rep_ms):
                    writer.write(rec)
                    records.append(rec)
            failures += sum(r["status"] in ("incorrect", "error") for r in records)
            print(f"\n{subject} [{info.name}, {dtype_name}; ms (provider ms / ours ms)]")
            print(common.format_table(records))
    for path in writer.paths.values():
        print(f"wrote {path}")
    if failures:
        print(f"{failures} provider run(s) failed their correctness check or raised: see the tables above")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

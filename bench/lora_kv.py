"""Kernel benchmark, LoRA K/V projection: the fused op against the reference, torch.compile and
peft, for one attn2 K/V projection (B 1/2/8/16, 1/4/16 adapters per sample) and for all 16 SD-1.5
attn2 K/V projections (one grouped launch against 16 launches).

    python bench/lora_kv.py [--quick] [--dtype bf16|fp16|fp32] [--model sd15,sdxl] [--out DIR] [--list]

Writes lora_kv_projection.jsonl and lora_kv_projection_unet.jsonl under bench/results/<device-slug>/.
The checks, the timing, the records and the options are shared by every kernel benchmark
(bench/common.py, kernel_main); see bench/README.md for what each provider is.
"""

from __future__ import annotations

import importlib
import sys
import warnings
from collections.abc import Callable

import common
import torch
from common import (
    BATCHES,
    LORA_ALPHA,
    LORA_RANK,
    TEXT_LEN,
    Case,
    Context,
    Prepared,
    Provider,
    Skip,
    compiled,
    kernel,
    launcher,
    ours,
    ours_cpu,
    randn,
    short_error,
)

common.ensure_engine_importable()

from lifelong_engine import ops, reference  # noqa: E402

# K/V projections: text width Din → layer widths Dout.
KV_LAYERS = {"sd15": (768, (320, 640, 1280)), "sdxl": (2048, (640, 1280))}
# SD-1.5's 16 attn2 layers in order: down 320 ×2, 640 ×2, 1280 ×2; mid 1280; up 1280 ×3, 640 ×3, 320 ×3.
SD15_KV_DOUT = (320, 320, 640, 640, 1280, 1280, 1280, 1280, 1280, 1280, 640, 640, 640, 320, 320, 320)
ADAPTERS_PER_SAMPLE = (1, 4, 16)
ADAPTER_POOL = 16

# ----------------------------------------------------------------------------- lora_kv


def _lora_layer(din: int, dout: int, n_adapters: int, device, dtype) -> dict:
    """Base K/V weights and a pool of n_adapters rank-LORA_RANK adapters of one layer. The
    adapters are as large as the base path (not peft's zero init), so a wrong one shows."""
    r = LORA_RANK
    return {
        "w_k": randn(dout, din, device=device, dtype=dtype, std=din**-0.5),
        "w_v": randn(dout, din, device=device, dtype=dtype, std=din**-0.5),
        "a_k": randn(n_adapters, r, din, device=device, dtype=dtype, std=din**-0.5),
        "b_k": randn(n_adapters, dout, r, device=device, dtype=dtype, std=r**-0.5),
        "a_v": randn(n_adapters, r, din, device=device, dtype=dtype, std=din**-0.5),
        "b_v": randn(n_adapters, dout, r, device=device, dtype=dtype, std=r**-0.5),
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
        raise Skip(f"peft is not importable: {short_error(e)}") from e
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
    return ours(ops.lora_kv_projection, *_lora_args(i), ctx=ctx)


def _l_cpu(i, ctx):
    return ours_cpu(ops.lora_kv_projection, *_lora_args(i), ctx=ctx)


def _l_kernel(i, ctx):
    return kernel("lora_kv", "lora_kv_projection", *_lora_args(i), ctx=ctx)


def _l_reference(i, ctx):
    args = _lora_args(i)
    return Prepared(lambda: reference.lora_kv_projection(*args))


def _l_compile(i, ctx):
    return compiled(reference.lora_kv_projection, *_lora_args(i))


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
            "c": randn(bsz, t_len, din, device=device, dtype=dtype),
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
    grouped = launcher("lora_kv", "lora_kv_projection_grouped", ctx)
    lora_kv = importlib.import_module("lifelong_engine.kernels.lora_kv")
    n_layers = i["c"].shape[0]  # the grouped op takes per-layer ids and weights (L, B, S)
    ids, weights = (i[key].expand(n_layers, *i[key].shape) for key in ("ids", "weights"))
    if hasattr(lora_kv, "pack_layers"):  # frozen weights and the adapter pool packed once, as a server does
        packed = lora_kv.pack_layers(*lists)
        args, kwargs = (i["c"], *([None] * len(lists)), ids, weights, i["scale"]), {"packed": packed}
    else:
        args, kwargs = (i["c"], *lists, ids, weights, i["scale"]), {}

    def call():
        return grouped(*args, **kwargs)

    def canonical(out):  # (k_list, v_list) → [(k_0, v_0), (k_1, v_1), …] like the per-layer calls
        k_list, v_list = out
        return list(zip(k_list, v_list))

    return Prepared(call, canonical=canonical, interpreted=ctx.interpreted)


def _u_trusted(i, ctx):
    """ops.lora_kv_projection_grouped_trusted: the one call per denoising step of the engine (weights packed
    once, ids checked when made: no host sync)."""
    ctx.require_triton()
    n_layers = i["c"].shape[0]
    w_k, w_v = (torch.cat(list(i[key])) for key in ("w_k", "w_v"))
    douts = tuple(w.shape[0] for w in i["w_k"])
    ids, weights = (i[key].expand(n_layers, *i[key].shape) for key in ("ids", "weights"))
    args = (i["c"], w_k, w_v, douts, *(list(i[key]) for key in ("a_k", "b_k", "a_v", "b_v")), ids, weights, i["scale"])

    def call():
        with ops.use_backend("triton"):
            return ops.lora_kv_projection_grouped_trusted(*args)

    return Prepared(call, canonical=lambda out: list(zip(*out)), interpreted=ctx.interpreted)


def _u_ours(i, ctx):
    ctx.require_triton()

    def call():
        with ops.use_backend("triton"):
            return _unet_per_layer(ops.lora_kv_projection, i)

    return Prepared(call, interpreted=ctx.interpreted)


def _u_reference(i, ctx):
    return Prepared(lambda: _unet_reference(i))


def _u_compile(i, ctx):
    return compiled(_unet_reference, i)


def _u_peft(i, ctx):
    layers = _unet_layers(i)
    return _peft(layers, [i["c"][n] for n in range(len(layers))], i["ids"], i["weights"], ctx)


UNET_PROVIDERS = [
    Provider("ours_grouped", _u_grouped),
    Provider("ours_trusted", _u_trusted),
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
            "c": randn(len(douts), bsz, t_len, din, device=device, dtype=dtype),  # layer-wise text embeddings
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


SUBJECTS = {
    "lora_kv_projection": (lora_cases, LORA_PROVIDERS),
    "lora_kv_projection_unet": (unet_cases, UNET_PROVIDERS),
}

if __name__ == "__main__":
    sys.exit(common.kernel_main(__doc__, SUBJECTS))

"""diffusers attention processors of the engine (DESIGN §5).

:class:`LifelongPipeline` installs one processor on every attention layer of a
``UNet2DConditionModel``:

- ``attn2`` (cross-attention): :class:`CrossAttentionProcessor`. During a generation its
  K/V come from the :class:`GenerationContext`, computed once per generation for all layers by one
  ``ops.lora_kv_projection_grouped_trusted`` call with the active concepts, and attention runs through
  ``ops.regional_cross_attention`` with the context's region map, so each query attends to the
  prompt of the region it lies in.
- every other attention layer: :class:`PassThroughProcessor`, the previous processor unchanged.

The context reaches processors as the explicitly named ``cross_attention_kwargs`` entry
``lifelong_context`` (diffusers drops names a processor does not declare). Called without it,
the cross-attention processor computes ordinary attention like diffusers' ``AttnProcessor2_0``.
"""

from __future__ import annotations

import dataclasses
import inspect

import torch
import torch.nn.functional as F
from torch import Tensor

from . import ops, reference
from .pool import AdapterPool
from .regions import RegionPlan

__all__ = [
    "CONTEXT_KWARG",
    "CrossAttentionProcessor",
    "GenerationContext",
    "ImageLora",
    "PassThroughProcessor",
    "BaseKV",
    "text_kv",
    "unet_forward",
]

CONTEXT_KWARG = "lifelong_context"


@dataclasses.dataclass
class ImageLora:
    """Concepts applied to the image side (to_q / to_out.0 LoRA) at every step: the pool they are in and,
    per layer, each UNet row's pool ids and weights (layer → (rows, S)), checked when the plan was built."""

    pool: AdapterPool
    ids: dict[str, Tensor]
    weights: dict[str, Tensor]

    def term(self, layer: str, proj: str, x: Tensor) -> Tensor | None:
        """The LoRA term of one projection for x (rows, N, Din), or None when the pool has none."""
        ab = self.pool.get(layer, proj)
        if ab is None:
            return None
        return ops.lora_term_trusted(x, *ab, self.ids[layer], self.weights[layer])


@dataclasses.dataclass
class GenerationContext:
    """Per-generation state the cross-attention processors read.

    kv: layer → (k, v), each (rows, P, H, T, d): the text K/V of every prompt slot of every UNet row;
    regions: the region plan (None: every query reads slot 0); image_lora: concepts applied to the
    image side, or None; capture: layers whose attention maps to keep in ``maps`` (layer → (rows, N, T)
    probabilities over the keys of each query's slot, averaged over heads).
    """

    kv: dict[str, tuple[Tensor, Tensor]]
    regions: RegionPlan | None = None
    image_lora: ImageLora | None = None
    capture: frozenset[str] = frozenset()
    maps: dict[str, Tensor] = dataclasses.field(default_factory=dict)
    _zeros: dict[int, Tensor] = dataclasses.field(default_factory=dict, repr=False)

    @property
    def rows(self) -> int:
        return next(iter(self.kv.values()))[0].shape[0]

    def region_ids(self, n_queries: int, device) -> Tensor:
        """(rows, n_queries) slot of each query; all zeros without regions (made once per resolution)."""
        if self.regions is not None:
            return self.regions.region_ids(n_queries)
        ids = self._zeros.get(n_queries)
        if ids is None:
            ids = self._zeros[n_queries] = torch.zeros(self.rows, n_queries, dtype=torch.int32, device=device)
        return ids

    def lora(self, layer: str, proj: str, x: Tensor) -> Tensor | None:
        """The image-side LoRA term of one projection for x (rows, N, Din), or None."""
        return self.image_lora.term(layer, proj, x) if self.image_lora is not None else None

    def rows_of(self, rows: Tensor) -> GenerationContext:
        """The context of a subset of the UNet rows (no regions: the subset reads slot 0)."""
        lora = self.image_lora
        if lora is not None:
            lora = ImageLora(
                lora.pool, {k: v[rows] for k, v in lora.ids.items()}, {k: v[rows] for k, v in lora.weights.items()}
            )
        return GenerationContext({layer: (k[rows], v[rows]) for layer, (k, v) in self.kv.items()}, None, lora)


def unet_forward(
    unet,
    sample: Tensor,
    timesteps: Tensor,
    context: GenerationContext,
    hidden: Tensor,
    added: dict | None = None,
    timestep_cond: Tensor | None = None,
    attention_kwargs: dict | None = None,
) -> Tensor:
    """One UNet forward with the engine's context: the one place the pipeline, the serving engine, attention
    guidance and the trainer call the UNet. ``hidden`` (rows, T, D) is what diffusers passes as
    encoder_hidden_states (no engine processor reads it: they read the context's K/V); ``added``: SDXL's
    added conditioning; ``timestep_cond``: the guidance-scale embedding of LCM-style UNets;
    ``attention_kwargs``: the user's ``cross_attention_kwargs``, passed on beside the context."""
    return unet(
        sample,
        timesteps,
        encoder_hidden_states=hidden,
        timestep_cond=timestep_cond,
        cross_attention_kwargs={**(attention_kwargs or {}), CONTEXT_KWARG: context},
        added_cond_kwargs=added,
        return_dict=False,
    )[0]


class CrossAttentionProcessor:
    """Processor of one ``attn2`` layer: cached concept K/V and regional cross-attention."""

    def __init__(self, layer: str):
        self.layer = layer

    def __call__(
        self,
        attn,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        temb: Tensor | None = None,
        lifelong_context: GenerationContext | None = None,
    ) -> Tensor:
        ctx = lifelong_context
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        batch, n_queries, _ = hidden_states.shape

        if ctx is None:
            out = _plain_attention(attn, hidden_states, encoder_hidden_states, attention_mask)
        else:
            if attention_mask is not None:
                raise ValueError("LifelongPipeline generation does not take an encoder attention mask")
            k, v = ctx.kv[self.layer]
            if k.shape[0] != batch:
                raise ValueError(f"{self.layer}: the UNet batch has {batch} rows, the generation context {k.shape[0]}")
            query = attn.to_q(hidden_states)
            if (delta := ctx.lora(self.layer, "to_q", hidden_states)) is not None:
                query = query + delta
            heads, head_dim = k.shape[2], k.shape[4]
            query = query.view(batch, n_queries, heads, head_dim).transpose(1, 2)
            if attn.norm_q is not None:
                query = attn.norm_q(query)
            region_ids = ctx.region_ids(n_queries, query.device)
            k, v = k.to(query.dtype), v.to(query.dtype)
            out = ops.regional_cross_attention_trusted(query, k, v, region_ids, None, attn.scale)
            if self.layer in ctx.capture:
                probs = reference._regional_scores(query, k, region_ids, None, attn.scale).softmax(-1)
                ctx.maps[self.layer] = probs.mean(1)
            out = out.transpose(1, 2).reshape(batch, n_queries, heads * head_dim).to(query.dtype)

        hidden = attn.to_out[0](out)
        if ctx is not None and (delta := ctx.lora(self.layer, "to_out.0", out)) is not None:
            hidden = hidden + delta
        hidden = attn.to_out[1](hidden)
        if input_ndim == 4:
            hidden = hidden.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden = hidden + residual
        return hidden / attn.rescale_output_factor


def _plain_attention(attn, hidden_states: Tensor, encoder_hidden_states: Tensor | None, mask: Tensor | None) -> Tensor:
    """Ordinary attention as diffusers' AttnProcessor2_0 computes it, before the output projection."""
    batch = hidden_states.shape[0]
    context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
    if encoder_hidden_states is not None and attn.norm_cross:
        context = attn.norm_encoder_hidden_states(context)
    if mask is not None:
        mask = attn.prepare_attention_mask(mask, context.shape[1], batch)
        mask = mask.view(batch, attn.heads, -1, mask.shape[-1])
    query, key, value = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
    head_dim = key.shape[-1] // attn.heads
    query, key, value = (x.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for x in (query, key, value))
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask)
    return out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)


class PassThroughProcessor:
    """Runs the layer's previous processor unchanged; accepts (and ignores) the engine's context.

    Arguments reach the inner processor by name, and only those its ``__call__`` declares (as diffusers'
    ``Attention.forward`` filters ``cross_attention_kwargs``): ``SlicedAttnProcessor`` takes no ``temb``."""

    def __init__(self, inner):
        self.inner = inner
        params = inspect.signature(inner.__call__).parameters
        self._takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        self._takes = frozenset(params)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 lifelong_context=None, **kwargs):  # fmt: skip
        kwargs.update(encoder_hidden_states=encoder_hidden_states, attention_mask=attention_mask)
        if temb is not None:
            kwargs["temb"] = temb
        if not self._takes_any:
            kwargs = {k: v for k, v in kwargs.items() if k in self._takes}
        return self.inner(attn, hidden_states, **kwargs)


def compute_dtype(device: torch.device, default: torch.dtype) -> torch.dtype:
    """The dtype matmuls run in here: autocast's when it is on for ``device``, else ``default``.
    The fused ops take inputs of one dtype and are not autocast ops themselves."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return default


def _layer_kv(
    attn, c: Tensor, pool: AdapterPool | None, layer: str, ids: Tensor, weights: Tensor
) -> tuple[Tensor, Tensor]:
    """Text K/V of one ``attn2`` layer with concepts: c (n, T, Din) → k, v (n, H, T, d).

    Plain ``nn.Linear`` projections run the fused ``ops.lora_kv_projection``. A projection that is
    anything else — a peft LoRA layer (``load_lora_weights``, ``add_adapter``), a quantized linear — runs
    its own forward, so whatever it adds (every active adapter with its scale and ``set_adapters``
    weight, none after ``disable_lora``; read at every call) is part of the K/V, and the concepts are added
    to it with ``ops.lora_term``."""
    if attn.norm_cross:
        c = attn.norm_encoder_hidden_states(c)
    ab_k = pool.get(layer, "to_k") if pool is not None else None
    ab_v = pool.get(layer, "to_v") if pool is not None else None
    if type(attn.to_k) is not torch.nn.Linear or type(attn.to_v) is not torch.nn.Linear:
        k, v = attn.to_k(c), attn.to_v(c)
        if ab_k is not None:
            k = k + ops.lora_term(c.to(k.dtype), *(t.to(k.dtype) for t in ab_k), ids, weights.to(k.dtype))
            v = v + ops.lora_term(c.to(v.dtype), *(t.to(v.dtype) for t in ab_v), ids, weights.to(v.dtype))
    else:
        if ab_k is None:
            ab_k = ab_v = (c.new_zeros(0, 1, c.shape[-1]), c.new_zeros(0, attn.to_k.out_features, 1))
            ids, weights = ids[:, :0], weights[:, :0]
        w_k, w_v = attn.to_k.weight, attn.to_v.weight
        dtype = compute_dtype(c.device, w_k.dtype)  # under autocast, the autocast dtype: the ops take one dtype
        c, w_k, w_v = c.to(dtype), w_k.to(dtype), w_v.to(dtype)
        ab_k, ab_v = tuple(t.to(dtype) for t in ab_k), tuple(t.to(dtype) for t in ab_v)
        k, v = ops.lora_kv_projection(c, w_k, w_v, *ab_k, *ab_v, ids, weights.to(dtype), 1.0)
        if attn.to_k.bias is not None:
            k = k + attn.to_k.bias
        if attn.to_v.bias is not None:
            v = v + attn.to_v.bias
    return _split_heads(attn, k, v)


def _split_heads(attn, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """A layer's text K/V (n, T, Dout) → (n, H, T, d), with the layer's ``norm_k``."""
    n, t_len, dout = k.shape
    k, v = (x.view(n, t_len, attn.heads, dout // attn.heads).transpose(1, 2) for x in (k, v))
    if attn.norm_k is not None:
        k = attn.norm_k(k)
    return k, v


class BaseKV:
    """The frozen base K/V weights of every ``attn2`` layer packed once (:meth:`LifelongPipeline.install`):
    w_k, w_v (ΣDout_l, Din), layer after layer, the operands of ``ops.lora_kv_projection_grouped_trusted``
    (one launch for all layers on the triton backend; per-layer views on CPU).

    No copy: the layers' own weights become views into the packed tensors (same values, same Parameter
    objects), so an in-place edit of a weight (``load_state_dict``, ``weight.data += delta``) is an edit of
    the pack. A weight replaced or moved (a new Parameter, ``weight.data = …``, ``unet.to(…)``) is seen at the
    next use (identity and storage address, host-side, no device read) and the layers are packed again.
    Layers whose weights differ in dtype or device are not packed (:attr:`packed` is False)."""

    def __init__(self, attention: dict):
        self.modules = list(attention.values())
        self.douts = tuple(m.to_k.out_features for m in self.modules)
        self.w_k: Tensor | None = None
        self.w_v: Tensor | None = None
        self._key: list[tuple[Tensor, int]] = []
        self.pack()

    def _sources(self) -> list[Tensor]:
        return [w for m in self.modules for w in (m.to_k.weight, m.to_v.weight)]

    def pack(self) -> None:
        sources = self._sources()
        if len({(w.dtype, w.device) for w in sources}) != 1 or sources[0].device.type == "meta":
            self.w_k = self.w_v = None
            self._key = [(w, w.data_ptr()) for w in sources]
            return
        with torch.no_grad():
            packed = []
            for ws in (sources[0::2], sources[1::2]):
                flat = torch.cat([w.detach() for w in ws])
                for w, view in zip(ws, flat.split(self.douts)):
                    w.data = view
                packed.append(flat)
        self.w_k, self.w_v = packed
        self._key = [(w, w.data_ptr()) for w in sources]

    @property
    def packed(self) -> bool:
        return self.w_k is not None

    def stale(self) -> bool:
        """True when some layer's K/V weight is no longer the packed one (replaced or moved)."""
        return any(w is not w0 or w.data_ptr() != p0 for w, (w0, p0) in zip(self._sources(), self._key))

    def requires_grad(self) -> bool:
        return any(w.requires_grad for w in self._sources())

    def weights(self, dtype: torch.dtype) -> tuple[Tensor, Tensor] | None:
        """(w_k, w_v) packed, in ``dtype`` (one cast of each when it is not the weights' dtype: autocast), or
        None when the layers cannot be packed."""
        if self.stale():
            self.pack()
        if not self.packed:
            return None
        return self.w_k.to(dtype), self.w_v.to(dtype)


def text_kv(
    attention: dict, base: BaseKV, c: Tensor, pool: AdapterPool | None, ids: Tensor, weights: Tensor
) -> dict[str, tuple[Tensor, Tensor]]:
    """Text K/V of every ``attn2`` layer (``attention``: layer → module, in the order of c's layers) with
    concepts, in one grouped op call: c (n, L, T, Din), or (n, T, Din) when every layer reads the same
    text, ids / weights (n, L, S) → layer → (k, v), each
    (n, H, T, d). ids were made and checked by the caller (no value check here). Differentiable in c, the
    pool's factors and weights; K/V weights that require grad get their gradients too (then, or when the
    layers could not be packed, the public grouped op runs on the layers' own weights)."""
    layers, mods = list(attention), list(attention.values())
    if any(type(m.to_k) is not torch.nn.Linear or type(m.to_v) is not torch.nn.Linear for m in mods):
        # a projection that is not a plain nn.Linear (a peft LoRA layer, a quantized linear) runs its own forward
        return {
            layer: _layer_kv(m, c if c.dim() == 3 else c[:, i], pool, layer, ids[:, i], weights[:, i])
            for i, (layer, m) in enumerate(zip(layers, mods))
        }
    if any(m.norm_cross for m in mods):
        c = torch.stack(
            [
                (m.norm_encoder_hidden_states(text) if m.norm_cross else text)
                for m, text in zip(mods, [c] * len(mods) if c.dim() == 3 else c.unbind(1))
            ]
        )
    elif c.dim() == 4:
        c = c.transpose(0, 1)
    dtype = compute_dtype(c.device, mods[0].to_k.weight.dtype)  # under autocast, the autocast dtype
    c = c.to(dtype).contiguous()
    din = c.shape[-1]
    a_k, b_k, a_v, b_v = [], [], [], []
    has_pool = pool is not None and any(pool.get(layer, "to_k") is not None for layer in layers)
    for layer, m in zip(layers, mods):
        for proj, a_list, b_list in (("to_k", a_k, b_k), ("to_v", a_v, b_v)):
            ab = pool.get(layer, proj) if has_pool else None
            if ab is None:  # no adapters here: an empty pool (or zeros where the pool lacks this layer)
                n, r = (pool.capacity, pool.rank) if has_pool else (0, 1)
                ab = (c.new_zeros(n, r, din), c.new_zeros(n, m.to_k.out_features, r))
            a_list.append(ab[0].to(dtype))
            b_list.append(ab[1].to(dtype))
    if not has_pool:
        ids, weights = ids[..., :0], weights[..., :0]
    ids, weights = ids.transpose(0, 1), weights.transpose(0, 1).to(dtype)
    packed = None if base.requires_grad() and torch.is_grad_enabled() else base.weights(dtype)
    if packed is None:  # base weights that train, or that could not be packed: the layers' own, by the public op
        w_k = [m.to_k.weight.to(dtype) for m in mods]
        w_v = [m.to_v.weight.to(dtype) for m in mods]
        c = c.expand(len(mods), *c.shape) if c.dim() == 3 else c
        ks, vs = ops.lora_kv_projection_grouped(c, w_k, w_v, a_k, b_k, a_v, b_v, ids, weights, 1.0)
    else:
        ks, vs = ops.lora_kv_projection_grouped_trusted(c, *packed, base.douts, a_k, b_k, a_v, b_v, ids, weights)
    kv = {}
    for layer, m, k, v in zip(layers, mods, ks, vs):
        if m.to_k.bias is not None:
            k = k + m.to_k.bias
        if m.to_v.bias is not None:
            v = v + m.to_v.bias
        kv[layer] = _split_heads(m, k, v)
    return kv

"""diffusers attention processors of the engine (DESIGN §5).

:class:`LifelongPipeline` installs one processor on every attention layer of a
``UNet2DConditionModel``:

- ``attn2`` (cross-attention): :class:`CrossAttentionProcessor`. During a generation its
  K/V come from the :class:`GenerationContext`, computed once per generation for every layer by
  ``ops.lora_kv_projection`` with the active concepts, and attention runs through
  ``ops.regional_cross_attention`` with the context's region map, so each query attends to the
  prompt of the region it lies in.
- every other attention layer: :class:`PassThroughProcessor`, the previous processor unchanged.

The context reaches processors as the explicitly named ``cross_attention_kwargs`` entry
``lifelong_context`` (diffusers drops names a processor does not declare). Called without it,
the cross-attention processor computes ordinary attention like diffusers' ``AttnProcessor2_0``.
"""

from __future__ import annotations

import dataclasses

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
    "layer_kv",
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
) -> Tensor:
    """One UNet forward with the engine's context: the one place the pipeline, the serving engine, attention
    guidance and the trainer call the UNet. ``hidden`` (rows, T, D) is what diffusers passes as
    encoder_hidden_states (no engine processor reads it: they read the context's K/V); ``added``: SDXL's
    added conditioning; ``timestep_cond``: the guidance-scale embedding of LCM-style UNets."""
    return unet(
        sample,
        timesteps,
        encoder_hidden_states=hidden,
        timestep_cond=timestep_cond,
        cross_attention_kwargs={CONTEXT_KWARG: context},
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
    """Runs the layer's previous processor unchanged; accepts (and ignores) the engine's context."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 lifelong_context=None, **kwargs):  # fmt: skip
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)


def compute_dtype(device: torch.device, default: torch.dtype) -> torch.dtype:
    """The dtype matmuls run in here: autocast's when it is on for ``device``, else ``default``.
    The fused ops take inputs of one dtype and are not autocast ops themselves."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return default


def layer_kv(
    attn, c: Tensor, pool: AdapterPool | None, layer: str, ids: Tensor, weights: Tensor
) -> tuple[Tensor, Tensor]:
    """Text K/V of one ``attn2`` layer with concepts: c (n, T, Din) → k, v (n, H, T, d)."""
    if attn.norm_cross:
        c = attn.norm_encoder_hidden_states(c)
    ab_k = pool.get(layer, "to_k") if pool is not None else None
    ab_v = pool.get(layer, "to_v") if pool is not None else None
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
    n, T, dout = k.shape
    k, v = (x.view(n, T, attn.heads, dout // attn.heads).transpose(1, 2) for x in (k, v))
    if attn.norm_k is not None:
        k = attn.norm_k(k)
    return k, v

"""LifelongPipeline: generation with a library of concepts, EWA and regional synthesis (DESIGN §5).

Wraps a diffusers ``StableDiffusionPipeline`` or ``StableDiffusionXLPipeline``: its tokenizers, text
encoders, UNet, scheduler and VAE are used as they are; the engine installs its attention
processors (:mod:`lifelong_engine.attention`) and runs its own denoising loop, which differs from
diffusers' in three ways:

- prompts are encoded layer-wise (:mod:`lifelong_engine.prompts`) and every concept of the
  library is mixed into every ``attn2`` layer's K/V with its EWA weight ψ^l (DESIGN §3.3);
- the text K/V of all prompts (negative, global, regions) are computed once per generation for
  all layers and reused at every step;
- with regions, the U+2 noise estimates (unconditional, global, one per region) come from one
  batched UNet call per step and are aggregated as ``E* = α·E + Σ_u (1−α)·E_u ⊙ m_u``;
- optional attention guidance moves the latents in the first steps so that no named concept is
  neglected (:mod:`lifelong_engine.guidance`).

With no concepts and no regions it produces the images diffusers' own pipeline produces.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import numbers
from collections.abc import Sequence

import numpy as np
import PIL.Image
import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg, retrieve_timesteps
from diffusers.utils import BaseOutput
from torch import Tensor

from . import checks, ops
from .attention import (  # noqa: I001
    CONTEXT_KWARG,
    CrossAttentionProcessor,
    GenerationContext,
    PassThroughProcessor,
    RegionPlan,
    box_mask,
    layer_kv,
)
from .concepts import PROJECTIONS, ConceptAdapter
from .errors import LifelongError
from .formats import attn2_layers
from .guidance import AttentionGuidance, guide_latents, prepare_guidance
from .pool import AdapterPool
from .prompts import EncodedPrompts, PromptEncoder

__all__ = ["LifelongPipeline", "LifelongPipelineOutput", "Library", "unet_fingerprint", "aggregate_noise"]

Box = tuple[float, float, float, float]
_REPLACERS = "enable_xformers_memory_efficient_attention, fuse_qkv_projections, set_attention_slice, load_ip_adapter"


@dataclasses.dataclass
class LifelongPipelineOutput(BaseOutput):
    """images: PIL images, a numpy array or a tensor (``output_type``); psi: (images, L, G) EWA weight of
    each concept in each layer for each image's prompt (None without concepts); concepts: their names;
    attention_maps: the maps ``capture_attention`` asked for; guidance_losses: the attention-guidance loss
    at each guided step (summed over images)."""

    images: list[PIL.Image.Image] | np.ndarray | Tensor
    psi: Tensor | None = None
    concepts: list[str] = dataclasses.field(default_factory=list)
    attention_maps: dict[str, Tensor] | None = None
    guidance_losses: list[float] | None = None


def unet_fingerprint(unet) -> str:
    """Identity of a base model's architecture: a hash of the UNet config (public keys)."""
    config = {k: v for k, v in dict(unet.config).items() if not k.startswith("_")}
    return "unet:" + hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclasses.dataclass
class _Plan:
    """The UNet rows of one generation: kinds × images, kind-major (uncond?, global, regions...)."""

    texts: list[str]  # every distinct text prompt slot: negatives, globals, regions
    slots: Tensor  # (rows, P) text index per prompt slot
    owner: Tensor  # (rows,) text whose EWA weights the row's image side uses
    paint: list[list[tuple[int, Box]]]
    kinds: int
    images: int
    image_texts: Tensor  # (images,) the prompt of each image


@dataclasses.dataclass
class Library:
    """The concepts one generation uses: adapters (in order), their ê stacked (L, G, D) float32, the
    pool holding their factors and each one's id in it (G,). LifelongPipeline's own library is
    :meth:`LifelongPipeline.library`; the serving engine builds one per request from its pool."""

    adapters: list[ConceptAdapter]
    embeddings: Tensor | None
    pool: object | None  # AdapterPool or anything with .get(layer, proj) -> (a, b) | None
    ids: Tensor

    @property
    def tokens(self) -> dict[str, ConceptAdapter]:
        return {c.token: c for c in self.adapters}

    @property
    def default_ewa(self) -> bool:
        """EWA when every concept was learned with CIDM; otherwise the plain sum."""
        return bool(self.adapters) and all(c.method == "cidm" for c in self.adapters)

    @property
    def image_side(self) -> bool:
        """True when some concept adapts to_q or to_out (applied to image tokens at every step)."""
        return any(p in c.projections for c in self.adapters for p in ("to_q", "to_out.0"))


@dataclasses.dataclass
class _Prepared:
    context: GenerationContext
    psi: Tensor | None  # (texts, L, S) EWA weights, None without concepts
    pooled: Tensor | None  # (texts, Dp) SDXL text_embeds
    hidden: Tensor  # (rows, T, D) encoder_hidden_states: each row's global text at layer 0


class LifelongPipeline:
    """Generation with concepts over a diffusers SD/SDXL pipeline (see the module docstring).

    max_regions: most regions a call may have; fingerprint: the base-model identity adapters must match
    (default :func:`unet_fingerprint`); adapters with an empty fingerprint are accepted.
    """

    def __init__(self, pipe, *, max_regions: int = 8, fingerprint: str | None = None):
        if not hasattr(pipe, "unet") or not hasattr(pipe, "vae"):
            raise TypeError(f"expected a diffusers StableDiffusion(XL)Pipeline, got {type(pipe).__name__}")
        self.pipe, self.unet, self.max_regions = pipe, pipe.unet, max_regions
        self.is_sdxl = getattr(pipe, "text_encoder_2", None) is not None
        self.layers = attn2_layers(self.unet)
        if not self.layers:
            raise ValueError("the UNet has no cross-attention (attn2) layers")
        self.fingerprint = fingerprint or unet_fingerprint(self.unet)
        pairs = (
            [(pipe.tokenizer, pipe.text_encoder), (getattr(pipe, "tokenizer_2", None), pipe.text_encoder_2)]
            if (self.is_sdxl)
            else [(pipe.tokenizer, pipe.text_encoder)]
        )
        pairs = [(t, e) for t, e in pairs if t is not None and e is not None]
        self.text = PromptEncoder(
            [t for t, _ in pairs], [e for _, e in pairs], len(self.layers), "penultimate" if self.is_sdxl else "last"
        )
        modules = dict(self.unet.named_modules())
        self._attn = {name: modules[name] for name in self.layers}
        self._widths = {  # (layer, projection) → (Din, Dout)
            (layer, proj): (lin.in_features, lin.out_features)
            for layer, attn in self._attn.items()
            for proj, lin in zip(PROJECTIONS, (attn.to_k, attn.to_v, attn.to_q, attn.to_out[0]))
        }
        self._concepts: dict[str, ConceptAdapter] = {}
        self._embeddings: dict[str, Tensor] = {}  # ê (L, D) per concept
        self._pool: AdapterPool | None = None
        self._previous: dict | None = None
        self._installed: dict = {}
        self.install()

    @classmethod
    def from_pipe(cls, pipe, **kwargs) -> LifelongPipeline:
        """Wrap a diffusers ``StableDiffusionPipeline`` or ``StableDiffusionXLPipeline``."""
        return cls(pipe, **kwargs)

    # -------------------------------------------------------------- processors

    def install(self) -> None:
        """Install the engine's processors (keeping the current ones for :meth:`restore`)."""
        current = self.unet.attn_processors
        if self._previous is None or not self.installed:
            self._previous = dict(current)
        self._installed = {
            name: CrossAttentionProcessor(name.removesuffix(".processor"))
            if name.removesuffix(".processor") in self._attn
            else PassThroughProcessor(self._previous[name])
            for name in current
        }
        self.unet.set_attn_processor(dict(self._installed))

    def restore(self) -> None:
        """Put back the processors the UNet had before :meth:`install`."""
        if self._previous is not None:
            self.unet.set_attn_processor(dict(self._previous))
            self._previous, self._installed = None, {}

    @property
    def installed(self) -> bool:
        """True while every attention layer still runs the processor the engine installed."""
        current = self.unet.attn_processors
        return (
            bool(self._installed)
            and current.keys() == self._installed.keys()
            and all(current[k] is p for k, p in self._installed.items())
        )

    def _check_installed(self) -> None:
        if self.installed:
            return
        if not self._installed:
            raise LifelongError("the engine's attention processors were restored; call install() before generating")
        raise LifelongError(
            "the UNet's attention processors were replaced after LifelongPipeline installed its own (diffusers calls "
            f"such as {_REPLACERS} do this); undo that call (e.g. unfuse_qkv_projections) and call install() again"
        )

    # ---------------------------------------------------------------- concepts

    @property
    def concepts(self) -> dict[str, ConceptAdapter]:
        """The active library: name → adapter, in the order added (a copy)."""
        return dict(self._concepts)

    @property
    def device(self) -> torch.device:
        """The UNet's device (read off one weight: diffusers' ``unet.device`` walks every module)."""
        return self._attn[self.layers[0]].to_k.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self._attn[self.layers[0]].to_k.weight.dtype

    def add_concept(self, adapter: ConceptAdapter, *, replace: bool = False) -> None:
        """Add a concept to the library (moved to the UNet's device and dtype)."""
        self._validate_adapter(adapter, replace)
        adapter = adapter.to(self.device, self.dtype)
        self._concepts.pop(adapter.name, None)
        self._concepts[adapter.name] = adapter
        if adapter.concept_embeddings is not None:
            self._embeddings[adapter.name] = adapter.concept_embeddings.float()
        else:
            with torch.no_grad():
                self._embeddings[adapter.name] = self.text.concept_embedding(adapter).float()
        self._pool = None

    def remove_concept(self, name: str) -> ConceptAdapter:
        """Remove a concept from the library and return it."""
        if name not in self._concepts:
            raise KeyError(f"no concept named {name!r} (have: {', '.join(self._concepts) or 'none'})")
        self._embeddings.pop(name)
        self._pool = None
        return self._concepts.pop(name)

    def _validate_adapter(self, adapter: ConceptAdapter, replace: bool) -> None:
        who = f"concept {adapter.name!r}"
        if adapter.name in self._concepts and not replace:
            raise ValueError(f"{who} is already in the library (remove it first or pass replace=True)")
        for other in self._concepts.values():
            if other.token == adapter.token and other.name != adapter.name:
                raise ValueError(f"{who}: token {adapter.token!r} is already used by concept {other.name!r}")
        self.check_adapter(adapter)

    def check_adapter(self, adapter: ConceptAdapter) -> None:
        """Raise ValueError unless ``adapter`` fits this base model: fingerprint, layers, widths, token
        rows, concept embeddings, finite values."""
        who = f"concept {adapter.name!r}"
        if adapter.base_fingerprint and adapter.base_fingerprint != self.fingerprint:
            raise ValueError(
                f"{who} was learned on base model {adapter.base_fingerprint!r}, this pipeline is {self.fingerprint!r}"
            )
        unknown = [layer for layer in adapter.layers if layer not in self._attn]
        if unknown:
            raise ValueError(f"{who} adapts layers this UNet does not have: {unknown[:3]}")
        for layer in adapter.layers:
            for proj in adapter.projections:
                din, dout = self._widths[layer, proj]
                a, b = adapter.factors(layer, proj)
                if a.shape[1] != din or b.shape[0] != dout:
                    raise ValueError(
                        f"{who}: {layer}.{proj} factors are {tuple(b.shape)}·{tuple(a.shape)}, the UNet's projection "
                        f"is {dout}×{din}"
                    )
        tokens = adapter.token_embeddings
        if tokens is not None:
            if tokens.shape[0] not in (1, len(self.layers)):
                raise ValueError(f"{who}: token rows for {tokens.shape[0]} layers, the UNet has {len(self.layers)}")
            if tokens.shape[-1] != self.text.token_width:
                raise ValueError(
                    f"{who}: token rows of width {tokens.shape[-1]}, the text encoders take {self.text.token_width}"
                )
        width = self._attn[self.layers[0]].to_k.in_features
        if adapter.concept_embeddings is not None and (
            adapter.concept_embeddings.shape != (len(self.layers), width) or len(adapter.layers) != len(self.layers)
        ):
            raise ValueError(
                f"{who}: concept embeddings of shape {tuple(adapter.concept_embeddings.shape)}, expected "
                f"({len(self.layers)}, {width})"
            )
        if not adapter.is_finite():
            raise ValueError(f"{who} holds NaN or inf values")

    def pool(self) -> AdapterPool:
        """The library stacked for the fused ops (rebuilt when concepts change)."""
        if self._pool is None:
            self._pool = AdapterPool.build(list(self._concepts.values()), self._widths, self.device, self.dtype)
        return self._pool

    # ------------------------------------------------------------------- text

    def library(self) -> Library:
        """The pipeline's own concepts as a :class:`Library` (pool ids 0..G-1)."""
        adapters = list(self._concepts.values())
        embeddings = torch.stack(list(self._embeddings.values()), 1).to(self.device) if adapters else None
        ids = torch.arange(len(adapters), device=self.device)
        return Library(adapters, embeddings, self.pool() if adapters else None, ids)

    def encode_prompt(self, prompts: str | Sequence[str], library: Library | None = None) -> EncodedPrompts:
        """Layer-wise text embeddings ĉ^l of prompts (concept tokens resolved against the library)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        tokens = library.tokens if library is not None else {c.token: c for c in self._concepts.values()}
        return self.text.encode(prompts, tokens)

    def concept_weights(
        self,
        encoded: EncodedPrompts,
        power: float = 2.0,
        norm: str = "fro",
        top_k: int | None = None,
        library: Library | None = None,
    ) -> tuple[Tensor, Tensor]:
        """EWA over the library: (ids, psi), each (n, L, S): the pool ids of the concepts each prompt mixes
        into each layer and their weights ψ^l (S = G, or top_k when given; DESIGN §3.3)."""
        library = library or self.library()
        n, L = encoded.per_layer.shape[:2]
        G = len(library.adapters)
        if G == 0:
            return torch.zeros(n, L, 0, dtype=torch.long, device=self.device), torch.zeros(n, L, 0, device=self.device)
        psi = ops.ewa_weights(encoded.per_layer.float(), library.embeddings, encoded.ewa_mask, power, norm)
        order = torch.arange(G, device=self.device).expand(n, L, G)
        if top_k is not None and top_k < G:
            psi, order = psi.topk(top_k, dim=-1)
        return library.ids[order], psi

    def text_kv(
        self, per_layer: Tensor, pool: AdapterPool | None, ids: Tensor, weights: Tensor, slots: Tensor | None = None
    ) -> dict[str, tuple[Tensor, Tensor]]:
        """K/V of every ``attn2`` layer for texts per_layer (n, L, T, D), concepts of ``pool`` mixed in
        per text and layer by ids/weights (n, L, S). Returns layer → (k, v), each (n, 1, H, T, d), or
        (rows, P, H, T, d) gathered by ``slots`` (rows, P) text indices. Differentiable (training)."""
        kv = {}
        for l, layer in enumerate(self.layers):
            c = per_layer[:, l].to(self.dtype)
            k, v = layer_kv(self._attn[layer], c, pool, layer, ids[:, l], weights[:, l].to(self.dtype))
            kv[layer] = (k[slots], v[slots]) if slots is not None else (k[:, None], v[:, None])
        return kv

    # ------------------------------------------------------------- generation

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        regions: Sequence[tuple[str, Box]] | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        alpha: float = 0.7,
        ewa_power: float = 2.0,
        ewa_norm: str = "fro",
        ewa_top_k: int | None = None,
        ewa: bool | None = None,
        height: int | None = None,
        width: int | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: Tensor | None = None,
        eta: float = 0.0,
        guidance_rescale: float = 0.0,
        output_type: str = "pil",
        return_dict: bool = True,
        capture_attention: Sequence[str] = (),
        attention_guidance: AttentionGuidance | None = None,
    ) -> LifelongPipelineOutput | tuple:
        """Generate images; arguments as in diffusers' pipelines, plus:

        regions: ``[(region_prompt, (x0, y0, x1, y1)), ...]``, boxes normalised to [0, 1]: queries in box u
        attend to region prompt u in every layer (a later box wins where boxes overlap), and with
        ``alpha < 1`` each region also gets its own noise estimate E_u, aggregated as
        ``E* = α·E + Σ_u (1−α)·E_u ⊙ m_u`` (DESIGN §5; ``alpha=1`` is the single-pass mode).
        ewa_power / ewa_norm / ewa_top_k: EWA weighting of the library (paper: 2 / "fro"; the official code:
        4 / "l1"); ``ewa=False`` sums every concept with weight 1 (LoRA-M, C-LoRA and peft's merge);
        the default uses EWA when every concept was learned with CIDM (``method == "cidm"``), else the sum.
        capture_attention: attn2 layer names whose attention maps to return (``output.attention_maps``,
        layer → (rows, N, T) for the last step).
        attention_guidance: an :class:`~lifelong_engine.guidance.AttentionGuidance`: in the first steps, move
        the latents so that every concept named in the prompt gets attention (L2DM's concept attention
        artist) and different concepts attend to different places (its orthogonal attention), as
        Attend-and-Excite does (:mod:`lifelong_engine.guidance`); prompts without regions only.
        """
        self._check_installed()
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompt must be a string or a non-empty list of strings")
        regions = self._check_regions(regions)
        if attention_guidance is not None and regions:
            raise ValueError("attention_guidance works on prompts without regions (regions already place concepts)")
        if not _is_int(num_images_per_prompt) or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt={num_images_per_prompt!r}: expected an integer >= 1")
        self.check_options(
            num_inference_steps, guidance_scale, alpha, height, width, ewa_power, ewa_norm, ewa_top_k, ewa
        )
        negatives = self._negatives(negative_prompt, len(prompts))
        pipe, device = self.pipe, self.device
        cfg = guidance_scale > 1.0
        height = height or self._default_size()
        width = width or self._default_size()
        plan = self._plan(prompts, negatives, regions, num_images_per_prompt, cfg, alpha)

        prepared = self.prepare(plan, ewa_power, ewa_norm, ewa_top_k, ewa, (height, width))
        ctx = prepared.context
        ctx.capture = frozenset(capture_attention)

        timesteps, num_inference_steps = retrieve_timesteps(pipe.scheduler, num_inference_steps, device)
        images = plan.images
        latents = pipe.prepare_latents(
            images, self.unet.config.in_channels, height, width, self.dtype, device, generator, latents
        )
        extra_step_kwargs = pipe.prepare_extra_step_kwargs(generator, eta)
        added = self._added_cond(plan, prepared.pooled, height, width)
        timestep_cond = None
        if self.unet.config.time_cond_proj_dim is not None:
            scale = torch.tensor(guidance_scale - 1).repeat(plan.kinds * images)
            timestep_cond = pipe.get_guidance_scale_embedding(scale, self.unet.config.time_cond_proj_dim)
            timestep_cond = timestep_cond.to(device=device, dtype=latents.dtype)
        masks = self._latent_masks(regions, latents) if regions and alpha < 1 else None
        if hasattr(pipe.scheduler, "set_begin_index"):
            pipe.scheduler.set_begin_index(0)
        guide = None
        if attention_guidance is not None:
            guide = prepare_guidance(self, attention_guidance, plan, prepared, cfg, added, timestep_cond)
            guided = attention_guidance.guided_steps(len(timesteps))

        with pipe.progress_bar(total=len(timesteps)) as progress:
            for i, t in enumerate(timesteps):
                if guide is not None and i < guided:
                    step_size = attention_guidance.scale(i, len(timesteps))
                    latents = guide_latents(self, guide, latents, t, step_size, step=i)
                model_input = pipe.scheduler.scale_model_input(torch.cat([latents] * plan.kinds), t)
                eps = self.unet(
                    model_input,
                    t,
                    encoder_hidden_states=prepared.hidden,
                    timestep_cond=timestep_cond,
                    cross_attention_kwargs={CONTEXT_KWARG: ctx},
                    added_cond_kwargs=added,
                    return_dict=False,
                )[0]
                eps = eps.view(plan.kinds, images, *eps.shape[1:])
                noise = aggregate_noise(eps, cfg, guidance_scale, alpha, masks)
                if cfg and guidance_rescale > 0:
                    noise = rescale_noise_cfg(noise, eps[1], guidance_rescale)
                latents = pipe.scheduler.step(noise, t, latents, **extra_step_kwargs, return_dict=False)[0]
                progress.update()

        image = self._decode(latents, output_type, generator)
        pipe.maybe_free_model_hooks()
        image_psi = prepared.psi[plan.image_texts] if prepared.psi is not None else None
        if not return_dict:
            return (image,)
        out = LifelongPipelineOutput(image, image_psi, list(self._concepts))
        if ctx.capture:
            out.attention_maps = dict(ctx.maps)
        if guide is not None:
            out.guidance_losses = guide.losses
        return out

    # ----------------------------------------------------------------- pieces

    def check_options(
        self, num_inference_steps, guidance_scale, alpha, height, width, ewa_power, ewa_norm, ewa_top_k, ewa
    ) -> None:
        """Raise ValueError naming the option and what is expected unless the generation options are usable
        (the checks of :meth:`__call__` and of the serving Engine's ``submit``, in one place)."""
        if not _is_int(num_inference_steps) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps={num_inference_steps!r}: expected an integer >= 1")
        if not _is_real(guidance_scale) or not math.isfinite(guidance_scale):
            raise ValueError(f"guidance_scale={guidance_scale!r}: expected a finite number (CFG when > 1)")
        if not _is_real(alpha) or not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha={alpha!r}: expected a number in [0, 1]")
        factor = self.pipe.vae_scale_factor
        for name, size in (("height", height), ("width", width)):
            if size is not None and (not _is_int(size) or size < factor or size % factor):
                raise ValueError(
                    f"{name}={size!r}: expected None or a positive multiple of {factor} (the VAE's scale factor)"
                )
        if not _is_real(ewa_power) or not (math.isfinite(ewa_power) and ewa_power > 0):
            raise ValueError(f"ewa_power={ewa_power!r}: expected a finite number > 0")
        if ewa_norm not in checks.NORMS:
            raise ValueError(f"ewa_norm={ewa_norm!r}: expected one of {checks.NORMS}")
        if ewa_top_k is not None and (not _is_int(ewa_top_k) or ewa_top_k < 1):
            raise ValueError(f"ewa_top_k={ewa_top_k!r}: expected None (every concept) or an integer >= 1")
        if ewa is not None and not isinstance(ewa, bool):
            raise ValueError(f"ewa={ewa!r}: expected None (by the concepts' method), True or False")

    def _check_regions(self, regions) -> list[tuple[str, Box]]:
        regions = list(regions or [])
        if len(regions) > self.max_regions:
            raise ValueError(f"{len(regions)} regions given, the limit is {self.max_regions} (max_regions)")
        checked = []
        for i, region in enumerate(regions):
            try:
                text, box = region
                x0, y0, x1, y1 = (float(v) for v in box)
            except (TypeError, ValueError):
                raise ValueError(f"region {i}: expected (prompt, (x0, y0, x1, y1)), got {region!r}") from None
            if not isinstance(text, str):
                raise ValueError(f"region {i}: the prompt must be a string, got {type(text).__name__}")
            if not all(0.0 <= v <= 1.0 for v in (x0, y0, x1, y1)):
                raise ValueError(f"region {i}: box {box} lies outside [0, 1] (boxes are normalised x0, y0, x1, y1)")
            if x1 <= x0 or y1 <= y0:
                raise ValueError(f"region {i}: box {box} is empty (need x0 < x1 and y0 < y1)")
            checked.append((text, (x0, y0, x1, y1)))
        return checked

    def _negatives(self, negative_prompt, n: int) -> list[str | None]:
        if negative_prompt is None:
            return [None] * n
        negatives = [negative_prompt] * n if isinstance(negative_prompt, str) else negative_prompt
        if not isinstance(negatives, Sequence) or not all(x is None or isinstance(x, str) for x in negatives):
            raise ValueError(f"negative_prompt={negative_prompt!r:.80}: expected None, a string or a list of strings")
        if len(negatives) != n:
            raise ValueError(f"negative_prompt has {len(negatives)} entries, prompt has {n}")
        return list(negatives)

    def _default_size(self) -> int:
        return self.unet.config.sample_size * self.pipe.vae_scale_factor

    def _plan(self, prompts, negatives, regions, per_prompt: int, cfg: bool, alpha: float) -> _Plan:
        B, U = len(prompts), len(regions)
        zero_negative = self.is_sdxl and self.pipe.config.force_zeros_for_empty_prompt
        # None: no text (SDXL's zero embedding for an absent negative prompt, or no CFG at all)
        neg_texts = [n if n is not None else (None if zero_negative else "") for n in negatives] if cfg else [None] * B
        texts = [*neg_texts, *prompts, *(r[0] for r in regions)]
        P = U + 1
        image_prompt = [i // per_prompt for i in range(B * per_prompt)]
        region_rows = U if (U and alpha < 1) else 0
        slots, owner, paint = [], [], []
        if cfg:
            for b in image_prompt:
                slots.append([b] * P)
                owner.append(B + b)
                paint.append([])
        for b in image_prompt:
            slots.append([B + b, *(2 * B + u for u in range(U))])
            owner.append(B + b)
            paint.append([(u + 1, box) for u, (_, box) in enumerate(regions)])
        for u in range(region_rows):
            for b in image_prompt:
                slots.append([B + b] + [2 * B + u] * U)
                owner.append(B + b)
                paint.append([(1, regions[u][1])])
        kinds = int(cfg) + 1 + region_rows
        image_texts = torch.tensor([B + b for b in image_prompt])
        return _Plan(texts, torch.tensor(slots), torch.tensor(owner), paint, kinds, B * per_prompt, image_texts)

    def prepare(
        self,
        plan: _Plan,
        power: float,
        norm: str,
        top_k: int | None,
        ewa: bool | None,
        size: tuple[int, int],
        library: Library | None = None,
    ) -> _Prepared:
        """Encode the plan's texts, weight the library and compute every layer's text K/V once."""
        library = library or self.library()
        real = [i for i, t in enumerate(plan.texts) if t is not None]
        encoded = self.encode_prompt([plan.texts[i] for i in real], library)
        n, (L, T, D) = len(plan.texts), encoded.per_layer.shape[1:]
        per_layer = encoded.per_layer.new_zeros(n, L, T, D)
        per_layer[real] = encoded.per_layer
        pooled = None
        if encoded.pooled is not None:
            pooled = encoded.pooled.new_zeros(n, encoded.pooled.shape[-1])
            pooled[real] = encoded.pooled
        if ewa is None:
            ewa = library.default_ewa
        ids, psi = self.concept_weights(encoded, power, norm, top_k if ewa else None, library)
        G = len(library.adapters)
        full_ids = torch.zeros(n, L, ids.shape[-1], dtype=torch.long, device=self.device)
        full_psi = torch.zeros(n, L, ids.shape[-1], device=self.device)
        full_ids[real] = ids
        full_psi[real] = psi if ewa else torch.ones_like(psi)
        # Every row uses its owner's weights: a negative prompt is weighted like its image's prompt.
        text_owner = torch.arange(n)
        text_owner[plan.slots[:, 0]] = plan.owner
        full_ids, full_psi = full_ids[text_owner], full_psi[text_owner]

        pool = library.pool if G else None
        kv = self.text_kv(per_layer, pool, full_ids, full_psi, plan.slots)
        latent = tuple(s // self.pipe.vae_scale_factor for s in size)
        regions = RegionPlan(plan.paint, latent, self.device) if any(plan.paint) else None
        ctx = GenerationContext(kv, regions)
        if pool is not None and library.image_side:
            ctx.pool = pool
            for l, layer in enumerate(self.layers):
                ctx.row_ids[layer] = full_ids[plan.owner, l]
                ctx.row_weights[layer] = full_psi[plan.owner, l].to(self.dtype)
        hidden = per_layer[plan.slots[:, 0], 0].to(self.dtype)  # read by no engine processor
        return _Prepared(ctx, full_psi if G else None, pooled, hidden)

    def _added_cond(self, plan: _Plan, pooled: Tensor | None, height: int, width: int) -> dict | None:
        if not self.is_sdxl:
            return None
        projection = self.pipe.text_encoder_2.config.projection_dim
        time_ids = self.pipe._get_add_time_ids(
            (height, width), (0, 0), (height, width), dtype=self.dtype, text_encoder_projection_dim=projection
        )
        rows = plan.slots.shape[0]
        return {
            "text_embeds": pooled[plan.slots[:, 0]].to(self.device, self.dtype),
            "time_ids": time_ids.to(self.device).repeat(rows, 1),
        }

    def _latent_masks(self, regions, latents: Tensor) -> Tensor:
        """(U, 1, 1, h, w) m_u at latent resolution, disjoint (a later box wins, as in attention)."""
        h, w = latents.shape[-2:]
        owner = torch.zeros(h, w, dtype=torch.long, device=latents.device)
        for u, (_, box) in enumerate(regions):
            owner[box_mask(box, h, w, latents.device)] = u + 1
        masks = torch.stack([owner == u + 1 for u in range(len(regions))])
        return masks[:, None, None].to(latents.dtype)

    def _decode(self, latents: Tensor, output_type: str, generator):
        pipe, vae = self.pipe, self.pipe.vae
        if output_type == "latent":
            return latents
        upcast = self.is_sdxl and vae.dtype == torch.float16 and vae.config.force_upcast
        if upcast:
            pipe.upcast_vae()
            latents = latents.to(next(iter(vae.post_quant_conv.parameters())).dtype)
        mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
        if self.is_sdxl and mean is not None and std is not None:
            mean = torch.tensor(mean).view(1, -1, 1, 1).to(latents)
            std = torch.tensor(std).view(1, -1, 1, 1).to(latents)
            latents = latents * std / vae.config.scaling_factor + mean
        else:
            latents = latents / vae.config.scaling_factor
        image = vae.decode(latents.to(vae.dtype), return_dict=False, generator=generator)[0]
        if upcast:
            vae.to(dtype=torch.float16)
        do_denormalize = None
        if not self.is_sdxl and getattr(pipe, "safety_checker", None) is not None:
            image, nsfw = pipe.run_safety_checker(image, self.device, self.dtype)
            do_denormalize = [not x for x in nsfw] if nsfw is not None else None
        if getattr(pipe, "watermark", None) is not None:
            image = pipe.watermark.apply_watermark(image)
        return pipe.image_processor.postprocess(image, output_type=output_type, do_denormalize=do_denormalize)


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def aggregate_noise(eps: Tensor, cfg: bool, guidance_scale: float, alpha: float, masks: Tensor | None) -> Tensor:
    """Combine one step's UNet outputs, eps (kinds, images, C, h, w) = [uncond if cfg, global, region 1..U].

    E = ε(∅) + s(ε(ĉ) − ε(∅)); E_u = ε(∅) + s(ε(ĉ_u, box_u) − ε(∅));
    E* = α·E + Σ_u (1−α)·E_u ⊙ m_u, masks (U, 1, 1, h, w) m_u (DESIGN §5). Without regions, E.
    """
    uncond = eps[0] if cfg else None

    def guided(e: Tensor) -> Tensor:
        return uncond + guidance_scale * (e - uncond) if cfg else e

    first = int(cfg)
    E = guided(eps[first])
    if masks is None:
        return E
    out = alpha * E
    for u in range(masks.shape[0]):
        out = out + (1 - alpha) * guided(eps[first + 1 + u]) * masks[u]
    return out

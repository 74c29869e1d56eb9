"""LifelongPipeline: generation with a library of concepts, EWA and regional synthesis (DESIGN §5).

Wraps a diffusers ``StableDiffusionPipeline`` or ``StableDiffusionXLPipeline``, or their img2img and
inpaint pipelines (:func:`supported_pipelines`; others are refused): its tokenizers, text encoders, UNet,
scheduler and VAE are used as they are, and a call takes the wrapped pipeline's own arguments in its
order with its defaults (image editing: ``image``, ``strength``, ``mask_image``); the engine installs its attention
processors (:mod:`lifelong_engine.attention`) and denoises with the generation core
(:mod:`lifelong_engine.generation`, which the serving Engine runs too), which differs from
diffusers' loop in these ways:

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
import inspect
import json
import math
import numbers
from collections.abc import Sequence

import numpy as np
import PIL.Image
import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.utils import BaseOutput
from torch import Tensor

from . import checks, generation, ops
from .attention import CONTEXT_KWARG, BaseKV, CrossAttentionProcessor, PassThroughProcessor, text_kv
from .concepts import PROJECTIONS, ConceptAdapter
from .errors import LifelongError
from .formats import attn2_layers
from .guidance import AttentionGuidance
from .pool import AdapterPool, Library
from .prompts import EncodedPrompts, PromptEncoder
from .regions import Box, check_regions

__all__ = ["LifelongPipeline", "LifelongPipelineOutput", "unet_fingerprint"]
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


class LifelongPipeline:
    """Generation with concepts over a diffusers SD/SDXL pipeline (see the module docstring).

    max_regions: most regions a call may have; fingerprint: the base-model identity adapters must match
    (default :func:`unet_fingerprint`); adapters with an empty fingerprint are accepted.
    """

    def __init__(self, pipe, *, max_regions: int = 8, fingerprint: str | None = None):
        check_supported(pipe)
        self.pipe, self.unet, self.max_regions = pipe, pipe.unet, max_regions
        self.unet_model = unwrap_unet(pipe.unet)  # the UNet2DConditionModel, under torch.compile / peft wrappers
        self.is_sdxl = getattr(pipe, "text_encoder_2", None) is not None
        self.layers = attn2_layers(self.unet_model)
        if not self.layers:
            raise ValueError("the UNet has no cross-attention (attn2) layers")
        self.fingerprint = fingerprint or unet_fingerprint(self.unet_model)
        pairs = (
            [(pipe.tokenizer, pipe.text_encoder), (getattr(pipe, "tokenizer_2", None), pipe.text_encoder_2)]
            if (self.is_sdxl)
            else [(pipe.tokenizer, pipe.text_encoder)]
        )
        pairs = [(t, e) for t, e in pairs if t is not None and e is not None]
        self.text = PromptEncoder(
            [t for t, _ in pairs], [e for _, e in pairs], len(self.layers), "penultimate" if self.is_sdxl else "last"
        )
        modules = dict(self.unet_model.named_modules())
        self.attention = {name: modules[name] for name in self.layers}  # layer → its attn2 module
        self.widths = {  # (layer, projection) → (Din, Dout)
            (layer, proj): (lin.in_features, lin.out_features)
            for layer, attn in self.attention.items()
            for proj, lin in zip(PROJECTIONS, (attn.to_k, attn.to_v, attn.to_q, attn.to_out[0]))
        }
        self._concepts: dict[str, ConceptAdapter] = {}
        self._embeddings: dict[str, Tensor] = {}  # ê (L, D) per concept
        self._pool: AdapterPool | None = None
        self._previous: dict | None = None
        self._installed: dict = {}
        own = inspect.signature(type(self).__call__).parameters.values()
        keywords = [p for p in own if p.kind is p.KEYWORD_ONLY]
        self.__signature__ = self.signature.replace(parameters=[*self.signature.parameters.values(), *keywords])
        self.install()

    @classmethod
    def from_pipe(cls, pipe, **kwargs) -> LifelongPipeline:
        """Wrap a diffusers SD / SDXL text-to-image, img2img or inpaint pipeline (TypeError, naming what is not
        supported, for any other: ControlNet, T2I adapters, a loaded IP-Adapter, other pipeline classes)."""
        return cls(pipe, **kwargs)

    # ------------------------------------------------- diffusers conventions

    @classmethod
    def from_pretrained(
        cls, path, *, concepts=None, namespace: str = "default", max_regions: int = 8, **kwargs
    ) -> LifelongPipeline:
        """``DiffusionPipeline.from_pretrained(path, **kwargs)`` wrapped, with the concepts of ``concepts`` (a
        :class:`~lifelong_engine.ConceptStore` or its directory; those of ``namespace`` learned on this base
        model) added. A directory :meth:`save_pretrained` wrote brings its own library (its ``concepts/``
        store), used when ``concepts`` is None."""
        from pathlib import Path

        from diffusers import DiffusionPipeline

        lp = cls(DiffusionPipeline.from_pretrained(path, **kwargs), max_regions=max_regions)
        own = Path(path) / "concepts"
        if concepts is None and own.is_dir():
            concepts = own
        if concepts is not None:
            lp.load_concepts(concepts, namespace)
        return lp

    def save_pretrained(self, directory, **kwargs) -> None:
        """The wrapped pipeline (``pipe.save_pretrained(directory, **kwargs)``) and its concept library (a
        concept store in ``directory/concepts``, namespace "default"), for :meth:`from_pretrained`."""
        from pathlib import Path

        from .store import ConceptStore

        self.pipe.save_pretrained(directory, **kwargs)
        with ConceptStore(Path(directory) / "concepts") as store:
            for adapter in self._concepts.values():
                store.save(adapter.to("cpu"), namespace="default")

    def load_concepts(self, store, namespace: str = "default", names: Sequence[str] | None = None) -> list[str]:
        """Add the concepts of ``namespace`` in ``store`` (a ConceptStore or its directory) learned on this base
        model (or exactly ``names``: ValueError naming those missing). Returns the names added."""
        from .store import ConceptStore

        if not isinstance(store, ConceptStore):
            with ConceptStore(store) as opened:
                return self.load_concepts(opened, namespace, names)
        records = {r.name: r for r in store.list(namespace)}
        if names is None:
            names = [n for n, r in records.items() if r.base_fingerprint in ("", self.fingerprint)]
        missing = [n for n in names if n not in records]
        if missing:
            raise ValueError(f"no concept {missing} in namespace {namespace!r} of the store (has {sorted(records)})")
        for name in names:
            self.add_concept(store.load(name, namespace))
        return list(names)

    def to(self, *args, **kwargs) -> LifelongPipeline:
        """``pipe.to(...)`` (device and/or dtype, as diffusers takes them), the concept library moved along."""
        self.pipe.to(*args, **kwargs)
        for name, adapter in self._concepts.items():
            self._concepts[name] = adapter.to(self.device, self.dtype)
            self._embeddings[name] = self._embeddings[name].to(self.device)
        self._pool = None
        return self

    def set_progress_bar_config(self, **kwargs) -> None:
        """As diffusers' (the wrapped pipeline's progress bar is the one generation shows)."""
        self.pipe.set_progress_bar_config(**kwargs)

    @property
    def components(self) -> dict:
        """The wrapped pipeline's components (diffusers' ``pipe.components``)."""
        return self.pipe.components

    # -------------------------------------------------------------- processors

    def install(self) -> None:
        """Install the engine's processors (keeping the current ones for :meth:`restore`) and pack the base
        K/V weights of every cross-attention layer for the grouped text K/V op (:class:`BaseKV`)."""
        current = self.unet_model.attn_processors
        missing = [layer for layer in self.layers if f"{layer}.processor" not in current]
        if missing:
            raise LifelongError(f"the UNet's attention processors do not name its attn2 layers {missing[:3]}")
        self.base_kv = BaseKV(self.attention)
        if self._previous is None or not self.installed:
            self._previous = dict(current)
        self._installed = {
            name: CrossAttentionProcessor(name.removesuffix(".processor"))
            if name.removesuffix(".processor") in self.attention
            else PassThroughProcessor(self._previous[name])
            for name in current
        }
        self.unet_model.set_attn_processor(dict(self._installed))

    def restore(self) -> None:
        """Put back the processors the UNet had before :meth:`install`."""
        if self._previous is not None:
            self.unet_model.set_attn_processor(dict(self._previous))
            self._previous, self._installed = None, {}

    @property
    def installed(self) -> bool:
        """True while every attention layer still runs the processor the engine installed (on every attn2
        layer its cross-attention processor)."""
        current = self.unet_model.attn_processors
        return (
            bool(self._installed)
            and current.keys() == self._installed.keys()
            and all(current[k] is p for k, p in self._installed.items())
            and all(isinstance(current.get(f"{layer}.processor"), CrossAttentionProcessor) for layer in self.layers)
        )

    def check_installed(self) -> None:
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
        return self.attention[self.layers[0]].to_k.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.attention[self.layers[0]].to_k.weight.dtype

    def add_concept(self, adapter: ConceptAdapter, *, replace: bool = False) -> None:
        """Add a concept to the library (moved to the UNet's device and dtype)."""
        self._validate_adapter(adapter, replace)
        adapter = adapter.to(self.device, self.dtype)
        self._concepts.pop(adapter.name, None)
        self._concepts[adapter.name] = adapter
        self._embeddings[adapter.name] = self.concept_embedding(adapter)
        self._pool = None

    def remove_concept(self, name: str) -> ConceptAdapter:
        """Remove a concept from the library and return it."""
        if name not in self._concepts:
            raise KeyError(f"no concept named {name!r} (have: {', '.join(self._concepts) or 'none'})")
        self._embeddings.pop(name)
        self._pool = None
        return self._concepts.pop(name)

    def concept_embedding(self, adapter: ConceptAdapter) -> Tensor:
        """ê (L, D) float32 on the UNet's device: the adapter's stored one, else its token encoded alone
        per layer (:meth:`PromptEncoder.concept_embedding`). The one place a missing ê is made."""
        if adapter.concept_embeddings is not None:
            return adapter.concept_embeddings.to(self.device, torch.float32)
        with torch.no_grad():
            return self.text.concept_embedding(adapter.to(self.device, self.dtype)).float()

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
        unknown = [layer for layer in adapter.layers if layer not in self.attention]
        if unknown:
            raise ValueError(f"{who} adapts layers this UNet does not have: {unknown[:3]}")
        for layer in adapter.layers:
            for proj in adapter.projections:
                din, dout = self.widths[layer, proj]
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
        width = self.attention[self.layers[0]].to_k.in_features
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
            adapters = list(self._concepts.values())
            embeddings = [self._embeddings[a.name] for a in adapters]
            self._pool = AdapterPool.build(adapters, self.widths, self.device, self.dtype, embeddings)
        return self._pool

    # ------------------------------------------------------------------- text

    def library(self) -> Library:
        """The pipeline's own concepts as a :class:`Library` (pool ids 0..G-1)."""
        adapters = list(self._concepts.values())
        ids = torch.arange(len(adapters), device=self.device)
        return Library(adapters, self.pool() if adapters else None, ids)

    def encode_prompt(
        self,
        prompts: str | Sequence[str],
        library: Library | None = None,
        prompts_2: Sequence[str] | None = None,
        clip_skip: int | None = None,
    ) -> EncodedPrompts:
        """Layer-wise text embeddings ĉ^l of prompts (concept tokens resolved against the library);
        ``prompts_2``/``clip_skip``: see :meth:`PromptEncoder.encode`."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        tokens = library.tokens if library is not None else {c.token: c for c in self._concepts.values()}
        return self.text.encode(prompts, tokens, prompts_2, clip_skip)

    def concept_weights(
        self,
        encoded: EncodedPrompts,
        power: float | None = None,
        norm: str | None = None,
        top_k: int | None = None,
        library: Library | None = None,
        variant: str = "paper",
    ) -> tuple[Tensor, Tensor]:
        """EWA over the library: (ids, psi), each (n, L, S): the pool ids of the concepts each prompt mixes
        into each layer and their weights ψ^l (S = G, or top_k when given; DESIGN §3.3).

        variant "paper": ``ops.ewa_weights`` of the prompt's words and EOS against each concept's ê (its
        tokens encoded alone, averaged), power 2 and L2 by default; "official" (the released CIDM code):
        ``ops.ewa_weights_rows`` over all prompt positions against every concept's token rows encoded in
        one prompt of all concepts (:meth:`PromptEncoder.concept_rows`), power 4 and L1 by default."""
        library = library or self.library()
        n, L = encoded.per_layer.shape[:2]
        G = len(library.adapters)
        if G == 0:
            return torch.zeros(n, L, 0, dtype=torch.long, device=self.device), torch.zeros(n, L, 0, device=self.device)
        if variant == "official":
            rows, present = self.text.concept_rows(library.adapters)
            psi = ops.ewa_weights_rows(
                encoded.per_layer.float(), rows.float(), present, None, power or 4.0, norm or "l1"
            )
        else:
            psi = ops.ewa_weights(
                encoded.per_layer.float(), library.embeddings, encoded.ewa_mask, power or 2.0, norm or "fro"
            )
        order = torch.arange(G, device=self.device).expand(n, L, G)
        if top_k is not None and top_k < G:
            psi, order = psi.topk(top_k, dim=-1)
        return library.ids[order], psi

    def text_kv(
        self, per_layer: Tensor, pool: AdapterPool | None, ids: Tensor, weights: Tensor, slots: Tensor | None = None
    ) -> dict[str, tuple[Tensor, Tensor]]:
        """K/V of every ``attn2`` layer for texts per_layer (n, L, T, D) (or (n, T, D): one text for every
        layer, as :attr:`EncodedPrompts.shared` gives it), concepts of ``pool`` mixed in
        per text and layer by ids/weights (n, L, S). Returns layer → (k, v), each (n, 1, H, T, d), or
        (rows, P, H, T, d) gathered by ``slots`` (rows, P) text indices. All layers in one grouped op call;
        ids are the caller's, made and checked once (:func:`~lifelong_engine.checks.adapter_ids`).
        Differentiable (training)."""
        kv = text_kv(self.attention, self.base_kv, per_layer.to(self.dtype), pool, ids, weights)
        return {
            layer: (k[slots], v[slots]) if slots is not None else (k[:, None], v[:, None])
            for layer, (k, v) in kv.items()
        }

    # ------------------------------------------------------------- generation

    @torch.no_grad()
    def __call__(
        self,
        *args,
        regions: Sequence[tuple[str, Box]] | None = None,
        alpha: float = 0.7,
        ewa: bool | str | None = None,
        ewa_power: float | None = None,
        ewa_norm: str | None = None,
        ewa_top_k: int | None = None,
        composition: str | None = None,
        capture_attention: Sequence[str] = (),
        attention_guidance: AttentionGuidance | None = None,
        **kwargs,
    ) -> LifelongPipelineOutput | tuple:
        """Generate images. ``*args`` and ``**kwargs`` are the wrapped diffusers pipeline's own arguments, in
        its order and with its defaults (``inspect.signature(type(lp.pipe).__call__)``; e.g. SDXL's
        ``guidance_scale`` is 5.0, SD's 7.5); see :meth:`call_arguments` for the ones the engine refuses.
        With concepts in the library, prompts must be text (``prompt_embeds`` cannot carry concept tokens, and
        EWA weighs concepts by the prompt's words). The engine's own arguments are keyword-only:

        regions: ``[(region_prompt, (x0, y0, x1, y1)), ...]``, boxes normalised to [0, 1]: queries in box u
        attend to region prompt u in every layer (a later box wins where boxes overlap), and with
        ``alpha < 1`` each region also gets its own noise estimate E_u, aggregated as
        ``E* = α·E + Σ_u (1−α)·E_u ⊙ m_u`` (DESIGN §5; ``alpha=1`` is the single-pass mode).
        ewa: "paper" (CIDM's EWA as the paper writes it; also True), "official" (the released CIDM code's EWA,
        see :meth:`concept_weights`) or "sum" (weight 1 each: LoRA-M, C-LoRA, peft's merge; also False);
        ewa_power / ewa_norm override the variant's (paper 2 / "fro", official 4 / "l1"), ewa_top_k keeps
        the k largest;
        the default uses EWA when every concept was learned with CIDM (``method == "cidm"``), else the sum.
        composition: None (the concepts mixed into one K/V per layer, weighted per ``ewa``) or "lora-c"
        (LoRA Composite, Zhong et al. 2024: at every step the classifier-free-guided noise is computed under
        each concept of the library alone, weight 1, in the same UNet call, and the guided estimates are
        averaged; ``ewa*`` options are then unused and the output's ``psi`` is None; not with
        attention_guidance). The UNet rows, and the cost of a step, grow by the number of concepts.
        capture_attention: attn2 layer names whose attention maps to return (``output.attention_maps``,
        layer → (rows, N, T) for the last step).
        attention_guidance: an :class:`~lifelong_engine.guidance.AttentionGuidance`: in the first steps, move
        the latents so that every concept named in the prompt gets attention (L2DM's concept attention
        artist) and different concepts attend to different places (its orthogonal attention), as
        Attend-and-Excite does (:mod:`lifelong_engine.guidance`); prompts without regions only.
        """
        self.check_installed()
        call = self.call_arguments(*args, **kwargs)
        num_inference_steps, guidance_scale = call["num_inference_steps"], call["guidance_scale"]
        height, width, num_images_per_prompt = call.get("height"), call.get("width"), call["num_images_per_prompt"]
        eta, guidance_rescale = call["eta"], call.get("guidance_rescale", 0.0)
        regions = check_regions(regions, self.max_regions)
        if attention_guidance is not None and regions:
            raise ValueError("attention_guidance works on prompts without regions (regions already place concepts)")
        if not _is_int(num_images_per_prompt) or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt={num_images_per_prompt!r}: expected an integer >= 1")
        self.check_options(
            num_inference_steps, guidance_scale, alpha, height, width, ewa_power, ewa_norm, ewa_top_k, ewa,
            eta, guidance_rescale,
        )  # fmt: skip
        if isinstance(capture_attention, str) or not set(capture_attention) <= set(self.layers):
            unknown = [capture_attention] if isinstance(capture_attention, str) else sorted(
                set(capture_attention) - set(self.layers)
            )  # fmt: skip
            raise ValueError(
                f"capture_attention: {unknown} are not attn2 layer names of this UNet; expected a list of names "
                f"such as {self.layers[0]!r}"
            )
        if composition not in (None, "lora-c"):
            raise ValueError(f"composition={composition!r}: expected None (mix per ewa) or 'lora-c' (LoRA Composite)")
        if composition == "lora-c" and attention_guidance is not None:
            raise ValueError("composition='lora-c' does not support attention_guidance")
        library = self.library()
        prompts, negatives = self.texts(call, guidance_scale > 1.0)
        if library.adapters and any(isinstance(t, generation.Text) and t.embeds is not None
                                    for t in (*prompts, *negatives)):  # fmt: skip
            raise ValueError(
                "prompt_embeds / negative_prompt_embeds cannot be used while concepts are in the library: the "
                "engine places concept tokens and weighs concepts (EWA) by the prompt's text; pass prompt= and "
                "negative_prompt= strings, or remove the concepts"
            )
        if attention_guidance is not None and any(isinstance(t, generation.Text) for t in prompts):
            raise ValueError("attention_guidance needs plain text prompts (no prompt_embeds or prompt_2)")
        options = self.options(call)
        callback, tensor_inputs = self.callback(call)
        composite = max(len(library.adapters), 1) if composition == "lora-c" else 1
        size = (height or self.default_size(), width or self.default_size())
        image = self.image_input(call, size)
        if image is not None:  # the image's size (latents given as the image: times the VAE's scale factor)
            factor = 1 if image.image.shape[1] == 3 else self.pipe.vae_scale_factor
            size = tuple(factor * x for x in image.image.shape[-2:])
        plan = self.plan(
            prompts, negatives, regions, num_images_per_prompt, guidance_scale > 1.0, alpha, size, composite
        )
        cond = generation.condition(
            self, plan, library, guidance_scale, ewa_power, ewa_norm, ewa_top_k, ewa, options=options
        )
        cond.context.capture = frozenset(capture_attention)
        generator = call["generator"]
        state = generation.start(
            self,
            plan,
            cond,
            num_inference_steps,
            guidance_scale,
            generator=generator,
            latents=call.get("latents"),
            eta=eta,
            guidance_rescale=guidance_rescale,
            scheduler=self.pipe.scheduler,
            attention_guidance=attention_guidance,
            timesteps=call.get("timesteps"),
            sigmas=call.get("sigmas"),
            denoising_end=call.get("denoising_end"),
            image=image,
        )
        batch = None
        with self.pipe.progress_bar(total=len(state.timesteps)) as progress:
            while not state.done:
                generation.guide(self, state)
                batch = generation.step(self, [state], batch)
                if callback is not None:
                    i = state.step - 1
                    values = {"latents": state.latents}
                    out = callback(self, i, state.timesteps[i], {k: values[k] for k in tensor_inputs})
                    state.latents = (out or {}).pop("latents", state.latents)
                progress.update()

        image = self.decode(state.latents, call["output_type"], generator)
        self.pipe.maybe_free_model_hooks()
        image_psi = cond.psi[plan.image_texts] if cond.psi is not None and composition is None else None
        if not call["return_dict"]:
            return (image,)
        out = LifelongPipelineOutput(image, image_psi, list(self._concepts))
        if cond.context.capture:
            out.attention_maps = dict(cond.context.maps)
        if state.guide_state is not None:
            out.guidance_losses = state.guide_state.losses
        return out

    # ------------------------------------------------------------ call surface

    # diffusers arguments the engine refuses when given (not at their default), and why.
    UNSUPPORTED = {
        "ip_adapter_image": "IP-Adapter is not supported by LifelongPipeline",
        "ip_adapter_image_embeds": "IP-Adapter is not supported by LifelongPipeline",
        "padding_mask_crop": "not supported by LifelongPipeline (inpaint the whole image)",
        "masked_image_latents": "not supported by LifelongPipeline (pass image and mask_image)",
    }
    # callback_on_step_end_tensor_inputs the engine can hand to a callback (and take back).
    CALLBACK_TENSORS = ("latents",)

    def call_arguments(self, *args, **kwargs) -> dict:
        """The wrapped pipeline's call arguments bound as diffusers binds them (its order, its defaults);
        TypeError for a name it does not take, ValueError for one the engine does not support."""
        try:
            bound = self.signature.bind(*args, **kwargs)
        except TypeError as e:
            raise TypeError(f"{e} (the arguments of {type(self.pipe).__name__}, then the engine's keywords)") from None
        bound.apply_defaults()
        call = dict(bound.arguments)
        for name, why in self.UNSUPPORTED.items():
            if call.get(name) is not None:
                raise ValueError(f"{name}: {why}")
        return call

    @property
    def signature(self) -> inspect.Signature:
        """The wrapped pipeline's ``__call__`` signature without ``self`` and ``**kwargs``."""
        params = inspect.signature(type(self.pipe).__call__).parameters.values()
        return inspect.Signature([p for p in params if p.name != "self" and p.kind is not p.VAR_KEYWORD])

    def texts(self, call: dict, cfg: bool) -> tuple[list, list]:
        """The prompts and negative prompts of a call, one per prompt (str, :class:`generation.Text` for
        ``prompt_2`` or given embeddings, None: none), as diffusers reads ``prompt``/``prompt_2``/
        ``prompt_embeds``/``pooled_prompt_embeds`` and their negative forms."""
        prompt, embeds = call.get("prompt"), call.get("prompt_embeds")
        if (prompt is None) == (embeds is None):
            raise ValueError("pass exactly one of prompt (a string or a list of strings) and prompt_embeds")
        if embeds is not None:
            pooled = call.get("pooled_prompt_embeds")
            if self.is_sdxl and pooled is None:
                raise ValueError("prompt_embeds on SDXL needs pooled_prompt_embeds too (as diffusers requires)")
            if not isinstance(embeds, Tensor) or embeds.ndim != 3:
                raise ValueError(f"prompt_embeds: expected a (batch, tokens, width) tensor, got {_shape(embeds)}")
            prompts = [generation.Text(embeds=e, pooled=pooled[b] if pooled is not None else None)
                       for b, e in enumerate(embeds)]  # fmt: skip
        else:
            prompts = [prompt] if isinstance(prompt, str) else prompt
            if not isinstance(prompts, list | tuple) or not prompts or not all(isinstance(p, str) for p in prompts):
                raise ValueError(f"prompt={prompt!r:.80}: expected a string or a non-empty list of strings")
            prompts = self._second(list(prompts), call.get("prompt_2"), "prompt_2")
        n = len(prompts)
        negative_embeds = call.get("negative_prompt_embeds")
        if negative_embeds is not None:
            pooled = call.get("negative_pooled_prompt_embeds")
            if self.is_sdxl and pooled is None:
                raise ValueError("negative_prompt_embeds on SDXL needs negative_pooled_prompt_embeds too")
            if not isinstance(negative_embeds, Tensor) or negative_embeds.ndim != 3 or len(negative_embeds) != n:
                raise ValueError(
                    f"negative_prompt_embeds: expected a ({n}, tokens, width) tensor, got {_shape(negative_embeds)}"
                )
            negatives = [generation.Text(embeds=e, pooled=pooled[b] if pooled is not None else None)
                         for b, e in enumerate(negative_embeds)]  # fmt: skip
            return prompts, negatives
        negative = call.get("negative_prompt")
        negatives = self.negatives(negative, n)
        zero = self.is_sdxl and self.pipe.config.force_zeros_for_empty_prompt
        if cfg and self.is_sdxl and not (negative is None and zero):
            negatives = self._second([x or "" for x in negatives], call.get("negative_prompt_2"), "negative_prompt_2")
        return prompts, negatives

    def _second(self, first: list[str], second, name: str) -> list:
        """SDXL: the texts of the two encoders (``prompt_2 or prompt``, as diffusers); Text where they differ."""
        if second is None or not self.is_sdxl:
            return first
        seconds = [second] * len(first) if isinstance(second, str) else second
        if not isinstance(seconds, list | tuple) or len(seconds) != len(first):
            raise ValueError(f"{name}={second!r:.80}: expected a string or a list of {len(first)} strings")
        return [p if p == q or not q else generation.Text(p, q) for p, q in zip(first, seconds)]

    def image_input(self, call: dict, size: tuple[int, int]) -> generation.ImageInput | None:
        """The call's ``image`` (and ``mask_image``) preprocessed as the wrapped img2img / inpaint pipeline does
        (its ``VaeImageProcessor``s), or None for a text-to-image pipeline."""
        if "image" not in call:
            return None
        image, strength = call["image"], call["strength"]
        if image is None:
            raise ValueError(f"{type(self.pipe).__name__} needs image= (a PIL image, an array or a tensor)")
        if not _is_real(strength) or not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength={strength!r}: expected a number in [0, 1]")
        _check_pixels(image)
        if "mask_image" not in call:
            return generation.ImageInput(
                self.pipe.image_processor.preprocess(image), strength, call.get("denoising_start")
            )
        if call["mask_image"] is None:
            raise ValueError(f"{type(self.pipe).__name__} needs mask_image= (white where the image is repainted)")
        height, width = size
        pixels = self.pipe.image_processor.preprocess(image, height=height, width=width, resize_mode="default")
        mask = self.pipe.mask_processor.preprocess(
            call["mask_image"], height=height, width=width, resize_mode="default"
        )
        return generation.ImageInput(pixels.to(torch.float32), strength, call.get("denoising_start"), mask)

    def options(self, call: dict) -> generation.Options:
        """The generation core's :class:`~lifelong_engine.generation.Options` of a call, checked."""
        kwargs = call.get("cross_attention_kwargs")
        if kwargs is not None and (not isinstance(kwargs, dict) or CONTEXT_KWARG in kwargs):
            raise ValueError(f"cross_attention_kwargs={kwargs!r:.80}: expected a dict without {CONTEXT_KWARG!r}")
        clip_skip = call.get("clip_skip")
        if clip_skip is not None and (not _is_int(clip_skip) or clip_skip < 0):
            raise ValueError(f"clip_skip={clip_skip!r}: expected None or an integer >= 0")
        sizes = {k: call[k] for k in generation.Options.__dataclass_fields__ if k in call and k != "clip_skip"}
        return generation.Options(clip_skip=clip_skip, attention_kwargs=kwargs or None, **sizes)

    def callback(self, call: dict):
        """(callback_on_step_end, the tensor names it asked for), checked against what the engine provides."""
        callback, names = call.get("callback_on_step_end"), call.get("callback_on_step_end_tensor_inputs")
        if callback is None:
            return None, ()
        if isinstance(callback, PipelineCallback | MultiPipelineCallbacks):
            names = callback.tensor_inputs
        names = list(names or ())
        unknown = [n for n in names if n not in self.CALLBACK_TENSORS]
        if unknown:
            raise ValueError(
                f"callback_on_step_end_tensor_inputs: {unknown} are not provided by LifelongPipeline; it provides "
                f"{list(self.CALLBACK_TENSORS)}"
            )
        return callback, names

    # ----------------------------------------------------------------- pieces

    def check_options(
        self,
        num_inference_steps,
        guidance_scale,
        alpha,
        height,
        width,
        ewa_power,
        ewa_norm,
        ewa_top_k,
        ewa,
        eta=0.0,
        guidance_rescale=0.0,
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
        if ewa_power is not None and (not _is_real(ewa_power) or not (math.isfinite(ewa_power) and ewa_power > 0)):
            raise ValueError(f"ewa_power={ewa_power!r}: expected a finite number > 0")
        if ewa_norm is not None and ewa_norm not in checks.NORMS:
            raise ValueError(f"ewa_norm={ewa_norm!r}: expected one of {checks.NORMS}")
        if ewa_top_k is not None and (not _is_int(ewa_top_k) or ewa_top_k < 1):
            raise ValueError(f"ewa_top_k={ewa_top_k!r}: expected None (every concept) or an integer >= 1")
        if ewa is not None:
            ewa_variant(ewa)
        for name, value in (("eta", eta), ("guidance_rescale", guidance_rescale)):
            if not _is_real(value) or not 0.0 <= value <= 1.0:
                raise ValueError(f"{name}={value!r}: expected a number in [0, 1]")

    def negatives(self, negative_prompt, n: int) -> list[str | None]:
        """The negative prompt of each of n prompts (None: none), checked against n."""
        if negative_prompt is None:
            return [None] * n
        negatives = [negative_prompt] * n if isinstance(negative_prompt, str) else negative_prompt
        if not isinstance(negatives, Sequence) or not all(x is None or isinstance(x, str) for x in negatives):
            raise ValueError(f"negative_prompt={negative_prompt!r:.80}: expected None, a string or a list of strings")
        if len(negatives) != n:
            raise ValueError(f"negative_prompt has {len(negatives)} entries, prompt has {n}")
        return list(negatives)

    def default_size(self) -> int:
        """The image side the UNet was trained at, in pixels."""
        return self.unet.config.sample_size * self.pipe.vae_scale_factor

    def plan(
        self, prompts, negatives, regions, per_prompt: int, cfg: bool, alpha: float, size, composite: int = 1
    ) -> generation.Plan:
        """The generation plan of checked inputs (:func:`lifelong_engine.generation.make_plan`)."""
        zero_negative = self.is_sdxl and self.pipe.config.force_zeros_for_empty_prompt
        return generation.make_plan(
            prompts, negatives, regions, per_prompt, cfg, alpha, size, zero_negative, composite
        )

    def decode(self, latents: Tensor, output_type: str = "pil", generator=None):
        """Latents → images as diffusers' pipelines return them (VAE, safety checker, watermark)."""
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


_WRAPPERS = {  # wrapper class name → (what makes it, how to reach the wrapped module)
    "OptimizedModule": ("torch.compile", lambda m: m._orig_mod),
    "PeftModel": ("peft.get_peft_model", lambda m: m.get_base_model()),
}


def unwrap_unet(unet):
    """The diffusers UNet2DConditionModel inside ``unet``, through the wrappers of ``_WRAPPERS`` (torch.compile,
    peft's get_peft_model); a TypeError naming the wrapper for anything else that is not a UNet
    with attention processors. The processors are installed on this module; calls still go through the
    wrapper (compiled, peft's forward)."""
    seen = []
    while type(unet).__name__ in _WRAPPERS and not hasattr(type(unet), "set_attn_processor"):
        seen.append(_WRAPPERS[type(unet).__name__][0])
        unet = _WRAPPERS[type(unet).__name__][1](unet)
    if not (hasattr(type(unet), "set_attn_processor") and hasattr(type(unet), "attn_processors")):
        inside = f" (inside {' → '.join(seen)})" if seen else ""
        raise TypeError(
            f"pipe.unet is a {type(unet).__module__}.{type(unet).__name__}{inside}, not a diffusers UNet with "
            f"attention processors; LifelongPipeline unwraps {', '.join(w for w, _ in _WRAPPERS.values())}: unwrap "
            "the UNet before wrapping the pipeline"
        )
    return unet


def supported_pipelines() -> tuple[type, ...]:
    """The diffusers pipeline classes LifelongPipeline drives (and their subclasses)."""
    import diffusers as d

    return (
        d.StableDiffusionPipeline,
        d.StableDiffusionXLPipeline,
        d.StableDiffusionImg2ImgPipeline,
        d.StableDiffusionXLImg2ImgPipeline,
        d.StableDiffusionInpaintPipeline,
        d.StableDiffusionXLInpaintPipeline,
    )


def check_supported(pipe) -> None:
    """Raise TypeError unless LifelongPipeline drives ``pipe`` fully: a supported pipeline class, no ControlNet
    or T2I adapter, no IP-Adapter loaded (their inputs would be dropped or their processors replaced)."""
    supported = supported_pipelines()
    names = ", ".join(c.__name__ for c in supported)
    if not isinstance(pipe, supported):
        raise TypeError(f"LifelongPipeline drives {names}; got {type(pipe).__name__}, which it does not support")
    for component in ("controlnet", "adapter"):
        if getattr(pipe, component, None) is not None:
            raise TypeError(
                f"{type(pipe).__name__} has a {component} ({type(getattr(pipe, component)).__name__}); "
                "LifelongPipeline does not drive it and would generate without it; wrap the pipeline without it"
            )
    unet = unwrap_unet(pipe.unet)
    ip = [name for name, p in unet.attn_processors.items() if "IPAdapter" in type(p).__name__]
    if ip or getattr(unet, "encoder_hid_proj", None) is not None:
        raise TypeError(
            "the UNet has an IP-Adapter loaded (load_ip_adapter); LifelongPipeline does not support IP-Adapter and "
            "would replace its processors; call pipe.unload_ip_adapter() before wrapping"
        )


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _shape(x) -> str:
    return f"shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__


def _check_pixels(image) -> None:
    """Refuse integer arrays and tensors as ``image``: diffusers' image processor reads their values as
    colours in [0, 1] without scaling, so 0–255 pixels (which diffusers takes silently) would start the edit
    from colours far out of range."""
    for item in image if isinstance(image, list | tuple) else [image]:
        dtype = getattr(item, "dtype", None)
        if dtype is None:
            continue
        integer = np.issubdtype(dtype, np.integer) if isinstance(item, np.ndarray) else not (
            dtype.is_floating_point or dtype.is_complex)  # fmt: skip
        if integer:
            raise ValueError(
                f"image: an array of {dtype} pixels; pass a PIL image, or floats in [0, 1] "
                "(diffusers' image processor reads arrays and tensors as such, without scaling)"
            )


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


_EWA_VARIANTS = {True: "paper", False: "sum", "paper": "paper", "official": "official", "sum": "sum"}


def ewa_variant(ewa) -> str:
    """The EWA variant an ``ewa=`` argument names: "paper", "official" or "sum"."""
    if isinstance(ewa, (bool, str)) and ewa in _EWA_VARIANTS:
        return _EWA_VARIANTS[ewa]
    raise ValueError(f"ewa={ewa!r}; expected 'paper', 'official', 'sum', True (= 'paper') or False (= 'sum')")

"""The generation core: the one denoising path of the pipeline and the serving engine (DESIGN §5, §6).

A generation goes through four stages:

1. :func:`make_plan`: the request becomes a :class:`Plan`, the UNet rows of its images: ``passes``
   noise estimates per image (unconditional with CFG, global, one per region with ``alpha < 1``), each
   row naming the text of each of its prompt slots and the boxes painted into them.
2. :func:`condition`: the plan becomes a :class:`Conditioning`: the text K/V of every layer for every
   row (concepts mixed in by EWA, computed once), the region plan (region ids painted once, at every
   resolution), SDXL's added conditioning, ``timestep_cond`` and the latent masks of the aggregation.
   Everything data-dependent is made and checked here, so denoising never waits on the device.
3. :func:`start`: a :class:`DenoisingState`: its scheduler (with its own ``eta``), timesteps, latents,
   step index and attention-guidance state.
4. :func:`step`: one UNet batch for many states: per-row timesteps, one forward
   (:func:`~lifelong_engine.attention.unet_forward`), then per state the noise aggregation
   (CFG, ``guidance_rescale``, regional E*; with LoRA Composite the mean of the per-concept guided
   estimates) and its scheduler's step. :func:`guide` runs a state's
   attention-guidance update before it.

``LifelongPipeline.__call__`` drives one state; the serving ``Engine`` schedules many.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import re
from collections.abc import Sequence

import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg, retrieve_timesteps
from diffusers.utils import USE_PEFT_BACKEND, scale_lora_layers, unscale_lora_layers
from torch import Tensor

from . import checks
from .attention import GenerationContext, ImageLora, unet_forward
from .guidance import AttentionGuidance, GuidanceState, guide_latents, prepare_guidance
from .pool import Library
from .prompts import EncodedPrompts
from .regions import Box, RegionPlan, latent_masks

__all__ = [
    "Batch",
    "Conditioning",
    "DenoisingState",
    "ImageInput",
    "Options",
    "Plan",
    "Text",
    "aggregate_noise",
    "condition",
    "guide",
    "make_plan",
    "start",
    "step",
]


@dataclasses.dataclass(frozen=True, eq=False)
class Text:
    """A prompt slot given as more than one string: SDXL's ``prompt_2`` (what the second text encoder reads
    while the first reads ``prompt``), or ready embeddings as diffusers takes them: ``embeds`` (T, D), one
    row of ``prompt_embeds``, used for every layer, and SDXL's ``pooled`` (Dp,)."""

    prompt: str | None = None
    prompt_2: str | None = None
    embeds: Tensor | None = None
    pooled: Tensor | None = None


@dataclasses.dataclass
class Options:
    """diffusers' call options the core honours besides the plan, with diffusers' defaults.

    clip_skip: text-encoder layers skipped for the positive texts (diffusers encodes negative prompts without
    it); attention_kwargs: diffusers' ``cross_attention_kwargs``, passed to every UNet call; its ``scale``
    also scales the peft LoRA layers of the text encoders and of the text K/V projections while they run, as
    diffusers does; original_size, crops_coords_top_left, target_size: SDXL's micro-conditioning (None: the
    image size); the negative forms condition the unconditional rows when both negative sizes are given
    (else the positive ones do), as in diffusers' text-to-image pipeline; aesthetic_score and its negative:
    SDXL img2img / inpaint conditioning (set for those pipelines: their time ids follow
    ``requires_aesthetics_score``, and negative sizes default to the positive ones)."""

    clip_skip: int | None = None
    attention_kwargs: dict | None = None
    original_size: tuple[int, int] | None = None
    crops_coords_top_left: tuple[int, int] = (0, 0)
    target_size: tuple[int, int] | None = None
    negative_original_size: tuple[int, int] | None = None
    negative_crops_coords_top_left: tuple[int, int] = (0, 0)
    negative_target_size: tuple[int, int] | None = None
    aesthetic_score: float | None = None
    negative_aesthetic_score: float | None = None


@dataclasses.dataclass
class ImageInput:
    """The image a generation starts from (diffusers' img2img / inpaint pipelines; SDEdit): image (images, 3,
    H, W) in [-1, 1] as ``VaeImageProcessor.preprocess`` gives it, noised to the timestep ``strength`` of the
    way in (or, SDXL, from ``denoising_start``: a refiner continuing a base run); for inpainting, mask
    (images, 1, H, W), 1 where the image is repainted."""

    image: Tensor
    strength: float
    denoising_start: float | None = None
    mask: Tensor | None = None


@dataclasses.dataclass
class Inpaint:
    """Inpainting state of a generation: mask (images, 1, h, w) and masked-image latents (what a 9-channel
    inpainting UNet reads beside the latents); for a 4-channel UNet, the image latents and the noise the
    unmasked part is re-noised with after every step."""

    mask: Tensor
    masked_latents: Tensor | None
    image_latents: Tensor | None
    noise: Tensor


@dataclasses.dataclass
class Plan:
    """The UNet rows of one generation: ``composite`` × ``passes`` × ``images``, pass-major (uncond if cfg,
    global, regions); ``composite`` > 1 (LoRA Composite): one copy of those rows per concept, concept-major.

    texts: every text (negatives, prompts, region prompts: a string, a :class:`Text`, or None: no text, a zero
    embedding), the first ``negatives`` of each copy the negative prompts;
    row_texts: (rows, P) the text of each prompt slot of each row (slot 0: the row's global text);
    owner: (rows,) the text whose EWA weights the row uses; boxes[row]: (prompt slot, box) painted in
    order; image_texts: (images,) each image's prompt; size: (height, width) in pixels. With composite K,
    texts are the first copy's texts repeated K times and copy k's rows read copy k's texts.
    """

    texts: list[str | None]
    row_texts: Tensor
    owner: Tensor
    boxes: list[list[tuple[int, Box]]]
    passes: int
    images: int
    image_texts: Tensor
    regions: list[tuple[str, Box]]
    cfg: bool
    alpha: float
    size: tuple[int, int]
    composite: int = 1
    negatives: int = 0

    @property
    def rows(self) -> int:
        return self.composite * self.passes * self.images

    @property
    def slots(self) -> int:
        """P, the prompt slots of every row."""
        return self.row_texts.shape[1]


def make_plan(
    prompts: Sequence[str | Text],
    negatives: Sequence[str | Text | None],
    regions: list[tuple[str, Box]],
    per_prompt: int,
    cfg: bool,
    alpha: float,
    size: tuple[int, int],
    zero_negative: bool = False,
    composite: int = 1,
) -> Plan:
    """The plan of ``prompts`` (their ``negatives``, None for none) with ``regions`` shared by all, checked
    (see :func:`~lifelong_engine.regions.check_regions`); ``zero_negative``: an absent negative prompt is a
    zero embedding (SDXL's ``force_zeros_for_empty_prompt``) rather than the empty text; ``composite`` K:
    LoRA Composite's K copies of every row, copy k conditioned on the library's k-th concept alone
    (:func:`condition`)."""
    B, U = len(prompts), len(regions)
    neg_texts = [n if n is not None else (None if zero_negative else "") for n in negatives] if cfg else [None] * B
    texts = [*neg_texts, *prompts, *(r[0] for r in regions)]
    P = U + 1
    image_prompt = [i // per_prompt for i in range(B * per_prompt)]
    region_passes = U if (U and alpha < 1) else 0
    row_texts, owner, boxes = [], [], []
    if cfg:
        for b in image_prompt:
            row_texts.append([b] * P)
            owner.append(B + b)
            boxes.append([])
    for b in image_prompt:
        row_texts.append([B + b, *(2 * B + u for u in range(U))])
        owner.append(B + b)
        boxes.append([(u + 1, box) for u, (_, box) in enumerate(regions)])
    for u in range(region_passes):
        for b in image_prompt:
            row_texts.append([B + b] + [2 * B + u] * U)
            owner.append(B + b)
            boxes.append([(1, regions[u][1])])
    passes = int(cfg) + 1 + region_passes
    image_texts = torch.tensor([B + b for b in image_prompt])
    n, row_texts, owner = len(texts), torch.tensor(row_texts), torch.tensor(owner)
    return Plan(
        texts * composite,
        torch.cat([row_texts + k * n for k in range(composite)]),
        torch.cat([owner + k * n for k in range(composite)]),
        boxes * composite,
        passes,
        B * per_prompt,
        image_texts,
        list(regions),
        cfg,
        alpha,
        tuple(size),
        composite,
        B,
    )


# ------------------------------------------------------------------------------ conditioning


@dataclasses.dataclass
class Conditioning:
    """What the UNet reads for a plan's rows, made once per generation.

    context: text K/V per layer, region plan, image-side concepts; hidden: (rows, T, D) diffusers'
    encoder_hidden_states (each row's global text at layer 0; no engine processor reads it); added:
    SDXL's added conditioning per row; timestep_cond: (rows, Dt) or None; masks: (U, 1, 1, h, w) latent
    masks of the regional aggregation, or None; psi: (texts, L, S) EWA weights (None without concepts);
    positions[text]: each concept's token positions in that text, per concept; eos: (texts,) EOS positions.
    """

    context: GenerationContext
    hidden: Tensor
    added: dict | None
    timestep_cond: Tensor | None
    masks: Tensor | None
    psi: Tensor | None
    positions: list[list[list[int]]]
    eos: Tensor
    attention_kwargs: dict | None = None


@contextlib.contextmanager
def lora_scale(model, scale: float | None):
    """While active, the peft LoRA layers of the text encoders and the UNet are scaled by ``scale`` (diffusers'
    ``cross_attention_kwargs["scale"]``, which diffusers applies to the text encoders while encoding and to
    the UNet while it runs; the engine computes the text K/V outside the UNet call, so it scales both here)."""
    modules = [*model.text.text_encoders, model.unet] if scale is not None and USE_PEFT_BACKEND else []
    for module in modules:
        scale_lora_layers(module, scale)
    try:
        yield
    finally:
        for module in modules:
            unscale_lora_layers(module, scale)


def _encode_texts(model, plan: Plan, library: Library, options: Options) -> EncodedPrompts:
    """The plan's texts encoded, one entry per text: strings and :class:`Text` prompts through the text
    encoders (the positive ones with ``clip_skip``), given embeddings used for every layer, None as zeros
    (no words, EOS at 0)."""
    texts, n = plan.texts, len(plan.texts)
    per_copy = n // plan.composite
    given = [i for i, t in enumerate(texts) if isinstance(t, Text) and t.embeds is not None]
    groups: dict[int | None, list[int]] = {}  # clip_skip → the texts encoded with it
    for i, t in enumerate(texts):
        if t is not None and i not in given:
            negative = i % per_copy < plan.negatives
            groups.setdefault(None if negative else options.clip_skip, []).append(i)
    parts = []
    for clip_skip, index in groups.items():
        first = [t.prompt if isinstance(t, Text) else t for t in (texts[i] for i in index)]
        second = [t.prompt_2 if isinstance(t, Text) and t.prompt_2 is not None else f
                  for t, f in zip((texts[i] for i in index), first)]  # fmt: skip
        second = second if second != first else None
        parts.append((index, model.encode_prompt(first, library, prompts_2=second, clip_skip=clip_skip)))
    if given:
        embeds = torch.stack([texts[i].embeds for i in given]).to(model.device)
        pools = [texts[i].pooled for i in given]
        if model.is_sdxl and any(p is None for p in pools):
            raise ValueError("SDXL needs pooled_prompt_embeds (and negative_pooled_prompt_embeds) with prompt embeds")
        if parts and embeds.shape[1:] != parts[0][1].per_layer.shape[2:]:
            raise ValueError(
                f"prompt embeds of shape {tuple(embeds.shape[1:])}; the text encoders give "
                f"{tuple(parts[0][1].per_layer.shape[2:])} per prompt"
            )
        T = embeds.shape[1]
        none = torch.zeros(len(given), T, dtype=torch.bool, device=model.device)
        parts.append((given, EncodedPrompts(
            embeds[:, None].expand(-1, len(model.layers), -1, -1),
            torch.stack(pools).to(model.device) if model.is_sdxl else None,
            none, torch.zeros(len(given), dtype=torch.long, device=model.device), none, [[] for _ in given],
        )))  # fmt: skip
    if not parts:
        raise ValueError("nothing to condition on: every text of the plan is empty")
    ref = parts[0][1]
    per_layer = ref.per_layer.new_zeros(n, *ref.per_layer.shape[1:])
    pooled = ref.pooled.new_zeros(n, ref.pooled.shape[-1]) if ref.pooled is not None else None
    T = per_layer.shape[2]
    word_mask = torch.zeros(n, T, dtype=torch.bool, device=per_layer.device)
    concept_mask = torch.zeros_like(word_mask)
    eos = torch.zeros(n, dtype=torch.long, device=per_layer.device)
    positions: list[list[list[int]]] = [[] for _ in range(n)]
    for index, enc in parts:
        per_layer[index] = enc.per_layer.to(per_layer.dtype)
        if pooled is not None:
            pooled[index] = enc.pooled.to(pooled.dtype)
        word_mask[index], concept_mask[index], eos[index] = enc.word_mask, enc.concept_mask, enc.eos
        for j, i in enumerate(index):
            positions[i] = enc.positions[j]
    return EncodedPrompts(per_layer, pooled, word_mask, eos, concept_mask, positions)


def condition(
    model,
    plan: Plan,
    library: Library,
    guidance_scale: float,
    power: float | None = None,
    norm: str | None = None,
    top_k: int | None = None,
    ewa: bool | str | None = None,
    options: Options | None = None,
) -> Conditioning:
    """Encode the plan's texts, weight the library's concepts by EWA and compute every layer's text K/V
    once (``model``: a :class:`~lifelong_engine.LifelongPipeline`). Concept ids are checked here, once
    (:func:`~lifelong_engine.checks.adapter_ids`); the text K/V op and the denoising loop reuse them
    unchecked. A composite plan (LoRA Composite) needs one copy per concept of the library: copy k's texts
    get concept k alone, weight 1.
    ``options``: the diffusers call options (:class:`Options`)."""
    options = options or Options()
    scale = (options.attention_kwargs or {}).get("scale")
    with lora_scale(model, scale):
        return _condition(model, plan, library, guidance_scale, power, norm, top_k, ewa, options)


def _condition(model, plan, library, guidance_scale, power, norm, top_k, ewa, options) -> Conditioning:
    device, dtype = model.device, model.dtype
    real = [i for i, t in enumerate(plan.texts) if t is not None]
    every = _encode_texts(model, plan, library, options)
    per_layer, pooled, positions, eos = every.per_layer, every.pooled, every.positions, every.eos.cpu()
    n, L = per_layer.shape[:2]
    encoded = EncodedPrompts(
        per_layer[real], None, every.word_mask[real], every.eos[real], every.concept_mask[real], []
    )
    G = len(library.adapters)
    if plan.composite > 1 and plan.composite != G:
        raise ValueError(f"a composite plan of {plan.composite} copies needs as many concepts; the library has {G}")
    if plan.composite > 1:  # text i of copy k = i // (n / K) mixes concept k alone
        ids, _ = model.concept_weights(encoded, power, norm, None, library, "sum")
        copy_of = torch.arange(len(real), device=device) * plan.composite // len(real)
        ids = ids.gather(-1, copy_of[:, None, None].expand(-1, ids.shape[1], 1))
        psi = torch.ones(ids.shape, device=device)
    else:
        texts = [t.prompt or "" if isinstance(t, Text) else t for t in (plan.texts[i] for i in real)]
        ids, psi = _concept_weights(model, encoded, texts, library, power, norm, top_k, ewa)
    full_ids = torch.zeros(n, L, ids.shape[-1], dtype=torch.long, device=device)
    full_psi = torch.zeros(n, L, ids.shape[-1], device=device)
    full_ids[real] = ids
    full_psi[real] = psi
    # Every text uses its row owner's weights: a negative prompt is weighted like its image's prompt.
    text_owner = torch.arange(n)
    text_owner[plan.row_texts[:, 0]] = plan.owner
    full_ids, full_psi = full_ids[text_owner], full_psi[text_owner]

    pool = library.pool if G else None
    if pool is not None:  # the one value check of the ids the hot path reuses (one host sync)
        checks.adapter_ids("generation", full_ids, pool.capacity)
    kv = model.text_kv(per_layer, pool, full_ids, full_psi, plan.row_texts)
    latent = tuple(s // model.pipe.vae_scale_factor for s in plan.size)
    levels = len(model.unet.config.block_out_channels)
    regions = RegionPlan(plan.boxes, latent, plan.slots, device, levels) if any(plan.boxes) else None
    image_lora = None
    if pool is not None and library.image_side:
        image_lora = ImageLora(
            pool,
            {layer: full_ids[plan.owner, l] for l, layer in enumerate(model.layers)},
            {layer: full_psi[plan.owner, l].to(dtype) for l, layer in enumerate(model.layers)},
        )
    hidden = per_layer[plan.row_texts[:, 0], 0].to(dtype)
    added = _added_cond(model, plan, pooled, options)
    timestep_cond = None
    if model.unet.config.time_cond_proj_dim is not None:
        scale = torch.tensor(guidance_scale - 1).repeat(plan.rows)
        timestep_cond = model.pipe.get_guidance_scale_embedding(scale, model.unet.config.time_cond_proj_dim)
        timestep_cond = timestep_cond.to(device=device, dtype=dtype)
    masks = latent_masks(plan.regions, latent, device, dtype) if plan.regions and plan.alpha < 1 else None
    return Conditioning(
        GenerationContext(kv, regions, image_lora),
        hidden,
        added,
        timestep_cond,
        masks,
        full_psi if G else None,
        positions,
        eos,
        options.attention_kwargs,
    )


def _concept_weights(model, encoded, texts: list[str], library: Library, power, norm, top_k, ewa):
    """(ids, psi), each (texts, L, S): the concepts each text mixes into each layer and their weights.

    The rule (README "Concepts with and without ê"): concepts with a concept embedding ê of their own (learned
    token rows or a stored ê: CIDM, C-LoRA, ... and imported textual inversions) are weighted as ``ewa`` asks
    (their own default: EWA when all of them are CIDM, else weight 1 each); concepts without one
    (:attr:`Library.triggered`: an imported ordinary LoRA) take no part in EWA and apply at weight 1 to a text
    that names their token (the trigger word, a whole word), 0 to any other. Without ``top_k`` the S columns
    are the library's concepts in library order."""
    from .pipeline import ewa_variant

    triggered = library.triggered
    learned = [i for i in range(len(library.adapters)) if i not in triggered]
    own = library.subset(learned)
    variant = ewa_variant(own.default_ewa if ewa is None else ewa)
    weighted = variant != "sum"
    ids, psi = model.concept_weights(encoded, power, norm, top_k if weighted else None, own, variant)
    if not weighted:
        psi = torch.ones_like(psi)
    if not triggered:
        return ids, psi
    n, L = ids.shape[:2]
    named = [[_names(text, library.adapters[i].token) for i in triggered] for text in texts]
    on = torch.tensor(named, dtype=psi.dtype, device=psi.device)[:, None].expand(n, L, len(triggered))
    ids = torch.cat([ids, library.ids[triggered].expand(n, L, len(triggered))], -1)
    psi = torch.cat([psi, on], -1)
    if top_k is None or not weighted:  # back to library order
        order = torch.tensor(learned + triggered).argsort().to(ids.device)
        ids, psi = ids[..., order], psi[..., order]
    return ids, psi


def _names(text: str, token: str) -> bool:
    """True when ``text`` has ``token`` as a whole word (not inside a longer word or ``<token>``)."""
    return re.search(r"(?<![\w<>-])" + re.escape(token) + r"(?![\w<>-])", text) is not None


def _added_cond(model, plan: Plan, pooled: Tensor | None, options: Options) -> dict | None:
    """SDXL's added conditioning of every row: the pooled text of its global text and the time ids (the
    negative ones on unconditional rows)."""
    if not model.is_sdxl:
        return None
    size = tuple(plan.size)
    projection = model.pipe.text_encoder_2.config.projection_dim

    def time_ids(original, crops, target):
        ids = model.pipe._get_add_time_ids(
            tuple(original or size), tuple(crops), tuple(target or size), dtype=model.dtype,
            text_encoder_projection_dim=projection,
        )  # fmt: skip
        return ids.to(model.device)

    if options.aesthetic_score is not None:  # the img2img / inpaint pipelines' time ids
        original, target = options.original_size or size, options.target_size or size
        positive, negative = model.pipe._get_add_time_ids(
            tuple(original), tuple(options.crops_coords_top_left), tuple(target), options.aesthetic_score,
            options.negative_aesthetic_score, tuple(options.negative_original_size or original),
            tuple(options.negative_crops_coords_top_left), tuple(options.negative_target_size or target),
            dtype=model.dtype, text_encoder_projection_dim=projection,
        )  # fmt: skip
        positive, negative = positive.to(model.device), negative.to(model.device)
    else:
        positive = time_ids(options.original_size, options.crops_coords_top_left, options.target_size)
        negative = positive
    if options.aesthetic_score is None and (
        options.negative_original_size is not None and options.negative_target_size is not None
    ):
        negative = time_ids(
            options.negative_original_size, options.negative_crops_coords_top_left, options.negative_target_size
        )
    rows = torch.arange(plan.rows)
    unconditional = (rows // plan.images % plan.passes == 0) & plan.cfg
    return {
        "text_embeds": pooled[plan.row_texts[:, 0]].to(model.device, model.dtype),
        "time_ids": torch.where(unconditional[:, None].to(model.device), negative, positive),
    }


# ------------------------------------------------------------------------------ denoising


@dataclasses.dataclass(eq=False)
class DenoisingState:
    """One generation being denoised: its plan and conditioning, its scheduler (own timesteps, own
    ``eta`` in ``extra``), latents (images, C, h, w), the index of its next step, and its attention
    guidance (the options and their state; ``guided``: how many first steps are guided)."""

    plan: Plan
    cond: Conditioning
    scheduler: object
    timesteps: Tensor
    latents: Tensor
    extra: dict
    guidance_scale: float
    guidance_rescale: float = 0.0
    guidance: AttentionGuidance | None = None
    guide_state: GuidanceState | None = None
    guided: int = 0
    step: int = 0
    inpaint: Inpaint | None = None

    @property
    def rows(self) -> int:
        return self.plan.rows

    @property
    def done(self) -> bool:
        return self.step >= len(self.timesteps)


def start(
    model,
    plan: Plan,
    cond: Conditioning,
    num_inference_steps: int,
    guidance_scale: float,
    *,
    generator=None,
    latents: Tensor | None = None,
    eta: float = 0.0,
    guidance_rescale: float = 0.0,
    scheduler=None,
    attention_guidance: AttentionGuidance | None = None,
    timesteps: list[int] | None = None,
    sigmas: list[float] | None = None,
    denoising_end: float | None = None,
    image: ImageInput | None = None,
) -> DenoisingState:
    """The denoising state of a conditioned plan: ``scheduler`` (default: a copy of the pipeline's) set to
    ``num_inference_steps`` (or to custom ``timesteps`` / ``sigmas``, as diffusers' ``retrieve_timesteps``),
    stopped at ``denoising_end`` (a fraction in (0, 1): the steps whose timestep is at least
    ``(1 - denoising_end)`` of the training steps, as diffusers' SDXL pipelines do), the initial latents
    (drawn with ``generator`` unless given), and the attention-guidance state when asked for. With an
    ``image`` (:class:`ImageInput`) the steps are those diffusers' img2img / inpaint pipeline runs for its
    ``strength`` (its ``get_timesteps``) and the latents are the image's, noised (its ``prepare_latents``);
    that needs the pipeline's own scheduler."""
    scheduler = scheduler if scheduler is not None else copy.deepcopy(model.pipe.scheduler)
    timesteps, steps = retrieve_timesteps(scheduler, num_inference_steps, model.device, timesteps, sigmas)
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(0)
    inpaint = None
    if image is not None:
        if scheduler is not model.pipe.scheduler:
            raise ValueError("a generation from an image runs on the wrapped pipeline's own scheduler")
        begin = {"denoising_start": image.denoising_start} if _fraction(image.denoising_start) else {}
        timesteps, steps = model.pipe.get_timesteps(steps, image.strength, model.device, **begin)
        if steps < 1:
            raise ValueError(
                f"strength={image.strength!r} leaves no denoising step of {num_inference_steps}; raise strength or "
                "num_inference_steps"
            )
        latents, inpaint = _image_latents(model, plan, image, timesteps, generator, latents)
    else:
        height, width = plan.size
        latents = model.pipe.prepare_latents(
            plan.images, model.unet.config.in_channels, height, width, model.dtype, model.device, generator, latents
        )
    if _fraction(denoising_end):
        train_steps = scheduler.config.num_train_timesteps
        cutoff = int(round(train_steps - denoising_end * train_steps))
        timesteps = timesteps[: int((timesteps >= cutoff).sum())]
    extra = model.pipe.prepare_extra_step_kwargs(generator, eta)
    state = DenoisingState(plan, cond, scheduler, timesteps, latents, extra, guidance_scale, guidance_rescale)
    state.inpaint = inpaint
    if attention_guidance is not None:
        state.guidance = attention_guidance
        state.guide_state = prepare_guidance(model, attention_guidance, plan, cond)
        state.guided = attention_guidance.guided_steps(len(timesteps))
    return state


def _fraction(x) -> bool:
    """diffusers' test of a usable denoising_start / denoising_end: a float strictly between 0 and 1."""
    return isinstance(x, float) and 0 < x < 1


def _image_latents(model, plan: Plan, image: ImageInput, timesteps: Tensor, generator, latents):
    """(latents, Inpaint or None) of a generation from an image, made by the wrapped pipeline's own
    ``prepare_latents`` / ``prepare_mask_latents`` in diffusers' order (so the generator draws the same)."""
    pipe = model.pipe
    begin = {"add_noise": image.denoising_start is None} if model.is_sdxl else {}
    latent_timestep = timesteps[:1].repeat(plan.images)
    source = image.image.to(model.device)
    if image.mask is None:
        if latents is None:
            latents = pipe.prepare_latents(
                source, latent_timestep, plan.images, 1, model.dtype, model.device, generator, **begin
            )
        return latents, None
    four = model.unet.config.in_channels == 4
    out = pipe.prepare_latents(
        plan.images, pipe.vae.config.latent_channels, *plan.size, model.dtype, model.device, generator, latents,
        image=source, timestep=latent_timestep, is_strength_max=image.strength == 1.0, return_noise=True,
        return_image_latents=four, **begin,
    )  # fmt: skip
    mask = image.mask.to(model.device)
    masked = source * (mask < 0.5)
    mask, masked_latents = pipe.prepare_mask_latents(
        mask, masked, plan.images, *plan.size, model.dtype, model.device, generator, False
    )
    return out[0], Inpaint(mask, None if four else masked_latents, out[2] if four else None, out[1])


def guide(model, state: DenoisingState) -> None:
    """The attention-guidance update of the state's latents when its next step is a guided one."""
    if state.guide_state is None or state.step >= state.guided:
        return
    step_size = state.guidance.scale(state.step, len(state.timesteps))
    t = state.timesteps[state.step]
    state.latents = guide_latents(model, state.guide_state, state.latents, t, step_size, state.scheduler, state.step)


@dataclasses.dataclass
class Batch:
    """The UNet inputs that do not change between steps of a set of states: context (K/V padded to the
    largest P, region plan, image-side concepts), hidden, added conditioning and timestep_cond."""

    context: GenerationContext
    hidden: Tensor
    added: dict | None
    timestep_cond: Tensor | None
    attention_kwargs: dict | None = None

    @classmethod
    def of(cls, model, states: Sequence[DenoisingState]) -> Batch:
        if len(states) == 1:
            c = states[0].cond
            return cls(c.context, c.hidden, c.added, c.timestep_cond, c.attention_kwargs)
        conds = [s.cond for s in states]
        if any(c.attention_kwargs for c in conds):
            raise ValueError("states with cross_attention_kwargs are denoised alone, not batched with others")
        P = max(s.plan.slots for s in states)
        kv = {}
        for layer in model.layers:
            ks, vs = [], []
            for c in conds:
                k, v = c.context.kv[layer]
                pad = P - k.shape[1]
                ks.append(torch.cat([k, k[:, :1].expand(-1, pad, -1, -1, -1)], 1) if pad else k)
                vs.append(torch.cat([v, v[:, :1].expand(-1, pad, -1, -1, -1)], 1) if pad else v)
            kv[layer] = (torch.cat(ks), torch.cat(vs))
        boxes = [b for s in states for b in s.plan.boxes]
        regions = None
        if any(boxes):
            latent = tuple(x // model.pipe.vae_scale_factor for x in states[0].plan.size)
            regions = RegionPlan(boxes, latent, P, model.device, len(model.unet.config.block_out_channels))
        added = None
        if conds[0].added is not None:
            added = {k: torch.cat([c.added[k] for c in conds]) for k in conds[0].added}
        timestep_cond = None
        if conds[0].timestep_cond is not None:
            timestep_cond = torch.cat([c.timestep_cond for c in conds])
        context = GenerationContext(kv, regions, _batch_image_lora(model, states))
        return cls(context, torch.cat([c.hidden for c in conds]), added, timestep_cond)


def _batch_image_lora(model, states: Sequence[DenoisingState]) -> ImageLora | None:
    """The image-side concepts of several states (one pool), ids padded with -1 (nothing) to the widest."""
    loras = [s.cond.context.image_lora for s in states]
    pools = {id(lora.pool): lora.pool for lora in loras if lora is not None}
    if not pools:
        return None
    if len(pools) > 1:
        raise ValueError("states batched together must read one adapter pool")
    pool = next(iter(pools.values()))
    S = max(lora.ids[model.layers[0]].shape[1] for lora in loras if lora is not None)
    ids, weights = {}, {}
    for layer in model.layers:
        parts_i, parts_w = [], []
        for s, lora in zip(states, loras):
            i = torch.full((s.rows, S), -1, dtype=torch.long, device=model.device)
            w = torch.zeros(s.rows, S, dtype=model.dtype, device=model.device)
            if lora is not None:
                width = lora.ids[layer].shape[1]
                i[:, :width], w[:, :width] = lora.ids[layer], lora.weights[layer]
            parts_i.append(i)
            parts_w.append(w)
        ids[layer], weights[layer] = torch.cat(parts_i), torch.cat(parts_w)
    return ImageLora(pool, ids, weights)


def step(model, states: Sequence[DenoisingState], batch: Batch | None = None) -> Batch:
    """One denoising step of every state with one UNet call; returns the batch (reuse it while the set of
    states does not change). Each state's rows carry its own timestep; its noise estimates are combined
    (:func:`aggregate_noise`, then ``guidance_rescale``) and its scheduler steps its latents."""
    if batch is None:
        batch = Batch.of(model, states)
    inputs, timesteps = [], []
    for s in states:
        t, copies = s.timesteps[s.step], s.plan.composite * s.plan.passes
        x = s.scheduler.scale_model_input(torch.cat([s.latents] * copies), t)
        if s.inpaint is not None and s.inpaint.masked_latents is not None:  # a 9-channel inpainting UNet
            x = torch.cat(
                [x, s.inpaint.mask.repeat(copies, 1, 1, 1), s.inpaint.masked_latents.repeat(copies, 1, 1, 1)], 1
            )
        inputs.append(x)
        timesteps.append(t.reshape(1).expand(s.rows))
    eps = unet_forward(
        model.unet, torch.cat(inputs), torch.cat(timesteps), batch.context, batch.hidden, batch.added,
        batch.timestep_cond, batch.attention_kwargs,
    )  # fmt: skip
    first = 0
    for s in states:
        plan = s.plan
        e = eps[first : first + s.rows].view(plan.composite * plan.passes, plan.images, *eps.shape[1:])
        first += s.rows
        noise = 0
        for part in e.view(plan.composite, -1, *e.shape[1:]):  # LoRA Composite: the mean of the guided estimates
            guided = aggregate_noise(part, plan.cfg, s.guidance_scale, plan.alpha, s.cond.masks)
            if plan.cfg and s.guidance_rescale > 0:
                guided = rescale_noise_cfg(guided, part[1], s.guidance_rescale)
            noise = noise + guided / plan.composite
        s.latents = s.scheduler.step(noise, s.timesteps[s.step], s.latents, **s.extra, return_dict=False)[0]
        if s.inpaint is not None and s.inpaint.image_latents is not None:  # a 4-channel UNet: keep the unmasked part
            kept = s.inpaint.image_latents
            if s.step < len(s.timesteps) - 1:
                kept = s.scheduler.add_noise(kept, s.inpaint.noise, torch.tensor([s.timesteps[s.step + 1]]))
            s.latents = (1 - s.inpaint.mask) * kept + s.inpaint.mask * s.latents
        s.step += 1
    return batch


def aggregate_noise(eps: Tensor, cfg: bool, guidance_scale: float, alpha: float, masks: Tensor | None) -> Tensor:
    """Combine one step's UNet outputs, eps (passes, images, C, h, w) = [uncond if cfg, global, region 1..U].

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

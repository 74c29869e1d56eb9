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

import copy
import dataclasses
from collections.abc import Sequence

import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg, retrieve_timesteps
from torch import Tensor

from .attention import GenerationContext, ImageLora, unet_forward
from .guidance import AttentionGuidance, GuidanceState, guide_latents, prepare_guidance
from .pool import Library
from .regions import Box, RegionPlan, latent_masks

__all__ = [
    "Batch",
    "Conditioning",
    "DenoisingState",
    "Plan",
    "aggregate_noise",
    "condition",
    "guide",
    "make_plan",
    "start",
    "step",
]


@dataclasses.dataclass
class Plan:
    """The UNet rows of one generation: ``composite`` × ``passes`` × ``images``, pass-major (uncond if cfg,
    global, regions); ``composite`` > 1 (LoRA Composite): one copy of those rows per concept, concept-major.

    texts: every distinct text (negatives, prompts, region prompts; None: no text, a zero embedding);
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

    @property
    def rows(self) -> int:
        return self.composite * self.passes * self.images

    @property
    def slots(self) -> int:
        """P, the prompt slots of every row."""
        return self.row_texts.shape[1]


def make_plan(
    prompts: Sequence[str],
    negatives: Sequence[str | None],
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


def condition(
    model,
    plan: Plan,
    library: Library,
    guidance_scale: float,
    power: float | None = None,
    norm: str | None = None,
    top_k: int | None = None,
    ewa: bool | str | None = None,
) -> Conditioning:
    """Encode the plan's texts, weight the library's concepts by EWA and compute every layer's text K/V
    once (``model``: a :class:`~lifelong_engine.LifelongPipeline`). Concept ids are checked here, once,
    by the public ``lora_kv_projection``; the denoising loop reuses them unchecked. A composite plan (LoRA
    Composite) needs one copy per concept of the library: copy k's texts get concept k alone, weight 1."""
    device, dtype = model.device, model.dtype
    real = [i for i, t in enumerate(plan.texts) if t is not None]
    encoded = model.encode_prompt([plan.texts[i] for i in real], library)
    n, (L, T, D) = len(plan.texts), encoded.per_layer.shape[1:]
    per_layer = encoded.per_layer.new_zeros(n, L, T, D)
    per_layer[real] = encoded.per_layer
    pooled = None
    if encoded.pooled is not None:
        pooled = encoded.pooled.new_zeros(n, encoded.pooled.shape[-1])
        pooled[real] = encoded.pooled
    positions: list[list[list[int]]] = [[] for _ in range(n)]
    eos = torch.zeros(n, dtype=torch.long)
    for j, i in enumerate(real):
        positions[i] = encoded.positions[j]
        eos[i] = int(encoded.eos[j])
    from .pipeline import ewa_variant

    G = len(library.adapters)
    if plan.composite > 1 and plan.composite != G:
        raise ValueError(f"a composite plan of {plan.composite} copies needs as many concepts; the library has {G}")
    variant = "sum" if plan.composite > 1 else ewa_variant(library.default_ewa if ewa is None else ewa)
    ewa = variant != "sum"
    ids, psi = model.concept_weights(encoded, power, norm, top_k if ewa else None, library, variant)
    if plan.composite > 1:  # text i of copy k = i // (n / K) mixes concept k alone
        copy_of = torch.arange(len(real), device=device) * plan.composite // len(real)
        ids = ids.gather(-1, copy_of[:, None, None].expand(-1, ids.shape[1], 1))
        psi = psi[..., :1]
    full_ids = torch.zeros(n, L, ids.shape[-1], dtype=torch.long, device=device)
    full_psi = torch.zeros(n, L, ids.shape[-1], device=device)
    full_ids[real] = ids
    full_psi[real] = psi if ewa else torch.ones_like(psi)
    # Every text uses its row owner's weights: a negative prompt is weighted like its image's prompt.
    text_owner = torch.arange(n)
    text_owner[plan.row_texts[:, 0]] = plan.owner
    full_ids, full_psi = full_ids[text_owner], full_psi[text_owner]

    pool = library.pool if G else None
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
    added = _added_cond(model, plan, pooled)
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
    )


def _added_cond(model, plan: Plan, pooled: Tensor | None) -> dict | None:
    """SDXL's added conditioning of every row: the pooled text of its global text and the time ids."""
    if not model.is_sdxl:
        return None
    height, width = plan.size
    projection = model.pipe.text_encoder_2.config.projection_dim
    time_ids = model.pipe._get_add_time_ids(
        (height, width), (0, 0), (height, width), dtype=model.dtype, text_encoder_projection_dim=projection
    )
    return {
        "text_embeds": pooled[plan.row_texts[:, 0]].to(model.device, model.dtype),
        "time_ids": time_ids.to(model.device).repeat(plan.rows, 1),
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
) -> DenoisingState:
    """The denoising state of a conditioned plan: ``scheduler`` (default: a copy of the pipeline's) set to
    ``num_inference_steps``, the initial latents (drawn with ``generator`` unless given), and the
    attention-guidance state when asked for."""
    scheduler = scheduler if scheduler is not None else copy.deepcopy(model.pipe.scheduler)
    timesteps, _ = retrieve_timesteps(scheduler, num_inference_steps, model.device)
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(0)
    height, width = plan.size
    latents = model.pipe.prepare_latents(
        plan.images, model.unet.config.in_channels, height, width, model.dtype, model.device, generator, latents
    )
    extra = model.pipe.prepare_extra_step_kwargs(generator, eta)
    state = DenoisingState(plan, cond, scheduler, timesteps, latents, extra, guidance_scale, guidance_rescale)
    if attention_guidance is not None:
        state.guidance = attention_guidance
        state.guide_state = prepare_guidance(model, attention_guidance, plan, cond)
        state.guided = attention_guidance.guided_steps(len(timesteps))
    return state


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

    @classmethod
    def of(cls, model, states: Sequence[DenoisingState]) -> Batch:
        if len(states) == 1:
            c = states[0].cond
            return cls(c.context, c.hidden, c.added, c.timestep_cond)
        conds = [s.cond for s in states]
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
        t = s.timesteps[s.step]
        inputs.append(s.scheduler.scale_model_input(torch.cat([s.latents] * (s.plan.composite * s.plan.passes)), t))
        timesteps.append(t.reshape(1).expand(s.rows))
    eps = unet_forward(
        model.unet, torch.cat(inputs), torch.cat(timesteps), batch.context, batch.hidden, batch.added,
        batch.timestep_cond,
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

"""Attention guidance against concept neglect (L2DM's inference-time guidances, DESIGN §5).

In the early denoising steps the latent is moved along the gradient of a loss on the cross-attention
maps of the concepts named in the prompt, as Attend-and-Excite (Chefer et al., 2023) does:

- **concept attention artist**: every concept must reach a high peak in its map,
  ``L_artist = max_c (1 − max_pixels A_c)``;
- **orthogonal attention**: the maps of different concepts should not overlap,
  ``L_orth = mean over pairs c < c' of cos(A_c, A_c')``.

A_c is the attention of the layers at one resolution (by default the finest with at most 16 cells per
side, Attend-and-Excite's 16×16 on SD-1.5), averaged over heads and layers, restricted to the prompt's
own tokens and re-normalised over them (softmax of 100·attention, BOS and EOS left out), summed over
the concept's token words, then smoothed by a 3×3 Gaussian (σ = 0.5). The latent update at step i of n
is ``z ← z − step_size · sqrt(1 − 0.5·i/(n−1)) · ∇_z (artist·L_artist + orthogonal·L_orth)``; the
guidance forward runs the UNet on the conditional rows only.

:class:`AttentionGuidance` holds the options, :func:`guidance_loss` the loss; :func:`prepare_guidance`
and :func:`guide_latents` are the denoising-loop part that the generation core
(:func:`lifelong_engine.generation.guide`) calls for the pipeline and the serving ``Engine``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .attention import GenerationContext, unet_forward
from .regions import layer_size

__all__ = ["AttentionGuidance", "GuidanceState", "guidance_loss", "guide_latents", "prepare_guidance", "select_layers"]


@dataclasses.dataclass(frozen=True)
class AttentionGuidance:
    """Options of :meth:`LifelongPipeline.__call__`'s ``attention_guidance``.

    artist, orthogonal: weights of the two losses (0 turns one off); step_size: the latent step
    (Attend-and-Excite: 20); steps: the guided steps, counted from the first (an int) or as a fraction
    of all steps (a float in (0, 1]; Attend-and-Excite: 25 of 50); layers: attn2 layer names whose maps
    are used (default: see the module docstring); max_side: the default layers' largest side in cells.
    refine: Attend-and-Excite's iterative refinement, step index → target peak: at those steps the update
    repeats (at most ``max_refine`` more times) until every concept's smoothed peak attention reaches the
    target (its artist loss ≤ 1 − target); Attend-and-Excite uses {0: 0.05, 10: 0.5, 20: 0.8} over 50
    steps. None (default): one update per guided step.
    """

    artist: float = 1.0
    orthogonal: float = 0.0
    step_size: float = 20.0
    steps: int | float = 0.5
    layers: Sequence[str] | None = None
    max_side: int = 16
    refine: Mapping[int, float] | None = None
    max_refine: int = 20

    def __post_init__(self):
        if self.artist < 0 or self.orthogonal < 0 or self.artist + self.orthogonal == 0:
            raise ValueError(
                f"attention guidance: artist and orthogonal must be ≥ 0, not both 0 (got {self.artist}, "
                f"{self.orthogonal})"
            )
        if not (self.step_size > 0 and math.isfinite(self.step_size)):
            raise ValueError(f"attention guidance: step_size must be a positive number, got {self.step_size}")
        if isinstance(self.steps, bool) or not (
            (isinstance(self.steps, int) and self.steps >= 1)
            or (isinstance(self.steps, float) and 0 < self.steps <= 1)
        ):
            raise ValueError(
                f"attention guidance: steps must be an int ≥ 1 or a fraction in (0, 1], got {self.steps!r}"
            )
        if self.max_side < 1:
            raise ValueError(f"attention guidance: max_side must be ≥ 1, got {self.max_side}")
        bad = [(k, v) for k, v in (self.refine or {}).items() if not (isinstance(k, int) and k >= 0 and 0 < v <= 1)]
        if bad or self.max_refine < 1:
            raise ValueError(
                "attention guidance: refine maps step indices ≥ 0 to target peaks in (0, 1] and max_refine ≥ 1, "
                f"got {bad or self.max_refine}"
            )

    def guided_steps(self, total: int) -> int:
        """How many of ``total`` denoising steps are guided."""
        n = self.steps if isinstance(self.steps, int) else math.ceil(self.steps * total)
        return min(n, total)

    def scale(self, step: int, total: int) -> float:
        """The step size at ``step`` of ``total`` (Attend-and-Excite's sqrt of linspace(1, 0.5))."""
        frac = step / (total - 1) if total > 1 else 0.0
        return self.step_size * math.sqrt(1.0 - 0.5 * frac)


def select_layers(cells: dict[str, int], latent_size: tuple[int, int], max_side: int) -> list[str]:
    """The attn2 layers (name → query cells) at the finest resolution whose sides are at most
    ``max_side`` cells (latent size halved per level, rounded up), or at the coarsest when none is."""

    small = [n for n in set(cells.values()) if max(layer_size(latent_size, n)) <= max_side]
    chosen = max(small) if small else min(cells.values())
    return [name for name, n in cells.items() if n == chosen]


def _smooth(maps: Tensor) -> Tensor:
    """3×3 Gaussian (σ = 0.5) over (..., h, w), reflect-padded (Attend-and-Excite's smoothing)."""
    x = torch.arange(3, dtype=maps.dtype, device=maps.device) - 1
    g = torch.exp(-(x**2) / (2 * 0.5**2))
    kernel = (g[:, None] * g[None]) / (g.sum() ** 2)
    lead, (h, w) = maps.shape[:-2], maps.shape[-2:]
    flat = maps.reshape(-1, 1, h, w)
    if h > 1 and w > 1:
        flat = F.conv2d(F.pad(flat, (1, 1, 1, 1), mode="reflect"), kernel[None, None])
    return flat.reshape(*lead, h, w)


def guidance_loss(
    maps: Tensor,
    size: tuple[int, int],
    eos: Tensor,
    positions: Sequence[Sequence[Sequence[int]]],
    artist: float,
    orthogonal: float,
) -> Tensor:
    """The guidance loss summed over images.

    maps: (images, N, T) attention probabilities averaged over heads and layers, N = h·w (``size``);
    eos: (images,) EOS position of each prompt; positions[i][c]: the token positions of concept c in
    prompt i (images without concepts add nothing; the orthogonal term needs two concepts).
    """
    h, w = size
    total = maps.new_zeros(())
    for i, concepts in enumerate(positions):
        concepts = [list(p) for p in concepts if p]
        if not concepts:
            continue
        e = int(eos[i])
        words = torch.softmax(100.0 * maps[i, :, 1:e].float(), dim=-1)  # (N, words): BOS and EOS left out
        per_concept = torch.stack([words[:, [p - 1 for p in pos]].sum(-1) for pos in concepts])  # (C, N)
        smoothed = _smooth(per_concept.view(-1, h, w)).flatten(1)
        if artist:
            total = total + artist * (1.0 - smoothed.max(dim=1).values).max()
        if orthogonal and len(concepts) > 1:
            unit = F.normalize(smoothed, dim=1)
            cos = unit @ unit.T
            pairs = torch.triu_indices(len(concepts), len(concepts), offset=1, device=cos.device)
            total = total + orthogonal * cos[pairs[0], pairs[1]].mean()
    return total


# ------------------------------------------------------------------------ in the denoising loop


@dataclasses.dataclass
class GuidanceState:
    """What the guidance forward of one generation needs: the conditional rows' context and UNet inputs,
    each image's concept token positions and EOS, the layers whose maps it reads (chosen at the first
    guided step when not given), the loss of each guided step so far (before its update) and the number
    of latent updates made (more than the steps when refinement repeats them)."""

    options: AttentionGuidance
    context: GenerationContext
    hidden: Tensor
    added: dict | None
    timestep_cond: Tensor | None
    positions: list[list[list[int]]]
    eos: Tensor
    layers: list[str] | None
    losses: list[float] = dataclasses.field(default_factory=list)
    updates: int = 0


def prepare_guidance(model, options: AttentionGuidance, plan, cond) -> GuidanceState:
    """The guidance state of a generation (``model``: a LifelongPipeline; ``plan``/``cond``: its
    :class:`~lifelong_engine.generation.Plan` and ``Conditioning``): the plan's conditional (global
    prompt) rows and each image's concept token positions, as the prompt encoder found them. Raises
    ValueError when no prompt names a concept, or for unknown layers."""
    images = plan.images
    rows = torch.arange(images) + (images if plan.cfg else 0)
    image_texts = plan.image_texts.tolist()
    positions = [cond.positions[t] for t in image_texts]
    if not any(positions):
        raise ValueError(
            "attention_guidance: no prompt names a concept with learned token rows; there is nothing to guide"
        )
    layers = list(options.layers) if options.layers is not None else None
    unknown = [layer for layer in layers or [] if layer not in model.layers]
    if unknown or layers == []:
        raise ValueError(f"attention_guidance: layers must be attn2 layers of this UNet, got {unknown or layers}")
    return GuidanceState(
        options,
        cond.context.rows_of(rows),
        cond.hidden[rows],
        {k: v[rows] for k, v in cond.added.items()} if cond.added is not None else None,
        cond.timestep_cond[rows] if cond.timestep_cond is not None else None,
        positions,
        cond.eos[plan.image_texts],
        layers,
    )


def guide_latents(lp, state: GuidanceState, latents: Tensor, t, step_size: float, scheduler=None, step=None) -> Tensor:
    """The guidance update of the latents at timestep t (denoising step index ``step``, for refinement):
    ``latents − step_size · ∇ loss``, the UNet run with autograd on the conditional rows (``scheduler``
    scales its input; default the pipeline's); repeated while a refinement target is not reached."""
    options = state.options
    target = (options.refine or {}).get(step) if step is not None else None
    for i in range(1 + (options.max_refine if target is not None else 0)):
        loss, artist, grad = _loss_and_grad(lp, state, latents, t, scheduler)
        if i == 0:
            state.losses.append(loss)
        elif artist <= 1.0 - target:
            break
        latents = (latents - step_size * grad).to(latents.dtype)
        state.updates += 1
    return latents


def _loss_and_grad(lp, state: GuidanceState, latents: Tensor, t, scheduler) -> tuple[float, float, Tensor]:
    """(loss, its artist part per image at most, ∇_latents loss) at the current latents."""
    ctx, options = state.context, state.options
    ctx.capture = frozenset(state.layers or lp.layers)  # every layer once, to choose the default ones
    ctx.maps.clear()
    with torch.enable_grad():
        z = latents.detach().requires_grad_(True)
        sample = (scheduler or lp.pipe.scheduler).scale_model_input(z, t)
        unet_forward(lp.unet, sample, t, ctx, state.hidden, state.added, state.timestep_cond)
        latent_size = tuple(latents.shape[-2:])
        if state.layers is None:
            cells = {layer: m.shape[1] for layer, m in ctx.maps.items()}
            state.layers = select_layers(cells, latent_size, options.max_side)
        maps = torch.stack([ctx.maps[layer].float() for layer in state.layers]).mean(0)
        size = layer_size(latent_size, maps.shape[1])
        loss = guidance_loss(maps, size, state.eos, state.positions, options.artist, options.orthogonal)
        grad = torch.autograd.grad(loss, z)[0] if loss.requires_grad else torch.zeros_like(z)
    with torch.no_grad():
        artist = max(
            float(guidance_loss(maps[i : i + 1], size, state.eos[i : i + 1], state.positions[i : i + 1], 1.0, 0.0))
            for i in range(len(state.positions))
        )
    ctx.maps.clear()
    return float(loss.detach()), artist, grad

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
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .attention import layer_size

__all__ = ["AttentionGuidance", "guidance_loss", "select_layers"]


@dataclasses.dataclass(frozen=True)
class AttentionGuidance:
    """Options of :meth:`LifelongPipeline.__call__`'s ``attention_guidance``.

    artist, orthogonal: weights of the two losses (0 turns one off); step_size: the latent step
    (Attend-and-Excite: 20); steps: the guided steps, counted from the first (an int) or as a fraction
    of all steps (a float in (0, 1]; Attend-and-Excite: 25 of 50); layers: attn2 layer names whose maps
    are used (default: see the module docstring); max_side: the default layers' largest side in cells.
    """

    artist: float = 1.0
    orthogonal: float = 0.0
    step_size: float = 20.0
    steps: int | float = 0.5
    layers: Sequence[str] | None = None
    max_side: int = 16

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

"""Regions of a generation: boxes painted into per-query prompt slots and latent masks (DESIGN §5).

A region is ``(prompt, (x0, y0, x1, y1))`` with the box normalised to [0, 1]. Everything that turns
boxes into cells lives here:

- :func:`box_mask`: the cells of a grid a box covers;
- :class:`RegionPlan`: for every UNet row, which prompt slot each query of each attention resolution
  reads (``region_ids`` of ``ops.regional_cross_attention``), painted once when the plan is built;
- :func:`latent_masks`: the disjoint masks m_u of the noise aggregation ``E* = α·E + Σ_u (1−α)·E_u ⊙ m_u``.

Painting runs on the host and the results are copied to the device once, so nothing here makes the
device wait during denoising; the region ids are checked against the slot count when painted.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["Box", "RegionPlan", "box_mask", "check_regions", "latent_masks", "layer_size"]

Box = tuple[float, float, float, float]


def check_regions(regions: Sequence[tuple[str, Box]] | None, max_regions: int) -> list[tuple[str, Box]]:
    """The regions as (prompt, box) with float boxes; ValueError naming the bad region otherwise."""
    regions = list(regions or [])
    if len(regions) > max_regions:
        raise ValueError(f"{len(regions)} regions given, the limit is {max_regions} (max_regions)")
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


def box_mask(box: Box, height: int, width: int, device=None) -> Tensor:
    """(height, width) bool: cells whose centre lies in the normalised box (x0, y0, x1, y1).
    A box smaller than one cell still marks the cell holding its centre. Built on the host (it reads
    its own values), then moved to ``device``."""
    x0, y0, x1, y1 = box
    ys = (torch.arange(height) + 0.5) / height
    xs = (torch.arange(width) + 0.5) / width
    mask = ((ys >= y0) & (ys < y1))[:, None] & ((xs >= x0) & (xs < x1))[None, :]
    if not mask.any():
        mask[min(int((y0 + y1) / 2 * height), height - 1), min(int((x0 + x1) / 2 * width), width - 1)] = True
    return mask.to(device)


def layer_size(latent_size: tuple[int, int], n_queries: int) -> tuple[int, int]:
    """(h, w) of a UNet layer with n_queries cells: the latent size divided by 2^k, rounded up."""
    h, w = latent_size
    for k in range(12):
        hl, wl = math.ceil(h / 2**k), math.ceil(w / 2**k)
        if hl * wl == n_queries:
            return hl, wl
    raise ValueError(f"no layer resolution of latents {h}x{w} has {n_queries} cells")


def _paint(boxes: list[list[tuple[int, Box]]], h: int, w: int) -> Tensor:
    """(rows, h·w) int32 on the host: per row, cells in a box get its slot (later boxes win), others 0."""
    ids = torch.zeros(len(boxes), h, w, dtype=torch.int32)
    for row, painted in enumerate(boxes):
        for slot, box in painted:
            ids[row] = torch.where(box_mask(box, h, w), slot, ids[row])
    return ids.flatten(1)


class RegionPlan:
    """Which prompt slot each image query reads, per UNet row, at every attention resolution.

    boxes[row] lists (slot, box) in painting order: cells in box read that prompt slot, later boxes win;
    cells in no box read slot 0 (the row's global prompt). latent_size: (h, w) of the latents; slots: the
    number of prompt slots P (ids are checked to lie in [0, P)). ``levels`` resolutions (the latent size
    halved 0..levels-1 times, rounded up) are painted at once; others on first use.
    """

    def __init__(
        self,
        boxes: list[list[tuple[int, Box]]],
        latent_size: tuple[int, int],
        slots: int,
        device=None,
        levels: int = 4,
    ):
        self.boxes, self.latent_size, self.slots, self.device = boxes, tuple(latent_size), slots, device
        bad = [s for painted in boxes for s, _ in painted if not 0 <= s < slots]
        if bad:
            raise ValueError(f"region plan: prompt slots {sorted(set(bad))} outside [0, {slots - 1}] (P = {slots})")
        self._ids: dict[int, Tensor] = {}
        h, w = self.latent_size
        for k in range(levels):
            hl, wl = math.ceil(h / 2**k), math.ceil(w / 2**k)
            self._ids.setdefault(hl * wl, _paint(boxes, hl, wl).to(device))

    @property
    def rows(self) -> int:
        return len(self.boxes)

    def layer_size(self, n_queries: int) -> tuple[int, int]:
        return layer_size(self.latent_size, n_queries)

    def region_ids(self, n_queries: int) -> Tensor:
        """(rows, n_queries) int32 prompt slot of each query at the layer with n_queries cells."""
        ids = self._ids.get(n_queries)
        if ids is None:
            ids = self._ids[n_queries] = _paint(self.boxes, *self.layer_size(n_queries)).to(self.device)
        return ids


def latent_masks(regions: Sequence[tuple[str, Box]], size: tuple[int, int], device, dtype) -> Tensor:
    """(U, 1, 1, h, w) m_u at latent resolution ``size``, disjoint (a later box wins, as in attention)."""
    h, w = size
    owner = _paint([[(u + 1, box) for u, (_, box) in enumerate(regions)]], h, w).view(h, w)
    masks = torch.stack([owner == u + 1 for u in range(len(regions))])
    return masks[:, None, None].to(device=device, dtype=dtype)

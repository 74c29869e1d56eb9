"""AdapterPool: concepts stacked into the tensors the fused ops gather from.

For every ``attn2`` layer and projection, the LoRA factors of G concepts become one
``a`` (G, r, Din) and one ``b`` (G, Dout, r) tensor, ranks zero-padded to the largest
rank r and each concept's scale alpha/rank folded into its ``b``, so
``ops.lora_kv_projection(..., ids, weights, scale=1.0)`` mixes any subset of concepts per
sample by id. A concept that does not adapt a layer or projection has zeros there.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from .concepts import ConceptAdapter

__all__ = ["AdapterPool"]


@dataclasses.dataclass
class AdapterPool:
    """names: the G concepts, in pool order (their ids); factors: (layer, proj) → (a, b)."""

    names: list[str]
    factors: dict[tuple[str, str], tuple[Tensor, Tensor]]

    @classmethod
    def build(
        cls,
        adapters: list[ConceptAdapter],
        widths: dict[tuple[str, str], tuple[int, int]],
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> AdapterPool:
        """Stack ``adapters``; ``widths`` maps (layer, proj) → (Din, Dout) of every projection the pool
        serves (K and V of every layer at least). Projections no adapter uses are left out."""
        rank = max((a.rank for a in adapters), default=1)
        factors = {}
        for (layer, proj), (din, dout) in widths.items():
            users = [(g, ad) for g, ad in enumerate(adapters) if proj in ad.projections and layer in ad.layers]
            if not users and proj not in ("to_k", "to_v"):
                continue
            a = torch.zeros(len(adapters), rank, din, device=device, dtype=dtype)
            b = torch.zeros(len(adapters), dout, rank, device=device, dtype=dtype)
            for g, ad in users:
                a_g, b_g = ad.factors(layer, proj)
                a[g, : ad.rank] = a_g.to(device=device, dtype=dtype)
                b[g, :, : ad.rank] = (b_g.to(device=device, dtype=torch.float32) * ad.scale).to(dtype)
            factors[layer, proj] = (a, b)
        return cls([a.name for a in adapters], factors)

    def __len__(self) -> int:
        return len(self.names)

    def get(self, layer: str, proj: str) -> tuple[Tensor, Tensor] | None:
        """(a, b) of one projection, or None when no concept adapts it."""
        return self.factors.get((layer, proj))

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for ab in self.factors.values() for t in ab)

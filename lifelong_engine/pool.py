"""AdapterPool: concepts stacked into the tensors the fused ops gather from, and the concepts of one generation.

For every ``attn2`` layer and projection the pool holds one ``a`` (capacity, r, Din) and one ``b``
(capacity, Dout, r) tensor: entry i is one concept's LoRA factors, zero-padded to the pool's rank r,
with its scale alpha/rank folded into ``b``, so ``ops.lora_kv_projection(..., ids, weights, scale=1.0)``
mixes any subset of entries per sample by id. A concept that does not adapt a layer or projection has
zeros there; an empty entry is all zeros. Next to the factors the pool keeps each entry's concept
embedding ê (L, D), computed once when the concept is placed, which EWA reads.

The pool has a fixed capacity and is written with :meth:`AdapterPool.place`; the pipeline builds one
sized to its library, the serving engine's :class:`~lifelong_engine.serving.ConceptCache` adds LRU,
pinning and a byte budget on top of one, and the trainer stacks the frozen concepts of a task in one.
:class:`Library` is what one generation reads: the concepts, the pool and each concept's entry in it.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from .concepts import ConceptAdapter

__all__ = ["AdapterPool", "Library"]

KV = ("to_k", "to_v")


class AdapterPool:
    """names: the concept in each entry (None: empty), their index is the id the ops gather by;
    factors: (layer, proj) → (a, b); embeddings: (L, capacity, D) float32 ê of each entry, or None."""

    def __init__(
        self,
        names: list[str | None],
        factors: dict[tuple[str, str], tuple[Tensor, Tensor]],
        embeddings: Tensor | None = None,
    ):
        self.names, self.factors, self.embeddings = list(names), dict(factors), embeddings

    @classmethod
    def empty(
        cls,
        widths: dict[tuple[str, str], tuple[int, int]],
        capacity: int,
        rank: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        projections: tuple[str, ...] = KV,
        embedding_shape: tuple[int, int] | None = None,
    ) -> AdapterPool:
        """A pool of ``capacity`` empty entries of rank ``rank``; ``widths`` maps (layer, proj) → (Din, Dout)
        of the UNet's projections, of which those in ``projections`` get factors; ``embedding_shape``:
        (L, D) of the concept embeddings ê, None for a pool without them."""
        factors = {
            (layer, proj): (
                torch.zeros(capacity, rank, din, device=device, dtype=dtype),
                torch.zeros(capacity, dout, rank, device=device, dtype=dtype),
            )
            for (layer, proj), (din, dout) in widths.items()
            if proj in projections
        }
        embeddings = None
        if embedding_shape is not None:
            L, D = embedding_shape
            embeddings = torch.zeros(L, capacity, D, device=device, dtype=torch.float32)
        return cls([None] * capacity, factors, embeddings)

    @classmethod
    def build(
        cls,
        adapters: list[ConceptAdapter],
        widths: dict[tuple[str, str], tuple[int, int]],
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        embeddings: list[Tensor] | None = None,
    ) -> AdapterPool:
        """A pool holding exactly ``adapters`` (ids 0..G-1) at their largest rank, with K and V and every
        other projection of ``widths`` some adapter adapts; ``embeddings``: each adapter's ê (L, D)."""
        used = {p for a in adapters for p in a.projections}
        projections = tuple(p for p in dict.fromkeys(proj for _, proj in widths) if p in KV or p in used)
        shape = tuple(embeddings[0].shape) if embeddings else None
        rank = max((a.rank for a in adapters), default=1)
        pool = cls.empty(widths, len(adapters), rank, device, dtype, projections, shape)
        for i, adapter in enumerate(adapters):
            pool.place(i, adapter, embeddings[i] if embeddings else None)
        return pool

    # ------------------------------------------------------------------ layout

    def __len__(self) -> int:
        return len(self.names)

    @property
    def capacity(self) -> int:
        return len(self.names)

    @property
    def rank(self) -> int:
        return next(iter(self.factors.values()))[0].shape[1] if self.factors else 0

    @property
    def projections(self) -> set[str]:
        return {proj for _, proj in self.factors}

    def fits(self, adapter: ConceptAdapter) -> bool:
        """True when ``adapter`` can be placed: its rank and projections are within the pool's."""
        return adapter.rank <= self.rank and set(adapter.projections) <= self.projections

    def get(self, layer: str, proj: str) -> tuple[Tensor, Tensor] | None:
        """(a, b) of one projection, or None when the pool holds none for it."""
        return self.factors.get((layer, proj))

    @property
    def image_side(self) -> bool:
        """True when the pool holds factors of to_q or to_out.0 (applied to image tokens every step)."""
        return bool(self.projections - set(KV))

    @property
    def entry_bytes(self) -> int:
        """Bytes of one entry: its factors of every layer and projection, and its ê."""
        factors = sum(t[0].numel() * t.element_size() for ab in self.factors.values() for t in ab)
        emb = self.embeddings[:, 0].numel() * 4 if self.embeddings is not None else 0
        return factors + emb

    @property
    def nbytes(self) -> int:
        return self.entry_bytes * self.capacity

    # ----------------------------------------------------------------- writing

    def place(self, index: int, adapter: ConceptAdapter, embedding: Tensor | None = None) -> None:
        """Write ``adapter`` (and its ê (L, D)) into entry ``index``, replacing what was there."""
        if not 0 <= index < self.capacity:
            raise IndexError(f"pool entry {index} outside [0, {self.capacity - 1}]")
        if not self.fits(adapter):
            raise ValueError(
                f"concept {adapter.name!r} (rank {adapter.rank}, {adapter.projections}) does not fit this pool "
                f"(rank {self.rank}, {sorted(self.projections)})"
            )
        layers = set(adapter.layers)
        for (layer, proj), (a, b) in self.factors.items():
            a[index].zero_()
            b[index].zero_()
            if layer in layers and proj in adapter.projections:
                fa, fb = adapter.factors(layer, proj)
                a[index, : adapter.rank] = fa.to(a.device, a.dtype)
                b[index, :, : adapter.rank] = (fb.to(b.device, torch.float32) * adapter.scale).to(b.dtype)
        if self.embeddings is not None:
            if embedding is None:
                raise ValueError(f"concept {adapter.name!r}: this pool keeps concept embeddings; none given")
            self.embeddings[:, index] = embedding.to(self.embeddings.device, torch.float32)
        self.names[index] = adapter.name

    def clear(self, index: int) -> None:
        """Empty entry ``index`` (zeros; ids that point at it add nothing)."""
        for a, b in self.factors.values():
            a[index].zero_()
            b[index].zero_()
        self.names[index] = None


@dataclasses.dataclass
class Library:
    """The concepts one generation uses: adapters (in order), the pool holding them and each one's
    entry in it (G,). LifelongPipeline's own library is :meth:`LifelongPipeline.library`; the serving
    engine's cache builds one per request."""

    adapters: list[ConceptAdapter]
    pool: AdapterPool | None
    ids: Tensor

    @property
    def embeddings(self) -> Tensor | None:
        """(L, G, D) float32: each concept's ê, in library order."""
        if not self.adapters or self.pool is None or self.pool.embeddings is None:
            return None
        return self.pool.embeddings[:, self.ids]

    @property
    def tokens(self) -> dict[str, ConceptAdapter]:
        return {c.token: c for c in self.adapters}

    @property
    def default_ewa(self) -> str:
        """The merge the concepts ask for: their ``ewa`` metadata ("paper", "official" or "sum"; a CIDM
        concept without it: "paper", any other method: "sum") when all agree, else "sum"."""
        asked = {c.metadata.get("ewa", "paper" if c.method == "cidm" else "sum") for c in self.adapters}
        return asked.pop() if len(asked) == 1 else "sum"

    @property
    def image_side(self) -> bool:
        """True when some concept adapts to_q or to_out (applied to image tokens at every step)."""
        return any(p not in KV for c in self.adapters for p in c.projections)

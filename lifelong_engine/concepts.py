"""ConceptAdapter: one learned concept (CIDM's task learner Z_g).

A concept is what one task teaches the model: LoRA factors on the cross-attention
projections of every ``attn2`` layer (K and V always; Q and out optionally), the concept's
layer-wise token embeddings (one row per token word per layer), and its per-layer concept
embedding ê^l used by EWA (DESIGN §2, §3.3).

Tensors are keyed the way peft/diffusers name LoRA weights, without a prefix:
``{layer}.{proj}.lora_A.weight`` (r × Din) and ``{layer}.{proj}.lora_B.weight`` (Dout × r),
with ``layer`` a UNet module path such as ``down_blocks.0.attentions.0.transformer_blocks.0.attn2``
and ``proj`` one of ``to_k``, ``to_v``, ``to_q``, ``to_out.0``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Iterator

import torch
from torch import Tensor

__all__ = ["ConceptAdapter", "validate_name", "factors_from_delta", "PROJECTIONS"]

PROJECTIONS = ("to_k", "to_v", "to_q", "to_out.0")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+@-]*")  # fullmatch: "$" would allow a trailing newline
MAX_NAME = 128
# Reserved keys of the safetensors layout (see ConceptAdapter.to_safetensors).
_TOKEN_KEY, _CONCEPT_KEY = "token_embeddings", "concept_embeddings"


def validate_name(name: str, what: str = "concept name") -> str:
    """A name that is safe as a file or directory name: letters, digits and ``_ . + @ -``,
    not starting with a punctuation mark, at most 128 characters (so no paths, no ``..``)."""
    if not isinstance(name, str):
        raise TypeError(f"{what} must be a string, got {type(name).__name__}")
    if not 0 < len(name) <= MAX_NAME:
        raise ValueError(f"{what} {name!r}: must have 1 to {MAX_NAME} characters, got {len(name)}")
    if not _NAME.fullmatch(name) or ".." in name:
        raise ValueError(
            f"{what} {name!r}: use letters, digits and _ . + @ - only, starting with a letter or digit (no paths)"
        )
    return name


@dataclasses.dataclass(eq=False)
class ConceptAdapter:
    """One learned concept.

    name: identifier in a store (validated, no paths); token: how prompts name it (``<my-dog>``);
    words: the token words it expands to in the text encoder, one learned embedding row each;
    class_word: the class it belongs to (``dog``), if any; layers: the ``attn2`` module paths it
    adapts, in UNet order (down → mid → up); lora: ``{layer}.{proj}.lora_A/B.weight`` → tensor;
    rank, alpha: LoRA rank and alpha (scale = alpha / rank); token_embeddings: (L, len(words), D)
    layer-wise token rows, (1, len(words), D) when every layer shares them (textual inversion), or None;
    concept_embeddings: (L, D) ê^l per layer, or None;
    base_fingerprint: identity of the base model it was learned on; method: training method;
    metadata: free string key/values.
    """

    name: str
    token: str
    words: list[str]
    layers: list[str]
    lora: dict[str, Tensor]
    rank: int
    alpha: float | None = None
    class_word: str | None = None
    token_embeddings: Tensor | None = None
    concept_embeddings: Tensor | None = None
    base_fingerprint: str = ""
    method: str = ""
    metadata: dict[str, str] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        validate_name(self.name)
        if self.alpha is None:
            self.alpha = float(self.rank)
        self.words = list(self.words)
        self.layers = list(self.layers)
        if not self.token or not self.words:
            raise ValueError(f"concept {self.name!r}: token and words must be non-empty")
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"concept {self.name!r}: rank must be a positive int, got {self.rank!r}")
        if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"concept {self.name!r}: alpha must be a finite number > 0, got {self.alpha!r}")
        for what, t in [
            *self.lora.items(),
            (_TOKEN_KEY, self.token_embeddings),
            (_CONCEPT_KEY, self.concept_embeddings),
        ]:
            if t is not None and (not isinstance(t, Tensor) or not t.is_floating_point()):
                kind = t.dtype if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(f"concept {self.name!r}: {what} must be a real floating-point tensor, got {kind}")
        for key, value in self.metadata.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise TypeError(f"concept {self.name!r}: metadata must map str to str, got {key!r}: {value!r}")
        self._check_lora()
        n_layers = len(self.layers)
        if self.token_embeddings is not None and (
            self.token_embeddings.ndim != 3
            or self.token_embeddings.shape[0] not in (n_layers, 1)
            or self.token_embeddings.shape[1] != len(self.words)
        ):
            raise ValueError(
                f"concept {self.name!r}: token_embeddings has shape {tuple(self.token_embeddings.shape)}; "
                f"expected (L={n_layers} or 1, words={len(self.words)}, D)"
            )
        if self.concept_embeddings is not None and (
            self.concept_embeddings.ndim != 2 or self.concept_embeddings.shape[0] != n_layers
        ):
            raise ValueError(
                f"concept {self.name!r}: concept_embeddings has shape {tuple(self.concept_embeddings.shape)}; "
                f"expected (L={n_layers}, D)"
            )

    def _check_lora(self) -> None:
        layers = set(self.layers)
        for key, t in self.lora.items():
            layer, proj, kind = _split_key(key)
            if layer not in layers:
                raise ValueError(f"concept {self.name!r}: lora key {key!r} names a layer not in layers")
            if proj not in PROJECTIONS or kind not in ("lora_A", "lora_B"):
                raise ValueError(
                    f"concept {self.name!r}: lora key {key!r}: expected {{layer}}.{{proj}}.lora_A/B.weight"
                )
            if (
                t.ndim != 2
                or (kind == "lora_A" and t.shape[0] != self.rank)
                or (kind == "lora_B" and t.shape[1] != self.rank)
            ):
                raise ValueError(f"concept {self.name!r}: {key} has shape {tuple(t.shape)}; rank is {self.rank}")
            other = key.replace(kind, "lora_B" if kind == "lora_A" else "lora_A")
            if other not in self.lora:
                raise ValueError(f"concept {self.name!r}: {key} has no matching {other}")
        for layer in self.layers:
            for proj in ("to_k", "to_v"):
                if _key(layer, proj, "lora_A") not in self.lora:
                    raise ValueError(f"concept {self.name!r}: layer {layer!r} has no {proj} LoRA factors")

    # ------------------------------------------------------------------ access

    @property
    def scale(self) -> float:
        """LoRA scale alpha / rank."""
        return float(self.alpha) / self.rank

    @property
    def projections(self) -> list[str]:
        """The projections this concept adapts, in PROJECTIONS order."""
        return [p for p in PROJECTIONS if _key(self.layers[0], p, "lora_A") in self.lora] if self.layers else []

    def factors(self, layer: str, proj: str) -> tuple[Tensor, Tensor]:
        """(lora_A (r, Din), lora_B (Dout, r)) of one projection of one layer."""
        return self.lora[_key(layer, proj, "lora_A")], self.lora[_key(layer, proj, "lora_B")]

    def delta(self, layer: str, proj: str) -> Tensor:
        """The dense weight delta scale · B·A of one projection, (Dout, Din)."""
        a, b = self.factors(layer, proj)
        return self.scale * (b @ a)

    def tensors(self) -> Iterator[Tensor]:
        yield from self.lora.values()
        for t in (self.token_embeddings, self.concept_embeddings):
            if t is not None:
                yield t

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> ConceptAdapter:
        """A copy on another device/dtype (floating tensors only change dtype)."""

        def move(t: Tensor | None) -> Tensor | None:
            if t is None:
                return None
            return t.to(device=device, dtype=dtype if t.is_floating_point() else None)

        return dataclasses.replace(
            self,
            lora={k: move(v) for k, v in self.lora.items()},
            token_embeddings=move(self.token_embeddings),
            concept_embeddings=move(self.concept_embeddings),
            metadata=dict(self.metadata),
        )

    def is_finite(self) -> bool:
        """True when no tensor holds NaN or inf (check before merging, as peft does)."""
        return all(bool(torch.isfinite(t).all()) for t in self.tensors() if t.is_floating_point())

    # ------------------------------------------------------------ serialisation

    def to_safetensors(self) -> tuple[dict[str, Tensor], dict[str, str]]:
        """(tensors, string metadata) for ``safetensors.torch.save_file``."""
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.lora.items()}
        if self.token_embeddings is not None:
            tensors[_TOKEN_KEY] = self.token_embeddings.detach().contiguous().cpu()
        if self.concept_embeddings is not None:
            tensors[_CONCEPT_KEY] = self.concept_embeddings.detach().contiguous().cpu()
        header = {
            "format": "lifelong-engine/concept/v1",
            "name": self.name,
            "token": self.token,
            "words": json.dumps(self.words),
            "layers": json.dumps(self.layers),
            "rank": str(self.rank),
            "alpha": repr(float(self.alpha)),
            "class_word": self.class_word or "",
            "base_fingerprint": self.base_fingerprint,
            "method": self.method,
            "metadata": json.dumps(self.metadata, sort_keys=True),
        }
        return tensors, header

    @classmethod
    def from_safetensors(cls, tensors: dict[str, Tensor], header: dict[str, str]) -> ConceptAdapter:
        """Inverse of :meth:`to_safetensors`; raises ValueError on a header it does not know."""
        if header.get("format") != "lifelong-engine/concept/v1":
            raise ValueError(f"not a lifelong-engine concept file (format={header.get('format')!r})")
        tensors = dict(tensors)
        return cls(
            name=header["name"],
            token=header["token"],
            words=json.loads(header["words"]),
            layers=json.loads(header["layers"]),
            rank=int(header["rank"]),
            alpha=float(header["alpha"]),
            class_word=header["class_word"] or None,
            token_embeddings=tensors.pop(_TOKEN_KEY, None),
            concept_embeddings=tensors.pop(_CONCEPT_KEY, None),
            lora=tensors,
            base_fingerprint=header["base_fingerprint"],
            method=header["method"],
            metadata=json.loads(header["metadata"]),
        )


def factors_from_delta(delta: Tensor, rank: int | None = None) -> tuple[Tensor, Tensor]:
    """Exact LoRA factors (A (r, Din), B (Dout, r)) of a dense delta (Dout, Din), r = min(Dout, Din),
    by SVD in float64: B·A = delta. Returned in delta's dtype. ``rank`` ≥ r zero-pads the factors to
    that rank (still exact), so the layers of one adapter, of different widths, share a rank."""
    u, s, vh = torch.linalg.svd(delta.detach().double(), full_matrices=False)
    a, b = vh.to(delta.dtype), (u * s).to(delta.dtype)
    pad = (rank or a.shape[0]) - a.shape[0]
    if pad < 0:
        raise ValueError(f"factors_from_delta: rank {rank} < the delta's exact rank {a.shape[0]}")
    return torch.nn.functional.pad(a, (0, 0, 0, pad)), torch.nn.functional.pad(b, (0, pad))


def _key(layer: str, proj: str, kind: str) -> str:
    return f"{layer}.{proj}.{kind}.weight"


def _split_key(key: str) -> tuple[str, str, str]:
    """'{layer}.{proj}.{lora_A|lora_B}.weight' → (layer, proj, kind)."""
    head, _, kind_w = key.rpartition(".lora_")
    kind = "lora_" + kind_w.removesuffix(".weight")
    for proj in PROJECTIONS:
        if head.endswith("." + proj):
            return head[: -len(proj) - 1], proj, kind
    return head, "", kind

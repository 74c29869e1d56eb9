"""L2DM's task-aware memory: the rainbow memory bank (DESIGN §4, ``l2dm``).

A standalone component on feature vectors; it knows nothing of the engine. The trainer encodes
images (a CLIP or small image encoder, or VAE latents flattened) into 1-D features and hands the
bank :class:`MemorySample` s; the bank keeps, for each past concept, the few samples to replay.

Mapping to the paper (Sun et al., "Create Your World: Lifelong Text-to-Image Diffusion", §3.3.1):

- long-term memory bank M (kept samples of tasks 1..k−1)   → ``samples()``; ≤ ``capacity_per_concept``
  per concept;
- short-term memory bank M̂ (samples generated for past tasks while learning task k)
                                                           → ``propose()`` / ``pending()``;
- recasting M̂ into M by the score function                → ``consolidate()``;
- CLIP feature f, prompt p, generated image x̂              → ``feature``, ``caption``, ``image``;
- trade-off β > 0 of the two score terms                   → ``distinct_weight``;
- replay of M in the first term of the TAME loss (eq. 4)   → ``replay_batch()``; its weight μ is
  the trainer's;
- per-concept weights of elastic concept distillation      → ``concept_similarity()``.

Score. All features are L2-normalised and compared by cosine similarity (in float64, on CPU).
At ``consolidate()`` the pool is every kept sample and every pending candidate, of every concept.
For a sample a of concept c, with own(a) the other pool samples of c and other(a) the pool samples
of every other concept:

    representativeness(a) = mean_{b ∈ own(a)} sim(f_a, f_b)          (1 when own(a) is empty)
    distinctness(a)       = 1 − max_{b ∈ other(a)} sim(f_a, f_b)     (1 when other(a) is empty)
    score(a)              = representativeness(a) + distinct_weight · distinctness(a)

and each concept keeps its ``capacity_per_concept`` best-scoring pool samples, so kept samples are
rescored and can be displaced once another concept arrives. Ties keep the older sample (kept
before pending, then order of arrival). The notes on the paper keep its score formula only as an
image; their text says it weighs a candidate's similarity to the long-term samples of its own task
against its similarity to the generated samples of the other tasks, traded off by β. Here the
distinctness term takes the max over the other concepts' samples rather than a mean: one candidate
that lies on another concept's cluster is what blends two concepts on replay, and a mean over all
the other concepts would dilute it.

Bad arguments raise ValueError naming them (TypeError for a wrong type: a sample that is not a
MemorySample, a feature that is not a floating-point tensor, a generator that is not a torch.Generator).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["MemorySample", "RainbowMemory"]

_FORMAT = "lifelong-engine/rainbow-memory/v1"
_PIL_MODES = ("L", "RGB", "RGBA")  # modes whose uint8 array round-trips through PIL.Image.fromarray


@dataclasses.dataclass(eq=False)
class MemorySample:
    """One image of a concept as the memory sees it.

    concept: the concept's name; image: the caller's payload (a latent tensor, a PIL image, or
    None), never inspected except to save it; caption: the prompt it was generated from;
    feature: (D,), its image feature; score: filled by :meth:`RainbowMemory.consolidate`
    (NaN until then).
    """

    concept: str
    image: Any
    caption: str
    feature: Tensor
    score: float = math.nan


class RainbowMemory:
    """L2DM's rainbow memory bank: a short-term bank of candidates and a long-term bank of the
    ``capacity_per_concept`` samples per past concept that best represent it and are most distinct
    from the other concepts (see the module docstring for the score).

    Typical use while learning task k: ``propose`` images generated for each past concept,
    ``consolidate``, then draw ``replay_batch`` es for the replay loss and take
    ``concept_similarity`` of the new concept as the distillation weights.
    The bank keeps a detached CPU copy of each feature, in its dtype; payloads are kept as given.
    """

    def __init__(self, capacity_per_concept: int = 4, distinct_weight: float = 1.0) -> None:
        if isinstance(capacity_per_concept, bool) or not isinstance(capacity_per_concept, int):
            raise ValueError(f"capacity_per_concept must be an integer >= 1, got {capacity_per_concept!r}")
        if capacity_per_concept < 1:
            raise ValueError(f"capacity_per_concept must be >= 1, got {capacity_per_concept}")
        if isinstance(distinct_weight, bool) or not isinstance(distinct_weight, (int, float)):
            raise ValueError(f"distinct_weight must be a finite number >= 0, got {distinct_weight!r}")
        if not (math.isfinite(distinct_weight) and distinct_weight >= 0):
            raise ValueError(f"distinct_weight must be a finite number >= 0, got {distinct_weight}")
        self.capacity_per_concept = capacity_per_concept
        self.distinct_weight = float(distinct_weight)
        self._long: dict[str, list[MemorySample]] = {}
        self._short: dict[str, list[MemorySample]] = {}
        self._dim: int | None = None

    # ------------------------------------------------------------------- views

    @property
    def concepts(self) -> list[str]:
        """Concepts in the long-term bank, in order of arrival."""
        return list(self._long)

    @property
    def dim(self) -> int | None:
        """D, the feature size fixed by the first sample proposed (None before)."""
        return self._dim

    def __len__(self) -> int:
        """Number of kept samples in the long-term bank."""
        return sum(len(v) for v in self._long.values())

    def __repr__(self) -> str:
        return (
            f"RainbowMemory(capacity_per_concept={self.capacity_per_concept}, distinct_weight={self.distinct_weight}, "
            f"concepts={len(self._long)}, kept={len(self)}, pending={len(self.pending())})"
        )

    def samples(self, concept: str | None = None) -> list[MemorySample]:
        """Kept samples of ``concept`` (best score first), or of every concept when None."""
        return self._view("samples", self._long, concept)

    def pending(self, concept: str | None = None) -> list[MemorySample]:
        """Candidates in the short-term bank waiting for :meth:`consolidate`."""
        return self._view("pending", self._short, concept)

    def _view(self, fn: str, bank: dict[str, list[MemorySample]], concept: str | None) -> list[MemorySample]:
        if concept is None:
            return [s for group in bank.values() for s in group]
        if concept not in bank:
            raise ValueError(f"{fn}: unknown concept {concept!r}; known: {list(bank)}")
        return list(bank[concept])

    # ------------------------------------------------------------------ update

    def propose(self, concept: str, samples: Sequence[MemorySample]) -> None:
        """Put candidates for ``concept`` (e.g. images generated for a past concept) in the short-term bank.

        samples: non-empty, each with ``sample.concept == concept`` and a finite, non-zero (D,) feature.
        The whole call is validated before anything is stored.
        """
        fn = "propose"
        _check_concept(fn, concept)
        if len(samples) == 0:
            raise ValueError(f"{fn}: samples for concept {concept!r} is empty; expected at least one MemorySample")
        dim = self._dim
        stored = []
        for i, s in enumerate(samples):
            name = f"samples[{i}]"
            if not isinstance(s, MemorySample):
                raise TypeError(f"{fn}: {name} must be a MemorySample, got {type(s).__name__}")
            if s.concept != concept:
                raise ValueError(f"{fn}: {name}.concept is {s.concept!r}; expected {concept!r}, the concept proposed")
            if not isinstance(s.caption, str):
                raise ValueError(f"{fn}: {name}.caption must be a str, got {type(s.caption).__name__}")
            feature = _check_feature(fn, f"{name}.feature", s.feature, dim)
            dim = feature.shape[0]
            stored.append(dataclasses.replace(s, feature=feature, score=math.nan))
        self._dim = dim
        self._short.setdefault(concept, []).extend(stored)

    def consolidate(self) -> None:
        """Score every kept and pending sample (module docstring), keep the best
        ``capacity_per_concept`` of each concept in the long-term bank, and clear the short-term bank.
        """
        order = list(self._long) + [c for c in self._short if c not in self._long]
        groups = [self._long.get(c, []) + self._short.get(c, []) for c in order]
        pool = [s for g in groups for s in g]
        self._short = {}
        if not pool:
            return
        owner = torch.tensor([k for k, g in enumerate(groups) for _ in g])
        scores = _rainbow_scores(_unit_features(pool), owner, self.distinct_weight)
        new_long, start = {}, 0
        for concept, group in zip(order, groups):
            idx = range(start, start + len(group))
            start += len(group)
            best = sorted(idx, key=lambda i: -scores[i])[: self.capacity_per_concept]  # stable: older wins ties
            new_long[concept] = [dataclasses.replace(pool[i], score=scores[i]) for i in best]
        self._long = new_long

    # ------------------------------------------------------------------- use

    def replay_batch(
        self, n: int, generator: torch.Generator, concepts: Iterable[str] | None = None
    ) -> list[MemorySample]:
        """n kept samples balanced across concepts: round-robin over the concepts in a random order,
        samples drawn without replacement within a concept until it runs out, then reshuffled.

        concepts: restrict to these (default: every concept in the bank). Per-concept counts differ by
        at most one; the same generator state gives the same batch.
        """
        fn = "replay_batch"
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"{fn}: n must be an integer >= 0, got {n!r}")
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"{fn}: generator must be a torch.Generator, got {type(generator).__name__}")
        names = self.concepts if concepts is None else list(concepts)
        for c in names:
            if c not in self._long:
                raise ValueError(f"{fn}: unknown concept {c!r}; known: {self.concepts}")
        if n == 0:
            return []
        if not names:
            raise ValueError(
                f"{fn}: the long-term bank has no concepts to replay (call propose and consolidate first)"
            )
        perm = torch.randperm(len(names), generator=generator).tolist()
        order = [names[i] for i in perm]
        streams: dict[str, list[int]] = {c: [] for c in order}
        batch = []
        for i in range(n):
            c = order[i % len(order)]
            kept = self._long[c]
            if not streams[c]:
                streams[c] = torch.randperm(len(kept), generator=generator).tolist()[::-1]
            batch.append(kept[streams[c].pop()])
        return batch

    def concept_similarity(self, features: Tensor, concepts: Iterable[str] | None = None) -> dict[str, float]:
        """Weights of the past concepts for elastic concept distillation.

        features: (D,) or (m, D), features of the new concept's images. Each side is summarised by
        the mean of its L2-normalised features (a prototype); the weight of past concept l is
        max(0, cos(prototype_new, prototype_l)) ∈ [0, 1]: a concept unrelated to the new one
        (orthogonal or opposite) gets 0, one like it up to 1. Weights are not normalised, so they do
        not shrink as concepts accumulate. concepts: restrict to these (default: all kept concepts).
        """
        fn = "concept_similarity"
        if not isinstance(features, Tensor):
            raise TypeError(f"{fn}: features must be a torch.Tensor (D,) or (m, D), got {type(features).__name__}")
        if features.ndim not in (1, 2) or features.shape[0] == 0:
            raise ValueError(f"{fn}: features must be (D,) or (m, D) with m >= 1, got shape {tuple(features.shape)}")
        rows = features.reshape(-1, features.shape[-1])
        checked = [_check_feature(fn, f"features[{i}]", r, self._dim) for i, r in enumerate(rows.unbind(0))]
        names = self.concepts if concepts is None else list(concepts)
        for c in names:
            if c not in self._long:
                raise ValueError(f"{fn}: unknown concept {c!r}; known: {self.concepts}")
        new = _prototype(torch.stack([_unit(f) for f in checked]))
        return {c: max(0.0, float(_cos(new, _prototype(_unit_features(self._long[c]))))) for c in names}

    # ------------------------------------------------------------ checkpoint

    def state_dict(self) -> tuple[dict[str, Tensor], dict[str, str]]:
        """(tensors, string metadata), ready for ``safetensors.torch.save_file``; both banks and the config.

        Tensors: ``{bank}.{i}.feature`` and, for tensor or PIL payloads, ``{bank}.{i}.image``
        (bank = long or short), detached contiguous CPU copies. A PIL image (mode L, RGB or RGBA)
        is saved as its uint8 (H, W[, C]) array and comes back as a PIL image; a None payload comes
        back as None; any other payload raises ValueError.
        """
        tensors: dict[str, Tensor] = {}
        header = {
            "format": _FORMAT,
            "capacity_per_concept": str(self.capacity_per_concept),
            "distinct_weight": repr(self.distinct_weight),
            "dim": "" if self._dim is None else str(self._dim),
        }
        for bank, samples in (("long", self.samples()), ("short", self.pending())):
            entries = []
            for i, s in enumerate(samples):
                key = f"{bank}.{i}"
                tensors[f"{key}.feature"] = s.feature.detach().cpu().contiguous().clone()
                kind, payload = _pack_image(f"{key}.image (concept {s.concept!r})", s.image)
                if payload is not None:
                    tensors[f"{key}.image"] = payload
                score = None if math.isnan(s.score) else s.score
                entries.append({"concept": s.concept, "caption": s.caption, "score": score, "image": kind})
            header[bank] = json.dumps(entries)
        return tensors, header

    def load_state_dict(self, tensors: dict[str, Tensor], header: dict[str, str]) -> None:
        """Inverse of :meth:`state_dict`: replaces both banks and the config with the saved ones."""
        fn = "load_state_dict"
        if header.get("format") != _FORMAT:
            raise ValueError(
                f"{fn}: not a rainbow memory state (format={header.get('format')!r}; expected {_FORMAT!r})"
            )
        fresh = RainbowMemory(int(header["capacity_per_concept"]), float(header["distinct_weight"]))
        dim = int(header["dim"]) if header["dim"] else None
        banks: dict[str, dict[str, list[MemorySample]]] = {"long": {}, "short": {}}
        for bank, groups in banks.items():
            for i, e in enumerate(json.loads(header[bank])):
                key = f"{bank}.{i}"
                if f"{key}.feature" not in tensors:
                    raise ValueError(f"{fn}: tensor {key}.feature is missing")
                _check_concept(fn, e["concept"])
                feature = _check_feature(fn, f"{key}.feature", tensors[f"{key}.feature"], dim)
                dim = feature.shape[0]
                image = _unpack_image(fn, f"{key}.image", e["image"], tensors.get(f"{key}.image"))
                score = math.nan if e["score"] is None else float(e["score"])
                groups.setdefault(e["concept"], []).append(
                    MemorySample(e["concept"], image, e["caption"], feature, score)
                )
        self.capacity_per_concept, self.distinct_weight = fresh.capacity_per_concept, fresh.distinct_weight
        self._long, self._short, self._dim = banks["long"], banks["short"], dim

    @classmethod
    def from_state_dict(cls, tensors: dict[str, Tensor], header: dict[str, str]) -> RainbowMemory:
        """A new bank restored from :meth:`state_dict`."""
        memory = cls()
        memory.load_state_dict(tensors, header)
        return memory


# ------------------------------------------------------------------------ helpers


def _check_concept(fn: str, concept: object) -> None:
    if not isinstance(concept, str) or not concept.strip():
        raise ValueError(f"{fn}: concept must be a non-empty string, got {concept!r}")


def _check_feature(fn: str, name: str, f: object, dim: int | None) -> Tensor:
    """A detached CPU copy of a valid (D,) feature."""
    if not isinstance(f, Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor (D,), got {type(f).__name__}")
    if f.ndim != 1 or f.shape[0] == 0:
        raise ValueError(f"{fn}: {name} must be 1-D (D,) with D >= 1, got shape {tuple(f.shape)}")
    if dim is not None and f.shape[0] != dim:
        raise ValueError(f"{fn}: {name} has D = {f.shape[0]}; expected D = {dim}, the feature size of the bank")
    if not f.dtype.is_floating_point:
        raise TypeError(f"{fn}: {name} must be a floating-point tensor, got {f.dtype}")
    out = f.detach().to("cpu").clone()
    if not bool(torch.isfinite(out).all()):
        raise ValueError(f"{fn}: {name} holds NaN or inf")
    if not bool(out.any()):
        raise ValueError(f"{fn}: {name} is all zeros; cosine similarity needs a non-zero feature")
    return out


def _unit(f: Tensor) -> Tensor:
    f = f.to(torch.float64)
    return f / f.norm()


def _unit_features(samples: Sequence[MemorySample]) -> Tensor:
    """(n, D) float64, L2-normalised rows."""
    return torch.stack([_unit(s.feature) for s in samples])


def _prototype(unit: Tensor) -> Tensor:
    return unit.mean(0)


def _cos(a: Tensor, b: Tensor) -> Tensor:
    denom = a.norm() * b.norm()
    return (a @ b) / denom if bool(denom > 0) else denom  # a prototype of opposite features has no direction


def _rainbow_scores(unit: Tensor, owner: Tensor, distinct_weight: float) -> list[float]:
    """unit: (P, D) L2-normalised features; owner: (P,) concept index. Returns the P scores."""
    sim = unit @ unit.T
    same = owner[:, None] == owner[None, :]
    own = same & ~torch.eye(len(owner), dtype=torch.bool)
    n_own = own.sum(1)
    rep = torch.where(n_own > 0, (sim * own).sum(1) / n_own.clamp(min=1), 1.0)
    other = ~same
    closest = sim.masked_fill(same, -math.inf).amax(1)
    dist = torch.where(other.any(1), 1.0 - closest, 1.0)
    return (rep + distinct_weight * dist).tolist()


def _pack_image(name: str, image: Any) -> tuple[str, Tensor | None]:
    if image is None:
        return "none", None
    if isinstance(image, Tensor):
        return "tensor", image.detach().cpu().contiguous().clone()
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - PIL comes with diffusers
        Image = None
    if Image is not None and isinstance(image, Image.Image):
        if image.mode not in _PIL_MODES:
            raise ValueError(f"state_dict: {name} is a PIL image of mode {image.mode!r}; expected one of {_PIL_MODES}")
        import numpy as np

        return f"pil:{image.mode}", torch.from_numpy(np.array(image, dtype=np.uint8))
    raise ValueError(f"state_dict: {name} is a {type(image).__name__}; expected a torch.Tensor, a PIL image or None")


def _unpack_image(fn: str, name: str, kind: str, t: Tensor | None) -> Any:
    if kind == "none":
        return None
    if t is None:
        raise ValueError(f"{fn}: tensor {name} is missing (payload kind {kind!r})")
    if kind == "tensor":
        return t.clone()
    if kind.startswith("pil:") and kind[4:] in _PIL_MODES:
        from PIL import Image

        image = Image.fromarray(t.numpy())  # uint8 (H, W) → L, (H, W, 3) → RGB, (H, W, 4) → RGBA
        if image.mode != kind[4:]:
            raise ValueError(f"{fn}: {name} has shape {tuple(t.shape)}, which is not a PIL image of mode {kind[4:]!r}")
        return image
    raise ValueError(f"{fn}: {name} has unknown payload kind {kind!r}")

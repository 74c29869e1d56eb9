"""TinyWorld's evaluator: a small CNN that reads a 32×32 image back into the world's attributes.

The network sees the whole image and answers per *slot*, the nine :data:`~.world.POSITIONS` where
objects can stand (an object up to 3 pixels off its position belongs to it): is an object there,
and which shape, colour, texture, size, accent colour, split, emblem and identity (one of the ten
personal concepts, or ``none``) it has; one global head names the background. This reads scenes
of one to three objects alike, and position is simply which slot holds an object.

How it is trained (:func:`train_evaluator`, a few CPU minutes): freshly rendered scenes of a wider
world than the base model's — the generic world's objects (any colour, textured or two-colour) on
backgrounds of every colour of :data:`~.world.COLOURS`, the ten personal concepts anywhere and at
both sizes, and *near misses* (a concept with one of shape, colour, accent, split or emblem
changed) labelled ``none`` so that identity is strict — under light augmentation (±2-pixel shifts,
blur, colour jitter, noise) so that imperfect generated images are read as a person would. The
evaluator is a measuring instrument, not the model under test: that it has seen the personal
concepts is what CLIP-I's CLIP has too.

Metrics (:class:`Evaluator`):

- ``image_alignment`` (IA, like CLIP-I): mean cosine similarity between the *object embeddings*
  (the slot features every per-object head reads, taken at the most confident slot) of generated
  and reference images. They are trained to tell identities apart and are unaffected by where the
  object stands, so IA compares objects, not backgrounds or layouts.
- ``text_alignment`` (TA): the fraction of a :class:`~.world.ContextPrompt`'s specified attributes
  the classifier finds in the image (:func:`alignment_checks` lists what each attribute means).
- ``presence``: whether a concept shows in its region of a multi-concept image: the image outside
  the region is replaced by the region's background colour (median of its border), and the score is
  the largest P(object) · P(identity = concept) over the slots inside the region; it is 0 unless
  both of the concept's colours cover at least :data:`MIN_COLOUR_PIXELS` pixels of the region
  (within RGB distance :data:`COLOUR_TOLERANCE`), a check independent of the network.
- ``object_presence``: the same for a generic object (which object is in which box): the largest
  P(object) over the slots inside the box (or the whole image when no box is given) whose most
  likely shape and colour (and accent, for a two-colour one) are the object's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .model import TRAIN_COMMAND, WEIGHTS_DIR
from .world import (
    _PAIRS,
    _TRIPLES,
    BACKGROUNDS,
    COLOURS,
    CONCEPTS,
    EMBLEMS,
    POSITIONS,
    SHAPES,
    SIZES,
    SPLITS,
    TEXTURES,
    Concept,
    ObjectSpec,
    Scene,
    _sample_object,
    _sample_offsets,
    concept_of,
    context_prompts,
    generic_dataset,
    parts_show,
    render_batch,
)

__all__ = [
    "ATTRIBUTE_CLASSES",
    "CONCEPT_PARTS",
    "EVALUATOR_VERSION",
    "IDENTITIES",
    "SLOTS",
    "Evaluator",
    "EvaluatorNet",
    "Prediction",
    "alignment_checks",
    "identity_accuracy",
    "evaluator_scene",
    "train_evaluator",
]

EVALUATOR_VERSION = "tinyworld-evaluator-v3"
#: Slot order: the world's positions.
SLOTS: tuple[str, ...] = tuple(POSITIONS)
#: The class of "no such part" (accent, split, emblem) and of "no personal concept" (identity).
NONE = "none"
IDENTITIES: tuple[str, ...] = tuple(c.name for c in CONCEPTS) + (NONE,)
#: Per-object heads and their classes.
ATTRIBUTE_CLASSES: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "colour": tuple(COLOURS),
    "texture": TEXTURES,
    "size": SIZES,
    "accent": (NONE, *COLOURS),
    "split": (NONE, *SPLITS),
    "emblem": (NONE, *EMBLEMS),
    "identity": IDENTITIES,
}
BACKGROUND_CLASSES: tuple[str, ...] = tuple(COLOURS)
COLOUR_TOLERANCE = 60.0  # RGB distance (0–255) within which a pixel counts as a concept colour
MIN_COLOUR_PIXELS = 3
EMBED_DIM = 64
#: The parts every personal concept is one exact combination of (:class:`~.world.Identity`, shape, colour).
CONCEPT_PARTS = ("shape", "colour", "accent", "split", "emblem")
_SLOT_XY = torch.tensor([POSITIONS[s] for s in SLOTS], dtype=torch.float32)  # (9, 2) normalised x, y


# --------------------------------------------------------------------------------------------
# Network
# --------------------------------------------------------------------------------------------


def _conv(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class EvaluatorNet(nn.Module):
    """images (N, 3, 32, 32) in [0, 1] → dict of logits: ``presence`` (N, 9), each of
    :data:`ATTRIBUTE_CLASSES` (N, 9, K), ``background`` (N, 16), and ``embedding`` (N, 9, 64),
    the slot features all per-object heads read (linear heads, so the embedding is the
    penultimate layer). Each slot reads the 16×16 map (fine detail: textures, emblems) and the 8×8
    map (receptive field 37 pixels, a whole large object) at its centre."""

    def __init__(self, width: int = 32):
        super().__init__()
        w1, w2, w3 = width, 2 * width, 4 * width
        self.config = {"width": width}
        self.stem = nn.Sequential(*_conv(3, w1), *_conv(w1, w2, 2), *_conv(w2, w2))  # 16×16: fine detail
        self.body = nn.Sequential(*_conv(w2, w3, 2), *_conv(w3, w3), *_conv(w3, w3), *_conv(w3, w3))  # 8×8: context
        self.slot_mlp = nn.Sequential(nn.Linear(w2 + w3, 128), nn.ReLU(inplace=True), nn.Linear(128, EMBED_DIM))
        self.presence = nn.Linear(EMBED_DIM, 1)
        self.heads = nn.ModuleDict({name: nn.Linear(EMBED_DIM, len(c)) for name, c in ATTRIBUTE_CLASSES.items()})
        self.background = nn.Linear(w3, len(BACKGROUND_CLASSES))

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        fine = self.stem(images * 2 - 1)  # (N, C2, 16, 16)
        fmap = self.body(fine)  # (N, C3, 8, 8)
        grid = (_SLOT_XY.to(fmap) * 2 - 1).view(1, 1, len(SLOTS), 2).expand(fmap.shape[0], -1, -1, -1)
        slots = torch.cat([F.grid_sample(m, grid, align_corners=False) for m in (fine, fmap)], dim=1)
        slots = slots.squeeze(2).transpose(1, 2)  # (N, 9, C2 + C3)
        embedding = self.slot_mlp(slots)
        out = {name: head(embedding) for name, head in self.heads.items()}
        out["presence"] = self.presence(embedding).squeeze(-1)
        out["background"] = self.background(fmap.mean(dim=(2, 3)))
        out["embedding"] = embedding
        return out


@dataclasses.dataclass
class Prediction:
    """Probabilities for a batch: presence (N, 9); attributes name → (N, 9, K); background (N, 16);
    embedding (N, 9, 64). Slots follow :data:`SLOTS`, classes :data:`ATTRIBUTE_CLASSES`."""

    presence: Tensor
    attributes: dict[str, Tensor]
    background: Tensor
    embedding: Tensor

    def __getitem__(self, i: int) -> Prediction:
        """Image ``i`` of the batch (as a batch of one)."""
        s = slice(i, i + 1)
        return Prediction(
            self.presence[s], {k: v[s] for k, v in self.attributes.items()}, self.background[s], self.embedding[s]
        )

    def label(self, attribute: str, slot: int, i: int = 0) -> str:
        """The most likely class of ``attribute`` at ``slot`` of image ``i``."""
        return ATTRIBUTE_CLASSES[attribute][int(self.attributes[attribute][i, slot].argmax())]

    def background_label(self, i: int = 0) -> str:
        return BACKGROUND_CLASSES[int(self.background[i].argmax())]

    def recognised(self, concept: Concept, scenes: Sequence[Scene]) -> tuple[list[bool], list[bool]]:
        """Per image of ``scenes`` (one each, in order): is ``concept``'s identity read at the
        slot of the scene's first object; and at any slot where an object is present."""
        found = (self.presence > 0.5) & (self.attributes["identity"].argmax(-1) == IDENTITIES.index(concept.name))
        slots = [SLOTS.index(scene.objects[0].position) for scene in scenes]
        return [bool(found[i, s]) for i, s in enumerate(slots)], [bool(row.any()) for row in found]

    def parts_read(self, concept: Concept) -> list[bool]:
        """Per image: is there a slot with an object whose every part (:data:`CONCEPT_PARTS`) is read
        as ``concept``'s — the identity read part by part, as a person checks it, not by the identity
        head (trained against near misses, it asks more of a blurred generated image)."""
        labels = _labels(concept.spec())
        found = self.presence > 0.5
        for part in CONCEPT_PARTS:
            found &= self.attributes[part].argmax(-1) == ATTRIBUTE_CLASSES[part].index(labels[part])
        return [bool(row.any()) for row in found]


# --------------------------------------------------------------------------------------------
# Scoring a prediction against a scene
# --------------------------------------------------------------------------------------------


def _labels(obj: ObjectSpec) -> dict[str, str]:
    """The class of every per-object head for ``obj``."""
    ident, concept = obj.identity, concept_of(obj)
    return {
        "shape": obj.shape,
        "colour": obj.colour,
        "texture": obj.texture,
        "size": obj.size,
        "accent": ident.accent if ident is not None else NONE,
        "split": ident.split if ident is not None else NONE,
        "emblem": (ident.emblem or NONE) if ident is not None else NONE,
        "identity": concept.name if concept is not None else NONE,
    }


def _object_checks(pred: Prediction, obj: ObjectSpec, prefix: str) -> dict[str, bool]:
    slot = SLOTS.index(obj.position)
    present = bool(pred.presence[0, slot] > 0.5)
    labels = _labels(obj)
    checks = {f"{prefix}position": present, f"{prefix}shape": present and pred.label("shape", slot) == obj.shape}
    if concept_of(obj) is not None:
        checks[f"{prefix}identity"] = present and pred.label("identity", slot) == labels["identity"]
    else:
        for name in ("colour", "texture", "accent", "split", "emblem"):
            checks[f"{prefix}{name}"] = present and pred.label(name, slot) == labels[name]
    checks[f"{prefix}size"] = present and pred.label("size", slot) == obj.size
    return checks


def alignment_checks(pred: Prediction, scene: Scene, specified: Sequence[str] | None = None) -> dict[str, bool]:
    """Which attributes of ``scene`` the prediction for one image (a batch of one) shows.

    specified (a :class:`~.world.ContextPrompt`'s): ``background``: the background class is the
    scene's; ``position``: an object is present (P > 0.5) at the first object's slot; ``size``: and
    its size class is right; ``companion``: the second object is present at its slot with the
    right shape and colour. None checks everything: the background and, for each object, presence at
    its position, shape, size, and colour, texture, accent, split and emblem (generic objects) or
    identity (concepts)."""
    if specified is None:
        checks = {"background": pred.background_label() == scene.background}
        for k, obj in enumerate(scene.objects):
            checks.update(_object_checks(pred, obj, f"object{k}."))
        return checks
    known = ("background", "position", "size", "companion")
    unknown = [s for s in specified if s not in known]
    if unknown:
        raise ValueError(f"specified attributes {unknown}: expected some of {known}")
    checks = {}
    first = _object_checks(pred, scene.objects[0], "")
    if "background" in specified:
        checks["background"] = pred.background_label() == scene.background
    if "position" in specified:
        checks["position"] = first["position"]
    if "size" in specified:
        checks["size"] = first["size"]
    if "companion" in specified:
        if len(scene.objects) < 2:
            raise ValueError(f"specified 'companion' but the scene has one object: {scene}")
        second = _object_checks(pred, scene.objects[1], "")
        checks["companion"] = second["position"] and second["shape"] and second["colour"]
    return checks


# --------------------------------------------------------------------------------------------
# Images in
# --------------------------------------------------------------------------------------------


def _as_batch(images, device) -> Tensor:
    """PIL image(s), uint8 or float [0, 1] arrays (H, W, 3) / (N, H, W, 3), or tensors (3, H, W) /
    (N, 3, H, W) in [0, 1] → float (N, 3, 32, 32) in [0, 1]."""
    import PIL.Image

    if isinstance(images, PIL.Image.Image):
        images = [images]
    if isinstance(images, (list, tuple)):
        if not images:
            raise ValueError("no images given")
        arrays = [np.asarray(im.convert("RGB")) if isinstance(im, PIL.Image.Image) else im for im in images]
        if isinstance(arrays[0], Tensor):
            images = torch.stack([a if a.ndim == 3 else a[0] for a in arrays])
        else:
            images = np.stack(arrays)
    if isinstance(images, np.ndarray):
        x = torch.from_numpy(np.array(images))  # a copy: arrays from PIL are read-only
        x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
        if x.ndim == 3:
            x = x[None]
        if x.shape[-1] != 3:
            raise ValueError(f"image array of shape {tuple(images.shape)}: expected (..., H, W, 3)")
        x = x.permute(0, 3, 1, 2)
    elif isinstance(images, Tensor):
        x = images.float()
        if x.ndim == 3:
            x = x[None]
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"image tensor of shape {tuple(images.shape)}: expected (N, 3, H, W) in [0, 1]")
    else:
        raise TypeError(f"images of type {type(images).__name__}: expected PIL images, arrays or tensors")
    x = x.to(device)
    if x.shape[-2:] != (32, 32):
        x = F.interpolate(x, size=(32, 32), mode="bilinear", antialias=True, align_corners=False)
    return x.clamp(0, 1)


def _box_pixels(box: Sequence[float], size: int = 32) -> tuple[int, int, int, int]:
    x0, y0, x1, y1 = (float(v) for v in box)
    if not (0.0 <= x0 < x1 <= 1.0 and 0.0 <= y0 < y1 <= 1.0):
        raise ValueError(f"region box {tuple(box)}: expected 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1")
    return (
        int(math.floor(x0 * size)),
        int(math.floor(y0 * size)),
        max(int(math.ceil(x1 * size)), int(math.floor(x0 * size)) + 1),
        max(int(math.ceil(y1 * size)), int(math.floor(y0 * size)) + 1),
    )


# --------------------------------------------------------------------------------------------
# The evaluator
# --------------------------------------------------------------------------------------------


class Evaluator:
    """The trained :class:`EvaluatorNet` and the metrics built on it (see the module docstring).

    Images may be PIL images, uint8 or float arrays, or tensors in [0, 1] (see ``predict``); other
    sizes than 32×32 are resized. Everything runs without gradients, in eval mode."""

    def __init__(self, net: EvaluatorNet, device: str | torch.device = "cpu"):
        self.net = net.to(device).eval()
        self.device = torch.device(device)

    # ---------------------------------------------------------------- files

    @classmethod
    def load(cls, directory: str | os.PathLike | None = None, device: str | torch.device | None = None) -> Evaluator:
        """The evaluator saved in ``directory`` (default ``WEIGHTS_DIR / "evaluator"``), on ``device``
        (default CPU: it reads a few images at a time)."""
        from safetensors.torch import load_file

        directory = Path(directory) if directory is not None else WEIGHTS_DIR / "evaluator"
        config_path, weights = directory / "config.json", directory / "model.safetensors"
        if not (config_path.is_file() and weights.is_file()):
            raise FileNotFoundError(
                f"TinyWorld evaluator not found in {directory} (config.json, model.safetensors); "
                f"train it with: {TRAIN_COMMAND} (all of the base model) or "
                f"python -m lifelong_engine.tinyworld.evaluator --out {directory}"
            )
        config = json.loads(config_path.read_text())
        if config.get("version") != EVALUATOR_VERSION:
            raise ValueError(
                f"evaluator in {directory} is version {config.get('version')!r}, expected {EVALUATOR_VERSION!r}"
            )
        net = EvaluatorNet(**config["net"])
        net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in load_file(weights).items()})
        device = device if device is not None else "cpu"
        return cls(net, device)

    def save(self, directory: str | os.PathLike, *, extra: dict | None = None) -> Path:
        """Write ``config.json`` and ``model.safetensors`` (fp16) to ``directory``; returns it."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {
            k: (v.to(torch.float16) if v.is_floating_point() else v).detach().cpu().contiguous()
            for k, v in self.net.state_dict().items()
        }
        tmp = directory / f".model.{os.getpid()}.tmp"
        save_file(state, tmp, metadata={"format": "pt"})
        os.replace(tmp, directory / "model.safetensors")
        config = {"version": EVALUATOR_VERSION, "net": self.net.config, **(extra or {})}
        (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        return directory

    # ---------------------------------------------------------------- predictions

    @torch.no_grad()
    def predict(self, images, batch_size: int = 256) -> Prediction:
        """Probabilities for every image (see :class:`Prediction`)."""
        x = _as_batch(images, self.device)
        parts = []
        for i in range(0, x.shape[0], batch_size):
            out = self.net(x[i : i + batch_size])
            parts.append(
                Prediction(
                    torch.sigmoid(out["presence"]),
                    {k: out[k].softmax(-1) for k in ATTRIBUTE_CLASSES},
                    out["background"].softmax(-1),
                    out["embedding"],
                )
            )
        return Prediction(
            torch.cat([p.presence for p in parts]),
            {k: torch.cat([p.attributes[k] for p in parts]) for k in ATTRIBUTE_CLASSES},
            torch.cat([p.background for p in parts]),
            torch.cat([p.embedding for p in parts]),
        )

    def describe(self, image) -> dict:
        """What the evaluator sees in one image, for people: the background and each present object."""
        pred = self.predict(image)
        objects = []
        for slot in range(len(SLOTS)):
            if pred.presence[0, slot] > 0.5:
                obj = {"position": SLOTS[slot], "p": round(float(pred.presence[0, slot]), 3)}
                obj.update({k: pred.label(k, slot) for k in ATTRIBUTE_CLASSES})
                objects.append(obj)
        return {"background": pred.background_label(), "objects": objects}

    def features(self, images) -> Tensor:
        """(N, 64) unit-norm object embeddings: each image's embedding at its most confident slot."""
        pred = self.predict(images)
        slot = pred.presence.argmax(dim=1)
        emb = pred.embedding[torch.arange(len(slot)), slot]
        return F.normalize(emb, dim=-1)

    # ---------------------------------------------------------------- metrics

    def image_alignment(self, images, reference_images) -> float:
        """IA: the mean cosine similarity of object embeddings over all (image, reference) pairs."""
        a, b = self.features(images), self.features(reference_images)
        return float((a @ b.T).mean())

    def text_alignment(self, image, scene: Scene, specified: Sequence[str] | None = None) -> float:
        """TA: the fraction of :func:`alignment_checks` that hold for one image of ``scene``."""
        checks = alignment_checks(self.predict(image), scene, specified)
        return sum(checks.values()) / len(checks)

    def _slot_scores(self, image, box: Sequence[float] | None) -> tuple[Prediction, list[int]]:
        """The prediction for one image and the slots to read: with a box, the image outside it is
        replaced by the median colour of the box's border and the slots are those inside it."""
        x = _as_batch(image, self.device)[:1]
        if box is None:
            return self.predict(x), list(range(len(SLOTS)))
        px0, py0, px1, py1 = _box_pixels(box)
        region = x[0, :, py0:py1, px0:px1]
        border = torch.cat([region[:, 0], region[:, -1], region[:, :, 0], region[:, :, -1]], dim=1)
        masked = border.median(dim=1).values.view(1, 3, 1, 1).expand_as(x).clone()
        masked[..., py0:py1, px0:px1] = x[..., py0:py1, px0:px1]
        x0, y0, x1, y1 = (float(v) for v in box)
        inside = [i for i, (cx, cy) in enumerate(_SLOT_XY.tolist()) if x0 < cx < x1 and y0 < cy < y1]
        return self.predict(masked), inside

    def presence(self, image, box: Sequence[float], concept: Concept | str) -> float:
        """How surely ``concept`` appears inside ``box`` (normalised x0, y0, x1, y1) of one image, in
        [0, 1] (count it at > 0.5): see the module docstring. ``concept`` may be a name or token."""
        from .world import get_concept

        concept = get_concept(concept) if isinstance(concept, str) else concept
        x = _as_batch(image, self.device)[:1]
        px0, py0, px1, py1 = _box_pixels(box)
        rgb = x[0, :, py0:py1, px0:px1].permute(1, 2, 0).reshape(-1, 3) * 255
        for colour in (concept.colour, concept.identity.accent):
            distance = (rgb - torch.tensor(COLOURS[colour], device=rgb.device, dtype=rgb.dtype)).norm(dim=-1)
            if int((distance <= COLOUR_TOLERANCE).sum()) < MIN_COLOUR_PIXELS:
                return 0.0
        pred, inside = self._slot_scores(x, box)
        if not inside:
            return 0.0
        k = IDENTITIES.index(concept.name)
        scores = pred.presence[0, inside] * pred.attributes["identity"][0, inside, k]
        return float(scores.max())

    def object_scores(self, image, obj: ObjectSpec, box: Sequence[float] | None = None) -> Tensor:
        """(9,) per slot: P(object) where the slot's most likely shape and colour (and accent, two-colour;
        identity, a personal concept) are ``obj``'s, else 0 — for an object like ``obj`` (not its
        position) in one image; with a box, read as :meth:`presence` does and 0 at slots outside it."""
        pred, inside = self._slot_scores(image, box)
        labels = _labels(obj)
        scores = pred.presence[0].clone()
        names = ["shape", "colour"] + (["accent"] if obj.identity is not None else [])
        if concept_of(obj) is not None:
            names.append("identity")
        for name in names:
            right = pred.attributes[name][0].argmax(-1) == ATTRIBUTE_CLASSES[name].index(labels[name])
            scores = scores * right.to(scores.dtype)
        outside = [i for i in range(len(SLOTS)) if i not in inside]
        scores[outside] = 0.0
        return scores.cpu()

    def object_presence(self, image, obj: ObjectSpec, box: Sequence[float] | None = None) -> float:
        """How surely an object like ``obj`` appears inside ``box`` of one image (the whole image
        when None), in [0, 1] (count it at > 0.5): the largest of :meth:`object_scores`."""
        return float(self.object_scores(image, obj, box).max())

    def attribute_accuracy(self, images, scenes: Sequence[Scene]) -> dict[str, float]:
        """Per-attribute accuracy over images of known scenes: ``background`` and, over all
        objects, ``position`` (present at its slot), ``shape``, ``colour``, ``texture``, ``size``
        (given presence; generic objects) and ``identity`` (concepts); plus ``all``: every check."""
        pred = self.predict(images)
        if len(scenes) != pred.presence.shape[0]:
            raise ValueError(f"{pred.presence.shape[0]} images but {len(scenes)} scenes")
        hits: dict[str, list[bool]] = {}
        for i, scene in enumerate(scenes):
            for name, ok in alignment_checks(pred[i], scene).items():
                hits.setdefault(name.split(".")[-1], []).append(ok)
        out = {name: sum(v) / len(v) for name, v in hits.items()}
        out["all"] = sum(sum(v) for v in hits.values()) / sum(len(v) for v in hits.values())
        return out


# --------------------------------------------------------------------------------------------
# Training data: a wider world than the base model's
# --------------------------------------------------------------------------------------------


def _pick(rng: np.random.Generator, options: Sequence):
    return options[int(rng.integers(len(options)))]


def _near_miss(rng: np.random.Generator, background: str, size: str, position: str) -> ObjectSpec:
    """A personal concept with one of shape, colour, accent, split, emblem changed (never a concept)."""
    while True:
        c = _pick(rng, CONCEPTS)
        shape, colour, ident = c.class_word, c.colour, c.identity
        change = _pick(rng, ("shape", "colour", "accent", "split", "emblem"))
        if change == "shape":
            shape = _pick(rng, SHAPES)
        elif change == "colour":
            colour = _pick(rng, tuple(COLOURS))
        elif change == "accent":
            ident = dataclasses.replace(ident, accent=_pick(rng, tuple(COLOURS)))
        elif change == "split":
            ident = dataclasses.replace(ident, split=_pick(rng, SPLITS))
        else:
            ident = dataclasses.replace(ident, emblem=_pick(rng, (None, *EMBLEMS)))
        obj = ObjectSpec(shape, colour, "solid", size, position, ident)
        distinct = background not in (colour, ident.accent) and colour != ident.accent
        if concept_of(obj) is None and distinct and parts_show(obj):  # a ring hides an emblem in its hole
            return obj


def _evaluator_object(rng: np.random.Generator, background: str, position: str) -> ObjectSpec:
    r = rng.random()
    if r < 0.25:
        while True:
            c = _pick(rng, CONCEPTS)
            if background not in (c.colour, c.identity.accent):
                return c.spec(_pick(rng, SIZES), position)
    if r < 0.4:
        return _near_miss(rng, background, _pick(rng, SIZES), position)
    return _sample_object(rng, background, position)


def evaluator_scene(rng: np.random.Generator) -> Scene:
    """One training scene of the evaluator: a background of :data:`~.world.BACKGROUNDS` (70 %) or
    any colour; one object (50 %), two (35 %) or three, apart and moved off their positions as the
    generic world does; each a personal concept (25 %), a near miss (15 %) or a generic object."""
    background = _pick(rng, BACKGROUNDS) if rng.random() < 0.7 else _pick(rng, tuple(COLOURS))
    r = rng.random()
    positions = _pick(rng, _TRIPLES) if r < 0.15 else _pick(rng, _PAIRS) if r < 0.5 else (_pick(rng, SLOTS),)
    objects = [_evaluator_object(rng, background, p) for p in positions]
    return Scene(background, _sample_offsets(rng, objects))


def _targets(scenes: Sequence[Scene]) -> dict[str, Tensor]:
    n = len(scenes)
    presence = torch.zeros(n, len(SLOTS))
    labels = {k: torch.full((n, len(SLOTS)), -100, dtype=torch.long) for k in ATTRIBUTE_CLASSES}
    background = torch.tensor([BACKGROUND_CLASSES.index(s.background) for s in scenes])
    for i, scene in enumerate(scenes):
        for obj in scene.objects:
            j = SLOTS.index(obj.position)
            presence[i, j] = 1
            for k, v in _labels(obj).items():
                labels[k][i, j] = ATTRIBUTE_CLASSES[k].index(v)
    return {"presence": presence, "background": background, **labels}


def _augment(x: Tensor, g: torch.Generator) -> Tensor:
    """±2-pixel shifts (edges replicated), partial 3×3 blur, colour gain/offset, Gaussian noise."""
    n = x.shape[0]
    padded = F.pad(x, (2, 2, 2, 2), mode="replicate")
    shifts = torch.randint(0, 5, (n, 2), generator=g)
    x = torch.stack([padded[i, :, dy : dy + 32, dx : dx + 32] for i, (dx, dy) in enumerate(shifts.tolist())])
    blurred = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    amount = torch.rand(n, 1, 1, 1, generator=g) * (torch.rand(n, 1, 1, 1, generator=g) < 0.4)
    x = x + amount * (blurred - x)
    gain, offset = (2 * torch.rand(2, n, 3, 1, 1, generator=g) - 1).unbind(0)
    x = x * (1 + 0.06 * gain) + 0.03 * offset
    x = x + torch.rand(n, 1, 1, 1, generator=g) * 0.06 * torch.randn(x.shape, generator=g)
    return x.clamp(0, 1)


def _images(scenes: Sequence[Scene]) -> Tensor:
    return torch.from_numpy(render_batch(scenes)).permute(0, 3, 1, 2).float() / 255


def train_evaluator(
    steps: int = 1000,
    batch_size: int = 64,
    seed: int = 0,
    device: str | torch.device | None = None,
    lr: float = 3e-3,
    progress: bool = True,
    width: int = 32,
) -> Evaluator:
    """Train an :class:`Evaluator` from scratch on freshly rendered :func:`evaluator_scene` images
    (AdamW, one-cycle learning rate); reproducible from ``seed`` on a given device. What the
    shipped evaluator reaches (:func:`held_out_accuracy`, :func:`identity_accuracy`) is in its
    ``config.json``."""
    from tqdm.auto import tqdm

    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = EvaluatorNet(width).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1), pct_start=0.15)
    net.train()
    smooth = None
    bar = tqdm(range(steps), desc="evaluator", disable=not progress)
    for step in bar:
        rng = np.random.default_rng([seed, 3, step])
        g = torch.Generator().manual_seed(int(rng.integers(2**62)))
        scenes = [evaluator_scene(rng) for _ in range(batch_size)]
        x = _augment(_images(scenes), g).to(device)
        t = {k: v.to(device) for k, v in _targets(scenes).items()}
        out = net(x)
        loss = F.binary_cross_entropy_with_logits(out["presence"], t["presence"])
        loss = loss + F.cross_entropy(out["background"], t["background"])
        for k, classes in ATTRIBUTE_CLASSES.items():
            loss = loss + F.cross_entropy(out[k].reshape(-1, len(classes)), t[k].reshape(-1), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        value = float(loss.detach())
        smooth = value if smooth is None else 0.95 * smooth + 0.05 * value
        bar.set_postfix(loss=f"{smooth:.3f}")
    return Evaluator(net.eval(), device)


def held_out_accuracy(evaluator: Evaluator, n: int = 1000, seed: int = 12345) -> dict[str, float]:
    """Per-attribute accuracy on ``n`` generic-world images (:func:`~.world.generic_dataset`, a seed
    the training never uses), as :meth:`Evaluator.attribute_accuracy`."""
    samples = generic_dataset(n, seed)
    return evaluator.attribute_accuracy([np.asarray(s.image) for s in samples], [s.scene for s in samples])


def identity_scenes(per_class: int = 40, seed: int = 54321) -> list[Scene]:
    """Held-out renders for identity (a seed the training never uses): each personal concept
    ``per_class`` times at a random position, size, offset and background, alone or beside a
    generic object, plus its context prompts' scenes; and ``per_class`` · 10 scenes whose first
    object is no concept (half near misses, half generic two-colour or textured objects)."""
    rng = np.random.default_rng([seed, 7])
    scenes = []
    for concept in CONCEPTS:
        scenes += [p.scene for p in context_prompts(concept)]
        for _ in range(per_class):
            background = _pick(rng, tuple(b for b in COLOURS if b not in (concept.colour, concept.identity.accent)))
            pair = _pick(rng, _PAIRS)
            objects = [concept.spec(_pick(rng, SIZES), pair[0])]
            if rng.random() < 0.5:
                objects.append(_sample_object(rng, background, pair[1]))
            scenes.append(Scene(background, _sample_offsets(rng, objects)))
    for k in range(per_class * len(CONCEPTS)):
        background = _pick(rng, tuple(COLOURS))
        position = _pick(rng, SLOTS)
        if k % 2:
            obj = _near_miss(rng, background, _pick(rng, SIZES), position)
        else:
            obj = _sample_object(rng, background, position)
        scenes.append(Scene(background, _sample_offsets(rng, [obj])))
    return scenes


def identity_accuracy(evaluator: Evaluator, per_class: int = 40, seed: int = 54321) -> dict:
    """How often the identity head names the first object of :func:`identity_scenes` right (its
    concept, or ``none``): ``accuracy`` over all, ``per_identity`` and its minimum ``min``."""
    scenes = identity_scenes(per_class, seed)
    pred = evaluator.predict(render_batch(scenes))
    hits: dict[str, list[bool]] = {}
    for i, scene in enumerate(scenes):
        obj = scene.objects[0]
        truth = _labels(obj)["identity"]
        hits.setdefault(truth, []).append(pred.label("identity", SLOTS.index(obj.position), i) == truth)
    per = {k: round(float(np.mean(v)), 4) for k, v in hits.items()}
    total = sum(sum(v) for v in hits.values()) / sum(len(v) for v in hits.values())
    return {"accuracy": round(float(total), 4), "per_identity": per, "min": min(per.values()), "images": len(scenes)}


def identity_separation(evaluator: Evaluator, seed: int = 0) -> dict[str, float]:
    """IA on ground-truth renders: each concept's context-prompt scenes against its own five
    training images (``same``) and against every other concept's (``other``), averaged."""
    from .world import context_prompts, render

    same, other = [], []
    refs = {c.name: [s.image for s in c.images(5, seed)] for c in CONCEPTS}
    for c in CONCEPTS:
        images = [render(p.scene) for p in context_prompts(c) if len(p.scene.objects) == 1]
        same.append(evaluator.image_alignment(images, refs[c.name]))
        other.extend(evaluator.image_alignment(images, refs[d.name]) for d in CONCEPTS if d is not c)
    return {"same": float(np.mean(same)), "other": float(np.mean(other)), "min_same": float(np.min(same))}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Train TinyWorld's evaluator and report its accuracy.")
    parser.add_argument("--out", type=Path, default=WEIGHTS_DIR / "evaluator")
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    evaluator = train_evaluator(args.steps, args.batch_size, args.seed, args.device, width=args.width)
    report = {
        "steps": args.steps,
        "width": args.width,
        "seconds": round(time.perf_counter() - start, 1),
        "held_out_accuracy": held_out_accuracy(evaluator),
        "identity_accuracy": identity_accuracy(evaluator),
        "identity_alignment": identity_separation(evaluator),
    }
    evaluator.save(args.out, extra={"training": report})
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""TinyWorld's procedural image world: scenes, renderer, captions, personal concepts.

A scene is a plain background with one to three objects. An object has a shape, a colour, a
texture, a size and a position, each named by English words, or instead of a texture a two-colour
split and an emblem, so every scene has one caption::

    a large red striped circle at the top left on a blue background
    a large red square on the left and a small blue dotted star on the right on a white background
    a large teal and orange vertically split circle with a white cross at the top left on a gray background

An object may stand up to 3 pixels (at 32×32) off its named position (``offset``; near the border
it may then be cut by the image edge by up to 3 pixels), so that objects fill the image finely
enough for any box a user draws.

Images are 32×32 RGB by default (a tiny diffusion model is trained on them on a CPU). Rendering
supersamples 4×4 per pixel and averages in integer arithmetic; geometry uses only + − × ÷ and
comparisons on float64 and sampling only ``numpy.random.Generator`` (PCG64) with explicit seeds,
so a seed gives the same pixels and captions on every run and machine.

Personal concepts (:data:`CONCEPTS`) are objects with a unique identity: a two-colour split of
their base shape and sometimes a white emblem (:class:`Identity`). The generic sampler renders
every part a concept is made of (every colour, split and emblem, named in its captions; an object
whose image would not show a part its caption names, such as an emblem in a ring's hole, is drawn
again: :func:`parts_show`), but never the exact combination of any concept (:func:`concept_of`),
so a concept can be drawn by the base model from its full description, yet its identity must be
learned. Each has a prompt token
(``<tw-badge>``), a class word that is a generic shape word (``circle``), a handful of training
images, held-out context prompts with the scene each describes, and two-concept layouts for
regional synthesis.

Coordinates are normalised: x to the right and y downwards in [0, 1], boxes ``(x0, y0, x1, y1)``.
"""

from __future__ import annotations

import dataclasses
import itertools
import zlib
from collections.abc import Sequence
from functools import lru_cache
from typing import NamedTuple

import numpy as np
from PIL import Image

# --------------------------------------------------------------------------------------------
# Vocabulary of the world
# --------------------------------------------------------------------------------------------

#: Every colour the renderer knows, sRGB 0–255. Generic objects use all of them (:data:`OBJECT_COLOURS`),
#: backgrounds :data:`BACKGROUNDS`.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 140, 30),
    "yellow": (240, 220, 50),
    "green": (50, 170, 70),
    "blue": (40, 90, 220),
    "purple": (140, 60, 190),
    "pink": (245, 140, 200),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
    "gray": (128, 128, 128),
    "teal": (0, 128, 128),
    "navy": (20, 30, 100),
    "magenta": (220, 0, 160),
    "lime": (170, 230, 40),
    "brown": (130, 80, 40),
    "cyan": (40, 210, 230),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "star", "ring", "cross", "heart")
OBJECT_COLOURS: tuple[str, ...] = tuple(COLOURS)
TEXTURES: tuple[str, ...] = ("solid", "striped", "dotted", "checkered")
SIZES: tuple[str, ...] = ("small", "large")
BACKGROUNDS: tuple[str, ...] = ("white", "black", "gray", "blue", "green", "yellow")

#: Position name → (x, y) of the object's centre, normalised.
POSITIONS: dict[str, tuple[float, float]] = {
    "center": (0.5, 0.5),
    "left": (0.25, 0.5),
    "right": (0.75, 0.5),
    "top": (0.5, 0.25),
    "bottom": (0.5, 0.75),
    "top left": (0.25, 0.25),
    "top right": (0.75, 0.25),
    "bottom left": (0.25, 0.75),
    "bottom right": (0.75, 0.75),
}
#: Position name → the phrase a caption uses for it.
POSITION_PHRASES: dict[str, str] = {
    "center": "in the center",
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "top left": "at the top left",
    "top right": "at the top right",
    "bottom left": "at the bottom left",
    "bottom right": "at the bottom right",
}
#: Size name → half the object's extent (its "radius"), normalised: 5 and 7.5 pixels at 32×32. Two
#: objects are only placed at positions 0.5 apart, so even two large objects never touch.
HALF_EXTENTS: dict[str, float] = {"small": 0.15625, "large": 0.234375}

#: Ways an object's shape is split between its two colours, and how captions name each.
SPLITS: tuple[str, ...] = ("vertical", "horizontal", "diagonal", "concentric")
SPLIT_PHRASES: dict[str, str] = {
    "vertical": "vertically split",
    "horizontal": "horizontally split",
    "diagonal": "diagonally split",
    "concentric": "concentric",
}
EMBLEMS: tuple[str, ...] = ("cross", "dot")
#: Fewest pixels (at 32×32) each named part of a generic two-colour object shows (:func:`parts_show`).
MIN_PART_PIXELS = 4
#: Largest offset of an object from its named position, per axis, normalised (3 pixels at 32×32).
MAX_OFFSET = 3 / 32
#: Most objects in a scene.
MAX_OBJECTS = 3

#: Textures draw their pattern in the object's colour darkened to this fraction (integer maths).
_SHADE_PERCENT = 50
#: Supersampling factor per axis.
_SS = 4

# --------------------------------------------------------------------------------------------
# Scenes
# --------------------------------------------------------------------------------------------


def _check(value: str, allowed: Sequence[str] | dict, what: str) -> None:
    if value not in allowed:
        raise ValueError(f"{what} {value!r}: expected one of {', '.join(map(repr, allowed))}")


@dataclasses.dataclass(frozen=True)
class Identity:
    """A two-colour object: its shape split between ``colour`` (the object's colour: left, top,
    upper-left or outer part) and ``accent`` (the other part), and an optional emblem painted in
    ``emblem_colour`` at the centre. A personal concept is one exact such combination (with its
    shape and colour); the generic world has all the others."""

    accent: str
    split: str
    emblem: str | None = None
    emblem_colour: str = "white"

    def __post_init__(self):
        _check(self.accent, COLOURS, "identity accent colour")
        _check(self.split, SPLITS, "identity split")
        if self.emblem is not None:
            _check(self.emblem, EMBLEMS, "identity emblem")
        _check(self.emblem_colour, COLOURS, "identity emblem colour")


@dataclasses.dataclass(frozen=True)
class ObjectSpec:
    """One object of a scene: a one-colour object with a ``texture``, or (``identity`` set) a
    solid two-colour one. ``offset`` (dx, dy), each within ±:data:`MAX_OFFSET`, moves its centre
    off the named ``position`` (captions still name the position)."""

    shape: str
    colour: str
    texture: str = "solid"
    size: str = "large"
    position: str = "center"
    identity: Identity | None = None
    offset: tuple[float, float] = (0.0, 0.0)

    def __post_init__(self):
        _check(self.shape, SHAPES, "shape")
        _check(self.colour, COLOURS, "colour")
        _check(self.texture, TEXTURES, "texture")
        _check(self.size, SIZES, "size")
        _check(self.position, POSITIONS, "position")
        if self.identity is not None and self.texture != "solid":
            raise ValueError(
                f"object texture {self.texture!r} with an identity: expected 'solid' (two-colour objects)"
            )
        if len(self.offset) != 2 or not all(abs(float(d)) <= MAX_OFFSET + 1e-12 for d in self.offset):
            raise ValueError(f"object offset {self.offset!r}: expected (dx, dy) each within ±{MAX_OFFSET}")

    @property
    def centre(self) -> tuple[float, float]:
        """(x, y) of the object's centre, normalised: its position moved by its offset."""
        cx, cy = POSITIONS[self.position]
        return (cx + float(self.offset[0]), cy + float(self.offset[1]))


@dataclasses.dataclass(frozen=True)
class Scene:
    """A plain ``background`` colour and one to :data:`MAX_OBJECTS` objects, described in this order by captions."""

    background: str
    objects: tuple[ObjectSpec, ...]

    def __post_init__(self):
        _check(self.background, COLOURS, "background")
        if not isinstance(self.objects, tuple) or not 1 <= len(self.objects) <= MAX_OBJECTS:
            raise ValueError(f"scene objects {self.objects!r}: expected a tuple of 1 to {MAX_OBJECTS} ObjectSpec")


class Sample(NamedTuple):
    """One image of the world with its caption and the scene it shows."""

    image: Image.Image
    caption: str
    scene: Scene


# --------------------------------------------------------------------------------------------
# Geometry: shapes in object-local coordinates u, v ∈ [-1, 1] (v downwards), scaled by the half
# extent. Literal vertex coordinates (no sin/cos at run time) keep masks identical on every libm.
# --------------------------------------------------------------------------------------------

_STAR = (  # five points, outer radius 1, inner 0.5, shifted down 0.0955 to centre it vertically
    (0.0, -0.9045),
    (0.2939, -0.3090),
    (0.9511, -0.2135),
    (0.4755, 0.2500),
    (0.5878, 0.9045),
    (0.0, 0.5955),
    (-0.5878, 0.9045),
    (-0.4755, 0.2500),
    (-0.9511, -0.2135),
    (-0.2939, -0.3090),
)
_TRIANGLE = ((0.0, -0.9), (1.0, 0.82), (-1.0, 0.82))
# Heart: two lobes (circles at (±0.47, -0.38), radius 0.52) and a kite to the tip, whose sides
# are tangent to the lobes.
_HEART_KITE = ((0.0, 0.95), (0.8619, -0.0382), (0.0, -0.5), (-0.8619, -0.0382))

#: Shape → tight extent (u0, v0, u1, v1) in local coordinates, for bounding boxes.
_EXTENTS: dict[str, tuple[float, float, float, float]] = {
    "circle": (-1.0, -1.0, 1.0, 1.0),
    "square": (-0.85, -0.85, 0.85, 0.85),
    "triangle": (-1.0, -0.9, 1.0, 0.82),
    "diamond": (-1.0, -1.0, 1.0, 1.0),
    "star": (-0.9511, -0.9045, 0.9511, 0.9045),
    "ring": (-1.0, -1.0, 1.0, 1.0),
    "cross": (-0.95, -0.95, 0.95, 0.95),
    "heart": (-0.99, -0.9, 0.99, 0.95),
}


def _polygon(u: np.ndarray, v: np.ndarray, vertices) -> np.ndarray:
    """Even-odd point-in-polygon test, broadcast over u and v."""
    inside = np.zeros(np.broadcast_shapes(u.shape, v.shape), dtype=bool)
    for (x0, y0), (x1, y1) in zip(vertices, vertices[1:] + vertices[:1]):
        if y0 == y1:
            continue
        crosses = (y0 > v) != (y1 > v)
        inside ^= crosses & (u < x0 + (v - y0) * ((x1 - x0) / (y1 - y0)))
    return inside


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "square":
        return (np.abs(u) <= 0.85) & (np.abs(v) <= 0.85)
    if shape == "triangle":
        return _polygon(u, v, _TRIANGLE)
    if shape == "diamond":
        return np.abs(u) + np.abs(v) <= 1.0
    if shape == "star":
        return _polygon(u, v, _STAR)
    if shape == "ring":
        r2 = u * u + v * v
        return (r2 <= 1.0) & (r2 >= 0.3025)  # inner radius 0.55
    if shape == "cross":
        au, av = np.abs(u), np.abs(v)
        return ((au <= 0.34) & (av <= 0.95)) | ((av <= 0.34) & (au <= 0.95))
    if shape == "heart":
        lobes = ((u - 0.47) ** 2 + (v + 0.38) ** 2 <= 0.2704) | ((u + 0.47) ** 2 + (v + 0.38) ** 2 <= 0.2704)
        return lobes | _polygon(u, v, _HEART_KITE)
    raise ValueError(f"shape {shape!r}: expected one of {', '.join(map(repr, SHAPES))}")


def _emblem_mask(emblem: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    if emblem == "cross":
        au, av = np.abs(u), np.abs(v)
        return ((au <= 0.15) & (av <= 0.55)) | ((av <= 0.15) & (au <= 0.55))
    if emblem == "dot":
        return u * u + v * v <= 0.0729  # radius 0.27
    raise ValueError(f"emblem {emblem!r}: expected one of {', '.join(map(repr, EMBLEMS))}")


def _split_mask(shape: str, split: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Where a two-colour object shows its accent (within its shape mask)."""
    if split == "vertical":
        return np.broadcast_to(u >= 0.0, np.broadcast_shapes(u.shape, v.shape))
    if split == "horizontal":
        return np.broadcast_to(v >= 0.0, np.broadcast_shapes(u.shape, v.shape))
    if split == "diagonal":
        return u + v >= 0.0
    if shape == "ring":  # concentric: the inner half of the band (the ring at 55 % scale would lie in its hole)
        return u * u + v * v <= 0.600625  # radius 0.775
    return _shape_mask(shape, u / 0.55, v / 0.55)  # concentric: the same shape at 55 % scale


@lru_cache(maxsize=512)
def part_pixels(shape: str, size: str, split: str, emblem: str | None) -> tuple[int, int, int]:
    """How many pixels (at 32×32) a two-colour object drawn whole at the image centre gives mostly
    (at least half their area) to its colour, its accent and its emblem (0 without one)."""
    hi = _hires(32)
    window, u, v, mask = _local_grid(shape, size, (0.5, 0.5), hi)
    on_emblem = _emblem_mask(emblem, u, v) if emblem is not None else np.zeros(mask.shape, dtype=bool)
    accent = _split_mask(shape, split, u, v)
    counts = []
    for part in (mask & ~accent & ~on_emblem, mask & accent & ~on_emblem, mask & on_emblem):
        canvas = np.zeros((hi, hi), dtype=np.int64)
        canvas[window] = part
        area = canvas.reshape(32, _SS, 32, _SS).sum(axis=(1, 3))
        counts.append(int((2 * area >= _SS**2).sum()))
    return tuple(counts)


def parts_show(obj: ObjectSpec) -> bool:
    """Whether every part ``obj``'s caption names shows in its image: for a two-colour object, at
    least :data:`MIN_PART_PIXELS` of its colour, of its accent and of its emblem (if any)."""
    if obj.identity is None:
        return True
    ident = obj.identity
    main, accent, emblem = part_pixels(obj.shape, obj.size, ident.split, ident.emblem)
    return min(main, accent) >= MIN_PART_PIXELS and (ident.emblem is None or emblem >= MIN_PART_PIXELS)


def _shade(colour: str) -> tuple[int, int, int]:
    return tuple(c * _SHADE_PERCENT // 100 for c in COLOURS[colour])


def object_box(obj: ObjectSpec) -> tuple[float, float, float, float]:
    """The object's tight bounding box ``(x0, y0, x1, y1)``, normalised to [0, 1]; every pixel it
    touches lies in ``[floor(x0·size), ceil(x1·size))`` × ``[floor(y0·size), ceil(y1·size))``."""
    cx, cy = obj.centre
    r = HALF_EXTENTS[obj.size]
    u0, v0, u1, v1 = _EXTENTS[obj.shape]
    return (cx + u0 * r, cy + v0 * r, cx + u1 * r, cy + v1 * r)


def _hires(size: int) -> int:
    if not isinstance(size, int) or size < 8:
        raise ValueError(f"image size {size!r}: expected an int >= 8")
    return size * _SS


@lru_cache(maxsize=16384)
def _local_grid(obj_shape: str, obj_size: str, centre: tuple[float, float], hi: int):
    """Supersampled crop around an object: its slice of the canvas, local u/v grids and shape mask."""
    cx, cy = centre
    r = HALF_EXTENTS[obj_size]
    u0, v0, u1, v1 = _EXTENTS[obj_shape]
    x_lo, x_hi = max(0, int(np.floor((cx + u0 * r) * hi))), min(hi, int(np.ceil((cx + u1 * r) * hi)))
    y_lo, y_hi = max(0, int(np.floor((cy + v0 * r) * hi))), min(hi, int(np.ceil((cy + v1 * r) * hi)))
    u = ((np.arange(x_lo, x_hi, dtype=np.float64) + 0.5) / hi - cx) / r
    v = ((np.arange(y_lo, y_hi, dtype=np.float64) + 0.5) / hi - cy) / r
    u, v = u[None, :], v[:, None]
    mask = _shape_mask(obj_shape, u, v)
    for array in (u, v, mask):
        array.flags.writeable = False
    return (slice(y_lo, y_hi), slice(x_lo, x_hi)), u, v, mask


@lru_cache(maxsize=64)
def _texture_pattern(texture: str, hi: int) -> np.ndarray | None:
    """Canvas-wide mask of where a texture shows the shaded colour, in image coordinates so that
    patterns line up with pixels: 2-pixel stripes and checks, 2-pixel dots every 4 pixels at 32×32."""
    if texture == "solid":
        return None
    band = np.arange(hi) * 16 // hi
    if texture == "striped":
        pattern = np.broadcast_to((band % 2 == 1)[:, None], (hi, hi))
    elif texture == "checkered":
        pattern = (band[:, None] + band[None, :]) % 2 == 1
    elif texture == "dotted":
        f = (np.arange(hi) + 0.5) * 8.0 / hi
        f = f - np.floor(f) - 0.5
        pattern = f[:, None] ** 2 + f[None, :] ** 2 <= 0.0625  # radius 0.25 of a 4-pixel cell: a round 2×2-pixel dot
    else:
        raise ValueError(f"texture {texture!r}: expected one of {', '.join(map(repr, TEXTURES))}")
    pattern = np.ascontiguousarray(pattern)
    pattern.flags.writeable = False
    return pattern


def _fill(crop: np.ndarray, where: np.ndarray, colour: tuple[int, int, int]) -> None:
    for channel, value in zip(crop, colour):
        channel[where] = value


def _paint(canvas: np.ndarray, obj: ObjectSpec, hi: int) -> None:
    window, u, v, mask = _local_grid(obj.shape, obj.size, obj.centre, hi)
    crop = canvas[(slice(None), *window)]
    _fill(crop, mask, COLOURS[obj.colour])
    pattern = _texture_pattern(obj.texture, hi)
    if pattern is not None:
        _fill(crop, mask & pattern[window], _shade(obj.colour))
    ident = obj.identity
    if ident is None:
        return
    _fill(crop, mask & _split_mask(obj.shape, ident.split, u, v), COLOURS[ident.accent])
    if ident.emblem is not None:
        _fill(crop, mask & _emblem_mask(ident.emblem, u, v), COLOURS[ident.emblem_colour])


def render_array(scene: Scene, size: int = 32) -> np.ndarray:
    """The scene as a ``(size, size, 3)`` uint8 array (objects painted in order, later on top)."""
    hi = _hires(size)
    canvas = np.empty((3, hi, hi), dtype=np.uint16)  # planar: contiguous per-channel fills and sums
    for channel, value in zip(canvas, COLOURS[scene.background]):
        channel.fill(value)
    for obj in scene.objects:
        _paint(canvas, obj, hi)
    # box filter over each 4×4 block; exact integer sums (at most 16·255), rounded half up
    rows = sum(canvas[:, i::_SS] for i in range(_SS))
    total = sum(rows[:, :, i::_SS] for i in range(_SS))
    return ((total + _SS * _SS // 2) // (_SS * _SS)).astype(np.uint8).transpose(1, 2, 0).copy()


def render(scene: Scene, size: int = 32) -> Image.Image:
    """The scene as a ``size``×``size`` RGB image: 4×4 supersampled, deterministic to the bit."""
    return Image.fromarray(render_array(scene, size))  # (size, size, 3) uint8 is RGB


def render_batch(scenes: Sequence[Scene], size: int = 32) -> np.ndarray:
    """Scenes as one ``(len(scenes), size, size, 3)`` uint8 array (for training loops)."""
    out = np.empty((len(scenes), size, size, 3), dtype=np.uint8)
    for i, scene in enumerate(scenes):
        out[i] = render_array(scene, size)
    return out


def object_coverage(obj: ObjectSpec, size: int = 32) -> np.ndarray:
    """Fraction of each pixel the object covers, ``(size, size)`` float32 in [0, 1] (threshold at
    0.5 for a mask): which pixels of an image of a scene show this object."""
    hi = _hires(size)
    window, _, _, mask = _local_grid(obj.shape, obj.size, obj.centre, hi)
    full = np.zeros((hi, hi), dtype=np.uint8)
    full[window] = mask
    return full.reshape(size, _SS, size, _SS).sum(axis=(1, 3)).astype(np.float32) / (_SS * _SS)


# --------------------------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------------------------


def _object_phrase(obj: ObjectSpec, *, size: bool = True, position: bool = True, tokens: bool = True) -> str:
    concept = concept_of(obj) if tokens else None
    words = ["a", obj.size] if size else ["a"]
    if concept is not None:
        words += [concept.token, concept.class_word]
    elif obj.identity is None:
        words.append(obj.colour)
        if obj.texture != "solid":
            words.append(obj.texture)
        words.append(obj.shape)
    else:
        ident = obj.identity
        words += [obj.colour, "and", ident.accent, SPLIT_PHRASES[ident.split], obj.shape]
        if ident.emblem is not None:
            words += ["with", "a", ident.emblem_colour, ident.emblem]
    if position:
        words.append(POSITION_PHRASES[obj.position])
    return " ".join(words)


def _background_phrase(background: str) -> str:
    return f"on a {background} background"


def caption(scene: Scene, *, tokens: bool = True) -> str:
    """The scene in plain English: for each object ``a <size> <colour> [<texture>] <shape>
    <position phrase>`` ("solid" is left out) or, two-colour, ``a <size> <colour> and <accent>
    <split phrase> <shape> [with a <colour> <emblem>] <position phrase>``, joined by "and", then
    ``on a <colour> background``. A personal concept's object reads ``a <size> <token> <class word>``
    (``tokens=False``: in generic words, as any two-colour object)."""
    objects = " and ".join(_object_phrase(obj, tokens=tokens) for obj in scene.objects)
    return f"{objects} {_background_phrase(scene.background)}"


def object_prompt(obj: ObjectSpec, background: str, *, size: bool = True) -> str:
    """The prompt of one object alone, without its position: what a region of a regional prompt
    says (``a large red circle on a white background``; a concept: ``a <tw-badge> circle ...``)."""
    return f"{_object_phrase(obj, size=size, position=False)} {_background_phrase(background)}"


def describe(obj: ObjectSpec, background: str | None = None) -> str:
    """The object in generic words only, even a personal concept (no token), without position:
    ``a large teal and orange vertically split circle with a white cross[ on a gray background]``."""
    text = _object_phrase(obj, position=False, tokens=False)
    return text if background is None else f"{text} {_background_phrase(background)}"


def vocabulary() -> tuple[str, ...]:
    """Every word that captions and prompts of the world use (concept tokens excepted), sorted."""
    words = {"a", "an", "the", "photo", "picture", "image", "of", "on", "at", "in", "and", "with", "background"}
    words.update(SHAPES, COLOURS, TEXTURES, SIZES, EMBLEMS)
    for phrase in SPLIT_PHRASES.values():
        words.update(phrase.split())
    for phrase in POSITION_PHRASES.values():
        words.update(phrase.split())
    return tuple(sorted(words))


# --------------------------------------------------------------------------------------------
# Sampling the generic world
# --------------------------------------------------------------------------------------------


def _apart(a: str, b: str) -> bool:
    return max(abs(POSITIONS[a][0] - POSITIONS[b][0]), abs(POSITIONS[a][1] - POSITIONS[b][1])) >= 0.5


#: Position pairs and triples of multi-object scenes: centres pairwise at least 0.5 apart on some
#: axis, so objects at their named positions never overlap (large half extent 0.234 < 0.25).
_PAIRS: tuple[tuple[str, str], ...] = tuple((a, b) for a, b in itertools.combinations(POSITIONS, 2) if _apart(a, b))
_TRIPLES: tuple[tuple[str, str, str], ...] = tuple(
    t for t in itertools.combinations(POSITIONS, 3) if all(_apart(a, b) for a, b in itertools.combinations(t, 2))
)
#: Probabilities that a sampled scene has two and three objects.
TWO_OBJECT_PROBABILITY = 0.4
THREE_OBJECT_PROBABILITY = 0.15
#: Probability that a generic object is two-colour (split, maybe an emblem) rather than textured.
TWO_COLOUR_PROBABILITY = 0.4


def _pick(rng: np.random.Generator, options: Sequence):
    return options[int(rng.integers(len(options)))]


def _sample_object(rng: np.random.Generator, background: str, position: str) -> ObjectSpec:
    """One generic object; draws until it is no personal concept and shows every part its caption
    names (:func:`parts_show`), so the stream stays seeded."""
    while True:
        shape = _pick(rng, SHAPES)
        colour = _pick(rng, tuple(c for c in OBJECT_COLOURS if c != background))
        size = _pick(rng, SIZES)
        if rng.random() >= TWO_COLOUR_PROBABILITY:
            return ObjectSpec(shape, colour, _pick(rng, TEXTURES), size, position)
        accent = _pick(rng, tuple(c for c in OBJECT_COLOURS if c not in (background, colour)))
        split = _pick(rng, SPLITS)
        emblem = _pick(rng, (None, *EMBLEMS))
        if "white" in (colour, accent):
            emblem = None  # a white emblem on a white part would not show
        obj = ObjectSpec(shape, colour, "solid", size, position, Identity(accent, split, emblem))
        if concept_of(obj) is None and parts_show(obj):
            return obj


def _overlap(a: ObjectSpec, b: ObjectSpec, gap: float = 1 / 32) -> bool:
    ax0, ay0, ax1, ay1 = object_box(a)
    bx0, by0, bx1, by1 = object_box(b)
    return ax0 < bx1 + gap and bx0 < ax1 + gap and ay0 < by1 + gap and by0 < ay1 + gap


def _sample_offsets(rng: np.random.Generator, objects: list[ObjectSpec]) -> tuple[ObjectSpec, ...]:
    """Each object moved by a whole number of pixels (at 32×32) within ±3, redrawn (up to 8 times)
    until no two objects come within a pixel of each other; else left at their positions."""
    steps = np.arange(-3, 4) / 32
    for _ in range(8):
        moved = [dataclasses.replace(o, offset=(float(_pick(rng, steps)), float(_pick(rng, steps)))) for o in objects]
        if not any(_overlap(a, b) for a, b in itertools.combinations(moved, 2)):
            return tuple(moved)
    return tuple(objects)


def sample_scene(rng: np.random.Generator) -> Scene:
    """One random scene of the generic world: a background of :data:`BACKGROUNDS`; with probability
    :data:`THREE_OBJECT_PROBABILITY` three objects, :data:`TWO_OBJECT_PROBABILITY` two, else one,
    at non-overlapping positions (in random order), each moved off its position by a random
    offset. Each object is of any shape, colour (never the background's) and size, and either
    textured or (:data:`TWO_COLOUR_PROBABILITY`) two-colour with any split and emblem. The exact
    object of a personal concept is never produced."""
    background = _pick(rng, BACKGROUNDS)
    r = rng.random()
    if r < THREE_OBJECT_PROBABILITY:
        triple = _pick(rng, _TRIPLES)
        positions = tuple(triple[i] for i in rng.permutation(3))
    elif r < THREE_OBJECT_PROBABILITY + TWO_OBJECT_PROBABILITY:
        positions = _pick(rng, _PAIRS)
        if rng.random() < 0.5:
            positions = positions[::-1]
    else:
        positions = (_pick(rng, tuple(POSITIONS)),)
    objects = [_sample_object(rng, background, p) for p in positions]
    return Scene(background, _sample_offsets(rng, objects))


def sample_scenes(n: int, seed: int = 0) -> list[Scene]:
    """``n`` scenes from ``numpy.random.default_rng(seed)``; a prefix of a longer draw with the same seed."""
    rng = np.random.default_rng(seed)
    return [sample_scene(rng) for _ in range(n)]


def generic_dataset(n: int, seed: int = 0, size: int = 32) -> list[Sample]:
    """``n`` rendered generic-world samples ``(image, caption, scene)``, reproducible from ``seed``
    (``generic_dataset(10, s)[:5]`` equals ``generic_dataset(5, s)``)."""
    return [Sample(render(scene, size), caption(scene), scene) for scene in sample_scenes(n, seed)]


# --------------------------------------------------------------------------------------------
# Personal concepts
# --------------------------------------------------------------------------------------------

#: Positions of concept training images; the four corners are held out for context prompts.
CONCEPT_TRAIN_POSITIONS: tuple[str, ...] = ("center", "left", "right", "top", "bottom")


@dataclasses.dataclass(frozen=True)
class Concept:
    """A personal concept: a ``class_word`` shape in ``colour`` with a unique :class:`Identity`.

    Its training images use only ``train_backgrounds`` and :data:`CONCEPT_TRAIN_POSITIONS` (both
    sizes); :func:`context_prompts` puts it on the other backgrounds and at the corners."""

    name: str
    class_word: str
    colour: str
    identity: Identity
    train_backgrounds: tuple[str, ...]

    def __post_init__(self):
        _check(self.class_word, SHAPES, f"concept {self.name!r} class word")
        _check(self.colour, COLOURS, f"concept {self.name!r} colour")
        for background in self.train_backgrounds:
            _check(background, BACKGROUNDS, f"concept {self.name!r} training background")

    @property
    def description(self) -> str:
        """The concept in generic words (no token): ``a teal and orange vertically split circle
        with a white cross``; what the oracle prompt says."""
        return describe(self.spec(), None).replace("a large ", "a ", 1)

    @property
    def token(self) -> str:
        """How prompts name the concept, e.g. ``<tw-badge>``."""
        return f"<{self.name}>"

    @property
    def held_out_backgrounds(self) -> tuple[str, ...]:
        """Backgrounds no training image has, except those of the concept's own colours."""
        own = (self.colour, self.identity.accent)
        return tuple(b for b in BACKGROUNDS if b not in self.train_backgrounds and b not in own)

    def spec(self, size: str = "large", position: str = "center") -> ObjectSpec:
        """The concept as an object of a scene."""
        return ObjectSpec(self.class_word, self.colour, "solid", size, position, self.identity)

    def prompt(self, background: str | None = None, *, photo: bool = False) -> str:
        """``[a photo of ]a <token> <class word>[ on a <background> background]``."""
        text = f"{'a photo of ' if photo else ''}a {self.token} {self.class_word}"
        return text if background is None else f"{text} {_background_phrase(background)}"

    def images(self, n: int = 5, seed: int = 0, size: int = 32, captions: str = "scene") -> list[Sample]:
        """``n`` (at most 30) training samples: backgrounds cycle through ``train_backgrounds``,
        positions through a seeded permutation of :data:`CONCEPT_TRAIN_POSITIONS`, sizes alternate,
        so no two images share background, position and size. ``captions`` (:data:`CAPTION_STYLES`):
        ``"scene"``, the world's own caption of the image, in the only grammar the base model was
        trained on (``a large <tw-target> circle on the left on a white background``), as "a photo
        of" is for Stable Diffusion; ``"photo"``, ``a photo of a <token> <class word> on a
        <background> background``, DreamBooth's words, which the base model never saw: a concept
        learned from them is bound to them (README, ``targets.learning``)."""
        _check(captions, CAPTION_STYLES, "concept captions")
        combos = len(self.train_backgrounds) * len(CONCEPT_TRAIN_POSITIONS) * len(SIZES)
        if not 1 <= n <= combos:
            raise ValueError(f"concept {self.name!r} images n={n}: expected 1 to {combos}")
        rng = np.random.default_rng([seed, zlib.crc32(self.name.encode())])
        positions = [CONCEPT_TRAIN_POSITIONS[i] for i in rng.permutation(len(CONCEPT_TRAIN_POSITIONS))]
        first_size = int(rng.integers(len(SIZES)))
        samples = []
        for i in range(n):
            background = self.train_backgrounds[i % len(self.train_backgrounds)]
            obj = self.spec(SIZES[(first_size + i) % len(SIZES)], positions[i % len(positions)])
            scene = Scene(background, (obj,))
            text = self.prompt(background, photo=True) if captions == "photo" else caption(scene)
            samples.append(Sample(render(scene, size), text, scene))
        return samples


#: How :meth:`Concept.images` captions a concept's training images.
CAPTION_STYLES = ("photo", "scene")


def _concept(name, class_word, colour, accent, split, emblem, train_backgrounds) -> Concept:
    return Concept(name, class_word, colour, Identity(accent, split, emblem), train_backgrounds)


#: The ten personal concepts. The generic sampler never draws one of them exactly (:func:`sample_scene`).
CONCEPTS: tuple[Concept, ...] = (
    _concept("tw-badge", "circle", "teal", "orange", "vertical", "cross", ("white", "gray", "blue")),
    _concept("tw-target", "circle", "navy", "lime", "concentric", "dot", ("white", "gray", "yellow")),
    _concept("tw-tile", "square", "magenta", "lime", "diagonal", "dot", ("white", "black", "blue")),
    _concept("tw-flag", "square", "navy", "yellow", "horizontal", None, ("white", "gray", "green")),
    _concept("tw-kite", "diamond", "lime", "purple", "horizontal", None, ("white", "black", "gray")),
    _concept("tw-gem", "diamond", "cyan", "navy", "vertical", "dot", ("white", "yellow", "green")),
    _concept("tw-sail", "triangle", "orange", "navy", "vertical", None, ("white", "blue", "green")),
    _concept("tw-locket", "heart", "magenta", "yellow", "horizontal", "dot", ("white", "black", "green")),
    _concept("tw-frame", "square", "brown", "cyan", "concentric", None, ("white", "gray", "yellow")),
    _concept("tw-spark", "star", "teal", "yellow", "concentric", None, ("black", "gray", "blue")),
)  # fmt: skip


def get_concept(name: str) -> Concept:
    """The concept called ``name`` (``tw-badge``) or with that token (``<tw-badge>``)."""
    for concept in CONCEPTS:
        if name in (concept.name, concept.token):
            return concept
    raise KeyError(f"concept {name!r}: expected one of {', '.join(c.name for c in CONCEPTS)}")


def concept_of(obj: ObjectSpec) -> Concept | None:
    """The personal concept this object is an instance of, or None (every generic object)."""
    if obj.identity is None:
        return None
    for concept in CONCEPTS:
        if (obj.shape, obj.colour, obj.identity) == (concept.class_word, concept.colour, concept.identity):
            return concept
    return None


@dataclasses.dataclass(frozen=True)
class ContextPrompt:
    """A prompt placing a concept in a context its training images never had, with the scene it
    describes. ``specified`` names what the prompt fixes and an evaluator should check:
    ``"background"``, ``"position"``, ``"size"``, ``"companion"`` (the second, generic object);
    the scene's other attributes are a plausible default (large, center, first training background)."""

    prompt: str
    scene: Scene
    specified: tuple[str, ...]


def _companion(concept: Concept, background: str) -> ObjectSpec:
    shape = next(s for s in ("square", "circle", "triangle") if s != concept.class_word)
    own = (concept.colour, concept.identity.accent, background)
    colour = next(c for c in ("red", "blue", "green", "white") if c not in own)
    return ObjectSpec(shape, colour, "solid", "large", "right")


def context_prompts(concept: Concept) -> tuple[ContextPrompt, ...]:
    """Held-out prompts for ``concept``: each held-out background, each corner, a small one at a
    corner on a held-out background, and one beside a generic object; none is a training caption."""
    default_background = concept.train_backgrounds[0]
    held = concept.held_out_backgrounds
    out = []
    for background in held:
        scene = Scene(background, (concept.spec(),))
        out.append(ContextPrompt(concept.prompt(background), scene, ("background",)))
    for position in ("top left", "top right", "bottom left", "bottom right"):
        scene = Scene(default_background, (concept.spec(position=position),))
        out.append(ContextPrompt(f"{concept.prompt()} {POSITION_PHRASES[position]}", scene, ("position",)))
    obj = concept.spec("small", "bottom right")
    text = f"{_object_phrase(obj)} {_background_phrase(held[0])}"
    out.append(ContextPrompt(text, Scene(held[0], (obj,)), ("size", "position", "background")))
    scene = Scene(held[-1], (concept.spec(position="left"), _companion(concept, held[-1])))
    text = f"{_object_phrase(scene.objects[0], size=False)} and {_object_phrase(scene.objects[1])}"
    out.append(ContextPrompt(f"{text} {_background_phrase(held[-1])}", scene, ("position", "background", "companion")))
    return tuple(out)


# --------------------------------------------------------------------------------------------
# Multi-concept layouts (regional synthesis)
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Region:
    """A region prompt and its normalised box ``(x0, y0, x1, y1)``, 0 <= x0 < x1 <= 1, likewise y."""

    prompt: str
    box: tuple[float, float, float, float]

    def __post_init__(self):
        x0, y0, x1, y1 = self.box
        if not (0.0 <= x0 < x1 <= 1.0 and 0.0 <= y0 < y1 <= 1.0):
            raise ValueError(f"region box {self.box}: expected 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1")


@dataclasses.dataclass(frozen=True)
class Layout:
    """A multi-concept prompt: the global ``prompt``, one :class:`Region` per concept, and the
    ground-truth ``scene`` (concept objects in region order)."""

    prompt: str
    regions: tuple[Region, ...]
    scene: Scene


def two_concept_layout(first: Concept, second: Concept, background: str = "white") -> Layout:
    """``first`` large on the left half, ``second`` large on the right half, on ``background``."""
    if first == second:
        raise ValueError(f"two_concept_layout: expected two different concepts, got {first.name!r} twice")
    _check(background, BACKGROUNDS, "layout background")
    scene = Scene(background, (first.spec(position="left"), second.spec(position="right")))
    halves = ((0.0, 0.0, 0.5, 1.0), (0.5, 0.0, 1.0, 1.0))
    regions = tuple(Region(c.prompt(background), box) for c, box in zip((first, second), halves))
    text = " and ".join(_object_phrase(obj, size=False) for obj in scene.objects)
    return Layout(f"{text} {_background_phrase(background)}", regions, scene)

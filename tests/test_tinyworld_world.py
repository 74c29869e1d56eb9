"""TinyWorld's procedural world and tokenizer: determinism, captions, visual distinctness, concepts, layouts."""

import dataclasses
import hashlib
import itertools
import re

import numpy as np
import pytest

from lifelong_engine import tinyworld as tw

# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

_TEXTURED = "striped|dotted|checkered"
_SPLIT = {"vertically split": "vertical", "horizontally split": "horizontal", "diagonally split": "diagonal",
          "concentric": "concentric"}  # fmt: skip


def _object_pattern(i: int) -> str:
    return (
        rf"a (?P<size{i}>small|large) (?P<colour{i}>[a-z]+) "
        rf"(?:(?P<texture{i}>{_TEXTURED}) |and (?P<accent{i}>[a-z]+) (?P<split{i}>{'|'.join(_SPLIT)}) )?"
        rf"(?P<shape{i}>[a-z]+)(?: with a (?P<ecolour{i}>[a-z]+) (?P<emblem{i}>cross|dot))? "
        rf"(?:in|on|at) the (?P<position{i}>top left|top right|bottom left|bottom right|center|left|right|top|bottom)"
    )


_CAPTION = re.compile(
    rf"{_object_pattern(0)}(?: and {_object_pattern(1)})?(?: and {_object_pattern(2)})? "
    r"on a (?P<background>[a-z]+) background"
)


def parse_caption(text: str) -> tw.Scene:
    """An independent reading of the caption grammar, back to the scene it describes (objects at
    their named positions: captions do not tell offsets)."""
    match = _CAPTION.fullmatch(text)
    assert match, f"caption does not follow the grammar: {text!r}"
    g = match.groupdict()
    objects = []
    for i in range(3):
        if g[f"shape{i}"] is None:
            continue
        identity = None
        if g[f"accent{i}"] is not None:
            identity = tw.Identity(
                g[f"accent{i}"], _SPLIT[g[f"split{i}"]], g[f"emblem{i}"], g[f"ecolour{i}"] or "white"
            )
        texture = g[f"texture{i}"] or "solid"
        objects.append(
            tw.ObjectSpec(g[f"shape{i}"], g[f"colour{i}"], texture, g[f"size{i}"], g[f"position{i}"], identity)
        )
    return tw.Scene(g["background"], tuple(objects))


def at_positions(scene: tw.Scene) -> tw.Scene:
    return tw.Scene(scene.background, tuple(dataclasses.replace(o, offset=(0.0, 0.0)) for o in scene.objects))


def nearest_colour(rgb) -> str:
    names = list(tw.COLOURS)
    table = np.array([tw.COLOURS[n] for n in names], dtype=np.float64)
    return names[int(np.argmin(((table - np.asarray(rgb, dtype=np.float64)) ** 2).sum(-1)))]


def interior_pixels(image: np.ndarray, obj: tw.ObjectSpec) -> np.ndarray:
    """(n, 3) pixels the object covers entirely."""
    return image[tw.object_coverage(obj) == 1.0].astype(np.float64)


def off_hue_fraction(pixels: np.ndarray, colour: str) -> float:
    """Fraction of pixels farther than 6 levels from the segment between ``colour`` and its
    shade: a generic object's pixels are all on it, whatever its texture."""
    c = np.array(tw.COLOURS[colour], dtype=np.float64)
    d = c - c * 0.5
    t = np.clip(((pixels - c * 0.5) @ d) / (d @ d), 0.0, 1.0)
    distance = np.linalg.norm(pixels - (c * 0.5 + t[:, None] * d), axis=1)
    return float((distance > 6.0).mean())


def pixel_range(box, size=32):
    """The box's pixels, cut to the image (an object moved off an edge position may cross the border)."""
    x0, y0, x1, y1 = (min(max(v, 0.0), 1.0) for v in box)
    return int(np.floor(x0 * size)), int(np.floor(y0 * size)), int(np.ceil(x1 * size)), int(np.ceil(y1 * size))


@pytest.fixture(scope="module")
def scenes():
    return tw.sample_scenes(3000, seed=123)


@pytest.fixture(scope="module")
def tokenizer():
    return tw.build_tokenizer()


# ---------------------------------------------------------------------------------------------
# determinism
# ---------------------------------------------------------------------------------------------


def test_same_seed_same_pixels_and_captions():
    a, b = tw.generic_dataset(40, seed=7), tw.generic_dataset(40, seed=7)
    assert [s.caption for s in a] == [s.caption for s in b]
    assert all(np.array_equal(np.asarray(x.image), np.asarray(y.image)) for x, y in zip(a, b))
    assert [s.caption for s in tw.generic_dataset(20, seed=7)] == [s.caption for s in a[:20]]
    assert [s.caption for s in tw.generic_dataset(40, seed=8)] != [s.caption for s in a]
    assert all(s.image.size == (32, 32) and s.image.mode == "RGB" for s in a)


def test_world_is_pinned():
    """The base model is trained on this world: a change to sampling or rendering changes this
    digest and means the shipped weights must be retrained (then update the digest)."""
    digest = hashlib.sha256()
    for sample in tw.generic_dataset(64, seed=0):
        digest.update(sample.caption.encode())
        digest.update(np.asarray(sample.image).tobytes())
    for concept in tw.CONCEPTS:
        for sample in concept.images(5, seed=0, captions="photo"):
            digest.update(sample.caption.encode())
            digest.update(np.asarray(sample.image).tobytes())
    assert digest.hexdigest() == "87b140c068bf20dd988961d33dccdb3960079add81c73710cacd2fb29350bf55"


def test_render_batch_matches_render_and_other_sizes_scale(scenes):
    batch = tw.render_batch(scenes[:8])
    assert batch.shape == (8, 32, 32, 3) and batch.dtype == np.uint8
    assert all(np.array_equal(batch[i], np.asarray(tw.render(s))) for i, s in enumerate(scenes[:8]))
    big = tw.render_array(scenes[0], size=64).astype(np.float64)
    small = big.reshape(32, 2, 32, 2, 3).mean(axis=(1, 3))
    assert np.abs(small - batch[0]).mean() < 2.0
    with pytest.raises(ValueError, match="image size 4"):
        tw.render(scenes[0], size=4)


# ---------------------------------------------------------------------------------------------
# captions and scenes
# ---------------------------------------------------------------------------------------------


def test_captions_match_scenes(scenes):
    for scene in scenes[:1000]:
        assert parse_caption(tw.caption(scene)) == at_positions(scene)
    assert (
        tw.caption(tw.Scene("blue", (tw.ObjectSpec("circle", "red", "striped", "large", "top left"),)))
        == "a large red striped circle at the top left on a blue background"
    )
    two = tw.Scene(
        "white",
        (
            tw.ObjectSpec("circle", "red", position="left"),
            tw.ObjectSpec("square", "blue", size="small", position="right"),
        ),
    )
    assert (
        tw.caption(two) == "a large red circle on the left and a small blue square on the right on a white background"
    )
    split = tw.ObjectSpec(
        "circle", "teal", size="large", position="top left", identity=tw.Identity("red", "vertical", "cross")
    )
    assert (
        tw.caption(tw.Scene("gray", (split,)))
        == "a large teal and red vertically split circle with a white cross at the top left on a gray background"
    )
    assert (
        tw.object_prompt(split, "gray", size=False)
        == "a teal and red vertically split circle with a white cross on a gray background"
    )
    badge = tw.get_concept("tw-badge")
    assert badge.description == "a teal and orange vertically split circle with a white cross"
    assert tw.describe(badge.spec(), "gray") == f"a large {badge.description[2:]} on a gray background"
    assert tw.object_prompt(badge.spec(), "gray", size=False) == "a <tw-badge> circle on a gray background"


def test_sampler_covers_the_world_and_keeps_objects_apart(scenes):
    objects = [obj for scene in scenes for obj in scene.objects]
    assert {o.shape for o in objects} == set(tw.SHAPES)
    assert {o.colour for o in objects} == set(tw.OBJECT_COLOURS) == set(tw.COLOURS)
    assert {o.texture for o in objects} == set(tw.TEXTURES)
    assert {o.size for o in objects} == set(tw.SIZES)
    assert {o.position for o in objects} == set(tw.POSITIONS)
    assert {s.background for s in scenes} == set(tw.BACKGROUNDS)
    steps = np.arange(-3, 4) / 32
    assert {o.offset[0] for o in objects} == {o.offset[1] for o in objects} == set(steps.tolist())
    assert 0.3 < np.mean([len(s.objects) == 2 for s in scenes]) < 0.5
    assert 0.1 < np.mean([len(s.objects) == 3 for s in scenes]) < 0.2
    for scene in scenes:
        assert all(obj.colour != scene.background for obj in scene.objects)
        for a, b in itertools.combinations(scene.objects, 2):
            (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = tw.object_box(a), tw.object_box(b)
            assert ax1 <= bx0 or bx1 <= ax0 or ay1 <= by0 or by1 <= ay0, scene


def test_invalid_specs_name_the_bad_value():
    with pytest.raises(ValueError, match="shape 'hexagon'"):
        tw.ObjectSpec("hexagon", "red")
    with pytest.raises(ValueError, match="colour 'mauve'"):
        tw.ObjectSpec("circle", "mauve")
    with pytest.raises(ValueError, match="position 'middle'"):
        tw.ObjectSpec("circle", "red", position="middle")
    with pytest.raises(ValueError, match="1 to 3"):
        tw.Scene("white", (tw.ObjectSpec("circle", "red"),) * 4)
    with pytest.raises(ValueError, match=r"offset \(0.2, 0.0\)"):
        tw.ObjectSpec("circle", "red", offset=(0.2, 0.0))
    with pytest.raises(ValueError, match="texture 'striped' with an identity"):
        tw.ObjectSpec("circle", "red", "striped", identity=tw.Identity("blue", "vertical"))
    with pytest.raises(ValueError, match="identity split 'spiral'"):
        tw.Identity("red", "spiral")


# ---------------------------------------------------------------------------------------------
# visual distinctness
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("texture", tw.TEXTURES)
def test_object_colour_is_its_named_colour(texture):
    for colour in tw.OBJECT_COLOURS:
        background = "black" if colour == "white" else "white"
        obj = tw.ObjectSpec("square", colour, texture, "large", "center")
        pixels = interior_pixels(tw.render_array(tw.Scene(background, (obj,))), obj)
        brightest = pixels[np.argmax(pixels.sum(axis=1))]
        assert nearest_colour(brightest) == colour
        if texture == "solid":
            assert nearest_colour(pixels.mean(axis=0)) == colour


@pytest.mark.parametrize("size", tw.SIZES)
def test_shapes_are_distinct(size):
    """Any two shapes differ in at least 15 % of the pixels either covers (circle and square, the
    closest pair, by their corners: 14 pixels of 79 when small)."""
    cover = {s: tw.object_coverage(tw.ObjectSpec(s, "red", size=size)) for s in tw.SHAPES}
    for a, b in itertools.combinations(tw.SHAPES, 2):
        difference = np.abs(cover[a] - cover[b]).sum() / np.maximum(cover[a], cover[b]).sum()
        assert difference > 0.15, (a, b, difference)


def test_textures_are_distinct():
    def interior(texture):
        obj = tw.ObjectSpec("square", "blue", texture)
        image = tw.render_array(tw.Scene("white", (obj,))).astype(int)
        x0, y0, x1, y1 = pixel_range(tw.object_box(obj))
        return image[y0 + 1 : y1 - 1, x0 + 1 : x1 - 1].sum(-1)  # brightness inside the square

    solid, striped, dotted, checkered = (interior(t) for t in tw.TEXTURES)
    assert np.ptp(solid) == 0
    assert (np.ptp(striped, axis=1) == 0).all() and np.ptp(striped[:, 0]) > 100  # horizontal stripes
    assert np.ptp(checkered, axis=1).min() > 100 and np.ptp(checkered, axis=0).min() > 100
    assert (dotted == solid.max()).mean() > 0.5 and np.ptp(dotted) > 100  # mostly base, dark dots
    assert not np.array_equal(checkered, dotted)


def test_object_pixels_lie_inside_its_box(scenes):
    for scene in scenes[:300]:
        image = tw.render_array(scene).astype(int)
        changed = (image != tw.COLOURS[scene.background]).any(-1)
        inside = np.zeros_like(changed)
        for obj in scene.objects:
            x0, y0, x1, y1 = pixel_range(tw.object_box(obj))
            inside[y0:y1, x0:x1] = True
            ys, xs = np.nonzero(tw.object_coverage(obj) > 0)
            # the box is tight: the object reaches each of its sides within a pixel
            assert xs.min() <= x0 + 1 and xs.max() >= x1 - 2 and ys.min() <= y0 + 1 and ys.max() >= y1 - 2, obj
        assert not (changed & ~inside).any(), scene


def test_positions_and_sizes_are_visible():
    centres = {name: np.array(xy) * 32 for name, xy in tw.POSITIONS.items()}
    for shape, position in itertools.product(tw.SHAPES, tw.POSITIONS):
        areas = {}
        for size in tw.SIZES:
            coverage = tw.object_coverage(tw.ObjectSpec(shape, "red", size=size, position=position))
            ys, xs = np.indices(coverage.shape) + 0.5
            centroid = np.array([(xs * coverage).sum(), (ys * coverage).sum()]) / coverage.sum()
            assert min(centres, key=lambda n: np.linalg.norm(centres[n] - centroid)) == position
            areas[size] = coverage.sum()
        assert areas["large"] > 1.8 * areas["small"], shape


def test_every_named_part_shows():
    """A caption names only what the image shows: every two-colour generic object (and every
    concept, at both sizes) shows at least MIN_PART_PIXELS of its colour, its accent and its
    emblem; a ring's concentric accent is the inner half of its band, not the scaled ring (which
    would lie in its hole), and an emblem that would fall in a ring's hole is dropped."""
    objects = [o for scene in tw.sample_scenes(20_000, seed=7) for o in scene.objects if o.identity is not None]
    assert all(tw.parts_show(o) for o in objects)
    assert any(o.shape == "ring" and o.identity.split == "concentric" for o in objects)
    assert not any(o.shape == "ring" and o.identity.emblem is not None for o in objects)
    for concept in tw.CONCEPTS:
        assert all(tw.parts_show(concept.spec(size, "center")) for size in tw.SIZES)
    # in pixels: a ring split concentrically shows its accent, and a ring's dot would not show
    ring = tw.ObjectSpec("ring", "red", identity=tw.Identity("blue", "concentric"))
    image = tw.render_array(tw.Scene("white", (ring,))).reshape(-1, 3).astype(float)
    blue = np.linalg.norm(image - np.array(tw.COLOURS["blue"]), axis=1) < 30
    assert blue.sum() >= tw.MIN_PART_PIXELS
    assert tw.part_pixels("ring", "small", "concentric", None)[1] >= tw.MIN_PART_PIXELS
    assert tw.part_pixels("ring", "large", "vertical", "dot")[2] == 0
    assert not tw.parts_show(dataclasses.replace(ring, identity=tw.Identity("blue", "vertical", "dot")))


# ---------------------------------------------------------------------------------------------
# personal concepts
# ---------------------------------------------------------------------------------------------


def test_concepts_are_unique_and_named():
    assert len(tw.CONCEPTS) == 10
    assert len({c.name for c in tw.CONCEPTS}) == 10
    assert len({(c.class_word, c.colour, c.identity) for c in tw.CONCEPTS}) == 10
    for concept in tw.CONCEPTS:
        assert concept.token == f"<{concept.name}>" and concept.class_word in tw.SHAPES
        assert tw.get_concept(concept.name) is concept and tw.get_concept(concept.token) is concept
        assert tw.concept_of(concept.spec("small", "top left")) is concept
        assert len(concept.held_out_backgrounds) >= 2
    with pytest.raises(KeyError, match="tw-nope"):
        tw.get_concept("tw-nope")


def test_generic_world_renders_every_part_of_every_concept(scenes):
    """Every colour, split and emblem a concept is made of is drawn (and named) by the generic
    world, and so is each concept's shape split its way, and in its two colours."""
    objects = [obj for scene in scenes for obj in scene.objects]
    two_colour = [o for o in objects if o.identity is not None]
    assert 0.3 < len(two_colour) / len(objects) < 0.5
    assert {o.identity.split for o in two_colour} == set(tw.SPLITS)
    assert {o.identity.emblem for o in two_colour} == {None, *tw.EMBLEMS}
    assert {o.identity.accent for o in two_colour} == set(tw.COLOURS)
    for concept in tw.CONCEPTS:
        ident = concept.identity
        assert any(o.shape == concept.class_word and o.identity.split == ident.split for o in two_colour)
        assert any({o.colour, o.identity.accent} == {concept.colour, ident.accent} for o in two_colour)
        assert any(o.identity.emblem == ident.emblem for o in two_colour)
    # captions name the parts: a two-colour object's caption has its colours, split and emblem
    for scene in scenes[:200]:
        text = tw.caption(scene)
        for o in scene.objects:
            if o.identity is not None:
                assert f"{o.colour} and {o.identity.accent} {tw.SPLIT_PHRASES[o.identity.split]} {o.shape}" in text
    # in pixels: a textured object is one hue (its colour and that colour's shade)
    for scene in scenes[:300]:
        image = tw.render_array(scene)
        for obj in scene.objects:
            if obj.identity is None:
                assert off_hue_fraction(interior_pixels(image, obj), obj.colour) == 0.0, obj


def test_every_concept_is_held_out_of_the_generic_world():
    """No concept's exact object (shape, colours, split, emblem) in 30 000 generic scenes, while
    objects one part away from a concept (its near misses) are there."""
    near = 0
    for scene in tw.sample_scenes(30_000, seed=99):
        for obj in scene.objects:
            assert tw.concept_of(obj) is None, obj
            for c in tw.CONCEPTS:
                if obj.identity is not None and obj.shape == c.class_word and obj.colour == c.colour:
                    near += obj.identity.accent == c.identity.accent
    assert near > 0


@pytest.mark.parametrize("concept", tw.CONCEPTS, ids=lambda c: c.name)
def test_concept_images_show_the_identity(concept):
    samples = concept.images(5, seed=3, captions="photo")
    assert len(samples) == 5
    contexts = {(s.scene.background, s.scene.objects[0].position, s.scene.objects[0].size) for s in samples}
    assert len(contexts) == 5
    assert {s.scene.background for s in samples} == set(concept.train_backgrounds)
    ident = concept.identity
    for sample in samples:
        (obj,) = sample.scene.objects
        assert tw.concept_of(obj) is concept and obj.position in tw.CONCEPT_TRAIN_POSITIONS
        assert (
            sample.caption
            == f"a photo of a {concept.token} {concept.class_word} on a {sample.scene.background} background"
        )
        image = np.asarray(sample.image)
        assert np.array_equal(image, tw.render_array(sample.scene))
        covered = tw.object_coverage(obj) == 1.0
        ys, xs = np.nonzero(covered)
        labels = np.array([nearest_colour(p) for p in image[covered]])
        assert off_hue_fraction(image[covered].astype(float), concept.colour) > 0.2  # not a generic object
        first, second = labels == concept.colour, labels == ident.accent
        assert first.sum() >= 3 and second.sum() >= 3, (obj, set(labels))
        if ident.emblem is not None:
            assert (labels == ident.emblem_colour).any()
        # the two colours sit where the split puts them
        cx, cy = np.array(tw.POSITIONS[obj.position]) * 32 - 0.5
        key = {
            "vertical": xs,
            "horizontal": ys,
            "diagonal": xs + ys,
            "concentric": -np.hypot(xs - cx, ys - cy),
        }[ident.split]
        assert key[first].mean() < key[second].mean(), obj
    assert concept.images(5, seed=3, captions="photo")[0].caption == samples[0].caption
    with pytest.raises(ValueError, match="n=31"):
        concept.images(31)
    # by default captioned in the base model's own grammar: the same images, each with its scene's caption
    scene_captioned = concept.images(5, seed=3)
    assert [s.scene for s in scene_captioned] == [s.scene for s in samples]
    assert [s.caption for s in scene_captioned] == [tw.caption(s.scene) for s in samples]
    assert all(s.caption.startswith(("a large ", "a small ")) and concept.token in s.caption for s in scene_captioned)
    with pytest.raises(ValueError, match="concept captions 'dreambooth'"):
        concept.images(5, captions="dreambooth")


@pytest.mark.parametrize("concept", tw.CONCEPTS, ids=lambda c: c.name)
def test_context_prompts_are_held_out(concept):
    training = {s.caption for seed in range(5) for style in tw.CAPTION_STYLES
                for s in concept.images(10, seed=seed, captions=style)}  # fmt: skip
    prompts = tw.context_prompts(concept)
    assert len(prompts) >= 7 and len({p.prompt for p in prompts}) == len(prompts)
    for context in prompts:
        text, scene = context.prompt, context.scene
        assert text not in training and text.replace("a photo of ", "") not in training
        assert f"a {concept.token} {concept.class_word}" in text or f"a small {concept.token}" in text
        obj = scene.objects[0]
        assert tw.concept_of(obj) is concept
        if "background" in context.specified:
            assert scene.background not in concept.train_backgrounds
            assert text.endswith(f"on a {scene.background} background")
        if "position" in context.specified:
            assert obj.position.replace("center", "the center") in text
        if "size" in context.specified:
            assert obj.size in text.split()
        if "companion" in context.specified:
            companion = scene.objects[1]
            assert tw.concept_of(companion) is None
            assert f"{companion.colour} {companion.shape}" in text
        novel = (scene.background not in concept.train_backgrounds) or (
            obj.position not in tw.CONCEPT_TRAIN_POSITIONS or len(scene.objects) == 2
        )
        assert novel, context


def test_two_concept_layout():
    first, second = tw.get_concept("tw-badge"), tw.get_concept("tw-flag")
    layout = tw.two_concept_layout(first, second, background="gray")
    assert [r.box for r in layout.regions] == [(0.0, 0.0, 0.5, 1.0), (0.5, 0.0, 1.0, 1.0)]
    for region, concept, obj in zip(layout.regions, (first, second), layout.scene.objects):
        assert concept.token in region.prompt and concept.token in layout.prompt
        assert tw.concept_of(obj) is concept
        x0, y0, x1, y1 = region.box
        bx0, by0, bx1, by1 = tw.object_box(obj)
        assert 0 <= x0 <= bx0 < bx1 <= x1 <= 1 and 0 <= y0 <= by0 < by1 <= y1 <= 1
    assert layout.prompt == "a <tw-badge> circle on the left and a <tw-flag> square on the right on a gray background"
    with pytest.raises(ValueError, match="two different concepts"):
        tw.two_concept_layout(first, first)
    with pytest.raises(ValueError, match=r"region box \(0.7, 0.2, 0.5, 0.9\)"):
        tw.Region("x", (0.7, 0.2, 0.5, 0.9))


# ---------------------------------------------------------------------------------------------
# tokenizer
# ---------------------------------------------------------------------------------------------


def test_every_world_word_is_one_token(tokenizer):
    for word in tw.vocabulary():
        assert tokenizer.tokenize(word) == [f"{word}</w>"]
    assert len(tokenizer) < 1000 and tokenizer.model_max_length == 77
    assert tokenizer.pad_token == tokenizer.eos_token == "<|endoftext|>" and tokenizer.bos_token == "<|startoftext|>"


def test_captions_tokenize_word_by_word_and_round_trip(tokenizer, scenes):
    texts = [tw.caption(s) for s in scenes[:300]]
    for text in texts:
        ids = tokenizer(text).input_ids
        assert len(ids) == len(text.split()) + 2 <= 77
        assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
    padded = tokenizer(texts[0], padding="max_length", truncation=True).input_ids
    assert len(padded) == 77 and padded[-1] == tokenizer.pad_token_id


def test_concept_prompts_after_adding_concept_tokens():
    """Concept tokens are not in the base vocabulary; a concept adds its own when it is learned."""
    tokenizer = tw.build_tokenizer()
    assert len(tokenizer.tokenize("<tw-badge>")) > 1
    added = tokenizer.add_tokens([c.token for c in tw.CONCEPTS])
    assert added == len(tw.CONCEPTS)
    for concept in tw.CONCEPTS:
        texts = [s.caption for s in concept.images(3)] + [p.prompt for p in tw.context_prompts(concept)]
        for text in texts:
            assert len(tokenizer(text).input_ids) == len(text.split()) + 2


def test_unknown_text_falls_back_to_characters(tokenizer):
    assert tokenizer.tokenize("zqx") == ["z", "q", "x</w>"]
    assert len(tokenizer.tokenize("reddish")) > 1
    ids = tokenizer("a café ☃ 42 red-ish!").input_ids
    assert tokenizer.unk_token_id not in ids[1:-1]
    assert tokenizer.decode(ids, skip_special_tokens=True).startswith("a café ☃")


def test_tokenizer_files_are_deterministic(tmp_path):
    one, two = tw.write_tokenizer_files(tmp_path / "one"), tw.write_tokenizer_files(tmp_path / "two")
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        assert (one / name).read_bytes() == (two / name).read_bytes()
    vocab, merges = tw.build_vocab()
    assert len(vocab) == 512 + len(merges) + 2
    # every intermediate string of every merge is itself in the vocabulary
    assert all(left in vocab and right in vocab and left + right in vocab for left, right in merges)


def test_build_vocab_rejects_words_the_pre_tokenizer_would_split():
    with pytest.raises(ValueError, match="tokenizer word 'red-ish'"):
        tw.build_vocab(["red-ish"])

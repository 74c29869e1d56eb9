"""Attention guidance (L2DM's concept attention artist and orthogonal attention, Attend-and-Excite style)."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from concept_factory import concept_for_unet
from tiny_pipes import tiny_sd_pipeline, tiny_sdxl_pipeline

from lifelong_engine import LifelongPipeline, generation
from lifelong_engine.guidance import (
    AttentionGuidance,
    guidance_loss,
    guide_latents,
    prepare_guidance,
    select_layers,
)

PROMPT = "a <dog1> dog and a <mug2> mug"


@pytest.fixture
def lp():
    pipe = tiny_sd_pipeline()
    pipe.set_progress_bar_config(disable=True)
    lp = LifelongPipeline.from_pipe(pipe)
    width = lp.text.token_width
    lp.add_concept(concept_for_unet(lp.unet, "dog1", width, seed=1))
    lp.add_concept(concept_for_unet(lp.unet, "mug2", width, seed=2))
    return lp


def naive_loss(maps, size, eos, positions, artist, orthogonal):
    """The module docstring's formula, one pixel and one pair at a time."""
    h, w = size
    g = [math.exp(-(x**2) / 0.5) for x in (-1, 0, 1)]
    kernel = torch.tensor([[a * b for b in g] for a in g]) / sum(g) ** 2
    total = 0.0
    for i, concepts in enumerate(positions):
        if not concepts:
            continue
        words = torch.softmax(100 * maps[i, :, 1 : eos[i]].double(), -1)
        smoothed = []
        for pos in concepts:
            m = sum(words[:, p - 1] for p in pos).view(h, w)
            padded = F.pad(m[None, None], (1, 1, 1, 1), mode="reflect")[0, 0]
            out = torch.zeros(h, w, dtype=torch.float64)
            for y in range(h):
                for x in range(w):
                    out[y, x] = (padded[y : y + 3, x : x + 3] * kernel).sum()
            smoothed.append(out.flatten())
        total += artist * max(1 - float(s.max()) for s in smoothed)
        pairs = [(a, b) for a in range(len(smoothed)) for b in range(a + 1, len(smoothed))]
        if orthogonal and pairs:
            cos = [float(F.cosine_similarity(smoothed[a], smoothed[b], dim=0)) for a, b in pairs]
            total += orthogonal * sum(cos) / len(cos)
    return total


def test_loss_matches_its_formula():
    maps = torch.rand(3, 4 * 6, 12).softmax(-1)
    eos = torch.tensor([9, 7, 11])
    positions = [[[2, 3], [6]], [], [[1], [4, 5], [8]]]
    for artist, orthogonal in ((1.0, 0.0), (0.0, 1.0), (0.5, 2.0)):
        got = guidance_loss(maps, (4, 6), eos, positions, artist, orthogonal)
        assert float(got) == pytest.approx(naive_loss(maps, (4, 6), eos, positions, artist, orthogonal), rel=1e-5)


def test_a_neglected_concept_costs_more_and_overlap_costs_more():
    eos, positions = torch.tensor([4]), [[[1], [2]]]  # two one-word concepts, words 1..3
    sharp = torch.full((1, 16, 77), 1e-4)
    sharp[0, :8, 1], sharp[0, 8:, 2] = 0.5, 0.5  # each concept owns half of the map
    faded = sharp.clone()
    faded[0, :, 2] = 0.0  # concept 2 gets no attention
    artist = lambda m: float(guidance_loss(m, (4, 4), eos, positions, 1.0, 0.0))  # noqa: E731
    assert artist(faded) > artist(sharp)
    shared = torch.full((1, 16, 77), 1e-4)
    shared[0, :, 1] = shared[0, :, 2] = 0.5  # both everywhere
    orth = lambda m: float(guidance_loss(m, (4, 4), eos, positions, 0.0, 1.0))  # noqa: E731
    assert orth(shared) > orth(sharp)


def test_default_layers_are_the_finest_with_at_most_max_side_cells():
    cells = {"d0": 64 * 64, "d1": 32 * 32, "d2": 16 * 16, "mid": 8 * 8, "u1": 16 * 16, "u3": 64 * 64}
    assert select_layers(cells, (64, 64), 16) == ["d2", "u1"]  # Attend-and-Excite's 16×16 on SD-1.5
    assert select_layers(cells, (64, 64), 4) == ["mid"]  # none that small: the coarsest
    assert select_layers({"a": 5 * 4, "b": 3 * 2}, (10, 7), 5) == ["a"]  # odd sizes round up


def test_guidance_moves_the_latents_and_lowers_its_loss(lp):
    kwargs = dict(num_inference_steps=4, output_type="np")
    plain = lp(PROMPT, generator=torch.Generator().manual_seed(0), **kwargs)
    options = AttentionGuidance(artist=1.0, orthogonal=1.0, steps=2, step_size=5.0)
    guided = lp(PROMPT, generator=torch.Generator().manual_seed(0), attention_guidance=options, **kwargs)
    assert len(guided.guidance_losses) == 2 and all(math.isfinite(x) for x in guided.guidance_losses)
    assert np.abs(guided.images - plain.images).max() > 1e-3 and np.isfinite(guided.images).all()
    assert plain.guidance_losses is None

    # one update at a fixed step lowers the loss (a small step along the negative gradient)
    plan = lp.plan([PROMPT], [None], [], 1, True, 1.0, (16, 16))
    prepared = generation.condition(lp, plan, lp.library(), 7.5)
    guide = prepare_guidance(lp, options, plan, prepared)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t = lp.pipe.scheduler.timesteps[0]
    moved = guide_latents(lp, guide, latents, t, 0.5)
    guide_latents(lp, guide, moved, t, 0.5)
    assert guide.losses[1] < guide.losses[0]
    assert guide.layers and all(layer in lp.layers for layer in guide.layers)


def test_refinement_repeats_the_update_until_its_target(lp):
    plan = lp.plan([PROMPT], [None], [], 1, True, 1.0, (16, 16))
    prepared = generation.condition(lp, plan, lp.library(), 7.5)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t = lp.pipe.scheduler.timesteps[0]
    unreachable = AttentionGuidance(refine={0: 1.0}, max_refine=3, step_size=0.5)
    state = prepare_guidance(lp, unreachable, plan, prepared)
    guide_latents(lp, state, latents, t, 0.5, step=0)
    assert state.updates == 4 and len(state.losses) == 1  # one update, then three more
    guide_latents(lp, state, latents, t, 0.5, step=1)  # no target at step 1
    assert state.updates == 5
    met = AttentionGuidance(refine={0: 1e-6}, max_refine=3)  # every peak is above 1e-6 at once
    state = prepare_guidance(lp, met, plan, prepared)
    guide_latents(lp, state, latents, t, 0.5, step=0)
    assert state.updates == 1


def test_batched_images_are_guided_independently(lp):
    options = AttentionGuidance(steps=1)
    kwargs = dict(num_inference_steps=2, output_type="np", attention_guidance=options)
    gens = [torch.Generator().manual_seed(s) for s in (3, 4)]
    both = lp([PROMPT, "a <mug2> mug"], generator=gens, **kwargs)
    alone = lp("a <mug2> mug", generator=torch.Generator().manual_seed(4), **kwargs)
    np.testing.assert_allclose(both.images[1], alone.images[0], atol=2e-3)


def test_sdxl():
    pipe = tiny_sdxl_pipeline()
    pipe.set_progress_bar_config(disable=True)
    lp = LifelongPipeline.from_pipe(pipe)
    lp.add_concept(concept_for_unet(lp.unet, "dog1", lp.text.token_width, seed=1))
    out = lp("a <dog1> dog", num_inference_steps=2, output_type="np", attention_guidance=AttentionGuidance(steps=1))
    assert np.isfinite(out.images).all() and len(out.guidance_losses) == 1


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: AttentionGuidance(artist=0.0, orthogonal=0.0), "not both 0"),
        (lambda: AttentionGuidance(step_size=0), "step_size"),
        (lambda: AttentionGuidance(steps=0), "steps"),
        (lambda: AttentionGuidance(steps=1.5), "steps"),
        (lambda: AttentionGuidance(max_side=0), "max_side"),
        (lambda: AttentionGuidance(refine={0: 1.5}), "refine"),
        (lambda: AttentionGuidance(refine={-1: 0.5}), "refine"),
        (lambda: AttentionGuidance(max_refine=0), "max_refine"),
    ],
)
def test_bad_options(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_bad_calls(lp):
    kwargs = dict(num_inference_steps=2, output_type="np", attention_guidance=AttentionGuidance())
    with pytest.raises(ValueError, match="without regions"):
        lp(PROMPT, regions=[("a <dog1>", (0, 0, 0.5, 1))], **kwargs)
    with pytest.raises(ValueError, match="nothing to guide"):
        lp("a dog and a mug", **kwargs)
    with pytest.raises(ValueError, match="attn2 layers"):
        lp(PROMPT, **{**kwargs, "attention_guidance": AttentionGuidance(layers=["down_blocks.0.nothing"])})

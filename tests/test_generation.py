"""The generation core: no host syncs in the UNet forward of the hot path; the serving Engine gives the
pipeline's image for every option the pipeline has (issue 15)."""

import dataclasses

import numpy as np
import pytest
import torch
from concept_factory import concept_for_unet
from sync_counter import SyncCounter
from tiny_pipes import tiny_sd_pipeline, tiny_sdxl_pipeline

from lifelong_engine import LifelongPipeline, generation, ops
from lifelong_engine.serving import Engine, GenerationRequest

PROMPT = "a <dog1> dog and a <mug2> mug"
REGIONS = [("a <dog1>", (0.0, 0.0, 0.5, 1.0)), ("a <mug2>", (0.5, 0.0, 1.0, 1.0))]


def _library(lp, image_side=False):
    width = lp.text.token_width
    extra = ("to_q", "to_out.0") if image_side else ()
    lp.add_concept(
        concept_for_unet(lp.unet, "dog1", width, seed=1, method="cidm", projections=("to_k", "to_v", *extra))
    )
    lp.add_concept(concept_for_unet(lp.unet, "mug2", width, seed=2, method="cidm"))
    return lp


@pytest.fixture
def lp():
    return _library(LifelongPipeline.from_pipe(tiny_sd_pipeline()), image_side=True)


def _counting_forwards(monkeypatch):
    """Wrap the generation core's UNet forward in a SyncCounter; returns the list of per-forward counts."""
    counts = []
    real = generation.unet_forward

    def counted(*args, **kwargs):
        with SyncCounter() as counter:
            out = real(*args, **kwargs)
        counts.append(counter.calls)
        return out

    monkeypatch.setattr(generation, "unet_forward", counted)
    return counts


@pytest.mark.parametrize("sdxl", [False, True], ids=["sd", "sdxl"])
def test_no_host_sync_in_the_unet_forward_of_generation(monkeypatch, sdxl):
    """Regions with alpha < 1, CFG, EWA and image-side (to_q/to_out) concepts: every UNet forward of the
    denoising loop makes no call that reads device data on the host (method: tests/sync_counter.py)."""
    pipe = tiny_sdxl_pipeline() if sdxl else tiny_sd_pipeline()
    lp = _library(LifelongPipeline.from_pipe(pipe), image_side=True)
    counts = _counting_forwards(monkeypatch)
    # The device-agnostic path (what a CUDA backend runs): the CPU-only torch backend reads its region
    # group sizes from host memory with tolist(), which the counter would count but which syncs nothing.
    with ops.use_backend("reference"):
        lp(PROMPT, regions=REGIONS, alpha=0.5, num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    assert len(counts) == 2
    assert counts == [[], []], counts


def test_the_sync_counter_sees_the_public_ops_value_checks(lp, monkeypatch):
    """The counter is not blind: the public regional op (its value checks read region ids) syncs at every
    cross-attention layer, which is why the processors call the trusted entry."""
    monkeypatch.setattr(ops, "regional_cross_attention_trusted", ops.regional_cross_attention)
    counts = _counting_forwards(monkeypatch)
    lp(PROMPT, regions=REGIONS, alpha=0.5, num_inference_steps=1, generator=torch.Generator().manual_seed(0))
    assert len(counts[0]) >= len(lp.layers)


# ------------------------------------------------------------------ served image = pipeline image


def _served_and_direct(lp, request: GenerationRequest, **call):
    with Engine(lp) as engine:
        served = engine.generate([request, dataclasses.replace(request, seed=request.seed + 1)])
    direct = lp(
        request.prompt,
        negative_prompt=request.negative_prompt,
        regions=request.regions,
        alpha=request.alpha,
        guidance_scale=request.guidance_scale,
        num_inference_steps=request.num_inference_steps,
        generator=torch.Generator().manual_seed(request.seed),
        **call,
    ).images[0]
    return np.asarray(served[0].images[0], dtype=np.int16), np.asarray(direct, dtype=np.int16)


@pytest.mark.parametrize(
    "option",
    [dict(guidance_rescale=0.6), dict(eta=0.8), dict(guidance_rescale=0.3, eta=0.5)],
    ids=["guidance_rescale", "eta", "both"],
)
def test_served_image_equals_the_pipeline_image_with_rescale_and_eta(lp, option):
    request = GenerationRequest(PROMPT, seed=3, num_inference_steps=3, guidance_scale=6.0, **option)
    served, direct = _served_and_direct(lp, request, **option)
    np.testing.assert_allclose(served, direct, atol=1)
    plain, _ = _served_and_direct(lp, dataclasses.replace(request, eta=0.0, guidance_rescale=0.0))
    assert np.abs(plain - served).max() > 2  # the option changes the image: the Engine does not drop it


def test_served_image_equals_the_pipeline_image_with_image_side_concepts(lp):
    """dog1 adapts to_q and to_out.0: the Engine applies them (it refused such concepts before)."""
    request = GenerationRequest(PROMPT, regions=REGIONS, alpha=0.5, seed=5, num_inference_steps=3)
    served, direct = _served_and_direct(lp, request)
    np.testing.assert_allclose(served, direct, atol=1)
    with Engine(lp) as engine:  # batched with a K/V-only request of the same pool: still its own image
        mixed = engine.generate([request, GenerationRequest("a <mug2>", concepts=None, seed=9, num_inference_steps=2)])
    np.testing.assert_allclose(np.asarray(mixed[0].images[0], dtype=np.int16), direct, atol=1)


def test_served_image_equals_the_pipeline_image_with_timestep_cond():
    """A UNet with a guidance-scale embedding (LCM-style time_cond_proj_dim): the Engine passes timestep_cond."""
    pipe = tiny_sd_pipeline()
    config = dict(pipe.unet.config)
    config["time_cond_proj_dim"] = 16
    torch.manual_seed(0)
    unet = type(pipe.unet).from_config(config).eval()
    pipe.unet = unet
    pipe.register_modules(unet=unet)
    lp = _library(LifelongPipeline.from_pipe(pipe))
    request = GenerationRequest(PROMPT, seed=2, num_inference_steps=3, guidance_scale=5.0)
    served, direct = _served_and_direct(lp, request)
    np.testing.assert_allclose(served, direct, atol=1)
    other, _ = _served_and_direct(lp, dataclasses.replace(request, guidance_scale=2.0))
    assert np.abs(other - served).max() > 2


def test_the_engine_refuses_to_run_when_the_processors_were_replaced(lp):
    """The Engine checks, as the pipeline does, that its attention processors are still installed."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    from lifelong_engine.errors import LifelongError

    lp.unet.set_attn_processor(AttnProcessor2_0())
    with Engine(lp) as engine, pytest.raises(LifelongError, match="attention processors were replaced"):
        engine.generate([GenerationRequest("a dog", concepts=(), seed=0, num_inference_steps=1)])
    lp.install()
    with Engine(lp) as engine:
        assert engine.generate([GenerationRequest("a dog", concepts=(), seed=0, num_inference_steps=1)])

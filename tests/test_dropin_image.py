"""LifelongPipeline over diffusers' img2img and inpaint pipelines (SD, SDXL; issue 17 items 4 and 9): equal to
the wrapped pipeline with no concept, concepts and regions applied as in text-to-image; pipelines it does not
drive are refused at from_pipe."""

import numpy as np
import PIL.Image
import pytest
import torch
from concept_factory import concept_for_unet
from diffusers import (
    ControlNetModel,
    StableDiffusionControlNetPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    UNet2DConditionModel,
)
from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0
from tiny_pipes import tiny_sd_pipeline, tiny_sdxl_pipeline

from lifelong_engine.pipeline import LifelongPipeline

STEPS = 4
TOL = 1e-5


def picture(seed=0) -> PIL.Image.Image:
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))


def box_mask() -> PIL.Image.Image:
    mask = np.zeros((16, 16), dtype=np.uint8)
    mask[4:12, 2:10] = 255
    return PIL.Image.fromarray(mask)


def sd_components():
    return {k: v for k, v in tiny_sd_pipeline().components.items() if k != "image_encoder"}


def make(kind: str):
    if kind == "sd-img2img":
        pipe = StableDiffusionImg2ImgPipeline(**sd_components(), requires_safety_checker=False)
    elif kind == "sd-inpaint":
        pipe = StableDiffusionInpaintPipeline(**sd_components(), requires_safety_checker=False)
    elif kind == "sd-inpaint-9ch":
        c = sd_components()
        torch.manual_seed(1)
        c["unet"] = UNet2DConditionModel.from_config({**c["unet"].config, "in_channels": 9}).eval()
        pipe = StableDiffusionInpaintPipeline(**c, requires_safety_checker=False)
    elif kind == "sdxl-img2img":
        pipe = StableDiffusionXLImg2ImgPipeline(**tiny_sdxl_pipeline().components)
    elif kind == "sdxl-inpaint":
        pipe = StableDiffusionXLInpaintPipeline(**tiny_sdxl_pipeline().components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def call(pipe, kind, **kwargs):
    kwargs = {"prompt": "a red ball", "image": picture(), "num_inference_steps": STEPS, "output_type": "np", **kwargs}
    if "inpaint" in kind:
        kwargs["mask_image"] = box_mask()
    return pipe(generator=torch.Generator().manual_seed(0), **kwargs).images


KINDS = ["sd-img2img", "sd-inpaint", "sd-inpaint-9ch", "sdxl-img2img", "sdxl-inpaint"]


@pytest.mark.parametrize("kind", KINDS)
def test_image_pipelines_equal_diffusers_without_concepts(kind):
    """Before: these pipelines wrapped, then failed inside diffusers (prepare_latents got a text-to-image call)."""
    pipe = make(kind)
    strength = 0.6
    expected = call(pipe, kind, strength=strength, negative_prompt="blurry")
    lp = LifelongPipeline.from_pipe(pipe)
    got = call(lp, kind, strength=strength, negative_prompt="blurry")
    assert got.shape == expected.shape == (1, 16, 16, 3)
    diff = float(np.abs(got - expected).max())
    print(f"\nequality | {kind} | {diff:.1e}")
    assert diff <= TOL
    # with a concept, its LoRA applies (the image changes), and regions work on the image's latents
    lp.add_concept(concept_for_unet(pipe.unet, "dog1", lp.text.token_width))
    with_concept = call(lp, kind, prompt="a <dog1> dog", strength=strength)
    assert float(np.abs(with_concept - call(lp, kind, prompt="a dog", strength=strength)).max()) > 1e-4
    regional = call(lp, kind, prompt="two", strength=strength, regions=[("a <dog1> dog", (0, 0, 0.5, 1))])
    assert regional.shape == (1, 16, 16, 3) and np.isfinite(regional).all()
    if "inpaint" in kind and kind != "sd-inpaint-9ch":  # a 4-channel UNet keeps the unmasked part as it was
        outside = np.asarray(box_mask()) == 0
        base = call(lp, kind, prompt="a dog", strength=strength)
        assert float(np.abs(with_concept - base)[0][~outside].max()) > float(
            np.abs(with_concept - base)[0][outside].mean()
        )


def test_sdxl_refiner_run_equals_diffusers():
    """denoising_end on the base, denoising_start on the img2img refiner (base + refiner)."""
    base = tiny_sdxl_pipeline()
    refiner = make("sdxl-img2img")
    kwargs = dict(num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0))
    latents = base("a red ball", denoising_end=0.5, output_type="latent", **kwargs).images
    expected = refiner(
        "a red ball",
        image=latents,
        denoising_start=0.5,
        output_type="np",
        **{**kwargs, "generator": torch.Generator().manual_seed(0)},
    ).images
    lb, lr = LifelongPipeline.from_pipe(base), LifelongPipeline.from_pipe(refiner)
    got_latents = lb(
        "a red ball",
        denoising_end=0.5,
        output_type="latent",
        **{**kwargs, "generator": torch.Generator().manual_seed(0)},
    ).images
    assert float((got_latents - latents).abs().max()) <= TOL
    got = lr(
        "a red ball",
        image=got_latents,
        denoising_start=0.5,
        output_type="np",
        **{**kwargs, "generator": torch.Generator().manual_seed(0)},
    ).images
    print(f"\nequality | SDXL refiner denoising_start | {float(np.abs(got - expected).max()):.1e}")
    assert float(np.abs(got - expected).max()) <= TOL


@pytest.mark.parametrize("kind", ["sd-img2img", "sd-inpaint"])
def test_integer_pixel_arrays_are_refused(kind):
    """Before: a uint8 array (0–255) went to diffusers' image processor, which reads arrays as [0, 1]; the
    edit started from colours ~250× out of range (bench/editing.py did this). PIL images and float arrays
    in [0, 1] still run."""
    lp = LifelongPipeline.from_pipe(make(kind))
    pixels = np.array(picture())
    for bad in (pixels, [pixels], torch.from_numpy(pixels).permute(2, 0, 1)[None]):
        with pytest.raises(ValueError, match="image: an array of .*uint8.*PIL image"):
            call(lp, kind, image=bad, strength=0.6)
    as_floats = call(lp, kind, image=pixels[None].astype(np.float32) / 255, strength=0.6)
    np.testing.assert_allclose(as_floats, call(lp, kind, strength=0.6), atol=TOL)


def test_pipelines_it_does_not_drive_are_refused():
    """Before: a ControlNet pipeline and an IP-Adapter UNet wrapped silently (the ControlNet unused)."""
    sd = tiny_sd_pipeline()
    torch.manual_seed(0)
    controlnet = ControlNetModel.from_unet(sd.unet, conditioning_channels=3)
    cn = StableDiffusionControlNetPipeline(**sd_components(), controlnet=controlnet, requires_safety_checker=False)
    with pytest.raises(TypeError, match="StableDiffusionControlNetPipeline.*does not support"):
        LifelongPipeline.from_pipe(cn)
    procs = {
        name: IPAdapterAttnProcessor2_0(64, 32, num_tokens=(4,)) if name.endswith("attn2.processor") else p
        for name, p in sd.unet.attn_processors.items()
    }
    sd.unet.set_attn_processor(procs)
    with pytest.raises(TypeError, match="IP-Adapter"):
        LifelongPipeline.from_pipe(sd)

    class Other:
        unet, vae = sd.unet, sd.vae

    with pytest.raises(TypeError, match="Other"):
        LifelongPipeline.from_pipe(Other())

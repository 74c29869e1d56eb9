"""Golden cases: small generations whose outputs were recorded from the code before issue 15's rewrite of
the denoising path (tests/golden/record.py wrote tests/golden/generation.pt); test_golden.py checks that
the pipeline, the serving Engine and attention guidance still produce them.

Each case returns a dict name → tensor (latents before decoding, served PIL pixels, guidance losses).
"""

from __future__ import annotations

import numpy as np
import torch
from concept_factory import concept_for_unet
from tiny_pipes import tiny_sd_pipeline, tiny_sdxl_pipeline

from lifelong_engine import LifelongPipeline
from lifelong_engine.guidance import AttentionGuidance
from lifelong_engine.serving import Engine, GenerationRequest

REGIONS = [("a <dog1> dog", (0.0, 0.0, 0.5, 1.0)), ("a blue <mug2>", (0.5, 0.25, 1.0, 1.0))]


def _sd(**kwargs) -> LifelongPipeline:
    pipe = tiny_sd_pipeline(**kwargs)
    lp = LifelongPipeline.from_pipe(pipe)
    width = lp.text.token_width
    lp.add_concept(concept_for_unet(lp.unet, "dog1", width, seed=1, method="cidm"))
    lp.add_concept(concept_for_unet(lp.unet, "mug2", width, seed=2, method="cidm"))
    return lp


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def sd_regions() -> dict[str, torch.Tensor]:
    """SD: two concepts, two regions with their own noise estimates, a negative prompt, EWA."""
    lp = _sd()
    out = lp(
        "a <dog1> dog and a <mug2> mug",
        negative_prompt="blurry",
        regions=REGIONS,
        alpha=0.5,
        num_inference_steps=3,
        guidance_scale=5.0,
        generator=_gen(0),
        output_type="latent",
    )
    return {"latents": out.images, "psi": out.psi}


def sd_rescale_eta() -> dict[str, torch.Tensor]:
    """SD (DDIM): guidance_rescale and eta > 0, two images per prompt, image-side (to_q/to_out) concept."""
    lp = _sd()
    projections = ("to_k", "to_v", "to_q", "to_out.0")
    q = concept_for_unet(lp.unet, "cup3", lp.text.token_width, seed=3, projections=projections)
    lp.add_concept(q)
    out = lp(
        ["a <cup3> on a table", "a <dog1> dog"],
        num_inference_steps=3,
        guidance_scale=6.0,
        guidance_rescale=0.4,
        eta=0.7,
        num_images_per_prompt=2,
        generator=_gen(1),
        output_type="latent",
    )
    return {"latents": out.images}


def sdxl_regions() -> dict[str, torch.Tensor]:
    """SDXL: a concept, one region, single-pass (alpha = 1), Euler."""
    pipe = tiny_sdxl_pipeline()
    lp = LifelongPipeline.from_pipe(pipe)
    lp.add_concept(concept_for_unet(lp.unet, "dog1", lp.text.token_width, seed=1))
    out = lp(
        "a <dog1> dog on grass",
        regions=REGIONS[:1],
        alpha=1.0,
        num_inference_steps=3,
        guidance_scale=4.0,
        generator=_gen(2),
        output_type="latent",
    )
    return {"latents": out.images}


def guided() -> dict[str, torch.Tensor]:
    """SD: attention guidance (artist + orthogonal) on the first two of four steps."""
    lp = _sd()
    options = AttentionGuidance(artist=1.0, orthogonal=1.0, steps=2, step_size=5.0)
    out = lp(
        "a <dog1> dog and a <mug2> mug",
        num_inference_steps=4,
        generator=_gen(3),
        attention_guidance=options,
        output_type="latent",
    )
    return {"latents": out.images, "losses": torch.tensor(out.guidance_losses)}


def served() -> dict[str, torch.Tensor]:
    """The Engine: two requests batched (regions with alpha < 1; a plain one), and one guided request."""
    lp = _sd()
    requests = [
        GenerationRequest("a <dog1> dog and a <mug2> mug", regions=REGIONS, alpha=0.5, seed=4, num_inference_steps=4),
        GenerationRequest("a <mug2> on a shelf", negative_prompt="dark", seed=5, num_inference_steps=3),
        GenerationRequest(
            "a <dog1> dog and a <mug2> mug",
            seed=6,
            num_inference_steps=3,
            attention_guidance=AttentionGuidance(artist=1.0, steps=1, step_size=5.0),
        ),
    ]
    with Engine(lp) as engine:
        results = engine.generate(requests)
    return {f"pixels{i}": torch.from_numpy(np.asarray(r.images[0]).copy()) for i, r in enumerate(results)}


def tinyworld() -> dict[str, torch.Tensor]:
    """The shipped TinyWorld model (v-prediction DDIM), no concepts, one region."""
    from lifelong_engine.tinyworld.model import load_tinyworld_pipeline

    lp = LifelongPipeline.from_pipe(load_tinyworld_pipeline("cpu"))
    out = lp(
        "a red circle on a blue background",
        regions=[("a green square", (0.5, 0.0, 1.0, 0.5))],
        alpha=0.6,
        num_inference_steps=3,
        guidance_scale=4.0,
        generator=_gen(7),
        output_type="latent",
    )
    return {"latents": out.images}


CASES = {f.__name__: f for f in (sd_regions, sd_rescale_eta, sdxl_regions, guided, served, tinyworld)}

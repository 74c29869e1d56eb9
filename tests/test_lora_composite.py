"""LoRA Composite (``composition="lora-c"``): the mean of per-concept guided noise estimates."""

from __future__ import annotations

import copy

import pytest
import torch
from concept_factory import concept_for_unet
from tiny_pipes import tiny_sd_pipeline

from lifelong_engine import LifelongPipeline
from lifelong_engine.attention import GenerationContext, ImageLora, unet_forward
from lifelong_engine.guidance import AttentionGuidance

PROMPT = "a <dog1> dog and a <mug2> mug"
STEPS, SCALE = 3, 5.0


def _pipeline(concepts=("dog1", "mug2")):
    lp = LifelongPipeline.from_pipe(tiny_sd_pipeline())
    width = lp.text.token_width
    for seed, name in enumerate(concepts, 1):
        extra = ("to_q", "to_out.0") if seed == 1 else ()  # one concept adapts the image side too
        lp.add_concept(
            concept_for_unet(lp.unet, name, width, seed=seed, method="cidm", projections=("to_k", "to_v", *extra))
        )
    return lp


def _naive_lora_composite(lp, prompt: str, seed: int) -> torch.Tensor:
    """Per step, per concept: the UNet on [uncond, cond] with that concept's LoRA alone (weight 1), CFG;
    then the mean of the guided estimates and one scheduler step."""
    library = lp.library()
    encoded = lp.encode_prompt(["", prompt], library)  # every concept token resolved, as in the prompt
    per_layer = encoded.per_layer
    hidden = per_layer[:, 0]
    L = per_layer.shape[1]
    contexts = []
    for g in range(len(library.adapters)):
        ids = library.ids[g].repeat(2, L, 1)
        weights = torch.ones(2, L, 1)
        kv = lp.text_kv(per_layer, library.pool, ids, weights, torch.tensor([[0], [1]]))
        image = ImageLora(library.pool, {x: ids[:, 0] for x in lp.layers}, {x: weights[:, 0] for x in lp.layers})
        contexts.append(GenerationContext(kv, None, image))
    scheduler = copy.deepcopy(lp.pipe.scheduler)
    scheduler.set_timesteps(STEPS)
    side = lp.default_size() // lp.pipe.vae_scale_factor
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, lp.unet.config.in_channels, side, side, generator=generator)
    latents = latents * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        guided = []
        for context in contexts:
            x = scheduler.scale_model_input(torch.cat([latents, latents]), t)
            uncond, cond = unet_forward(lp.unet, x, t.reshape(1).expand(2), context, hidden, None, None)
            guided.append(uncond + SCALE * (cond - uncond))
        latents = scheduler.step(torch.stack(guided).mean(0)[None], t, latents, return_dict=False)[0]
    return latents


def _generate(lp, seed: int, prompt: str = PROMPT, **options) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    out = lp(
        prompt, num_inference_steps=STEPS, guidance_scale=SCALE, generator=generator, output_type="latent", **options
    )
    return out.images


def test_lora_c_is_the_mean_of_separately_guided_per_concept_estimates():
    lp = _pipeline()
    got = _generate(lp, 0, composition="lora-c")
    want = _naive_lora_composite(lp, PROMPT, 0)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # the two concepts' estimates differ, so the mean is not either concept alone nor the mixed path
    assert not torch.allclose(got, _generate(lp, 0, ewa="sum"), atol=1e-4)


def test_lora_c_with_one_concept_is_the_normal_path():
    lp = _pipeline(("dog1",))
    lora_c = _generate(lp, 1, "a <dog1> dog", composition="lora-c")
    torch.testing.assert_close(lora_c, _generate(lp, 1, "a <dog1> dog", ewa="sum"), rtol=0, atol=0)


def test_lora_c_batches_several_images_like_one_at_a_time():
    lp = _pipeline()
    generator = torch.Generator().manual_seed(2)
    both = lp([PROMPT, "a <mug2> mug"], num_inference_steps=STEPS, guidance_scale=SCALE, generator=generator,
              output_type="latent", composition="lora-c").images  # fmt: skip
    generator = torch.Generator().manual_seed(2)
    latents = torch.randn(2, lp.unet.config.in_channels, 8, 8, generator=generator)
    for i, prompt in enumerate([PROMPT, "a <mug2> mug"]):
        one = lp(prompt, num_inference_steps=STEPS, guidance_scale=SCALE, latents=latents[i : i + 1],
                 output_type="latent", composition="lora-c").images  # fmt: skip
        torch.testing.assert_close(both[i : i + 1], one, rtol=1e-4, atol=1e-5)


def test_bad_composition_and_guidance_are_refused():
    lp = _pipeline(("dog1",))
    with pytest.raises(ValueError, match="composition='mixed'"):
        lp("a <dog1> dog", num_inference_steps=1, composition="mixed")
    with pytest.raises(ValueError, match="attention_guidance"):
        lp("a <dog1> dog", num_inference_steps=1, composition="lora-c", attention_guidance=AttentionGuidance())


def test_lora_c_with_one_concept_and_regions_is_the_normal_regional_path():
    lp = _pipeline(("dog1",))
    regions = [("a <dog1>", (0.0, 0.0, 0.5, 1.0)), ("a mug", (0.5, 0.0, 1.0, 1.0))]
    options = dict(regions=regions, alpha=0.5, guidance_rescale=0.3)
    lora_c = _generate(lp, 3, "a <dog1> dog and a mug", composition="lora-c", **options)
    torch.testing.assert_close(
        lora_c, _generate(lp, 3, "a <dog1> dog and a mug", ewa="sum", **options), rtol=0, atol=0
    )

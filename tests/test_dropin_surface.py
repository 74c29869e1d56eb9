"""LifelongPipeline as a drop-in for diffusers' SD / SDXL pipelines: the wrapped pipeline's own signature and
defaults, and the call surface a diffusers user passes, each equal to diffusers' output with no concept
(tiny random pipelines, fp32, CPU; issue 17)."""

import inspect

import numpy as np
import pytest
import torch
from concept_factory import concept_for_unet
from peft import LoraConfig, inject_adapter_in_model
from tiny_pipes import tiny_sd_pipeline, tiny_sdxl_pipeline

from lifelong_engine.pipeline import LifelongPipeline

STEPS = 2
TOL = 1e-5


def images(pipe, *args, seed=0, **kwargs):
    kwargs.setdefault("num_inference_steps", STEPS)
    return pipe(*args, generator=torch.Generator().manual_seed(seed), output_type="np", **kwargs).images


def max_diff(a, b) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


def assert_equal(feature: str, got, expected) -> None:
    """got equals diffusers' output within TOL (the max diff is printed for README's table: pytest -s)."""
    diff = max_diff(got, expected)
    print(f"\nequality | {feature} | {diff:.1e}")
    assert diff <= TOL, (feature, diff)


@pytest.fixture(scope="module")
def sd():
    return tiny_sd_pipeline(scheduler="euler")


@pytest.fixture(scope="module")
def sdxl():
    return tiny_sdxl_pipeline()


# ------------------------------------------------------------------ defaults and positional order


def test_defaults_are_the_wrapped_pipelines_own(sdxl):
    """Before: guidance_scale defaulted to 7.5 where SDXL's is 5.0 (the last assert: that image differs)."""
    lp = LifelongPipeline.from_pipe(sdxl)
    assert lp.signature.parameters["guidance_scale"].default == 5.0
    expected = images(sdxl, "a red ball")
    assert_equal("SDXL defaults (guidance_scale 5.0)", images(lp, "a red ball"), expected)
    assert max_diff(images(lp, "a red ball", guidance_scale=7.5), expected) > 1e-3  # the old default differs


def test_positional_arguments_follow_diffusers(sd, sdxl):
    """Before: ``lp("a red ball", 16, 16, 2)`` put 16 into negative_prompt and failed."""
    for pipe, args in ((sd, ("a red ball", 16, 16, STEPS)), (sdxl, ("a red ball", "two cubes", 16, 16, STEPS))):
        lp = LifelongPipeline.from_pipe(pipe)
        expected = pipe(*args, generator=torch.Generator().manual_seed(0), output_type="np").images
        got = lp(*args, generator=torch.Generator().manual_seed(0), output_type="np").images
        assert_equal(f"positional arguments ({type(pipe).__name__})", got, expected)
    lp = LifelongPipeline.from_pipe(sd)
    names = list(inspect.signature(lp).parameters)
    assert names[:8] == list(inspect.signature(type(sd).__call__).parameters)[1:9]  # help(lp) shows diffusers'
    assert inspect.signature(lp).parameters["regions"].kind is inspect.Parameter.KEYWORD_ONLY
    with pytest.raises(TypeError, match="too many positional"):  # engine options are keyword-only
        lp(*([None] * 30))
    with pytest.raises(TypeError, match="nonsense"):
        lp("a", nonsense=1)
    with pytest.raises(ValueError, match="IP-Adapter"):
        lp("a", ip_adapter_image=np.zeros((16, 16, 3)))


# ------------------------------------------------------------------ the call surface


def _lora(pipe):
    """A peft LoRA on the text encoder and on the UNet's query projections (random, so it shows)."""
    torch.manual_seed(3)
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    inject_adapter_in_model(config, pipe.text_encoder)  # transformers' add_adapter wants a newer peft
    pipe.unet.add_adapter(LoraConfig(r=4, target_modules=["attn1.to_q", "attn2.to_q"], init_lora_weights=False))


def _embeds_sd(pipe):
    pe, ne = pipe.encode_prompt("a red ball", "cpu", 1, True, "blurry")
    return dict(prompt_embeds=pe, negative_prompt_embeds=ne)


def _embeds_sdxl(pipe):
    pe, ne, pp, npp = pipe.encode_prompt("a red ball", device="cpu", negative_prompt="blurry")
    return dict(
        prompt_embeds=pe, negative_prompt_embeds=ne, pooled_prompt_embeds=pp, negative_pooled_prompt_embeds=npp
    )


SD_CASES = {
    "prompt_embeds": lambda p: _embeds_sd(p),
    "timesteps": lambda p: dict(prompt="a red ball", timesteps=[999, 500, 101]),
    "sigmas": lambda p: dict(prompt="a red ball", sigmas=[14.0, 3.0, 0.5]),
}
SDXL_CASES = {
    "prompt_embeds": lambda p: _embeds_sdxl(p),
    "prompt_2": lambda p: dict(prompt="a red ball", prompt_2="two blue cubes", negative_prompt="x",
                               negative_prompt_2="blurry"),
    "micro_conditioning": lambda p: dict(
        prompt="a red ball", original_size=(32, 24), crops_coords_top_left=(4, 2), target_size=(8, 8),
        negative_original_size=(12, 12), negative_crops_coords_top_left=(1, 1), negative_target_size=(20, 20)),
    "clip_skip": lambda p: dict(prompt="a red ball", clip_skip=1),
    "denoising_end": lambda p: dict(prompt="a red ball", num_inference_steps=4, denoising_end=0.6,
                                    output_type="latent"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(SD_CASES))
def test_sd_call_surface_equals_diffusers(sd, case):
    kwargs = SD_CASES[case](sd)
    expected = images(sd, **kwargs)
    got = images(LifelongPipeline.from_pipe(sd), **kwargs)
    assert got.shape == expected.shape
    assert_equal(f"{case} (SD)", got, expected)


def test_sd_clip_skip_equals_diffusers_formula(sd):
    """diffusers 0.42.1's own SD clip_skip fails with transformers 5 (``CLIPTextModel.text_model`` is gone), so
    the expected image is diffusers' with prompt embeds made by its formula: the final layer norm of
    ``hidden_states[-(clip_skip + 1)]``; the negative prompt without clip_skip, as diffusers encodes it."""
    ids = sd.tokenizer("a red ball", padding="max_length", max_length=77, return_tensors="pt").input_ids
    out = sd.text_encoder(ids, output_hidden_states=True)
    pe = sd.text_encoder.final_layer_norm(out.hidden_states[-2])
    _, ne = sd.encode_prompt("a red ball", "cpu", 1, True, "blurry")
    expected = images(sd, prompt_embeds=pe, negative_prompt_embeds=ne)
    got = images(LifelongPipeline.from_pipe(sd), "a red ball", negative_prompt="blurry", clip_skip=1)
    assert_equal("clip_skip (SD)", got, expected)
    assert max_diff(got, images(sd, "a red ball", negative_prompt="blurry")) > 1e-4


@pytest.mark.parametrize("case", list(SDXL_CASES))
def test_sdxl_call_surface_equals_diffusers(sdxl, case):
    kwargs = SDXL_CASES[case](sdxl)
    expected = sdxl(
        generator=torch.Generator().manual_seed(0), **{"num_inference_steps": STEPS, "output_type": "np", **kwargs}
    ).images
    got = LifelongPipeline.from_pipe(sdxl)(
        generator=torch.Generator().manual_seed(0), **{"num_inference_steps": STEPS, "output_type": "np", **kwargs}
    ).images
    assert got.shape == expected.shape
    assert_equal(f"{case} (SDXL)", got, expected)
    if case in ("prompt_2", "micro_conditioning", "clip_skip"):  # the option changes the image at all
        assert max_diff(got, images(sdxl, "a red ball", negative_prompt="x" if case == "prompt_2" else None)) > 1e-4


def test_cross_attention_kwargs_lora_scale_equals_diffusers():
    pipe = tiny_sd_pipeline()
    _lora(pipe)
    lp = LifelongPipeline.from_pipe(pipe)
    for scale in (0.0, 0.5):
        kwargs = dict(prompt="a red ball", cross_attention_kwargs={"scale": scale})
        expected = images(pipe, **kwargs)
        assert_equal(
            f"cross_attention_kwargs scale={scale} (peft LoRA on text encoder and to_q)",
            images(lp, **kwargs),
            expected,
        )
    assert max_diff(images(pipe, "a red ball"), expected) > 1e-3  # the scale matters on this pipe


def test_callback_on_step_end_sees_and_sets_latents(sd):
    def callback(seen):
        def cb(pipe, i, t, kwargs):
            seen.append((i, int(t), kwargs["latents"].clone()))
            return {"latents": kwargs["latents"] * 0.5} if i == 0 else {}

        return cb

    seen_d, seen_e = [], []
    expected = images(sd, "a red ball", callback_on_step_end=callback(seen_d))
    got = images(LifelongPipeline.from_pipe(sd), "a red ball", callback_on_step_end=callback(seen_e))
    assert_equal("callback_on_step_end (latents)", got, expected)
    assert [(i, t) for i, t, _ in seen_e] == [(i, t) for i, t, _ in seen_d]
    assert all(max_diff(a, b) <= TOL for (_, _, a), (_, _, b) in zip(seen_e, seen_d))
    with pytest.raises(ValueError, match="add_text_embeds"):
        LifelongPipeline.from_pipe(sd)("a", callback_on_step_end=callback([]),
                                       callback_on_step_end_tensor_inputs=["latents", "add_text_embeds"])  # fmt: skip


def test_prompt_embeds_with_concepts_is_a_clear_error(sd):
    lp = LifelongPipeline.from_pipe(sd)
    lp.add_concept(concept_for_unet(sd.unet, "dog1", lp.text.token_width))
    with pytest.raises(ValueError, match="prompt_embeds.*concepts"):
        lp(**_embeds_sd(sd), num_inference_steps=1)
    with pytest.raises(ValueError, match="exactly one of prompt"):
        lp(num_inference_steps=1)


def test_diffusers_conventions_save_load_to_components(tmp_path):
    """save_pretrained / from_pretrained(concepts=...) / to / components / set_progress_bar_config (before: none)."""
    pipe = tiny_sd_pipeline()
    lp = LifelongPipeline.from_pipe(pipe)
    lp.add_concept(concept_for_unet(pipe.unet, "dog1", lp.text.token_width))
    assert lp.components["unet"] is pipe.unet
    lp.set_progress_bar_config(disable=True)
    lp.save_pretrained(tmp_path / "saved")
    again = LifelongPipeline.from_pretrained(tmp_path / "saved")
    assert list(again.concepts) == ["dog1"]
    again.set_progress_bar_config(disable=True)
    kwargs = dict(prompt="a <dog1> dog", num_inference_steps=1)
    assert max_diff(images(again, **kwargs), images(lp, **kwargs)) <= TOL
    other = LifelongPipeline.from_pretrained(tmp_path / "saved", concepts=tmp_path / "saved" / "concepts")
    assert list(other.concepts) == ["dog1"]
    assert again.to(torch.float64) is again and again.dtype == torch.float64
    assert again.concepts["dog1"].lora[next(iter(again.concepts["dog1"].lora))].dtype == torch.float64
    assert images(again, **kwargs).shape == (1, 16, 16, 3)

"""LifelongPipeline over wrapped UNets and over every processor diffusers installs by its public calls
(issue 17, items 2 and 8)."""

import numpy as np
import pytest
import torch
from concept_factory import concept_for_unet
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0, SlicedAttnProcessor
from peft import LoraConfig, get_peft_model
from tiny_pipes import tiny_sd_pipeline, tiny_sdxl_pipeline

from lifelong_engine.attention import CrossAttentionProcessor
from lifelong_engine.pipeline import LifelongPipeline


def run(pipe, prompt="a red ball", **kwargs):
    return pipe(prompt, num_inference_steps=2, guidance_scale=7.5, generator=torch.Generator().manual_seed(0),
                output_type="np", **kwargs).images  # fmt: skip


def engine_processors(lp: LifelongPipeline) -> int:
    return sum(isinstance(p, CrossAttentionProcessor) for p in lp.unet_model.attn_processors.values())


def test_a_peft_model_unet_gets_the_processors_and_concepts_apply():
    plain, pipe = tiny_sd_pipeline(), tiny_sd_pipeline()
    pipe.unet = get_peft_model(pipe.unet, LoraConfig(r=2, target_modules=["to_k"]))
    lp = LifelongPipeline.from_pipe(pipe)
    assert lp.installed and engine_processors(lp) == len(lp.layers) == 7
    np.testing.assert_allclose(run(lp), run(plain), atol=1e-5)  # get_peft_model's default LoRA adds zero
    concept = concept_for_unet(lp.unet_model, "dog1", lp.text.token_width)
    lp.add_concept(concept)
    reference = LifelongPipeline.from_pipe(plain)
    reference.add_concept(concept)
    np.testing.assert_allclose(run(lp, "a <dog1>"), run(reference, "a <dog1>"), atol=1e-5)


def test_torch_compile_wrapper_is_unwrapped_for_the_processors():
    """``pipe.unet = torch.compile(pipe.unet)``: layers found under ``_orig_mod``; calls go through the wrapper
    (its compiled run is tested in test_compile.py)."""
    pipe = tiny_sd_pipeline()
    compiled = torch.compile(pipe.unet)
    pipe.unet = compiled
    lp = LifelongPipeline.from_pipe(pipe)
    assert lp.unet is compiled and lp.unet_model is compiled._orig_mod
    assert lp.installed and engine_processors(lp) == len(lp.layers) == 7
    lp.add_concept(concept_for_unet(lp.unet_model, "dog1", lp.text.token_width))


def test_an_unknown_wrapper_is_refused_naming_it():
    pipe = tiny_sd_pipeline()
    pipe.unet = torch.nn.DataParallel(pipe.unet)  # diffusers' pipelines cannot run it either (no .config)
    with pytest.raises(TypeError, match="DataParallel.*unwrap"):
        LifelongPipeline.from_pipe(pipe)


def test_installed_is_false_when_an_attn2_layer_lost_its_processor():
    pipe = tiny_sd_pipeline()
    lp = LifelongPipeline.from_pipe(pipe)
    layer = pipe.unet.get_submodule(lp.layers[0])
    layer.set_processor(AttnProcessor2_0())
    lp._installed[f"{lp.layers[0]}.processor"] = layer.processor  # even if the engine's record says so
    assert not lp.installed


# ----------------------------------------------------------------- item 8: processors diffusers installs

PUBLIC_CALLS = {
    "enable_attention_slicing": lambda p: p.enable_attention_slicing(),
    "enable_attention_slicing(1)": lambda p: p.enable_attention_slicing(1),
    "set_default_attn_processor": lambda p: p.unet.set_default_attn_processor(),
    "AttnProcessor2_0": lambda p: p.unet.set_attn_processor(AttnProcessor2_0()),
    "AttnProcessor": lambda p: p.unet.set_attn_processor(AttnProcessor()),
    "SlicedAttnProcessor(2)": lambda p: p.unet.set_attn_processor(SlicedAttnProcessor(2)),
    "fuse_qkv_projections": lambda p: p.fuse_qkv_projections(),
}


@pytest.mark.parametrize("make", [tiny_sd_pipeline, tiny_sdxl_pipeline], ids=["sd", "sdxl"])
@pytest.mark.parametrize("call", list(PUBLIC_CALLS))
def test_processors_installed_before_wrapping_run_unchanged(make, call):
    pipe = make()
    PUBLIC_CALLS[call](pipe)
    expected = run(pipe)
    lp = LifelongPipeline.from_pipe(pipe)
    np.testing.assert_allclose(run(lp), expected, atol=1e-5)

"""diffusers users' own LoRAs (peft) under LifelongPipeline: equal to diffusers with the same LoRA (issue 17, item 1).

A LoRA made with peft on to_k / to_v / to_q / to_out.0 of every attention layer, with random lora_B (peft's
default init has lora_B = 0, which would hide a dropped adapter), is loaded the ways a diffusers user loads
one: ``unet.add_adapter`` or ``pipe.load_lora_weights``, before or after wrapping; ``set_adapters`` weights,
``disable_lora``, ``fuse_lora`` / ``unfuse_lora`` changes show on the next call.
"""

import copy

import numpy as np
import pytest
import torch
from concept_factory import concept_for_unet
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from tiny_pipes import tiny_sd_pipeline, tiny_sdxl_pipeline

from lifelong_engine.formats import export_lora
from lifelong_engine.pipeline import LifelongPipeline

TARGETS = ["to_k", "to_v", "to_q", "to_out.0"]
ATOL = 1e-5


def run(pipe, prompt="a red ball", **kwargs):
    kwargs.setdefault("num_inference_steps", 3)
    return pipe(prompt, guidance_scale=7.5, generator=torch.Generator().manual_seed(0), output_type="np", **kwargs)


def add_random_lora(unet, name: str, seed: int, rank: int = 4) -> None:
    """A peft LoRA on every attention projection with random A and B (scale lora_alpha / r = 2)."""
    torch.manual_seed(seed)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, init_lora_weights=False), name)


def lora_file(make, tmp_path, name: str, seed: int) -> str:
    """A diffusers LoRA file (``save_lora_weights``) of a random peft LoRA made on a fresh pipeline."""
    pipe = make()
    add_random_lora(pipe.unet, name, seed)
    layers = get_peft_model_state_dict(pipe.unet, adapter_name=name)
    type(pipe).save_lora_weights(str(tmp_path / name), unet_lora_layers=layers, safe_serialization=True)
    return str(tmp_path / name)


def max_diff(a, b) -> float:
    return float(np.abs(a - b).max())


@pytest.mark.parametrize("make", [tiny_sd_pipeline, tiny_sdxl_pipeline], ids=["sd", "sdxl"])
def test_a_lora_added_before_wrapping_is_part_of_the_text_kv(make):
    pipe = make()
    add_random_lora(pipe.unet, "user", seed=1)
    expected = run(pipe).images
    lp = LifelongPipeline.from_pipe(pipe)
    assert lp.installed
    got = run(lp).images
    assert max_diff(got, expected) <= ATOL


@pytest.mark.parametrize("make", [tiny_sd_pipeline, tiny_sdxl_pipeline], ids=["sd", "sdxl"])
def test_loaded_after_wrapping_and_every_adapter_change_shows_on_the_next_call(make, tmp_path):
    files = {name: lora_file(make, tmp_path, name, seed) for name, seed in (("style", 1), ("detail", 2))}
    pipe = make()
    lp = LifelongPipeline.from_pipe(pipe)
    base = run(pipe).images
    for name, path in files.items():
        pipe.load_lora_weights(path, adapter_name=name)
    assert lp.installed

    def check(label):
        expected, got = run(pipe).images, run(lp).images
        assert max_diff(got, expected) <= ATOL, label
        return got

    both = check("two adapters")
    assert max_diff(both, base) > 1e-2  # the LoRAs change the image (else the test proves nothing)
    pipe.set_adapters(["style", "detail"], [0.5, 1.5])
    weighted = check("set_adapters weights")
    assert max_diff(weighted, both) > 1e-3
    pipe.set_adapters("detail")
    check("one adapter active")
    pipe.disable_lora()
    assert max_diff(check("disable_lora"), base) <= ATOL
    pipe.enable_lora()
    pipe.set_adapters(["style", "detail"], [0.5, 1.5])
    pipe.fuse_lora(adapter_names=["style", "detail"])
    assert max_diff(check("fuse_lora"), weighted) <= 1e-4
    pipe.unfuse_lora()
    pipe.set_adapters("style", 0.25)
    check("unfuse_lora, then one adapter at 0.25")
    pipe.delete_adapters(["style", "detail"])
    assert max_diff(check("delete_adapters"), base) <= ATOL


def test_a_concept_on_top_of_a_user_lora_equals_both_loaded_in_diffusers(tmp_path):
    """The concept's LoRA is summed with the user's as peft sums two adapters (the concept's token as text)."""
    pipe = tiny_sd_pipeline()
    add_random_lora(pipe.unet, "user", seed=1)
    reference = copy.deepcopy(pipe)
    concept = concept_for_unet(pipe.unet, "sks", rank=3, projections=tuple(TARGETS), alpha=1.5)
    concept.token = "sks"  # no learned rows: the token stays text, as for an imported LoRA
    reference.load_lora_weights(str(export_lora(concept, tmp_path / "sks.safetensors")), adapter_name="sks")
    reference.set_adapters(["user", "sks"], [0.75, 1.0])
    pipe.set_adapters("user", 0.75)
    lp = LifelongPipeline.from_pipe(pipe)
    lp.add_concept(concept)
    prompt = "a photo of sks dog"
    assert max_diff(run(lp, prompt).images, run(reference, prompt).images) <= ATOL

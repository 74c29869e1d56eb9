"""Imported ordinary LoRAs (no concept embedding ê) next to learned concepts (issue 17, item 5).

The rule: concepts with ê (learned token rows or a stored ê) are weighted by EWA (or summed) among themselves;
a concept without ê (an imported LoRA, its token a trigger word left as text) applies at weight 1 to a prompt
that names its token and not at all to one that does not. The pipeline, the CLI (which calls the pipeline)
and the serving Engine share the one generation core that applies it."""

import dataclasses

import numpy as np
import pytest
import torch
from concept_factory import concept_for_unet
from tiny_pipes import tiny_sd_pipeline

from lifelong_engine import ConceptStore, LifelongPipeline
from lifelong_engine.formats import export_lora, import_lora
from lifelong_engine.serving import Engine, GenerationRequest


@pytest.fixture
def concepts(tmp_path):
    lp = LifelongPipeline.from_pipe(tiny_sd_pipeline())
    width = lp.text.token_width
    dog = concept_for_unet(lp.unet, "dog1", width, seed=1, method="cidm")
    mug = concept_for_unet(lp.unet, "mug2", width, seed=2, method="cidm")
    donor = concept_for_unet(lp.unet, "style", None, seed=3, projections=("to_k", "to_v", "to_q"), lora_std=0.6)
    style = import_lora(export_lora(donor, tmp_path / "style.safetensors"), "style", token="stylo")
    assert style.method == "imported-lora" and style.token_embeddings is None and style.concept_embeddings is None
    return dog, mug, style


def pipeline(*adapters) -> LifelongPipeline:
    lp = LifelongPipeline.from_pipe(tiny_sd_pipeline())
    for a in adapters:
        lp.add_concept(a)
    return lp


def run(lp, prompt, **kwargs):
    kwargs.setdefault("output_type", "np")
    return lp(prompt, num_inference_steps=2, generator=torch.Generator().manual_seed(0), **kwargs)


def test_an_imported_lora_applies_only_where_its_trigger_word_is_and_stays_out_of_ewa(concepts):
    dog, mug, style = concepts
    both = pipeline(dog, mug, style)
    learned = pipeline(dog, mug)
    prompt = "a <dog1> on grass"
    out, ref = run(both, prompt), run(learned, prompt)
    assert out.concepts == ["dog1", "mug2", "style"]
    # not named: weight 0, and EWA (both learned concepts are CIDM) runs over dog1 and mug2 as without it
    torch.testing.assert_close(out.psi[..., :2], ref.psi, atol=1e-6, rtol=0)
    assert not torch.allclose(ref.psi, torch.ones_like(ref.psi))  # EWA, not the plain sum
    assert torch.equal(out.psi[..., 2], torch.zeros_like(out.psi[..., 2]))
    np.testing.assert_allclose(out.images, ref.images, atol=1e-6)
    # named: weight 1 in every layer, EWA of the others unchanged
    named = run(both, "a <dog1> on grass, stylo")
    torch.testing.assert_close(named.psi[..., :2], run(learned, "a <dog1> on grass, stylo").psi, atol=1e-6, rtol=0)
    assert torch.equal(named.psi[..., 2], torch.ones_like(named.psi[..., 2]))
    # ewa=True (forced) does not bring it in either; a longer word holding the trigger does not name it
    forced = run(both, "a <dog1> by stylohaus", ewa=True)
    assert torch.equal(forced.psi[..., 2], torch.zeros_like(forced.psi[..., 2]))
    # with ewa_top_k the named trigger concept is kept after the k EWA columns
    top = run(both, "stylo <dog1>", ewa_top_k=1)
    assert top.psi.shape[-1] == 2 and torch.equal(top.psi[..., 1], torch.ones_like(top.psi[..., 1]))


def test_the_serving_engine_applies_the_same_rule(concepts, tmp_path):
    dog, mug, style = concepts
    lp = pipeline()
    with ConceptStore(tmp_path / "store") as store:
        for a in (dog, mug, style):
            store.save(dataclasses.replace(a))
        with Engine(lp, store) as engine:
            prompts = ["a <dog1> on grass", "a <dog1> on grass, stylo"]
            requests = [GenerationRequest(p, concepts=("dog1", "mug2", "style"), seed=0, num_inference_steps=2)
                        for p in prompts]  # fmt: skip
            results = engine.generate(requests)
    # without its trigger word the image is the learned concepts' alone (EWA over them), with it all three's
    for prompt, result, lp in zip(prompts, results, (pipeline(dog, mug), pipeline(dog, mug, style))):
        expected = run(lp, prompt, output_type="pil")
        assert np.abs(np.asarray(result.images[0], np.int16) - np.asarray(expected.images[0], np.int16)).max() <= 2

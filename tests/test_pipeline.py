"""LifelongPipeline and its attention processors on tiny SD / SDXL pipelines (random weights, CPU)."""

import copy
import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from concept_factory import concept_for_unet
from diffusers.models.attention_processor import AttnProcessor2_0
from tiny_pipes import tiny_sd_pipeline, tiny_sdxl_pipeline

from lifelong_engine import attention, generation
from lifelong_engine.attention import CONTEXT_KWARG
from lifelong_engine.errors import LifelongError
from lifelong_engine.formats import export_lora
from lifelong_engine.generation import aggregate_noise
from lifelong_engine.pipeline import LifelongPipeline
from lifelong_engine.regions import box_mask, check_regions

STEPS = 3


def run(pipe, prompt="a red ball", seed=0, **kwargs):
    kwargs.setdefault("num_inference_steps", STEPS)
    kwargs.setdefault("guidance_scale", 7.5)
    return pipe(prompt, generator=torch.Generator().manual_seed(seed), output_type="np", **kwargs)


@pytest.fixture
def sd():
    pipe = tiny_sd_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def sdxl():
    pipe = tiny_sdxl_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def text_width(lp: LifelongPipeline) -> int:
    return lp.text.token_width


# ------------------------------------------------------------ equal to diffusers


@pytest.mark.parametrize("make", [tiny_sd_pipeline, lambda: tiny_sd_pipeline(scheduler="euler"), tiny_sdxl_pipeline])
def test_without_concepts_images_equal_diffusers(make):
    pipe = make()
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(prompt=["a red ball", "two blue cubes"], negative_prompt=["", "blurry"], num_images_per_prompt=2)
    expected = run(pipe, **kwargs).images
    lp = LifelongPipeline.from_pipe(pipe)
    got = run(lp, **kwargs).images
    assert got.shape == expected.shape == (4, 16, 16, 3)
    np.testing.assert_allclose(got, expected, atol=1e-4)
    assert run(lp, "x", guidance_scale=1.0).images.shape == (1, 16, 16, 3)  # no CFG: one pass


def test_one_concept_equals_the_lora_applied_by_peft_and_by_hand(sd, tmp_path):
    lp_pipe = copy.deepcopy(sd)
    adapter = concept_for_unet(sd.unet, "sks", rank=3, projections=("to_k", "to_v", "to_q", "to_out.0"), alpha=1.5)
    adapter.token = "sks"  # no learned rows: the token stays text, as for an imported LoRA

    # by hand: merge scale·B·A into the base weights of a copy
    by_hand = copy.deepcopy(sd)
    modules = dict(by_hand.unet.named_modules())
    with torch.no_grad():
        for layer in adapter.layers:
            for proj in adapter.projections:
                modules[f"{layer}.{proj}"].weight += adapter.delta(layer, proj)
    # peft: diffusers' own loader on the exported file
    export_lora(adapter, tmp_path / "sks.safetensors")
    sd.load_lora_weights(str(tmp_path / "sks.safetensors"))

    lp = LifelongPipeline.from_pipe(lp_pipe)
    lp.add_concept(adapter)
    prompt = "a photo of sks dog"
    ours = run(lp, prompt)
    np.testing.assert_allclose(ours.images, run(by_hand, prompt).images, atol=1e-4)
    np.testing.assert_allclose(ours.images, run(sd, prompt).images, atol=1e-4)
    assert torch.allclose(ours.psi, torch.ones_like(ours.psi))  # one concept: ψ = 1 in every layer


# ------------------------------------------------------------------------- EWA


def test_psi_follows_the_ewa_formula_on_the_pipelines_own_embeddings(sd):
    lp = LifelongPipeline.from_pipe(sd)
    width = text_width(lp)
    dog = concept_for_unet(sd.unet, "dog1", width, seed=1)
    mug = concept_for_unet(sd.unet, "mug2", width, seed=2, concept_embeddings=torch.randn(len(lp.layers), width))
    lp.add_concept(dog)
    lp.add_concept(mug)
    prompt = "a <dog1> next to a cup"
    out = run(lp, prompt, ewa=True, ewa_power=2.0, ewa_norm="fro")

    enc = lp.encode_prompt(prompt)
    # ê of a concept without stored embeddings: its token encoded alone, averaged over its positions
    alone = lp.encode_prompt("<dog1>")
    e_dog = (alone.per_layer[0] * alone.concept_mask[0, None, :, None]).sum(1) / alone.concept_mask.sum()
    e_mug = mug.concept_embeddings
    psi = torch.zeros(len(lp.layers), 2)
    mask = enc.word_mask[0].clone()
    mask[enc.eos[0]] = True
    for l in range(len(lp.layers)):
        for g, e in enumerate((e_dog, e_mug)):
            cos = [F.cosine_similarity(enc.per_layer[0, l, t], e[l], dim=0) for t in range(mask.shape[0]) if mask[t]]
            psi[l, g] = torch.stack(cos).max() ** 2
        psi[l] /= psi[l].norm()
    torch.testing.assert_close(out.psi[0].float(), psi, atol=1e-5, rtol=1e-5)
    assert out.concepts == ["dog1", "mug2"]

    out_l1 = run(lp, prompt, ewa=True, ewa_power=4.0, ewa_norm="l1", ewa_top_k=1)
    assert out_l1.psi.shape == (1, len(lp.layers), 1)  # top-1 of each layer

    # default: EWA only when every concept was learned with CIDM, else the plain sum
    assert torch.equal(run(lp, prompt).psi, torch.ones(1, len(lp.layers), 2))
    for name in ("dog1", "mug2"):
        lp.add_concept(dataclasses.replace(lp.remove_concept(name), method="cidm"))
    torch.testing.assert_close(run(lp, prompt).psi, out.psi)


def test_layerwise_tokens_give_each_layer_its_own_rows(sd):
    lp = LifelongPipeline.from_pipe(sd)
    concept = concept_for_unet(sd.unet, "dog1", text_width(lp))
    lp.add_concept(concept)
    enc = lp.encode_prompt("a <dog1> dog")
    assert enc.concept_mask[0].sum() == 2
    assert not torch.allclose(enc.per_layer[0, 0], enc.per_layer[0, 1])
    # layer l's encoding equals encoding with a concept whose only rows are layer l's
    for l in (0, 3):
        lp.remove_concept("dog1")
        lp.add_concept(concept_for_unet(sd.unet, "dog1", token_embeddings=concept.token_embeddings[l : l + 1]))
        shared = lp.encode_prompt("a <dog1> dog")
        torch.testing.assert_close(shared.per_layer[0, 0], enc.per_layer[0, l])
        torch.testing.assert_close(shared.per_layer[0, 5], enc.per_layer[0, l])


# --------------------------------------------------------------- K/V cache


def test_text_side_work_does_not_grow_with_steps(sd, monkeypatch):
    lp = LifelongPipeline.from_pipe(sd)
    lp.add_concept(concept_for_unet(sd.unet, "dog1", text_width(lp)))
    calls = {"kv": 0, "to_k": 0, "text": 0}
    real = attention.ops.lora_kv_projection_grouped_trusted

    def counting(*args):
        calls["kv"] += 1
        return real(*args)

    monkeypatch.setattr(attention.ops, "lora_kv_projection_grouped_trusted", counting)
    for layer in lp.layers:
        lp.attention[layer].to_k.register_forward_hook(lambda *_: calls.__setitem__("to_k", calls["to_k"] + 1))
    sd.text_encoder.register_forward_hook(lambda *_: calls.__setitem__("text", calls["text"] + 1))
    counts = []
    for steps in (3, 6):
        calls.update(kv=0, to_k=0, text=0)
        run(lp, "a <dog1> dog", regions=[("a cat", (0, 0, 0.5, 1))], alpha=0.5, num_inference_steps=steps)
        counts.append(dict(calls))
    assert counts[0] == counts[1]
    assert counts[0]["kv"] == 1 and counts[0]["to_k"] == 0  # every layer's text K/V in one grouped call


# ----------------------------------------------------------------- regions


def test_a_query_in_box_u_attends_only_to_prompt_u(sd):
    lp = LifelongPipeline.from_pipe(sd)
    regions = [("a green cat", (0.0, 0.0, 0.5, 1.0)), ("a small dog", (0.25, 0.5, 1.0, 1.0))]
    plan = lp.plan(["a red ball"], [None], check_regions(regions, 8), 1, True, 1.0, (16, 16))
    prepared = generation.condition(lp, plan, lp.library(), 7.5, ewa=True)
    texts = {"global": "a red ball", "r1": regions[0][0], "r2": regions[1][0]}
    enc = {k: lp.encode_prompt(v).per_layer for k, v in texts.items()}
    layer = lp.layers[0]
    l = 0
    attn = lp.attention[layer]
    h = w = 8  # first down block: latent resolution
    hidden = torch.randn(plan.rows, h * w, attn.to_q.in_features)
    with torch.no_grad():
        got = attn(hidden, encoder_hidden_states=prepared.hidden, **{CONTEXT_KWARG: prepared.context})
        plain = AttnProcessor2_0()
        ref = {k: plain(attn, hidden[1:], encoder_hidden_states=e[:, l]) for k, e in enc.items()}
    m1, m2 = box_mask(regions[0][1], h, w).flatten(), box_mask(regions[1][1], h, w).flatten()
    row = got[1]  # the global (conditional) row
    torch.testing.assert_close(row[m2], ref["r2"][0][m2], atol=1e-5, rtol=1e-5)  # later box wins
    torch.testing.assert_close(row[m1 & ~m2], ref["r1"][0][m1 & ~m2], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(row[~m1 & ~m2], ref["global"][0][~m1 & ~m2], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(row[m1 & ~m2], ref["global"][0][m1 & ~m2], atol=1e-3)


def test_noise_is_aggregated_as_the_formula_in_one_batched_unet_call(sd, monkeypatch):
    lp = LifelongPipeline.from_pipe(sd)
    regions = [("a green cat", (0.0, 0.0, 0.5, 1.0)), ("a small dog", (0.4, 0.2, 1.0, 0.9))]
    seen = {"eps": [], "noise": []}
    sd.unet.register_forward_hook(lambda m, a, out: seen["eps"].append(out[0].clone()))
    real_step = sd.scheduler.step

    def step(noise, *args, **kwargs):
        seen["noise"].append(noise.clone())
        return real_step(noise, *args, **kwargs)

    monkeypatch.setattr(sd.scheduler, "step", step)
    s, alpha = 6.0, 0.6
    run(lp, "a red ball", regions=regions, alpha=alpha, guidance_scale=s, num_inference_steps=2)
    assert len(seen["eps"]) == 2 and seen["eps"][0].shape[0] == 4  # U + 2 rows, one call per step
    m = torch.zeros(2, 8, 8)
    m[1] = box_mask(regions[1][1], 8, 8)
    m[0] = box_mask(regions[0][1], 8, 8) & ~m[1].bool()
    for eps, noise in zip(seen["eps"], seen["noise"]):
        unc, glob, r1, r2 = eps
        E = unc + s * (glob - unc)
        E1, E2 = unc + s * (r1 - unc), unc + s * (r2 - unc)
        expected = alpha * E + (1 - alpha) * E1 * m[0] + (1 - alpha) * E2 * m[1]
        torch.testing.assert_close(noise[0], expected)

    seen["eps"].clear()
    run(lp, "a red ball", regions=regions, alpha=1.0, num_inference_steps=2, num_images_per_prompt=2)
    assert [e.shape[0] for e in seen["eps"]] == [4, 4]  # alpha = 1: uncond + one conditional pass per image


def test_aggregate_noise_without_cfg():
    eps = torch.randn(3, 2, 4, 5, 5)
    masks = torch.zeros(2, 1, 1, 5, 5)
    masks[0, ..., :2] = 1
    masks[1, ..., 3:] = 1
    out = aggregate_noise(eps, False, 7.5, 0.25, masks)
    torch.testing.assert_close(out, 0.25 * eps[0] + 0.75 * (eps[1] * masks[0] + eps[2] * masks[1]))


# ------------------------------------------------------------------- SDXL


def test_sdxl_with_concepts_and_regions_then_restore(sdxl):
    before = sdxl.unet.attn_processors
    expected = run(sdxl, "a red ball").images
    lp = LifelongPipeline.from_pipe(sdxl)
    assert lp.is_sdxl and len(lp.layers) == 11
    lp.add_concept(concept_for_unet(sdxl.unet, "dog1", text_width(lp)))
    out = run(lp, "a <dog1> dog", negative_prompt="blurry", regions=[("a <dog1>", (0.5, 0, 1, 1))], alpha=0.5)
    assert out.images.shape == (1, 16, 16, 3) and np.isfinite(out.images).all()
    assert not np.allclose(out.images, expected, atol=1e-3)
    lp.restore()
    after = sdxl.unet.attn_processors
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
    np.testing.assert_allclose(run(sdxl, "a red ball").images, expected, atol=1e-6)
    with pytest.raises(LifelongError, match="install"):
        run(lp, "a red ball")


@pytest.mark.parametrize(
    "replace",
    [
        lambda p: p.fuse_qkv_projections(),
        lambda p: p.unet.set_attention_slice(1),
        lambda p: p.unet.set_attn_processor(AttnProcessor2_0()),
    ],
    ids=["fuse_qkv_projections", "set_attention_slice", "set_attn_processor"],
)
def test_replaced_processors_are_reported(sd, replace):
    lp = LifelongPipeline.from_pipe(sd)
    replace(sd)
    with pytest.raises(LifelongError, match="replaced"):
        run(lp)


# ------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(regions=[("a", (0.0, 0.0, 1.2, 1.0))]), "outside"),
        (dict(regions=[("a", (0.5, 0.0, 0.5, 1.0))]), "empty"),
        (dict(regions=[("a", (0.0, 0.0, 1.0))]), "expected"),
        (dict(regions=[("a", (0, 0, 1, 1))] * 9), "limit"),
        (dict(prompt="a <cat9> on a mat"), "unknown concept token"),
        (dict(alpha=1.5), "alpha"),
        (dict(negative_prompt=["a", "b"]), "negative_prompt"),
    ],
)
def test_bad_generation_input_is_a_clear_value_error(sd, kwargs, message):
    lp = LifelongPipeline.from_pipe(sd)
    with pytest.raises(ValueError, match=message):
        run(lp, **kwargs)


def test_bad_concepts_are_refused(sd, sdxl):
    lp = LifelongPipeline.from_pipe(sd)
    width = text_width(lp)
    with pytest.raises(ValueError, match="base model"):
        lp.add_concept(concept_for_unet(sd.unet, "a1", width, base_fingerprint="other-model"))
    with pytest.raises(ValueError, match="layers this UNet does not have|factors are"):
        lp.add_concept(concept_for_unet(sdxl.unet, "a2", width))
    with pytest.raises(ValueError, match="token rows of width"):
        lp.add_concept(concept_for_unet(sd.unet, "a3", width + 1))
    bad = concept_for_unet(sd.unet, "a4", width)
    bad.lora[next(iter(bad.lora))][0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        lp.add_concept(bad)
    lp.add_concept(concept_for_unet(sd.unet, "a5", width, base_fingerprint=lp.fingerprint))
    with pytest.raises(ValueError, match="already"):
        lp.add_concept(concept_for_unet(sd.unet, "a5", width))
    with pytest.raises(ValueError, match="token"):
        lp.add_concept(concept_for_unet(sd.unet, "a6", width, token="<a5>"))
    assert list(lp.concepts) == ["a5"]
    assert lp.remove_concept("a5").name == "a5" and not lp.concepts
    with pytest.raises(KeyError, match="a5"):
        lp.remove_concept("a5")


def test_over_long_prompts_truncate_with_one_warning_through_diffusers_logger(sd, sdxl):
    """Before: a Python UserWarning per text encoder (two for SDXL), outside diffusers' logging."""
    import logging

    from lifelong_engine.prompts import logger

    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger.addHandler(handler)
    try:
        lp = LifelongPipeline.from_pipe(sd)
        lp.add_concept(concept_for_unet(sd.unet, "dog1", text_width(lp)))
        enc = lp.encode_prompt("abc " * 30 + "<dog1>")
        assert enc.eos[0] == 76 and not enc.concept_mask.any()
        assert len(seen) == 1 and "truncated" in seen[0]
        LifelongPipeline.from_pipe(sdxl).encode_prompt("abc " * 30)
        assert len(seen) == 2  # SDXL's two tokenizers: still one warning
    finally:
        logger.removeHandler(handler)


def test_attention_maps_of_chosen_layers(sd):
    lp = LifelongPipeline.from_pipe(sd)
    out = run(lp, capture_attention=[lp.layers[0], lp.layers[-1]])
    assert set(out.attention_maps) == {lp.layers[0], lp.layers[-1]}
    maps = out.attention_maps[lp.layers[0]]
    assert maps.shape == (2, 64, 77)
    torch.testing.assert_close(maps.sum(-1), torch.ones(2, 64))

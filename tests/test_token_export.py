"""Exports carry the concept's token rows where diffusers can read them (issue 17, item 6): the file beside
the LoRA loads with diffusers' ``load_textual_inversion`` and the concept's prompt then encodes as here."""

import safetensors.torch
from concept_factory import concept_for_unet
from tiny_pipes import tiny_sd_pipeline, tiny_sdxl_pipeline

from lifelong_engine import ConceptStore, LifelongPipeline, cli
from lifelong_engine.formats import export_lora, token_rows_path

PROMPT = "a photo of <dog1> on grass"


def test_sd_export_loads_in_diffusers_and_the_prompt_embedding_matches(tmp_path):
    pipe = tiny_sd_pipeline()
    lp = LifelongPipeline.from_pipe(pipe)
    concept = concept_for_unet(pipe.unet, "dog1", lp.text.token_width, layerwise=False, words=2)
    lp.add_concept(concept)
    ours = lp.encode_prompt(PROMPT).per_layer[0, 0]
    path = export_lora(concept, tmp_path / "dog1.safetensors")
    tokens = token_rows_path(path)
    assert tokens.exists()
    pipe.load_textual_inversion(str(tokens))
    theirs = pipe.encode_prompt(PROMPT, "cpu", 1, False)[0][0]
    assert (ours - theirs).abs().max() <= 1e-6


def test_sdxl_export_loads_in_diffusers_with_the_sdxl_convention(tmp_path):
    pipe = tiny_sdxl_pipeline()
    lp = LifelongPipeline.from_pipe(pipe)
    concept = concept_for_unet(pipe.unet, "dog1", lp.text.token_width, layerwise=False, words=2)
    lp.add_concept(concept)
    ours = lp.encode_prompt(PROMPT).per_layer[0, 0]
    tokens = token_rows_path(export_lora(concept, tmp_path / "dog1.safetensors", text_widths=tuple(lp.text.widths)))
    sd = safetensors.torch.load_file(tokens)
    pipe.load_textual_inversion(sd["clip_l"], token="<dog1>", text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(
        sd["clip_g"], token="<dog1>", text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2
    )
    theirs = pipe.encode_prompt(PROMPT, device="cpu", do_classifier_free_guidance=False)[0][0]
    assert (ours - theirs).abs().max() <= 1e-6


def test_layerwise_rows_are_not_exported_and_the_cli_says_so(tmp_path, capsys):
    pipe = tiny_sd_pipeline()
    width = LifelongPipeline.from_pipe(pipe).text.token_width
    layerwise = concept_for_unet(pipe.unet, "cidm1", width, layerwise=True, method="cidm")
    shared = concept_for_unet(pipe.unet, "ti2", width, layerwise=False)
    store = str(tmp_path / "store")
    with ConceptStore(store) as s:
        s.save(layerwise)
        s.save(shared)
    out = tmp_path / "cidm1.safetensors"
    assert cli.main(["concepts", "export", "cidm1", "--store", store, "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert "NOT exported" in said and "layer-wise" in said and not token_rows_path(out).exists()
    out = tmp_path / "ti2.safetensors"
    assert cli.main(["concepts", "export", "ti2", "--store", store, "--out", str(out)]) == 0
    assert str(token_rows_path(out)) in capsys.readouterr().out and token_rows_path(out).exists()

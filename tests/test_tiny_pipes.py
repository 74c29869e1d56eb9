"""The tiny offline pipelines of tiny_pipes.py build, run, and are deterministic."""

import numpy as np
import pytest
import torch
from tiny_pipes import (
    MAX_LENGTH,
    attn2_names,
    char_clip_tokenizer,
    char_clip_tokenizer_2,
    tiny_sd_pipeline,
    tiny_sdxl_pipeline,
)

PROMPT = "a red ball"

# diffusers' EulerDiscreteScheduler calls np.array() on a tensor, which numpy 2 flags; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def _run(pipe, prompt=PROMPT, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return pipe(prompt, num_inference_steps=2, generator=generator, output_type="np").images


@pytest.fixture(scope="module")
def sd():
    return tiny_sd_pipeline()


@pytest.fixture(scope="module")
def sdxl():
    return tiny_sdxl_pipeline()


# --- tokenizer -------------------------------------------------------------------------------------------------


def test_tokenizer_vocab_and_characters():
    tok = char_clip_tokenizer()
    assert len(tok) == 514
    assert tok.model_max_length == MAX_LENGTH
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (512, 513, 513)
    assert tok.tokenize(PROMPT) == ["a</w>", "r", "e", "d</w>", "b", "a", "l", "l</w>"]


@pytest.mark.parametrize("variant, pad_id", [(char_clip_tokenizer, 513), (char_clip_tokenizer_2, 0)])
def test_tokenizer_pads_to_77_and_round_trips(variant, pad_id):
    tok = variant()
    assert tok.pad_token_id == pad_id
    ids = tok(PROMPT, padding="max_length", max_length=tok.model_max_length, truncation=True).input_ids
    n = len(tok.tokenize(PROMPT))
    assert len(ids) == MAX_LENGTH
    assert ids[0] == tok.bos_token_id and ids[n + 1] == tok.eos_token_id
    assert ids[n + 2 :] == [pad_id] * (MAX_LENGTH - n - 2)
    assert tok.decode(ids, skip_special_tokens=True) == PROMPT
    long = tok("x" * 200, padding="max_length", max_length=MAX_LENGTH, truncation=True).input_ids
    assert len(long) == MAX_LENGTH and long[-1] == tok.eos_token_id


def test_tokenizers_are_independent(tmp_path):
    first = char_clip_tokenizer()
    first.add_tokens(["<my-dog>"])
    assert len(first) == 515 and len(char_clip_tokenizer()) == 514
    char_clip_tokenizer(str(tmp_path))
    assert {p.name for p in tmp_path.iterdir()} == {"vocab.json", "merges.txt"}


# --- pipelines --------------------------------------------------------------------------------------------------


def test_attn2_layers(sd, sdxl):
    for pipe, count, width in [(sd, 7, 32), (sdxl, 11, 64)]:
        names = attn2_names(pipe.unet)
        assert len(names) == count
        modules = dict(pipe.unet.named_modules())
        assert all(modules[name].to_k.in_features == width for name in names)
        assert pipe.unet.config.cross_attention_dim == width
    assert sd.text_encoder.config.hidden_size == 32
    assert sdxl.text_encoder.config.hidden_size + sdxl.text_encoder_2.config.hidden_size == 64
    assert sdxl.text_encoder_2.config.projection_dim == 32


@pytest.mark.parametrize("scheduler", ["ddim", "euler"])
def test_sd_runs_deterministically(sd, scheduler):
    pipe = sd if scheduler == "ddim" else tiny_sd_pipeline(scheduler=scheduler)
    assert all(not m.training for m in (pipe.unet, pipe.vae, pipe.text_encoder))
    image = _run(pipe)
    assert image.shape == (1, 16, 16, 3) and image.dtype == np.float32
    assert np.isfinite(image).all()
    np.testing.assert_array_equal(image, _run(pipe))
    np.testing.assert_array_equal(image, _run(tiny_sd_pipeline(scheduler=scheduler)))
    assert not np.array_equal(image, _run(pipe, prompt="a blue cube"))


def test_sdxl_runs_deterministically(sdxl):
    assert all(not m.training for m in (sdxl.unet, sdxl.vae, sdxl.text_encoder, sdxl.text_encoder_2))
    image = _run(sdxl)
    assert image.shape == (1, 16, 16, 3) and image.dtype == np.float32
    assert np.isfinite(image).all()
    np.testing.assert_array_equal(image, _run(sdxl))
    np.testing.assert_array_equal(image, _run(tiny_sdxl_pipeline()))
    assert not np.array_equal(image, _run(sdxl, prompt="a blue cube"))


def test_seed_changes_weights():
    a, b, c = tiny_sd_pipeline(0).unet.state_dict(), tiny_sd_pipeline(0).unet.state_dict(), tiny_sd_pipeline(1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], v) for k, v in c.unet.state_dict().items())

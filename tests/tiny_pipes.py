"""Tiny diffusers pipelines with random weights, built fully offline, for tests.

Everything here is deterministic (seeded per model), float32, CPU and in eval mode.

* ``char_clip_tokenizer``: a CLIP BPE tokenizer without merges, so words tokenize into characters
  (``"red"`` → ``["r", "e", "d</w>"]``); vocabulary of 514 ids: the 256 byte characters (0-255), their
  ``</w>`` variants (256-511), ``<|startoftext|>`` (512) and ``<|endoftext|>`` (513), like real CLIP's layout.
* ``tiny_sd_pipeline``: SD-1.x-shaped pipeline; latent 8x8, default image 16x16, text width 32, 7 attn2 layers.
* ``tiny_sdxl_pipeline``: SDXL-shaped pipeline; latent 8x8, default image 16x16, text width 64 (32 + 32),
  pooled width 32, 11 attn2 layers.
"""

from __future__ import annotations

import functools
import json
import os
import tempfile

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
MAX_LENGTH = 77
TEXT_HIDDEN = 32  # hidden size of every tiny text encoder
SAMPLE_SIZE = 8  # latent side; the 2-level VAE scales it by 2 → 16x16 images

# The usual SD / SDXL noise schedule.
_SCHEDULE = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    steps_offset=1,
    prediction_type="epsilon",
    timestep_spacing="leading",
)


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's (GPT-2's) reversible byte → printable unicode character table, in CLIP's order."""
    bs = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


@functools.lru_cache(maxsize=16)
def _vocab_files(directory: str | None) -> tuple[str, str]:
    """Writes vocab.json and merges.txt once per directory (a fresh temp directory for None)."""
    directory = tempfile.mkdtemp(prefix="char_clip_") if directory is None else directory
    os.makedirs(directory, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab[BOS] = len(vocab)
    vocab[EOS] = len(vocab)
    vocab_file = os.path.join(directory, "vocab.json")
    merges_file = os.path.join(directory, "merges.txt")
    with open(vocab_file, "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(merges_file, "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")  # no merges: every word splits into its characters
    return vocab_file, merges_file


def char_clip_tokenizer(directory: str | None = None, pad_token: str = EOS) -> CLIPTokenizer:
    """A character-level CLIP tokenizer (model_max_length 77, pad ``<|endoftext|>`` unless told).

    The vocabulary files are written once per ``directory`` (cached); each call loads a new tokenizer from
    them (well under a millisecond), so a test that adds tokens (a concept's placeholder) cannot leak them
    into other tests or pipelines. (A cached tokenizer object would have to be deep-copied for that, and a
    deep copy of transformers 5's CLIPTokenizer loses its ``</w>``-stripping decode.)
    """
    vocab_file, merges_file = _vocab_files(directory)
    return CLIPTokenizer(vocab_file, merges_file, pad_token=pad_token, model_max_length=MAX_LENGTH)


def char_clip_tokenizer_2(directory: str | None = None) -> CLIPTokenizer:
    """The SDXL ``tokenizer_2`` variant: same vocabulary, pad token ``"!"`` (id 0)."""
    return char_clip_tokenizer(directory, pad_token="!")


def attn2_names(unet: torch.nn.Module) -> list[str]:
    """Names of the UNet's cross-attention modules (those ending in ``.attn2``), in module order."""
    return [name for name, _ in unet.named_modules() if name.endswith(".attn2")]


def _ready(module: torch.nn.Module) -> torch.nn.Module:
    """CPU, float32, eval mode (casts only when needed: diffusers warns on every dtype cast)."""
    if any(p.dtype != torch.float32 for p in module.parameters()):
        module = module.to(dtype=torch.float32)
    return module.to("cpu").eval()


def _text_config(tokenizer: CLIPTokenizer, projection_dim: int = TEXT_HIDDEN) -> CLIPTextConfig:
    return CLIPTextConfig(
        hidden_size=TEXT_HIDDEN,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        max_position_embeddings=MAX_LENGTH,
        projection_dim=projection_dim,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
    )


def _tiny_vae(seed: int) -> AutoencoderKL:
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=2 * SAMPLE_SIZE,
    )
    return _ready(vae)


def tiny_sd_pipeline(seed: int = 0, scheduler: str = "ddim") -> StableDiffusionPipeline:
    """SD-1.x-shaped pipeline: 16x16 images (8x8 latents), text width 32, 7 attn2 layers.

    ``scheduler`` is ``"ddim"`` (DDIMScheduler) or ``"euler"`` (EulerDiscreteScheduler).
    """
    if scheduler == "ddim":
        sched = DDIMScheduler(clip_sample=False, set_alpha_to_one=False, **_SCHEDULE)
    elif scheduler == "euler":
        sched = EulerDiscreteScheduler(interpolation_type="linear", **_SCHEDULE)
    else:
        raise ValueError(f"unknown scheduler {scheduler!r}: expected 'ddim' or 'euler'")

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=SAMPLE_SIZE,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_HIDDEN,
        norm_num_groups=8,
        attention_head_dim=8,
    )
    vae = _tiny_vae(seed)
    tokenizer = char_clip_tokenizer()
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_text_config(tokenizer))

    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=_ready(text_encoder),
        tokenizer=tokenizer,
        unet=_ready(unet),
        scheduler=sched,
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sdxl_pipeline(seed: int = 0) -> StableDiffusionXLPipeline:
    """SDXL-shaped pipeline: 16x16 images (8x8 latents), text width 64 (32 + 32), pooled width 32, 11 attn2 layers.

    Like diffusers' own SDXL ``get_dummy_components``, but with cross-attention at both levels so that
    ``transformer_layers_per_block=(1, 2)`` gives attentions of 1 and of 2 transformer blocks.
    """
    time_embed_dim = 8
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=SAMPLE_SIZE,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * time_embed_dim + TEXT_HIDDEN,  # 6 time ids + pooled text
        cross_attention_dim=2 * TEXT_HIDDEN,  # text_encoder ⊕ text_encoder_2 hidden states
        norm_num_groups=8,
    )
    vae = _tiny_vae(seed)
    tokenizer = char_clip_tokenizer()
    tokenizer_2 = char_clip_tokenizer_2()
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_text_config(tokenizer))
    torch.manual_seed(seed + 1)  # not a clone of text_encoder, so swapping the two encoders shows
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(tokenizer_2, projection_dim=TEXT_HIDDEN))
    sched = EulerDiscreteScheduler(interpolation_type="linear", **_SCHEDULE)

    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=_ready(text_encoder),
        text_encoder_2=_ready(text_encoder_2),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=_ready(unet),
        scheduler=sched,
        image_encoder=None,
        feature_extractor=None,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe

"""TinyWorld's base model: a Stable-Diffusion-shaped text-to-image model small enough to train on a CPU.

Every part is a stock diffusers / transformers class, so the engine's code paths are the ones a real
SD-1.5 checkpoint takes; only the sizes differ:

==================  ====================================================================================
tokenizer           :func:`~lifelong_engine.tinyworld.tokenizer.build_tokenizer` (one token per world word)
text_encoder        ``CLIPTextModel``: width 128, 2 layers, 4 heads, 77 positions (causal, as CLIP)
vae                 ``AutoencoderKL``: 32×32×3 ↔ 16×16×4 (one 2× downsampling, channels 32, 32)
unet                ``UNet2DConditionModel`` on 16×16×4 latents: channels (32, 64, 128) at 16², 8², 4²,
                    cross-attention at every level and in the mid block: 10 ``attn2`` layers, head width 16
scheduler           ``DDIMScheduler``, v-prediction, DDPM's linear β 1e-4 → 0.02, trailing spacing
==================  ====================================================================================

Why these choices (measured on one CPU thread, batch 32, forward + backward + AdamW):

- *Latent 16×16×4* (3× compression): the autoencoder is close to lossless (the world has 2-pixel
  stripes and 3-pixel emblems that a concept's identity depends on), while the UNet runs at 16×16:
  ~55 images/s against ~4 images/s for the same UNet in pixel space (32×32) — pixel space would
  see 15× fewer images in the same budget. An 8×8 latent is 1.6× faster again but must squeeze
  each 4×4-pixel cell into a few numbers, and personal concepts (colours and emblems the generic
  world never shows) would not survive the round trip.
- *Head width 16* (``attention_head_dim=(2, 4, 8)``, which diffusers reads as head *counts*): head
  width 4 (8 heads at 32 channels) is 1.6× slower for the same parameters.
- *Linear β schedule to 0.02*: SD's scaled-linear schedule keeps 6.8 % of the signal at t = T,
  so a model trained on it learns to read the image's mean colour (here: the background) from
  the noise it starts from, which sampling never gives it (Lin et al. 2024); DDPM's schedule keeps
  0.6 %. ``trailing`` spacing makes the first sampling step t = 999.
- *v-prediction*: with ᾱ_T ≈ 4e-5, an ε-prediction model's x0 estimate amplifies its error by
  up to 1/√ᾱ in the first steps (v1 of this model: x0 MSE 13 at t = 900, washed-out samples);
  v = √ᾱ·ε − √(1−ᾱ)·x0 is predicted at the same scale at every t (SD 2.x does the same).

Weights ship as fp16 safetensors in diffusers' folder layout (``unet/``, ``vae/``, ``text_encoder/``,
``tokenizer/``, ``scheduler/``, ``model_index.json``) plus a manifest ``tinyworld.json`` with
:data:`MODEL_VERSION` and a fingerprint of the tensors; :func:`load_tinyworld_pipeline` upcasts to fp32.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .tokenizer import MODEL_MAX_LENGTH, build_tokenizer, build_vocab, write_tokenizer_files

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline

__all__ = [
    "IMAGE_SIZE",
    "LATENT_CHANNELS",
    "LATENT_SIZE",
    "MANIFEST",
    "MODEL_VERSION",
    "SCHEDULER_CONFIG",
    "TEXT_ENCODER_CONFIG",
    "TRAIN_COMMAND",
    "UNET_CONFIG",
    "VAE_CONFIG",
    "WEIGHTS_DIR",
    "build_pipeline",
    "load_tinyworld_pipeline",
    "read_manifest",
    "save_weights",
    "tinyworld_components",
    "weights_fingerprint",
]

#: Identity of the architecture and training recipe; bump it when either changes (old weights are refused).
MODEL_VERSION = "tinyworld-base-v3"
#: Where the package's own weights live (filled by :data:`TRAIN_COMMAND`).
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
TRAIN_COMMAND = "python -m lifelong_engine.tinyworld.train_base"
MANIFEST = "tinyworld.json"

IMAGE_SIZE = 32
LATENT_SIZE = 16
LATENT_CHANNELS = 4
TEXT_WIDTH = 128
_MODELS = ("text_encoder", "vae", "unet")  # the components with weights, in fingerprint order

TEXT_ENCODER_CONFIG: dict[str, Any] = dict(
    hidden_size=TEXT_WIDTH,
    intermediate_size=4 * TEXT_WIDTH,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=MODEL_MAX_LENGTH,
    projection_dim=TEXT_WIDTH,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
)
VAE_CONFIG: dict[str, Any] = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    block_out_channels=(32, 32),
    layers_per_block=1,
    latent_channels=LATENT_CHANNELS,
    norm_num_groups=8,
    sample_size=IMAGE_SIZE,
    mid_block_add_attention=False,
    scaling_factor=1.0,  # set from the latents' spread once the autoencoder is trained
)
UNET_CONFIG: dict[str, Any] = dict(
    sample_size=LATENT_SIZE,
    in_channels=LATENT_CHANNELS,
    out_channels=LATENT_CHANNELS,
    block_out_channels=(32, 64, 128),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=TEXT_WIDTH,
    attention_head_dim=(2, 4, 8),  # diffusers reads this as the number of heads: width 16 at every level
    norm_num_groups=8,
)
SCHEDULER_CONFIG: dict[str, Any] = dict(
    num_train_timesteps=1000,
    beta_start=1e-4,
    beta_end=0.02,
    beta_schedule="linear",
    prediction_type="v_prediction",
    timestep_spacing="trailing",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,  # unused by trailing spacing; StableDiffusionPipeline rewrites any other value with a warning
)


def _text_encoder(tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **TEXT_ENCODER_CONFIG,
    )
    return CLIPTextModel(config)


def tinyworld_components(seed: int = 0) -> dict:
    """Fresh (randomly initialised) TinyWorld components, float32 on the CPU, in eval mode:
    ``tokenizer``, ``text_encoder``, ``vae``, ``unet``, ``scheduler`` — the keyword arguments of
    :func:`build_pipeline`. The same ``seed`` gives the same weights; the caller's global torch RNG
    is left as it was."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    tokenizer = build_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = _text_encoder(tokenizer)
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(**VAE_CONFIG)
        torch.manual_seed(seed + 2)
        unet = UNet2DConditionModel(**UNET_CONFIG)
    return {
        "tokenizer": tokenizer,
        "text_encoder": text_encoder.eval(),
        "vae": vae.eval(),
        "unet": unet.eval(),
        "scheduler": DDIMScheduler(**SCHEDULER_CONFIG),
    }


def build_pipeline(components: dict) -> StableDiffusionPipeline:
    """A diffusers ``StableDiffusionPipeline`` over ``components`` (as :func:`tinyworld_components`
    returns them), without safety checker; 32×32 images by default."""
    from diffusers import StableDiffusionPipeline

    missing = [k for k in ("tokenizer", "text_encoder", "vae", "unet", "scheduler") if k not in components]
    if missing:
        raise ValueError(f"components {sorted(components)}: missing {missing}")
    return StableDiffusionPipeline(
        vae=components["vae"],
        text_encoder=components["text_encoder"],
        tokenizer=components["tokenizer"],
        unet=components["unet"],
        scheduler=components["scheduler"],
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )


# --------------------------------------------------------------------------------------------
# Weights on disk
# --------------------------------------------------------------------------------------------


def _tensor_digest(state_dicts: dict[str, dict[str, torch.Tensor]]) -> str:
    """sha256 over (component, name, dtype, shape, bytes) of every tensor, in sorted order."""
    digest = hashlib.sha256()
    for component in _MODELS:
        state = state_dicts[component]
        for name in sorted(state):
            t = state[name].detach().to("cpu").contiguous()
            digest.update(f"{component}.{name}:{t.dtype}:{tuple(t.shape)};".encode())
            digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()[:16]


def _weight_file(directory: Path, component: str) -> Path:
    name = "model.safetensors" if component == "text_encoder" else "diffusion_pytorch_model.safetensors"
    return directory / component / name


def save_weights(pipe, directory: str | os.PathLike, *, extra: dict | None = None) -> Path:
    """Write the pipeline's base model to ``directory`` in diffusers' folder layout, weights as fp16
    safetensors, with the manifest ``tinyworld.json`` (``version``, ``fingerprint``, and ``extra``).

    The pipeline itself is left untouched (only copies of its tensors are cast). Files are written
    next to their final names and renamed into place; the manifest comes last, so a directory with a
    manifest is complete. The tokenizer must be the base one: concept tokens belong to adapters."""
    from safetensors.torch import load_file, save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    base_vocab, _ = build_vocab()
    added = [t for t in pipe.tokenizer.get_vocab() if t not in base_vocab]
    if added:
        raise ValueError(f"save_weights saves the base model; the tokenizer has added tokens {sorted(added)[:5]}")
    (directory / MANIFEST).unlink(missing_ok=True)  # the directory is incomplete until the new manifest lands
    for component in _MODELS:
        model = getattr(pipe, component)
        tmp = directory / f".{component}.{os.getpid()}.tmp"
        tmp.mkdir(exist_ok=True)
        if component == "text_encoder":
            model.config.save_pretrained(tmp)
        else:
            model.save_config(tmp)
        state = {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in model.state_dict().items()}
        save_file(state, tmp / _weight_file(directory, component).name, metadata={"format": "pt"})
        final = directory / component
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    write_tokenizer_files(directory / "tokenizer")
    pipe.scheduler.save_pretrained(directory / "scheduler")
    pipe.save_config(directory)  # model_index.json: StableDiffusionPipeline.from_pretrained(directory) works too
    states = {c: load_file(_weight_file(directory, c)) for c in _MODELS}
    manifest = {"version": MODEL_VERSION, "fingerprint": _tensor_digest(states), "dtype": "float16", **(extra or {})}
    tmp = directory / f".{MANIFEST}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, directory / MANIFEST)
    return directory


def _missing(directory: Path) -> FileNotFoundError:
    return FileNotFoundError(
        f"TinyWorld base-model weights not found in {directory} (no {MANIFEST}); "
        f"train them with: {TRAIN_COMMAND} --out {directory}"
    )


def read_manifest(weights_dir: str | os.PathLike | None = None) -> dict:
    """The manifest of the weights in ``weights_dir`` (default :data:`WEIGHTS_DIR`): version,
    fingerprint, dtype and what the training run recorded."""
    directory = Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR
    path = directory / MANIFEST
    if not path.is_file():
        raise _missing(directory)
    return json.loads(path.read_text())


def weights_fingerprint(pipe) -> str:
    """The fingerprint :func:`save_weights` records for ``pipe``: a hash of its weights rounded to fp16."""
    states = {c: {k: v.to(torch.float16) for k, v in getattr(pipe, c).state_dict().items()} for c in _MODELS}
    return _tensor_digest(states)


def load_tinyworld_pipeline(
    device: str | torch.device | None = None,
    weights_dir: str | os.PathLike | None = None,
    *,
    dtype: torch.dtype = torch.float32,
) -> StableDiffusionPipeline:
    """The trained TinyWorld base model as a diffusers ``StableDiffusionPipeline``.

    device: default CUDA when available, else CPU; weights_dir: default :data:`WEIGHTS_DIR`;
    dtype: what the fp16 weights are cast to (float32 by default). Raises FileNotFoundError naming
    :data:`TRAIN_COMMAND` when the weights are missing, ValueError when they are of another
    :data:`MODEL_VERSION` or do not match their manifest's fingerprint."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from safetensors.torch import load_file
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    directory = Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR
    manifest = read_manifest(directory)
    if manifest.get("version") != MODEL_VERSION:
        raise ValueError(
            f"TinyWorld weights in {directory} are version {manifest.get('version')!r}, this code expects "
            f"{MODEL_VERSION!r}; retrain them with: {TRAIN_COMMAND} --out {directory}"
        )
    states = {}
    for component in _MODELS:
        path = _weight_file(directory, component)
        if not path.is_file():
            raise _missing(directory) from None
        states[component] = load_file(path)
    found = _tensor_digest(states)
    if found != manifest.get("fingerprint"):
        raise ValueError(
            f"TinyWorld weights in {directory}: fingerprint {found} does not match the manifest's "
            f"{manifest.get('fingerprint')!r} (files changed or partly written); retrain with {TRAIN_COMMAND}"
        )

    def config(component: str, name: str = "config.json") -> dict:
        return json.loads((directory / component / name).read_text())

    tokenizer = CLIPTokenizer.from_pretrained(str(directory / "tokenizer"), model_max_length=MODEL_MAX_LENGTH)
    text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(str(directory / "text_encoder")))
    vae = AutoencoderKL.from_config(config("vae"))
    unet = UNet2DConditionModel.from_config(config("unet"))
    for component, model in (("text_encoder", text_encoder), ("vae", vae), ("unet", unet)):
        model.load_state_dict(states[component], strict=True)  # copies fp16 values into the fp32 parameters
    scheduler = DDIMScheduler.from_config(config("scheduler", "scheduler_config.json"))
    components = dict(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, unet=unet, scheduler=scheduler)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    for name in _MODELS:
        model = components[name].to(device)
        if dtype != torch.float32:  # diffusers warns on every cast, so cast only when asked
            model = model.to(dtype=dtype)
        components[name] = model.eval()
    return build_pipeline(components)

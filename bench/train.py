"""Training benchmark: steps/s and peak memory of learning one concept, the engine's ContinualTrainer
against a plain diffusers + peft LoRA training loop with the same settings, side by side in one run.

    python bench/train.py [--quick] [--model sd15|tiny|tinyworld] [--batch 1,4] [--steps 20] [--rounds 1]
                          [--device cuda] [--dtype bf16] [--autocast] [--providers peft,peft+ti,engine:cidm,...]
                          [--out DIR] [--profile]

The model is the SD-1.5 architecture (UNet, CLIP ViT-L/14 text encoder, VAE) built from its
configs with random weights (no download); ``--quick`` and ``--model tiny`` use a tiny one,
``--model tinyworld`` TinyWorld's architecture (random weights, 32 px).
Every provider trains rank-r LoRA (--rank, 4) on to_k / to_v of every attn2 layer (16 in SD-1.5) on the same
instance images (encoded once by the VAE before timing, a latent sampled per step), with AdamW,
the same learning rate, batch and noise schedule, on a freshly built copy of the same weights.

Providers (see bench/README.md for the fairness decisions):
  peft              diffusers' train_dreambooth_lora loop: unet.add_adapter(LoraConfig(...)),
                    frozen text encoder run per step, noise → add_noise → unet → MSE → backward → step
  peft+ti           the same plus two learned token rows through the text encoder (pivotal tuning),
                    the trainable set of engine:lora-m
  engine:METHOD     ContinualTrainer(LifelongPipeline.from_pipe(pipe), method=METHOD).learn(...) on the
                    pipeline as diffusers hands it over (every base weight requires grad)
  engine:METHOD:frozen  the same after unet / text_encoder / vae.requires_grad_(False); not run by
                    default: the trainer freezes the base itself, so it times the same loop (the
                    smoke test uses it to check exactly that)

Timing: a wall-clock mark (after a device sync) at the start of every optimizer step and at the
end of the loop; the first ``--warmup`` steps are excluded. steps/s = measured steps / their
time; ms/step: median and p20/p80 of the per-step intervals. With ``--rounds R`` every provider runs
R times (fresh builds, providers interleaved round by round, so a slow spell of the machine hits all
of them) and its steps are pooled; ``round_ms`` keeps each round's median. Peak memory of the training loop:
torch.cuda.max_memory_allocated on CUDA; on CPU the process's resident-set high-water mark
(VmHWM, reset through /proc/self/clear_refs at the loop start), "n/a" where that is unavailable.
Results: JSON lines in bench/results/<device-slug>/train.jsonl (…/quick/ with --quick).

``--profile`` runs the measured steps under torch.profiler (CPU, and CUDA on a GPU) to find where a
step's time goes. Per run it writes ``profile-b<batch>-<provider>.txt``: ATen ops, kernel launches,
host-device synchronisations and memcpy calls per step, the device's busy time per step against the
wall time, and the ops by self CPU time. Times taken under the profiler are inflated, so those
records go to …/profile/train.jsonl, away from the clean ones.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import math
import statistics
import sys
import tempfile
import time
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import common
import torch
import torch.nn.functional as F

try:
    from tqdm.auto import tqdm
except ImportError:  # a bare GPU box may lack it: no progress bar then
    tqdm = None


common.ensure_engine_importable()

from diffusers import (  # noqa: E402
    AutoencoderKL,
    DDPMScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.utils import logging as diffusers_logging  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel  # noqa: E402

from lifelong_engine import LifelongPipeline, ops  # noqa: E402
from lifelong_engine.tinyworld import model as tinyworld_model  # noqa: E402
from lifelong_engine.tinyworld.tokenizer import build_tokenizer  # noqa: E402
from lifelong_engine.training.trainer import METHODS, ContinualTrainer  # noqa: E402

SUBJECT = "train"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
CLASS_WORD = "dog"
BASELINES = ("peft", "peft+ti")
DEFAULT_PROVIDERS = ("peft", "peft+ti", "engine:cidm", "engine:lora-m")

# ------------------------------------------------------------------------------ models

# SD-1.5 (runwayml/stable-diffusion-v1-5) configs, written out: unet/config.json, vae/config.json and the
# text model of openai/clip-vit-large-patch14. The text encoder's vocabulary is the offline tokenizer's
# (691 ids instead of 49408: 37.4M fewer embedding parameters, never touched by training).
SD15_UNET = dict(
    act_fn="silu",
    attention_head_dim=8,
    block_out_channels=(320, 640, 1280, 1280),
    center_input_sample=False,
    cross_attention_dim=768,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    downsample_padding=1,
    flip_sin_to_cos=True,
    freq_shift=0,
    in_channels=4,
    layers_per_block=2,
    mid_block_scale_factor=1,
    norm_eps=1e-5,
    norm_num_groups=32,
    out_channels=4,
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)
SD15_TEXT = dict(
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    projection_dim=768,
)
SD15_VAE = dict(
    act_fn="silu",
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    layers_per_block=2,
    norm_num_groups=32,
    scaling_factor=0.18215,
)
# A tiny model of the same kind (as tests/tiny_pipes.py): 7 attn2 layers, text width 32, VAE factor 2.
TINY_UNET = dict(
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    norm_num_groups=8,
    attention_head_dim=8,
    in_channels=4,
    out_channels=4,
)
TINY_TEXT = dict(
    hidden_size=32,
    intermediate_size=37,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=77,
    hidden_act="gelu",
    layer_norm_eps=1e-5,
    projection_dim=32,
)
TINY_VAE = dict(
    block_out_channels=(32, 64),
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    layers_per_block=1,
    norm_num_groups=8,
)
# The SD noise schedule (scheduler/scheduler_config.json); training uses DDPMScheduler.from_config of it.
SD_SCHEDULE = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    steps_offset=1,
    prediction_type="epsilon",
    skip_prk_steps=True,
)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    unet: dict
    text: dict
    vae: dict
    resolution: int  # default image side in pixels

    @property
    def vae_factor(self) -> int:
        return 2 ** (len(self.vae["block_out_channels"]) - 1)

    @property
    def multiple(self) -> int:
        """Image sides must be multiples of this: the VAE's factor times the UNet's downsampling."""
        return self.vae_factor * 2 ** (len(self.unet["block_out_channels"]) - 1)


def _without_sample_size(config: dict) -> dict:
    return {key: value for key, value in config.items() if key != "sample_size"}


MODELS = {
    "sd15": ModelSpec("sd15", SD15_UNET, SD15_TEXT, SD15_VAE, 512),
    "tiny": ModelSpec("tiny", TINY_UNET, TINY_TEXT, TINY_VAE, 32),
    # TinyWorld's architecture (lifelong_engine.tinyworld.model), random weights: 10 attn2 layers, 32 px.
    "tinyworld": ModelSpec(
        "tinyworld",
        _without_sample_size(tinyworld_model.UNET_CONFIG),
        tinyworld_model.TEXT_ENCODER_CONFIG,
        _without_sample_size(tinyworld_model.VAE_CONFIG),
        tinyworld_model.IMAGE_SIZE,
    ),
}


def build_pipeline(spec: ModelSpec, resolution: int, device: torch.device, dtype: torch.dtype, seed: int):
    """A StableDiffusionPipeline of ``spec`` with random weights, the same for every call with the same
    seed (built on the CPU in fp32, then moved), in eval mode, every parameter requiring grad (as
    ``from_pretrained`` hands it over)."""
    tokenizer = build_tokenizer()
    latent = resolution // spec.vae_factor
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(sample_size=latent, **spec.unet)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(sample_size=resolution, **spec.vae)
    torch.manual_seed(seed + 2)
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **spec.text,
    )
    text_encoder = CLIPTextModel(text_config)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=PNDMScheduler(**SD_SCHEDULE),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.to(device=device, dtype=None if dtype == torch.float32 else dtype).eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def instance_images(n: int, resolution: int, seed: int) -> torch.Tensor:
    """(n, 3, R, R) in [0, 1], on the uint8 grid (the trainer's PIL round trip keeps them exactly)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, resolution, resolution), generator=gen).float() / 255


def lora_parameter_count(unet: torch.nn.Module, rank: int) -> int:
    """r·(Din + Dout) per attn2 to_k / to_v: what every provider must train."""
    total = 0
    for name, module in unet.named_modules():
        if name.endswith(".attn2"):
            for lin in (module.to_k, module.to_v):
                lin = getattr(lin, "base_layer", lin)  # a peft-wrapped projection
                total += rank * (lin.in_features + lin.out_features)
    return total


# --------------------------------------------------------------------------- measuring


def _libc_trim() -> None:
    """Hand freed heap memory back to the OS (glibc), so the next RSS baseline is not inflated."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _proc_status_kib(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


class MemoryMeter:
    """Peak memory of a region. CUDA: max_memory_allocated (tensors, not the allocator's cache).
    CPU: VmHWM, the resident-set high-water mark, reset by writing 5 to /proc/self/clear_refs
    (Linux ≥ 4.0); None when that is not possible. ``start`` is the memory in use when the region
    began (weights, latents …), so peak − start is what training itself added."""

    def __init__(self, device: torch.device):
        self.device = device
        self.start: int | None = None
        self.peak: int | None = None
        self.metric = "torch.cuda.max_memory_allocated" if device.type == "cuda" else "VmHWM (peak RSS)"

    def begin(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            self.metric, self.start = "n/a (no /proc/self/clear_refs)", None
            return
        rss = _proc_status_kib("VmRSS")
        self.start = rss * 1024 if rss is not None else None

    def end(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        elif self.start is not None:
            # The kernel's RSS counters are per-CPU and synced in batches, so VmHWM can read a few
            # pages below the VmRSS read at begin(); the region's peak is at least its start.
            hwm = _proc_status_kib("VmHWM")
            self.peak = max(hwm * 1024, self.start) if hwm is not None else None


@dataclass
class StepClock:
    """Marks at the start of every step and at the end of the loop; the first ``warmup`` intervals are
    not counted. The memory meter starts with the first step (the optimizer state is allocated in it).
    A ``profiler`` (not yet entered) records the measured steps: from the first one's mark to the end."""

    device: torch.device
    warmup: int
    meter: MemoryMeter
    marks: list[float] = field(default_factory=list)
    profiler: torch.profiler.profile | None = None

    def step(self) -> None:
        common.synchronize(self.device)
        if not self.marks:
            self.meter.begin()
        if self.profiler is not None and len(self.marks) == self.warmup:
            self.profiler.__enter__()
        self.marks.append(time.perf_counter())

    def stop(self) -> None:
        common.synchronize(self.device)
        self.marks.append(time.perf_counter())
        if self.profiler is not None and len(self.marks) > self.warmup + 1:
            self.profiler.__exit__(None, None, None)
        self.meter.end()

    def summary(self) -> dict:
        intervals = [b - a for a, b in zip(self.marks, self.marks[1:])][self.warmup :]
        if not intervals:
            raise RuntimeError(f"no measured steps: {len(self.marks) - 1} steps, {self.warmup} of them warm-up")
        return step_stats([x * 1e3 for x in intervals])


_LAUNCHES = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx")
_SYNCS = ("cudaDeviceSynchronize", "cudaStreamSynchronize", "cudaEventSynchronize")


def profile_summary(prof: torch.profiler.profile, steps: int, wall_ms: float) -> str:
    """Per step: ATen ops, kernel launches, synchronisations (one of them the clock's own), memcpy
    calls and the device's busy time; then the ops by self CPU time."""
    events = prof.key_averages()

    def per_step(match) -> float:
        return sum(e.count for e in events if match(e.key)) / steps

    def device_us(e) -> float:  # renamed from self_cuda_time_total in torch 2.4
        return getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0) or 0

    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    busy_ms = sum(device_us(e) for e in kernels) / 1e3 / steps
    lines = [
        f"{steps} measured steps under the profiler, {wall_ms:.1f} ms per step (inflated by the profiler)",
        f"ATen ops per step: {per_step(lambda k: k.startswith('aten::')):.0f}",
        f"kernel launches per step: {per_step(lambda k: k in _LAUNCHES):.0f}",
        f"synchronisations per step: {per_step(lambda k: k in _SYNCS):.1f} (one is the clock's)",
        f"memcpy calls per step: {per_step(lambda k: k.startswith('cudaMemcpy')):.1f}",
        f"device busy per step: {busy_ms:.1f} ms (kernels' self time; 0 on a CPU)",
        "",
        events.table(sort_by="self_cpu_time_total", row_limit=40),
    ]
    return "\n".join(lines)


def step_stats(ms: list[float]) -> dict:
    """steps/s, median and p20/p80 of per-step intervals (ms), and the intervals themselves."""
    q = statistics.quantiles(ms, n=10, method="inclusive") if len(ms) > 1 else [ms[0]] * 9
    return {
        "steps_per_second": len(ms) / (sum(ms) / 1e3),
        "ms": statistics.median(ms),
        "ms_p20": q[1],
        "ms_p80": q[7],
        "measured_steps": len(ms),
        "measured_seconds": sum(ms) / 1e3,
        "step_ms": [round(x, 3) for x in ms],
    }


def combine_rounds(rounds: list[dict]) -> dict:
    """One record from a provider's rounds (each a fresh build, the providers interleaved): the statistics
    of every round's steps pooled, each round's median (``round_ms``, the spread between rounds) and the
    highest peak memory."""
    ok = [r for r in rounds if r["status"] == "ok"]
    if len(ok) < len(rounds):
        return next(r for r in rounds if r["status"] != "ok")
    rec = {**ok[0], **step_stats([x for r in ok for x in r["step_ms"]]), "rounds": len(ok)}
    rec["round_ms"] = [r["ms"] for r in ok]
    peaks = [r["peak_memory_bytes"] for r in ok]
    if all(p is not None for p in peaks):
        rec["peak_memory_bytes"] = max(peaks)
    return rec


@dataclass
class Settings:
    spec: ModelSpec
    resolution: int
    batch: int
    steps: int
    warmup: int
    images: int
    rank: int
    learning_rate: float
    seed: int
    device: torch.device
    dtype: torch.dtype  # of the base weights
    autocast: bool  # forward under torch.autocast(bf16), as accelerate's --mixed_precision bf16 runs it
    profile: bool = False  # the measured steps under torch.profiler (see profile_summary)

    def clock(self) -> StepClock:
        profiler = None
        if self.profile:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            profiler = torch.profiler.profile(activities=activities)
        return StepClock(self.device, self.warmup, MemoryMeter(self.device), profiler=profiler)


@dataclass
class Outcome:
    """What a provider run leaves: the clock, its losses, and the trained-parameter bookkeeping."""

    clock: StepClock
    losses: list[float]
    lora_params: int
    token_params: int
    lora_b_moved: bool
    skipped_steps: int = 0
    extra: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------ providers


def run_baseline(s: Settings, textual_inversion: bool) -> Outcome:
    """diffusers' train_dreambooth_lora loop (frozen base, LoRA on attn2 K/V, AdamW), optionally with
    two learned token rows fed through the frozen text encoder (pivotal tuning)."""
    pipe = build_pipeline(s.spec, s.resolution, s.device, s.dtype, s.seed)
    unet, vae, text_encoder, tokenizer = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False)
    from peft import LoraConfig

    unet.add_adapter(
        LoraConfig(
            r=s.rank, lora_alpha=s.rank, init_lora_weights="gaussian", target_modules=["attn2.to_k", "attn2.to_v"]
        )
    )
    if s.dtype != torch.float32:
        from diffusers.training_utils import cast_training_params

        cast_training_params(unet, dtype=torch.float32)  # fp32 trainable parameters, as the script does
    lora = [p for p in unet.parameters() if p.requires_grad]
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)

    with torch.no_grad():  # latents once, as the engine does (and the script with --cache_latents)
        pixels = instance_images(s.images, s.resolution, s.seed) * 2 - 1
        dist = vae.encode(pixels.to(s.device, vae.dtype)).latent_dist
        sf = vae.config.scaling_factor
        mean, std = dist.mean * sf, dist.std * sf

    # Prompt ids once (the script's dataset tokenizes per sample); "sks" is DreamBooth's rare token.
    words = tokenizer("a photo of a", add_special_tokens=False).input_ids
    cls = tokenizer(CLASS_WORD, add_special_tokens=False).input_ids
    placeholder = next(i for i in range(len(tokenizer)) if i not in set(tokenizer.all_special_ids))
    middle = [placeholder] * 2 if textual_inversion else tokenizer("sks", add_special_tokens=False).input_ids
    ids = [tokenizer.bos_token_id, *words, *middle, *cls, tokenizer.eos_token_id]
    positions = torch.arange(len(words) + 1, len(words) + 3)
    ids = torch.tensor(ids + [tokenizer.pad_token_id] * (tokenizer.model_max_length - len(ids)), device=s.device)

    groups = [{"params": lora, "lr": s.learning_rate}]
    hook, tokens = None, None
    if textual_inversion:
        table = text_encoder.get_input_embeddings().weight.detach().float()
        tokens = (torch.randn(2, table.shape[1], device=s.device) * table.std()).requires_grad_(True)
        groups.append({"params": [tokens], "lr": s.learning_rate})

        def substitute(module, args, output):
            output = output.clone()
            output[:, positions.to(output.device)] = tokens.to(output.dtype)
            return output

        hook = text_encoder.get_input_embeddings().register_forward_hook(substitute)
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    unet.train()

    clock = s.clock()
    gen = torch.Generator().manual_seed(s.seed)
    losses = []
    try:
        for _ in range(s.warmup + s.steps):
            clock.step()
            idx = torch.randint(0, s.images, (s.batch,), generator=gen).to(s.device)
            latents = mean[idx] + std[idx] * torch.randn_like(mean[idx])
            noise = torch.randn_like(latents)
            t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (s.batch,), device=s.device)
            noisy = noise_scheduler.add_noise(latents, noise, t)
            with torch.autocast(s.device.type, dtype=torch.bfloat16, enabled=s.autocast):
                with torch.set_grad_enabled(textual_inversion):
                    hidden = text_encoder(ids.expand(s.batch, -1), return_dict=False)[0]
                pred = unet(noisy, t, hidden, return_dict=False)[0]
            loss = F.mse_loss(pred.float(), noise.float(), reduction="mean")
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.detach().item())
        clock.stop()
    finally:
        if hook is not None:
            hook.remove()
    lora_b = [p for n, p in unet.named_parameters() if "lora_B" in n]
    return Outcome(
        clock,
        losses,
        lora_params=sum(p.numel() for p in lora),
        token_params=tokens.numel() if tokens is not None else 0,
        lora_b_moved=bool(lora_b) and all(bool(p.detach().abs().sum()) for p in lora_b),
        extra={"expected_lora_params": lora_parameter_count(unet, s.rank)},
    )


def run_engine(s: Settings, method: str, freeze: bool, backend: str) -> Outcome:
    """ContinualTrainer.learn of one concept, timed by marks around its (private) per-step call."""
    pipe = build_pipeline(s.spec, s.resolution, s.device, s.dtype, s.seed)
    if freeze:
        for module in (pipe.unet, pipe.vae, pipe.text_encoder):
            module.requires_grad_(False)
    expected = lora_parameter_count(pipe.unet, s.rank)
    clock = s.clock()
    with tempfile.TemporaryDirectory(prefix="bench-train-") as run_dir:
        max_steps = s.warmup + s.steps
        trainer = ContinualTrainer(
            LifelongPipeline.from_pipe(pipe),
            method=method,
            rank=s.rank,
            max_steps=max_steps,
            learning_rate=s.learning_rate,
            batch_size=s.batch,
            seed=s.seed,
            progress=False,
            run_dir=run_dir,
            checkpoint_every=max_steps,  # no checkpoint inside the loop: the baselines write none
            **({"mixed_precision": "bf16"} if s.autocast else {}),
        )
        for private in ("_step", "_finish_task"):
            if not callable(getattr(trainer, private, None)):
                raise RuntimeError(f"ContinualTrainer has no {private}(): update bench/train.py's step marks")
        step, finish = trainer._step, trainer._finish_task

        def timed_step(*args, **kwargs):
            clock.step()
            return step(*args, **kwargs)

        def timed_finish(*args, **kwargs):
            clock.stop()  # the loop (and CIDM's closed-form R2 steps in it) is over
            return finish(*args, **kwargs)

        trainer._step, trainer._finish_task = timed_step, timed_finish
        with ops.use_backend(backend):
            adapter = trainer.learn("bench", instance_images(s.images, s.resolution, s.seed), CLASS_WORD)
    stats = trainer.stats["bench"]
    lora_b = [v for k, v in adapter.lora.items() if k.endswith("lora_B.weight")]
    return Outcome(
        clock,
        stats.losses,
        lora_params=sum(v.numel() for v in adapter.lora.values()),
        token_params=adapter.token_embeddings.numel(),
        lora_b_moved=bool(lora_b) and all(bool(v.abs().sum()) for v in lora_b),
        skipped_steps=stats.skipped_steps,
        extra={
            "expected_lora_params": expected,
            "base_requires_grad": not freeze,
            "base_grads_computed": sum(p.grad is not None for p in pipe.unet.parameters()),
            "engine_reported": {
                "steps_per_second": stats.steps_per_second,  # every step, warm-up included
                "peak_memory_bytes": stats.peak_memory_bytes,  # CPU: ru_maxrss of the whole process
            },
        },
    )


def provider_runner(name: str, backend: str) -> Callable[[Settings], Outcome]:
    if name == "peft":
        return lambda s: run_baseline(s, textual_inversion=False)
    if name == "peft+ti":
        return lambda s: run_baseline(s, textual_inversion=True)
    parts = name.split(":")
    if parts[0] == "engine" and len(parts) in (2, 3) and parts[1] in METHODS and parts[2:] in ([], ["frozen"]):
        return lambda s: run_engine(s, parts[1], freeze=len(parts) == 3, backend=backend)
    raise SystemExit(
        f"unknown provider {name!r}; expected peft, peft+ti, engine:METHOD or engine:METHOD:frozen "
        f"with METHOD one of {', '.join(METHODS)}"
    )


# ------------------------------------------------------------------------------ records


def _short(e: BaseException, limit: int = 300) -> str:
    text = f"{type(e).__name__}: {' '.join(str(e).split())}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check(out: Outcome) -> str | None:
    """Why the run is not a valid training run, or None."""
    expected = out.extra["expected_lora_params"]
    if out.lora_params != expected:
        return f"trained {out.lora_params} LoRA parameters; expected {expected} (rank-r K/V of every attn2 layer)"
    if not out.losses or not all(math.isfinite(x) for x in out.losses):
        return f"non-finite loss among {len(out.losses)} steps"
    if out.skipped_steps:
        return f"{out.skipped_steps} steps skipped for a non-finite loss or gradient"
    if not out.lora_b_moved:
        return "some lora_B stayed at zero: the optimizer did not update the LoRA"
    return None


def measure(name: str, s: Settings, runner, base: dict, profile_dir: Path | None = None) -> dict:
    shape = {
        "model": s.spec.name,
        "resolution": s.resolution,
        "latent": s.resolution // s.spec.vae_factor,
        "batch": s.batch,
        "rank": s.rank,
        "images": s.images,
    }
    rec = {
        "subject": SUBJECT,
        "case": f"{s.spec.name} {s.resolution}px b{s.batch}" + (" autocast" if s.autocast else ""),
        "shape": shape,
        "provider": name,
        "dtype": s.dtype,
        "autocast": s.autocast,
        "steps": s.steps,
        "warmup": s.warmup,
        "learning_rate": s.learning_rate,
        **base,
    }
    empty = {"steps_per_second": None, "ms": None, "ms_p20": None, "ms_p80": None, "peak_memory_bytes": None}
    gc.collect()
    _libc_trim()
    if s.device.type == "cuda":
        torch.cuda.empty_cache()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # diffusers / peft chatter about random weights, dtypes, …
            out = runner(s)
    except torch.cuda.OutOfMemoryError as e:
        return {**rec, **empty, "status": "error", "reason": f"out of memory: {_short(e, 200)}"}
    except Exception as e:  # a provider that raises is recorded, the others still run
        return {**rec, **empty, "status": "error", "reason": _short(e)}
    finally:
        gc.collect()
        if s.device.type == "cuda":
            torch.cuda.empty_cache()
    meter = out.clock.meter
    reason = check(out)
    summary = out.clock.summary()
    if out.clock.profiler is not None and profile_dir is not None:
        text = profile_summary(out.clock.profiler, summary["measured_steps"], summary["ms"])
        path = profile_dir / f"profile-b{s.batch}-{name.replace(':', '-')}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
    return {
        **rec,
        "status": "incorrect" if reason else "ok",
        "reason": reason,
        **summary,
        "profiled": s.profile,
        "peak_memory_bytes": meter.peak,
        "start_memory_bytes": meter.start,
        "peak_delta_bytes": meter.peak - meter.start if meter.peak is not None and meter.start is not None else None,
        "memory_metric": meter.metric,
        "lora_params": out.lora_params,
        "token_params": out.token_params,
        "first_loss": out.losses[0] if out.losses else None,
        "final_loss": out.losses[-1] if out.losses else None,
        "skipped_steps": out.skipped_steps,
        **{k: v for k, v in out.extra.items() if k != "expected_lora_params"},
    }


def add_ratios(records: list[dict]) -> None:
    """engine ÷ baseline of the same case and run: steps/s (> 1: the engine is faster) and peak memory
    (< 1: the engine needs less)."""
    by = {r["provider"]: r for r in records if r["status"] == "ok"}
    for rec in records:
        if rec["provider"] in BASELINES or rec["status"] != "ok":
            continue
        for b in BASELINES:
            ref = by.get(b)
            speed = rec["steps_per_second"] / ref["steps_per_second"] if ref else None
            peak = rec["peak_memory_bytes"] / ref["peak_memory_bytes"] if ref and ref["peak_memory_bytes"] else None
            rec[f"speed_vs_{b}"], rec[f"memory_vs_{b}"] = speed, peak


def _mib(x: int | None) -> str:
    return "n/a" if x is None else f"{max(x, 0) / 2**20:.0f}"  # a delta a few pages below 0 is noise


def _ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def format_table(records: list[dict]) -> str:
    header = ["provider", "steps/s", "ms/step (p20-p80)", "peak MiB", "+MiB", "tokens"]
    header += [f"speed vs {b}" for b in BASELINES] + [f"mem vs {b}" for b in BASELINES]
    rows = []
    for r in records:
        if r["status"] != "ok" and r["steps_per_second"] is None:
            rows.append([r["provider"], r["status"].upper()] + [""] * (len(header) - 2))
            continue
        rows.append(
            [
                r["provider"] + ("" if r["status"] == "ok" else f" ({r['status'].upper()})"),
                f"{r['steps_per_second']:.3g}",
                f"{r['ms']:.4g} ({r['ms_p20']:.4g}-{r['ms_p80']:.4g})",
                _mib(r["peak_memory_bytes"]),
                _mib(r["peak_delta_bytes"]),
                str(r["token_params"]),
                *[_ratio(r.get(f"speed_vs_{b}")) for b in BASELINES],
                *[_ratio(r.get(f"memory_vs_{b}")) for b in BASELINES],
            ]
        )
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in [header, *rows]]  # fmt: skip
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines += [f"  {r['provider']}: {r['status']}: {r['reason']}" for r in records if r["status"] != "ok"]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------- main


def _csv(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, batch 1, 2 + 1 warm-up steps (CI, CPU)")
    parser.add_argument("--model", choices=list(MODELS), default=None, help="default sd15 (tiny with --quick)")
    parser.add_argument("--resolution", type=int, default=None, help="image side in pixels (default: the model's)")
    parser.add_argument("--batch", default=None, help="comma list of batch sizes (default 1,4; --quick 1)")
    parser.add_argument("--steps", type=int, default=None, help="measured steps per run (default 20; --quick 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed first steps (default 3; --quick 1)")
    parser.add_argument(
        "--rounds", type=int, default=1, help="runs of every provider, interleaved; their steps pooled (default 1)"
    )
    parser.add_argument("--images", type=int, default=4, help="instance images of the concept")
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-4, help="learning rate of LoRA and token rows")
    parser.add_argument("--providers", default=",".join(DEFAULT_PROVIDERS), help="comma list (see the docstring)")
    parser.add_argument("--backend", default="auto", help="engine ops backend: auto|triton|cuda|torch|reference")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--dtype", choices=list(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument(
        "--autocast", action="store_true", help="forward under bf16 autocast on every side (engine: mixed_precision)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out", default=None, help="results folder (default bench/results/<device-slug>/, with --quick …/quick/)"
    )
    parser.add_argument("--fresh", action="store_true", help="empty train.jsonl first (default: replace same cases)")
    parser.add_argument(
        "--profile", action="store_true", help="measured steps under torch.profiler: per-run summaries in …/profile/"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    diffusers_logging.set_verbosity_error()  # "modules that should be kept in float32" on every random-weight cast
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    spec = MODELS[args.model or ("tiny" if args.quick else "sd15")]
    resolution = args.resolution or spec.resolution
    if resolution <= 0 or resolution % spec.multiple:
        raise SystemExit(f"--resolution {resolution}: must be a positive multiple of {spec.multiple} for {spec.name}")
    batches = [int(b) for b in _csv(args.batch or ("1" if args.quick else "1,4"))]
    steps = args.steps if args.steps is not None else (2 if args.quick else 20)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    if steps < 1 or warmup < 0 or min(batches) < 1 or args.images < 1 or args.rounds < 1:
        raise SystemExit("--steps, --batch, --images and --rounds must be at least 1, --warmup at least 0")
    providers = _csv(args.providers)
    runners = {name: provider_runner(name, args.backend) for name in providers}

    info = common.describe_device(device)
    default_out = common.BENCH_DIR / "results" / info.slug / ("quick" if args.quick else "")
    out_dir = Path(args.out) if args.out else default_out
    if args.profile:  # inflated times: never beside the clean records
        out_dir = out_dir / "profile"
    env = common.environment(sys.argv[1:] if argv is None else argv)
    base = {
        **info.as_record(),
        **env,
        "quick": args.quick,
        "threads": torch.get_num_threads(),
        "backend": args.backend,
        "run_id": f"{env['date']}-{uuid.uuid4().hex[:6]}",
    }
    dtype_name = str(dtype).removeprefix("torch.")
    print(f"device: {info.name} ({info.slug}), dtype {dtype_name}, {torch.get_num_threads()} threads, "
          f"git {env['git_sha'][:12]}, results in {out_dir}")  # fmt: skip

    writer = common.ResultWriter(out_dir, fresh=args.fresh)
    failures = 0
    bar = None
    if tqdm is not None:
        runs = len(batches) * len(providers) * args.rounds
        bar = tqdm(total=runs, desc="train", unit="run", file=sys.stderr, dynamic_ncols=True)
    for batch in batches:
        s = Settings(
            spec=spec,
            resolution=resolution,
            batch=batch,
            steps=steps,
            warmup=warmup,
            images=args.images,
            rank=args.rank,
            learning_rate=args.lr,
            seed=args.seed,
            device=device,
            dtype=dtype,
            autocast=args.autocast,
            profile=args.profile,
        )
        rounds = {name: [] for name in providers}
        for r in range(args.rounds):
            for name in providers:
                if bar is not None:
                    bar.set_postfix_str(f"b{batch} {name} round {r + 1}")
                rounds[name].append(measure(name, s, runners[name], base, out_dir if args.profile else None))
                writer.write(combine_rounds(rounds[name]))  # at once: a run cut short keeps what it measured
                if bar is not None:
                    bar.update()
        records = [combine_rounds(rounds[name]) for name in providers]
        add_ratios(records)
        for rec in records:
            writer.write(rec)  # again, with the ratios
        failures += sum(r["status"] != "ok" for r in records)
        title = f"{spec.name} {resolution}px, batch {batch}, {dtype_name}{' + bf16 autocast' if args.autocast else ''}"
        title += f", {steps} steps after {warmup} warm-up" + (f", {args.rounds} rounds" if args.rounds > 1 else "")
        table = f"\n{title} [{info.name}; peak: {records[0].get('memory_metric') or 'n/a'}]\n{format_table(records)}"
        if bar is not None:
            bar.write(table, file=sys.stdout)
        else:
            print(table)
    if bar is not None:
        bar.close()
    print("\nspeed vs X: steps/s ÷ X's steps/s (> 1: faster than X); mem vs X: peak ÷ X's peak (< 1: less)")
    for path in writer.paths.values():
        print(f"wrote {path}")
    if failures:
        print(f"{failures} run(s) failed their check or raised: see the tables above")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

"""Train TinyWorld's base model (and its evaluator) from scratch, reproducibly, on a CPU.

    python -m lifelong_engine.tinyworld.train_base [--out DIR] [--minutes M] [--seed S] [--device D]
    python -m lifelong_engine.tinyworld.train_base --out RUN --export DIR

Three phases, each on freshly rendered generic-world samples (:func:`~.world.sample_scene`,
:func:`~.world.render_batch`, :func:`~.world.caption`: the stream :func:`~.world.generic_dataset`
draws from; batch ``k`` of a phase comes from ``numpy.random.default_rng([seed, phase, k])``):

1. ``autoencoder``: the AutoencoderKL alone, L1 + L2 reconstruction + a small KL term, the
   posterior started narrow (:func:`_narrow_posterior`). Half the batches are colour-remapped (a
   random signed channel mix), so the codec also carries colours the generic world never paints
   objects in (the personal concepts' teal, navy, magenta, …). At the end the latents are
   standardised per channel (:func:`_standardise_latents`), then ``scaling_factor`` = 1 / std of
   the latents, as in SD (≈ 1).
2. ``diffusion``: the text encoder and the UNet together on the v-prediction loss over latents, with
   Min-SNR-5 weighting (Hang et al. 2023; ``--snr-floor`` keeps high-noise steps at a weight, see
   :func:`v_loss_weight`) and 10 % empty captions (so classifier-free guidance
   works); AdamW, warm-up then cosine decay, gradient clipping, an EMA of both models (the EMA is
   what ships). Every ``probe_every`` steps ``text_gain`` (:meth:`_Run.text_gain`) measures how
   much the captions help; it stays near 0 until the model starts to follow prompts.
3. ``evaluator``: :func:`~.evaluator.train_evaluator`.

The amount of work is fixed by step counts (defaults :data:`DEFAULT_STEPS`), so a run is the
same on any machine; before starting, the script times a few steps and, if the plan would exceed
``--minutes`` (default 55), scales the steps down to fit (logged, and recorded in the stats). A
checkpoint (temp file + rename) is written every ``--checkpoint-minutes`` and at each phase's end;
running the same command again resumes from it, and a resumed run ends with the same weights as
an uninterrupted one. ``--stop-after-minutes`` stops early with a checkpoint (to split a run over
sessions); ``--export DIR`` writes a run's latest checkpoint (in the diffusion phase its EMA) to
``DIR`` as a model, so that ``targets --weights DIR`` can measure a long run part-way. At the
end: the weights via :func:`~.model.save_weights`, the evaluator in ``evaluator/``,
``training_stats.json`` (throughput, losses, held-out evaluator accuracy, prompt following of the
new model) and ``samples.png`` (generated images above renders of their captions).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..store import atomic_torch_save as _atomic_save
from .model import MODEL_VERSION, WEIGHTS_DIR, build_pipeline, save_weights, tinyworld_components
from .world import caption, object_box, object_prompt, render_batch, sample_scene, sample_scenes

__all__ = ["DEFAULT_STEPS", "TrainConfig", "export_checkpoint", "main", "train", "v_loss_weight"]

#: Steps of each phase for a model trained from scratch, sized for ~50 minutes on a 2-core CPU.
DEFAULT_STEPS = {"autoencoder": 1500, "diffusion": 5500, "evaluator": 1000}
#: Recipe changes when training continues from other weights (``--init-from``): a lower peak
#: learning rate, a short warm-up and an EMA horizon (~200 steps) short enough to leave the start behind.
FINETUNE = {"lr": 5e-4, "warmup": 50, "ema_decay": 0.995}
#: Prompt slots of a regional training row: the caption, then one per regional object.
_REGION_SLOTS = 3
_PHASES = ("autoencoder", "diffusion", "evaluator")
CHECKPOINT = "checkpoint.pt"
STATS = "training_stats.json"


@dataclasses.dataclass
class TrainConfig:
    """Everything that shapes a run. The fields in :data:`_RECIPE` must match to resume a checkpoint."""

    out: Path = WEIGHTS_DIR
    seed: int = 0
    device: str | None = None
    minutes: float = 55.0
    steps: dict[str, int] | None = None  # per phase; default DEFAULT_STEPS, scaled to fit ``minutes``
    ae_batch: int = 32
    ae_lr: float = 2e-3
    ae_kl_weight: float = 1e-5
    batch: int = 32
    lr: float = 1e-3
    warmup: int = 200
    caption_dropout: float = 0.1
    min_snr_gamma: float = 5.0
    snr_floor: float = 0.0  # x0-loss weight = clamp(SNR, snr_floor, min_snr_gamma): see v_loss_weight
    ema_decay: float = 0.999
    evaluator_batch: int = 64
    probe_every: int = 500  # diffusion steps between text_gain measurements
    checkpoint_minutes: float = 5.0
    stop_after_minutes: float | None = None
    stop_after_steps: int | None = None  # optimizer steps in this call (tests; splitting a run)
    samples: bool = True
    progress: bool = True
    restart: bool = False
    region_probability: float = 0.5  # of a multi-object scene: trained with per-object prompts in boxes
    init_from: Path | None = None  # start from these weights (another version's): autoencoder kept, no phase 1

    def __post_init__(self):
        if not 0 <= self.snr_floor <= self.min_snr_gamma:
            raise ValueError(f"snr_floor {self.snr_floor}: expected 0 to min_snr_gamma ({self.min_snr_gamma})")


_RECIPE = ("seed", "ae_batch", "ae_lr", "ae_kl_weight", "batch", "lr", "warmup", "caption_dropout", "min_snr_gamma",
           "snr_floor", "ema_decay", "evaluator_batch", "region_probability", "init_fingerprint")  # fmt: skip


def v_loss_weight(snr: torch.Tensor, floor: float, gamma: float) -> torch.Tensor:
    """Per-sample weight of the v-prediction MSE: an x0-loss weight of clamp(SNR, floor, γ), divided
    by SNR + 1 (the v-loss is SNR + 1 times the x0-loss). With ``floor`` 0 (the recipe's default)
    this is Min-SNR-γ (Hang et al. 2023), which weighs a high-noise step ~SNR ≈ 0 — and those are
    the steps that decide where objects go: the shipped model predicts the same x0 at t = T whatever
    the position words (``targets.layout``). A floor of 1 gives them the plain v-loss weight, ≈ 1."""
    return snr.clamp(min=floor, max=gamma) / (snr + 1)


def _diffusion_params(components: dict) -> list[torch.nn.Parameter]:
    """The parameters the diffusion phase trains, in the order its optimizer and EMA list them."""
    return [*components["unet"].parameters(), *components["text_encoder"].parameters()]


class _Stop(Exception):
    """Raised inside a phase when the run should stop here (after a checkpoint)."""


def _images(scenes, device) -> torch.Tensor:
    """(N, 3, 32, 32) in [-1, 1]."""
    return (torch.from_numpy(render_batch(scenes)).permute(0, 3, 1, 2).float() / 127.5 - 1).to(device)


def _batch_rng(seed: int, phase: str, step: int, device) -> tuple[np.random.Generator, torch.Generator]:
    rng = np.random.default_rng([seed, _PHASES.index(phase), step])
    g = torch.Generator(device=device).manual_seed(int(rng.integers(2**62)))
    return rng, g


def _colour_remap(x: torch.Tensor, g: torch.Generator, p: float = 0.5) -> torch.Tensor:
    """With probability ``p`` per image: y = M·x + b, M a random signed permutation plus N(0, 0.25²)
    noise, b ~ N(0, 0.3²), clamped to [-1, 1] (x in [-1, 1])."""
    n, device = x.shape[0], x.device
    perm = torch.argsort(torch.rand(n, 3, generator=g, device=device), dim=1)
    mix = F.one_hot(perm, 3).float()
    signs = torch.where(torch.rand(n, 3, 1, generator=g, device=device) < 0.3, -1.0, 1.0)
    mix = mix * signs + 0.25 * torch.randn(n, 3, 3, generator=g, device=device)
    y = torch.einsum("bij,bjhw->bihw", mix, x) + 0.3 * torch.randn(n, 3, 1, 1, generator=g, device=device)
    keep = torch.rand(n, 1, 1, 1, generator=g, device=device) >= p
    return torch.where(keep, x, y.clamp(-1, 1))


def _narrow_posterior(vae) -> None:
    """Start the encoder's log-variance near -6 (std 0.05): the decoder then sees nearly clean latents
    from the first step instead of unit noise on them (about 15 % lower reconstruction loss after
    600 steps); the KL term still keeps the posterior from collapsing."""
    out = vae.encoder.conv_out
    latent = vae.config.latent_channels
    with torch.no_grad():
        out.bias[latent:].fill_(-6.0)
        out.weight[latent:].mul_(0.1)


@torch.no_grad()
def _standardise_latents(vae, x: torch.Tensor, g: torch.Generator) -> tuple[list[float], list[float]]:
    """Fold a per-channel shift and scale into the autoencoder so its latents have mean 0 and std 1
    per channel on ``x`` (an exact reparametrisation: decode(encode(x)) does not change).

    With m, s the channel means of the posterior means and the channel stds of posterior samples,
    the encoder's ``quant_conv`` now outputs (μ − m) / s and log σ² − 2 log s, and the decoder's
    ``post_quant_conv`` maps z to its old input s·z + m. SDXL keeps such statistics in
    ``latents_mean``/``latents_std``, which SD-1 pipelines ignore; folded in, every pipeline and
    trainer that applies ``scaling_factor`` sees standardised latents. Returns (m, s) as lists."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    posterior = DiagonalGaussianDistribution(vae.quant_conv(vae.encoder(x)))
    z = posterior.sample(generator=g)
    m, s = posterior.mean.mean(dim=(0, 2, 3)), z.std(dim=(0, 2, 3))
    c = m.numel()
    q, p = vae.quant_conv, vae.post_quant_conv
    q.weight[:c] /= s.view(c, 1, 1, 1)
    q.bias[:c] = (q.bias[:c] - m) / s
    q.bias[c:] -= 2 * s.log()
    p.bias += p.weight[:, :, 0, 0] @ m
    p.weight *= s.view(1, c, 1, 1)
    return [round(float(v), 4) for v in m], [round(float(v), 4) for v in s]


def _lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10 %."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _curve(values: list[float], points: int = 50) -> list[float]:
    """The loss curve averaged into at most ``points`` buckets (for the stats file)."""
    if not values:
        return []
    chunks = np.array_split(np.asarray(values, dtype=np.float64), min(points, len(values)))
    return [round(float(c.mean()), 5) for c in chunks]


def _init_weights(components: dict, directory: Path) -> str:
    """Load the text encoder, autoencoder and UNet saved in ``directory`` (:func:`~.model.save_weights`
    layout, any model version) into ``components``; the text encoder's token embeddings are matched
    by token string (words new to this vocabulary keep their fresh rows). Returns the weights'
    fingerprint from their manifest, which the recipe records."""
    from safetensors.torch import load_file

    from .model import _weight_file, read_manifest

    manifest = read_manifest(directory)
    old_vocab = json.loads((directory / "tokenizer" / "vocab.json").read_text())
    new_vocab = components["tokenizer"].get_vocab()
    for name in ("text_encoder", "vae", "unet"):
        state = {k: v.float() for k, v in load_file(_weight_file(directory, name)).items()}
        model = components[name]
        if name == "text_encoder":
            key = "embeddings.token_embedding.weight"
            rows = model.state_dict()[key].clone()
            for token, i in new_vocab.items():
                if token in old_vocab:
                    rows[i] = state[key][old_vocab[token]]
            state[key] = rows
        if name == "vae":
            config = json.loads((directory / "vae" / "config.json").read_text())
            model.register_to_config(scaling_factor=config["scaling_factor"])
        model.load_state_dict(state, strict=True)
    return str(manifest.get("fingerprint"))


def _region_boxes(rng: np.random.Generator, objects, chosen: Sequence[int]) -> list[tuple[float, float, float, float]]:
    """Boxes for the ``chosen`` objects of a scene, as a user might draw them: each object's box
    grown by up to 0.3 on each side, then cut at the midline between it and every other object on
    the axis where they are farthest apart, so no box reaches another object."""
    boxes = []
    for i in chosen:
        x0, y0, x1, y1 = object_box(objects[i])
        grow = rng.uniform(0.0, 0.3, size=4)
        box = [max(0.0, x0 - grow[0]), max(0.0, y0 - grow[1]), min(1.0, x1 + grow[2]), min(1.0, y1 + grow[3])]
        for j, other in enumerate(objects):
            if j == i:
                continue
            ox0, oy0, ox1, oy1 = object_box(other)
            gaps = {"right": ox0 - x1, "left": x0 - ox1, "below": oy0 - y1, "above": y0 - oy1}
            side = max(gaps, key=gaps.get)
            if side == "right":
                box[2] = min(box[2], (x1 + ox0) / 2)
            elif side == "left":
                box[0] = max(box[0], (x0 + ox1) / 2)
            elif side == "below":
                box[3] = min(box[3], (y1 + oy0) / 2)
            else:
                box[1] = max(box[1], (y0 + oy1) / 2)
        boxes.append(tuple(box))
    return boxes


class _Run:
    """One call of :func:`train`: models, optimizer state, timing, checkpoints."""

    def __init__(self, config: TrainConfig):
        self.config = config
        self.device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.out = Path(config.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.components = tinyworld_components(config.seed)
        self.init_fingerprint = None
        if config.init_from is not None:
            self.init_fingerprint = _init_weights(self.components, Path(config.init_from))
        else:
            _narrow_posterior(self.components["vae"])
        self.layers = self._install_processors()
        for name in ("text_encoder", "vae", "unet"):
            self.components[name].to(self.device)
        first = "diffusion" if config.init_from is not None else _PHASES[0]
        self.state: dict = {"phase": first, "step": 0, "stats": {}, "steps": None}
        self.optimizer_state = None
        self.ema: list[torch.Tensor] | None = None
        self.start = time.perf_counter()
        self.last_checkpoint = self.start
        self.steps_this_call = 0

    # ------------------------------------------------------------------ checkpoints

    @property
    def checkpoint_path(self) -> Path:
        return self.out / CHECKPOINT

    def recipe(self) -> dict:
        return {k: getattr(self.config, k) if k != "init_fingerprint" else self.init_fingerprint for k in _RECIPE}

    def _install_processors(self) -> list[str]:
        """The engine's :class:`~lifelong_engine.attention.CrossAttentionProcessor` on every ``attn2``
        (plain attention without a context, regional with one); returns the layer names."""
        from ..attention import CrossAttentionProcessor, PassThroughProcessor

        unet = self.components["unet"]
        processors = dict(unet.attn_processors)
        layers = []
        for name, processor in processors.items():
            if name.endswith("attn2.processor"):
                layer = name[: -len(".processor")]
                processors[name] = CrossAttentionProcessor(layer)
                layers.append(layer)
            else:
                processors[name] = PassThroughProcessor(processor)
        unet.set_attn_processor(processors)
        return layers

    def _regional_context(self, encoded: torch.Tensor, index: torch.Tensor, paint: list):
        """The :class:`~lifelong_engine.attention.GenerationContext` of a training batch: every
        layer's K/V of the (B, P) prompt slots, ``index`` into the distinct texts ``encoded`` (U, T, D)
        (each text projected once, then gathered), and the boxes each row paints."""
        from ..attention import GenerationContext
        from ..regions import RegionPlan

        unet, (B, P), T = self.components["unet"], index.shape, encoded.shape[1]
        kv = {}
        for layer in self.layers:
            attn = unet.get_submodule(layer)
            k, v = attn.to_k(encoded)[index], attn.to_v(encoded)[index]  # (B, P, T, H·d)
            kv[layer] = tuple(x.view(B, P, T, attn.heads, -1).permute(0, 1, 3, 2, 4) for x in (k, v))
        latent = self.components["unet"].config.sample_size
        levels = len(unet.config.block_out_channels)
        return GenerationContext(kv, RegionPlan(paint, (latent, latent), P, self.device, levels))

    def save_checkpoint(self, optimizer=None) -> None:
        c = self.components
        _atomic_save(
            {
                "version": MODEL_VERSION,
                "recipe": self.recipe(),
                "state": self.state,
                "models": {n: c[n].state_dict() for n in ("text_encoder", "vae", "unet")},
                "scaling_factor": c["vae"].config.scaling_factor,
                "optimizer": optimizer.state_dict() if optimizer is not None else None,
                "ema": [t.cpu() for t in self.ema] if self.ema is not None else None,
            },
            self.checkpoint_path,
        )
        self.last_checkpoint = time.perf_counter()

    def resume(self) -> bool:
        path = self.checkpoint_path
        if self.config.restart or not path.is_file():
            return False
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        if ckpt.get("version") != MODEL_VERSION:
            raise ValueError(f"checkpoint {path} is for {ckpt.get('version')!r}, not {MODEL_VERSION!r}: use --restart")
        diff = {k: (v, ckpt["recipe"].get(k)) for k, v in self.recipe().items() if ckpt["recipe"].get(k) != v}
        if diff:
            raise ValueError(
                f"checkpoint {path} was made with other settings "
                f"({', '.join(f'{k}: now {a!r}, then {b!r}' for k, (a, b) in diff.items())}); "
                "run with the same settings or --restart"
            )
        c = self.components
        c["vae"].register_to_config(scaling_factor=ckpt["scaling_factor"])
        for name, state in ckpt["models"].items():
            c[name].load_state_dict(state)
        self.state = ckpt["state"]
        self.optimizer_state = ckpt["optimizer"]
        self.ema = [t.to(self.device) for t in ckpt["ema"]] if ckpt["ema"] is not None else None
        return True

    def tick(self, optimizer, phase_steps: int) -> None:
        """After each optimizer step: periodic checkpoint, and the stop conditions."""
        self.steps_this_call += 1
        cfg, now = self.config, time.perf_counter()
        stop = (cfg.stop_after_steps is not None and self.steps_this_call >= cfg.stop_after_steps) or (
            cfg.stop_after_minutes is not None and now - self.start >= 60 * cfg.stop_after_minutes
        )
        if stop and self.state["step"] < phase_steps:
            self.save_checkpoint(optimizer)
            raise _Stop
        if now - self.last_checkpoint >= 60 * cfg.checkpoint_minutes and self.state["step"] < phase_steps:
            self.save_checkpoint(optimizer)

    def finish_phase(self, next_phase: str) -> None:
        self.state.update(phase=next_phase, step=0)
        self.optimizer_state = None
        self.ema = None
        self.save_checkpoint()

    # ------------------------------------------------------------------ steps

    def ae_step(self, step: int, total: int, optimizer=None) -> float:
        cfg, vae = self.config, self.components["vae"]
        rng, g = _batch_rng(cfg.seed, "autoencoder", step, self.device)
        x = _colour_remap(_images([sample_scene(rng) for _ in range(cfg.ae_batch)], self.device), g)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=g)).sample
        rec = (recon - x).abs().mean() + (recon - x).pow(2).mean()
        kl = posterior.kl().mean() / posterior.mean[0].numel()  # per latent element
        loss = rec + cfg.ae_kl_weight * kl
        loss.backward()
        if optimizer is not None:
            for group in optimizer.param_groups:
                group["lr"] = cfg.ae_lr * _lr_factor(step, total, min(cfg.warmup, total // 10))
            torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
            optimizer.step()
        vae.zero_grad(set_to_none=True)
        return float(rec.detach())

    def diffusion_step(self, step: int, total: int, optimizer=None) -> tuple[float, float]:
        """One step; returns (Min-SNR-weighted loss, plain v MSE)."""
        cfg, c = self.config, self.components
        rng, g = _batch_rng(cfg.seed, "diffusion", step, self.device)
        scenes = [sample_scene(rng) for _ in range(cfg.batch)]
        texts = [caption(s) if rng.random() >= cfg.caption_dropout else "" for s in scenes]
        # regional rows: two of the objects get their own prompt in a box (as regional synthesis does)
        slots = [[t] * _REGION_SLOTS for t in texts]
        paint: list[list] = [[] for _ in scenes]
        for i, scene in enumerate(scenes):
            if texts[i] and len(scene.objects) >= 2 and rng.random() < cfg.region_probability:
                chosen = [int(j) for j in rng.permutation(len(scene.objects))[: _REGION_SLOTS - 1]]
                for slot, (j, box) in enumerate(zip(chosen, _region_boxes(rng, scene.objects, chosen)), start=1):
                    slots[i][slot] = object_prompt(scene.objects[j], scene.background, size=rng.random() < 0.5)
                    paint[i].append((slot, box))
        with torch.no_grad():
            latents = c["vae"].encode(_images(scenes, self.device)).latent_dist.sample(generator=g)
            latents = latents * c["vae"].config.scaling_factor
        noise = torch.randn(latents.shape, generator=g, device=self.device)
        t = torch.randint(0, c["scheduler"].config.num_train_timesteps, (cfg.batch,), generator=g, device=self.device)
        alpha_bar = c["scheduler"].alphas_cumprod.to(self.device)[t].view(-1, 1, 1, 1)
        noisy = alpha_bar.sqrt() * latents + (1 - alpha_bar).sqrt() * noise
        unique = sorted({text for row in slots for text in row})
        ids = c["tokenizer"](unique, padding="max_length", max_length=c["tokenizer"].model_max_length,
                             truncation=True, return_tensors="pt").input_ids.to(self.device)  # fmt: skip
        encoded = c["text_encoder"](ids)[0]
        v = alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * latents
        if any(paint):
            index = torch.tensor([[unique.index(text) for text in row] for row in slots], device=self.device)
            kwargs = {"cross_attention_kwargs": {"lifelong_context": self._regional_context(encoded, index, paint)}}
            prediction = c["unet"](noisy, t, encoded[index[:, 0]], **kwargs).sample
        else:
            hidden = encoded[torch.tensor([unique.index(row[0]) for row in slots], device=self.device)]
            prediction = c["unet"](noisy, t, hidden).sample
        mse = (prediction - v).pow(2).mean(dim=(1, 2, 3))
        snr = (alpha_bar / (1 - alpha_bar)).flatten()
        loss = (mse * v_loss_weight(snr, cfg.snr_floor, cfg.min_snr_gamma)).mean()
        loss.backward()
        params = _diffusion_params(c)
        if optimizer is not None:
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr * _lr_factor(step, total, min(cfg.warmup, total // 10))
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            decay = min(cfg.ema_decay, (1 + step) / (10 + step))
            torch._foreach_lerp_(self.ema, [p.detach() for p in params], 1 - decay)
        else:
            for p in params:
                p.grad = None
        return float(loss.detach()), float(mse.mean().detach())

    @torch.no_grad()
    def text_gain(self, n: int = 64) -> float:
        """How much the caption helps: 1 − x0-MSE(caption) / x0-MSE(empty caption) on a fixed validation
        batch at t = 300, 500, 700 (SNR 0.65, 0.08, 0.007, where the layout and colours are decided).
        Near 0 while the model ignores the text; it grows as prompt following is learned."""
        c = self.components
        scenes = sample_scenes(n, seed=self.config.seed + 1_000_003)
        g = torch.Generator(self.device).manual_seed(self.config.seed + 5)
        latents = c["vae"].encode(_images(scenes, self.device)).latent_dist.mean * c["vae"].config.scaling_factor
        tok = c["tokenizer"]
        ids = [tok(t, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt")
               .input_ids.to(self.device) for t in ([caption(s) for s in scenes], [""] * n)]  # fmt: skip
        hidden = [c["text_encoder"](i)[0] for i in ids]
        errors = torch.zeros(2)
        for t in (300, 500, 700):
            alpha_bar = c["scheduler"].alphas_cumprod[t].to(self.device)
            noise = torch.randn(latents.shape, generator=g, device=self.device)
            noisy = alpha_bar.sqrt() * latents + (1 - alpha_bar).sqrt() * noise
            steps = torch.full((n,), t, device=self.device)
            v = alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * latents
            for k, h in enumerate(hidden):  # x0 error = (1 − ᾱ) · v error
                errors[k] += (c["unet"](noisy, steps, h).sample - v).pow(2).mean().cpu() * (1 - alpha_bar.cpu())
        return round(float(1 - errors[0] / errors[1]), 4)

    # ------------------------------------------------------------------ plan

    def plan(self) -> dict[str, int]:
        """Step counts per phase: the configured ones, or the defaults scaled to fit ``minutes``."""
        if self.config.steps is not None:
            missing = [p for p in _PHASES if p not in self.config.steps]
            if missing:
                raise ValueError(f"steps {self.config.steps}: missing phases {missing}")
            steps = {p: int(self.config.steps[p]) for p in _PHASES}
            if self.config.init_from is not None:
                steps["autoencoder"] = 0
            return steps
        seconds = self.time_steps()
        estimate = sum(DEFAULT_STEPS[p] * seconds[p] for p in _PHASES)
        budget = 60 * self.config.minutes
        scale = min(1.0, 0.95 * budget / estimate)
        steps = {p: max(1, int(DEFAULT_STEPS[p] * scale)) for p in _PHASES}
        self.state["stats"]["plan"] = {
            "seconds_per_step": {p: round(s, 4) for p, s in seconds.items()},
            "estimated_minutes_default": round(estimate / 60, 1),
            "budget_minutes": self.config.minutes,
            "scale": round(scale, 4),
        }
        print(f"[train_base] default plan ≈ {estimate / 60:.1f} min here; budget {self.config.minutes:g} min", end="")
        print(f" → steps scaled by {scale:.3f}" if scale < 1 else " → default steps", flush=True)
        return steps

    def time_steps(self, repeats: int = 3) -> dict[str, float]:
        """Seconds per step of each phase: forward + backward without optimizer steps (weights unchanged)."""
        from .evaluator import EvaluatorNet, _augment, _targets, evaluator_scene

        c, out = self.components, {}
        for phase, fn in (("autoencoder", self.ae_step), ("diffusion", self.diffusion_step)):
            fn(0, 1)  # warm-up
            start = time.perf_counter()
            for k in range(repeats):
                fn(k, 1)
            out[phase] = (time.perf_counter() - start) / repeats
        net = EvaluatorNet().to(self.device).train()
        start = time.perf_counter()
        for k in range(repeats):
            rng = np.random.default_rng([self.config.seed, 99, k])
            scenes = [evaluator_scene(rng) for _ in range(self.config.evaluator_batch)]
            x = _augment(_images(scenes, "cpu") * 0.5 + 0.5, torch.Generator().manual_seed(k)).to(self.device)
            _targets(scenes)
            net(x)["presence"].sum().backward()
        out["evaluator"] = (time.perf_counter() - start) / repeats
        for name in ("vae", "unet", "text_encoder"):
            c[name].zero_grad(set_to_none=True)
        return out

    # ------------------------------------------------------------------ phases

    def _loop(self, phase: str, total: int, optimizer, step_fn, probe=None) -> None:
        from tqdm.auto import tqdm

        stats = self.state["stats"].setdefault(phase, {"losses": [], "mse": [], "seconds": 0.0})
        batch = self.config.ae_batch if phase == "autoencoder" else self.config.batch
        bar = tqdm(total=total, initial=self.state["step"], desc=phase, disable=not self.config.progress)
        smooth = None
        try:
            while self.state["step"] < total:
                started = time.perf_counter()
                result = step_fn(self.state["step"], total, optimizer)
                loss, mse = result if isinstance(result, tuple) else (result, result)
                stats["losses"].append(loss)
                stats["mse"].append(mse)
                stats["seconds"] += time.perf_counter() - started
                self.state["step"] += 1
                smooth = mse if smooth is None else 0.98 * smooth + 0.02 * mse
                rate = len(stats["losses"]) * batch / max(stats["seconds"], 1e-9)
                postfix = {"loss": f"{smooth:.4f}", "img_s": f"{rate:.0f}"}
                if probe is not None and self.state["step"] % self.config.probe_every == 0:
                    stats.setdefault("text_gain", []).append([self.state["step"], probe()])
                if stats.get("text_gain"):
                    postfix["text_gain"] = f"{stats['text_gain'][-1][1]:.3f}"
                bar.set_postfix(postfix)
                bar.update(1)
                if not math.isfinite(loss):
                    raise FloatingPointError(f"{phase} step {self.state['step']}: loss {loss}")
                self.tick(optimizer, total)
        finally:
            bar.close()

    def run_autoencoder(self, total: int) -> None:
        vae = self.components["vae"]
        vae.train().requires_grad_(True)
        optimizer = torch.optim.AdamW(vae.parameters(), lr=self.config.ae_lr, betas=(0.9, 0.99), weight_decay=0.0)
        if self.optimizer_state is not None:
            optimizer.load_state_dict(self.optimizer_state)
        self._loop("autoencoder", total, optimizer, self.ae_step)
        vae.eval().requires_grad_(False)
        rng = np.random.default_rng([self.config.seed, 10])
        x = _images([sample_scene(rng) for _ in range(1024)], self.device)
        g = torch.Generator(self.device).manual_seed(self.config.seed)
        before = _standardise_latents(vae, x[:512], g)
        # SD's recipe on top (≈ 1 now): scale latents to unit spread, measured on other images
        with torch.no_grad():
            z = vae.encode(x[512:]).latent_dist.sample(generator=g)
        vae.register_to_config(scaling_factor=round(1.0 / float(z.std()), 5))
        self.state["stats"]["autoencoder"].update(
            raw_latent_channel_mean=before[0],
            raw_latent_channel_std=before[1],
            latent_channel_mean=[round(float(m), 3) for m in z.mean(dim=(0, 2, 3))],
            latent_channel_std=[round(float(m), 3) for m in z.std(dim=(0, 2, 3))],
            scaling_factor=vae.config.scaling_factor,
        )
        self.finish_phase("diffusion")

    def run_diffusion(self, total: int) -> None:
        c = self.components
        c["vae"].eval().requires_grad_(False)
        c["unet"].train().requires_grad_(True)
        c["text_encoder"].train().requires_grad_(True)
        params = _diffusion_params(c)
        optimizer = torch.optim.AdamW(params, lr=self.config.lr, betas=(0.9, 0.999), weight_decay=0.01)
        if self.optimizer_state is not None:
            optimizer.load_state_dict(self.optimizer_state)
        if self.ema is None:
            self.ema = [p.detach().clone() for p in params]
        self._loop("diffusion", total, optimizer, self.diffusion_step, probe=self.text_gain)
        with torch.no_grad():
            for p, e in zip(params, self.ema):
                p.copy_(e)
        if total >= self.config.probe_every:
            self.state["stats"]["diffusion"]["text_gain_ema"] = self.text_gain()
        c["unet"].eval().requires_grad_(False)
        c["text_encoder"].eval().requires_grad_(False)
        self.finish_phase("evaluator")


def _sample_grid(pipe, evaluator, config: TrainConfig, device) -> dict:
    """Generate images for held-out generic captions; score them with the evaluator and write
    ``samples.png`` (generated images above renders of the same scenes, 4× nearest upscale)."""
    from PIL import Image

    scenes = sample_scenes(64, seed=config.seed + 777_777)
    pipe.set_progress_bar_config(disable=True)
    images = []
    for i in range(0, len(scenes), 16):
        chunk = scenes[i : i + 16]
        out = pipe(
            [caption(s) for s in chunk],
            num_inference_steps=30,
            guidance_scale=4.0,
            generator=torch.Generator(device).manual_seed(config.seed + i),
            output_type="np",
        )
        images.append((out.images * 255).round().astype(np.uint8))
    generated = np.concatenate(images)
    accuracy = evaluator.attribute_accuracy(generated, scenes) if evaluator is not None else None
    truth = render_batch(scenes[:16])
    rows = [np.concatenate(list(generated[k : k + 8]), axis=1) for k in (0, 8)]
    rows += [np.concatenate(list(truth[k : k + 8]), axis=1) for k in (0, 8)]
    grid = np.concatenate(rows, axis=0)
    big = Image.fromarray(grid).resize((grid.shape[1] * 4, grid.shape[0] * 4), Image.NEAREST)
    big.save(config.out / "samples.png")
    return {"prompts": len(scenes), "guidance_scale": 4.0, "steps": 30, "attribute_accuracy": accuracy}


def _finished_evaluator(directory: Path, recorded: dict, device):
    """The evaluator a previous call of this run already trained into ``directory`` (same steps,
    batch and seed, this evaluator version), or None."""
    from .evaluator import EVALUATOR_VERSION, Evaluator

    path = directory / "config.json"
    if not path.is_file():
        return None
    config = json.loads(path.read_text())
    training = config.get("training", {})
    if config.get("version") != EVALUATOR_VERSION or any(training.get(k) != v for k, v in recorded.items()):
        return None
    print(f"[train_base] evaluator already trained in {directory}; reusing it")
    return Evaluator.load(directory, device)


def train(config: TrainConfig) -> dict:
    """Run (or resume) the whole training; returns the stats also written to ``training_stats.json``.
    Raises nothing on an early stop (``stop_after_*``): the stats then have ``"finished": False``."""
    from .evaluator import held_out_accuracy, identity_accuracy, identity_separation, train_evaluator

    config = dataclasses.replace(config, out=Path(config.out))
    run = _Run(config)
    resumed = run.resume()
    if resumed:
        print(f"[train_base] resuming {run.checkpoint_path}: phase {run.state['phase']}, step {run.state['step']}")
    if run.state["steps"] is None:
        run.state["steps"] = run.plan()
    elif config.steps is not None and dict(config.steps) != run.state["steps"]:
        raise ValueError(
            f"checkpoint {run.checkpoint_path} plans steps {run.state['steps']}, not {dict(config.steps)}: "
            "resume with the same steps or --restart"
        )
    steps = run.state["steps"]
    stats = run.state["stats"]
    stats.setdefault("resumed", 0)
    stats["resumed"] += int(resumed)
    try:
        if run.state["phase"] == "autoencoder":
            run.run_autoencoder(steps["autoencoder"])
        if run.state["phase"] == "diffusion":
            run.run_diffusion(steps["diffusion"])
    except _Stop:
        print(f"[train_base] stopped at {run.state['phase']} step {run.state['step']}; run again to resume")
        return {"finished": False, "phase": run.state["phase"], "step": run.state["step"]}

    recorded = {"steps": steps["evaluator"], "batch": config.evaluator_batch, "seed": config.seed}
    evaluator = _finished_evaluator(config.out / "evaluator", recorded, run.device)
    if evaluator is None:
        started = time.perf_counter()
        evaluator = train_evaluator(
            steps["evaluator"], config.evaluator_batch, config.seed, run.device, progress=config.progress
        )
        recorded["seconds"] = round(time.perf_counter() - started, 1)
        evaluator.save(config.out / "evaluator", extra={"training": recorded})  # kept if a later step fails
    else:  # reused: the time its training took, as recorded then (None if it was not)
        training = json.loads((config.out / "evaluator" / "config.json").read_text())["training"]
        recorded["seconds"] = training.get("seconds")
    stats["evaluator"] = {
        **recorded,
        "held_out_accuracy": held_out_accuracy(evaluator, n=200 if steps["evaluator"] < 50 else 1000),
        "identity_accuracy": identity_accuracy(evaluator, per_class=5 if steps["evaluator"] < 50 else 40),
        "identity_alignment": identity_separation(evaluator),
    }

    from diffusers.models.attention_processor import AttnProcessor2_0

    run.components["unet"].set_attn_processor(AttnProcessor2_0())  # diffusers' own again, as loading gives
    pipe = build_pipeline(run.components)
    for phase in ("autoencoder", "diffusion"):
        if phase not in stats:  # started from other weights (init_from): no autoencoder phase
            continue
        s = stats[phase]
        batch = config.ae_batch if phase == "autoencoder" else config.batch
        n = max(1, len(s["mse"]) // 20)
        s.update(
            steps=len(s["losses"]),
            batch=batch,
            images_per_second=round(len(s["losses"]) * batch / max(s["seconds"], 1e-9), 1),
            first_mse=round(float(np.mean(s["mse"][:n])), 5),
            last_mse=round(float(np.mean(s["mse"][-n:])), 5),
        )
        s["loss_curve"], s["mse_curve"] = _curve(s.pop("losses")), _curve(s.pop("mse"))
        s["seconds"] = round(s["seconds"], 1)
    if config.samples:
        stats["samples"] = _sample_grid(pipe, evaluator, config, run.device)
    evaluator.save(config.out / "evaluator", extra={"training": stats["evaluator"]})
    manifest_extra = {"seed": config.seed, "steps": steps, "scaling_factor": pipe.vae.config.scaling_factor}
    if run.init_fingerprint is not None:
        manifest_extra["init_fingerprint"] = run.init_fingerprint
    save_weights(pipe, config.out, extra=manifest_extra)
    report = {
        "finished": True,
        "version": MODEL_VERSION,
        "recipe": run.recipe(),
        "steps": steps,
        "device": str(run.device),
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        **stats,
    }
    (config.out / STATS).write_text(json.dumps(report, indent=2, default=float) + "\n")
    run.checkpoint_path.unlink(missing_ok=True)
    return report


def export_checkpoint(directory: str | Path, out: str | Path) -> Path:
    """The weights of an unfinished run in ``directory`` (its checkpoint) as a model directory that
    :func:`~.model.load_tinyworld_pipeline` and ``targets --weights`` read, for watching a long run:
    in the diffusion phase the EMA (what the run would ship), the run's evaluator when it has one.
    The manifest records ``checkpoint``: the phase and step. Returns ``out``."""
    import shutil

    path = Path(directory) / CHECKPOINT
    if Path(out).resolve() == Path(directory).resolve():
        raise ValueError(f"--export {out}: the run's own directory; export to another one")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no checkpoint (a finished run's weights are {directory} itself)")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if ckpt.get("version") != MODEL_VERSION:
        raise ValueError(f"checkpoint {path} is for {ckpt.get('version')!r}, not {MODEL_VERSION!r}")
    state = ckpt["state"]
    if state["phase"] == "autoencoder":
        raise ValueError(f"checkpoint {path} is in the autoencoder phase: there is no diffusion model to export yet")
    c = tinyworld_components(ckpt["recipe"]["seed"])
    c["vae"].register_to_config(scaling_factor=ckpt["scaling_factor"])
    for name, weights in ckpt["models"].items():
        c[name].load_state_dict(weights)
    if ckpt["ema"] is not None:  # the diffusion phase: its EMA, in diffusion_step's parameter order
        with torch.no_grad():
            for p, e in zip(_diffusion_params(c), ckpt["ema"], strict=True):
                p.copy_(e)
    out = Path(out)
    save_weights(build_pipeline(c), out, extra={"seed": ckpt["recipe"]["seed"], "recipe": ckpt["recipe"],
                 "checkpoint": {"phase": state["phase"], "step": state["step"], "steps": state["steps"]}})  # fmt: skip
    evaluator = Path(directory) / "evaluator"
    if (evaluator / "config.json").is_file():
        shutil.copytree(evaluator, out / "evaluator", dirs_exist_ok=True)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=WEIGHTS_DIR, help="weights directory (default: the package's)")
    parser.add_argument("--minutes", type=float, default=55.0, help="time budget; default steps shrink to fit it")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    for phase in _PHASES:
        parser.add_argument(f"--{phase}-steps", type=int, default=None, help=f"{phase} steps (skips the timing)")
    parser.add_argument("--checkpoint-minutes", type=float, default=5.0)
    parser.add_argument("--stop-after-minutes", type=float, default=None, help="stop early with a checkpoint")
    parser.add_argument("--no-samples", action="store_true", help="skip samples.png and the prompt-following score")
    parser.add_argument("--restart", action="store_true", help="ignore an existing checkpoint")
    parser.add_argument("--init-from", type=Path, default=None,
                        help="start from the weights in this directory (e.g. the previous version): keeps its "
                             "autoencoder and skips phase 1")  # fmt: skip
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the recipe's)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps (default: the recipe's)")
    parser.add_argument("--ema-decay", type=float, default=None, help="EMA decay (default: the recipe's)")
    parser.add_argument("--snr-floor", type=float, default=None,
                        help="least x0-loss weight of a timestep (default: the recipe's, 0: Min-SNR)")  # fmt: skip
    parser.add_argument("--export", type=Path, default=None, metavar="DIR",
                        help="train nothing: write the --out run's checkpoint (its EMA) to DIR, a model")  # fmt: skip
    args = parser.parse_args(argv)
    if args.export is not None:
        try:
            print(f"[train_base] {args.out / CHECKPOINT} → {export_checkpoint(args.out, args.export)}")
        except (FileNotFoundError, ValueError) as e:
            parser.error(str(e))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    given = {p: getattr(args, f"{p}_steps") for p in _PHASES}
    if any(v is not None for v in given.values()):
        steps = {p: v if v is not None else DEFAULT_STEPS[p] for p, v in given.items()}
    else:
        steps = None
    recipe = dict(FINETUNE) if args.init_from is not None else {}
    overrides = {"lr": args.lr, "warmup": args.warmup, "ema_decay": args.ema_decay, "snr_floor": args.snr_floor}
    recipe.update({k: v for k, v in overrides.items() if v is not None})
    config = TrainConfig(
        **recipe,
        out=args.out,
        seed=args.seed,
        device=args.device,
        minutes=args.minutes,
        steps=steps,
        checkpoint_minutes=args.checkpoint_minutes,
        stop_after_minutes=args.stop_after_minutes,
        samples=not args.no_samples,
        restart=args.restart,
        init_from=args.init_from,
    )
    report = train(config)
    if report["finished"]:
        brief = {k: report[k] for k in ("steps", "device", "threads") if k in report}
        brief["samples"] = report.get("samples")
        print(json.dumps(brief, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

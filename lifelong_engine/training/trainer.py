"""ContinualTrainer: learn concepts one after another without forgetting (DESIGN §4).

One training loop; each method is a strategy over it, one file each in
:mod:`lifelong_engine.training.methods` (see its table of methods). The trainer owns the data, the
loop, checkpoints, resume and the bad-step policy, and knows no method by name; a method's
hyperparameters are its own dataclass (``ContinualTrainer(lp, method=methods.config("cidm", gamma1=1.0))``).

Every task also learns the concept's token words (two by default: the first randomly
initialised, the second from the class word); the base model, the text encoder and past
concepts stay frozen. For the shared-LoRA methods the newest concept carries the shared LoRA
and earlier concepts keep only their tokens in the pipeline, so generation sees
base + the latest shared LoRA.

Robustness: a checkpoint every ``checkpoint_every`` steps (atomic: temp file + rename) in the
store's ``staging/`` or ``run_dir``; ``learn(..., resume=True)`` continues it and ends at the
same adapter as an uninterrupted run with the same seed; a non-finite loss or gradient skips
the step (the parameters stay at the last good state) with a warning, and ``max_bad_steps``
in a row stop with :class:`TrainingError`. State that outlives one task (CIDM's W_* and H_i,
EWC's Fisher, L2DM's memory, RPY's replay images) is saved next to the checkpoints after every
task and reloaded by a new trainer with the same directory and method.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import resource
import stat
import tempfile
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from torch import Tensor
from tqdm.auto import tqdm

from ..attention import GenerationContext, ImageLora, unet_forward
from ..concepts import ConceptAdapter, validate_name
from ..errors import LifelongError
from ..pool import AdapterPool
from ..store import atomic_torch_save as _atomic_save
from . import losses, methods
from .methods.base import KV, Batch, MethodConfig, TaskState, default_caption

__all__ = ["ContinualTrainer", "TrainingStats", "TrainingError", "METHODS", "Task"]

METHODS = methods.NAMES
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


class TrainingError(LifelongError):
    """Training cannot go on (e.g. the loss stays non-finite)."""


@dataclasses.dataclass
class TrainingStats:
    """steps: optimizer steps taken in this call (skipped ones excluded); eval_loss_before/after:
    denoising loss on the concept's images at fixed timesteps and noise, before and after."""

    steps: int
    seconds: float
    steps_per_second: float
    peak_memory_bytes: int
    final_loss: float
    eval_loss_before: float
    eval_loss_after: float
    skipped_steps: int
    losses: list[float]


@dataclasses.dataclass
class Task:
    """One concept to learn, encoded: latents (N, C, h, w) scaled by the VAE's factor, captions,
    optional masks (N, 1, h, w) at latent resolution."""

    name: str
    token: str
    words: list[str]
    class_word: str
    latents_mean: Tensor
    latents_std: Tensor
    captions: list[str]
    masks: Tensor | None


class ContinualTrainer:
    """Learns concepts into a :class:`~lifelong_engine.LifelongPipeline`, one task at a time.

    pipeline: the LifelongPipeline the concepts are added to; method: a name from :data:`METHODS`
    (default hyperparameters) or a method's config (``methods.config("cidm", gamma1=1.0)``);
    rank: LoRA rank (alpha = rank); max_steps, learning_rate, batch_size: the optimisation
    (token rows use ``token_learning_rate``, default the same); store: a ConceptStore the learned
    concepts are saved to (checkpoints go to its staging area); run_dir: checkpoint directory
    without a store (default: a fresh temporary one; pass one to resume in another process);
    seed: makes a run reproducible (and resumable to the same result);
    mixed_precision: "bf16" runs the forward under autocast (parameters and optimizer stay fp32);
    gradient_checkpointing: recompute UNet activations in the backward to save memory;
    sample_steps: denoising steps of the images a method generates (class images, replay).
    """

    def __init__(
        self,
        pipeline,
        method: str | MethodConfig = "cidm",
        rank: int = 4,
        max_steps: int = 400,
        learning_rate: float = 1e-3,
        batch_size: int = 1,
        store=None,
        seed: int | None = None,
        *,
        namespace: str = "default",
        token_learning_rate: float | None = None,
        words: int = 2,
        resolution: int | None = None,
        checkpoint_every: int = 50,
        run_dir: str | os.PathLike | None = None,
        sample_steps: int = 20,
        max_bad_steps: int = 5,
        gradient_checkpointing: bool = False,
        mixed_precision: str | None = None,
        progress: bool = True,
    ):
        config = methods.config(method) if isinstance(method, str) else method
        if rank < 1 or max_steps < 1 or batch_size < 1 or words < 1 or checkpoint_every < 1:
            raise ValueError("rank, max_steps, batch_size, words and checkpoint_every must be at least 1")
        for option, lr in (("learning_rate", learning_rate), ("token_learning_rate", token_learning_rate)):
            if lr is not None and not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
                raise ValueError(f"{option} must be a finite number > 0, got {lr!r}")
        self.pipeline, self.rank = pipeline, rank
        self.max_steps, self.learning_rate, self.batch_size = max_steps, learning_rate, batch_size
        self.token_learning_rate = token_learning_rate or learning_rate
        self.store, self.namespace, self.seed, self.words = store, namespace, seed, words
        self.checkpoint_every, self.max_bad_steps, self.progress = checkpoint_every, max_bad_steps, progress
        self.gradient_checkpointing = gradient_checkpointing
        self.sample_steps = sample_steps
        if mixed_precision not in (None, "bf16"):
            raise ValueError(
                f"mixed_precision must be None or 'bf16', got {mixed_precision!r} (fp16 would need loss scaling)"
            )
        self.mixed_precision = mixed_precision
        pipe = pipeline.pipe
        self.resolution = resolution or pipeline.unet.config.sample_size * pipe.vae_scale_factor
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.widths = dict(pipeline.widths)  # (layer, proj) → (Din, Dout)
        if store is not None:
            self.run_dir = Path(store.staging)
        else:
            # without either, a fresh directory: another run's method state must not leak into this one
            fresh = run_dir is None
            self.run_dir = Path(tempfile.mkdtemp(prefix="lifelong-engine-run-") if fresh else run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.stats: dict[str, TrainingStats] = {}
        self.strategy = methods.build(config, self)
        self.method = self.strategy.name
        self._load_method_state()

    # ===================================================================== API

    def learn(
        self,
        name: str,
        images,
        class_word: str,
        captions: list[str] | None = None,
        masks=None,
        resume: bool = False,
    ) -> ConceptAdapter:
        """Learn one concept from ``images`` (PIL images, a folder, or a (N, 3, H, W) tensor in [0, 1]),
        add it to the pipeline (and the store) and return it. Prompts name it ``<name>``; default
        captions are "a photo of a <name> {class_word}". masks: optional per-image concept masks
        (PIL "L"/"1" images or (H, W) tensors; the loss counts only the masked pixels)."""
        validate_name(name)
        lp = self.pipeline
        if name in lp.concepts:
            raise ValueError(f"concept {name!r} is already in the pipeline")
        if not class_word or not isinstance(class_word, str):
            raise ValueError("class_word must be a non-empty string (e.g. 'dog')")
        token = f"<{name}>"
        pixels = self._load_images(images)
        if captions is None:
            captions = [default_caption(token, class_word)] * len(pixels)
        if len(captions) != len(pixels) or not all(token in c for c in captions):
            raise ValueError(f"captions: need one per image ({len(pixels)}), each containing the token {token!r}")
        task = self._encode_task(name, token, class_word, pixels, captions, masks)

        seed = self.seed + zlib.crc32(name.encode()) if self.seed is not None else torch.seed() % 2**63
        gen = torch.Generator().manual_seed(seed)  # per task: tasks of one run start from different inits
        state = self._init_task(task, gen)
        ckpt = self.run_dir / f"{self.method}-{name}.ckpt"
        start = 0
        if resume and ckpt.exists():
            start = self._load_checkpoint(ckpt, state, gen)
        elif resume:
            warnings.warn(f"no checkpoint for {name!r} in {self.run_dir}; starting from the beginning", stacklevel=2)

        unet = lp.unet
        frozen = _freeze(lp)  # no gradients for the base model: only the concept's parameters train
        if self.gradient_checkpointing and hasattr(unet, "enable_gradient_checkpointing"):
            unet.enable_gradient_checkpointing()
        eval_before = self._eval_loss(task, state)
        losses_, skipped, bad_in_row = state.losses, 0, 0
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        bar = tqdm(range(start, self.max_steps), desc=f"{self.method} {name}", disable=not self.progress)
        step = start
        try:
            for step in bar:
                loss = self._step(task, state, gen)
                if loss is None:
                    skipped += 1
                    bad_in_row += 1
                    warnings.warn(
                        f"{name}: step {step + 1}: non-finite loss or gradient; skipped (parameters kept at the "
                        "last good state)",
                        stacklevel=2,
                    )
                    if bad_in_row >= self.max_bad_steps:
                        raise TrainingError(
                            f"{name}: {bad_in_row} steps in a row had a non-finite loss or gradient; stopping. "
                            "Lower the learning rate or check the images."
                        )
                    continue
                bad_in_row = 0
                losses_.append(loss)
                bar.set_postfix(loss=f"{loss:.4f}")
                self.strategy.after_step(task, state, step + 1)
                if (step + 1) % self.checkpoint_every == 0 and step + 1 < self.max_steps:
                    self._save_checkpoint(ckpt, state, gen, step + 1)
        finally:
            bar.close()
            frozen.restore()
            if self.gradient_checkpointing and hasattr(unet, "disable_gradient_checkpointing"):
                unet.disable_gradient_checkpointing()
        seconds = time.perf_counter() - t0
        steps = self.max_steps - start - skipped

        adapter = self._finish_task(task, state)
        eval_after = self._eval_loss(task, state)
        self.stats[name] = TrainingStats(
            steps=steps,
            seconds=seconds,
            steps_per_second=steps / seconds if seconds > 0 else math.inf,
            peak_memory_bytes=_peak_memory(),
            final_loss=losses_[-1] if losses_ else math.nan,
            eval_loss_before=eval_before,
            eval_loss_after=eval_after,
            skipped_steps=skipped,
            losses=list(losses_),
        )
        adapter.metadata.update(
            steps=str(self.max_steps),
            final_loss=f"{self.stats[name].final_loss:.6g}",
            seed=str(self.seed),
            captions=json.dumps(list(dict.fromkeys(task.captions))),  # what rehearsal methods prompt it with
        )
        self._publish(adapter)
        ckpt.unlink(missing_ok=True)
        return adapter

    # ================================================================= data

    def _load_images(self, images) -> Tensor:
        """(N, 3, R, R) in [-1, 1], centre-cropped and resized to the model's resolution by the pipeline's
        ``image_processor``."""
        if isinstance(images, (str, os.PathLike)):
            folder = Path(images)
            if not folder.is_dir():
                raise ValueError(f"images: {folder} is not a directory")
            files = sorted(p for p in folder.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)
            if not files:
                raise ValueError(f"images: no image files ({', '.join(sorted(_IMAGE_SUFFIXES))}) in {folder}")
            images = [_open_image(p) for p in files]
        elif isinstance(images, Tensor):
            if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
                raise ValueError(f"images: a tensor must be (N, 3, H, W) float in [0, 1], got {tuple(images.shape)}")
            if not bool(torch.isfinite(images).all()) or images.min() < 0 or images.max() > 1:
                raise ValueError("images: tensor values must be finite and lie in [0, 1]")
            images = [PIL.Image.fromarray((x.permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8))
                      for x in images]  # fmt: skip
        images = list(images)
        if not images:
            raise ValueError("images: no images given")
        out = []
        for i, im in enumerate(images):
            if not isinstance(im, PIL.Image.Image):
                raise TypeError(f"images[{i}]: expected a PIL image, got {type(im).__name__}")
            if im.mode not in ("RGB", "RGBA", "L"):
                raise ValueError(f"images[{i}]: mode {im.mode!r} is not supported (use RGB, RGBA or L)")
            if min(im.size) < self.resolution:
                raise ValueError(
                    f"images[{i}] is {im.size[0]}x{im.size[1]}, smaller than the model's resolution {self.resolution}"
                )
            out.append(im.convert("RGB"))
        # diffusers' own preprocessing: centre crop + resize (its resampling), scaled to [-1, 1]
        r = self.resolution
        return self.pipeline.pipe.image_processor.preprocess(out, height=r, width=r, resize_mode="crop").float()

    @torch.no_grad()
    def _encode_task(self, name, token, class_word, pixels: Tensor, captions, masks) -> Task:
        lp = self.pipeline
        vae = lp.pipe.vae
        dist = vae.encode(pixels.to(lp.device, vae.dtype)).latent_dist
        sf = vae.config.scaling_factor
        h, w = dist.mean.shape[-2:]
        mask_t = None
        if masks is not None:
            if len(masks) != len(pixels):
                raise ValueError(f"masks: need one per image ({len(pixels)}), got {len(masks)}")
            mask_t = torch.stack([self._mask_tensor(m, i) for i, m in enumerate(masks)])
            mask_t = F.interpolate(mask_t[:, None], size=(h, w), mode="area").to(lp.device)
            if (mask_t.flatten(1).sum(1) == 0).any():
                raise ValueError("masks: every mask must mark at least one pixel of its image")
        words = [token] + [f"{token}_{i}" for i in range(1, self.words)]
        return Task(name, token, words, class_word, dist.mean * sf, dist.std * sf, list(captions), mask_t)

    def _mask_tensor(self, mask, i: int) -> Tensor:
        """(R, R) in [0, 1]: a PIL mask cropped and resized like the images, or an (H, W) tensor resized."""
        r = self.resolution
        if isinstance(mask, PIL.Image.Image):
            square = self.pipeline.pipe.image_processor.resize(mask.convert("RGB"), r, r, resize_mode="crop")
            return torch.from_numpy(np.asarray(square.convert("L"), dtype=np.float32) / 255)
        if isinstance(mask, Tensor) and mask.ndim == 2:
            return F.interpolate(mask.float()[None, None], size=(r, r), mode="area")[0, 0]
        raise TypeError(f"masks[{i}]: expected a PIL image or an (H, W) tensor, got {type(mask).__name__}")

    # ================================================================ state

    def _init_task(self, task: Task, gen: torch.Generator) -> TaskState:
        """Trainable parameters, frozen pool and optimizer of one task, then the method's own setup."""
        lp, method = self.pipeline, self.strategy
        past = list(lp.concepts.values())
        dev = lp.device
        params = method.trainable(task, past, gen)
        params["tokens"] = self._init_tokens(task, gen).to(dev)
        for t in params.values():
            t.requires_grad_(True)
        groups = [
            {"params": [t for k, t in params.items() if k != "tokens"], "lr": self.learning_rate},
            {"params": [params["tokens"]], "lr": self.token_learning_rate},
        ]
        state = TaskState(params, torch.optim.AdamW(groups, weight_decay=0.0), past)
        if method.sums_past and past:  # the frozen concepts the forward adds
            kv_widths = {key: w for key, w in self.widths.items() if key[1] in KV}
            state.frozen = AdapterPool.build(past, kv_widths, dev, torch.float32)
            state.frozen_names = [c.name for c in past]
        if method.keeps_teacher and any(c.method == method.name for c in past):
            state.teacher = {k: t.detach().clone() for k, t in params.items() if k != "tokens"}
        method.init_task(task, state, gen)
        return state

    def _init_tokens(self, task: Task, gen: torch.Generator) -> Tensor:
        """(L or 1, words, D): word 0 random at the embedding table's scale, the others the class word."""
        lp = self.pipeline
        rows = []
        for tok, enc in zip(lp.text.tokenizers, lp.text.text_encoders):
            table = enc.get_input_embeddings().weight.detach().float().cpu()
            ids = tok(task.class_word, add_special_tokens=False).input_ids
            cls = table[ids].mean(0)
            word0 = torch.randn(table.shape[1], generator=gen) * table.std()
            rows.append(torch.stack([word0] + [cls] * (self.words - 1)))
        tokens = torch.cat(rows, dim=-1)  # (words, D)
        n_layers = len(lp.layers) if self.strategy.layerwise_tokens else 1
        return tokens[None].repeat(n_layers, 1, 1)

    # ================================================================ forward

    def _pool(self, state: TaskState, teacher: bool = False) -> tuple[AdapterPool, int]:
        """The adapters of the training forward: the trained one (or the teacher's copy) first, then
        the frozen ones. Returns (pool, number of adapters)."""
        lp, method = self.pipeline, self.strategy
        params = state.teacher if teacher else state.params
        frozen = state.frozen
        factors = {}
        for layer in lp.layers:
            for proj in method.projections:
                a, b = method.forward_factors(params, layer, proj)
                a, b = a[None], b[None]
                past = frozen.get(layer, proj) if frozen is not None else None
                if past is not None:  # past concepts (stacked once per task), ranks padded to a common r
                    fa, fb = past
                    r = max(a.shape[1], fa.shape[1])
                    a = torch.cat([F.pad(a, (0, 0, 0, r - a.shape[1])), F.pad(fa, (0, 0, 0, r - fa.shape[1]))])
                    b = torch.cat([F.pad(b, (0, r - b.shape[2])), F.pad(fb, (0, r - fb.shape[2]))])
                factors[layer, proj] = (a.to(lp.dtype), b.to(lp.dtype))
        names = ["<training>", *state.frozen_names]
        return AdapterPool(names, factors), len(names)

    def predict(self, state: TaskState, task: Task, captions, noisy, t, teacher: bool = False) -> Tensor:
        """The UNet's prediction (float32) for noisy latents and captions, with the trained concept (or
        the teacher's copy of the shared LoRA)."""
        amp = self.mixed_precision is not None
        with torch.autocast(self.pipeline.device.type, dtype=torch.bfloat16, enabled=amp):
            return self._forward(state, task, captions, noisy, t, teacher).float()

    def _forward(self, state: TaskState, task: Task, captions, noisy, t, teacher) -> Tensor:
        lp = self.pipeline
        concepts = {c.token: c for c in state.past}
        concepts[task.token] = _TokenOnly(task.token, task.words, state.params["tokens"])
        # The text side runs once per distinct caption (a concept's captions are often all the same); each
        # sample then reads its caption's K/V.
        unique = list(dict.fromkeys(captions))
        rows = torch.tensor([unique.index(caption) for caption in captions], device=lp.device)
        enc = lp.text.encode(unique, concepts)
        pool, g = self._pool(state, teacher)
        n, L = len(captions), len(lp.layers)
        ids = torch.arange(g, device=lp.device).expand(n, L, g)
        ones = torch.ones(n, L, g, device=lp.device)
        slots = rows[:, None] if len(unique) < n else None  # no gather when every caption differs
        kv = lp.text_kv(enc.text, pool, ids[: len(unique)], ones[: len(unique)], slots)
        ctx = GenerationContext(kv)
        if any(p not in KV for p in self.strategy.projections):  # image-side LoRA (to_q, to_out.0)
            ctx.image_lora = ImageLora(
                pool,
                {layer: ids[:, l] for l, layer in enumerate(lp.layers)},
                {layer: ones[:, l].to(lp.dtype) for l, layer in enumerate(lp.layers)},
            )
        added = None
        if lp.is_sdxl:
            time_ids = torch.tensor([[self.resolution, self.resolution, 0, 0, self.resolution, self.resolution]])
            added = {
                "text_embeds": (enc.pooled if slots is None else enc.pooled[rows]).to(lp.dtype),
                "time_ids": time_ids.to(lp.device, lp.dtype).repeat(n, 1),
            }
        hidden = enc.per_layer[:, 0] if enc.shared is None else enc.shared
        hidden = (hidden if slots is None else hidden[rows]).to(lp.dtype)
        return unet_forward(lp.unet, noisy.to(lp.dtype), t, ctx, hidden, added)

    def noised(self, latents: Tensor, gen: torch.Generator, t: Tensor | None = None):
        """(noisy, t, target) for clean latents: noise from ``gen``, t uniform unless given."""
        noise = torch.randn(latents.shape, generator=gen).to(latents.device)
        if t is None:
            t = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (latents.shape[0],), generator=gen)
        t = t.to(latents.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, t)
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, t)
        else:
            target = noise
        return noisy, t, target

    def sample_latents(self, task: Task, idx: Tensor, gen: torch.Generator) -> Tensor:
        """Latents of the task's images ``idx``, drawn from the VAE posterior."""
        mean, std = task.latents_mean[idx], task.latents_std[idx]
        return mean + std * torch.randn(mean.shape, generator=gen).to(mean.device)

    def _step(self, task: Task, state: TaskState, gen: torch.Generator) -> float | None:
        params, opt = state.params, state.optimizer
        n = len(task.captions)
        idx = torch.randint(0, n, (self.batch_size,), generator=gen)
        noisy, t, target = self.noised(self.sample_latents(task, idx, gen), gen)
        captions = [task.captions[i] for i in idx]
        pred = self.predict(state, task, captions, noisy, t)
        mask = task.masks[idx] if task.masks is not None else None
        batch = Batch(captions, noisy, t, target, pred)
        loss = losses.diffusion_loss(pred, target, mask) + self._regulariser(task, state, batch, gen)
        opt.zero_grad(set_to_none=True)
        if not torch.isfinite(loss):
            return None
        loss.backward()
        grads = [p.grad for p in params.values() if p.grad is not None]
        # one fused norm over every gradient and one host sync (not one per parameter): inf / NaN anywhere
        # makes it non-finite
        if grads and not torch.isfinite(torch.nn.utils.get_total_norm(grads)):
            opt.zero_grad(set_to_none=True)
            return None
        opt.step()
        return float(loss.detach())

    def _regulariser(self, task: Task, state: TaskState, batch: Batch, gen: torch.Generator) -> Tensor:
        reg = self.strategy.regulariser(task, state, batch, gen)
        return batch.pred.new_zeros(()) if reg is None else reg

    # ========================================================= finishing

    def _finish_task(self, task: Task, state: TaskState) -> ConceptAdapter:
        """The learned concept as a ConceptAdapter (+ method bookkeeping that outlives the task)."""
        lp = self.pipeline
        params = {k: v.detach() for k, v in state.params.items()}
        lora, rank = self.strategy.adapter_factors(params)
        adapter = ConceptAdapter(
            name=task.name,
            token=task.token,
            words=task.words,
            layers=list(lp.layers),
            lora=lora,
            rank=rank,
            class_word=task.class_word,
            token_embeddings=params["tokens"].cpu().clone(),
            base_fingerprint=lp.fingerprint,
            method=self.method,
        )
        adapter.concept_embeddings = lp.concept_embedding(adapter).cpu()
        adapter = self.strategy.finish(task, state, adapter)
        self._save_method_state()
        return adapter

    @torch.no_grad()
    def generate_latents(
        self, caption: str | list[str], n: int, gen: torch.Generator, base_only: bool = False
    ) -> Tensor:
        """(n · captions, C, h, w) VAE latents (scaled, posterior means) of ``n`` images per caption (caption-major),
        generated in one batch with the pipeline as it is (or the base model alone), seeded from ``gen``."""
        lp = self.pipeline
        with _without_concepts(lp) if base_only else contextlib.nullcontext(), _quiet(lp.pipe):
            images = lp(
                caption,
                num_images_per_prompt=n,
                num_inference_steps=self.sample_steps,
                generator=_child_generator(gen, lp.device),
                output_type="pt",
                height=self.resolution,
                width=self.resolution,
            ).images
        dist = lp.pipe.vae.encode((images * 2 - 1).to(lp.pipe.vae.dtype)).latent_dist
        return dist.mean * lp.pipe.vae.config.scaling_factor

    @torch.no_grad()
    def _eval_loss(self, task: Task, state: TaskState, n_t: int = 4) -> float:
        """Denoising loss on all the concept's images at fixed timesteps and noise (comparable across calls)."""
        gen = torch.Generator().manual_seed(1234)
        total = 0.0
        T = self.noise_scheduler.config.num_train_timesteps
        for t_val in torch.linspace(T * 0.1, T * 0.9, n_t).long():
            idx = torch.arange(len(task.captions))
            latents = task.latents_mean[idx]
            t = torch.full((len(idx),), int(t_val))
            noisy, t, target = self.noised(latents, gen, t)
            pred = self.predict(state, task, task.captions, noisy, t)
            total += float(losses.diffusion_loss(pred, target, task.masks))
        return total / n_t

    # ======================================================= publishing

    def _publish(self, adapter: ConceptAdapter) -> None:
        """Add the concept to the pipeline (shared methods: earlier concepts keep only their tokens) and
        save it to the store."""
        lp = self.pipeline
        if self.strategy.shares_lora:
            for c in list(lp.concepts.values()):
                if c.method == self.method and any(t.abs().sum() for t in c.lora.values()):
                    zeroed = dataclasses.replace(c, lora={k: torch.zeros_like(v) for k, v in c.lora.items()})
                    lp.add_concept(zeroed, replace=True)
        lp.add_concept(adapter)
        if self.store is not None:
            self.store.save(adapter, self.namespace)

    # ======================================================= checkpoints

    def _state_path(self) -> Path:
        return self.run_dir / f"{self.method}-trainer-state.pt"

    def _save_method_state(self) -> None:
        _atomic_save(self.strategy.state_dict(), self._state_path())

    def _load_method_state(self) -> None:
        path = self._state_path()
        if not path.exists():
            return
        try:
            self.strategy.load_state_dict(torch.load(path, map_location=self.pipeline.device, weights_only=True))
        except Exception as e:  # truncated or not this trainer's state
            raise TrainingError(
                f"trainer state {path}: cannot read it: {' '.join(str(e).split())[:300]}; "
                "delete it to start the run's method state over"
            ) from e

    def _save_checkpoint(self, path: Path, state: TaskState, gen: torch.Generator, step: int) -> None:
        ckpt = {
            "step": step,
            "params": {k: v.detach() for k, v in state.params.items()},
            "optimizer": state.optimizer.state_dict(),
            "generator": gen.get_state(),
            "losses": torch.tensor(state.losses, dtype=torch.float64),
        }
        method_state = self.strategy.checkpoint_state()
        if method_state is not None:
            ckpt["method"] = method_state
        _atomic_save(ckpt, path)

    def _load_checkpoint(self, path: Path, state: TaskState, gen: torch.Generator) -> int:
        def refuse(why: str) -> TrainingError:
            return TrainingError(f"checkpoint {path}: cannot resume from it: {why}; delete it to start over")

        try:
            ckpt = torch.load(path, map_location=self.pipeline.device, weights_only=True)
            params = ckpt["params"]
            have = {k: tuple(v.shape) for k, v in params.items()}
        except Exception as e:  # truncated, not a checkpoint, ...
            raise refuse(" ".join(str(e).split())[:300]) from e
        want = {k: tuple(v.shape) for k, v in state.params.items()}
        if have != want:
            diff = next(
                (k, have.get(k), want.get(k)) for k in sorted(have.keys() | want.keys()) if have.get(k) != want.get(k)
            )
            raise refuse(
                f"its {diff[0]} has shape {diff[1]}, this run needs {diff[2]} (written with another rank or method?)"
            )
        try:
            with torch.no_grad():
                for k, v in params.items():
                    state.params[k].copy_(v)
            state.optimizer.load_state_dict(ckpt["optimizer"])
            gen.set_state(ckpt["generator"].cpu())
            state.losses = ckpt["losses"].tolist()
            if "method" in ckpt:
                self.strategy.load_checkpoint_state(ckpt["method"])
            return int(ckpt["step"])
        except Exception as e:
            raise refuse(" ".join(str(e).split())[:300]) from e


# =========================================================================== helpers


@dataclasses.dataclass
class _TokenOnly:
    """What prompt encoding needs of a concept: its token, words and token rows."""

    token: str
    words: list[str]
    token_embeddings: Tensor


class _freeze:
    """Turn off requires_grad on the pipeline's UNet, text encoders and VAE; restore() puts it back."""

    def __init__(self, lp):
        modules = [lp.unet, lp.pipe.vae, *lp.text.text_encoders]
        self.saved = [(p, p.requires_grad) for m in modules for p in m.parameters()]
        for p, _ in self.saved:
            p.requires_grad_(False)

    def restore(self) -> None:
        for p, flag in self.saved:
            p.requires_grad_(flag)


def _child_generator(gen: torch.Generator, device) -> torch.Generator:
    """A generator on ``device`` seeded from ``gen`` (sampling images stays reproducible)."""
    return torch.Generator(device).manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))


def _open_image(path: Path) -> PIL.Image.Image:
    """The image at ``path``, decoded now, so a bomb, truncated or unreadable file is named here."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO would block the open
            raise ValueError("not a regular file")
        im = PIL.Image.open(path)
        im.load()
    except (PIL.Image.DecompressionBombError, OSError, ValueError) as e:  # UnidentifiedImageError is an OSError
        raise ValueError(f"images: {path}: cannot use this image: {e}") from e
    return im


def _peak_memory() -> int:
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: KiB


@contextlib.contextmanager
def _without_concepts(lp):
    saved = lp.concepts
    for name in saved:
        lp.remove_concept(name)
    try:
        yield
    finally:
        for c in saved.values():
            lp.add_concept(c)


@contextlib.contextmanager
def _quiet(pipe):
    config = dict(getattr(pipe, "_progress_bar_config", {}))
    pipe.set_progress_bar_config(disable=True)
    try:
        yield
    finally:
        pipe._progress_bar_config = config

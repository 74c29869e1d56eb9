"""The command-level jobs shared by the CLI and the Ray cluster (:mod:`lifelong_engine.cluster`): load a
model, load a namespace's concepts, learn one concept into a store. One path each, whoever runs it."""

from __future__ import annotations

import dataclasses

from .store import ConceptStore

__all__ = ["MODEL_DEFAULTS", "model_defaults", "load_pipeline", "learn_concept", "Learned"]

# Defaults per base model: TinyWorld (the shipped toy model) and a diffusers SD / SDXL checkpoint.
MODEL_DEFAULTS = {
    "tinyworld": {"steps": 100, "lr": 5e-3, "batch": 4, "inference_steps": 20, "guidance_scale": 4.0},
    "diffusers": {"steps": 400, "lr": 1e-3, "batch": 1, "inference_steps": 30, "guidance_scale": 7.5},
}


def model_defaults(model: str) -> dict:
    """The defaults of ``model``: 'tinyworld' or a diffusers checkpoint directory."""
    return MODEL_DEFAULTS["tinyworld" if model == "tinyworld" else "diffusers"]


def load_pipeline(model: str = "tinyworld", weights: str | None = None, device=None, progress: bool = False):
    """The LifelongPipeline over ``model`` ('tinyworld', with ``weights`` its model directory or the shipped
    model; or a diffusers SD / SDXL directory) on ``device`` (default: CUDA when available)."""
    import torch

    from .pipeline import LifelongPipeline

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if model == "tinyworld":
        from .tinyworld.model import load_tinyworld_pipeline

        pipe = load_tinyworld_pipeline(device, weights)
    else:
        from diffusers import DiffusionPipeline

        dtype = torch.float16 if device.type == "cuda" else torch.float32
        pipe = DiffusionPipeline.from_pretrained(model, torch_dtype=dtype).to(device)
        if not hasattr(pipe, "unet") or not hasattr(pipe, "vae"):
            raise ValueError(f"{model} holds a {type(pipe).__name__}; expected a Stable Diffusion (XL) pipeline")
    pipe.set_progress_bar_config(disable=not progress)
    return LifelongPipeline.from_pipe(pipe)


@dataclasses.dataclass
class Learned:
    """What :func:`learn_concept` did: the adapter, the trainer's stats, the stored version and the
    concepts that were frozen while it learned."""

    adapter: object
    stats: object
    version: int
    past: list[str]


def learn_concept(
    lp,
    store: ConceptStore,
    name: str,
    images,
    class_word: str,
    namespace: str = "default",
    *,
    model: str = "tinyworld",
    method: str = "cidm",
    rank: int = 4,
    steps: int | None = None,
    lr: float | None = None,
    batch_size: int | None = None,
    seed: int | None = 0,
    resume: bool = False,
    progress: bool = True,
) -> Learned:
    """Learn ``name`` from ``images`` into ``store`` (its namespace's earlier concepts of this base model
    loaded and frozen; learning a name again makes a new version). The store's save is atomic: a
    process killed at any moment leaves no partial concept."""
    from .training import ContinualTrainer

    d = model_defaults(model)
    past = [n for n in lp.load_concepts(store, namespace) if n != name]
    if name in lp.concepts:
        lp.remove_concept(name)  # learning it again makes a new version
    trainer = ContinualTrainer(
        lp, method=method, rank=rank, max_steps=steps or d["steps"], learning_rate=lr or d["lr"],
        batch_size=batch_size or d["batch"], store=store, seed=seed, namespace=namespace, progress=progress,
    )  # fmt: skip
    adapter = trainer.learn(name, images, class_word, resume=resume)
    return Learned(adapter, trainer.stats[name], store.record(name, namespace).version, past)

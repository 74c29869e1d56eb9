"""Measure what the TinyWorld base model can draw, with the shipped evaluator (issue 14's targets).

    python -m lifelong_engine.tinyworld.targets [--weights DIR] [--only NAMES] [--repeat K] [--out FILE]

- ``layout``: what the model predicts at the first sampling step (t = T, pure noise) for "a large
  red circle at the <position> on a white background", at each of the nine positions: where the
  red of the predicted x0 is centred. ``spread`` is the mean distance of those nine centres from
  their mean (in image widths; 0 when the model ignores position words, ``named_spread`` when the
  centres sit on the named positions), ``centre_error`` their mean distance from the named
  positions. This is where a layout is decided: later steps refine what this one starts;
- ``position``: generic one-object captions ("a small red striped circle at the top left on a
  white background"), no regions: the fraction of images in which the object is found with its
  prompted shape and colour (and accent) anywhere (``drawn``) and at its named position
  (``at_position``; chance about 1 in 9) — whether the model reads position words at all;
- ``two_objects``: generic two-object captions (a seed the training never used), no regions:
  the fraction of images in which both objects are found with their prompted shape and colour
  (and accent, two-colour), at two different slots (``both_drawn``), and also each at its named
  position (``both_at_position``);
- ``regions``: two generic objects, each prompted in its own half of the image (left/right or
  top/bottom) through the engine's regional synthesis: the fraction of images in which each object
  is found inside its own box (``both_in_box``) — :meth:`~.evaluator.Evaluator.object_presence`;
- ``oracle``: every concept's context-prompt scenes prompted in generic words only (no token:
  "a teal and orange vertically split circle with a white cross ..."): the fraction of images in
  which the evaluator recognises the concept's identity at its slot (``recognised``), per concept,
  and at any slot (``recognised_anywhere``: the identity drawn, but maybe in the wrong place);
  ``parts_anywhere`` reads the identity part by part instead
  (:meth:`~.evaluator.Prediction.parts_read`: shape, colour, accent, split and emblem all right);
- ``autoencoder``: the same scenes rendered exactly and passed through the model's VAE (encode,
  decode): how often the identity survives, a ceiling on ``oracle``.
- ``learning``: where a learned concept gets lost. Each of :data:`LEARNED` is learned alone by CIDM
  at the lifelong runs' settings (``--sequence JSON`` replaces some: ``'{"captions": "scene"}'``),
  then prompted with its token in three sets: its own training captions (``training``; "a large
  <tw-target> circle on the left on a white background", or with ``"captions": "photo"`` "a photo
  of a <tw-target> circle on a white background"), its short prompt on the same backgrounds
  (``training_plain``: "a <tw-target> circle on a white background"), and its context
  prompts (``contexts``, as the lifelong runs score); each read anywhere in the image by the
  identity head and part by part.

Each image is counted at score > 0.5. The report is JSON (printed, and written to ``--out``).
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from .world import (
    CONCEPTS,
    POSITIONS,
    ObjectSpec,
    Scene,
    caption,
    context_prompts,
    get_concept,
    object_prompt,
    render_batch,
    sample_scenes,
)

__all__ = ["autoencoder", "layout", "learning", "measure", "oracle", "position", "red_centre", "regions",
           "two_object_scenes", "two_objects"]  # fmt: skip

#: Seed of the measured prompts; the training streams use others.
SEED = 4_040_404
HALVES = {
    "horizontal": ((0.0, 0.0, 0.5, 1.0), (0.5, 0.0, 1.0, 1.0), ("left", "right")),
    "vertical": ((0.0, 0.0, 1.0, 0.5), (0.0, 0.5, 1.0, 1.0), ("top", "bottom")),
}


def _scenes_with(objects: int, n: int, seed: int) -> list[Scene]:
    """The first ``n`` scenes with ``objects`` objects of the generic world drawn from ``seed``."""
    out, k = [], 0
    while len(out) < n:
        batch = sample_scenes(8 * n + k, seed)[k:]
        k += len(batch)
        out += [s for s in batch if len(s.objects) == objects]
    return out[:n]


def two_object_scenes(n: int, seed: int = SEED) -> list[Scene]:
    """The first ``n`` two-object scenes of the generic world drawn from ``seed``."""
    return _scenes_with(2, n, seed)


def _images(lp, prompts: Sequence[str], seed: int, steps: int, guidance: float, regions=None) -> np.ndarray:
    generators = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
    out = lp(list(prompts), regions=regions, num_inference_steps=steps, guidance_scale=guidance,
             generator=generators, output_type="np").images  # fmt: skip
    return (np.clip(out, 0, 1) * 255).round().astype(np.uint8)


def _distinct_slots(a: torch.Tensor, b: torch.Tensor) -> float:
    """max over slots i != j of min(a[i], b[j])."""
    pair = torch.minimum(a[:, None], b[None, :])
    pair.fill_diagonal_(0.0)
    return float(pair.max())


def red_centre(images: torch.Tensor) -> torch.Tensor:
    """(x, y) in image widths: the centre of the red (R − (G + B) / 2, 0 on white or gray) of a batch
    of (N, 3, H, W) images in [-1, 1], summed over the batch."""
    x = images.clamp(-1, 1)
    red = (x[:, 0] - 0.5 * (x[:, 1] + x[:, 2])).clamp(min=0).sum(0)  # (H, W)
    h, w = red.shape
    mass = red.sum().clamp(min=1e-8)
    gx = (torch.arange(w, dtype=red.dtype, device=red.device) + 0.5) / w
    gy = (torch.arange(h, dtype=red.dtype, device=red.device) + 0.5) / h
    return torch.stack([(red.sum(0) * gx).sum() / mass, (red.sum(1) * gy).sum() / mass])


@torch.no_grad()
def layout(lp, evaluator, n: int = 16) -> dict:
    """Where the x0 predicted at t = T puts a prompted object (see the module docstring)."""
    pipe = lp.pipe
    device, t = pipe.unet.device, int(pipe.scheduler.config.num_train_timesteps) - 1
    alpha_bar = pipe.scheduler.alphas_cumprod[t].to(device)
    shape = (n, pipe.unet.config.in_channels, pipe.unet.config.sample_size, pipe.unet.config.sample_size)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(SEED)).to(device, pipe.unet.dtype)
    centres, named = [], []
    for name, xy in POSITIONS.items():
        prompt = caption(Scene("white", (ObjectSpec("circle", "red", "solid", "large", name),)))
        ids = pipe.tokenizer([prompt], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids.to(device)  # fmt: skip
        hidden = pipe.text_encoder(ids)[0].expand(n, -1, -1)
        v = pipe.unet(noise, t, encoder_hidden_states=hidden).sample
        x0 = alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * v
        centres.append(red_centre(pipe.vae.decode(x0 / pipe.vae.config.scaling_factor).sample.float()).cpu())
        named.append(torch.tensor(xy, dtype=torch.float32))
    centres, named = torch.stack(centres), torch.stack(named)
    return {
        "prompts": len(POSITIONS),
        "noise_samples": n,
        "spread": round(float((centres - centres.mean(0)).norm(dim=1).mean()), 4),
        "named_spread": round(float((named - named.mean(0)).norm(dim=1).mean()), 4),
        "centre_error": round(float((centres - named).norm(dim=1).mean()), 4),
    }


def _found(evaluator, image, scene: Scene) -> tuple[bool, bool]:
    """Are the scene's objects found with their prompted shape and colour (and accent), at distinct
    slots; and is each at its named position."""
    from .evaluator import SLOTS

    scores = [evaluator.object_scores(image, obj) for obj in scene.objects]
    drawn = float(scores[0].max()) if len(scores) == 1 else _distinct_slots(*scores)
    placed = all(float(s[SLOTS.index(obj.position)]) > 0.5 for s, obj in zip(scores, scene.objects))
    return drawn > 0.5, placed


def _caption_following(lp, evaluator, scenes, seed: int, steps: int, guidance: float, batch: int):
    """Per scene, (drawn, placed) of :func:`_found` on an image generated from its caption, and on
    its exact render (what the evaluator itself allows): two (N, 2) arrays."""
    generated, renders = [], []
    for i in range(0, len(scenes), batch):
        chunk = scenes[i : i + batch]
        images = _images(lp, [caption(s) for s in chunk], seed + i, steps, guidance)
        generated += [_found(evaluator, image, s) for image, s in zip(images, chunk)]
        renders += [_found(evaluator, image, s) for image, s in zip(render_batch(chunk), chunk)]
    return np.array(generated, dtype=float), np.array(renders, dtype=float)


def position(lp, evaluator, n: int = 64, steps: int = 20, guidance: float = 4.0, batch: int = 16) -> dict:
    """Generic one-object captions without regions (see the module docstring)."""
    generated, renders = _caption_following(lp, evaluator, _scenes_with(1, n, SEED + 2), SEED + 2000, steps,
                                            guidance, batch)  # fmt: skip
    return {
        "images": n,
        "drawn": float(generated[:, 0].mean()),
        "at_position": float(generated[:, 1].mean()),
        "renders_drawn": float(renders[:, 0].mean()),
        "renders_at_position": float(renders[:, 1].mean()),
    }


def two_objects(lp, evaluator, n: int = 64, steps: int = 20, guidance: float = 4.0, batch: int = 16) -> dict:
    """Generic two-object captions without regions (see the module docstring)."""
    generated, renders = _caption_following(lp, evaluator, two_object_scenes(n), SEED, steps, guidance, batch)
    return {
        "images": n,
        "both_drawn": float(generated[:, 0].mean()),
        "both_at_position": float(generated[:, 1].mean()),
        # the same scoring on exact renders of the prompted scenes: what the evaluator itself allows
        "renders_both_drawn": float(renders[:, 0].mean()),
        "renders_both_at_position": float(renders[:, 1].mean()),
    }


def regions(lp, evaluator, n: int = 32, steps: int = 20, guidance: float = 4.0) -> dict:
    """Two generic objects in two boxes through regional synthesis (see the module docstring)."""
    import dataclasses

    scenes = two_object_scenes(n, SEED + 1)
    hits, first, second, renders = [], [], [], []
    for i, scene in enumerate(scenes):
        boxes_a, boxes_b, (pos_a, pos_b) = HALVES["horizontal" if i % 2 == 0 else "vertical"]
        objs = [dataclasses.replace(o, position=p, offset=(0.0, 0.0)) for o, p in zip(scene.objects, (pos_a, pos_b))]
        laid = Scene(scene.background, tuple(objs))
        region_list = [
            (object_prompt(o, scene.background, size=False), box) for o, box in zip(objs, (boxes_a, boxes_b))
        ]
        (image,) = _images(lp, [caption(laid)], SEED + 500 + i, steps, guidance, regions=region_list)
        a = evaluator.object_presence(image, objs[0], boxes_a)
        b = evaluator.object_presence(image, objs[1], boxes_b)
        first.append(a > 0.5)
        second.append(b > 0.5)
        hits.append(a > 0.5 and b > 0.5)
        truth = render_batch([laid])[0]  # the scene drawn exactly: what the evaluator itself allows
        ok = (
            evaluator.object_presence(truth, objs[0], boxes_a) > 0.5
            and evaluator.object_presence(truth, objs[1], boxes_b) > 0.5
        )
        renders.append(ok)
    return {
        "images": n,
        "both_in_box": float(np.mean(hits)),
        "renders_both_in_box": float(np.mean(renders)),
        "first_in_box": float(np.mean(first)),
        "second_in_box": float(np.mean(second)),
    }


def oracle(lp, evaluator, samples: int = 2, steps: int = 20, guidance: float = 4.0) -> dict:
    """Each concept's context scenes prompted in generic words only (see the module docstring)."""
    per, anywhere, parts = {}, {}, {}
    for c_index, concept in enumerate(CONCEPTS):
        scenes = [p.scene for p in context_prompts(concept) for _ in range(samples)]
        images = _images(lp, [caption(s, tokens=False) for s in scenes], SEED + 1000 * (c_index + 1), steps, guidance)
        pred = evaluator.predict(images)
        at_slot, at_any = pred.recognised(concept, scenes)
        per[concept.name], anywhere[concept.name] = float(np.mean(at_slot)), float(np.mean(at_any))
        parts[concept.name] = float(np.mean(pred.parts_read(concept)))
    return {
        "images": samples * sum(len(context_prompts(c)) for c in CONCEPTS),
        "recognised": float(np.mean(list(per.values()))),
        "recognised_anywhere": float(np.mean(list(anywhere.values()))),
        "parts_anywhere": float(np.mean(list(parts.values()))),
        "per_concept": per,
    }


#: The prompt sets :func:`learning` reads a learned concept in.
PROMPT_SETS = ("training", "training_plain", "contexts")
#: The concepts :func:`learning` teaches: two the oracle draws often, two it rarely draws.
LEARNED = ("tw-target", "tw-tile", "tw-sail", "tw-badge")


def learning(lp, evaluator, concepts: Sequence[str] = LEARNED, samples: int = 4, steps: int = 20,
             guidance: float = 4.0, train_steps: int | None = None, sequence: dict | None = None) -> dict:  # fmt: skip
    """Each of ``concepts`` learned alone (at the lifelong runs' :class:`~.lifelong.SequenceConfig`
    settings, ``sequence`` replacing some of them; ``train_steps`` its steps), then read in three
    prompt sets (see the module docstring). The pipeline is left without concepts."""
    from ..training import ContinualTrainer, methods
    from .lifelong import SequenceConfig

    if lp.concepts:
        raise ValueError(f"learning: the pipeline already has concepts {sorted(lp.concepts)}; start from the base")
    cfg = SequenceConfig(**(sequence or {}))
    options = {"rank": cfg.rank, "max_steps": train_steps or cfg.steps, "learning_rate": cfg.learning_rate,
               "batch_size": cfg.batch_size, "seed": cfg.seed, "progress": False, **cfg.trainer_options}  # fmt: skip
    reads: dict[str, dict[str, list]] = {key: {"recognised": [], "parts": []} for key in PROMPT_SETS}
    for c_index, name in enumerate(concepts):
        concept = get_concept(name)
        trainer = ContinualTrainer(lp, method=methods.config(cfg.method, **cfg.method_options), **options)
        train = concept.images(cfg.images, seed=cfg.seed, captions=cfg.captions)
        trainer.learn(concept.name, [s.image for s in train], concept.class_word, [s.caption for s in train])
        try:
            prompts = {"training": [(s.caption, s.scene) for s in train],
                       "training_plain": [(concept.prompt(s.scene.background), s.scene) for s in train],
                       "contexts": [(p.prompt, p.scene) for p in context_prompts(concept)]}  # fmt: skip
            for key, pairs in prompts.items():
                pairs = [pair for pair in pairs for _ in range(samples)]
                images = _images(lp, [text for text, _ in pairs], SEED + 1000 * (c_index + 1), steps, guidance)
                pred = evaluator.predict(images)
                reads[key]["recognised"] += pred.recognised(concept, [scene for _, scene in pairs])[1]
                reads[key]["parts"] += pred.parts_read(concept)
        finally:
            lp.remove_concept(concept.name)
    report: dict = {"concepts": list(concepts), "train_steps": train_steps or cfg.steps, "captions": cfg.captions,
                    "sequence": sequence or {}}  # fmt: skip
    for key, r in reads.items():
        report[key] = {"images": len(r["parts"]), "recognised_anywhere": float(np.mean(r["recognised"])),
                       "parts_anywhere": float(np.mean(r["parts"]))}  # fmt: skip
    return report


@torch.no_grad()
def autoencoder(lp, evaluator) -> dict:
    """Each concept's context scenes rendered exactly, then encoded and decoded by the model's VAE
    (posterior mean): how often the identity survives the round trip. A ceiling on the oracle: the
    UNet can only draw what the decoder can reproduce."""
    vae = lp.pipe.vae
    per, error = {}, []
    for concept in CONCEPTS:
        scenes = [p.scene for p in context_prompts(concept)]
        x = torch.from_numpy(render_batch(scenes)).permute(0, 3, 1, 2).to(vae.device, vae.dtype) / 127.5 - 1
        y = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
        error.append(float((y - x).abs().mean()))
        images = ((y + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        per[concept.name] = float(np.mean(evaluator.predict(images).recognised(concept, scenes)[0]))
    return {
        "images": sum(len(context_prompts(c)) for c in CONCEPTS),
        "recognised": float(np.mean(list(per.values()))),
        "mean_abs_error": float(np.mean(error)),  # in [-1, 1] pixel units
        "per_concept": per,
    }


MEASURES = {"layout": layout, "position": position, "regions": regions, "two_objects": two_objects, "oracle": oracle,
            "autoencoder": autoencoder, "learning": learning}  # fmt: skip


#: Per measure, the keyword that sets how many images (or samples per prompt) it draws, and its default.
DEFAULT_SIZES = {name: (key, inspect.signature(MEASURES[name]).parameters[key].default)
                 for name, key in (("layout", "n"), ("position", "n"), ("two_objects", "n"), ("regions", "n"),
                                   ("oracle", "samples"), ("learning", "samples"))}  # fmt: skip


def measure(lp, evaluator, only: Sequence[str] = tuple(MEASURES), quick: bool = False, on_update=None,
            options: dict[str, dict] | None = None, repeat: int = 1) -> dict:  # fmt: skip
    """Every measure in ``only`` (``quick``: a few images each, for tests; ``repeat``: ``repeat``
    times its default images, for a smaller sampling error), ``options[name]`` its keywords;
    ``on_update`` is called with the report after each one."""
    unknown = [m for m in only if m not in MEASURES]
    if unknown:
        raise ValueError(f"measures {unknown}: expected some of {list(MEASURES)}")
    if repeat < 1:
        raise ValueError(f"repeat {repeat}: expected at least 1")
    sizes = {name: {key: default * repeat} for name, (key, default) in DEFAULT_SIZES.items()}
    if quick:
        sizes = {"layout": {"n": 2}, "position": {"n": 8}, "two_objects": {"n": 8}, "regions": {"n": 4},
                 "oracle": {"samples": 1},
                 "learning": {"concepts": LEARNED[:1], "samples": 1, "train_steps": 5}}  # fmt: skip
    report = {}
    for name in only:
        started = time.perf_counter()
        report[name] = MEASURES[name](lp, evaluator, **sizes.get(name, {}), **(options or {}).get(name, {}))
        report[name]["seconds"] = round(time.perf_counter() - started, 1)
        if on_update is not None:
            on_update(report)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    from .. import LifelongPipeline
    from .evaluator import Evaluator
    from .model import load_tinyworld_pipeline, read_manifest

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--weights", type=Path, default=None, help="model directory (default: the shipped one)")
    parser.add_argument("--only", default=",".join(MEASURES), help=f"comma-separated, from {', '.join(MEASURES)}")
    parser.add_argument("--quick", action="store_true", help="a few images per measure")
    parser.add_argument("--repeat", type=int, default=1,
                        help="K times each measure's images (a smaller sampling error)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON report here")
    parser.add_argument("--sequence", type=json.loads, default=None,
                        help="learning: SequenceConfig fields as JSON, e.g. '{\"captions\": \"scene\"}'")  # fmt: skip
    args = parser.parse_args(argv)
    lp = LifelongPipeline.from_pipe(load_tinyworld_pipeline("cpu", args.weights))
    lp.pipe.set_progress_bar_config(disable=True)
    evaluator = Evaluator.load(args.weights / "evaluator" if args.weights else None)
    command = "python -m lifelong_engine.tinyworld.targets " + " ".join(argv if argv is not None else sys.argv[1:])
    header = {"model": read_manifest(args.weights).get("fingerprint"), "threads": torch.get_num_threads(),
              "command": command}  # fmt: skip

    def save(report: dict) -> None:
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({**header, **report}, indent=2) + "\n")

    only = [m.strip() for m in args.only.split(",") if m.strip()]
    options = {"learning": {"sequence": args.sequence}} if args.sequence else None
    report = measure(lp, evaluator, only, quick=args.quick, on_update=save, options=options, repeat=args.repeat)
    print(json.dumps({**header, **report}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

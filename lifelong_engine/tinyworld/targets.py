"""Measure what the TinyWorld base model can draw, with the shipped evaluator (issue 14's targets).

    python -m lifelong_engine.tinyworld.targets [--weights DIR] [--n N] [--only NAMES] [--out FILE]

- ``two_objects``: generic two-object captions (a seed the training never used), no regions:
  the fraction of images in which both objects are found with their prompted shape and colour
  (and accent, two-colour), at two different slots (``both_drawn``), and also each at its named
  position (``both_at_position``);
- ``regions``: two generic objects, each prompted in its own half of the image (left/right or
  top/bottom) through the engine's regional synthesis: the fraction of images in which each object
  is found inside its own box (``both_in_box``) — :meth:`~.evaluator.Evaluator.object_presence`;
- ``oracle``: every concept's context-prompt scenes prompted in generic words only (no token:
  "a teal and orange vertically split circle with a white cross ..."): the fraction of images in
  which the evaluator recognises the concept's identity at its slot (``recognised``), per concept;
- ``autoencoder``: the same scenes rendered exactly and passed through the model's VAE (encode,
  decode): how often the identity survives, a ceiling on ``oracle``.

Each image is counted at score > 0.5. The report is JSON (printed, and written to ``--out``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from .world import CONCEPTS, Scene, caption, context_prompts, object_prompt, render_batch, sample_scenes

__all__ = ["autoencoder", "measure", "oracle", "regions", "two_object_scenes", "two_objects"]

#: Seed of the measured prompts; the training streams use others.
SEED = 4_040_404
HALVES = {
    "horizontal": ((0.0, 0.0, 0.5, 1.0), (0.5, 0.0, 1.0, 1.0), ("left", "right")),
    "vertical": ((0.0, 0.0, 1.0, 0.5), (0.0, 0.5, 1.0, 1.0), ("top", "bottom")),
}


def two_object_scenes(n: int, seed: int = SEED) -> list[Scene]:
    """The first ``n`` two-object scenes of the generic world drawn from ``seed``."""
    out, k = [], 0
    while len(out) < n:
        batch = sample_scenes(8 * n + k, seed)[k:]
        k += len(batch)
        out += [s for s in batch if len(s.objects) == 2]
    return out[:n]


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


def two_objects(lp, evaluator, n: int = 64, steps: int = 20, guidance: float = 4.0, batch: int = 16) -> dict:
    """Generic two-object captions without regions (see the module docstring)."""
    from .evaluator import SLOTS

    scenes = two_object_scenes(n)

    def score(images, chunk, drawn, placed):
        for image, scene in zip(images, chunk):
            a, b = (evaluator.object_scores(image, obj) for obj in scene.objects)
            drawn.append(_distinct_slots(a, b) > 0.5)
            ia, ib = (SLOTS.index(obj.position) for obj in scene.objects)
            placed.append(bool(a[ia] > 0.5 and b[ib] > 0.5))

    drawn, placed, render_drawn, render_placed = [], [], [], []
    for i in range(0, n, batch):
        chunk = scenes[i : i + batch]
        score(_images(lp, [caption(s) for s in chunk], SEED + i, steps, guidance), chunk, drawn, placed)
        score(render_batch(chunk), chunk, render_drawn, render_placed)
    return {
        "images": n,
        "both_drawn": float(np.mean(drawn)),
        "both_at_position": float(np.mean(placed)),
        # the same scoring on exact renders of the prompted scenes: what the evaluator itself allows
        "renders_both_drawn": float(np.mean(render_drawn)),
        "renders_both_at_position": float(np.mean(render_placed)),
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


def _recognised(evaluator, images, scenes, concept) -> list[bool]:
    """Per image: is ``concept`` recognised at its scene's (first) object slot."""
    from .evaluator import IDENTITIES, SLOTS

    pred, k = evaluator.predict(images), IDENTITIES.index(concept.name)
    slots = [SLOTS.index(scene.objects[0].position) for scene in scenes]
    return [
        bool(pred.presence[i, s] > 0.5 and pred.attributes["identity"][i, s].argmax() == k)
        for i, s in enumerate(slots)
    ]


def oracle(lp, evaluator, samples: int = 2, steps: int = 20, guidance: float = 4.0) -> dict:
    """Each concept's context scenes prompted in generic words only (see the module docstring)."""
    per = {}
    for c_index, concept in enumerate(CONCEPTS):
        scenes = [p.scene for p in context_prompts(concept) for _ in range(samples)]
        images = _images(lp, [caption(s, tokens=False) for s in scenes], SEED + 1000 * (c_index + 1), steps, guidance)
        per[concept.name] = float(np.mean(_recognised(evaluator, images, scenes, concept)))
    return {
        "images": samples * sum(len(context_prompts(c)) for c in CONCEPTS),
        "recognised": float(np.mean(list(per.values()))),
        "per_concept": per,
    }


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
        per[concept.name] = float(np.mean(_recognised(evaluator, images, scenes, concept)))
    return {
        "images": sum(len(context_prompts(c)) for c in CONCEPTS),
        "recognised": float(np.mean(list(per.values()))),
        "mean_abs_error": float(np.mean(error)),  # in [-1, 1] pixel units
        "per_concept": per,
    }


MEASURES = {"regions": regions, "two_objects": two_objects, "oracle": oracle, "autoencoder": autoencoder}


def measure(lp, evaluator, only: Sequence[str] = tuple(MEASURES), quick: bool = False, on_update=None) -> dict:
    """Every measure in ``only`` (``quick``: a few images each, for tests); ``on_update`` is called
    with the report after each one."""
    unknown = [m for m in only if m not in MEASURES]
    if unknown:
        raise ValueError(f"measures {unknown}: expected some of {list(MEASURES)}")
    sizes = {"two_objects": {"n": 8}, "regions": {"n": 4}, "oracle": {"samples": 1}} if quick else {}
    report = {}
    for name in only:
        started = time.perf_counter()
        report[name] = MEASURES[name](lp, evaluator, **sizes.get(name, {}))
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
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON report here")
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
    report = measure(lp, evaluator, only, quick=args.quick, on_update=save)
    print(json.dumps({**header, **report}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

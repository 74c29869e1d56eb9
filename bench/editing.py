"""Image editing with learned concepts on TinyWorld: restyling (img2img / SDEdit) and inpainting.

    python bench/editing.py [--concepts tw-badge,tw-flag] [--steps 100] [--seeds 4] [--strength 0.6]
                            [--store DIR] [--weights DIR] [--device D]

Learns each concept with CIDM on the TinyWorld model (the shipped one, or ``--weights``; with ``--store``,
a concept store such as the demo's ``tinyworld-demo/concepts``, concepts already there are loaded, not
learned again, and the ones learned are saved there), then, with
the same concepts in LifelongPipelines over diffusers' ``StableDiffusionImg2ImgPipeline`` and
``StableDiffusionInpaintPipeline`` built from the model's components, measures with the shipped
evaluator:

- restyle: a generic object of the concept's shape and colour (no identity: no accent, no emblem)
  rendered on a white background, edited with ``a <concept> <class word> on a white background`` at
  ``--strength``: identity recognised (the evaluator's presence of the concept in the whole image, and
  IA: cosine similarity of object embeddings to the concept's training images) before (the source
  image) and after; a control edits with the same prompt without the concept token (SDEdit alone);
- inpaint: a rendered scene (a generic object on the right of a white background), the left half
  masked, inpainted (strength 1) with the concept's prompt in a region on the masked box: presence of
  the concept in the box before and after; the control inpaints with the class word alone.

Writes ``bench/results/<device>/editing.json`` (numbers, settings, environment, command) and
``editing.png`` (per concept: source, restyled images, control; scene, inpainted images, control).
Re-run with the same command after the TinyWorld model changes (``--weights`` for a model that is not
the shipped one).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import common
import numpy as np
import PIL.Image
import torch

common.ensure_engine_importable()
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline  # noqa: E402

from lifelong_engine import ConceptStore, LifelongPipeline  # noqa: E402
from lifelong_engine.tinyworld import get_concept  # noqa: E402
from lifelong_engine.tinyworld.evaluator import Evaluator  # noqa: E402
from lifelong_engine.tinyworld.lifelong import image_grid, write_json  # noqa: E402
from lifelong_engine.tinyworld.model import load_tinyworld_pipeline  # noqa: E402
from lifelong_engine.tinyworld.world import ObjectSpec, Scene, render_array  # noqa: E402
from lifelong_engine.training import ContinualTrainer  # noqa: E402

BOX = (0.0, 0.0, 0.5, 1.0)  # the inpainted box: the left half


def wrap(cls, pipe, concepts) -> LifelongPipeline:
    """A LifelongPipeline over ``cls`` built from ``pipe``'s components, with ``concepts`` added."""
    edit = cls(**{k: v for k, v in pipe.components.items() if k != "image_encoder"}, requires_safety_checker=False)
    edit.set_progress_bar_config(disable=True)
    lp = LifelongPipeline.from_pipe(edit)
    for adapter in concepts.values():
        lp.add_concept(adapter)
    lp.restore()  # the pipelines share one UNet: each installs its processors only while it generates
    return lp


def generate(lp, prompt: str, seeds: int, **kwargs) -> np.ndarray:
    """(seeds, 32, 32, 3) uint8, one generator per image."""
    generators = [torch.Generator().manual_seed(1000 + i) for i in range(seeds)]
    lp.install()
    try:
        out = lp(prompt, num_images_per_prompt=seeds, generator=generators, output_type="np", **kwargs).images
    finally:
        lp.restore()
    return (np.clip(out, 0, 1) * 255).round().astype(np.uint8)


def identity(evaluator, concept, references, images) -> dict:
    """The concept recognised in whole images: mean presence (evaluator) and IA to its training images."""
    images = np.asarray(images)
    return {
        "presence": float(np.mean([evaluator.presence(im, (0, 0, 1, 1), concept) for im in images])),
        "ia": evaluator.image_alignment(images, references),
    }


def present(evaluator, concept, images) -> float:
    """Mean presence of the concept in BOX."""
    return float(np.mean([evaluator.presence(im, BOX, concept) for im in np.asarray(images)]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concepts", default="tw-badge,tw-flag", help="TinyWorld concepts to learn and edit with")
    parser.add_argument("--steps", type=int, default=100, help="CIDM training steps per concept (default: 100)")
    parser.add_argument("--seeds", type=int, default=4, help="edited images per measurement (default: 4)")
    parser.add_argument("--strength", type=float, default=0.6, help="restyling strength (default: 0.6)")
    parser.add_argument("--inference-steps", type=int, default=20, help="DDIM steps (default: 20)")
    parser.add_argument("--guidance-scale", type=float, default=4.0, help="CFG scale (default: 4)")
    parser.add_argument("--weights", default=None, help="a TinyWorld model directory (default: the shipped model)")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, ...")
    parser.add_argument("--store", default=None, help="a concept store to load the concepts from / save them to")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    device = torch.device(args.device)
    pipe = load_tinyworld_pipeline(device, args.weights)
    pipe.set_progress_bar_config(disable=True)
    evaluator = Evaluator.load(Path(args.weights) / "evaluator" if args.weights else None, device=device)
    lp = LifelongPipeline.from_pipe(pipe)
    concepts = [get_concept(name.strip()) for name in args.concepts.split(",") if name.strip()]
    store = ConceptStore(args.store) if args.store else None
    learned = []
    if store is not None:
        have = {r.name for r in store.list("default") if r.base_fingerprint in ("", lp.fingerprint)}
        lp.load_concepts(store, "default", [c.name for c in concepts if c.name in have])
    trainer = ContinualTrainer(
        lp, method="cidm", rank=4, max_steps=args.steps, learning_rate=5e-3, batch_size=4, store=store
    )
    t0 = time.perf_counter()
    for c in concepts:
        if c.name not in lp.concepts:
            samples = c.images(5)
            trainer.learn(c.name, [s.image for s in samples], c.class_word, [s.caption for s in samples])
            learned.append(c.name)
    learn_seconds = time.perf_counter() - t0
    img2img = wrap(StableDiffusionImg2ImgPipeline, pipe, lp.concepts)
    inpaint = wrap(StableDiffusionInpaintPipeline, pipe, lp.concepts)
    options = dict(num_inference_steps=args.inference_steps, guidance_scale=args.guidance_scale)
    mask = np.zeros((32, 32), dtype=np.uint8)
    mask[:, :16] = 255  # BOX
    mask = PIL.Image.fromarray(mask)
    report: dict = {"concepts": {}}
    rows = []
    for c in concepts:
        references = np.stack([np.asarray(s.image) for s in c.images(5)])
        source = render_array(Scene("white", (ObjectSpec(c.class_word, c.colour),)))
        prompt, plain = c.prompt("white"), c.prompt("white").replace(f"{c.token} ", "")
        source_image = PIL.Image.fromarray(source)  # diffusers reads arrays as [0, 1]: pass images
        restyled = generate(img2img, prompt, args.seeds, image=source_image, strength=args.strength, **options)
        control = generate(img2img, plain, args.seeds, image=source_image, strength=args.strength, **options)

        scene = render_array(Scene("white", (ObjectSpec("square" if c.class_word != "square" else "circle", "gray",
                                                         position="right"),)))  # fmt: skip
        regions = [(prompt, BOX)]
        scene_image = PIL.Image.fromarray(scene)
        filled = generate(inpaint, prompt, args.seeds, image=scene_image, mask_image=mask, regions=regions, **options)
        filled_control = generate(inpaint, plain, args.seeds, image=scene_image, mask_image=mask,
                                  regions=[(plain, BOX)], **options)  # fmt: skip

        restyle = {
            "before": identity(evaluator, c, references, source[None]),
            "after": identity(evaluator, c, references, restyled),
            "control_without_token": identity(evaluator, c, references, control),
        }
        filling = {
            "before": present(evaluator, c, scene[None]),
            "after": present(evaluator, c, filled),
            "control_without_token": present(evaluator, c, filled_control),
            "after_count_present": int(sum(evaluator.presence(im, BOX, c) > 0.5 for im in filled)),
        }
        report["concepts"][c.name] = {
            "restyle": {"prompt": prompt, "strength": args.strength, **restyle},
            "inpaint": {"prompt": prompt, "box": BOX, **filling},
        }
        rows += [
            (f"{c.name} restyle", [source, None, *restyled, None, *control]),
            (f"{c.name} inpaint", [scene, None, *filled, None, *filled_control]),
        ]
    out = Path(__file__).parent / "results" / device.type
    image_grid(rows, out / "editing.png")
    report["settings"] = {k: v for k, v in vars(args).items()}
    report["learned_here"] = learned
    report["learn_seconds"] = round(learn_seconds, 1)
    report["seconds"] = round(time.perf_counter() - started, 1)
    report["environment"] = common.environment(argv)
    write_json(report, out / "editing.json")
    for name, entry in report["concepts"].items():
        r, i = entry["restyle"], entry["inpaint"]
        print(
            f"{name}: restyle presence {r['before']['presence']:.2f} -> {r['after']['presence']:.2f} (control "
            f"{r['control_without_token']['presence']:.2f}), IA {r['before']['ia']:.3f} -> {r['after']['ia']:.3f} "
            f"(control {r['control_without_token']['ia']:.3f}); inpaint presence in box {i['before']:.2f} -> "
            f"{i['after']:.2f} (control {i['control_without_token']:.2f})"
        )
    print(f"wrote {out / 'editing.json'} and editing.png in {report['seconds']:.0f} s")
    if store is not None:
        store.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Attention guidance on TinyWorld: two-concept prompts without regions, guided and not.

    python bench/guidance.py [--concepts 6] [--seeds 8] [--step-size 20] [--device D] [--quick]

Learns the first N TinyWorld concepts with CIDM (the demo's settings: 100 steps, rank 4, lr 5e-3),
then renders ``a <c1> <class> and a <c2> <class> on a white background`` for consecutive pairs,
``--seeds`` images each (20 DDIM steps, guidance 4), with no attention guidance, with L2DM's concept
attention artist, with the artist plus orthogonal attention, and with both plus Attend-and-Excite's
iterative refinement (:mod:`lifelong_engine.guidance`, half the steps guided). The shipped
evaluator reads every image: how many objects it holds, how often it holds two or more (a
neglected concept leaves one), and how often each concept is present anywhere
(:meth:`Evaluator.presence` over the whole image, counted at > 0.5).

Writes ``bench/results/<device>/guidance.json`` and ``guidance.png`` (one row per setting, the pairs'
images side by side; ``guidance-quick.*`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import common
import numpy as np
import torch

common.ensure_engine_importable()
from lifelong_engine import AttentionGuidance, ConceptStore, LifelongPipeline  # noqa: E402
from lifelong_engine.tinyworld import CONCEPTS  # noqa: E402
from lifelong_engine.tinyworld.evaluator import Evaluator  # noqa: E402
from lifelong_engine.tinyworld.lifelong import image_grid, write_json  # noqa: E402
from lifelong_engine.tinyworld.model import load_tinyworld_pipeline  # noqa: E402
from lifelong_engine.training import ContinualTrainer  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concepts", type=int, default=6, help="the first N TinyWorld concepts (pairs: N // 2)")
    parser.add_argument("--seeds", type=int, default=8, help="images per pair and setting")
    parser.add_argument("--train-steps", type=int, default=100)
    parser.add_argument("--inference-steps", type=int, default=20)
    parser.add_argument("--step-size", type=float, default=20.0, help="the guidance's latent step")
    parser.add_argument("--device", default=None, help="default: cuda when available")
    parser.add_argument("--weights", default=None, help="TinyWorld model directory (default: the shipped one)")
    parser.add_argument("--out", type=Path, default=None, help="default: bench/results/<device>")
    parser.add_argument("--quick", action="store_true", help="2 concepts, 2 seeds, 2 training steps (a smoke run)")
    args = parser.parse_args(argv)
    if args.quick:
        args.concepts, args.seeds, args.train_steps, args.inference_steps = 2, 2, 2, 4
    if not 2 <= args.concepts <= len(CONCEPTS) or args.seeds < 1:
        parser.error(f"--concepts must be 2 to {len(CONCEPTS)} and --seeds at least 1")

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    info = common.describe_device(device)
    out = args.out or common.BENCH_DIR / "results" / info.slug
    out.mkdir(parents=True, exist_ok=True)
    path = out / ("guidance-quick.json" if args.quick else "guidance.json")

    lp = LifelongPipeline.from_pipe(load_tinyworld_pipeline(device, args.weights))
    lp.pipe.set_progress_bar_config(disable=True)
    evaluator = Evaluator.load(Path(args.weights) / "evaluator" if args.weights else None, device=device)
    concepts = CONCEPTS[: args.concepts]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        trainer = ContinualTrainer(
            lp, method="cidm", rank=4, max_steps=args.train_steps, learning_rate=5e-3, batch_size=4, seed=0,
            store=ConceptStore(Path(tmp) / "store"), progress=not args.quick,
        )  # fmt: skip
        for c in concepts:
            samples = c.images(5, seed=0)
            trainer.learn(c.name, [s.image for s in samples], c.class_word, [s.caption for s in samples])
    train_seconds = time.perf_counter() - started

    settings = {
        "none": None,
        "artist": AttentionGuidance(artist=1.0, step_size=args.step_size),
        "artist+orthogonal": AttentionGuidance(artist=1.0, orthogonal=1.0, step_size=args.step_size),
        # Attend-and-Excite's refinement targets {0: 0.05, 10: 0.5, 20: 0.8} of 50 steps, at the same fractions
        "artist+orthogonal+refine": AttentionGuidance(
            artist=1.0,
            orthogonal=1.0,
            step_size=args.step_size,
            refine={round(f * args.inference_steps): v for f, v in ((0.0, 0.05), (0.2, 0.5), (0.4, 0.8))},
        ),  # fmt: skip
    }
    pairs = list(zip(concepts[0::2], concepts[1::2]))
    results, grid = {}, []
    for name, options in settings.items():
        objects, present, parts, first_losses, row = [], [], [], [], []
        t0 = time.perf_counter()
        for a, b in pairs:
            prompt = f"a {a.token} {a.class_word} and a {b.token} {b.class_word} on a white background"
            generators = [torch.Generator().manual_seed(s) for s in range(args.seeds)]
            result = lp([prompt] * args.seeds, num_inference_steps=args.inference_steps, guidance_scale=4.0,
                        generator=generators, output_type="np", attention_guidance=options)  # fmt: skip
            images = (np.clip(result.images, 0, 1) * 255).round().astype(np.uint8)
            row += [*images, None]
            for image in images:
                objects.append(len(evaluator.describe(image)["objects"]))
                present.append([evaluator.presence(image, (0, 0, 1, 1), c) > 0.5 for c in (a, b)])
            prediction = evaluator.predict(images)  # each concept read part by part, anywhere
            parts += zip(prediction.parts_read(a), prediction.parts_read(b), strict=True)
            if result.guidance_losses:
                first_losses.append(result.guidance_losses[0] / args.seeds)
        seconds = time.perf_counter() - t0
        results[name] = {
            "options": None if options is None else {k: v for k, v in vars(options).items() if k != "layers"},
            "images": len(objects),
            "mean_objects": round(float(np.mean(objects)), 4),
            "two_or_more_objects": round(float(np.mean([n >= 2 for n in objects])), 4),
            "concept_present": round(float(np.mean(present)), 4),
            "both_present": round(float(np.mean([all(p) for p in present])), 4),
            "parts_read": round(float(np.mean(parts)), 4),
            "both_parts_read": round(float(np.mean([all(p) for p in parts])), 4),
            "first_step_loss_per_image": round(float(np.mean(first_losses)), 4) if first_losses else None,
            "seconds_per_image": round(seconds / len(objects), 3),
        }
        print(f"{name}: {results[name]}", flush=True)
        grid.append((name, row[:-1]))

    record = {
        "pairs": [[a.name, b.name] for a, b in pairs],
        "seeds": args.seeds,
        "train_steps": args.train_steps,
        "inference_steps": args.inference_steps,
        "train_seconds": round(train_seconds, 1),
        "results": results,
        "device": info.name,
        "threads": torch.get_num_threads(),
        **common.environment(argv),
    }
    write_json(record, path)
    picture = image_grid(grid, path.with_suffix(".png"), scale=2)
    print(f"wrote {path} and {picture}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

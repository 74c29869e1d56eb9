"""``lifelong-engine demo``: the engine end to end on TinyWorld, with nothing to download.

Loads the shipped TinyWorld model and evaluator, learns a sequence of personal concepts with CIDM
(:func:`~.lifelong.run_sequence`), renders each concept in held-out contexts and pairs of concepts
in two regions, and writes to ``--out``:

- ``grid.png``: one row per concept (a training image, then generated images), then the pairs;
- ``report.json`` (rewritten after every task, so a crash keeps what was measured) and ``report.md``:
  IA, TA and forgetting per concept, multi-concept presence, timings;
- ``concepts/``: a :class:`~lifelong_engine.ConceptStore` with the learned concepts
  (``lifelong-engine concepts list --store OUT/concepts``).
"""

from __future__ import annotations

import dataclasses
import platform
import shutil
import time
from pathlib import Path

import torch

from .lifelong import SequenceConfig, report_markdown, run_sequence, save_grid, write_json

__all__ = ["FULL", "QUICK", "run_demo"]

#: The full demo: six concepts, two pairs (267 s on a 2-core CPU, one thread, 2026-11-21).
FULL = SequenceConfig(concepts=("tw-badge", "tw-flag", "tw-kite", "tw-sail", "tw-locket", "tw-spark"), pairs=2)
#: ``--quick``: three concepts, fewer steps and samples, one pair (CI runs it).
QUICK = dataclasses.replace(FULL, concepts=FULL.concepts[:3], steps=80, samples=1, inference_steps=15, pairs=1)


def run_demo(out: str | Path = "tinyworld-demo", *, quick: bool = False, device: str | None = None,
             weights_dir: str | Path | None = None, progress: bool = True,
             config: SequenceConfig | None = None) -> dict:  # fmt: skip
    """Run the demo into ``out``; returns the report. ``weights_dir``: a TinyWorld model and its
    ``evaluator/`` (default: the shipped ones); ``config`` overrides :data:`FULL` / :data:`QUICK`."""
    from .. import ConceptStore, LifelongPipeline
    from .evaluator import Evaluator
    from .model import load_tinyworld_pipeline

    config = config or (QUICK if quick else FULL)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    started = time.perf_counter()
    lp = LifelongPipeline.from_pipe(load_tinyworld_pipeline(device, weights_dir))
    evaluator = Evaluator.load(Path(weights_dir) / "evaluator" if weights_dir else None, device=device)
    store_dir = out / "concepts"
    if store_dir.exists():  # a fresh store per run: the demo learns the concepts again
        shutil.rmtree(store_dir)
    store = ConceptStore(store_dir)
    try:
        report, images = run_sequence(
            lp, evaluator, config, store=store, progress=progress,
            on_update=lambda r: write_json(r, out / "report.json"),
        )  # fmt: skip
    finally:
        store.close()
    report["environment"] = {
        "device": str(lp.device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "quick": quick,
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    write_json(report, out / "report.json")
    title = f"TinyWorld demo: {config.method}, {len(config.concepts)} concepts{' (quick)' if quick else ''}"
    (out / "report.md").write_text(report_markdown([report], title) + _timing_line(report))
    save_grid(images, out / "grid.png")
    return report


def _timing_line(report: dict) -> str:
    env = report["environment"]
    train = sum(e["train_seconds"] for e in report["concepts"].values())
    return (
        f"\nWall time {env['wall_seconds']:.0f} s ({train:.0f} s learning) on {env['device']}, "
        f"{env['threads']} threads, torch {env['torch']}.\n"
    )

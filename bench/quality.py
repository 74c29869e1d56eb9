"""Lifelong quality benchmark on TinyWorld: the same concept sequence learned by every method.

    python bench/quality.py [--methods cidm,lora-m,...] [--ablations] [--concepts 10] [--steps N] [--lr LR]
                            [--device D] [--quick]

Each method starts from the shipped TinyWorld model and learns the concepts in order with the
same settings (:class:`lifelong_engine.tinyworld.lifelong.SequenceConfig`); then IA / TA per
concept after the last task, forgetting (IA right after learning − IA after the last task) and
two-concept presence through regional synthesis (see ``lifelong_engine/tinyworld/lifelong.py``).

``--ablations`` adds the CIDM paper's ablation rows (its Table 3), each a cidm run with one part off:
``cidm/no-r1`` (γ1 = 0), ``cidm/no-r2`` (γ2 = 0), ``cidm/no-ewa`` (merged by plain sum),
``cidm/no-layerwise`` (one token row shared by all layers), ``cidm/no-regional`` (alpha = 1: the
two-concept column without regional noise aggregation). They can also be named in ``--methods``.
``lora-c`` (LoRA Composite, Zhong et al. 2024) is a generation-time baseline: the LoRA-M adapters,
each image denoised with the mean of the per-concept guided noise estimates of every learned concept
(``composition="lora-c"``); it runs by default with the methods.

``--seed N`` runs the same rows with another seed (training images, training and sampling) into
``quality-seed<N>.json``; ``--spread A.json B.json ...`` then writes ``quality-spread.md``: every row
finished under every seed, as the mean and the range over the seeds, and how many seeds CIDM beats
each baseline in.

Writes ``bench/results/<device>/quality.json`` (every method's report, the environment and the
command) and ``quality.md`` (the CIDM-paper style table). The JSON is rewritten after every task;
a method whose finished report with the same settings is already there is not run again, so an
interrupted run continues where it stopped (``--restart`` runs the listed methods again and keeps
the other methods' reports).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import common
import torch

common.ensure_engine_importable()
from lifelong_engine import LifelongPipeline  # noqa: E402
from lifelong_engine.tinyworld import CAPTION_STYLES, CONCEPTS  # noqa: E402
from lifelong_engine.tinyworld.evaluator import Evaluator  # noqa: E402
from lifelong_engine.tinyworld.lifelong import (  # noqa: E402
    SequenceConfig,
    report_markdown,
    run_sequence,
    spread_markdown,
    write_json,
)
from lifelong_engine.tinyworld.model import load_tinyworld_pipeline  # noqa: E402
from lifelong_engine.training import METHODS  # noqa: E402

#: row → (method, its options, generation options): the CIDM paper's ablations
ABLATIONS = {
    "cidm/no-r1": ("cidm", {"gamma1": 0.0}, {}),
    "cidm/no-r2": ("cidm", {"gamma2": 0.0}, {}),
    "cidm/no-ewa": ("cidm", {"ewa": "sum"}, {}),
    "cidm/no-layerwise": ("cidm", {"layerwise_tokens": False}, {}),
    "cidm/no-regional": ("cidm", {}, {"alpha": 1.0}),
}
#: row → (method, its options, generation options): baselines that differ from a method at generation
BASELINES = {"lora-c": ("lora-m", {}, {"composition": "lora-c"})}
ROWS = (*METHODS, *BASELINES, *ABLATIONS)


def row_config(base: SequenceConfig, row: str) -> SequenceConfig:
    """The run of one table row: a method with its defaults, a generation-time baseline or an ablation of cidm."""
    variants = {**BASELINES, **ABLATIONS}
    method, method_options, pipeline_options = variants.get(row, (row, {}, {}))
    return dataclasses.replace(
        base, method=method, method_options=method_options, pipeline_options=pipeline_options,
        label=row if row in variants else "",
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--methods", default=None, help=f"comma-separated, from {', '.join(ROWS)} (default: every method)"
    )
    parser.add_argument("--ablations", action="store_true", help="add cidm and its ablation rows")
    parser.add_argument("--concepts", type=int, default=len(CONCEPTS), help="the first N TinyWorld concepts")
    parser.add_argument("--steps", type=int, default=None, help="training steps per concept")
    parser.add_argument("--lr", type=float, default=None, help="learning rate of every method (default 5e-3)")
    parser.add_argument("--pairs", type=int, default=None, help="two-concept layouts (default: concepts // 2)")
    parser.add_argument("--captions", choices=CAPTION_STYLES, default=None,
                        help="training captions (Concept.images; default: SequenceConfig's)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0,
                        help="the run's seed: training images, training and sampling (default 0); a seed other "
                             "than 0 writes quality-seed<N>.json")  # fmt: skip
    parser.add_argument("--spread", type=Path, nargs="+", metavar="JSON", default=None,
                        help="write no run: the mean and spread over these quality JSONs (one per seed) "
                             "to quality-spread.md in --out")  # fmt: skip
    parser.add_argument("--device", default=None, help="default: cuda when available")
    parser.add_argument("--weights", default=None, help="TinyWorld model directory (default: the shipped one)")
    parser.add_argument("--out", type=Path, default=None, help="default: bench/results/<device>")
    parser.add_argument("--quick", action="store_true", help="3 concepts, 40 steps, 1 sample (a smoke run)")
    parser.add_argument("--restart", action="store_true", help="run the listed methods again even when finished")
    args = parser.parse_args(argv)
    if args.spread:
        return write_spread(parser, args.spread, args.out)

    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else []
    if args.ablations:
        methods += [m for m in ("cidm", *ABLATIONS) if m not in methods]
    elif not methods:
        methods = [*METHODS, *BASELINES]
    unknown = [m for m in methods if m not in ROWS]
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {', '.join(ROWS)}")
    n = 3 if args.quick else args.concepts
    if not 2 <= n <= len(CONCEPTS):
        parser.error(f"--concepts must be 2 to {len(CONCEPTS)}")
    base = SequenceConfig(concepts=tuple(c.name for c in CONCEPTS[:n]), pairs=n // 2, seed=args.seed)
    if args.quick:
        base = dataclasses.replace(base, steps=40, samples=1, inference_steps=10, pairs=1)
    if args.steps is not None:
        base = dataclasses.replace(base, steps=args.steps)
    if args.lr is not None:
        base = dataclasses.replace(base, learning_rate=args.lr)
    if args.pairs is not None:
        base = dataclasses.replace(base, pairs=args.pairs)
    if args.captions is not None:
        base = dataclasses.replace(base, captions=args.captions)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    info = common.describe_device(device)
    out = args.out or common.BENCH_DIR / "results" / info.slug
    out.mkdir(parents=True, exist_ok=True)
    name = ("quality-quick" if args.quick else "quality") + (f"-seed{args.seed}" if args.seed else "")
    path = out / f"{name}.json"
    results = {"reports": {}}
    if path.is_file():  # other methods' reports stay; --restart only re-runs the listed ones
        results = json.loads(path.read_text())
    results.update(device=info.name, threads=torch.get_num_threads(), **common.environment(argv))

    evaluator = Evaluator.load(Path(args.weights) / "evaluator" if args.weights else None, device=device)
    for method in methods:
        config = row_config(base, method)
        done = results["reports"].get(method)
        if not args.restart and done and done.get("status") == "finished" and done["config"] == json.loads(json.dumps(
                dataclasses.asdict(config))):  # fmt: skip
            print(f"{method}: finished in {path} with the same settings; skipped")
            continue
        lp = LifelongPipeline.from_pipe(load_tinyworld_pipeline(device, args.weights))

        def save(report, method=method):
            report["git_sha"], report["command"] = results["git_sha"], results["command"]
            results["reports"][method] = report
            write_json(results, path)

        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as run_dir:
            report, _ = run_sequence(lp, evaluator, config, run_dir=run_dir, on_update=save)
        report["wall_seconds"] = round(time.perf_counter() - started, 1)
        save(report)
        s = report["summary"]
        print(f"{method}: IA {s['ia_final']} TA {s['ta_final']} forgetting {s['forgetting']} "
              f"presence {s['presence']} ({report['wall_seconds']:.0f} s)")  # fmt: skip

    finished = [results["reports"][m] for m in ROWS if results["reports"].get(m, {}).get("status") == "finished"]
    if finished:
        seed = f", seed {args.seed}" if args.seed else ""
        title = f"TinyWorld lifelong quality: {n} concepts, {base.steps} steps each{seed} ({info.name})"
        commands = dict.fromkeys(r.get("command", results["command"]) for r in finished)  # runs may add methods
        footer = f"\n{results['date']}, git {results['git_sha'][:10]}, " + "; ".join(f"`{c}`" for c in commands) + "\n"
        (out / f"{name}.md").write_text(report_markdown(finished, title) + footer)
        print(f"wrote {path} and {out / f'{name}.md'}")
    return 0


def write_spread(parser: argparse.ArgumentParser, paths: list[Path], out: Path | None) -> int:
    """The mean and spread of every row finished in all of ``paths`` (one quality JSON per seed)."""
    runs, seeds = [], []
    for p in paths:
        if not p.is_file():
            parser.error(f"--spread: no such file {p}")
        try:
            runs.append(json.loads(p.read_text())["reports"])
            seeds.append({r["config"]["seed"] for r in runs[-1].values()})
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            parser.error(f"--spread: {p} is not a quality JSON written by this script ({type(e).__name__}: {e})")
    if any(len(s) != 1 for s in seeds) or len(set.union(*seeds)) != len(runs):
        parser.error(f"--spread: expected one seed per file and a different seed in each, got {seeds}")
    out = out or paths[0].parent
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality-spread.md").write_text(spread_markdown(runs, ROWS))
    print(f"wrote {out / 'quality-spread.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

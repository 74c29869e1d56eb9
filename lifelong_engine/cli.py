"""The ``lifelong-engine`` command."""

from __future__ import annotations

import argparse
import platform
import sys
import time


def _info(args: argparse.Namespace) -> int:
    import torch

    import lifelong_engine
    from lifelong_engine import backends

    print(f"lifelong-engine {lifelong_engine.__version__}")
    print(f"python {platform.python_version()}, torch {torch.__version__}")
    cuda = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    print(f"CUDA device: {cuda}")
    print(f"backends available: {', '.join(backends.available_backends())}")
    print(f"backend requested: {backends.requested_backend()}")
    return 0


def _store(args: argparse.Namespace):
    from lifelong_engine.store import ConceptStore

    return ConceptStore(args.store)


def _concepts_list(args: argparse.Namespace) -> int:
    with _store(args) as store:
        records = store.list(args.namespace, all_versions=args.all_versions)
    if not records:
        print("no concepts")
        return 0
    rows = [("NAMESPACE", "NAME", "VERSION", "TOKEN", "RANK", "METHOD", "BASE", "CREATED")]
    for r in records:
        created = time.strftime("%Y-%m-%d %H:%M", time.localtime(r.created))
        rows.append((r.namespace, r.name, str(r.version), r.token, str(r.rank), r.method, r.base_fingerprint, created))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    return 0


def _concepts_import(args: argparse.Namespace) -> int:
    from lifelong_engine.formats import import_lora

    adapter = import_lora(args.file, args.name, token=args.token, class_word=args.class_word)
    with _store(args) as store:
        version = store.save(adapter, namespace=args.namespace)
    print(f"imported {args.file} as {args.namespace}/{args.name} v{version} ({adapter.method}, rank {adapter.rank})")
    return 0


def _concepts_export(args: argparse.Namespace) -> int:
    from lifelong_engine.formats import export_lora

    with _store(args) as store:
        adapter = store.load(args.name, args.namespace, args.version)
    path = export_lora(adapter, args.out, format=args.format)
    print(f"wrote {path} ({args.format})")
    return 0


def _concepts_verify(args: argparse.Namespace) -> int:
    with _store(args) as store:
        problems = store.verify()
        count = len(store.list(all_versions=True))
    for problem in problems:
        print(problem)
    print(f"{count} concept versions checked, {len(problems)} problems")
    return 1 if problems else 0


def _concepts_delete(args: argparse.Namespace) -> int:
    with _store(args) as store:
        n = store.delete(args.name, args.namespace, args.version)
    print(f"deleted {n} version(s) of {args.namespace}/{args.name}")
    return 0


def _concepts_prune(args: argparse.Namespace) -> int:
    with _store(args) as store:
        n = store.prune(keep=args.keep)
    print(f"removed {n} old version(s)")
    return 0


def _add_concepts(sub) -> None:
    concepts = sub.add_parser("concepts", help="manage a concept store").add_subparsers(dest="action", required=True)

    def action(name: str, func, help: str, namespace: str | None = "default", scoped: bool = True):
        """scoped: the command takes --namespace (default ``namespace``; None = all namespaces)."""
        p = concepts.add_parser(name, help=help)
        p.add_argument("--store", required=True, help="the store directory")
        if scoped:
            p.add_argument("--namespace", default=namespace, help=f"namespace (default: {namespace or 'all'})")
        p.set_defaults(func=func)
        return p

    action("list", _concepts_list, "list concepts", namespace=None).add_argument(
        "--all-versions", action="store_true", help="every version, not only the newest"
    )
    p = action("import", _concepts_import, "import a LoRA / Custom Diffusion / textual-inversion file")
    p.add_argument("file")
    p.add_argument("--name", required=True)
    p.add_argument("--token", default=None, help="prompt token (default <name>)")
    p.add_argument("--class-word", default=None)
    p = action("export", _concepts_export, "export a concept as a diffusers-loadable LoRA file")
    p.add_argument("name")
    p.add_argument("--out", required=True)
    p.add_argument("--format", choices=("peft", "kohya"), default="peft")
    p.add_argument("--version", type=int, default=None)
    action("verify", _concepts_verify, "check every file against the index", scoped=False)
    p = action("delete", _concepts_delete, "delete a concept (all versions, or one)")
    p.add_argument("name")
    p.add_argument("--version", type=int, default=None)
    action("prune", _concepts_prune, "keep only the newest versions", scoped=False).add_argument(
        "--keep", type=int, default=1
    )


def _demo(args: argparse.Namespace) -> int:
    from lifelong_engine.tinyworld.demo import run_demo

    report = run_demo(
        args.out, quick=args.quick, device=args.device, weights_dir=args.weights, progress=not args.no_progress
    )
    s = {k: "n/a" if v is None else f"{v:.3f}" for k, v in report["summary"].items()}
    print(
        f"IA {s['ia_final']} (base model {s['base_ia']}), TA {s['ta_final']}, forgetting {s['forgetting']}, "
        f"both concepts present {s['both_present']}; wrote grid.png, report.md, report.json to {args.out}"
    )
    return 0


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="learn TinyWorld concepts with CIDM and report IA / TA / forgetting")
    p.add_argument("--quick", action="store_true", help="three concepts, fewer steps (about 80 s on a 2-core CPU)")
    p.add_argument("--out", default="tinyworld-demo", help="output directory (default: ./tinyworld-demo)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    p.add_argument("--weights", default=None, help="a TinyWorld model directory (default: the shipped model)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_demo)


# ------------------------------------------------------------------ learn / generate

# Defaults per base model: TinyWorld (the shipped toy model) and a diffusers SD / SDXL checkpoint.
_DEFAULTS = {
    "tinyworld": {"steps": 100, "lr": 5e-3, "batch": 4, "inference_steps": 20, "guidance_scale": 4.0},
    "diffusers": {"steps": 400, "lr": 1e-3, "batch": 1, "inference_steps": 30, "guidance_scale": 7.5},
}


def _defaults(args: argparse.Namespace) -> dict:
    return _DEFAULTS["tinyworld" if args.model == "tinyworld" else "diffusers"]


def _pipeline(args: argparse.Namespace):
    """The LifelongPipeline over --model (with --weights for TinyWorld) on --device."""
    import torch

    from lifelong_engine import LifelongPipeline

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.model == "tinyworld":
        from lifelong_engine.tinyworld.model import load_tinyworld_pipeline

        pipe = load_tinyworld_pipeline(device, args.weights)
    else:
        from diffusers import DiffusionPipeline

        dtype = torch.float16 if device.type == "cuda" else torch.float32
        pipe = DiffusionPipeline.from_pretrained(args.model, torch_dtype=dtype).to(device)
        if not hasattr(pipe, "unet") or not hasattr(pipe, "vae"):
            raise ValueError(f"{args.model} holds a {type(pipe).__name__}; expected a Stable Diffusion (XL) pipeline")
    pipe.set_progress_bar_config(disable=args.no_progress)
    return LifelongPipeline.from_pipe(pipe)


def _load_concepts(lp, store, namespace: str, names: list[str] | None) -> list[str]:
    """Add the store's concepts of ``namespace`` learned on this base model (or only ``names``)."""
    records = {r.name: r for r in store.list(namespace)}
    if names is None:
        names = [n for n, r in records.items() if r.base_fingerprint in ("", lp.fingerprint)]
    missing = [n for n in names if n not in records]
    if missing:
        raise ValueError(f"no concept {missing} in namespace {namespace!r} of the store (it has {sorted(records)})")
    for name in names:
        lp.add_concept(store.load(name, namespace))
    return names


def _learn(args: argparse.Namespace) -> int:
    from lifelong_engine.store import ConceptStore
    from lifelong_engine.training import ContinualTrainer

    d = _defaults(args)
    lp = _pipeline(args)
    with ConceptStore(args.store) as store:
        past = [n for n in _load_concepts(lp, store, args.namespace, None) if n != args.name]
        if args.name in lp.concepts:
            lp.remove_concept(args.name)  # learning it again makes a new version
        trainer = ContinualTrainer(
            lp, method=args.method, rank=args.rank, max_steps=args.steps or d["steps"],
            learning_rate=args.lr or d["lr"], batch_size=args.batch_size or d["batch"], store=store,
            seed=args.seed, namespace=args.namespace, progress=not args.no_progress,
        )  # fmt: skip
        adapter = trainer.learn(args.name, args.images, args.class_word, resume=args.resume)
        stats = trainer.stats[args.name]
        version = store.record(args.name, args.namespace).version
    print(
        f"learned {adapter.token} ({args.method}, {stats.steps} steps, {stats.steps_per_second:.2f} steps/s) with "
        f"{len(past)} earlier concepts frozen; denoising loss {stats.eval_loss_before:.4f} -> "
        f"{stats.eval_loss_after:.4f}; saved as {args.namespace}/{args.name} v{version} in {args.store}"
    )
    return 0


def _region(text: str) -> tuple[str, tuple[float, float, float, float]]:
    prompt, sep, box = text.rpartition("@")
    try:
        values = tuple(float(v) for v in box.split(","))
    except ValueError:
        values = ()
    if not sep or not prompt or len(values) != 4:
        raise argparse.ArgumentTypeError(f"expected 'PROMPT@x0,y0,x1,y1' (a box in [0, 1]), got {text!r}")
    return prompt, values


def _generate(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from lifelong_engine import AttentionGuidance
    from lifelong_engine.store import ConceptStore

    d = _defaults(args)
    lp = _pipeline(args)
    names: list[str] = []
    if args.store:
        wanted = [n.strip() for n in args.concepts.split(",") if n.strip()] if args.concepts else None
        with ConceptStore(args.store) as store:
            names = _load_concepts(lp, store, args.namespace, wanted)
    elif args.concepts:
        raise ValueError("--concepts needs --store")
    guidance = None
    if args.attention_guidance or args.orthogonal:
        guidance = AttentionGuidance(artist=1.0 if args.attention_guidance else 0.0, orthogonal=args.orthogonal)
    generators = [torch.Generator().manual_seed(args.seed + i) for i in range(args.num_images)]
    out = lp(
        args.prompt, negative_prompt=args.negative_prompt, regions=args.region or None, alpha=args.alpha,
        num_inference_steps=args.steps or d["inference_steps"], guidance_scale=args.guidance_scale or
        d["guidance_scale"], num_images_per_prompt=args.num_images, generator=generators,
        attention_guidance=guidance,
    )  # fmt: skip
    target = Path(args.out)
    target.parent.mkdir(parents=True, exist_ok=True)
    paths = (
        [target] if len(out.images) == 1 else [target.with_stem(f"{target.stem}-{i}") for i in range(len(out.images))]
    )
    for image, path in zip(out.images, paths):
        if args.scale > 1:
            image = image.resize((image.width * args.scale, image.height * args.scale), resample=0)
        image.save(path)
    used = ", ".join(names) if names else "none"
    print(f"wrote {', '.join(str(p) for p in paths)} (concepts: {used})")
    return 0


def _model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="tinyworld", help="'tinyworld' (default) or a diffusers SD / SDXL directory")
    p.add_argument("--weights", default=None, help="a TinyWorld model directory (default: the shipped model)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    p.add_argument("--namespace", default="default", help="the store namespace (default: default)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _add_learn_generate(sub) -> None:
    p = sub.add_parser("learn", help="learn a concept from a folder of images into a store (earlier ones frozen)")
    p.add_argument("name", help="the concept's name; prompts call it <name>")
    p.add_argument("images", help="a folder of images (or one image file)")
    p.add_argument("--class-word", required=True, help="what it is: dog, mug, ...")
    p.add_argument("--store", required=True, help="the concept store directory (created if missing)")
    p.add_argument("--method", default="cidm", help="cidm (default), c-lora, lora-m, custom-diffusion, ...")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: TinyWorld 100, else 400)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: TinyWorld 5e-3, else 1e-3)")
    p.add_argument("--batch-size", type=int, default=None, help="(default: TinyWorld 4, else 1)")
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue an interrupted run of this concept")
    _model_options(p)
    p.set_defaults(func=_learn)

    p = sub.add_parser("generate", help="render a prompt with concepts from a store")
    p.add_argument("prompt", help='e.g. "a <my-dog> dog on a beach"')
    p.add_argument("--store", default=None, help="the concept store directory")
    p.add_argument("--concepts", default=None, help="comma list (default: every concept of the namespace)")
    p.add_argument("--region", action="append", type=_region, help="'PROMPT@x0,y0,x1,y1' (repeatable)")
    p.add_argument("--alpha", type=float, default=0.7, help="regional noise mixing (1: single pass)")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: TinyWorld 20, else 30)")
    p.add_argument("--guidance-scale", type=float, default=None, help="CFG scale (default: TinyWorld 4, else 7.5)")
    p.add_argument("--attention-guidance", action="store_true", help="L2DM's concept attention artist")
    p.add_argument("--orthogonal", type=float, default=0.0, help="weight of L2DM's orthogonal attention guidance")
    p.add_argument("--num-images", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", type=int, default=1, help="upscale the saved images by this factor (nearest)")
    p.add_argument("--out", default="image.png", help="PNG path (several images: name-0.png, name-1.png, ...)")
    _model_options(p)
    p.set_defaults(func=_generate)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lifelong-engine", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, devices and op backends of this installation").set_defaults(func=_info)
    _add_concepts(sub)
    _add_demo(sub)
    _add_learn_generate(sub)
    args = parser.parse_args(argv)
    from lifelong_engine.errors import LifelongError

    try:
        return args.func(args)
    except (ValueError, LifelongError, OSError) as e:  # bad input or a damaged store: say so, no traceback
        message = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
        print(f"error: {message or type(e).__name__}", file=sys.stderr)  # always one line
        return 2


if __name__ == "__main__":
    sys.exit(main())

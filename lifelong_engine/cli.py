"""The ``lifelong-engine`` command."""

from __future__ import annotations

import argparse
import platform
import sys
import time

DESCRIPTION = (
    "Lifelong customization of text-to-image diffusion models: learn personal concepts one after another "
    "into a concept store, and generate with them (several at once, each in its own region, or editing an "
    "image). Runs on the shipped TinyWorld model or a diffusers Stable Diffusion (XL) checkpoint."
)


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

    return ConceptStore(args.store, files=args.files)


def _store_options(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument(
        "--store", required=required, default=None,
        help="the concept store: a directory (created if missing), or a postgresql:// URL with --files",
    )  # fmt: skip
    p.add_argument("--files", default=None, help="with a postgresql:// --store: the shared directory of its files")


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
    from lifelong_engine.formats import export_lora, token_rows_note, token_rows_path

    with _store(args) as store:
        adapter = store.load(args.name, args.namespace, args.version)
    path = export_lora(adapter, args.out, format=args.format)
    print(f"wrote {path} ({args.format})")
    rows = adapter.token_embeddings
    shared = rows is not None and rows.shape[0] == 1  # export_lora wrote them beside the LoRA
    print(f"wrote {token_rows_path(path)} ({token_rows_note(adapter)})" if shared else token_rows_note(adapter))
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
        _store_options(p)
        if scoped:
            p.add_argument("--namespace", default=namespace, help=f"namespace (default: {namespace or 'all'})")
        p.set_defaults(func=func)
        return p

    action("list", _concepts_list, "list concepts", namespace=None).add_argument(
        "--all-versions", action="store_true", help="every version, not only the newest"
    )
    p = action("import", _concepts_import, "import a LoRA / Custom Diffusion / textual-inversion file")
    p.add_argument("file", help="the .safetensors / .bin file to import")
    p.add_argument("--name", required=True, help="the concept's name in the store")
    p.add_argument("--token", default=None, help="prompt token (default <name>)")
    p.add_argument("--class-word", default=None, help="what the concept is: dog, mug, ... (optional)")
    p = action("export", _concepts_export, "export a concept as a diffusers-loadable LoRA file")
    p.add_argument("name", help="the concept to export")
    p.add_argument("--out", required=True, help="the file to write")
    p.add_argument("--format", choices=("peft", "kohya"), default="peft", help="key layout (default: peft)")
    p.add_argument("--version", type=int, default=None, help="the concept version (default: the newest)")
    action("verify", _concepts_verify, "check every file against the index", scoped=False)
    p = action("delete", _concepts_delete, "delete a concept (all versions, or one)")
    p.add_argument("name", help="the concept to delete")
    p.add_argument("--version", type=int, default=None, help="only this version (default: every version)")
    action("prune", _concepts_prune, "keep only the newest versions", scoped=False).add_argument(
        "--keep", type=int, default=1, help="versions to keep per concept (default: 1)"
    )


def _demo(args: argparse.Namespace) -> int:
    from lifelong_engine.tinyworld.demo import run_demo

    report = run_demo(
        args.out, quick=args.quick, device=args.device, weights_dir=args.weights, progress=not args.no_progress
    )
    s = {k: "n/a" if v is None else f"{v:.3f}" for k, v in report["summary"].items() if not isinstance(v, dict)}
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


def _defaults(args: argparse.Namespace) -> dict:
    from lifelong_engine.workflows import model_defaults

    return model_defaults(args.model)


def _pipeline(args: argparse.Namespace):
    """The LifelongPipeline over --model (with --weights for TinyWorld) on --device; with --image (and --mask),
    over the model's img2img (inpaint) pipeline."""
    from lifelong_engine.workflows import load_pipeline

    lp = load_pipeline(args.model, args.weights, args.device, progress=not args.no_progress)
    if getattr(args, "image", None):
        from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting

        from lifelong_engine import LifelongPipeline

        lp.restore()  # the editing pipeline shares the UNet and installs its own processors
        pipe = (AutoPipelineForInpainting if args.mask else AutoPipelineForImage2Image).from_pipe(lp.pipe)
        pipe.set_progress_bar_config(disable=args.no_progress)
        lp = LifelongPipeline.from_pipe(pipe)
    elif getattr(args, "mask", None):
        raise ValueError("--mask needs --image (the image to inpaint)")
    return lp


def _learn(args: argparse.Namespace) -> int:
    from lifelong_engine.workflows import learn_concept

    lp = _pipeline(args)
    with _store(args) as store:
        done = learn_concept(
            lp, store, args.name, args.images, args.class_word, args.namespace, model=args.model,
            method=args.method, rank=args.rank, steps=args.steps, lr=args.lr, batch_size=args.batch_size,
            seed=args.seed, resume=args.resume, progress=not args.no_progress,
        )  # fmt: skip
    stats = done.stats
    print(
        f"learned {done.adapter.token} ({args.method}, {stats.steps} steps, {stats.steps_per_second:.2f} steps/s) "
        f"with {len(done.past)} earlier concepts frozen; denoising loss {stats.eval_loss_before:.4f} -> "
        f"{stats.eval_loss_after:.4f}; saved as {args.namespace}/{args.name} v{done.version} in {args.store}"
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

    d = _defaults(args)
    lp = _pipeline(args)
    names: list[str] = []
    if args.store:
        wanted = [n.strip() for n in args.concepts.split(",") if n.strip()] if args.concepts else None
        with _store(args) as store:
            names = lp.load_concepts(store, args.namespace, wanted)
    elif args.concepts:
        raise ValueError("--concepts needs --store")
    guidance = None
    if args.attention_guidance or args.orthogonal:
        guidance = AttentionGuidance(artist=1.0 if args.attention_guidance else 0.0, orthogonal=args.orthogonal)
    generators = [torch.Generator().manual_seed(args.seed + i) for i in range(args.num_images)]
    editing = {}
    if args.image:
        import PIL.Image

        editing["image"] = PIL.Image.open(args.image).convert("RGB")
        if args.mask:
            editing["mask_image"] = PIL.Image.open(args.mask).convert("L")
            editing["height"], editing["width"] = editing["image"].height, editing["image"].width
        if args.strength is not None:
            editing["strength"] = args.strength
    elif args.strength is not None:
        raise ValueError("--strength needs --image (the image to start from)")
    out = lp(
        args.prompt, negative_prompt=args.negative_prompt, regions=args.region or None, alpha=args.alpha,
        num_inference_steps=args.steps or d["inference_steps"], guidance_scale=args.guidance_scale or
        d["guidance_scale"], num_images_per_prompt=args.num_images, generator=generators,
        attention_guidance=guidance, **editing,
    )  # fmt: skip
    target = Path(args.out)
    target.parent.mkdir(parents=True, exist_ok=True)
    paths = (
        [target] if len(out.images) == 1 else [target.with_stem(f"{target.stem}-{i}") for i in range(len(out.images))]
    )
    for image, path in zip(out.images, paths):
        if args.upscale > 1:
            image = image.resize((image.width * args.upscale, image.height * args.upscale), resample=0)
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
    _store_options(p)
    p.add_argument("--method", default="cidm", help="cidm (default), c-lora, lora-m, custom-diffusion, ...")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: TinyWorld 100, else 400)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: TinyWorld 5e-3, else 1e-3)")
    p.add_argument("--batch-size", type=int, default=None, help="(default: TinyWorld 4, else 1)")
    p.add_argument("--rank", type=int, default=4, help="LoRA rank (default: 4)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run of this concept")
    _model_options(p)
    p.set_defaults(func=_learn)

    p = sub.add_parser("generate", help="render a prompt with concepts from a store")
    p.add_argument("prompt", help='e.g. "a <my-dog> dog on a beach"')
    _store_options(p, required=False)
    p.add_argument("--concepts", default=None, help="comma list (default: every concept of the namespace)")
    p.add_argument("--region", action="append", type=_region, help="'PROMPT@x0,y0,x1,y1' (repeatable)")
    p.add_argument("--alpha", type=float, default=0.7, help="regional noise mixing (1: single pass)")
    p.add_argument("--negative-prompt", default=None, help="what the images should not show")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: TinyWorld 20, else 30)")
    p.add_argument("--guidance-scale", type=float, default=None, help="CFG scale (default: TinyWorld 4, else 7.5)")
    p.add_argument("--attention-guidance", action="store_true", help="L2DM's concept attention artist")
    p.add_argument("--orthogonal", type=float, default=0.0, help="weight of L2DM's orthogonal attention guidance")
    p.add_argument("--num-images", type=int, default=1, help="images to render (default: 1)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the first image (default: 0)")
    p.add_argument("--image", default=None, help="start from this image (img2img / SDEdit; with --mask: inpaint)")
    p.add_argument("--mask", default=None, help="with --image: repaint where this mask image is white")
    p.add_argument(
        "--strength", type=float, default=None,
        help="with --image: how far the image is noised, 0..1 (default: the diffusers pipeline's own)",
    )  # fmt: skip
    p.add_argument(
        "--upscale", type=int, default=1, help="enlarge the saved images by this factor, nearest pixel (default: 1)"
    )
    p.add_argument("--out", default="image.png", help="PNG path (several images: name-0.png, name-1.png, ...)")
    _model_options(p)
    p.set_defaults(func=_generate)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lifelong-engine")
    except PackageNotFoundError:  # a source tree that is not installed
        return "unknown"


# ------------------------------------------------------------------ the cluster (Ray)


def _serve(args: argparse.Namespace) -> int:
    with _store(args):  # a store that cannot be opened fails here, in one line, before Ray starts
        pass
    try:
        from lifelong_engine import cluster
    except ImportError as e:
        raise ValueError(f"serve needs Ray Serve: pip install 'lifelong-engine[cluster]' ({e})") from e
    if (args.min_replicas is None) != (args.max_replicas is None):
        raise ValueError("--min-replicas and --max-replicas go together (autoscaling between them)")
    autoscaling = None
    if args.min_replicas is not None:
        autoscaling = {"min_replicas": args.min_replicas, "max_replicas": args.max_replicas}
    config = cluster.ClusterConfig(
        store=args.store, files=args.files, model=args.model, weights=args.weights, replicas=args.replicas,
        autoscaling=autoscaling, gpus_per_replica=args.gpus_per_replica, cpus_per_replica=args.cpus_per_replica,
        max_batch_rows=args.max_batch_rows, max_queue=args.max_queue, multiplex=not args.no_multiplex,
    )  # fmt: skip
    address = None if args.address == "local" else args.address
    print(f"serving on http://{args.host}:{args.port}/ (Ray: {args.address}); Ctrl-C stops", flush=True)
    cluster.run(config, address=address, host=args.host, port=args.port)
    return 0


_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def _submit_learn(args: argparse.Namespace) -> int:
    import base64
    import contextlib
    import json
    import urllib.error
    import urllib.request
    from pathlib import Path

    source = Path(args.images)
    files = sorted(p for p in source.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES) if source.is_dir() else [source]
    if not files:
        raise ValueError(f"{source}: no image files ({', '.join(_IMAGE_SUFFIXES)})")
    body = {
        "name": args.name, "class_word": args.class_word, "namespace": args.namespace, "method": args.method,
        "steps": args.steps, "rank": args.rank, "learning_rate": args.lr, "batch_size": args.batch_size,
        "seed": args.seed, "images": [base64.b64encode(p.read_bytes()).decode() for p in files],
    }  # fmt: skip
    url = args.url.rstrip("/")

    def call(path: str, data: dict | None = None) -> dict:
        payload = None if data is None else json.dumps(data).encode()
        request = urllib.request.Request(url + path, payload, {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as e:
            message = e.read().decode(errors="replace")
            with contextlib.suppress(ValueError, KeyError, TypeError):
                message = json.loads(message)["error"]
            raise ValueError(f"{url}{path}: HTTP {e.code}: {message}") from None
        except urllib.error.URLError as e:
            raise OSError(f"{url}: cannot reach the service ({e.reason})") from None

    job = call("/v1/concepts/learn", body)
    print(f"job {job['job']} {job['state']}: learn {args.namespace}/{args.name} from {len(files)} images", flush=True)
    if not args.wait:
        return 0
    state = job["state"]
    while state not in ("done", "failed"):
        time.sleep(2)
        job = call(f"/v1/jobs/{job['job']}")
        if job["state"] != state:
            state = job["state"]
            print(f"job {job['job']} {state}", flush=True)
    if state == "failed":
        print(f"error: {job['error']}", file=sys.stderr)
        return 1
    print(f"learned {args.namespace}/{args.name} v{job['version']} ({job['steps']} steps, {len(job['past'])} earlier "
          f"concepts frozen)")  # fmt: skip
    return 0


def _add_cluster(sub) -> None:
    p = sub.add_parser("serve", help="serve the HTTP API on Ray Serve (a local Ray instance, or join a cluster)")
    _store_options(p)
    p.add_argument("--replicas", type=int, default=1, help="engine replicas (default 1; one GPU each on GPUs)")
    p.add_argument(
        "--address", default="local",
        help="'local' (default: start Ray on this machine), 'auto' (the cluster this machine belongs to) or "
        "ray://HEAD:10001",
    )  # fmt: skip
    p.add_argument("--host", default="127.0.0.1", help="HTTP address (default 127.0.0.1; 0.0.0.0: every one)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default: 8000)")
    p.add_argument("--model", default="tinyworld", help="'tinyworld' (default) or a diffusers SD / SDXL directory")
    p.add_argument("--weights", default=None, help="a TinyWorld model directory (default: the shipped model)")
    p.add_argument("--gpus-per-replica", type=float, default=None, help="default: 1 when the cluster has GPUs")
    p.add_argument("--cpus-per-replica", type=float, default=1.0, help="CPUs each replica reserves (default: 1)")
    p.add_argument("--min-replicas", type=int, default=None, help="autoscale between --min- and --max-replicas")
    p.add_argument("--max-replicas", type=int, default=None, help="autoscaling: most replicas (with --min-replicas)")
    p.add_argument("--max-batch-rows", type=int, default=16, help="UNet rows per batch of a replica (default: 16)")
    p.add_argument("--max-queue", type=int, default=64, help="the queue limit of a replica (default: 64)")
    p.add_argument("--no-multiplex", action="store_true", help="route requests to any replica (not by namespace)")
    p.set_defaults(func=_serve)

    p = sub.add_parser("cluster-submit-learn", help="submit a learn job to a running `serve` (prints the job id)")
    p.add_argument("name", help="the concept's name; prompts call it <name>")
    p.add_argument("images", help="a folder of images (or one image file)")
    p.add_argument("--class-word", required=True, help="what it is: dog, mug, ...")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the service (default http://127.0.0.1:8000)")
    p.add_argument("--namespace", default="default", help="the store namespace (default: default)")
    p.add_argument("--method", default="cidm", help="cidm (default), c-lora, lora-m, custom-diffusion, ...")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the model's)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: the model's)")
    p.add_argument("--batch-size", type=int, default=None, help="(default: the model's)")
    p.add_argument("--rank", type=int, default=4, help="LoRA rank (default: 4)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--wait", action="store_true", help="wait for the job to end (exit 1 when it failed)")
    p.set_defaults(func=_submit_learn)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lifelong-engine", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"lifelong-engine {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, devices and op backends of this installation").set_defaults(func=_info)
    _add_concepts(sub)
    _add_demo(sub)
    _add_learn_generate(sub)
    _add_cluster(sub)
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

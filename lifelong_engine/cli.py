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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lifelong-engine", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, devices and op backends of this installation").set_defaults(func=_info)
    _add_concepts(sub)
    _add_demo(sub)
    args = parser.parse_args(argv)
    from lifelong_engine.errors import LifelongError

    try:
        return args.func(args)
    except (ValueError, LifelongError, OSError) as e:  # bad input or a damaged store: say so, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

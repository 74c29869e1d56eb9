"""ConceptStore timings: list, load one and save one in a store of N concepts.

    python bench/store.py [--concepts 1000] [--root DIR]

Concepts have SD-1.5 shapes: 16 cross-attention layers, rank-4 LoRA on to_k/to_v (fp32),
two layer-wise token words and ê per layer (text width 768), about 0.8 MB each.
Prints a table and the JSON line it appends to bench/results/<host>/store.jsonl.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

from lifelong_engine.concepts import ConceptAdapter
from lifelong_engine.store import ConceptStore

SD15_DOUT = [320, 320, 640, 640, 1280, 1280, 1280, 1280, 1280, 1280, 640, 640, 640, 320, 320, 320]


def sd15_concept(name: str, rank: int = 4, din: int = 768) -> ConceptAdapter:
    layers = [f"layer{i}.attn2" for i in range(len(SD15_DOUT))]
    lora = {}
    for layer, dout in zip(layers, SD15_DOUT):
        for proj in ("to_k", "to_v"):
            lora[f"{layer}.{proj}.lora_A.weight"] = torch.randn(rank, din)
            lora[f"{layer}.{proj}.lora_B.weight"] = torch.randn(dout, rank)
    return ConceptAdapter(
        name=name,
        token=f"<{name}>",
        words=[f"<{name}>", f"<{name}>_1"],
        layers=layers,
        lora=lora,
        rank=rank,
        token_embeddings=torch.randn(len(layers), 2, din),
        concept_embeddings=torch.randn(len(layers), din),
        base_fingerprint="sd15",
        method="cidm",
    )


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concepts", type=int, default=1000)
    parser.add_argument("--root", default=None, help="store directory (default: a temporary one)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.root or tmp)
        with ConceptStore(root) as store:
            template = sd15_concept("c0")
            for i in tqdm(range(len(store), args.concepts), desc="filling the store"):
                template.name = f"c{i}"
                store.save(template)
            size_mb = template.nbytes / 2**20
            results = {
                "list_ms": timed(store.list, 5),
                "load_ms": timed(lambda: store.load(f"c{args.concepts // 2}"), 20),
                "save_ms": timed(lambda: store.save(sd15_concept("extra")), 20),
            }
    record = {
        "subject": "store",
        "concepts": args.concepts,
        "concept_mb": round(size_mb, 3),
        **{k: round(v, 2) for k, v in results.items()},
        "host": platform.node(),
        "cpu_count": __import__("os").cpu_count(),
        "torch": torch.__version__,
        "git_sha": subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip(),
        "date": time.strftime("%Y-%m-%d"),
        "command": "python bench/store.py " + " ".join(argv or []),
    }
    print(f"store of {args.concepts} concepts ({size_mb:.2f} MB each)")
    for key, value in results.items():
        print(f"  {key.removesuffix('_ms'):5s} {value:8.2f} ms")
    out = Path(__file__).parent / "results" / "cpu" / "store.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a") as f:
        f.write(json.dumps(record) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

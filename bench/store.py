"""ConceptStore timings: list, load one and save one in a store of N concepts.

    python bench/store.py [--concepts 1000] [--root DIR]

Concepts have SD-1.5 shapes: 16 cross-attention layers, rank-4 LoRA on to_k/to_v (fp32),
two layer-wise token words and ê per layer (text width 768), about 0.8 MB each.
Prints a table and the JSON line it appends to bench/results/<host>/store.jsonl.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import common
import torch
from tqdm import tqdm

common.ensure_engine_importable()
from lifelong_engine.concepts import ConceptAdapter  # noqa: E402
from lifelong_engine.store import ConceptStore  # noqa: E402

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
                "list_ms": common.median_ms(store.list, 5),
                "load_ms": common.median_ms(lambda: store.load(f"c{args.concepts // 2}"), 20),
                "save_ms": common.median_ms(lambda: store.save(sd15_concept("extra")), 20),
            }
    device = common.describe_device(torch.device("cpu"))
    record = {
        "subject": "store",
        "case": f"concepts={args.concepts}",
        "concepts": args.concepts,
        "concept_mb": round(size_mb, 3),
        **{k: round(v, 2) for k, v in results.items()},
        "device": device.name,
        **common.environment(argv),
    }
    print(f"store of {args.concepts} concepts ({size_mb:.2f} MB each)")
    for key, value in results.items():
        print(f"  {key.removesuffix('_ms'):5s} {value:8.2f} ms")
    common.ResultWriter(Path(__file__).parent / "results" / device.slug).write(record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

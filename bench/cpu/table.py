"""Markdown tables of a pytest-benchmark JSON file from bench/cpu (one row per provider, per group).

    python bench/cpu/table.py bench/results/cpu/ops.json

Columns: median, IQR and min in ms, rounds, and the median ÷ the group's peer median (the peer:
sdpa at P = 1 for every regional group, peft for lora_kv, impl for overhead, reference for EWA,
for generation the diffusers run with as many concepts: diffusers-0, diffusers+peft-10).
"""

import json
import re
import sys
from collections import defaultdict

PEERS = {"regional": "sdpa", "lora_kv": "peft", "overhead": "impl", "ewa": "reference", "generation": "diffusers"}


def provider(name: str) -> str:
    """The provider of a test id: the last '-'-separated part of its parameters (ours_cpu, sdpa, …)."""
    params = re.search(r"\[(.*)\]", name).group(1)
    return params.split("-", 1)[1] if params[0].isdigit() else params.rsplit("-", 1)[-1]


def main(path: str) -> None:
    with open(path) as f:
        data = json.load(f)
    groups = defaultdict(dict)
    for b in data["benchmarks"]:
        name = b["name"]
        key = re.search(r"\[(.*)\]", name).group(1)
        prov = key if b["group"].startswith("generation") else provider(name)
        groups[b["group"]][prov] = b["stats"]
    p1 = {g.replace("P1", ""): s.get("sdpa") for g, s in groups.items() if g.startswith("regional") and "P1" in g}
    cpu = data["machine_info"].get("cpu", {}).get("brand_raw", "")
    print(f"{cpu}, {data['datetime']}, commit {data['commit_info'].get('id', '')[:7]}")
    for group in sorted(groups):
        stats = groups[group]
        kind = group.split("-")[0]
        peer = None
        if kind == "regional":
            peer = p1.get(re.sub(r"P\d", "", group))
        elif kind == "generation":
            peer = None
        else:
            peer = stats.get(PEERS.get(kind, ""))
        print(f"\n{group}\n\n| provider | median ms | IQR ms | min ms | rounds | ÷ peer median |")
        print("|---|---|---|---|---|---|")
        for prov, s in sorted(stats.items(), key=lambda kv: kv[1]["median"]):
            if kind == "generation":  # the diffusers run with the same number of concepts
                n = prov.rsplit("-", 1)[-1]
                peer = stats.get(f"diffusers-{n}") or stats.get(f"diffusers+peft-{n}")
            ratio = f"{s['median'] / peer['median']:.2f}" if peer else ""
            ms = " | ".join(f"{s[key] * 1e3:.3f}" for key in ("median", "iqr", "min"))
            print(f"| {prov} | {ms} | {s['rounds']} | {ratio} |")


if __name__ == "__main__":
    main(sys.argv[1])

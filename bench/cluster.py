"""The Ray Serve deployment (lifelong_engine.cluster) against the in-process Engine, on the shipped TinyWorld model.

    python bench/cluster.py [--requests 32] [--steps 2] [--clients 16] [--namespaces 24] [--held 6]
                            [--routing-requests 64] [--rounds 3] [--cpus 2]

In one run, on one machine (a local Ray instance with ``--cpus`` logical CPUs; replicas on the CPU, or
one GPU each when the machine has GPUs):

- ``engine``: :class:`lifelong_engine.serving.Engine` in this process: images/s for ``--requests``
  requests submitted at once, and the latency of one request alone;
- ``serve-1`` / ``serve-2``: the HTTP API with 1 and 2 engine replicas, the same requests from
  ``--clients`` client threads: images/s (and the 2 vs 1 ratio), and the latency of one request alone
  over HTTP: its excess over ``engine`` is the HTTP + Ray overhead per request. The three take turns,
  ``--rounds`` times (a shared machine's load drifts), and ratios are medians of per-round ratios;
- routing: ``--routing-requests`` requests over ``--namespaces`` namespaces (one concept each, drawn with
  weights 1/rank) from ``--clients`` threads, each replica holding at most ``--held`` namespaces, with and
  without Serve's multiplexing by namespace: the share of requests whose namespace the serving replica
  already held (``X-Concepts-Cached``).

Every request: 32×32, ``--steps`` steps, guidance 4, the namespace's concepts. Appends JSON lines to
bench/results/<device>/cluster.jsonl.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import random
import socket
import statistics
import tempfile
import time
from pathlib import Path

import common
import torch

common.ensure_engine_importable()
import ray  # noqa: E402
import requests as http  # noqa: E402
from ray import serve  # noqa: E402
from serve import random_concept  # noqa: E402  (bench/serve.py)

from lifelong_engine.cluster import ClusterConfig, build_app  # noqa: E402
from lifelong_engine.serving import Engine, GenerationRequest  # noqa: E402
from lifelong_engine.store import ConceptStore  # noqa: E402
from lifelong_engine.workflows import load_pipeline  # noqa: E402


def body(i: int, namespace: str, steps: int) -> dict:
    return {
        "prompt": f"a thing, picture {i}",
        "namespace": namespace,
        "seed": i,
        "steps": steps,
        "guidance_scale": 4.0,
    }


def engine_request(i: int, namespace: str, steps: int) -> GenerationRequest:
    b = body(i, namespace, steps)
    return GenerationRequest(
        b["prompt"], namespace=namespace, concepts=[f"c-{namespace}"], seed=i, num_inference_steps=steps,
        guidance_scale=b["guidance_scale"],
    )  # fmt: skip


DROPPED = [0]  # connections the server closed without an answer (then sent again), reported with the results


def post(url: str, payload: dict) -> http.Response:
    for attempt in range(3):
        try:
            response = http.post(f"{url}/v1/generate", json=payload, timeout=600)
            break
        except http.ConnectionError:  # seen on this machine at load average ~90: Serve's proxy gave up
            DROPPED[0] += 1
            if attempt == 2:
                raise
    if response.status_code != 200:
        raise RuntimeError(f"HTTP {response.status_code}: {response.text[:300]}")
    return response


def measure(provider, namespaces: list[str], n: int, steps: int, clients: int) -> dict:
    """One round for ``provider`` (an Engine, or a base URL): the latency of single requests one after
    another (median of 3), then images/s for ``n`` requests at once (the Engine: all submitted together;
    HTTP: from ``clients`` threads)."""

    def one(i: int):
        namespace = namespaces[i % len(namespaces)]
        if isinstance(provider, Engine):
            return provider.generate([engine_request(i, namespace, steps)])[0]
        return post(provider, body(i, namespace, steps))

    def many():
        if isinstance(provider, Engine):
            provider.generate([engine_request(i, namespaces[i % len(namespaces)], steps) for i in range(n)])
            return
        with concurrent.futures.ThreadPoolExecutor(clients) as pool:
            list(pool.map(one, range(n)))

    single = []
    for i in range(3):
        t0 = time.perf_counter()
        one(i)
        single.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    many()
    wall = time.perf_counter() - t0
    return {"images_per_second": n / wall, "single_ms": statistics.median(single) * 1e3}


def run_routing(url: str, namespaces: list[str], n: int, steps: int, clients: int) -> dict:
    rng = random.Random(0)
    drawn = rng.choices(namespaces, weights=[1 / (k + 1) for k in range(len(namespaces))], k=n)
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        answers = list(pool.map(lambda a: post(url, body(a[0], a[1], steps)), enumerate(drawn)))
    hits = sum(r.headers["X-Concepts-Cached"] == "1" for r in answers)
    return {"hit_rate": hits / n, "hits": hits, "distinct_namespaces": len(set(drawn))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--throughput-namespaces", type=int, default=4)
    parser.add_argument("--namespaces", type=int, default=24)
    parser.add_argument("--held", type=int, default=6, help="namespaces a replica keeps (routing part)")
    parser.add_argument("--routing-requests", type=int, default=64)
    parser.add_argument("--cpus", type=int, default=2, help="logical CPUs of the local Ray instance")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the three providers in turn")
    parser.add_argument("--out", type=Path, default=None, help="default: bench/results/<device>")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    info, env = common.describe_device(device), common.environment(argv)
    case = f"tinyworld requests={args.requests} steps={args.steps} clients={args.clients}"
    records = []
    with tempfile.TemporaryDirectory() as tmp, ConceptStore(Path(tmp) / "store") as store:
        lp = load_pipeline("tinyworld", device=device)
        namespaces = [f"user{k}" for k in range(args.namespaces)]
        for k, namespace in enumerate(namespaces):
            store.save(random_concept(lp.unet, lp.text.token_width, f"c-{namespace}", seed=k), namespace)
        hot = namespaces[: args.throughput_namespaces]
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            base = ClusterConfig(store=str(Path(tmp) / "store"), cpus_per_replica=0, namespaces_per_replica=args.held)
            urls = {}
            for name, replicas, multiplex in (("r2", 2, True), ("r2-any", 2, False), ("r1", 1, True)):
                print(f"serve {name}: starting ...", flush=True)
                serve.run(build_app(dataclasses.replace(base, replicas=replicas, multiplex=multiplex)), name=name,
                          route_prefix=f"/{name}")  # fmt: skip
                urls[name] = f"http://127.0.0.1:{port}/{name}"
            for name in ("r2", "r2-any"):  # routing first, on replicas that hold nothing yet
                routing = run_routing(urls[name], namespaces, args.routing_requests, args.steps, args.clients)
                provider = "routing-multiplexed" if name == "r2" else "routing-any-replica"
                records.append({"provider": provider, "replicas": 2, **routing})
            serve.delete("r2-any")
            # throughput and latency: the three providers in turn, --rounds times (a shared machine's load
            # drifts; each round compares them under about the same load)
            with Engine(lp, store, max_batch_rows=16) as engine:
                providers = {"engine": engine, "serve-1": urls["r1"], "serve-2": urls["r2"]}
                for provider in providers.values():  # warm: every hot namespace loaded, routes known
                    measure(provider, hot, len(hot), args.steps, 1)
                time.sleep(2)
                rounds = {name: [] for name in providers}
                for r in range(args.rounds):
                    for name, provider in providers.items():
                        print(f"round {r}: {name} ...", flush=True)
                        rounds[name].append(measure(provider, hot, args.requests, args.steps, args.clients))
        finally:
            serve.shutdown()
            ray.shutdown()
    for name, results in rounds.items():
        records.append({
            "provider": name, "replicas": {"engine": 0, "serve-1": 1, "serve-2": 2}[name],
            "images_per_second": statistics.median(x["images_per_second"] for x in results),
            "single_ms": statistics.median(x["single_ms"] for x in results), "rounds": results,
        })  # fmt: skip

    def ratio(a: str, b: str, key: str) -> float:  # the median over rounds of the per-round ratio
        return statistics.median(x[key] / y[key] for x, y in zip(rounds[a], rounds[b]))

    by = {r["provider"]: r for r in records}
    records.append({
        "provider": "summary",
        "serve2_vs_serve1_images_per_second": ratio("serve-2", "serve-1", "images_per_second"),
        "serve1_vs_engine_images_per_second": ratio("serve-1", "engine", "images_per_second"),
        "http_ray_overhead_ms": statistics.median(
            x["single_ms"] - y["single_ms"] for x, y in zip(rounds["serve-1"], rounds["engine"])
        ),
        "hit_rate_multiplexed": by["routing-multiplexed"]["hit_rate"],
        "hit_rate_any_replica": by["routing-any-replica"]["hit_rate"],
        "connections_dropped_and_resent": DROPPED[0],
    })  # fmt: skip
    writer = common.ResultWriter(args.out or common.BENCH_DIR / "results" / info.slug)
    for rec in records:
        writer.write({"subject": "cluster", "case": case, "namespaces": args.namespaces, "held": args.held,
                      "routing_requests": args.routing_requests, **rec, **info.as_record(), **env})  # fmt: skip
        print({k: round(v, 4) if isinstance(v, float) else v for k, v in rec.items()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

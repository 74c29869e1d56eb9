"""The Ray Serve deployment (lifelong_engine.cluster) against the in-process Engine, on the shipped TinyWorld model.

    python bench/cluster.py [--requests 48] [--steps 2] [--clients 16] [--namespaces 24] [--held 6]
                            [--routing-requests 96] [--cpus 2]

In one run, on one machine (a local Ray instance with ``--cpus`` logical CPUs; replicas on the CPU, or
one GPU each when the machine has GPUs):

- ``engine``: :class:`lifelong_engine.serving.Engine` in this process: images/s for ``--requests``
  requests submitted at once, and the latency of one request alone (median of 5);
- ``serve-1`` / ``serve-2``: the HTTP API with 1 and 2 engine replicas, the same requests from
  ``--clients`` client threads: images/s (and the 2 vs 1 ratio), and the latency of one request alone
  over HTTP: its excess over ``engine`` is the HTTP + Ray overhead per request;
- routing: ``--routing-requests`` requests over ``--namespaces`` namespaces (one concept each, drawn with
  weights 1/rank), each replica holding at most ``--held`` namespaces, with and without Serve's
  multiplexing by namespace: the share of requests whose namespace the serving replica already held.

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


def run_engine(lp, store, namespaces: list[str], n: int, steps: int) -> dict:
    def request(i: int) -> GenerationRequest:
        b = body(i, namespaces[i % len(namespaces)], steps)
        return GenerationRequest(
            b["prompt"], namespace=b["namespace"], concepts=[f"c-{b['namespace']}"], seed=i, num_inference_steps=steps,
            guidance_scale=4.0,
        )  # fmt: skip

    with Engine(lp, store, max_batch_rows=16) as engine:
        engine.generate([request(i) for i in range(len(namespaces))])  # warm: every concept loaded
        single = []
        for i in range(5):
            t0 = time.perf_counter()
            engine.generate([request(i)])
            single.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        engine.generate([request(i) for i in range(n)])
        wall = time.perf_counter() - t0
    return {"images_per_second": n / wall, "wall_s": wall, "single_ms": statistics.median(single) * 1e3}


def post(url: str, payload: dict) -> http.Response:
    response = http.post(f"{url}/v1/generate", json=payload, timeout=600)
    if response.status_code != 200:
        raise RuntimeError(f"HTTP {response.status_code}: {response.text[:300]}")
    return response


def run_http(url: str, namespaces: list[str], n: int, steps: int, clients: int) -> dict:
    for i, namespace in enumerate(namespaces):  # warm: every namespace loaded on some replica
        post(url, body(i, namespace, steps))
    time.sleep(2)  # replicas report what they hold to Serve's routers asynchronously
    single = []
    for i in range(5):
        t0 = time.perf_counter()
        post(url, body(i, namespaces[i % len(namespaces)], steps))
        single.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        list(pool.map(lambda i: post(url, body(i, namespaces[i % len(namespaces)], steps)), range(n)))
    wall = time.perf_counter() - t0
    return {"images_per_second": n / wall, "wall_s": wall, "single_ms": statistics.median(single) * 1e3}


def run_routing(url: str, namespaces: list[str], n: int, steps: int, clients: int) -> dict:
    rng = random.Random(0)
    drawn = rng.choices(namespaces, weights=[1 / (k + 1) for k in range(len(namespaces))], k=n)
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        answers = list(pool.map(lambda a: post(url, body(a[0], a[1], steps)), enumerate(drawn)))
    hits = sum(r.headers["X-Concepts-Cached"] == "1" for r in answers)
    return {"hit_rate": hits / n, "hits": hits, "distinct_namespaces": len(set(drawn))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--throughput-namespaces", type=int, default=4)
    parser.add_argument("--namespaces", type=int, default=24)
    parser.add_argument("--held", type=int, default=6, help="namespaces a replica keeps (routing part)")
    parser.add_argument("--routing-requests", type=int, default=96)
    parser.add_argument("--cpus", type=int, default=2, help="logical CPUs of the local Ray instance")
    parser.add_argument("--out", type=Path, default=None, help="default: bench/results/<device>")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    info, env = common.describe_device(device), common.environment(argv)
    case = f"tinyworld requests={args.requests} steps={args.steps} clients={args.clients}"
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        lp = load_pipeline("tinyworld", device=device)
        width = lp.text.token_width
        namespaces = [f"user{k}" for k in range(args.namespaces)]
        with ConceptStore(Path(tmp) / "store") as store:
            for k, namespace in enumerate(namespaces):
                store.save(random_concept(lp.unet, width, f"c-{namespace}", seed=k), namespace)
            hot = namespaces[: args.throughput_namespaces]
            print("engine in-process ...", flush=True)
            records.append({"provider": "engine", **run_engine(lp, store, hot, args.requests, args.steps)})
        del lp
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            base = ClusterConfig(store=str(Path(tmp) / "store"), cpus_per_replica=0, namespaces_per_replica=args.held)
            for replicas, multiplex in ((2, True), (2, False), (1, True)):
                name = f"r{replicas}{'' if multiplex else '-any'}"
                print(f"serve {name}: starting ...", flush=True)
                config = dataclasses.replace(base, replicas=replicas, multiplex=multiplex)
                serve.run(build_app(config), name=name, route_prefix=f"/{name}")
                url = f"http://127.0.0.1:{port}/{name}"
                routing = run_routing(url, namespaces, args.routing_requests, args.steps, args.clients)
                records.append({"provider": f"routing-{'multiplexed' if multiplex else 'any-replica'}",
                                "replicas": replicas, **routing})  # fmt: skip
                if multiplex:
                    out = run_http(url, hot, args.requests, args.steps, args.clients)
                    records.append({"provider": f"serve-{replicas}", "replicas": replicas, **out})
                serve.delete(name)
        finally:
            serve.shutdown()
            ray.shutdown()
    by = {r["provider"]: r for r in records}
    summary = {
        "provider": "summary",
        "serve2_vs_serve1_images_per_second": by["serve-2"]["images_per_second"] / by["serve-1"]["images_per_second"],
        "serve1_vs_engine_images_per_second": by["serve-1"]["images_per_second"] / by["engine"]["images_per_second"],
        "http_ray_overhead_ms": by["serve-1"]["single_ms"] - by["engine"]["single_ms"],
        "hit_rate_multiplexed": by["routing-multiplexed"]["hit_rate"],
        "hit_rate_any_replica": by["routing-any-replica"]["hit_rate"],
    }
    records.append(summary)
    writer = common.ResultWriter(args.out or common.BENCH_DIR / "results" / info.slug)
    for rec in records:
        writer.write({"subject": "cluster", "case": case, "namespaces": args.namespaces, "held": args.held,
                      "routing_requests": args.routing_requests, **rec, **info.as_record(), **env})  # fmt: skip
        print({k: round(v, 4) if isinstance(v, float) else v for k, v in rec.items()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Serving benchmark: N concurrent requests, each with its own concepts and regions, served by the
engine's step-batched ``Engine`` and by diffusers + peft request by request.

    python bench/serve.py [--model tinyworld|sd15] [--requests 16] [--concepts 8] [--steps 20] [--device D]

Every request uses 1–3 of ``--concepts`` random concepts (rank-4 LoRA on every cross-attention
K/V, two token words) and 0–2 regions, with its own seed; all arrive at once. Providers:

- ``engine``: :class:`lifelong_engine.serving.Engine` over a LifelongPipeline, concepts loaded by
  name from a ConceptStore (device slots over a host cache over the store);
- ``diffusers+peft``: the diffusers pipeline with every concept loaded once up front as a peft
  adapter (``load_lora_weights``) and a textual-inversion token; per request ``set_adapters`` with
  its concepts, then the pipeline call, or with regions the same U+2 noise estimates (uncond,
  global, one per region prompt) in one UNet call per step, aggregated as the engine does
  (E* = α·E + Σ (1−α)·E_u ⊙ m_u) but without regional attention.

Reports images/s, p50/p95 latency (arrival to image), adapter switch cost (peft ``set_adapters``;
the engine's concept acquire from host cache and when resident) and bytes per resident concept.
``--model sd15`` is the SD-1.5 architecture with random weights (512², meant for a GPU);
``tinyworld`` is the shipped TinyWorld model (32², runs on a CPU). Appends a JSON line per provider
to bench/results/<device>/serve.jsonl.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import common
import numpy as np
import torch
from tqdm.auto import tqdm

common.ensure_engine_importable()
from lifelong_engine import ConceptAdapter, ConceptStore, LifelongPipeline  # noqa: E402
from lifelong_engine.formats import attn2_layers, export_lora  # noqa: E402
from lifelong_engine.serving import Engine, GenerationRequest  # noqa: E402

NAMESPACE = "bench"
BOXES = ((0.0, 0.0, 0.5, 1.0), (0.5, 0.0, 1.0, 1.0), (0.25, 0.25, 0.75, 0.75))


def build(model: str, device: torch.device, dtype: torch.dtype, weights: str | None = None):
    """A diffusers StableDiffusionPipeline and its image side."""
    if model == "tinyworld":
        from lifelong_engine.tinyworld.model import load_tinyworld_pipeline

        pipe = load_tinyworld_pipeline(device, weights, dtype=dtype)
        pipe.set_progress_bar_config(disable=True)
        return pipe, 32
    import train as train_bench  # bench/train.py: the SD-1.5 architecture with random weights

    spec = train_bench.MODELS["sd15"]
    return train_bench.build_pipeline(spec, spec.resolution, device, dtype, seed=0), spec.resolution


def random_concept(unet, text_width: int, name: str, seed: int, rank: int = 4) -> ConceptAdapter:
    g = torch.Generator().manual_seed(seed)
    modules = dict(unet.named_modules())
    layers = attn2_layers(unet)
    lora = {}
    for layer in layers:
        for proj in ("to_k", "to_v"):
            lin = modules[f"{layer}.{proj}"]
            a = torch.randn(rank, lin.in_features, generator=g) / lin.in_features**0.5
            lora[f"{layer}.{proj}.lora_A.weight"] = a
            lora[f"{layer}.{proj}.lora_B.weight"] = torch.randn(lin.out_features, rank, generator=g) * 0.05
    return ConceptAdapter(
        name=name,
        token=f"<{name}>",
        words=[f"<{name}>", f"<{name}>_1"],
        layers=layers,
        lora=lora,
        rank=rank,
        class_word="object",
        token_embeddings=torch.randn(len(layers), 2, text_width, generator=g) * 0.02,
        method="cidm",
    )


def make_requests(n: int, names: list[str], steps: int, guidance: float, seed: int) -> list[GenerationRequest]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        k = int(rng.integers(1, min(3, len(names)) + 1))
        chosen = [names[j] for j in rng.choice(len(names), size=k, replace=False)]
        regions = [(f"a <{c}> object", BOXES[k]) for k, c in enumerate(chosen[: int(rng.integers(0, 3))])]
        prompt = "a photo of " + " and ".join(f"a <{c}> object" for c in chosen)
        out.append(GenerationRequest(prompt, concepts=chosen, namespace=NAMESPACE, regions=regions or None,
                                     seed=seed + i, num_inference_steps=steps, guidance_scale=guidance))  # fmt: skip
    return out


# ----------------------------------------------------------------------------------------- engine


def run_engine(lp, store, requests, max_batch_rows: int) -> dict:
    with Engine(lp, store, max_batch_rows=max_batch_rows, max_queue=len(requests)) as engine:
        engine.generate(requests[:1])  # warm-up: first-call costs are not what serving pays
        t0 = time.perf_counter()
        futures = [engine.submit(r) for r in requests]
        results = [f.result() for f in tqdm(futures, desc="engine")]
        wall = time.perf_counter() - t0
        cache = engine.cache
        (key,) = cache.resolve([(NAMESPACE, requests[0].concepts[0])])
        switch_resident = common.median_ms(lambda: (cache.acquire([key]), cache.release([key])), 20)
        per_concept = cache.host(key).nbytes
    return {
        "wall_s": wall,
        "latencies": [r.timings["total"] for r in results],
        "switch_ms": switch_resident,
        "switch_note": "acquire + release of a resident concept (store and host-cache loads happen at admission)",
        "bytes_per_concept_device": cache.entry_bytes,
        "bytes_per_concept_host": per_concept,
    }


# ----------------------------------------------------------------------------------------- baseline


def load_peft(pipe, concepts: list[ConceptAdapter], tmp: Path) -> float:
    """Every concept as a peft adapter and a textual-inversion token; returns the seconds it took."""
    t0 = time.perf_counter()
    for c in concepts:
        path = export_lora(c, tmp / f"{c.name}.safetensors")
        pipe.load_lora_weights(str(path), adapter_name=c.name.replace("-", "_"))
        pipe.load_textual_inversion(c.token_embeddings[0].to(pipe.text_encoder.dtype), token=c.token,
                                    tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder)  # fmt: skip
    return time.perf_counter() - t0


@torch.no_grad()
def _regional(pipe, r: GenerationRequest, side: int, alpha: float):
    """The request's U+2 noise estimates in one UNet call per step, aggregated like the engine's E*."""
    device = pipe.unet.device
    prompts = [r.prompt, *(p for p, _ in r.regions)]
    pos, neg = pipe.encode_prompt(prompts, device, 1, True, negative_prompt=[""] * len(prompts))
    emb = torch.cat([neg[:1], pos])
    g = torch.Generator(device).manual_seed(r.seed)
    h = side // pipe.vae_scale_factor
    latents = torch.randn((1, pipe.unet.config.in_channels, h, h), generator=g, device=device, dtype=emb.dtype)
    pipe.scheduler.set_timesteps(r.num_inference_steps, device=device)
    latents = latents * pipe.scheduler.init_noise_sigma
    masks = torch.zeros(len(r.regions), 1, h, h, device=device, dtype=emb.dtype)
    for u, (_, (x0, y0, x1, y1)) in enumerate(r.regions):
        masks[u, :, round(y0 * h) : round(y1 * h), round(x0 * h) : round(x1 * h)] = 1
    s = r.guidance_scale
    for t in pipe.scheduler.timesteps:
        x = pipe.scheduler.scale_model_input(latents.expand(len(emb), -1, -1, -1), t)
        eps = pipe.unet(x, t, encoder_hidden_states=emb).sample
        guided = eps[:1] + s * (eps[1:] - eps[:1])
        e = alpha * guided[:1] + ((1 - alpha) * guided[1:] * masks).sum(0, keepdim=True)
        latents = pipe.scheduler.step(e, t, latents).prev_sample
    image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    return pipe.image_processor.postprocess(image, output_type="pil")


def run_baseline(pipe, requests, side: int, alpha: float) -> dict:
    switch = []

    def one(r: GenerationRequest):
        t0 = time.perf_counter()
        pipe.set_adapters([c.replace("-", "_") for c in r.concepts], [1.0] * len(r.concepts))
        switch.append(time.perf_counter() - t0)
        if r.regions:
            return _regional(pipe, r, side, alpha)
        g = torch.Generator(pipe.unet.device).manual_seed(r.seed)
        return pipe(r.prompt, num_inference_steps=r.num_inference_steps, guidance_scale=r.guidance_scale,
                    height=side, width=side, generator=g).images  # fmt: skip

    one(requests[0])  # warm-up
    switch.clear()
    t0 = time.perf_counter()
    latencies = []
    for r in tqdm(requests, desc="diffusers+peft"):
        one(r)
        _sync(pipe.unet.device)
        latencies.append(time.perf_counter() - t0)  # every request arrived at t0 and waits its turn
    return {"wall_s": time.perf_counter() - t0, "latencies": latencies, "switch_ms": statistics.median(switch) * 1e3,
            "switch_note": "pipe.set_adapters with the request's concepts"}  # fmt: skip


# ----------------------------------------------------------------------------------------- helpers


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("tinyworld", "sd15"), default="tinyworld")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--concepts", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--alpha", type=float, default=0.7)
    parser.add_argument("--max-batch-rows", type=int, default=64)
    parser.add_argument("--providers", default="engine,diffusers+peft")
    parser.add_argument("--weights", default=None, help="TinyWorld model directory (default: the shipped one)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default=None, help="default: fp16 on CUDA")
    parser.add_argument("--out", type=Path, default=None, help="default: bench/results/<device>")
    args = parser.parse_args(argv)

    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()  # peft's per-adapter notices
    transformers.logging.set_verbosity_error()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[
        args.dtype or ("fp16" if device.type == "cuda" else "fp32")
    ]
    info = common.describe_device(device)
    env = common.environment(argv)
    providers = [p.strip() for p in args.providers.split(",") if p.strip()]
    if args.requests < 1 or args.concepts < 1 or args.steps < 1:
        parser.error("--requests, --concepts and --steps must be at least 1")
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        pipe, side = build(args.model, device, dtype, args.weights)
        width = pipe.text_encoder.get_input_embeddings().weight.shape[1]
        concepts = [random_concept(pipe.unet, width, f"c{i}", seed=i) for i in range(args.concepts)]
        requests = make_requests(args.requests, [c.name for c in concepts], args.steps, args.guidance, seed=0)
        for r in requests:
            r.alpha = args.alpha
        regions = sum(len(r.regions or ()) for r in requests)
        for provider in providers:
            if provider == "engine":
                store = ConceptStore(tmp / "store")
                for c in concepts:
                    store.save(c, NAMESPACE)
                lp = LifelongPipeline.from_pipe(pipe)
                try:
                    out = run_engine(lp, store, requests, args.max_batch_rows)
                finally:
                    lp.restore()
                    store.close()
            elif provider == "diffusers+peft":
                pipe, side = build(args.model, device, dtype, args.weights)  # a clean pipeline for peft
                load_s = load_peft(pipe, concepts, tmp)
                out = run_baseline(pipe, requests, side, args.alpha)
                out["load_all_s"] = load_s
                adapter_params = sum(p.numel() for n, p in pipe.unet.named_parameters() if "lora_" in n)
                out["bytes_per_concept_device"] = adapter_params * dtype.itemsize // len(concepts)
            else:
                parser.error(f"unknown provider {provider!r}")
            lat = sorted(out.pop("latencies"))
            records.append({
                "subject": "serve",
                "provider": provider,
                "case": f"{args.model} requests={args.requests} concepts={args.concepts} steps={args.steps}",
                "model": args.model, "side": side, "requests": args.requests, "concepts": args.concepts,
                "regions_total": regions, "steps": args.steps, "dtype": str(dtype).removeprefix("torch."),
                "images_per_second": args.requests / out["wall_s"],
                "p50_s": float(np.percentile(lat, 50)), "p95_s": float(np.percentile(lat, 95)),
                **out, **info.as_record(), **env,
            })  # fmt: skip
    if len(records) == 2:
        records[0]["speedup_vs_baseline"] = records[0]["images_per_second"] / records[1]["images_per_second"]
    writer = common.ResultWriter(args.out or common.BENCH_DIR / "results" / info.slug)
    for rec in records:
        writer.write(rec)
        print(f"{rec['provider']:16s} {rec['images_per_second']:7.2f} img/s  p50 {rec['p50_s']:.2f} s  "
              f"p95 {rec['p95_s']:.2f} s  switch {rec['switch_ms']:.2f} ms  "
              f"{(rec['bytes_per_concept_device'] or 0) / 2**20:.2f} MiB/concept")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

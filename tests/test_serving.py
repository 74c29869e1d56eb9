"""Engine: step-level batching of requests with different concepts and regions (tiny SD, CPU)."""

import concurrent.futures
import dataclasses
import threading

import numpy as np
import pytest
import torch
from concept_factory import concept_for_unet
from tiny_pipes import tiny_sd_pipeline

from lifelong_engine import ConceptStore, LifelongPipeline
from lifelong_engine.errors import ConceptNotFoundError, EngineBusyError, EngineClosedError
from lifelong_engine.serving import Engine, GenerationRequest

NAMES = ("dog1", "mug2", "cat3")


@pytest.fixture
def lp():
    pipe = tiny_sd_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return LifelongPipeline.from_pipe(pipe)


@pytest.fixture
def store(lp, tmp_path):
    with ConceptStore(tmp_path / "store") as store:
        for seed, name in enumerate(NAMES):
            store.save(concept_for_unet(lp.unet, name, lp.text.token_width, seed=seed, method="cidm"))
        yield store


def request(prompt="a <dog1> dog", concepts=("dog1",), seed=0, steps=4, **kwargs):
    return GenerationRequest(prompt, concepts=concepts, seed=seed, num_inference_steps=steps, **kwargs)


def pixels(result):
    return np.asarray(result.images[0], dtype=np.int16)


def test_batched_equals_alone_and_equals_the_pipeline(lp, store):
    target = request(regions=[("a <dog1>", (0.0, 0.0, 0.5, 1.0))], alpha=0.5, steps=5)
    with Engine(lp, store) as engine:
        alone = engine.generate([target])[0]
    others = [
        request("a <mug2> mug", ("mug2",), seed=3, steps=7),
        request("a <cat3> cat and a <dog1>", ("cat3", "dog1"), seed=4, steps=3),
        request("plain words", (), seed=5, steps=6),
    ]
    with Engine(lp, store, max_batch_rows=16) as engine:
        futures = [engine.submit(r) for r in others[:2]]
        mid = engine.submit(target)  # joins while the others are mid-way
        futures.append(engine.submit(others[2]))
        batched = mid.result()
        assert all(f.result().images for f in futures)
        assert engine.steps < sum(r.num_inference_steps for r in [*others, target])  # steps were shared
    np.testing.assert_allclose(pixels(batched), pixels(alone), atol=2)
    assert set(batched.timings) == {"queued", "prepare", "denoise", "decode", "total"}

    lp.add_concept(store.load("dog1"))
    direct = lp(
        target.prompt,
        regions=target.regions,
        alpha=0.5,
        num_inference_steps=5,
        generator=torch.Generator().manual_seed(0),
    ).images[0]
    np.testing.assert_allclose(np.asarray(direct, dtype=np.int16), pixels(alone), atol=2)


def test_ewa_options_per_request(lp, store):
    """A request's EWA options (the official code's power 4 / "l1", top-k) give the pipeline's image."""
    options = dict(ewa_power=4.0, ewa_norm="l1", ewa_top_k=1)
    target = request("a <dog1> dog and a <mug2> mug", ("dog1", "mug2"), seed=2, **options)
    with Engine(lp, store) as engine:
        served = engine.generate([target, dataclasses.replace(target, ewa_power=2.0, ewa_norm="fro", ewa_top_k=None)])
    for name in ("dog1", "mug2"):
        lp.add_concept(store.load(name))
    direct = lp(target.prompt, num_inference_steps=4, generator=torch.Generator().manual_seed(2), **options).images[0]
    np.testing.assert_allclose(np.asarray(direct, dtype=np.int16), pixels(served[0]), atol=2)
    assert np.abs(pixels(served[0]) - pixels(served[1])).max() > 2  # the options mattered
    with Engine(lp, store) as engine, pytest.raises(ValueError, match="norm"):
        engine.submit(request(ewa_norm="l3")).result()


def test_many_threads_each_request_answered_once(lp, store):
    results, errors = [], []
    with Engine(lp, store, max_batch_rows=8) as engine:

        def client(k):
            try:
                futures = [engine.submit(request(seed=10 * k + i, steps=2 + i % 3)) for i in range(5)]
                results.extend((f, f.result()) for f in futures)
            except Exception as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors and len(results) == 20
    assert len({id(r) for _, r in results}) == 20 and all(f.done() and not f.cancelled() for f, _ in results)


def test_a_bad_request_fails_alone(lp, store, monkeypatch):
    store.save(concept_for_unet(lp.unet, "bad9", lp.text.token_width, seed=9))
    nan = concept_for_unet(lp.unet, "bad9", lp.text.token_width, seed=9)
    nan.lora[next(iter(nan.lora))][0, 0] = float("nan")  # the store refuses such files: slip it in
    real_load = store.load
    monkeypatch.setattr(
        store, "load", lambda name, ns="default", v=None: nan if name == "bad9" else real_load(name, ns, v)
    )
    with Engine(lp, store) as engine:
        good = [engine.submit(request(seed=s)) for s in range(2)]
        unknown = engine.submit(request("a <zzz>", ("zzz",)))
        box = engine.submit(request(regions=[("x", (0.5, 0.0, 0.2, 1.0))]))
        bad = engine.submit(request("a <bad9>", ("bad9",)))
        token = engine.submit(request("a <cat3>", ("dog1",)))
        assert all(f.result().images for f in good)
        with pytest.raises(ConceptNotFoundError):
            unknown.result()
        with pytest.raises(ValueError, match="empty"):
            box.result()
        with pytest.raises(ValueError, match="NaN"):
            bad.result()
        with pytest.raises(ValueError, match="unknown concept token"):
            token.result()


def test_eviction_under_a_tiny_budget_still_answers_correctly(lp, store):
    reqs = [request(f"a <{n}>", (n,), seed=i) for i, n in enumerate(NAMES * 2)]
    with Engine(lp, store) as roomy:
        expected = [pixels(r) for r in roomy.generate(reqs)]
    with Engine(lp, store, device_bytes=1, max_batch_rows=2) as tight:
        assert tight.cache.capacity == 1
        got = [pixels(r) for r in tight.generate(reqs)]
        assert tight.cache.stats["evictions"] >= 4
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g, e, atol=2)


def test_a_concept_learned_again_is_served_at_its_new_version(lp, store):
    """The caches hold (namespace, name, version): a new version saved while the engine runs is what
    the next request gets (the same pixels as a fresh engine), and the old one ages out."""
    width = lp.text.token_width
    with Engine(lp, store) as engine:
        old = pixels(engine.generate([request()])[0])
        assert engine.cache.resident == [("default", "dog1", 1)]
        store.save(concept_for_unet(lp.unet, "dog1", width, seed=11, method="cidm"))  # version 2
        new = pixels(engine.generate([request()])[0])
        assert ("default", "dog1", 2) in engine.cache.resident and engine.cache.stats["store_loads"] == 2
    with Engine(lp, store) as fresh:
        np.testing.assert_allclose(new, pixels(fresh.generate([request()])[0]), atol=2)
    assert np.abs(new - old).max() > 2  # the new version renders differently


def test_the_cache_pins_and_unpins_the_resolved_version(lp, store):
    """acquire / release take the keys resolve() gave: a version saved in between does not make release
    unpin the wrong entry, and an unresolved key is refused by name."""
    with Engine(lp, store) as engine:
        cache = engine.cache
        keys = cache.resolve([("default", "dog1")])
        assert keys == [("default", "dog1", 1)]
        cache.acquire(keys)
        store.save(concept_for_unet(lp.unet, "dog1", lp.text.token_width, seed=11, method="cidm"))  # version 2
        cache.release(keys)
        assert not cache._pins  # the pinned version 1 is free again
        with pytest.raises(ValueError, match="ConceptCache.resolve"):
            cache.acquire([("default", "dog1")])


def test_a_higher_rank_concept_regrows_the_pool_within_its_budget(lp, store):
    """A Custom Diffusion concept (full-rank factors) among rank-2 LoRAs: the pool's rank grows and its
    capacity shrinks so the pool stays inside device_bytes; a request may name the wide one last."""
    width = lp.text.token_width
    store.save(concept_for_unet(lp.unet, "wide4", width, rank=24, seed=7, method="custom-diffusion"))
    mixed = request("a <dog1> and a <wide4>", ("dog1", "wide4"), seed=1)
    with Engine(lp, store) as roomy:
        budget = 12 * roomy.cache.entry_bytes  # twelve entries at rank 4
        expected = pixels(roomy.generate([mixed])[0])
    with Engine(lp, store, device_bytes=budget) as engine:
        cache = engine.cache
        assert cache.capacity == 12 and cache.rank == 4
        engine.generate([request()])
        got = pixels(engine.generate([mixed])[0])
        assert cache.rank == 24 and cache.stats["rank_growths"] == 1
        assert cache.capacity == budget // cache.entry_bytes == 2
        assert cache.pool.nbytes <= budget
    np.testing.assert_allclose(got, expected, atol=2)


def test_attention_guidance_per_request(lp, store):
    """A guided request gives the pipeline's guided image, alone or batched with unguided ones."""
    from lifelong_engine import AttentionGuidance

    options = AttentionGuidance(orthogonal=1.0, steps=2, step_size=5.0)
    guided = request("a <dog1> dog and a <mug2> mug", ("dog1", "mug2"), seed=2, steps=4, attention_guidance=options)
    for name in ("dog1", "mug2"):
        lp.add_concept(store.load(name))
    direct = lp(guided.prompt, num_inference_steps=4, guidance_scale=guided.guidance_scale, attention_guidance=options,
                generator=torch.Generator().manual_seed(2)).images[0]  # fmt: skip
    for name in ("dog1", "mug2"):
        lp.remove_concept(name)
    with Engine(lp, store) as engine:
        others = [engine.submit(request("a <cat3>", ("cat3",), seed=s, steps=5)) for s in (7, 8)]
        batched = engine.submit(guided).result()
        assert all(f.result().guidance_losses is None for f in others)
        bad = engine.submit(request(attention_guidance=options, regions=[("a <dog1>", (0, 0, 0.5, 1))]))
        with pytest.raises(ValueError, match="without regions"):
            bad.result()
    assert len(batched.guidance_losses) == 2 and batched.timings["guidance"] > 0
    np.testing.assert_allclose(pixels(batched), np.asarray(direct, dtype=np.int16), atol=2)


def test_close_drains_or_cancels(lp, store):
    engine = Engine(lp, store, max_batch_rows=2)
    futures = [engine.submit(request(seed=s, steps=6)) for s in range(4)]
    engine.close(drain=True)
    assert all(f.result().images for f in futures)
    with pytest.raises(EngineClosedError):
        engine.submit(request())

    engine = Engine(lp, store, max_batch_rows=2)
    futures = [engine.submit(request(seed=s, steps=40)) for s in range(6)]
    engine.close(drain=False)
    outcomes = []
    for f in futures:
        try:
            f.result(timeout=10)
            outcomes.append("done")
        except concurrent.futures.CancelledError:
            outcomes.append("cancelled")
    assert "cancelled" in outcomes and all(f.done() for f in futures)


def test_cancel_between_steps_and_backpressure(lp, store):
    with Engine(lp, store, max_batch_rows=2, max_queue=1, submit_timeout=0.05) as engine:
        long = engine.submit(request(steps=200))
        while not long.running():
            pass
        with pytest.raises(EngineBusyError, match="queue is full"):
            for s in range(10):  # 2 wait in the worker, 1 in the queue, then submit times out
                engine.submit(request(seed=s, steps=200))
        assert engine.cancel(long)
        with pytest.raises(concurrent.futures.CancelledError):
            long.result(timeout=30)
        engine.close(drain=False)

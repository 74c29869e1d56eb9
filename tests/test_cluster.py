"""Serving and learning on Ray (lifelong_engine.cluster): one local Ray instance for the module (2 logical
CPUs, loopback HTTP), the shipped TinyWorld model, two CPU engine replicas, real HTTP requests.

Slow on a small CPU (starting Ray Serve and three model replicas takes minutes there): the whole module
shares one Ray session, and each test sends small requests (32×32 images, 1–2 steps)."""

import base64
import concurrent.futures
import dataclasses
import io
import json
import os
import signal
import socket
import time

import numpy as np
import pytest

ray = pytest.importorskip("ray")
requests = pytest.importorskip("requests")
from concept_factory import concept_for_unet, make_adapter  # noqa: E402
from ray import serve  # noqa: E402

from lifelong_engine.cluster import ClusterConfig, build_app  # noqa: E402
from lifelong_engine.serving import Engine, GenerationRequest  # noqa: E402
from lifelong_engine.store import ConceptStore  # noqa: E402
from lifelong_engine.workflows import load_pipeline  # noqa: E402

pytestmark = pytest.mark.slow
APP = "lifelong-test"
NAMESPACES = [f"user{i}" for i in range(6)]
ROUTED = [f"route{i}" for i in range(6)]  # namespaces no request has used before the routing test
TIMEOUT = 240  # seconds any one HTTP call may take here: a regression fails instead of hanging


@pytest.fixture(scope="module")
def lp():
    return load_pipeline("tinyworld", device="cpu")


@pytest.fixture(scope="module")
def store_location(tmp_path_factory):
    """(location, files) of the store every process of the app opens: a PostgreSQL schema of its own with
    a shared files directory when LIFELONG_TEST_POSTGRES_URL reaches a server (as in .ci/run), else a
    directory."""
    from test_store import POSTGRES_URL, _postgres_reachable

    root = tmp_path_factory.mktemp("cluster")
    if _postgres_reachable() is not None:
        yield str(root / "store"), None
        return
    import uuid

    import psycopg

    schema = f"cluster_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(POSTGRES_URL, autocommit=True) as admin:
        admin.execute(f"CREATE SCHEMA {schema}")
    try:
        url = f"{POSTGRES_URL}{'&' if '?' in POSTGRES_URL else '?'}options=-csearch_path%3D{schema}"
        yield url, str(root / "files")
    finally:
        with psycopg.connect(POSTGRES_URL, autocommit=True) as admin:
            admin.execute(f"DROP SCHEMA {schema} CASCADE")


@pytest.fixture(scope="module")
def cluster(lp, store_location):
    """(base URL, config): the app on a local Ray, concept "dog" in namespace alice, one concept per user
    namespace."""
    location, files = store_location
    with ConceptStore(location, files=files) as store:

        def concept(name, seed):
            return concept_for_unet(
                lp.unet, name, lp.text.token_width, seed=seed, lora_std=1.0, base_fingerprint=lp.fingerprint
            )

        store.save(concept("dog", 0), "alice")
        store.save(concept("good", 1), "mixed")
        store.save(make_adapter("misfit", base_fingerprint=""), "mixed")  # another UNet's shapes
        for i, namespace in enumerate(NAMESPACES + ROUTED):
            store.save(concept(f"thing{i}", 10 + i), namespace)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=256 << 20)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        config = ClusterConfig(
            store=location, files=files, replicas=2, cpus_per_replica=0, learn_cpus=1, learn_retries=1,
            retry_after_s=1,
        )  # fmt: skip
        serve.run(build_app(config), name=APP, route_prefix="/")
        yield f"http://127.0.0.1:{port}", config
    finally:
        serve.shutdown()
        ray.shutdown()


def generate(url, timeout=TIMEOUT, **body):
    return requests.post(f"{url}/v1/generate", json=body, timeout=timeout)


def png_pixels(content: bytes) -> np.ndarray:
    import PIL.Image

    image = PIL.Image.open(io.BytesIO(content))
    assert image.format == "PNG"
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_generate_returns_the_engines_png_with_and_without_the_concept(cluster, lp):
    url, config = cluster
    body = dict(prompt="a dog on grass", namespace="alice", seed=7, steps=2, guidance_scale=2.0)
    with_concept = generate(url, **body)
    assert with_concept.status_code == 200, with_concept.text
    assert with_concept.headers["content-type"] == "image/png"
    assert with_concept.headers["X-Seed"] == "7"
    assert set(json.loads(with_concept.headers["X-Timings"])) >= {"queued", "prepare", "denoise", "decode", "total"}
    without = generate(url, **body, concepts=[])
    assert without.status_code == 200, without.text
    served, plain = png_pixels(with_concept.content), png_pixels(without.content)
    assert served.shape == (32, 32, 3)
    assert np.abs(served - plain).max() > 10  # the concept changes the image

    # the same request in-process: the served image is the Engine's image
    with config.open_store() as store, Engine(lp, store) as engine:
        request = GenerationRequest(
            "a dog on grass", concepts=["dog"], namespace="alice", seed=7, num_inference_steps=2, guidance_scale=2.0
        )
        local = np.asarray(engine.generate([request])[0].images[0], dtype=np.int16)
    np.testing.assert_allclose(served, local, atol=2)

    b64 = generate(url, **body, response_format="base64")
    assert b64.status_code == 200
    payload = b64.json()
    np.testing.assert_array_equal(png_pixels(base64.b64decode(payload["image"])), served)
    assert payload["seed"] == 7 and payload["replica"]


@pytest.mark.parametrize(
    "body, status, words",
    [
        ({"prompt": "x", "steps": 0}, 400, "num_inference_steps=0"),
        ({"prompt": "x", "height": -16}, 400, "height"),
        ({"prompt": "x", "regions": [{"prompt": "a", "box": [0.7, 0.2, 0.5, 0.9]}]}, 400, "box"),
        ({"prompt": "x", "namespace": "alice", "concepts": ["nope"]}, 404, "alice/nope"),
        ({"prompt": "x", "namespace": "../etc"}, 400, "namespace '../etc'"),
        ({"prompt": "x", "stepz": 3}, 422, "stepz"),
        ({"prompt": 5}, 422, "prompt"),
        ({"steps": 2}, 422, "prompt"),
        ({"prompt": "x", "seed": 2**70}, 400, "seed"),
    ],
)
def test_bad_requests_get_a_4xx_naming_the_problem(cluster, body, status, words):
    url, _ = cluster
    response = generate(url, **body)
    assert response.status_code == status, response.text
    assert words in response.json()["error"]


def test_a_concept_that_does_not_fit_fails_alone(cluster):
    """A namespace holding a concept of another model: requests that use it get a 400 naming it, the
    namespace's other concepts are still served (before, loading the namespace failed every request)."""
    url, _ = cluster
    good = generate(url, prompt="a <good> thing", namespace="mixed", concepts=["good"], seed=0, steps=1)
    assert good.status_code == 200, good.text
    for concepts in (["misfit"], None):  # None: every concept of the namespace
        response = generate(url, prompt="a thing", namespace="mixed", concepts=concepts, seed=0, steps=1)
        assert response.status_code == 400, response.text
        assert "concept 'misfit'" in response.json()["error"]


def test_routes_and_methods(cluster):
    url, _ = cluster
    assert requests.get(f"{url}/healthz", timeout=TIMEOUT).json()["status"] == "ok"
    names = {
        (c["namespace"], c["name"]) for c in requests.get(f"{url}/v1/concepts", timeout=TIMEOUT).json()["concepts"]
    }
    assert ("alice", "dog") in names and len(names) == 3 + len(NAMESPACES) + len(ROUTED)
    alice = requests.get(f"{url}/v1/concepts", params={"namespace": "alice"}, timeout=TIMEOUT).json()["concepts"]
    assert [(c["name"], c["version"]) for c in alice] == [("dog", 1)]
    assert requests.get(f"{url}/v1/generate", timeout=TIMEOUT).status_code == 405
    assert requests.get(f"{url}/v2/nothing", timeout=TIMEOUT).status_code == 404
    assert requests.post(f"{url}/v1/generate", data=b"{not json", timeout=TIMEOUT).status_code == 422
    assert requests.get(f"{url}/v1/jobs/unknown", timeout=TIMEOUT).status_code == 404


def test_hundreds_of_concurrent_requests_are_each_answered_once(cluster):
    """200 requests from 24 client threads, every 10th a bad one: each good one gets its own image (its
    seed back), each bad one a 400, none is lost or answered twice."""
    url, _ = cluster

    def call(i):
        bad = i % 10 == 0
        body = dict(prompt=f"a thing number {i}", namespace=NAMESPACES[i % len(NAMESPACES)], seed=i, steps=1)
        body.update(guidance_scale=1.0, concepts=[] if i % 2 else None)
        if bad:
            body["steps"] = 0
        response = generate(url, **body)
        return i, bad, response.status_code, response.headers.get("X-Seed")

    with concurrent.futures.ThreadPoolExecutor(24) as pool:
        answers = list(pool.map(call, range(200)))
    assert sorted(i for i, *_ in answers) == list(range(200))
    for i, bad, status, seed in answers:
        if bad:
            assert status == 400, (i, status)
        else:
            assert (status, seed) == (200, str(i)), (i, status, seed)


def test_multiplexing_sends_a_namespaces_requests_to_the_replica_holding_it(cluster):
    url, _ = cluster
    namespaces = ROUTED
    for namespace in namespaces:  # load each namespace somewhere
        assert generate(url, prompt="a thing", namespace=namespace, seed=0, steps=1).status_code == 200
    time.sleep(3)  # replicas report the namespaces they hold to Serve's routers asynchronously
    replicas, hits = {}, 0
    for _ in range(3):
        for namespace in namespaces:
            response = generate(url, prompt="a thing", namespace=namespace, seed=1, steps=1)
            assert response.status_code == 200, response.text
            replicas.setdefault(namespace, set()).add(response.headers["X-Replica"])
            hits += response.headers["X-Concepts-Cached"] == "1"
    assert all(len(r) == 1 for r in replicas.values()), replicas  # one replica per namespace
    assert hits == 3 * len(namespaces)  # every repeat found its namespace already loaded


def _learn(url, name, namespace, color, steps=2):
    import PIL.Image

    images = []
    for shade in (0, 40):
        buffer = io.BytesIO()
        PIL.Image.new("RGB", (32, 32), tuple(min(255, c + shade) for c in color)).save(buffer, "PNG")
        images.append(base64.b64encode(buffer.getvalue()).decode())
    body = dict(name=name, class_word="ball", namespace=namespace, images=images, steps=steps, batch_size=2)
    response = requests.post(f"{url}/v1/concepts/learn", json=body, timeout=TIMEOUT)
    assert response.status_code == 202, response.text
    return response.json()["job"]


def _wait(url, job, states=("done", "failed"), timeout=600.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        record = requests.get(f"{url}/v1/jobs/{job}", timeout=TIMEOUT).json()
        if record["state"] in states:
            return record
        time.sleep(0.5)
    raise AssertionError(f"job {job} still {record['state']} after {timeout} s")


def test_a_concept_learned_again_is_served_at_its_new_version(cluster, lp):
    """A replica that holds a namespace serves a newer version of one of its concepts (and a concept new
    to it) from the next request on, not the copy it loaded with the namespace."""
    url, config = cluster

    def concept(name, seed):
        return concept_for_unet(
            lp.unet, name, lp.text.token_width, seed=seed, lora_std=1.0, base_fingerprint=lp.fingerprint
        )

    body = dict(prompt="a pet on grass", namespace="relearn", seed=3, steps=2, guidance_scale=2.0)
    with config.open_store() as store:
        store.save(concept("pet", 40), "relearn")
        first = generate(url, **body)  # a replica now holds namespace relearn with pet v1
        assert first.status_code == 200, first.text
        store.save(concept("pet", 41), "relearn")  # learned again: v2
        store.save(concept("toy", 42), "relearn")  # and a concept new to the namespace
        again = [generate(url, **body) for _ in range(3)]
        with Engine(lp, store) as engine:
            request = GenerationRequest("a pet on grass", concepts=["pet", "toy"], namespace="relearn", seed=3,
                                        num_inference_steps=2, guidance_scale=2.0)  # fmt: skip
            local = np.asarray(engine.generate([request])[0].images[0], dtype=np.int16)
    assert all(r.status_code == 200 for r in again), [r.text for r in again]
    for response in again:  # whichever replica answers, it renders v2 with the new concept
        np.testing.assert_allclose(png_pixels(response.content), local, atol=2)
    assert np.abs(png_pixels(first.content) - local).max() > 10


def test_learn_jobs_run_in_order_per_namespace_and_in_parallel_across(cluster, tmp_path, capsys):
    import PIL.Image

    from lifelong_engine import cli

    url, config = cluster
    first = _learn(url, "red", "carol", (200, 20, 20))
    second = _learn(url, "blue", "carol", (20, 20, 200))
    for shade in (0, 40):  # the third through the command line
        PIL.Image.new("RGB", (32, 32), (20, 200 + shade // 4, 20)).save(tmp_path / f"{shade}.png")
    args = ["cluster-submit-learn", "green", str(tmp_path), "--class-word", "ball", "--namespace", "dave"]
    assert cli.main([*args, "--url", url, "--steps", "2", "--batch-size", "2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("job ") and "learn dave/green from 2 images" in out
    other = out.split()[1]
    assert requests.get(f"{url}/v1/jobs/{second}", timeout=TIMEOUT).json()["state"] == "queued"  # waits for red
    a, b, c = (_wait(url, job) for job in (first, second, other))
    assert [a["state"], b["state"], c["state"]] == ["done"] * 3, (a, b, c)
    assert b["started"] >= a["finished"]  # one namespace: strictly in order
    assert b["past"] == ["red"] and a["past"] == []  # blue learned with red frozen
    assert c["started"] < a["finished"] and a["started"] < c["finished"]  # two namespaces: at the same time
    with config.open_store() as store:
        assert {(r.namespace, r.name) for r in store.list()} >= {
            ("carol", "red"),
            ("carol", "blue"),
            ("dave", "green"),
        }
        assert store.verify() == []
    # a learned concept is served at once (a namespace no replica held yet)
    response = generate(url, prompt="a <green> ball", namespace="dave", seed=0, steps=1)
    assert response.status_code == 200, response.text


def _task_pids(name: str) -> list[int]:
    """Processes whose command line (Ray's process title) names the task ``name``."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if name.encode() in f.read():
                        pids.append(int(entry))
            except OSError:
                continue
    return pids


def _kill_task(name: str, not_pid: int | None = None, timeout: float = 300.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = [p for p in _task_pids(name) if p != not_pid and p != os.getpid()]
        if pids:
            os.kill(pids[0], signal.SIGKILL)
            return pids[0]
        time.sleep(0.05)
    raise AssertionError(f"no process ran task {name} within {timeout} s")


def test_a_killed_learn_worker_is_retried_then_reported_failed_and_the_store_stays_whole(cluster):
    url, config = cluster
    job = _learn(url, "doomed", "erin", (90, 90, 90), steps=50)
    first = _kill_task(f"learn:{job}")
    _kill_task(f"learn:{job}", not_pid=first)  # the retry (learn_retries=1), killed too
    record = _wait(url, job)
    assert record["state"] == "failed"
    assert "after 2 attempt(s)" in record["error"]
    with config.open_store() as store:
        assert "doomed" not in {r.name for r in store.list("erin")}
        assert store.verify() == []


def test_a_full_engine_queue_answers_503_with_retry_after(cluster):
    """An app whose engine holds one running request and one queued, and does not wait for room: a burst
    gets some images and, for the rest, 503 + Retry-After naming the full queue; nothing is lost."""
    url, config = cluster
    busy = dataclasses.replace(
        config, replicas=1, cpus_per_replica=0, max_batch_rows=1, max_queue=1, submit_timeout=0.0,
        max_ongoing_requests=16, retry_after_s=3,
    )  # fmt: skip
    serve.run(build_app(busy), name="busy", route_prefix="/busy")
    try:

        def call(i):
            response = generate(f"{url}/busy", prompt=f"thing {i}", seed=i, steps=3, guidance_scale=1.0)
            return response.status_code, response.headers.get("Retry-After"), response.text[:300]

        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            answers = list(pool.map(call, range(12)))
    finally:
        serve.delete("busy")
    statuses = [status for status, *_ in answers]
    assert set(statuses) == {200, 503}, answers
    for status, retry_after, text in answers:
        if status == 503:
            assert retry_after == "3" and "the queue is full" in text, (retry_after, text)


def test_a_replica_killed_mid_flight_fails_its_requests_clearly_and_none_hangs(cluster):
    url, _ = cluster

    def call(i):
        response = generate(url, prompt=f"thing {i}", namespace=NAMESPACES[i % 2], seed=i, steps=2)
        return response.status_code, response.headers.get("Retry-After"), response.text[:300]

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(call, i) for i in range(48)]
        time.sleep(1.0)  # let requests reach the replicas
        victims = [a for a in ray.util.list_named_actors(all_namespaces=True) if "EngineReplica" in a["name"]]
        assert len(victims) == 2
        ray.kill(ray.get_actor(victims[0]["name"], namespace=victims[0]["namespace"]), no_restart=True)
        answers = [f.result(timeout=TIMEOUT) for f in futures]  # none hangs
    statuses = [status for status, *_ in answers]
    assert set(statuses) <= {200, 503}, answers
    assert statuses.count(200) > 0
    for status, retry_after, text in answers:
        if status == 503:
            assert retry_after == "1" and "no engine replica could serve the request" in text
    # the surviving replica keeps serving while Serve replaces the dead one (a client retries a 503)
    for _ in range(20):
        response = generate(url, prompt="after", namespace="alice", seed=0, steps=1)
        if response.status_code != 503:
            break
        time.sleep(float(response.headers["Retry-After"]))
    assert response.status_code == 200, response.text

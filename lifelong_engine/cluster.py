"""Serving and concept learning on a Ray cluster (DESIGN §6 "Beyond one machine").

One Ray Serve application, three deployments::

    HTTP ──► Api (FastAPI ingress: validation, JSON/PNG, status codes)
               ├──► EngineReplica × N   one serving.Engine each (one GPU each on GPU machines), concepts
               │                        by namespace through Ray Serve's model multiplexing: the request's
               │                        namespace is the multiplexed model id, so a user's requests go to a
               │                        replica that already holds that user's concepts
               └──► Trainer             learn jobs: one Ray task each (one GPU each on GPU machines),
                                        strictly in order within a namespace, in parallel across namespaces

Every process opens the same concept store (a directory on one machine, or ``postgresql://…`` with a
shared files directory on many): replicas read concepts from it, learn tasks save into it, with the
store's guarantees (a task killed mid-save leaves no partial concept).

HTTP API (JSON in; errors are ``{"error": message}`` with a 4xx for the caller's mistakes, 503 with
Retry-After when the engine's queue stays full or a replica died under the request, 500 only for a bug):

- ``POST /v1/generate``: prompt, negative_prompt, namespace, concepts (default: every concept of the
  namespace learned on this model; ``[]``: none), regions ``[{"prompt", "box": [x0, y0, x1, y1]}]``,
  seed, steps, guidance_scale, alpha, height, width, eta, guidance_rescale, ewa options;
  ``response_format`` "png" (the PNG bytes; headers X-Timings, X-Seed, X-Replica, X-Concepts-Cached)
  or "base64" (JSON: image, timings, seed, replica, cached).
- ``GET /v1/concepts?namespace=…``: the store's concepts (newest versions).
- ``POST /v1/concepts/learn``: name, class_word, namespace, images (base64-encoded image files), method,
  steps, rank, learning_rate, batch_size, seed → 202 ``{"job": id}``; ``GET /v1/jobs/{id}``: its state
  (queued, running, done with the stored version, or failed with the reason).
- ``GET /healthz``: 200 when an engine replica answers.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import dataclasses
import io
import json
import secrets
import socket
import time
import uuid
from typing import Any, Literal

import PIL.Image
import ray
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .concepts import validate_name
from .errors import ConceptNotFoundError, ConceptStoreError, EngineBusyError, EngineClosedError
from .store import ConceptStore
from .workflows import learn_concept, load_pipeline, model_defaults

__all__ = ["ClusterConfig", "build_app", "run", "EngineReplica", "Trainer", "Api"]

# What a learn request may carry: images per concept, pixels per image (decompression bombs are refused).
MAX_LEARN_IMAGES = 64
MAX_IMAGE_PIXELS = 4096 * 4096


@dataclasses.dataclass(frozen=True)
class ClusterConfig:
    """How the application runs. store/files: the concept store every process opens (a directory, or a
    postgresql:// URL with ``files`` its shared directory); model/weights/device: as ``load_pipeline``.

    replicas: engine replicas (ignored with ``autoscaling``, a Ray Serve autoscaling_config such as
    ``{"min_replicas": 1, "max_replicas": 8, "target_ongoing_requests": 8}``); gpus_per_replica: None
    gives 1 when the cluster has GPUs, else 0 (CPU replicas); cpus_per_replica: Ray's logical CPUs.
    max_batch_rows, max_queue, submit_timeout: the Engine's; max_ongoing_requests: requests Serve sends
    one replica at once (they batch in its Engine); max_queued_requests: requests Serve holds waiting for
    a replica before answering 503 (-1: no limit). multiplex: route by namespace (False: any replica,
    for comparison); namespaces_per_replica: namespaces a replica keeps loaded (LRU).
    learn_gpus / learn_cpus: resources of a learn task (None: 1 GPU when the cluster has GPUs);
    learn_retries: how often a learn task whose worker died is run again before the job fails.
    """

    store: str
    files: str | None = None
    model: str = "tinyworld"
    weights: str | None = None
    device: str | None = None
    replicas: int = 1
    autoscaling: dict | None = None
    gpus_per_replica: float | None = None
    cpus_per_replica: float = 1.0
    max_batch_rows: int = 16
    max_queue: int = 64
    submit_timeout: float = 5.0
    max_ongoing_requests: int = 32
    max_queued_requests: int = -1
    multiplex: bool = True
    namespaces_per_replica: int = 64
    learn_gpus: float | None = None
    learn_cpus: float = 1.0
    learn_retries: int = 2
    retry_after_s: int = 2

    def __post_init__(self):
        if not isinstance(self.replicas, int) or self.replicas < 1:
            raise ValueError(f"replicas={self.replicas!r}: expected an integer >= 1")
        if not isinstance(self.namespaces_per_replica, int) or self.namespaces_per_replica < 1:
            raise ValueError(f"namespaces_per_replica={self.namespaces_per_replica!r}: expected an integer >= 1")
        if not isinstance(self.learn_retries, int) or self.learn_retries < 0:
            raise ValueError(f"learn_retries={self.learn_retries!r}: expected an integer >= 0")

    def open_store(self) -> ConceptStore:
        return ConceptStore(self.store, files=self.files)


def _cluster_gpus(wanted: float | None) -> float:
    """``wanted``, or 1 when the Ray cluster has GPUs and 0 when it has none."""
    if wanted is not None:
        return wanted
    return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0


class _Failure(Exception):
    """An HTTP error to answer with: its status and message (and Retry-After for 503)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def _status_of(exc: BaseException) -> int:
    """The HTTP status for an error the engine or the store raised."""
    if isinstance(exc, ConceptNotFoundError):
        return 404
    if isinstance(exc, (EngineBusyError, EngineClosedError)):
        return 503
    if isinstance(exc, (ValueError, TypeError)):
        return 400
    return 500


# ------------------------------------------------------------------ engine replicas


class _Namespace:
    """One namespace's concepts held by a replica (the multiplexed "model"): loaded once from the store,
    dropped when the replica's LRU of namespaces lets it go (Ray Serve calls ``__del__`` then)."""

    def __init__(self, name: str, adapters: dict, versions: dict[str, int], held: dict):
        self.name, self.adapters, self.versions, self._held = name, adapters, versions, held
        held[name] = self

    def __del__(self):
        if self._held.get(self.name) is self:
            del self._held[self.name]


class _ReplicaStore:
    """The store as a replica's Engine sees it: a concept version the replica holds in memory comes from
    there, any other (a concept learned since, or learned again: a newer version) from the store. The
    Engine asks the store's index for the newest version of every concept of a request."""

    def __init__(self, store: ConceptStore, held: dict[str, _Namespace]):
        self.store, self.held = store, held

    def record(self, name: str, namespace: str = "default", version: int | None = None):
        return self.store.record(name, namespace, version)

    def load(self, name: str, namespace: str = "default", version: int | None = None):
        version = self.store.record(name, namespace).version if version is None else version
        namespace_ = self.held.get(namespace)
        if namespace_ is not None and namespace_.versions.get(name) == version:
            return namespace_.adapters[name]
        return self.store.load(name, namespace, version)


@serve.deployment
class EngineReplica:
    """One :class:`~lifelong_engine.serving.Engine` over the configured model, its concepts by namespace."""

    def __init__(self, config: ClusterConfig):
        from .serving import Engine

        self.config = config
        self.pipeline = load_pipeline(config.model, config.weights, config.device)
        self.store = config.open_store()
        self.held: dict[str, _Namespace] = {}
        self.engine = Engine(
            self.pipeline,
            _ReplicaStore(self.store, self.held),
            max_batch_rows=config.max_batch_rows,
            max_queue=config.max_queue,
            submit_timeout=config.submit_timeout,
        )
        self.namespace_loads = 0
        self.replica_id = serve.get_replica_context().replica_id.unique_id

        async def load(namespace: str) -> _Namespace:
            return await asyncio.to_thread(self._load_namespace, namespace)

        # The namespace is the multiplexed model id: Serve's router prefers replicas holding it.
        self.namespace = serve.multiplexed(max_num_models_per_replica=config.namespaces_per_replica)(load)

    def _records(self, namespace: str) -> list:
        """The namespace's newest concept versions learned on this model (the store's index)."""
        fingerprint = self.pipeline.fingerprint
        return [r for r in self.store.list(namespace) if r.base_fingerprint in ("", fingerprint)]

    def _load_namespace(self, namespace: str) -> _Namespace:
        """The namespace's newest concepts learned on this model, from the store. One that does not load
        or does not fit the model is left out of memory, so that it fails alone: a request naming it (or
        all of the namespace) gets its error from the Engine, the others are served."""
        adapters, versions = {}, {}
        for record in self._records(namespace):
            with contextlib.suppress(ValueError, ConceptStoreError):
                adapter = self.store.load(record.name, namespace, record.version)
                self.pipeline.check_adapter(adapter)
                adapters[record.name], versions[record.name] = adapter, record.version
        self.namespace_loads += 1
        return _Namespace(namespace, adapters, versions, self.held)

    async def generate(self, namespace: str, options: dict[str, Any]) -> dict[str, Any]:
        """Render one request: ``{"status": 200, "png", "timings", "seed", "replica", "cached"}``, or
        ``{"status": 4xx/503/500, "error": message}``."""
        from .serving import GenerationRequest

        cached = namespace in self.held
        future = None
        try:
            await self.namespace(namespace)
            options = dict(options)
            if options.get("concepts") is None:  # all of the namespace as it is now, concepts learned since too
                options["concepts"] = [r.name for r in await asyncio.to_thread(self._records, namespace)]
            request = GenerationRequest(namespace=namespace, **options)
            future = await asyncio.to_thread(self.engine.submit, request)
            result = await asyncio.wrap_future(future)
        except asyncio.CancelledError:  # the caller went away: free the engine for others
            if future is not None:
                self.engine.cancel(future)
            raise
        except Exception as exc:
            message = " ".join(str(exc).split()) or type(exc).__name__
            return {"status": _status_of(exc), "error": message, "replica": self.replica_id}
        buffer = io.BytesIO()
        result.images[0].save(buffer, format="PNG")
        return {
            "status": 200,
            "png": buffer.getvalue(),
            "timings": result.timings,
            "seed": request.seed,
            "replica": self.replica_id,
            "cached": cached,
        }

    def stats(self) -> dict[str, Any]:
        """This replica: its id, the namespaces it holds, how many it loaded, its Engine's cache counters."""
        return {
            "replica": self.replica_id,
            "namespaces": sorted(self.held),
            "namespace_loads": self.namespace_loads,
            "engine_steps": self.engine.steps,
            "cache": dict(self.engine.cache.stats),
        }

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close(drain=False, timeout=10)


# ------------------------------------------------------------------ training jobs


@ray.remote
def _learn_task(config: ClusterConfig, spec: dict[str, Any]) -> dict[str, Any]:
    """One learn job on a Ray worker: the namespace's earlier concepts frozen, the new one saved to the store."""
    started = time.time()
    lp = load_pipeline(config.model, config.weights, config.device)
    images = [PIL.Image.open(io.BytesIO(data)).convert("RGB") for data in spec["images"]]
    with config.open_store() as store:
        done = learn_concept(
            lp, store, spec["name"], images, spec["class_word"], spec["namespace"], model=config.model,
            method=spec["method"], rank=spec["rank"], steps=spec["steps"], lr=spec["learning_rate"],
            batch_size=spec["batch_size"], seed=spec["seed"], progress=False,
        )  # fmt: skip
    return {
        "version": done.version,
        "past": done.past,
        "steps": done.stats.steps,
        "loss_before": done.stats.eval_loss_before,
        "loss_after": done.stats.eval_loss_after,
        "started": started,
        "finished": time.time(),
        "host": socket.gethostname(),
    }


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0})
class Trainer:
    """Learn jobs: each one Ray task; a namespace's jobs run one after another in submission order (lifelong
    learning is sequential per user), different namespaces' jobs in parallel, as far as the cluster has
    free resources. A task whose worker dies is run again (``learn_retries``) and then reported failed.
    Job records live in this replica's memory: they are lost if it dies (the store keeps what was learned)."""

    def __init__(self, config: ClusterConfig):
        self.config = config
        self.jobs: dict[str, dict[str, Any]] = {}
        self._last: dict[str, asyncio.Task] = {}  # the latest job of each namespace
        self._resources = {"num_cpus": config.learn_cpus, "num_gpus": _cluster_gpus(config.learn_gpus)}

    async def submit(self, spec: dict[str, Any]) -> dict[str, Any]:
        job_id = uuid.uuid4().hex
        namespace = spec["namespace"]
        self.jobs[job_id] = {
            "job": job_id,
            "namespace": namespace,
            "name": spec["name"],
            "state": "queued",
            "submitted": time.time(),
        }
        previous = self._last.get(namespace)
        self._last[namespace] = asyncio.create_task(self._run(job_id, spec, previous))
        return dict(self.jobs[job_id])

    async def _run(self, job_id: str, spec: dict[str, Any], previous: asyncio.Task | None) -> None:
        job = self.jobs[job_id]
        if previous is not None:  # after the namespace's previous job, whatever its outcome
            await asyncio.wait([previous])
        job["state"] = "running"
        task = _learn_task.options(
            name=f"learn:{job_id}", max_retries=self.config.learn_retries, retry_exceptions=False, **self._resources
        )
        try:
            job.update(await task.remote(self.config, spec), state="done")
        except ray.exceptions.RayTaskError as exc:  # the learning itself raised: the message says why
            cause = exc.cause if exc.cause is not None else exc
            job.update(state="failed", error=" ".join(f"{type(cause).__name__}: {cause}".split())[:2000])
        except Exception as exc:  # the worker died (every retry) or the task could not run
            job.update(
                state="failed",
                error=f"the learn task did not complete after {self.config.learn_retries + 1} attempt(s): "
                + " ".join(str(exc).split())[:2000],
            )
        job["ended"] = time.time()

    def get(self, job_id: str) -> dict[str, Any] | None:
        job = self.jobs.get(job_id)
        return dict(job) if job is not None else None


# ------------------------------------------------------------------ HTTP ingress


class Region(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: str
    box: tuple[float, float, float, float]


class GenerateBody(BaseModel):
    """The JSON body of POST /v1/generate (unknown fields are refused, so a typo is never ignored)."""

    model_config = ConfigDict(extra="forbid")
    prompt: str
    negative_prompt: str | None = None
    namespace: str = "default"
    concepts: list[str] | None = None
    regions: list[Region] | None = None
    seed: int | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    alpha: float = 0.7
    height: int | None = None
    width: int | None = None
    eta: float = 0.0
    guidance_rescale: float = 0.0
    ewa: bool | str | None = None
    ewa_power: float | None = None
    ewa_norm: str | None = None
    ewa_top_k: int | None = None
    response_format: Literal["png", "base64"] = "png"


class LearnBody(BaseModel):
    """The JSON body of POST /v1/concepts/learn: images are base64-encoded image files (PNG, JPEG, ...)."""

    model_config = ConfigDict(extra="forbid")
    name: str
    class_word: str
    images: list[str] = Field(min_length=1, max_length=MAX_LEARN_IMAGES)
    namespace: str = "default"
    method: str = "cidm"
    steps: int | None = Field(default=None, ge=1)
    rank: int = Field(default=4, ge=1)
    learning_rate: float | None = Field(default=None, gt=0)
    batch_size: int | None = Field(default=None, ge=1)
    seed: int | None = 0


def _error(status: int, message: str, retry_after: int | None = None) -> JSONResponse:
    headers = {"Retry-After": str(retry_after)} if status == 503 and retry_after is not None else None
    return JSONResponse({"error": message}, status_code=status, headers=headers)


async def _parse(request: Request, model: type[BaseModel]) -> BaseModel:
    """The request's JSON body as ``model``; a 422 naming every bad field otherwise."""
    try:
        return model.model_validate_json(await request.body())
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}"
            + (f" (got {e['input']!r})"[:120] if e["type"] != "json_invalid" else "")
            for e in exc.errors()
        )
        raise _Failure(422, problems) from None


def _decode_images(images: list[str]) -> list[bytes]:
    """The image files of a learn request, each checked to decode (and not be a decompression bomb)."""
    files = []
    for i, text in enumerate(images):
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise _Failure(400, f"images[{i}]: not valid base64") from None
        try:
            with PIL.Image.open(io.BytesIO(data)) as image:
                pixels = image.width * image.height
                if pixels > MAX_IMAGE_PIXELS:
                    raise _Failure(400, f"images[{i}]: {image.width}x{image.height} is over {MAX_IMAGE_PIXELS} pixels")
                image.verify()
        except _Failure:
            raise
        except Exception as exc:
            raise _Failure(400, f"images[{i}]: not a readable image file ({exc})") from None
        files.append(data)
    return files


def _namespace(name: str) -> str:
    try:
        return validate_name(name, "namespace")
    except (TypeError, ValueError) as exc:
        raise _Failure(400, str(exc)) from None


@serve.deployment(ray_actor_options={"num_cpus": 0})
class Api:
    """The HTTP ingress: validates requests and routes them to the engine replicas and the trainer."""

    def __init__(self, engine: DeploymentHandle, trainer: DeploymentHandle, config: ClusterConfig):
        self.engine, self.trainer, self.config = engine, trainer, config
        self.defaults = model_defaults(config.model)
        self.store = config.open_store()
        self.routes = {
            ("POST", "/v1/generate"): self.generate,
            ("GET", "/v1/concepts"): self.concepts,
            ("POST", "/v1/concepts/learn"): self.learn,
            ("GET", "/healthz"): self.healthz,
        }

    async def __call__(self, request: Request) -> Response:
        path, prefix = request.scope["path"], request.scope.get("root_path", "")
        path = (path.removeprefix(prefix) if prefix else path).rstrip("/") or "/"  # the app's route prefix off
        try:
            if path.startswith("/v1/jobs/") and request.method == "GET":
                return await self.job(path.removeprefix("/v1/jobs/"))
            route = self.routes.get((request.method, path))
            if route is None:
                methods = sorted(m for m, p in self.routes if p == path)
                if methods:
                    raise _Failure(405, f"{request.method} {path}: use {', '.join(methods)}")
                raise _Failure(404, f"{path}: no such endpoint")
            return await route(request)
        except _Failure as f:
            return _error(f.status, f.message, self.config.retry_after_s)

    async def generate(self, request: Request) -> Response:
        body = await _parse(request, GenerateBody)
        namespace = _namespace(body.namespace)
        options = body.model_dump(exclude={"namespace", "response_format", "steps", "guidance_scale", "regions"})
        options["num_inference_steps"] = body.steps if body.steps is not None else self.defaults["inference_steps"]
        options["guidance_scale"] = (
            body.guidance_scale if body.guidance_scale is not None else self.defaults["guidance_scale"]
        )
        options["regions"] = [(r.prompt, r.box) for r in body.regions] if body.regions is not None else None
        if options["seed"] is None:  # chosen here so the answer can say which seed reproduces the image
            options["seed"] = secrets.randbelow(2**31)
        handle = self.engine.options(multiplexed_model_id=namespace) if self.config.multiplex else self.engine
        try:
            out = await handle.generate.remote(namespace, options)
        except ray.exceptions.RayTaskError as exc:  # a bug in the replica's code: say what, never hide it
            raise _Failure(
                500, f"the engine replica failed: {' '.join(str(exc.cause or exc).split())[:1000]}"
            ) from None
        except Exception as exc:  # the replica died under the request, or Serve's queue is full
            message = " ".join(str(exc).split())[:500]
            raise _Failure(
                503, f"no engine replica could serve the request: {type(exc).__name__}: {message}"
            ) from None
        if out["status"] != 200:
            raise _Failure(out["status"], out["error"])
        if body.response_format == "base64":
            image = base64.b64encode(out.pop("png")).decode()
            return JSONResponse({"image": image, **{k: out[k] for k in ("timings", "seed", "replica", "cached")}})
        headers = {
            "X-Timings": json.dumps(out["timings"]),
            "X-Seed": str(out["seed"]),
            "X-Replica": out["replica"],
            "X-Concepts-Cached": "1" if out["cached"] else "0",
        }
        return Response(content=out["png"], media_type="image/png", headers=headers)

    async def concepts(self, request: Request) -> Response:
        namespace = request.query_params.get("namespace")
        if namespace is not None:
            _namespace(namespace)
        try:
            records = await asyncio.to_thread(self.store.list, namespace)
        except ConceptStoreError as exc:
            raise _Failure(500, f"the concept store failed: {exc}") from None
        fields = ("namespace", "name", "version", "token", "class_word", "rank", "method", "created")
        return JSONResponse({"concepts": [{f: getattr(r, f) for f in fields} for r in records]})

    async def learn(self, request: Request) -> Response:
        from .training import methods

        body = await _parse(request, LearnBody)
        namespace = _namespace(body.namespace)
        try:
            validate_name(body.name)
            methods.config(body.method)
        except (TypeError, ValueError, KeyError) as exc:
            raise _Failure(400, " ".join(str(exc).split())) from None
        if not body.class_word.strip():
            raise _Failure(400, "class_word: expected a non-empty word (dog, mug, ...)")
        files = await asyncio.to_thread(_decode_images, body.images)
        spec = body.model_dump(exclude={"images"})
        spec.update(namespace=namespace, images=files)
        job = await self.trainer.submit.remote(spec)
        return JSONResponse(job, status_code=202)

    async def job(self, job_id: str) -> Response:
        job = await self.trainer.get.remote(job_id)
        if job is None:
            raise _Failure(404, f"job {job_id!r}: no such job (job records live as long as the trainer replica)")
        return JSONResponse(job)

    async def healthz(self, request: Request) -> Response:
        try:
            stats = await asyncio.wait_for(self.engine.stats.remote(), timeout=10)
        except Exception as exc:
            raise _Failure(503, f"no engine replica answered: {type(exc).__name__}: {exc}"[:500]) from None
        return JSONResponse({"status": "ok", "replica": stats["replica"]})


# ------------------------------------------------------------------ the application


def build_app(config: ClusterConfig):
    """The Serve application (call within a running Ray: resources default to what the cluster has)."""
    engine_options: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": config.cpus_per_replica, "num_gpus": _cluster_gpus(config.gpus_per_replica)},
        "max_ongoing_requests": config.max_ongoing_requests,
        "max_queued_requests": config.max_queued_requests,
    }
    if config.autoscaling is not None:
        engine_options["autoscaling_config"] = config.autoscaling
    else:
        engine_options["num_replicas"] = config.replicas
    engine = EngineReplica.options(**engine_options).bind(config)
    return Api.bind(engine, Trainer.bind(config), config)


def run(
    config: ClusterConfig,
    address: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    name: str = "lifelong-engine",
    blocking: bool = True,
) -> None:
    """Start (``address`` None: a local Ray instance) or join (``"auto"``, ``"ray://head:10001"``) a Ray
    cluster, serve the application on http://host:port/ and, with ``blocking``, serve until interrupted."""
    if not ray.is_initialized():
        ray.init(address=address)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(config), name=name, route_prefix="/")
    if not blocking:
        return
    with contextlib.suppress(KeyboardInterrupt):
        while True:
            time.sleep(3600)
    serve.delete(name)

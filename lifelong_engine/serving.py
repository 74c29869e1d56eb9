"""Serving: many generation requests with different concepts and regions, batched per step (DESIGN §6).

:class:`Engine` runs one worker thread over a :class:`~lifelong_engine.LifelongPipeline`.
Requests join the running batch between denoising steps and leave when their last step is
done, so requests at different steps share one UNet call per iteration: each row carries its
own timestep, its own cached text K/V (computed once when the request is admitted, with its
own concepts mixed in) and its own region map, and each request keeps its own scheduler (and eta).
The denoising itself is the generation core's (:mod:`lifelong_engine.generation`), the same the
pipeline runs, so a request's image is the pipeline's image, whatever it was batched with (same
seed → same image, to floating-point tolerance).

Concept memory (:class:`ConceptCache`): one :class:`~lifelong_engine.pool.AdapterPool` on the device,
the stacked tensors the fused ops gather from by id, sized by a byte budget with LRU eviction; a host
cache (LRU, byte budget) behind it, and the ConceptStore behind that.

Under load: the queue is bounded (``submit`` blocks up to ``submit_timeout`` and then raises
:class:`~lifelong_engine.errors.EngineBusyError`); a bad request (unknown concept, bad box, NaN
in an adapter) fails alone; ``cancel`` works between steps; ``close`` drains or cancels.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import queue
import threading
import time
from collections.abc import Sequence

import PIL.Image
import torch

from . import generation
from .concepts import PROJECTIONS, ConceptAdapter
from .errors import ConceptNotFoundError, EngineBusyError, EngineClosedError
from .generation import DenoisingState
from .guidance import AttentionGuidance
from .pipeline import LifelongPipeline
from .pool import KV, AdapterPool, Library
from .regions import Box, check_regions

__all__ = ["GenerationRequest", "GenerationResult", "Engine", "ConceptCache"]


@dataclasses.dataclass
class GenerationRequest:
    """One image to generate. concepts: names of the concepts it uses (loaded from the store, in
    ``namespace``); None uses the pipeline's own library. Other fields as in LifelongPipeline.__call__."""

    prompt: str
    negative_prompt: str | None = None
    concepts: Sequence[str] | None = None
    namespace: str | None = None
    regions: Sequence[tuple[str, Box]] | None = None
    seed: int | None = None
    num_inference_steps: int = 30
    guidance_scale: float = 7.5
    alpha: float = 0.7
    height: int | None = None
    width: int | None = None
    ewa_power: float | None = None
    ewa_norm: str | None = None
    ewa_top_k: int | None = None
    ewa: bool | str | None = None
    attention_guidance: AttentionGuidance | None = None
    eta: float = 0.0
    guidance_rescale: float = 0.0


@dataclasses.dataclass
class GenerationResult:
    """images: PIL images; timings: seconds spent queued, preparing (text K/V), denoising, decoding, total
    (and ``guidance``: the attention-guidance forwards and backwards, when the request asked for them);
    guidance_losses: the attention-guidance loss at each guided step, or None."""

    images: list[PIL.Image.Image]
    timings: dict[str, float]
    request: GenerationRequest
    guidance_losses: list[float] | None = None


class ConceptCache:
    """Concepts by (namespace, name, version): device pool ← host LRU ← store.

    Callers name a concept by (namespace, name); :meth:`resolve` turns that into the store's newest
    version at that moment (one index read per concept), so a concept learned again while the engine
    runs is served at its new version from the next request on, and the old version ages out of the
    caches. Namespace "" is the pipeline's own library (version 0).

    The device pool is one :class:`~lifelong_engine.pool.AdapterPool` whose capacity is what
    ``device_bytes`` holds (at least one entry), with LRU eviction on top. Every entry has the pool's
    rank, the highest seen, and the pool's projections (K and V, plus to_q / to_out.0 once a concept
    adapts them): a concept beyond either re-allocates the pool (with fewer entries, so it stays within
    ``device_bytes``). Pinned concepts (those a request is being prepared with, and those an active
    request applies to the image side at every step) are never evicted, and the pool does not
    re-allocate while any is pinned.
    """

    def __init__(
        self, pipeline: LifelongPipeline, store=None, device_bytes: int = 256 << 20, host_bytes: int = 1 << 30
    ):
        self.pipeline, self.store = pipeline, store
        self.device_bytes, self.host_bytes = device_bytes, host_bytes
        self._host: collections.OrderedDict[tuple[str, str, int], ConceptAdapter] = collections.OrderedDict()
        own = list(pipeline.concepts.values())
        self.rank = max([4, *(c.rank for c in own)])
        self.projections = tuple(p for p in PROJECTIONS if p in KV or any(p in c.projections for c in own))
        self.stats = collections.Counter()
        self._alloc()

    def _alloc(self) -> None:
        """(Re)allocate the pool at ``self.rank`` and ``self.projections``, as many entries as
        ``device_bytes`` holds, all empty."""
        lp = self.pipeline
        shape = (len(lp.layers), lp.attention[lp.layers[0]].to_k.in_features)

        def pool(capacity: int) -> AdapterPool:
            return AdapterPool.empty(lp.widths, capacity, self.rank, lp.device, lp.dtype, self.projections, shape)

        self.entry_bytes = self._entry_bytes(shape)
        self.pool = pool(max(1, self.device_bytes // self.entry_bytes))
        self._entry: collections.OrderedDict[tuple[str, str, int], int] = collections.OrderedDict()  # LRU order
        self._device: dict[tuple[str, str, int], ConceptAdapter] = {}
        self._pins: collections.Counter = collections.Counter()

    def _entry_bytes(self, embedding_shape: tuple[int, int]) -> int:
        widths = [w for (_, proj), w in self.pipeline.widths.items() if proj in self.projections]
        factors = sum((din + dout) * self.rank for din, dout in widths) * self.pipeline.dtype.itemsize
        return factors + embedding_shape[0] * embedding_shape[1] * 4

    @property
    def capacity(self) -> int:
        return self.pool.capacity

    @property
    def resident(self) -> list[tuple[str, str, int]]:
        """(namespace, name, version) of the concepts in the device pool, least recently used first."""
        return list(self._entry)

    def resolve(self, keys: list[tuple]) -> list[tuple[str, str, int]]:
        """(namespace, name) → (namespace, name, newest version in the store); resolved keys pass through."""
        out = []
        for key in keys:
            if len(key) == 3:
                out.append(tuple(key))
            elif key[0] == "":
                out.append((key[0], key[1], 0))
            elif self.store is None:
                raise ConceptNotFoundError(f"concept {key[1]!r}: not in the pipeline and the engine has no store")
            else:
                out.append((key[0], key[1], self.store.record(key[1], key[0]).version))
        return out

    def host(self, key: tuple) -> ConceptAdapter:
        """The concept on the host: namespace "" is the pipeline's own library, others come from the store."""
        (key,) = self.resolve([key])
        if key[0] == "":
            return self.pipeline.concepts[key[1]]
        if key in self._host:
            self._host.move_to_end(key)
            self.stats["host_hits"] += 1
            return self._host[key]
        adapter = self.store.load(key[1], key[0], key[2])
        self.pipeline.check_adapter(adapter)
        self.stats["store_loads"] += 1
        self._host[key] = adapter
        while sum(a.nbytes for a in self._host.values()) > self.host_bytes and len(self._host) > 1:
            self._host.popitem(last=False)
        return adapter

    @staticmethod
    def _resolved(keys: list[tuple]) -> list[tuple[str, str, int]]:
        bad = [k for k in keys if len(k) != 3]
        if bad:
            raise ValueError(f"concept keys {bad}: expected (namespace, name, version) from ConceptCache.resolve")
        return [tuple(k) for k in keys]

    def acquire(self, keys: list[tuple[str, str, int]]) -> Library:
        """Place the concepts in the device pool (evicting unpinned LRU ones), pin them, and return the library.
        ``keys`` come from :meth:`resolve`, so that :meth:`release` unpins exactly the versions pinned here
        even when a newer version lands in between."""
        keys = self._resolved(keys)
        hosts = {key: self.host(key) for key in keys if key not in self._entry}
        rank = max((a.rank for a in hosts.values()), default=0)
        wanted = {p for a in hosts.values() for p in a.projections}
        if rank > self.rank or not wanted <= set(self.projections):  # grow first: start over with wider entries
            if self._pins:
                raise ValueError(
                    f"a concept of rank {rank} adapting {sorted(wanted)} cannot join while requests pin the pool "
                    f"(rank {self.rank}, {list(self.projections)})"
                )
            self.rank = max(rank, self.rank)
            self.projections = tuple(p for p in PROJECTIONS if p in self.projections or p in wanted)
            self._alloc()
            self.stats["rank_growths"] += 1
            hosts.update({key: self.host(key) for key in keys if key not in hosts})  # the pool is empty now
        if len(keys) > self.capacity:
            raise ValueError(
                f"request uses {len(keys)} concepts; the device pool holds {self.capacity} (device_bytes)"
            )
        adapters, ids = [], []
        for key in keys:
            if key not in self._entry:
                self._place(key, hosts[key])
                self.stats["device_misses"] += 1
            else:
                self.stats["device_hits"] += 1
            self._entry.move_to_end(key)
            self._pins[key] += 1
            adapters.append(self._device[key])
            ids.append(self._entry[key])
        return Library(adapters, self.pool, torch.tensor(ids, dtype=torch.long, device=self.pipeline.device))

    def release(self, keys: list[tuple[str, str, int]]) -> None:
        for key in self._resolved(keys):
            self._pins[key] -= 1
            if self._pins[key] <= 0:
                del self._pins[key]

    def _place(self, key: tuple[str, str, int], adapter: ConceptAdapter) -> None:
        used = set(self._entry.values())
        free = next((i for i in range(self.capacity) if i not in used), None)
        if free is None:
            victim = next((k for k in self._entry if k not in self._pins), None)
            if victim is None:
                raise ValueError(f"all {self.capacity} device pool entries are in use by requests")
            free = self._entry.pop(victim)
            del self._device[victim]
            self.stats["evictions"] += 1
        self.pool.place(free, adapter, self.pipeline.concept_embedding(adapter))
        self._entry[key] = free
        self._device[key] = adapter


def _settle(future: concurrent.futures.Future, result=None, exc: BaseException | None = None) -> None:
    """Resolve a request's future unless it is already done: the client may cancel a pending future at any
    moment (between a ``done()`` check and the set), and that must not raise inside the worker."""
    with contextlib.suppress(concurrent.futures.InvalidStateError):
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(result)


def _cancel(future: concurrent.futures.Future) -> None:
    """Cancel a request's future: a pending one is cancelled, a running one gets CancelledError."""
    if not future.cancel():
        _settle(future, exc=concurrent.futures.CancelledError())


@dataclasses.dataclass(eq=False)
class _Active:
    request: GenerationRequest
    future: concurrent.futures.Future
    times: dict[str, float]
    state: DenoisingState | None = None
    pinned: list = dataclasses.field(default_factory=list)  # concepts this request reads every step

    @property
    def rows(self) -> int:
        return self.state.rows

    @property
    def size(self) -> tuple[int, int]:
        return self.state.plan.size


class Engine:
    """Step-level batched serving over a LifelongPipeline (see the module docstring).

    max_batch_rows: most UNet rows per step (a request takes 2 + its regions with CFG and alpha < 1);
    max_queue: most requests waiting; submit_timeout: how long ``submit`` blocks on a full queue;
    device_bytes / host_bytes: budgets of the concept caches.
    """

    def __init__(
        self,
        pipeline: LifelongPipeline,
        store=None,
        max_batch_rows: int = 16,
        max_queue: int = 64,
        device=None,
        *,
        submit_timeout: float = 10.0,
        device_bytes: int = 256 << 20,
        host_bytes: int = 1 << 30,
    ):
        for name, value, least in (("max_batch_rows", max_batch_rows, 1), ("max_queue", max_queue, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ValueError(f"{name}={value!r}: expected an integer >= {least}")
        if not isinstance(submit_timeout, (int, float)) or not 0 <= submit_timeout < float("inf"):
            raise ValueError(f"submit_timeout={submit_timeout!r}: expected a finite number of seconds >= 0")
        if device is not None:
            pipeline.pipe.to(device)
        self.pipeline, self.store = pipeline, store
        self.max_batch_rows, self.submit_timeout = max_batch_rows, submit_timeout
        self.cache = ConceptCache(pipeline, store, device_bytes, host_bytes)
        self._queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self._waiting: collections.deque[_Active] = collections.deque()
        self._active: list[_Active] = []
        self._cancel: set[concurrent.futures.Future] = set()
        self._lock = threading.Lock()
        self._closing = False
        self._exited = False  # set (under _lock) when the worker stops taking requests
        self._drain = True
        self._batch = None  # cached batch tensors while the active set does not change
        self.steps = 0
        self._thread = threading.Thread(target=self._run, name="lifelong-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ API

    def submit(self, request: GenerationRequest, timeout: float | None = None) -> concurrent.futures.Future:
        """Queue a request; the future resolves to a :class:`GenerationResult` (or the request's error)."""
        if not isinstance(request, GenerationRequest):
            raise TypeError(f"expected a GenerationRequest, got {type(request).__name__}")
        self._check(request)
        if self._closing:
            raise EngineClosedError("the engine is closed")
        future: concurrent.futures.Future = concurrent.futures.Future()
        item = _Active(request, future, {"submitted": time.perf_counter()})
        try:
            self._queue.put(item, timeout=self.submit_timeout if timeout is None else timeout)
        except queue.Full:
            raise EngineBusyError(
                f"the queue is full ({self._queue.maxsize} requests waiting) and stayed full for "
                f"{self.submit_timeout if timeout is None else timeout} s"
            ) from None
        with self._lock:
            exited = self._exited
        if exited:  # the worker left between the check above and the put: no one else will take it
            self._cancel_queued()
        return future

    def _check(self, req: GenerationRequest) -> None:
        """Raise ValueError naming the field unless the request's options are usable (the pipeline's checks
        plus the Engine's own fields); what needs the concepts or the store is checked when it is prepared."""
        if not isinstance(req.prompt, str) or not req.prompt:
            raise ValueError(f"prompt={req.prompt!r}: expected a non-empty string")
        self.pipeline.check_options(
            req.num_inference_steps, req.guidance_scale, req.alpha, req.height, req.width,
            req.ewa_power, req.ewa_norm, req.ewa_top_k, req.ewa, req.eta, req.guidance_rescale,
        )  # fmt: skip
        if req.concepts is not None:
            if isinstance(req.concepts, str) or not all(isinstance(c, str) for c in req.concepts):
                raise ValueError(f"concepts={req.concepts!r}: expected None or a list of concept names")
            twice = sorted({c for c in req.concepts if list(req.concepts).count(c) > 1})
            if twice:
                raise ValueError(f"concepts names {twice} more than once; name each concept once")
        if req.negative_prompt is not None and not isinstance(req.negative_prompt, str):
            raise ValueError(f"negative_prompt={req.negative_prompt!r}: expected None or a string")
        if req.attention_guidance is not None and not isinstance(req.attention_guidance, AttentionGuidance):
            raise ValueError(f"attention_guidance={req.attention_guidance!r}: expected None or an AttentionGuidance")
        if req.namespace is not None and not isinstance(req.namespace, str):
            raise ValueError(f"namespace={req.namespace!r}: expected None or a string")
        if req.seed is not None and not (isinstance(req.seed, int) and not isinstance(req.seed, bool)
                                         and -(2**63) <= req.seed < 2**64):  # fmt: skip
            raise ValueError(f"seed={req.seed!r}: expected None or an integer in [-2**63, 2**64) (torch's seed range)")

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """Submit every request and wait for all results (raises the first failure)."""
        return [f.result() for f in [self.submit(r) for r in requests]]

    def cancel(self, future: concurrent.futures.Future) -> bool:
        """Cancel a request: at once while queued, else at the next step boundary. False when already done."""
        if future.cancel():
            return True
        if future.done():
            return False
        with self._lock:
            self._cancel.add(future)
        return True

    def close(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop taking requests; finish the queued and running ones (drain) or cancel them."""
        self._closing, self._drain = True, drain
        self._thread.join(timeout)

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---------------------------------------------------------------- worker

    def _run(self) -> None:
        while True:
            try:
                self._admit()
                if not self._active:
                    if self._closing and not self._waiting and self._queue.empty():
                        self._exit()
                        return
                    if not self._waiting:  # idle: block on the queue instead of spinning
                        with contextlib.suppress(queue.Empty):
                            self._waiting.append(self._queue.get(timeout=0.05))
                    continue
                self._step()
            except Exception as exc:  # a bug in a step: fail the running requests, keep serving
                for item in list(self._active):
                    self._finish(item)
                    _settle(item.future, exc=exc)

    def _exit(self) -> None:
        """Stop taking requests: from here on ``submit`` cancels what it queues (see there), and what a
        submit queued before this is cancelled now."""
        with self._lock:
            self._exited = True
        self._cancel_queued()

    def _cancel_queued(self) -> None:
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            _cancel(item.future)

    def _pull(self) -> None:
        """Move queued requests into the worker's waiting list, at most max_batch_rows of them, so a
        saturated engine leaves the bounded queue full (backpressure on submit)."""
        while len(self._waiting) < self.max_batch_rows:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            self._waiting.append(item)

    def _admit(self) -> None:
        self._pull()
        if self._closing and not self._drain:
            for item in [*self._waiting, *self._active]:
                self._finish(item)
                _cancel(item.future)
            self._waiting.clear()
            return
        self._drop_cancelled()
        rows = sum(a.rows for a in self._active)
        size = self._active[0].size if self._active else None
        kept: collections.deque[_Active] = collections.deque()
        try:
            while self._waiting:
                item = self._waiting.popleft()
                if item.future.cancelled():
                    self._finish(item)
                    continue
                if item.state is None and not self._prepare(item):
                    continue  # failed alone
                if (size is not None and item.size != size) or rows + item.rows > self.max_batch_rows:
                    kept.append(item)
                    continue
                if not item.future.set_running_or_notify_cancel():
                    self._finish(item)
                    continue
                item.times["started"] = time.perf_counter()
                self._active.append(item)
                self._batch = None
                rows += item.rows
                size = item.size
        finally:  # requests set aside stay waiting, whatever happened
            kept.extend(self._waiting)
            self._waiting = kept

    def _drop_cancelled(self) -> None:
        with self._lock:
            cancel, self._cancel = self._cancel, set()
        if not cancel:
            return
        for item in [a for a in self._active if a.future in cancel]:
            self._finish(item)
            _settle(item.future, exc=concurrent.futures.CancelledError("cancelled between steps"))

    def _prepare(self, item: _Active) -> bool:
        """Plan, conditioning (text K/V) and denoising state of a request; on a bad request, fail its future
        and return False."""
        lp, req = self.pipeline, item.request
        t0 = time.perf_counter()
        keys: list[tuple[str, str, int]] = []  # resolved: what finally releases
        try:
            regions = check_regions(req.regions, lp.max_regions)
            if req.attention_guidance is not None and regions:
                raise ValueError(
                    "attention_guidance works on prompts without regions (regions already place concepts)"
                )
            size = (req.height or lp.default_size(), req.width or lp.default_size())
            cfg = req.guidance_scale > 1.0
            plan = lp.plan([req.prompt], [req.negative_prompt], regions, 1, cfg, req.alpha, size)
            if plan.rows > self.max_batch_rows:
                raise ValueError(f"the request needs {plan.rows} UNet rows; max_batch_rows is {self.max_batch_rows}")
            if req.concepts is None:
                named = [("", name) for name in lp.concepts]
            else:
                named = [(req.namespace or "default", name) for name in req.concepts]
            keys = self.cache.resolve(named)  # the versions this request uses, pinned and released as such
            library = self.cache.acquire(keys)
            with torch.no_grad():
                cond = generation.condition(
                    lp, plan, library, req.guidance_scale, req.ewa_power, req.ewa_norm, req.ewa_top_k, req.ewa
                )
            seed = req.seed if req.seed is not None else int(torch.randint(0, 2**31, (1,)))
            item.state = generation.start(
                lp,
                plan,
                cond,
                req.num_inference_steps,
                req.guidance_scale,
                generator=torch.Generator(lp.device).manual_seed(seed),
                eta=req.eta,
                guidance_rescale=req.guidance_rescale,
                attention_guidance=req.attention_guidance,
            )
            if library.image_side:  # its concepts are read at every step: keep them in the pool until done
                item.pinned, keys = keys, []
        except Exception as exc:  # the client may have cancelled meanwhile: _settle ignores a done future
            _settle(item.future, exc=exc)
            return False
        finally:
            self.cache.release(keys)
        item.times["prepare"] = time.perf_counter() - t0
        return True

    def _finish(self, item: _Active) -> None:
        """Take a request out of the running batch and unpin its concepts."""
        if item in self._active:
            self._active.remove(item)
            self._batch = None
        self.cache.release(item.pinned)
        item.pinned = []

    def _guide(self) -> None:
        """Attention guidance of the requests in their guided steps, each on its own rows (the update
        is the pipeline's, so a request's image does not depend on its batch); a failure fails its
        request alone."""
        for a in [a for a in self._active if a.state.guide_state is not None and a.state.step < a.state.guided]:
            t0 = time.perf_counter()
            try:
                generation.guide(self.pipeline, a.state)
            except Exception as exc:
                self._finish(a)
                _settle(a.future, exc=exc)
                continue
            a.times["guidance"] = a.times.get("guidance", 0.0) + time.perf_counter() - t0

    @torch.no_grad()
    def _step(self) -> None:
        lp = self.pipeline
        self._guide()
        if not self._active:
            return
        if self._batch is None:
            lp.check_installed()
        t0 = time.perf_counter()
        self._batch = generation.step(lp, [a.state for a in self._active], self._batch)
        elapsed = time.perf_counter() - t0
        self.steps += 1
        for a in list(self._active):
            a.times["denoise"] = a.times.get("denoise", 0.0) + elapsed
            if not a.state.done:
                continue
            self._finish(a)
            t0 = time.perf_counter()
            try:
                images = lp.decode(a.state.latents, "pil", None)
            except Exception as exc:  # it left the active set: fail it here, alone
                _settle(a.future, exc=exc)
                continue
            now = time.perf_counter()
            a.times["decode"] = now - t0
            timings = {
                "queued": a.times["started"] - a.times["submitted"],
                "prepare": a.times["prepare"],
                "denoise": a.times["denoise"],
                "decode": a.times["decode"],
                "total": now - a.times["submitted"],
            }
            guide = a.state.guide_state
            if guide is not None:
                timings["guidance"] = a.times.get("guidance", 0.0)
            _settle(a.future, GenerationResult(images, timings, a.request, guide.losses if guide else None))

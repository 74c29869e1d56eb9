"""Serving: many generation requests with different concepts and regions, batched per step (DESIGN §6).

:class:`Engine` runs one worker thread over a :class:`~lifelong_engine.LifelongPipeline`.
Requests join the running batch between denoising steps and leave when their last step is
done, so requests at different steps share one UNet call per iteration: each row carries its
own timestep, its own cached text K/V (computed once when the request is admitted, with its
own concepts mixed in) and its own region map, and each request keeps its own scheduler.
A request's image does not depend on what it was batched with (same seed → same image, to
floating-point tolerance).

Concept memory (:class:`ConceptCache`): a device pool of fixed slots — the stacked tensors
``lora_kv_projection`` gathers from by id — with a byte budget and LRU eviction, a host cache
(LRU, byte budget) behind it, and the ConceptStore behind that.

Under load: the queue is bounded (``submit`` blocks up to ``submit_timeout`` and then raises
:class:`~lifelong_engine.errors.EngineBusyError`); a bad request (unknown concept, bad box, NaN
in an adapter) fails alone; ``cancel`` works between steps; ``close`` drains or cancels.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import copy
import dataclasses
import queue
import threading
import time
from collections.abc import Sequence

import PIL.Image
import torch
from torch import Tensor

from .attention import CONTEXT_KWARG, GenerationContext, RegionPlan
from .concepts import ConceptAdapter
from .errors import ConceptNotFoundError, EngineBusyError, EngineClosedError
from .guidance import AttentionGuidance, GuidanceState, guide_latents, prepare_guidance
from .pipeline import Library, LifelongPipeline, aggregate_noise

__all__ = ["GenerationRequest", "GenerationResult", "Engine", "ConceptCache"]

Box = tuple[float, float, float, float]


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
    ewa_power: float = 2.0
    ewa_norm: str = "fro"
    ewa_top_k: int | None = None
    ewa: bool | None = None
    attention_guidance: AttentionGuidance | None = None


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
    """Concepts by (namespace, name): device slots ← host LRU ← store.

    The device pool holds ``slots`` concepts in stacked per-layer tensors (a (slots, r, Din), b (slots,
    Dout, r), each concept's scale folded into b); ``device_bytes`` sets how many. Every slot has the
    pool's rank r, the highest seen: a concept of higher rank re-allocates the pool with fewer slots, so
    the pool stays within ``device_bytes`` (at least one slot always). Pinned slots (concepts a request
    is being prepared with) are never evicted.
    """

    def __init__(
        self, pipeline: LifelongPipeline, store=None, device_bytes: int = 256 << 20, host_bytes: int = 1 << 30
    ):
        self.lp, self.store = pipeline, store
        self.device_bytes, self.host_bytes = device_bytes, host_bytes
        self._host: collections.OrderedDict[tuple[str, str], ConceptAdapter] = collections.OrderedDict()
        self.rank = max([4, *(c.rank for c in pipeline.concepts.values())])
        self._alloc()
        self.stats = collections.Counter()

    @property
    def slot_bytes(self) -> int:
        """Device bytes of one concept slot: K and V factors of every layer at the pool's rank."""
        return sum((din + dout) * self.rank for din, dout in self._kv_widths().values()) * self.lp.dtype.itemsize

    def _kv_widths(self) -> dict[tuple[str, str], tuple[int, int]]:
        return {k: v for k, v in self.lp._widths.items() if k[1] in ("to_k", "to_v")}

    def _alloc(self) -> None:
        """(Re)allocate the pool at ``self.rank``, as many slots as ``device_bytes`` holds, all empty."""
        lp = self.lp
        self.slots = max(1, self.device_bytes // self.slot_bytes)
        self.factors = {
            key: (
                torch.zeros(self.slots, self.rank, din, device=lp.device, dtype=lp.dtype),
                torch.zeros(self.slots, dout, self.rank, device=lp.device, dtype=lp.dtype),
            )
            for key, (din, dout) in self._kv_widths().items()
        }
        self._slot: collections.OrderedDict[tuple[str, str], int] = collections.OrderedDict()  # LRU order
        self._device: dict[tuple[str, str], tuple[ConceptAdapter, Tensor]] = {}  # on device + its ê
        self._pins: collections.Counter = collections.Counter()

    def get(self, layer: str, proj: str) -> tuple[Tensor, Tensor] | None:
        """The pool's (a, b) of one projection (the interface ``layer_kv`` reads)."""
        return self.factors.get((layer, proj))

    @property
    def resident(self) -> list[tuple[str, str]]:
        """(namespace, name) of the concepts in device slots, least recently used first."""
        return list(self._slot)

    def host(self, key: tuple[str, str]) -> ConceptAdapter:
        """The concept on the host: namespace "" is the pipeline's own library, others come from the store."""
        if key[0] == "":
            return self.lp.concepts[key[1]]
        if key in self._host:
            self._host.move_to_end(key)
            self.stats["host_hits"] += 1
            return self._host[key]
        if self.store is None:
            raise ConceptNotFoundError(f"concept {key[1]!r}: not in the pipeline and the engine has no store")
        adapter = self.store.load(key[1], key[0] or "default")
        self.lp.check_adapter(adapter)
        self.stats["store_loads"] += 1
        self._host[key] = adapter
        while sum(a.nbytes for a in self._host.values()) > self.host_bytes and len(self._host) > 1:
            self._host.popitem(last=False)
        return adapter

    def acquire(self, keys: list[tuple[str, str]]) -> Library:
        """Place the concepts in device slots (evicting unpinned LRU ones), pin them, and return the library."""
        hosts = {key: self.host(key) for key in keys if key not in self._slot}
        rank = max((a.rank for a in hosts.values()), default=0)
        if rank > self.rank:  # grow the pool's rank first: start over with wider (and fewer) slots
            if self._pins:
                raise ValueError(f"a concept of rank {rank} cannot join while requests pin the rank-{self.rank} pool")
            self.rank = rank
            self._alloc()
            self.stats["rank_growths"] += 1
            hosts.update({key: self.host(key) for key in keys if key not in hosts})  # the pool is empty now
        if len(keys) > self.slots:
            raise ValueError(f"request uses {len(keys)} concepts; the device pool holds {self.slots} (device_bytes)")
        adapters, embeddings, ids = [], [], []
        for key in keys:
            if key not in self._slot:
                self._place(key, hosts[key])
                self.stats["device_misses"] += 1
            else:
                self.stats["device_hits"] += 1
            self._slot.move_to_end(key)
            self._pins[key] += 1
            adapter, e = self._device[key]
            adapters.append(adapter)
            embeddings.append(e)
            ids.append(self._slot[key])
        lp = self.lp
        stacked = torch.stack(embeddings, 1) if embeddings else None
        return Library(adapters, stacked, self, torch.tensor(ids, dtype=torch.long, device=lp.device))

    def release(self, keys: list[tuple[str, str]]) -> None:
        for key in keys:
            self._pins[key] -= 1
            if self._pins[key] <= 0:
                del self._pins[key]

    def _place(self, key: tuple[str, str], adapter: ConceptAdapter) -> None:
        lp = self.lp
        used = set(self._slot.values())
        free = next((s for s in range(self.slots) if s not in used), None)
        if free is None:
            victim = next((k for k in self._slot if k not in self._pins), None)
            if victim is None:
                raise ValueError(f"all {self.slots} device slots are in use by requests being prepared")
            free = self._slot.pop(victim)
            del self._device[victim]
            self.stats["evictions"] += 1
        on_device = adapter.to(lp.device, lp.dtype)
        for (layer, proj), (a, b) in self.factors.items():
            a[free].zero_()
            b[free].zero_()
            if layer in on_device.layers:
                fa, fb = on_device.factors(layer, proj)
                a[free, : adapter.rank] = fa
                b[free, :, : adapter.rank] = (fb.float() * adapter.scale).to(lp.dtype)
        if adapter.concept_embeddings is not None:
            e = adapter.concept_embeddings.to(lp.device, torch.float32)
        else:
            with torch.no_grad():
                e = lp.text.concept_embedding(on_device).float()
        self._slot[key] = free
        self._device[key] = (on_device, e)


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
    plan: object = None
    prepared: object = None
    scheduler: object = None
    timesteps: list = dataclasses.field(default_factory=list)
    step: int = 0
    latents: Tensor | None = None
    masks: Tensor | None = None
    extra: dict = dataclasses.field(default_factory=dict)
    added: dict | None = None
    guide: GuidanceState | None = None  # when the request asked for attention guidance
    guided: int = 0  # how many of its first steps are guided
    cfg: bool = True
    size: tuple[int, int] = (0, 0)

    @property
    def rows(self) -> int:
        return self.plan.kinds


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
        self.lp, self.store = pipeline, store
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
        self.lp.check_options(
            req.num_inference_steps, req.guidance_scale, req.alpha, req.height, req.width,
            req.ewa_power, req.ewa_norm, req.ewa_top_k, req.ewa,
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
                for item in self._active:
                    _settle(item.future, exc=exc)
                self._active.clear()
                self._batch = None

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
                _cancel(item.future)
            self._waiting.clear()
            self._active.clear()
            self._batch = None
            return
        self._drop_cancelled()
        rows = sum(a.rows for a in self._active)
        size = self._active[0].size if self._active else None
        kept: collections.deque[_Active] = collections.deque()
        try:
            while self._waiting:
                item = self._waiting.popleft()
                if item.future.cancelled():
                    continue
                if item.plan is None and not self._prepare(item):
                    continue  # failed alone
                if (size is not None and item.size != size) or rows + item.rows > self.max_batch_rows:
                    kept.append(item)
                    continue
                if not item.future.set_running_or_notify_cancel():
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
            self._active.remove(item)
            _settle(item.future, exc=concurrent.futures.CancelledError("cancelled between steps"))
            self._batch = None

    def _prepare(self, item: _Active) -> bool:
        """Text K/V, latents and scheduler of a request; on a bad request, fail its future and return False."""
        lp, req = self.lp, item.request
        t0 = time.perf_counter()
        keys: list[tuple[str, str]] = []
        try:
            regions = lp._check_regions(req.regions)
            if req.attention_guidance is not None and regions:
                raise ValueError(
                    "attention_guidance works on prompts without regions (regions already place concepts)"
                )
            cfg = req.guidance_scale > 1.0
            plan = lp._plan([req.prompt], lp._negatives(req.negative_prompt, 1), regions, 1, cfg, req.alpha)
            if plan.kinds > self.max_batch_rows:
                raise ValueError(f"the request needs {plan.kinds} UNet rows; max_batch_rows is {self.max_batch_rows}")
            if req.concepts is None:
                keys = [("", name) for name in lp.concepts]
            else:
                keys = [(req.namespace or "default", name) for name in req.concepts]
            library = self.cache.acquire(keys)
            height, width = req.height or lp._default_size(), req.width or lp._default_size()
            with torch.no_grad():
                prepared = lp.prepare(
                    plan, req.ewa_power, req.ewa_norm, req.ewa_top_k, req.ewa, (height, width), library
                )
            if library.image_side:
                raise ValueError("the engine serves K/V concepts only; this request's concepts adapt to_q/to_out")
            scheduler = copy.deepcopy(lp.pipe.scheduler)
            scheduler.set_timesteps(req.num_inference_steps, device=lp.device)
            if hasattr(scheduler, "set_begin_index"):
                scheduler.set_begin_index(0)
            seed = req.seed if req.seed is not None else int(torch.randint(0, 2**31, (1,)))
            generator = torch.Generator(lp.device).manual_seed(seed)
            latents = lp.pipe.prepare_latents(
                1, lp.unet.config.in_channels, height, width, lp.dtype, lp.device, generator, None
            )
            extra = lp.pipe.prepare_extra_step_kwargs(generator, 0.0)
            masks = lp._latent_masks(regions, latents) if regions and req.alpha < 1 else None
            added = lp._added_cond(plan, prepared.pooled, height, width)
            guide = None
            if req.attention_guidance is not None:
                guide = prepare_guidance(lp, req.attention_guidance, plan, prepared, cfg, added, None, library)
                item.guided = req.attention_guidance.guided_steps(len(scheduler.timesteps))
        except Exception as exc:  # the client may have cancelled meanwhile: _settle ignores a done future
            _settle(item.future, exc=exc)
            return False
        finally:
            self.cache.release(keys)
        item.plan, item.prepared, item.scheduler, item.cfg = plan, prepared, scheduler, cfg
        item.timesteps, item.latents, item.size = list(scheduler.timesteps), latents, (height, width)
        item.extra, item.masks, item.added, item.guide = extra, masks, added, guide
        item.times["prepare"] = time.perf_counter() - t0
        return True

    def _assemble(self):
        """Batch tensors of the active set: K/V (P padded to the largest), region plan, hidden, added cond."""
        active = self._active
        P = max(a.prepared.context.kv[self.lp.layers[0]][0].shape[1] for a in active)
        kv = {}
        for layer in self.lp.layers:
            ks, vs = [], []
            for a in active:
                k, v = a.prepared.context.kv[layer]
                pad = P - k.shape[1]
                ks.append(torch.cat([k, k[:, :1].expand(-1, pad, -1, -1, -1)], 1) if pad else k)
                vs.append(torch.cat([v, v[:, :1].expand(-1, pad, -1, -1, -1)], 1) if pad else v)
            kv[layer] = (torch.cat(ks), torch.cat(vs))
        paint = [p for a in active for p in a.plan.paint]
        latent = tuple(s // self.lp.pipe.vae_scale_factor for s in active[0].size)
        regions = RegionPlan(paint, latent, self.lp.device) if any(paint) else None
        hidden = torch.cat([a.prepared.hidden for a in active])
        added = None
        if active[0].added is not None:
            added = {k: torch.cat([a.added[k] for a in active]) for k in active[0].added}
        return GenerationContext(kv, regions), hidden, added

    def _guide(self) -> None:
        """Attention guidance of the requests in their guided steps, each on its own rows (the update
        is the pipeline's, so a request's image does not depend on its batch); a failure fails its
        request alone."""
        for a in [a for a in self._active if a.guide is not None and a.step < a.guided]:
            t0 = time.perf_counter()
            try:
                scale = a.request.attention_guidance.scale(a.step, len(a.timesteps))
                t = a.timesteps[a.step]
                a.latents = guide_latents(self.lp, a.guide, a.latents, t, scale, a.scheduler, step=a.step)
            except Exception as exc:
                self._active.remove(a)
                self._batch = None
                _settle(a.future, exc=exc)
                continue
            a.times["guidance"] = a.times.get("guidance", 0.0) + time.perf_counter() - t0

    @torch.no_grad()
    def _step(self) -> None:
        lp = self.lp
        self._guide()
        if not self._active:
            return
        if self._batch is None:
            self._batch = self._assemble()
        ctx, hidden, added = self._batch
        inputs, timesteps = [], []
        for a in self._active:
            t = a.timesteps[a.step]
            inputs.append(a.scheduler.scale_model_input(torch.cat([a.latents] * a.rows), t))
            timesteps.append(t.reshape(1).expand(a.rows))
        t0 = time.perf_counter()
        eps = lp.unet(
            torch.cat(inputs),
            torch.cat(timesteps),
            encoder_hidden_states=hidden,
            cross_attention_kwargs={CONTEXT_KWARG: ctx},
            added_cond_kwargs=added,
            return_dict=False,
        )[0]
        elapsed = time.perf_counter() - t0
        self.steps += 1
        start, finished = 0, []
        for a in self._active:
            e = eps[start : start + a.rows].view(a.rows, 1, *eps.shape[1:])
            start += a.rows
            noise = aggregate_noise(e, a.cfg, a.request.guidance_scale, a.request.alpha, a.masks)
            a.latents = a.scheduler.step(noise, a.timesteps[a.step], a.latents, **a.extra, return_dict=False)[0]
            a.step += 1
            a.times["denoise"] = a.times.get("denoise", 0.0) + elapsed
            if a.step == len(a.timesteps):
                finished.append(a)
        for a in finished:
            self._active.remove(a)
            self._batch = None
            t0 = time.perf_counter()
            try:
                images = lp._decode(a.latents, "pil", None)
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
            if a.guide is not None:
                timings["guidance"] = a.times.get("guidance", 0.0)
            losses = a.guide.losses if a.guide is not None else None
            _settle(a.future, GenerationResult(images, timings, a.request, losses))

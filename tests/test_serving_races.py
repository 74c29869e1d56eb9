"""Engine under cancels, closes and bad requests racing the worker: every future resolves, an innocent
request is never failed by another's trouble, nothing hangs (every wait has a timeout, so a regression
fails instead of hanging)."""

import concurrent.futures
import random
import threading
import time

import pytest
from test_serving import lp, request, store  # noqa: F401  (fixtures)

from lifelong_engine.errors import EngineBusyError, EngineClosedError
from lifelong_engine.serving import Engine

WAIT = 120  # seconds: generous on a loaded CI machine; only reached when something is lost


def wait_until(condition, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def outcome(future: concurrent.futures.Future) -> str:
    try:
        future.result(timeout=WAIT)
    except concurrent.futures.CancelledError:
        return "cancelled"
    except concurrent.futures.TimeoutError:
        return "lost"
    except Exception as exc:
        return type(exc).__name__
    return "done"


def test_cancelling_a_request_that_fails_late_in_prepare_fails_only_that_request(lp, store):  # noqa: F811
    """Issue 13 row 5: the client cancels a request while the worker prepares it and the preparation then
    fails: the running request and one set aside (another image size) still finish, the bad one is cancelled."""
    preparing, cancelled = threading.Event(), threading.Event()
    with Engine(lp, store) as engine:
        real_resolve = engine.cache.resolve

        def resolve(keys):  # the concept stage of a preparation starts with it
            if ("default", "late") in keys:  # the bad request: fail after the client cancelled it
                preparing.set()
                assert cancelled.wait(WAIT)
                raise ValueError("fails late in prepare")
            return real_resolve(keys)

        engine.cache.resolve = resolve
        running = engine.submit(request(steps=30))
        wait_until(running.running, "the first request to run")
        size = lp.default_size() * 2
        aside = engine.submit(request(seed=1, height=size, width=size))  # cannot join the running batch
        bad = engine.submit(request(concepts=("late",)))
        assert preparing.wait(WAIT)
        assert bad.cancel()
        cancelled.set()
        assert [outcome(f) for f in (running, aside, bad)] == ["done", "done", "cancelled"]


def test_cancel_at_every_stage(lp, store):  # noqa: F811
    """Cancel one request in each stage: queued, being prepared, prepared and set aside, running. Each
    resolves as cancelled; a request submitted afterwards is served; cancelling a done one is refused."""
    gate, in_prepare = threading.Event(), threading.Event()
    with Engine(lp, store) as engine:
        real_resolve = engine.cache.resolve

        def resolve(keys):
            if ("default", "mug2") in keys:  # hold the worker inside this request's preparation
                in_prepare.set()
                assert gate.wait(WAIT)
            return real_resolve(keys)

        engine.cache.resolve = resolve
        running = engine.submit(request(steps=30))
        wait_until(running.running, "the first request to run")
        size = lp.default_size() * 2
        aside = engine.submit(request(seed=1, height=size, width=size))  # prepared, then set aside
        held = engine.submit(request("a <mug2>", ("mug2",), seed=2))  # the worker waits in its prepare
        assert in_prepare.wait(WAIT)
        queued = engine.submit(request(seed=3))  # stays in the queue while the worker is held
        assert engine.cancel(queued) and engine.cancel(held) and engine.cancel(aside)
        gate.set()
        assert engine.cancel(running)  # takes effect at the next step boundary
        late = engine.submit(request(seed=4, steps=2))
        assert [outcome(f) for f in (queued, held, aside, running, late)] == ["cancelled"] * 4 + ["done"]
        assert not engine.cancel(late) and late.result().images


def test_submit_racing_close_never_loses_a_future(lp, store):  # noqa: F811
    """Issue 13 row 6, made deterministic: submit passes the closed check, then the engine closes and its
    worker exits before the request reaches the queue. The future must still resolve (cancelled)."""
    engine = Engine(lp, store)
    real_put = engine._queue.put

    def late_put(item, timeout=None):
        engine.close(drain=False)  # the worker has exited when this returns
        assert not engine._thread.is_alive()
        real_put(item, timeout=timeout)

    engine._queue.put = late_put
    future = engine.submit(request())
    assert outcome(future) == "cancelled"


def client(engine, futures, lock, stop, seed):
    """Submit 1-2 step requests until the engine is closed, cancelling some at once and some later."""
    local = random.Random(seed)
    while not stop.is_set():
        try:
            f = engine.submit(request(seed=local.randrange(100), steps=local.choice((1, 2))))
        except EngineBusyError:
            continue
        except EngineClosedError:
            return
        with lock:
            futures.append(f)
        if local.random() < 0.3:
            engine.cancel(f)
        if local.random() < 0.2:  # cancel one submitted earlier, whatever its state now
            with lock:
                engine.cancel(local.choice(futures))


@pytest.mark.parametrize("drain", [False, True])
def test_clients_submitting_and_cancelling_while_the_engine_closes(lp, store, drain):  # noqa: F811
    """Bounded race loop: client threads submit (1-2 step requests) and cancel at random while the engine
    closes; every submitted future resolves, none is lost, no thread hangs."""
    rng = random.Random(13)
    for _ in range(4):
        engine = Engine(lp, store, max_batch_rows=4, max_queue=8, submit_timeout=0.05)
        futures, stop = [], threading.Event()
        lock = threading.Lock()

        threads = [threading.Thread(target=client, args=(engine, futures, lock, stop, rng.random())) for _ in range(3)]
        for t in threads:
            t.start()
        time.sleep(rng.uniform(0.0, 0.3))
        closer = threading.Thread(target=engine.close, kwargs=dict(drain=drain))
        closer.start()
        closer.join(WAIT)
        stop.set()
        for t in threads:
            t.join(WAIT)
        assert not closer.is_alive() and not any(t.is_alive() for t in threads), "a thread hung"
        outcomes = [outcome(f) for f in futures]
        assert "lost" not in outcomes, f"{outcomes.count('lost')} of {len(outcomes)} futures never resolved"
        assert set(outcomes) <= {"done", "cancelled"}, set(outcomes)

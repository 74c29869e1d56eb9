"""AdapterPool: the one layout the fused ops gather adapters from (fixed capacity, place, ranks padded,
scale folded into b, ê kept per entry)."""

import pytest
import torch
from concept_factory import LAYERS, make_adapter

from lifelong_engine.pool import AdapterPool

WIDTHS = {(layer, proj): (8, dout) for layer, dout in zip(LAYERS, (6, 10, 6)) for proj in ("to_k", "to_v", "to_q")}


def test_place_pads_the_rank_folds_the_scale_and_keeps_the_embedding():
    wide, narrow = make_adapter("wide", rank=3, seed=1, alpha=6.0), make_adapter("narrow", rank=1, seed=2)
    pool = AdapterPool.empty(WIDTHS, capacity=3, rank=3, embedding_shape=(len(LAYERS), 8))
    assert pool.projections == {"to_k", "to_v"} and pool.capacity == 3
    pool.place(2, narrow, torch.ones(len(LAYERS), 8))
    pool.place(0, wide, torch.zeros(len(LAYERS), 8))
    for layer in LAYERS:
        a, b = pool.get(layer, "to_k")
        for entry, adapter in ((0, wide), (2, narrow)):  # b·a of the entry is the adapter's scaled delta
            torch.testing.assert_close(b[entry] @ a[entry], adapter.delta(layer, "to_k"))
        assert not a[1].any() and not b[1].any()  # entry 1 is empty
    assert pool.names == ["wide", None, "narrow"]
    assert pool.embeddings[:, 2].eq(1).all() and pool.embeddings[:, 0].eq(0).all()
    pool.clear(2)
    assert pool.names[2] is None and not pool.get(LAYERS[0], "to_v")[1][2].any()


def test_what_does_not_fit_is_refused():
    pool = AdapterPool.empty(WIDTHS, capacity=1, rank=1)
    with pytest.raises(ValueError, match="does not fit this pool"):
        pool.place(0, make_adapter("wide", rank=2))
    with pytest.raises(ValueError, match="does not fit this pool"):
        pool.place(0, make_adapter("q", rank=1, q=True))  # adapts to_q, the pool has K/V only
    with pytest.raises(IndexError, match="pool entry 1 outside"):
        pool.place(1, make_adapter("x", rank=1))


def test_build_sizes_the_pool_to_its_adapters():
    adapters = [make_adapter("a", rank=2, seed=1), make_adapter("q", rank=1, seed=2, q=True)]
    pool = AdapterPool.build(adapters, WIDTHS)
    assert pool.capacity == 2 and pool.rank == 2 and pool.projections == {"to_k", "to_v", "to_q"}
    assert pool.image_side and pool.embeddings is None

"""L2DM's rainbow memory bank: scores against a loop reference, known-answer selections on
constructed clusters, rescoring when a new concept arrives, balanced reproducible replay, concept
similarity weights, an exact state_dict round-trip through safetensors, and argument errors."""

import math

import pytest
import safetensors.torch
import torch
from PIL import Image

from lifelong_engine.training.memory import MemorySample, RainbowMemory

E1, E2, E3 = torch.eye(3, dtype=torch.float64).unbind(0)


def sample(concept, feature, caption=None, image=None):
    return MemorySample(concept, image, caption if caption is not None else f"{concept}:{feature.tolist()}", feature)


def propose(mem, concept, features, prefix=None):
    prefix = prefix or concept
    mem.propose(concept, [sample(concept, f, f"{prefix}{i}") for i, f in enumerate(features)])


def captions(samples):
    return [s.caption for s in samples]


def cos(a, b):
    a, b = a.double(), b.double()
    return float(a @ b) / math.sqrt(float(a @ a) * float(b @ b))


def reference_scores(pool, distinct_weight):
    """The score of the module docstring, with loops. pool: [(concept, feature)]."""
    out = []
    for i, (c, f) in enumerate(pool):
        own = [cos(f, g) for j, (d, g) in enumerate(pool) if d == c and j != i]
        other = [cos(f, g) for d, g in pool if d != c]
        rep = sum(own) / len(own) if own else 1.0
        dist = 1.0 - max(other) if other else 1.0
        out.append(rep + distinct_weight * dist)
    return out


# -------------------------------------------------------------------------- scoring


def test_scores_and_selection_match_loop_reference():
    torch.manual_seed(1)
    mem = RainbowMemory(capacity_per_concept=3, distinct_weight=0.7)
    dim, sizes = 11, {"cat": 5, "dog": 2, "mug": 7}
    feats = {c: [torch.randn(dim) + 2 * torch.randn(dim) * (k == 0) for k in range(n)] for c, n in sizes.items()}
    pool = [(c, f) for c in sizes for f in feats[c]]
    for c in sizes:
        propose(mem, c, feats[c])
    mem.consolidate()

    ref = reference_scores(pool, 0.7)
    assert mem.concepts == ["cat", "dog", "mug"]
    assert len(mem) == 3 + 2 + 3 and mem.pending() == []
    start = 0
    for c, n in sizes.items():
        scores = ref[start : start + n]
        best = sorted(range(n), key=lambda i: -scores[i])[:3]
        kept = mem.samples(c)
        assert captions(kept) == [f"{c}{i}" for i in best]
        for s, i in zip(kept, best):
            assert s.score == pytest.approx(scores[i], rel=1e-12, abs=1e-12)
        start += n


def test_outlier_near_another_concept_is_dropped():
    torch.manual_seed(2)
    noise = lambda: 0.05 * torch.randn(3, dtype=torch.float64)  # noqa: E731
    mem = RainbowMemory(capacity_per_concept=4)
    propose(mem, "dog", [E2 + noise() for _ in range(4)])
    mem.consolidate()
    outlier = 0.6 * E1 + 0.8 * E2  # generated for "cat" but looks like the dog
    propose(mem, "cat", [E1 + noise(), E1 + noise(), outlier, E1 + noise(), E1 + noise()])
    mem.consolidate()
    assert sorted(captions(mem.samples("cat"))) == ["cat0", "cat1", "cat3", "cat4"]
    assert len(mem.samples("dog")) == 4
    scores = [s.score for s in mem.samples("cat")]
    assert scores == sorted(scores, reverse=True)


def test_distinctness_decides_between_equally_representative_candidates():
    # "near" and "far" mirror each other across the e1-e3 plane, so they represent "cat" equally
    # well; only "near" leans towards the dog at e2. Listed first, it wins the tie when distinctness is off.
    def run(distinct_weight):
        mem = RainbowMemory(capacity_per_concept=3, distinct_weight=distinct_weight)
        cat = [E1 + 0.3 * E2, E1 - 0.3 * E2, E1 + 0.2 * E3, E1 - 0.2 * E3]
        mem.propose("cat", [sample("cat", f, n) for f, n in zip(cat, ["near", "far", "core0", "core1"])])
        propose(mem, "dog", [E2, E2 + 0.1 * E3])
        mem.consolidate()
        return captions(mem.samples("cat"))

    assert "near" in run(0.0) and "far" not in run(0.0)  # exact tie: the older candidate is kept
    assert "far" in run(1.0) and "near" not in run(1.0)


def test_ties_keep_kept_samples_then_arrival_order():
    mem = RainbowMemory(capacity_per_concept=2)
    f = torch.tensor([1.0, 2.0, 3.0])
    propose(mem, "cat", [f.clone() for _ in range(3)], prefix="first")
    mem.consolidate()
    assert captions(mem.samples("cat")) == ["first0", "first1"]
    propose(mem, "cat", [f.clone() for _ in range(3)], prefix="second")
    mem.consolidate()
    assert captions(mem.samples("cat")) == ["first0", "first1"]


def test_capacity_respected_per_concept():
    torch.manual_seed(3)
    mem = RainbowMemory(capacity_per_concept=3)
    for round_ in range(3):
        for c, n in (("a", 10), ("b", 1), ("c", 4)):
            propose(mem, c, list(torch.randn(n, 6)), prefix=f"{c}{round_}-")
        mem.consolidate()
        assert {c: len(mem.samples(c)) for c in mem.concepts} == {"a": 3, "b": min(round_ + 1, 3), "c": 3}
        assert len(mem) == sum(len(mem.samples(c)) for c in mem.concepts)
        assert mem.pending() == []


def test_kept_samples_rescored_when_a_similar_concept_arrives():
    u, v, w = E1 + 0.2 * E2, E1 + 0.2 * E3, E1 - 0.2 * E2
    dog = [E2, E2 + 0.1 * E3]  # a new concept on u's side of the cat

    def cat_bank():
        mem = RainbowMemory(capacity_per_concept=2)
        mem.propose("cat", [sample("cat", u, "u"), sample("cat", v, "v")])
        mem.consolidate()
        return mem

    # no new concept: w ties with u and the kept u stays
    mem = cat_bank()
    mem.propose("cat", [sample("cat", w, "w")])
    mem.consolidate()
    assert captions(mem.samples("cat")) == ["v", "u"]

    # the dog arrives: u loses distinctness and w replaces it
    mem = cat_bank()
    mem.propose("cat", [sample("cat", w, "w")])
    propose(mem, "dog", dog)
    mem.consolidate()
    assert captions(mem.samples("cat")) == ["w", "v"]

    # the dog alone: nothing new for the cat, but its kept scores are recomputed
    mem = cat_bank()
    before = {s.caption: s.score for s in mem.samples("cat")}
    propose(mem, "dog", dog)
    mem.consolidate()
    after = {s.caption: s.score for s in mem.samples("cat")}
    assert after["u"] < before["u"] - 0.1 and after["u"] < after["v"]
    expected = reference_scores([("cat", u), ("cat", v), ("dog", dog[0]), ("dog", dog[1])], 1.0)
    assert after == pytest.approx({"u": expected[0], "v": expected[1]}, rel=1e-12)


def test_propose_copies_and_consolidate_clears_short_term():
    mem = RainbowMemory()
    f = torch.tensor([1.0, 0.0], requires_grad=True)
    s = sample("cat", f * 1, "x")
    mem.propose("cat", [s])
    assert len(mem) == 0 and captions(mem.pending("cat")) == ["x"]
    s.feature.data.fill_(7.0)  # the caller's tensor changes; the bank's copy does not
    mem.consolidate()
    kept = mem.samples("cat")[0]
    assert math.isnan(s.score) and not kept.feature.requires_grad
    torch.testing.assert_close(kept.feature, torch.tensor([1.0, 0.0]))
    assert kept.score == 2.0  # a lone sample of a lone concept: representativeness 1, distinctness 1
    assert mem.pending() == [] and mem.dim == 2
    mem.consolidate()  # nothing pending: kept samples stay
    assert captions(mem.samples()) == ["x"]


# --------------------------------------------------------------------------- replay


def replay_bank():
    torch.manual_seed(4)
    mem = RainbowMemory(capacity_per_concept=4)
    for c, n in (("a", 6), ("b", 2), ("c", 1), ("d", 4)):
        propose(mem, c, list(torch.randn(n, 5)))
    mem.consolidate()
    return mem


def test_replay_batch_balanced():
    mem = replay_bank()
    kept = {c: len(mem.samples(c)) for c in mem.concepts}
    assert kept == {"a": 4, "b": 2, "c": 1, "d": 4}
    for n in (0, 1, 3, 4, 10, 17):
        batch = mem.replay_batch(n, torch.Generator().manual_seed(n))
        assert len(batch) == n
        counts = {c: sum(s.concept == c for s in batch) for c in mem.concepts}
        assert max(counts.values()) - min(counts.values()) <= 1
        order = [s.concept for s in batch]
        assert order == (order[:4] * 5)[:n]  # round-robin
        for c in mem.concepts:
            drawn = captions(s for s in batch if s.concept == c)
            # without replacement until the concept runs out
            assert len(set(drawn)) == min(len(drawn), kept[c])
            assert set(drawn) <= set(captions(mem.samples(c)))


def test_replay_batch_reproducible_and_random():
    mem = replay_bank()
    a = captions(mem.replay_batch(9, torch.Generator().manual_seed(0)))
    b = captions(mem.replay_batch(9, torch.Generator().manual_seed(0)))
    assert a == b
    gen = torch.Generator().manual_seed(0)
    draws = {tuple(captions(mem.replay_batch(9, gen))) for _ in range(6)}
    assert len(draws) > 1  # the generator advances between batches


def test_replay_batch_restricted_concepts():
    mem = replay_bank()
    batch = mem.replay_batch(5, torch.Generator().manual_seed(1), concepts=["b", "d"])
    counts = sorted(sum(s.concept == c for s in batch) for c in "bd")
    assert counts == [2, 3] and {s.concept for s in batch} == {"b", "d"}


# ----------------------------------------------------------------------- similarity


def test_concept_similarity_ranks_near_above_far():
    torch.manual_seed(5)
    noise = lambda n: 0.1 * torch.randn(n, 3, dtype=torch.float64)  # noqa: E731
    mem = RainbowMemory()
    propose(mem, "husky", list(E1 + noise(4)))
    propose(mem, "teapot", list(0.5 * E1 + E2 + noise(4)))
    propose(mem, "opposite", list(-E1 + noise(3)))
    mem.consolidate()
    new = E1 + 0.2 * E3 + noise(3)  # a new dog
    w = mem.concept_similarity(new)
    w1 = mem.concept_similarity(new[0])  # one feature: (D,)
    assert list(w) == ["husky", "teapot", "opposite"]
    assert 1.0 >= w["husky"] > w["teapot"] > w["opposite"] == 0.0
    proto = torch.nn.functional.normalize(new, dim=1).mean(0)
    kept = torch.nn.functional.normalize(torch.stack([s.feature for s in mem.samples("husky")]), dim=1).mean(0)
    assert w["husky"] == pytest.approx(cos(proto, kept), rel=1e-12)
    assert mem.concept_similarity(new[0], concepts=["teapot"]) == {"teapot": w1["teapot"]}
    assert RainbowMemory().concept_similarity(torch.ones(3)) == {}


# ----------------------------------------------------------------------- checkpoint


def checkpoint_bank():
    torch.manual_seed(6)
    mem = RainbowMemory(capacity_per_concept=2, distinct_weight=0.4)
    rgb = Image.fromarray(torch.randint(0, 256, (5, 4, 3), dtype=torch.uint8).numpy())
    gray = Image.fromarray(torch.randint(0, 256, (3, 2), dtype=torch.uint8).numpy())
    mem.propose(
        "cat",
        [
            MemorySample("cat", torch.randn(4, 8, 8, dtype=torch.float16), "a cat", torch.randn(6)),
            MemorySample("cat", rgb, "a cat, rgb", torch.randn(6)),
            MemorySample("cat", None, "a cat, no image", torch.randn(6)),
        ],
    )
    mem.propose("dog", [MemorySample("dog", gray, "a dog", torch.randn(6))])
    mem.consolidate()
    batch = torch.randn(3, 6, dtype=torch.float64)  # rows of one tensor: shared storage
    mem.propose("dog", [MemorySample("dog", torch.zeros(2), f"dog {i}", batch[i]) for i in range(3)])
    return mem


def same_samples(a, b):
    assert len(a) == len(b)
    for s, t in zip(a, b):
        assert (s.concept, s.caption) == (t.concept, t.caption)
        assert s.score == t.score or (math.isnan(s.score) and math.isnan(t.score))
        assert s.feature.dtype == t.feature.dtype and torch.equal(s.feature, t.feature)
        if isinstance(s.image, torch.Tensor):
            assert s.image.dtype == t.image.dtype and torch.equal(s.image, t.image)
        elif isinstance(s.image, Image.Image):
            assert s.image.mode == t.image.mode and s.image.tobytes() == t.image.tobytes()
        else:
            assert s.image is None and t.image is None


def test_state_dict_round_trip_through_safetensors():
    mem = checkpoint_bank()
    tensors, header = mem.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in tensors.values())
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in header.items())
    data = safetensors.torch.save(tensors, metadata=header)
    restored = RainbowMemory.from_state_dict(safetensors.torch.load(data), header)

    assert (restored.capacity_per_concept, restored.distinct_weight) == (2, 0.4)
    assert restored.concepts == mem.concepts and restored.dim == mem.dim == 6
    same_samples(restored.samples(), mem.samples())
    same_samples(restored.pending(), mem.pending())

    # identical behaviour from here on
    new = torch.randn(4, 6)
    for m in (mem, restored):
        propose(m, "cat", list(new[:2]), prefix="new cat")
        propose(m, "owl", list(new[2:]))
        m.consolidate()
    same_samples(restored.samples(), mem.samples())
    gen = [torch.Generator().manual_seed(3) for _ in range(2)]
    assert captions(mem.replay_batch(7, gen[0])) == captions(restored.replay_batch(7, gen[1]))
    assert mem.concept_similarity(new) == restored.concept_similarity(new)


def test_load_state_dict_replaces_config_and_contents():
    tensors, header = checkpoint_bank().state_dict()
    target = RainbowMemory(capacity_per_concept=9)
    propose(target, "zebra", [torch.ones(3)])
    target.consolidate()
    target.load_state_dict(tensors, header)
    assert target.capacity_per_concept == 2 and target.concepts == ["cat", "dog"]
    empty = RainbowMemory.from_state_dict(*RainbowMemory(3, 0.5).state_dict())
    assert (len(empty), empty.dim, empty.capacity_per_concept, empty.distinct_weight) == (0, None, 3, 0.5)


def test_load_state_dict_errors():
    tensors, header = checkpoint_bank().state_dict()
    with pytest.raises(ValueError, match="not a rainbow memory state"):
        RainbowMemory().load_state_dict(tensors, {**header, "format": "other"})
    missing = {k: v for k, v in tensors.items() if k != "long.0.feature"}
    with pytest.raises(ValueError, match="long.0.feature is missing"):
        RainbowMemory().load_state_dict(missing, header)
    with pytest.raises(ValueError, match="expected D = 6"):
        RainbowMemory().load_state_dict({**tensors, "short.1.feature": torch.ones(5)}, header)


def test_state_dict_rejects_unsaveable_payloads():
    mem = RainbowMemory()
    mem.propose("cat", [MemorySample("cat", [1, 2], "a list", torch.ones(2))])
    with pytest.raises(ValueError, match=r"short.0.image \(concept 'cat'\) is a list"):
        mem.state_dict()
    mem = RainbowMemory()
    mem.propose("cat", [MemorySample("cat", Image.new("P", (2, 2)), "palette", torch.ones(2))])
    with pytest.raises(ValueError, match="mode 'P'"):
        mem.state_dict()


# --------------------------------------------------------------------------- errors


def test_constructor_errors():
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="capacity_per_concept"):
            RainbowMemory(capacity_per_concept=bad)
    for bad in (-0.1, math.nan, math.inf, "1"):
        with pytest.raises(ValueError, match="distinct_weight"):
            RainbowMemory(distinct_weight=bad)


def test_propose_errors():
    mem = RainbowMemory()
    propose(mem, "cat", [torch.ones(4)])
    cases = [
        ("", [sample("", torch.ones(4))], "concept must be a non-empty string"),
        ("  ", [sample("  ", torch.ones(4))], "concept must be a non-empty string"),
        ("cat", [], "samples for concept 'cat' is empty"),
        ("cat", [sample("dog", torch.ones(4))], r"samples\[0\].concept is 'dog'; expected 'cat'"),
        ("cat", [sample("cat", torch.ones(3))], r"samples\[0\].feature has D = 3; expected D = 4"),
        ("cat", [sample("cat", torch.ones(2, 4))], r"must be 1-D \(D,\)"),
        ("cat", [sample("cat", torch.zeros(4))], "all zeros"),
        ("cat", [sample("cat", torch.tensor([1.0, math.nan, 0, 0]))], "NaN or inf"),
    ]
    for concept, samples, match in cases:
        with pytest.raises(ValueError, match=match):
            mem.propose(concept, samples)
    with pytest.raises(TypeError, match="floating-point"):
        mem.propose("cat", [sample("cat", torch.ones(4, dtype=torch.int64))])
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        mem.propose("cat", [MemorySample("cat", None, "x", [1.0, 2.0, 3.0, 4.0])])
    assert mem.pending("cat") and len(mem.pending()) == 1  # failed calls stored nothing

    fresh = RainbowMemory()  # mismatched dims within one call
    with pytest.raises(ValueError, match=r"samples\[1\].feature has D = 5; expected D = 4"):
        fresh.propose("cat", [sample("cat", torch.ones(4)), sample("cat", torch.ones(5))])
    assert fresh.dim is None and fresh.pending() == []


def test_use_errors():
    mem = replay_bank()
    gen = torch.Generator().manual_seed(0)
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match="n must be an integer >= 0"):
            mem.replay_batch(bad, gen)
    with pytest.raises(TypeError, match="torch.Generator"):
        mem.replay_batch(2, 0)
    with pytest.raises(ValueError, match="unknown concept 'zebra'"):
        mem.replay_batch(2, gen, concepts=["zebra"])
    with pytest.raises(ValueError, match="no concepts to replay"):
        RainbowMemory().replay_batch(1, gen)
    assert RainbowMemory().replay_batch(0, gen) == []
    with pytest.raises(ValueError, match="unknown concept 'zebra'"):
        mem.samples("zebra")
    with pytest.raises(ValueError, match="expected D = 5"):
        mem.concept_similarity(torch.ones(4))
    with pytest.raises(ValueError, match=r"\(D,\) or \(m, D\)"):
        mem.concept_similarity(torch.ones(1, 1, 5))
    with pytest.raises(ValueError, match="all zeros"):
        mem.concept_similarity(torch.zeros(2, 5))

"""ConceptAdapter: validation, scale, device moves, safetensors layout."""

import pytest
import torch
from concept_factory import LAYERS, assert_same, make_adapter

from lifelong_engine.concepts import ConceptAdapter, factors_from_delta, validate_name


def test_scale_and_delta():
    adapter = make_adapter(rank=4, alpha=2.0)
    assert adapter.scale == 0.5
    a, b = adapter.factors(LAYERS[1], "to_k")
    torch.testing.assert_close(adapter.delta(LAYERS[1], "to_k"), 0.5 * b @ a)
    assert adapter.projections == ["to_k", "to_v"]
    assert make_adapter(q=True).projections == ["to_k", "to_v", "to_q"]


def test_alpha_defaults_to_rank():
    assert make_adapter(rank=3, alpha=None).scale == 1.0


def test_safetensors_round_trip():
    adapter = make_adapter(q=True)
    tensors, header = adapter.to_safetensors()
    assert all(isinstance(v, str) for v in header.values())
    assert_same(ConceptAdapter.from_safetensors(tensors, header), adapter)


def test_to_moves_and_casts_floats():
    half = make_adapter().to(dtype=torch.float16)
    assert all(t.dtype == torch.float16 for t in half.tensors())
    assert make_adapter().to("meta").concept_embeddings.device.type == "meta"


def test_is_finite():
    adapter = make_adapter()
    assert adapter.is_finite()
    adapter.lora[f"{LAYERS[0]}.to_v.lora_B.weight"][0, 0] = float("nan")
    assert not adapter.is_finite()


@pytest.mark.parametrize(
    "name", ["../evil", "a/b", "a\\b", "", ".hidden", "x" * 129, "a..b", "-flag", "dog\n", "dog\n../x"]
)
def test_bad_names_rejected(name):
    with pytest.raises(ValueError, match="concept name"):
        validate_name(name)


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(lora=make_adapter(rank=2).lora, rank=3), "rank is 3"),
        (dict(token_embeddings=torch.zeros(2, 2, 8)), "token_embeddings has shape"),
        (dict(concept_embeddings=torch.zeros(3, 2, 8)), "concept_embeddings has shape"),
        (dict(words=[]), "token and words must be non-empty"),
        (dict(metadata={"steps": 100}), "metadata must map str to str"),
        (dict(alpha=float("nan")), "alpha must be a finite number > 0"),
        (dict(alpha=float("inf")), "alpha must be a finite number > 0"),
        (dict(alpha=-2.0), "alpha must be a finite number > 0"),
        (dict(lora={k: v.to(torch.complex64) for k, v in make_adapter().lora.items()}), "complex64"),
        (dict(lora={k: v.bool() for k, v in make_adapter().lora.items()}), "torch.bool"),
        (dict(token_embeddings=torch.zeros(1, 2, 8, dtype=torch.int64)), "token_embeddings must be a real floating"),
    ],
)
def test_inconsistent_adapters_rejected(change, message):
    with pytest.raises((ValueError, TypeError), match=message):
        make_adapter(**change)


def test_missing_factor_rejected():
    adapter = make_adapter()
    lora = dict(adapter.lora)
    del lora[f"{LAYERS[2]}.to_v.lora_B.weight"]
    with pytest.raises(ValueError, match="has no matching"):
        make_adapter(lora=lora)


def test_factors_from_delta_exact_and_padded():
    delta = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    a, b = factors_from_delta(delta)
    assert a.shape == (3, 3) and b.shape == (5, 3)
    torch.testing.assert_close(b @ a, delta, rtol=0, atol=1e-5)
    a, b = factors_from_delta(delta, rank=6)  # zero-padded: the same product
    assert a.shape == (6, 3) and b.shape == (5, 6) and not a[3:].any() and not b[:, 3:].any()
    torch.testing.assert_close(b @ a, delta, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="rank 2"):
        factors_from_delta(delta, rank=2)

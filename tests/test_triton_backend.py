"""The triton backend's routing: plain cross-attention (one slot, every key valid) goes to SDPA outside
the interpreter, everything else to the kernels. The kernels themselves: tests/test_kernels_*.py."""

import importlib
import importlib.util

import inputs
import pytest
import torch

from lifelong_engine import reference, triton_backend

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs the triton package")


def test_plain_cross_attention_is_routed_to_sdpa_outside_the_interpreter(monkeypatch):
    kernel = importlib.import_module("lifelong_engine.kernels.regional_attention")

    def no_kernel(*args):
        raise AssertionError("plain cross-attention reached the Triton kernel")

    monkeypatch.setattr(triton_backend, "interpreting", lambda: False)
    monkeypatch.setattr(kernel, "regional_cross_attention", no_kernel)
    q, k, v, region_ids, _, _ = inputs.regional(P=1, T=77, dtype=torch.float32, ragged=False)
    assert triton_backend.plain_attention(k, None)
    got = triton_backend._impl("regional_cross_attention")(q, k, v, region_ids, None, 0.3)
    torch.testing.assert_close(got, reference.regional_cross_attention(q, k, v, region_ids, None, 0.3))


@pytest.mark.parametrize(
    ("slots", "ragged", "interpreting", "plain"),
    [(1, False, False, True), (3, False, False, False), (1, True, False, False), (1, False, True, False)],
)
def test_plain_means_one_slot_no_kv_len_no_interpreter(monkeypatch, slots, ragged, interpreting, plain):
    monkeypatch.setattr(triton_backend, "interpreting", lambda: interpreting)
    _, k, _, _, kv_len, _ = inputs.regional(P=slots, ragged=ragged)
    assert triton_backend.plain_attention(k, kv_len) is plain

"""EWA ops on CPU: ewa_merge (ψ-weighted merge of G adapters into dense deltas) and ewa_weights (ψ of
G concepts for 16 layers) through the public op (auto → the torch backend) against the reference and
the per-concept loop one writes without a fused op. Groups ``ewa_merge-*`` and ``ewa_weights-*``."""

import pytest
import torch
from conftest import common, ewa, prepared

from lifelong_engine import ops

MERGE = {"D320-B1-G10": (1, 10, 320, 768), "D1280-B1-G100": (1, 100, 1280, 768)}
WEIGHTS = {"B2-L16-G10": (2, 16, 768, 10), "B2-L16-G100": (2, 16, 768, 100)}
MERGE_PROVIDERS = {p.name: p for p in ewa.EWA_MERGE_PROVIDERS}
WEIGHTS_PROVIDERS = {p.name: p for p in ewa.EWA_WEIGHTS_PROVIDERS}
WEIGHTS_PROVIDERS["ours_cpu"] = common.Provider(
    "ours_cpu", lambda i, ctx: common.ours_cpu(ops.ewa_weights, *ewa._ewa_args(i), ctx=ctx)
)


@pytest.mark.parametrize("provider", ("ours_cpu", "reference", "loop"))
@pytest.mark.parametrize("name", list(MERGE))
def test_ewa_merge(benchmark, name, provider):
    torch.manual_seed(0)
    case = ewa.ewa_merge_case(*MERGE[name])
    inputs = case.make(torch.device("cpu"), torch.float32)
    call = prepared(MERGE_PROVIDERS[provider], inputs, case.reference(inputs))
    benchmark.group = f"ewa_merge-{name}"
    benchmark.extra_info.update(case.shape)
    benchmark(call)


@pytest.mark.parametrize("provider", ("ours_cpu", "loop"))
@pytest.mark.parametrize("name", list(WEIGHTS))
def test_ewa_weights(benchmark, name, provider):
    torch.manual_seed(0)
    case = ewa.ewa_weights_case(*WEIGHTS[name])
    inputs = case.make(torch.device("cpu"), torch.float32)
    call = prepared(WEIGHTS_PROVIDERS[provider], inputs, case.reference(inputs))
    benchmark.group = f"ewa_weights-{name}"
    benchmark.extra_info.update(case.shape)
    benchmark(call)

"""CPU microbenchmarks (pytest-benchmark), outside the default test selection (``testpaths`` is tests/).

    OMP_NUM_THREADS=1 python -m pytest bench/cpu -p no:randomly --benchmark-json bench/results/cpu/ops.json

One thread (set here as well); one benchmark group per op and shape, the providers side by side
(``--benchmark-group-by group``, the default in bench/cpu/pytest.ini). Each provider's output is
checked against the fp32 reference before it is timed. The providers and shapes come from
the kernel benchmark scripts (bench/regional.py, bench/lora_kv.py, bench/ewa.py over bench/common.py),
so these numbers and their JSON lines time the same code.
"""

import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(BENCH))

import common  # noqa: E402  (bench/common.py: provider types, the reference check)
import ewa  # noqa: E402  (bench/ewa.py, bench/lora_kv.py, bench/regional.py: shapes and peer providers)
import lora_kv  # noqa: E402
import regional  # noqa: E402

for _module in (common, ewa, lora_kv, regional):
    assert Path(_module.__file__).parent == BENCH, _module.__file__

CTX = common.Context(device=torch.device("cpu"), dtype=torch.float32, quick=False, interpret=False)


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    torch.set_num_threads(1)
    yield


def prepared(provider, inputs: dict, reference_out):
    """provider's Prepared call for inputs, skipped with the reason when it cannot run here, and
    checked against the reference output first."""
    try:
        prep = provider.build(inputs, CTX)
    except common.Skip as e:
        pytest.skip(str(e))
    got = common.tensors(prep.canonical(prep.call()))
    want = common.tensors(reference_out)
    err = common.max_err(got, want)
    scale = max(float(w.abs().max()) for w in want) if want else 1.0
    assert err <= 1e-4 * max(scale, 1.0), f"{provider.name}: max error {err:.3g} against the reference"
    return prep.call


sys.path.insert(0, str(BENCH.parent / "tests"))  # tests/inputs.py: the ops' small random inputs

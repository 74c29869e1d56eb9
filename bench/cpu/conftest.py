"""CPU microbenchmarks (pytest-benchmark), outside the default test selection (``testpaths`` is tests/).

    OMP_NUM_THREADS=1 python -m pytest bench/cpu -p no:randomly --benchmark-json bench/results/cpu/ops.json

One thread (set here as well); one benchmark group per op and shape, the providers side by side
(``--benchmark-group-by group``, the default in bench/cpu/pytest.ini). Each provider's output is
checked against the fp32 reference before it is timed. The providers and shapes come from
bench/kernels.py, so these numbers and its JSON lines time the same code.
"""

import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(BENCH))

import kernels as kbench  # noqa: E402  (bench/kernels.py: shapes and peer providers)

assert Path(kbench.__file__).parent == BENCH, kbench.__file__

CTX = kbench.Context(device=torch.device("cpu"), dtype=torch.float32, quick=False, interpret=False)


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    torch.set_num_threads(1)
    yield


def prepared(provider, inputs: dict, reference_out):
    """provider's Prepared call for inputs, skipped with the reason when it cannot run here, and
    checked against the reference output first."""
    try:
        prep = provider.build(inputs, CTX)
    except kbench.Skip as e:
        pytest.skip(str(e))
    got = kbench._tensors(prep.canonical(prep.call()))
    want = kbench._tensors(reference_out)
    err = kbench._max_err(got, want)
    scale = max(float(w.abs().max()) for w in want) if want else 1.0
    assert err <= 1e-4 * max(scale, 1.0), f"{provider.name}: max error {err:.3g} against the reference"
    return prep.call


sys.path.insert(0, str(BENCH.parent / "tests"))  # tests/inputs.py: the ops' small random inputs

"""Pipeline, Engine and guidance give the outputs recorded before issue 15's rewrite of the denoising path
(tests/golden/generation.pt, written by tests/golden/record.py from that code; cases in golden_cases.py)."""

from pathlib import Path

import pytest
import torch
from golden_cases import CASES

GOLDEN = torch.load(Path(__file__).with_name("golden") / "generation.pt")


@pytest.mark.parametrize("name", list(CASES))
def test_outputs_equal_the_recorded_ones(name):
    got, want = CASES[name](), GOLDEN[name]
    assert got.keys() == want.keys()
    for key, expected in want.items():
        if key.startswith("pixels"):  # served PIL images: uint8, one step of rounding apart at most
            diff = (got[key].to(torch.int16) - expected.to(torch.int16)).abs().max()
            assert diff <= 1, f"{name}.{key}: pixels differ by {diff}"
        else:
            torch.testing.assert_close(got[key].float(), expected.float(), atol=1e-4, rtol=1e-4, msg=f"{name}.{key}")

"""Record the golden outputs of tests/golden_cases.py into tests/golden/generation.pt.

Run once from the code the outputs must be kept equal to (it was run before issue 15's rewrite):
``python tests/golden/record.py``. Re-running it on later code would make test_golden.py check nothing.
The ``tinyworld`` entry depends on the shipped weights: when TinyWorld v3's weights replaced v2's, and again
when the from-scratch model replaced the first v3 model, and when its continuation on the world with the parts
rule replaced it, that entry alone was re-recorded (same code, right after the old entry had passed on it).
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from golden_cases import CASES  # noqa: E402

if __name__ == "__main__":
    torch.manual_seed(0)
    golden = {name: {k: v.detach().cpu().clone() for k, v in case().items()} for name, case in CASES.items()}
    torch.save(golden, Path(__file__).with_name("generation.pt"))
    print({name: {k: tuple(v.shape) for k, v in out.items()} for name, out in golden.items()})

"""fp32 precision flags read by the kernels' launchers (TF32 or not) on every torch version."""

import subprocess
import sys

import pytest
import torch

NEW_API = hasattr(torch.backends.cuda.matmul, "fp32_precision")

# After the new API is used, torch raises on any read of the old flags; a fresh interpreter
# keeps that state away from the other tests.
_SCRIPT = """
import torch
torch.backends.cuda.matmul.fp32_precision = {setting!r}
from lifelong_engine.kernels import lora_kv, regional_attention
print(lora_kv._ieee(torch.float32), regional_attention._input_precision(torch.float32))
"""


@pytest.mark.skipif(not NEW_API, reason="torch < 2.9 has only the old TF32 flags")
@pytest.mark.parametrize(("setting", "want"), [("tf32", "False tf32"), ("ieee", "True tf32x3")])
def test_launchers_read_the_new_fp32_precision_api_without_raising(setting, want):
    done = subprocess.run(
        [sys.executable, "-c", _SCRIPT.format(setting=setting)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == want.split()


def test_default_fp32_is_not_tf32():
    from lifelong_engine.kernels import lora_kv, regional_attention
    from lifelong_engine.kernels.precision import fp32_matmul_allows_tf32

    assert not fp32_matmul_allows_tf32()
    assert lora_kv._ieee(torch.float32) and not lora_kv._ieee(torch.float16)
    assert regional_attention._input_precision(torch.float32) == "tf32x3"

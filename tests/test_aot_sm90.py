"""bench/aot_sm90.py: kernels compiled for sm_90 without a GPU, and the CI gate on its rows.

The compiling tests run the tool in a fresh interpreter: pytest runs under TRITON_INTERPRET=1,
which turns every kernel into an interpreted function at import.
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Loaded from its file: bench/ on sys.path would put its scripts (common, ewa, ...) among the top-level names.
_spec = importlib.util.spec_from_file_location("_lifelong_bench_aot_sm90", ROOT / "bench" / "aot_sm90.py")
aot_sm90 = sys.modules[_spec.name] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(aot_sm90)


def _has_nvidia_tools() -> bool:
    try:
        import triton
    except ImportError:
        return False
    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    return (tools / "ptxas").exists() and (tools / "cuobjdump").exists()


needs_ptxas = pytest.mark.skipif(not _has_nvidia_tools(), reason="Triton's wheel carries no ptxas / cuobjdump here")


def _compile(script: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(ROOT / 'bench')!r})\n{script}"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@needs_ptxas
def test_ewa_normalize_compiles_once_for_any_number_of_concepts(tmp_path):
    """Regression: BLOCK_G was the next power of two of G (≤ 1024), so every G that crossed a
    power of two compiled _pow_normalize_kernel again."""
    out = _compile(
        f"""
import os
os.environ["TRITON_CACHE_DIR"] = {str(tmp_path)!r}
import torch, aot_sm90
from lifelong_engine.kernels import ewa
with aot_sm90.compile_only() as records:
    for g in (20, 40):
        ewa.ewa_weights(torch.randn(1, 1, 3, 16), torch.randn(1, g, 16))
norm = {{k.hash for fn, k in records if fn.__name__ == "_pow_normalize_kernel"}}
usage = aot_sm90.resources(records[0][1])
print(len(norm), usage["registers"], usage["stack"], usage["shared"])
"""
    )
    binaries, registers, stack, shared = map(int, out.split())
    assert binaries == 1
    assert 0 < registers <= 255 and stack >= 0 and shared >= 0


def _row(**kw):
    row = dict(kernel="_merge_kernel", case="sd15 ewa", dtype="fp16", constants="", error="")
    row.update(registers=100, stack=0, shared=1024, num_warps=4, num_stages=2, ld_v4=1, ld_narrow=0, cp_async=0)
    row.update(kw)
    return row


def test_check_fails_on_compile_errors_shared_memory_and_spills_over_the_kernels_limit():
    limit = aot_sm90.SPILL_LIMITS["_regional_attn_bwd_kernel"]["fp32"]
    assert aot_sm90.check([_row(), _row(kernel="_regional_attn_bwd_kernel", dtype="fp32", stack=limit)]) == []
    problems = aot_sm90.check(
        [
            _row(error="CompilationError: boom"),
            _row(shared=aot_sm90.SM90_MAX_SHARED + 1),
            _row(stack=8),
            _row(kernel="_regional_attn_bwd_kernel", dtype="fp32", stack=limit + 8),
        ]
    )
    assert [p.split(": ", 1)[1].split()[0] for p in problems] == ["CompilationError:", "232449", "8", str(limit + 8)]


def test_matrix_calls_every_kernel_module():
    """Regression: kernels/ewa_official.py was added without a case, so CI never compiled it for sm_90.
    ewa_common holds @triton.jit helpers inlined into the ewa kernels, compiled with them."""
    import inspect

    called = inspect.getsource(aot_sm90._cases)
    modules = [
        p.stem
        for p in (ROOT / "kernels").glob("*.py")
        if "@triton.jit" in p.read_text() and p.stem not in ("__init__", "ewa_common")
    ]
    assert "ewa_official" in modules
    assert [m for m in modules if f"{m}." not in called] == []

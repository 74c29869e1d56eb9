"""Backend dispatch: LIFELONG_BACKEND, use_backend(), auto fallback, explicit-backend errors."""

import threading

import inputs
import pytest
import torch

from lifelong_engine import BackendUnavailableError, ops, reference, torch_backend
from lifelong_engine.backends import Backend, register_backend, requested_backend, use_backend

OPS = ("lora_kv_projection", "regional_cross_attention", "ewa_weights", "ewa_merge")


def test_default_is_auto(monkeypatch):
    monkeypatch.delenv("LIFELONG_BACKEND", raising=False)
    assert requested_backend() == "auto"
    assert "reference" in ops.available_backends()


def test_env_var_selects_and_is_validated(monkeypatch):
    monkeypatch.setenv("LIFELONG_BACKEND", "reference")
    assert requested_backend() == "reference"
    monkeypatch.setenv("LIFELONG_BACKEND", "fastest")
    with pytest.raises(ValueError, match="LIFELONG_BACKEND='fastest'"):
        ops.ewa_merge(*inputs.merge())


def test_use_backend_overrides_env_nests_and_restores(monkeypatch):
    monkeypatch.setenv("LIFELONG_BACKEND", "auto")
    with use_backend("reference"):
        assert requested_backend() == "reference"
        with use_backend("auto"):
            assert requested_backend() == "auto"
        assert requested_backend() == "reference"
    assert requested_backend() == "auto"
    with pytest.raises(ValueError, match="use_backend"), use_backend("cuDNN"):
        pass


def test_use_backend_is_per_thread():
    seen = {}
    with use_backend("reference"):
        t = threading.Thread(target=lambda: seen.setdefault("other", requested_backend()))
        t.start()
        t.join()
    assert seen["other"] != "reference"


def test_explicit_missing_backend_says_why(backend_registry):
    backend_registry.mark_missing("cuda", "the CUDA C++ kernels are not built in this installation")
    with use_backend("cuda"), pytest.raises(BackendUnavailableError, match="'cuda' requested for ewa_merge: the CUDA"):
        ops.ewa_merge(*inputs.merge())


class _Counting:
    """A fake 'triton' backend: runs the reference, counts calls, refuses float64."""

    def __init__(self):
        self.calls = []

    def backend(self):
        impls = {}
        for op in OPS:
            for name in (op, op + "_backward"):
                impls[name] = self._wrap(name, getattr(reference, name))
        return Backend("triton", impls, lambda op, args: self.why_not(args))

    def _wrap(self, name, fn):
        def run(*args):
            self.calls.append(name)
            return fn(*args)

        return run

    @staticmethod
    def why_not(args):
        tensor = next(a for a in args if isinstance(a, torch.Tensor))
        return "float64 is not supported" if tensor.dtype == torch.float64 else None


@pytest.fixture
def fake_triton(backend_registry):
    counting = _Counting()
    register_backend(counting.backend())
    return counting


def test_auto_prefers_faster_backend_and_falls_back(fake_triton):
    ops.ewa_merge(*inputs.merge(dtype=torch.float32))
    assert fake_triton.calls == ["ewa_merge"]
    ops.ewa_merge(*inputs.merge(dtype=torch.float64))  # refused by triton → silently the reference
    assert fake_triton.calls == ["ewa_merge"]


def test_explicit_backend_that_cannot_run_raises_reason(fake_triton):
    with use_backend("triton"), pytest.raises(BackendUnavailableError, match="float64 is not supported"):
        ops.ewa_merge(*inputs.merge(dtype=torch.float64))


def test_backward_runs_on_the_forward_backend(fake_triton):
    """The backend is fixed when the forward runs; backward outside the context uses it too."""
    args = inputs.regional(dtype=torch.float32, grad=True)
    with use_backend("reference"):
        out = ops.regional_cross_attention(*args)
    with use_backend("triton"):
        out.sum().backward()
    assert fake_triton.calls == []
    with use_backend("triton"):
        out = ops.regional_cross_attention(*args)
    out.sum().backward()
    assert fake_triton.calls == ["regional_cross_attention", "regional_cross_attention_backward"]


def test_register_rejects_unknown_names():
    with pytest.raises(ValueError, match="backend name 'auto'"):
        register_backend(Backend("auto", {}, lambda op, args: None))


def test_auto_keeps_cpu_tensors_off_triton(monkeypatch, backend_registry):
    """Triton's CPU interpreter is for tests: auto never picks it, even when it is on (CPU tensors
    go to the fast plain-PyTorch backend)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    picked = backend_registry.select("regional_cross_attention", inputs.regional(dtype=torch.float32), "auto")
    assert picked is torch_backend.regional_cross_attention


def test_explicit_triton_on_cpu_without_interpreter_says_why(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with use_backend("triton"), pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET=1"):
        ops.ewa_merge(*inputs.merge(dtype=torch.float32))


def test_explicit_triton_refuses_float64_and_interpreted_bf16(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with use_backend("triton"), pytest.raises(BackendUnavailableError, match="float64 is not supported"):
        ops.ewa_merge(*inputs.merge(dtype=torch.float64))
    with use_backend("triton"), pytest.raises(BackendUnavailableError, match="bfloat16"):
        ops.ewa_merge(*inputs.merge(dtype=torch.bfloat16))

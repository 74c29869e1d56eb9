"""The installed package: op registration, the kernels sub-package mapping, the CLI."""

import importlib.util

import torch

import lifelong_engine
from lifelong_engine import cli


def test_ops_registered_under_torch_ops_lifelong():
    ops = (
        "lora_kv_projection",
        "lora_term",
        "regional_cross_attention",
        "ewa_weights",
        "ewa_merge",
        "ewa_weights_rows",
    )
    for name in ops:
        assert getattr(torch.ops.lifelong, name) is not None
        assert getattr(lifelong_engine.ops, name).__doc__.strip()


def test_kernels_installed_under_the_package_only():
    """`kernels/` is lifelong_engine.kernels; no top-level `kernels` module (another package's name)."""
    assert importlib.util.find_spec("lifelong_engine.kernels") is not None
    assert importlib.util.find_spec("kernels") is None


def test_cli_info(capsys, monkeypatch):
    monkeypatch.setenv("LIFELONG_BACKEND", "reference")
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"lifelong-engine {lifelong_engine.__version__}" in out
    assert "backends available: " in out and "reference" in out
    assert "backend requested: reference" in out


def test_top_level_names():
    from lifelong_engine.pipeline import LifelongPipeline

    assert lifelong_engine.LifelongPipeline is LifelongPipeline
    assert lifelong_engine.ConceptAdapter is not None and lifelong_engine.ConceptStore is not None

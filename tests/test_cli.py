"""The `lifelong-engine concepts` commands on a real store."""

import pytest
from concept_factory import make_adapter
from test_formats import base_unet, kohya_file  # noqa: F401  (fixture and file maker)

from lifelong_engine import cli
from lifelong_engine.store import ConceptStore


def test_concepts_commands(tmp_path, capsys, base_unet):  # noqa: F811
    store = str(tmp_path / "store")
    src = kohya_file(base_unet, tmp_path / "k.safetensors")
    assert cli.main(["concepts", "import", str(src), "--store", store, "--name", "mug", "--class-word", "mug"]) == 0
    with ConceptStore(store) as s:
        s.save(make_adapter("my-dog"), namespace="alice")
    assert cli.main(["concepts", "list", "--store", store]) == 0
    out = capsys.readouterr().out
    assert "mug" in out and "alice" in out and "imported-lora" in out
    assert cli.main(["concepts", "export", "mug", "--store", store, "--out", str(tmp_path / "o.safetensors")]) == 0
    assert (tmp_path / "o.safetensors").exists()
    assert cli.main(["concepts", "verify", "--store", store]) == 0
    assert "2 concept versions checked, 0 problems" in capsys.readouterr().out
    assert cli.main(["concepts", "delete", "my-dog", "--namespace", "alice", "--store", store]) == 0
    assert cli.main(["concepts", "prune", "--store", store]) == 0


def test_concepts_errors_are_one_line(tmp_path, capsys):
    store = str(tmp_path / "store")
    assert cli.main(["concepts", "delete", "ghost", "--store", store]) == 2
    assert "error: concept default/ghost is not in the store" in capsys.readouterr().err
    with ConceptStore(store) as s:
        s.save(make_adapter("my-dog"))
        (s.root / s.record("my-dog").file).write_bytes(b"broken")
    assert cli.main(["concepts", "verify", "--store", store]) == 1
    assert "my-dog" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["concepts", "list"])  # --store is required

"""Hostile files given to the importer and the CLI: each is refused with a ValueError naming the file
and the problem (never a raw exception, a hang or a memory blow-up); the CLI prints one line, exit 2."""

import os

import pytest
import safetensors.torch
import torch
from hostile_files import CORPUS, kohya, write_corpus

from lifelong_engine import cli
from lifelong_engine.formats import import_lora


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("hostile"))


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_importer_refuses_hostile_file(corpus, name):
    path = next(p for p in corpus if p.name == name)
    with pytest.raises(ValueError) as info:
        import_lora(path, "x")
    message = str(info.value)
    assert str(path) in message and corpus[path] in message, message
    assert type(info.value) in (ValueError,), type(info.value)


@pytest.mark.parametrize("name", ["zip-bomb.pt", "rank-0.safetensors", "int-keys.pt", "vector-alpha.safetensors"])
def test_cli_prints_one_line_and_exits_2(corpus, name, tmp_path, capsys):
    path = next(p for p in corpus if p.name == name)
    assert cli.main(["concepts", "import", str(path), "--store", str(tmp_path / "s"), "--name", "x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and str(path) in err, err


def test_safetensors_named_bin_is_read_by_content(tmp_path):
    path = tmp_path / "lora.bin"
    safetensors.torch.save_file(kohya(alpha=torch.tensor(1.0)), path)
    adapter = import_lora(path, "k")
    assert adapter.rank == 2 and adapter.scale == 0.5


def test_special_files_are_refused_without_reading(tmp_path):
    fifo = tmp_path / "fifo.safetensors"
    os.mkfifo(fifo)
    zero = tmp_path / "zero.safetensors"
    zero.symlink_to("/dev/zero")
    for path in (fifo, zero, tmp_path):
        with pytest.raises(ValueError, match="not a regular file") as info:
            import_lora(path, "x")
        assert str(path) in str(info.value)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        import_lora(tmp_path / "missing.pt", "x")


def test_sparse_legacy_file_is_refused_without_reading(tmp_path):
    """A 3 GiB sparse file (no disk used) is judged by its header, not read in full."""
    path = tmp_path / "sparse.pt"
    with open(path, "wb") as f:
        f.truncate(3 * 2**30)
    with pytest.raises(ValueError, match="neither") as info:
        import_lora(path, "x")
    assert str(path) in str(info.value)

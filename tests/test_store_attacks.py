"""ConceptStore under attack: delete/prune/save races, a tampered index, hostile files in the store,
live writers' temp files, orphans, a corrupt index and a full disk (issue 13, rows 1-4, 9, 15)."""

import contextlib
import hashlib
import os
import pathlib
import resource
import signal
import sqlite3
import subprocess
import sys
import threading

import pytest
from concept_factory import assert_same, make_adapter
from test_store import _execute, open_store  # noqa: F401  (the fixture: both backends, as in test_store)

from lifelong_engine import cli
from lifelong_engine.concepts import validate_name
from lifelong_engine.errors import ConceptNotFoundError, ConceptStoreError
from lifelong_engine.store import ConceptStore, atomic_torch_save


@pytest.fixture
def store(open_store):  # noqa: F811
    with open_store() as s:
        yield s


@pytest.fixture
def sqlite_store(tmp_path):
    """For the cases that stage a failure of SQLite itself (its page limit, a closed handle)."""
    with ConceptStore(tmp_path / "store") as s:
        yield s


def _once_before(monkeypatch, cls, method, action):
    """Run ``action()`` once, just before the first call of ``cls.method`` (to stage a race)."""
    original = getattr(cls, method)
    fired = []

    def wrapper(*args, **kwargs):
        if not fired:
            fired.append(True)
            action()
        return original(*args, **kwargs)

    monkeypatch.setattr(cls, method, wrapper)


# ------------------------------------------------------------------ row 1: delete racing save


def test_save_between_delete_commit_and_unlink_keeps_the_new_version(store, open_store, monkeypatch):  # noqa: F811
    """Row 1: a save that lands after delete's commit, before its unlinks, must survive them."""
    for seed in range(3):
        store.save(make_adapter(seed=seed))
    other = open_store()
    new = make_adapter(seed=99)
    versions = []
    _once_before(monkeypatch, pathlib.Path, "unlink", lambda: versions.append(other.save(new)))
    assert store.delete("my-dog") == 3
    monkeypatch.undo()
    assert versions == [1]
    assert_same(store.load("my-dog"), new)
    assert store.verify() == []
    other.close()


# ------------------------------------------------------------------ row 2: untrusted paths


@pytest.mark.parametrize("bad", ["dog\n", "dog\r", "a/b", "..", "x..y", "", " dog", "dog "])
def test_validate_name_refuses_newlines_and_paths(bad):
    with pytest.raises(ValueError):
        validate_name(bad)


def test_save_rechecks_the_adapter_name(store):
    adapter = make_adapter()
    adapter.name = "../../../escaped"
    with pytest.raises(ValueError, match="concept name"):
        store.save(adapter)
    assert store.list() == []
    assert not list(store.root.parent.rglob("*escaped*"))


@pytest.mark.parametrize("how", ["absolute", "dotdot", "other-concept"])
def test_tampered_index_paths_are_never_touched(store, tmp_path, how):
    """Row 2: an index row naming a file outside the concept's place: delete/prune/load never touch it."""
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    store.save(make_adapter("my-mug"))
    mug = store.root / store.record("my-mug").file
    for seed in range(2):
        store.save(make_adapter(seed=seed))
    target = {
        "absolute": str(victim),
        "dotdot": "concepts/../../victim.txt",
        "other-concept": str(mug.relative_to(store.root)),
    }[how]
    _execute(store, "UPDATE concepts SET file=? WHERE name='my-dog' AND version=1", (target,))
    with pytest.raises(ConceptStoreError, match="not this concept's file"):
        store.load("my-dog", version=1)
    assert any("not this concept's file" in p for p in store.verify())
    store.prune(keep=1)
    assert store.delete("my-dog") == 1
    assert victim.read_text() == "precious" and mug.exists()
    assert_same(store.load("my-mug"), make_adapter("my-mug"))


def test_symlinked_concept_directory_is_refused(store, tmp_path):
    store.save(make_adapter())
    rec = store.record("my-dog")
    outside = tmp_path / "outside"
    (store.root / rec.file).parent.rename(outside)
    (store.root / rec.file).parent.symlink_to(outside)
    with pytest.raises(ConceptStoreError, match="outside the store"):
        store.load("my-dog")
    store.delete("my-dog")
    assert (outside / pathlib.Path(rec.file).name).exists()


# ------------------------------------------------------------------ row 3: live writers' temp files


def test_prune_spares_live_writers_temp_files(store):
    """Row 3: prune removes temp files of dead writers only; the trainer's checkpoint temp is recognised."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # a pid that is (almost certainly) not running any more
    live = [f"cidm-dog.ckpt.{os.getpid()}.tmp", f"save-0a1b.{os.getpid()}.tmp", f"{os.getpid()}-0a1b.tmp"]
    dead = [f"cidm-dog.ckpt.{child.pid}.tmp", f"{child.pid}-0a1b.tmp"]
    foreign = ["notes.txt", "cidm-dog.ckpt", "weird.tmp"]
    for name in live + dead + foreign:
        (store.staging / name).write_bytes(b"x")
    store.prune()
    assert sorted(p.name for p in store.staging.iterdir()) == sorted(live + foreign)


def test_prune_during_atomic_torch_save_does_not_break_it(store, open_store, monkeypatch):  # noqa: F811
    """The trainer's checkpoint write (atomic_torch_save into staging/) survives a prune mid-write."""
    import torch

    _once_before(monkeypatch, os, "replace", lambda: open_store().prune())
    atomic_torch_save({"step": 3}, store.staging / "cidm-dog.ckpt")
    monkeypatch.undo()
    assert torch.load(store.staging / "cidm-dog.ckpt", weights_only=True) == {"step": 3}


# ------------------------------------------------------------------ row 4: prune during save, orphans


def test_load_newest_while_prune_removes_it_returns_the_newer_version(store, open_store, monkeypatch):  # noqa: F811
    """Row 4: load() read the index (v2 newest); before it opens the file a save (v3) and a prune
    remove v2. load returns v3 instead of "v2 ... the file is missing"."""
    store.save(make_adapter(seed=1))
    store.save(make_adapter(seed=2))
    other = open_store()

    def race():
        other.save(make_adapter(seed=3))
        other.prune(keep=1)

    _once_before(monkeypatch, ConceptStore, "_read", race)
    assert_same(store.load("my-dog"), make_adapter(seed=3))
    monkeypatch.undo()
    other.close()


def test_load_of_a_version_deleted_meanwhile_is_not_found(store, open_store, monkeypatch):  # noqa: F811
    store.save(make_adapter(seed=1))
    store.save(make_adapter(seed=2))
    other = open_store()
    _once_before(monkeypatch, ConceptStore, "_read", lambda: other.delete("my-dog", version=1))
    with pytest.raises(ConceptNotFoundError, match="v1"):
        store.load("my-dog", version=1)
    other.close()


def test_prune_collects_orphan_version_files(store):
    """Row 4: a version file renamed into place by a save killed before its commit is an orphan that
    prune removes (under the index write lock, so never a live save's file); other files stay."""
    store.save(make_adapter())
    kept = store.root / store.record("my-dog").file
    folder = kept.parent
    orphans = [folder / "v2.safetensors", folder / "v2-00ff00ff00ff.safetensors"]
    ghost = store.root / "concepts/default/ghost/v1-abcdef012345.safetensors"
    ghost.parent.mkdir(parents=True)
    for p in [*orphans, ghost]:
        p.write_bytes(b"half a concept")
    (folder / "README.txt").write_text("not the store's")
    store.prune()
    assert sorted(p.name for p in folder.iterdir()) == sorted([kept.name, "README.txt"])
    assert not ghost.parent.exists()
    assert store.verify() == []


# ------------------------------------------------------------------ row 9: hostile files in the store


def _swap(store, name, make):
    path = store.root / store.record(name).file
    path.unlink()
    make(path)
    return path


def test_fifo_in_place_of_a_concept_file_does_not_hang(store):
    store.save(make_adapter())
    path = _swap(store, "my-dog", os.mkfifo)
    outcome = []

    def load():
        try:
            store.load("my-dog")
        except ConceptStoreError as e:
            outcome.append(str(e))

    t = threading.Thread(target=load, daemon=True)
    t.start()
    t.join(30)
    if t.is_alive():  # unblock the reader so the test ends, then fail
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        t.join()
        pytest.fail("load() blocked on a FIFO")
    assert outcome and "not a regular file" in outcome[0]
    assert any("not a regular file" in p for p in store.verify())


def test_link_to_dev_zero_is_refused(store):
    store.save(make_adapter())
    _swap(store, "my-dog", lambda p: p.symlink_to("/dev/zero"))
    with pytest.raises(ConceptStoreError, match="symbolic link"):
        store.load("my-dog")


def test_sparse_file_is_refused_by_its_size_before_reading(store):
    store.save(make_adapter())
    rec = store.record("my-dog")

    def sparse(p):
        with open(p, "wb") as f:
            f.truncate(3 * 2**30)

    _swap(store, "my-dog", sparse)
    with pytest.raises(ConceptStoreError, match=f"has {3 * 2**30} bytes, the index says {rec.size}"):
        store.load("my-dog")


# ------------------------------------------------------------------ row 15: corrupt index, full disk


def test_corrupt_index_is_a_clear_error(tmp_path, capsys):
    root = tmp_path / "store"
    with ConceptStore(root) as s:
        s.save(make_adapter())
    (root / "index.sqlite").write_bytes(b"this is not a database" * 100)
    for suffix in ("-wal", "-shm"):
        (root / f"index.sqlite{suffix}").unlink(missing_ok=True)
    with pytest.raises(ConceptStoreError, match="index.sqlite"):
        ConceptStore(root).list()
    assert cli.main(["concepts", "list", "--store", str(root)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "index.sqlite" in err, err


def test_index_full_is_a_clear_error_and_leaves_no_file(sqlite_store):
    store = sqlite_store
    store.save(make_adapter("my-mug"))
    (pages,) = store._index.db.execute("PRAGMA page_count").fetchone()
    store._index.db.execute(f"PRAGMA max_page_count={pages}")  # the index cannot grow: SQLITE_FULL
    with pytest.raises(ConceptStoreError, match="index.sqlite: database or disk is full"):
        for seed in range(500):
            store.save(make_adapter(seed=seed))
    rows = {r.file for r in store.list(all_versions=True)}
    files = {p.relative_to(store.root).as_posix() for p in (store.root / "concepts").rglob("*.safetensors")}
    assert files == rows and store.verify() == []
    assert list(store.staging.iterdir()) == []


@pytest.mark.parametrize(
    "limit,expected",
    [(512, "index.sqlite: disk I/O error"), (40000, "cannot write")],  # the index's -shm, or the concept file
)
@contextlib.contextmanager
def _file_size_limit(limit: int):
    """Writes past ``limit`` bytes fail with EFBIG, as on a full disk (this process, for the block)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


@pytest.mark.parametrize(
    "limit,expected",
    [(512, "index.sqlite: disk I/O error"), (40000, "cannot write")],  # the index's -shm, or the concept file
)
def test_full_disk_during_import_is_one_line(tmp_path, capsys, limit, expected):
    """The CLI when writes fail like on a full disk: one error line, exit 2, store intact."""
    import safetensors.torch
    from hostile_files import peft

    src = tmp_path / "big.safetensors"
    safetensors.torch.save_file(peft(rank=64, din=128, dout=128), src)  # ~260 KB
    root = tmp_path / "store"
    ConceptStore(root).close()
    with _file_size_limit(limit):
        code = cli.main(["concepts", "import", str(src), "--store", str(root), "--name", "k"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: ") and expected in err, err
    with ConceptStore(root) as s:
        assert s.verify() == [] and "k" not in s
    assert list((root / "staging").iterdir()) == []


def test_index_errors_do_not_leak_sqlite_exceptions(sqlite_store):
    store = sqlite_store
    store._index.db.close()
    with pytest.raises(ConceptStoreError, match="index.sqlite"):
        store.list()
    assert not issubclass(ConceptStoreError, sqlite3.Error)


def test_digest_is_still_checked(store):
    """The checks added before reading keep the old ones: same size, other bytes → sha256 mismatch."""
    store.save(make_adapter())
    rec = store.record("my-dog")
    path = store.root / rec.file
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    assert hashlib.sha256(data).hexdigest() != rec.sha256
    with pytest.raises(ConceptStoreError, match="sha256"):
        store.load("my-dog")


@pytest.mark.parametrize("column,value", [("words", "not json"), ("size", "big"), ("words", '{"a": 1}')])
def test_malformed_index_row_is_a_store_error(sqlite_store, capsys, column, value):
    store = sqlite_store
    store.save(make_adapter())
    store._index.db.execute(f"UPDATE concepts SET {column}=?", (value,))
    with pytest.raises(ConceptStoreError, match="malformed row"):
        store.list()
    assert cli.main(["concepts", "list", "--store", str(store.root)]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_checkpoint_write_on_a_full_disk_is_a_clear_oserror(tmp_path):
    """atomic_torch_save (the trainer's checkpoints) when writes fail: an OSError naming the file, no temp left."""
    import torch

    with _file_size_limit(4096), pytest.raises(OSError, match="cannot write") as info:
        atomic_torch_save({"x": torch.zeros(10000)}, tmp_path / "cidm-dog.ckpt")
    assert "cidm-dog.ckpt" in str(info.value) and list(tmp_path.iterdir()) == []

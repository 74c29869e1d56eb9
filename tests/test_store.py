"""ConceptStore: versions, listing, deletion, corruption reports, crash safety, concurrency."""

import contextlib
import os
import random
import signal
import time
import uuid

import pytest
import torch
from concept_factory import assert_same, make_adapter

from lifelong_engine.errors import ConceptNotFoundError, ConceptStoreError
from lifelong_engine.store import ConceptStore

# A database the tests may create schemas in (.ci/run starts a server on loopback and sets it).
POSTGRES_URL = os.environ.get("LIFELONG_TEST_POSTGRES_URL", "")


def _postgres_reachable() -> str | None:
    """Why the PostgreSQL tests cannot run here (None when they can)."""
    if not POSTGRES_URL:
        return "LIFELONG_TEST_POSTGRES_URL is not set (a PostgreSQL database for the tests)"
    try:
        import psycopg
    except ImportError:
        return "psycopg is not installed (pip install 'lifelong-engine[postgres]')"
    try:
        psycopg.connect(POSTGRES_URL, connect_timeout=2).close()
    except psycopg.Error as e:
        return f"no PostgreSQL server at {POSTGRES_URL} (set LIFELONG_TEST_POSTGRES_URL): {str(e).strip()[:200]}"
    return None


@pytest.fixture(params=["sqlite", "postgres"])
def open_store(request, tmp_path):
    """A function opening (another handle on) one fresh store of the test's backend: a directory, or a
    PostgreSQL schema of its own (through the URL's search_path) with files in a directory."""
    if request.param == "sqlite":
        yield lambda: ConceptStore(tmp_path / "store")
        return
    why = _postgres_reachable()
    if why is not None:
        pytest.skip(why)
    import psycopg

    schema = f"store_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(POSTGRES_URL, autocommit=True) as admin:
        admin.execute(f"CREATE SCHEMA {schema}")
    sep = "&" if "?" in POSTGRES_URL else "?"
    url = f"{POSTGRES_URL}{sep}options=-csearch_path%3D{schema}"
    try:
        yield lambda: ConceptStore(url, files=tmp_path / "store")
    finally:
        with psycopg.connect(POSTGRES_URL, autocommit=True) as admin:
            admin.execute(f"DROP SCHEMA {schema} CASCADE")


@pytest.fixture
def store(open_store):
    with open_store() as s:
        yield s


def _execute(store, query: str, args=()) -> None:
    """Tamper with the index directly (either backend), e.g. to stage a damaged store."""
    with store._index.write() as db:
        db.execute(query, args)


def test_save_load_round_trip(store):
    adapter = make_adapter()
    assert store.save(adapter) == 1
    assert_same(store.load("my-dog"), adapter)
    assert "my-dog" in store and len(store) == 1


def test_versions_and_listing(store):
    store.save(make_adapter(seed=1))
    store.save(make_adapter(seed=2))
    store.save(make_adapter("my-mug", seed=3), namespace="alice")
    assert_same(store.load("my-dog"), make_adapter(seed=2))
    assert_same(store.load("my-dog", version=1), make_adapter(seed=1))
    latest = store.list()
    assert [(r.namespace, r.name, r.version) for r in latest] == [("alice", "my-mug", 1), ("default", "my-dog", 2)]
    assert [r.version for r in store.list("default", all_versions=True)] == [1, 2]
    rec = store.list("alice")[0]
    assert (rec.token, rec.words, rec.rank, rec.method, rec.base_fingerprint) == (
        "<my-mug>",
        ["<my-mug>", "<my-mug>_1"],
        2,
        "cidm",
        "tiny-base",
    )
    assert isinstance(rec.created, float) and rec.created > 0  # a Unix timestamp (no clock comparison)


def test_unknown_concept(store):
    with pytest.raises(ConceptNotFoundError, match="concept default/nobody is not in the store"):
        store.load("nobody")
    store.save(make_adapter())
    with pytest.raises(ConceptNotFoundError, match="v7"):
        store.load("my-dog", version=7)


def test_delete_and_prune(store):
    for seed in range(3):
        store.save(make_adapter(seed=seed))
    store.save(make_adapter("my-mug"))
    assert store.prune(keep=1) == 2
    assert [r.version for r in store.list(all_versions=True) if r.name == "my-dog"] == [3]
    assert len(list((store.root / "concepts/default/my-dog").iterdir())) == 1
    assert store.delete("my-dog") == 1
    assert "my-dog" not in store and "my-mug" in store
    assert not list((store.root / "concepts/default/my-dog").iterdir())
    with pytest.raises(ConceptNotFoundError):
        store.delete("my-dog")
    with pytest.raises(ValueError, match="keep must be >= 1"):
        store.prune(keep=0)


def test_refuses_non_finite(store):
    adapter = make_adapter()
    adapter.concept_embeddings[0, 0] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        store.save(adapter)
    assert store.list() == []


@pytest.mark.parametrize("namespace", ["../up", "a/b", ""])
def test_bad_namespace_writes_nothing(store, namespace):
    with pytest.raises(ValueError, match="namespace"):
        store.save(make_adapter(), namespace=namespace)
    assert store.list() == [] and not (store.root.parent / "up").exists()


def _damage(store, name, how):
    path = store.root / store.record(name).file
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "altered":
        path.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    elif how == "missing":
        path.unlink()
    elif how == "garbage":  # a file the index vouches for, but not safetensors
        path.write_bytes(b"\x00" * len(data))


@pytest.mark.parametrize(
    "how,reason",
    [("truncated", "truncated"), ("altered", "does not match the index"), ("missing", "the file is missing")],
)
def test_corruption_is_reported_by_name_and_isolated(store, how, reason):
    store.save(make_adapter("my-dog"))
    store.save(make_adapter("my-mug"))
    _damage(store, "my-dog", how)
    with pytest.raises(ConceptStoreError, match=f"concept default/my-dog v1 .*{reason}"):
        store.load("my-dog")
    assert_same(store.load("my-mug"), make_adapter("my-mug"))
    problems = store.verify()
    assert len(problems) == 1 and "my-dog" in problems[0] and reason in problems[0]


def test_unparseable_file_with_matching_index_is_reported(store):
    """If the index itself vouches for a file that is not a concept, load says so clearly."""
    store.save(make_adapter())
    rec = store.record("my-dog")
    garbage = b"\xff" * rec.size
    (store.root / rec.file).write_bytes(garbage)
    import hashlib

    _execute(store, "UPDATE concepts SET sha256=?", (hashlib.sha256(garbage).hexdigest(),))
    with pytest.raises(ConceptStoreError, match="not a valid concept file"):
        store.load("my-dog")


def test_store_files_are_safetensors_not_pickles(store):
    store.save(make_adapter())
    data = (store.root / store.record("my-dog").file).read_bytes()
    assert data[8:9] == b"{" and b"__metadata__" in data[:4096]


def _fork(fn) -> int:
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        code = 0
        try:
            fn()
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    return pid


def _save_forever(open_store, seed):
    torch.set_num_threads(1)
    store = open_store()
    rng = random.Random(seed)
    while True:
        name = rng.choice(["my-dog", "my-mug", "my-cat"])
        store.save(make_adapter(name, seed=rng.randrange(1000)))
        if rng.random() < 0.2:
            store.prune(keep=2)


def _read_forever(open_store, names, stop):
    """A reader: load the newest version of each name until ``stop`` exists; any error but
    'not found' (e.g. a transient 'file is missing' while a prune runs) fails the process."""
    torch.set_num_threads(1)
    store = open_store()
    reads = 0
    while not stop.exists():
        for name in names:
            try:
                store.load(name)
                reads += 1
            except ConceptNotFoundError:
                pass
    (stop.parent / f"reads-{os.getpid()}").write_text(str(reads))


def _files_on_disk(store) -> set[str]:
    return {p.relative_to(store.root).as_posix() for p in (store.root / "concepts").rglob("*") if p.is_file()}


KILLS = 25


def test_sigkill_at_random_moments_leaves_store_consistent(tmp_path, open_store):
    """A writer killed with SIGKILL anywhere inside save/prune never leaves a broken concept, readers
    running all along never see an error, and prune afterwards collects every orphan file."""
    open_store().close()
    stop = tmp_path / "stop"
    names = ["my-dog", "my-mug", "my-cat"]
    readers = [_fork(lambda: _read_forever(open_store, names, stop)) for _ in range(2)]
    rng = random.Random(0)
    for i in range(KILLS):
        pid = _fork(lambda i=i: _save_forever(open_store, i))
        time.sleep(rng.uniform(0.01, 0.25))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        with open_store() as store:
            assert store.verify() == [], f"iteration {i}"
            for rec in store.list(all_versions=True):
                store.load(rec.name, rec.namespace, rec.version)
    stop.touch()
    for pid in readers:
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, "a reader saw an error"
    assert all(int(p.read_text()) > 0 for p in tmp_path.glob("reads-*"))
    with open_store() as store:
        assert len(store) >= 1  # the loop did save something
        store.prune(keep=1)
        assert list(store.staging.glob("*.tmp")) == []
        assert _files_on_disk(store) == {r.file for r in store.list(all_versions=True)}  # no orphans left
        assert store.verify() == []


def test_delete_prune_save_race(tmp_path, open_store):
    """Processes saving, deleting and pruning the same names at once, with a reader: every listed
    version stays whole (a delete never unlinks a racing save's file), the reader never sees a
    transient error, and nothing is left behind."""
    open_store().close()

    def saver():
        store = open_store()
        for j in range(30):
            store.save(make_adapter("churn", seed=j))
            store.save(make_adapter("keep", seed=j))

    def deleter():
        store = open_store()
        for _ in range(30):
            with contextlib.suppress(ConceptNotFoundError):
                store.delete("churn")

    def pruner():
        store = open_store()
        for _ in range(30):
            store.prune(keep=1)
            for name in ("keep", "churn"):
                with contextlib.suppress(ConceptNotFoundError):
                    store.load(name)

    torch.set_num_threads(1)
    pids = [_fork(f) for f in (saver, deleter, pruner)]
    for pid in pids:
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    with open_store() as store:
        assert store.verify() == []
        assert_same(store.load("keep"), make_adapter("keep", seed=29))
        store.prune(keep=1)
        assert _files_on_disk(store) == {r.file for r in store.list(all_versions=True)}


def test_concurrent_writers(tmp_path, open_store):
    open_store().close()

    def write(seed):
        store = open_store()
        for j in range(15):
            store.save(make_adapter("shared", seed=seed * 100 + j))
            store.save(make_adapter(f"own-{seed}", seed=j))

    pids = [_fork(lambda s=s: write(s)) for s in range(3)]
    for pid in pids:
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    with open_store() as store:
        assert store.verify() == []
        versions = [r.version for r in store.list(all_versions=True) if r.name == "shared"]
        assert versions == list(range(1, 46))
        assert len(store) == 4


def test_two_processes_saving_one_name_get_every_version_once(tmp_path, open_store):
    """Two writers started together on one name: the versions they are given are 1..N, each exactly once
    (the index's write lock and primary key: no gap, no duplicate), and every one loads."""
    open_store().close()
    go = tmp_path / "go"

    def write(seed):
        store = open_store()
        while not go.exists():
            time.sleep(0.001)
        got = [store.save(make_adapter("shared", seed=seed * 100 + j)) for j in range(20)]
        (tmp_path / f"versions-{seed}").write_text(" ".join(map(str, got)))

    torch.set_num_threads(1)
    pids = [_fork(lambda s=s: write(s)) for s in range(2)]
    go.touch()
    for pid in pids:
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    given = [int(v) for s in range(2) for v in (tmp_path / f"versions-{s}").read_text().split()]
    assert sorted(given) == list(range(1, 41))
    with open_store() as store:
        assert [r.version for r in store.list(all_versions=True)] == list(range(1, 41))
        assert store.verify() == []


@pytest.mark.parametrize(
    "location,files,message",
    [
        ("postgresql://u:secret@127.0.0.1:1/db", None, "needs files="),
        ("postgres://u@127.0.0.1:1/db", None, "needs files="),
        ("s3://bucket/concepts", None, "unsupported URL scheme 's3'"),
        ("sqlite:///x.db", None, "unsupported URL scheme 'sqlite'"),
        ("store", "elsewhere", "files= goes with a postgresql:// index URL"),
    ],
)
def test_a_url_is_never_taken_for_a_folder(tmp_path, monkeypatch, location, files, message):
    """Before: ConceptStore('postgresql://…') created a local folder 'postgresql:' and worked there."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=message) as info:
        ConceptStore(location, files=files)
    assert "secret" not in str(info.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "url,shown",
    [
        ("postgresql://u:secret@127.0.0.1:1/db", "postgresql://u:***@127.0.0.1:1/db"),
        ("postgresql://u@127.0.0.1:1/db?password=secret&sslmode=disable", "db?password=***&sslmode=disable"),
    ],
)
def test_unreachable_postgres_is_a_store_error_naming_the_index_without_password(tmp_path, url, shown):
    pytest.importorskip("psycopg")
    with pytest.raises(ConceptStoreError) as info:
        ConceptStore(url, files=tmp_path / "files", timeout=2)
    assert shown in str(info.value) and "secret" not in str(info.value)


def test_postgres_store_stages_per_host_and_says_where_it_is(open_store):
    with open_store() as store:
        if store._url is None:
            pytest.skip("a PostgreSQL store's layout")
        assert store.staging.parent == store.root / "staging" and store.staging.is_dir()
        assert repr(store).endswith(f", files={str(store.root)!r})")

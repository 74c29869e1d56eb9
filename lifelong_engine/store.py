"""ConceptStore: a durable library of concepts on disk.

Layout of a store directory::

    index.sqlite                                   SQLite index (WAL), one row per concept version
    concepts/<namespace>/<name>/v<version>.safetensors
    staging/                                       files being written; training checkpoints

Durability: a save writes the safetensors bytes to ``staging/`` and fsyncs them, then, holding
the index's write lock (``BEGIN IMMEDIATE``), allocates the version, renames the file into
place, fsyncs the directory and commits the index row. A process killed at any moment leaves
the index naming only complete, verified files: before the commit the new version does not
exist (a file renamed into place without its row is overwritten by the next save of that
version, and is never listed); after it, it is whole. Concurrent writers serialise on the
index lock. Loading checks each file's sha256 against the index and never unpickles.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import sqlite3
import struct
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import safetensors.torch
import torch

from .concepts import ConceptAdapter, validate_name
from .errors import ConceptNotFoundError, ConceptStoreError

__all__ = ["ConceptStore", "ConceptRecord"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS concepts (
    namespace        TEXT    NOT NULL,
    name             TEXT    NOT NULL,
    version          INTEGER NOT NULL,
    token            TEXT    NOT NULL,
    words            TEXT    NOT NULL,
    class_word       TEXT,
    base_fingerprint TEXT    NOT NULL,
    rank             INTEGER NOT NULL,
    method           TEXT    NOT NULL,
    file             TEXT    NOT NULL,
    sha256           TEXT    NOT NULL,
    size             INTEGER NOT NULL,
    created          REAL    NOT NULL,
    PRIMARY KEY (namespace, name, version)
);
"""
_COLUMNS = (
    "namespace, name, version, token, words, class_word, base_fingerprint, rank, method, file, sha256, size, created"
)


@dataclasses.dataclass(frozen=True)
class ConceptRecord:
    """One concept version as the index lists it."""

    namespace: str
    name: str
    version: int
    token: str
    words: list[str]
    class_word: str | None
    base_fingerprint: str
    rank: int
    method: str
    file: str
    sha256: str
    size: int
    created: float

    @classmethod
    def _from_row(cls, row: tuple) -> ConceptRecord:
        values = list(row)
        values[4] = json.loads(values[4])
        return cls(*values)


class ConceptStore:
    """A directory of concepts: one safetensors file per concept version and a SQLite index.

    >>> store = ConceptStore("~/concepts")
    >>> version = store.save(adapter)            # 1, then 2, ... for the same name
    >>> adapter = store.load("my-dog")           # the newest version, verified
    """

    def __init__(self, root: str | os.PathLike, timeout: float = 60.0):
        self.root = Path(root).expanduser()
        (self.root / "concepts").mkdir(parents=True, exist_ok=True)
        self.staging.mkdir(exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(
            self.root / "index.sqlite", timeout=timeout, isolation_level=None, check_same_thread=False
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)

    @property
    def staging(self) -> Path:
        """Where files are written before they enter the store (and training checkpoints go)."""
        return self.root / "staging"

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> ConceptStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ConceptStore({str(self.root)!r})"

    # ----------------------------------------------------------------- writing

    def save(self, adapter: ConceptAdapter, namespace: str = "default") -> int:
        """Store ``adapter`` as the next version of its name in ``namespace``; returns the version."""
        validate_name(namespace, "namespace")
        if not adapter.is_finite():
            raise ValueError(f"concept {adapter.name!r}: refusing to save non-finite (NaN/inf) tensors")
        tensors, header = adapter.to_safetensors()
        data = safetensors.torch.save(tensors, metadata=header)
        digest = hashlib.sha256(data).hexdigest()
        tmp = self.staging / f"{os.getpid()}-{uuid.uuid4().hex}.tmp"
        try:
            _write_durably(tmp, data)
            with self._transaction() as db:
                (latest,) = db.execute(
                    "SELECT COALESCE(MAX(version), 0) FROM concepts WHERE namespace=? AND name=?",
                    (namespace, adapter.name),
                ).fetchone()
                version = latest + 1
                rel = f"concepts/{namespace}/{adapter.name}/v{version}.safetensors"
                final = self.root / rel
                try:
                    final.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(tmp, final)
                    _fsync_dir(final.parent)
                    db.execute(
                        f"INSERT INTO concepts ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                        (
                            namespace,
                            adapter.name,
                            version,
                            adapter.token,
                            json.dumps(adapter.words),
                            adapter.class_word,
                            adapter.base_fingerprint,
                            adapter.rank,
                            adapter.method,
                            rel,
                            digest,
                            len(data),
                            time.time(),
                        ),
                    )
                except BaseException:
                    final.unlink(missing_ok=True)  # still under the write lock: nobody else owns v{version}
                    raise
        finally:
            tmp.unlink(missing_ok=True)
        return version

    def delete(self, name: str, namespace: str = "default", version: int | None = None) -> int:
        """Remove every version of a concept (or one); returns how many versions were removed."""
        with self._transaction() as db:
            rows = self._select(db, name, namespace, version, newest_only=False)
            if not rows:
                raise ConceptNotFoundError(self._describe_missing(name, namespace, version))
            db.executemany(
                "DELETE FROM concepts WHERE namespace=? AND name=? AND version=?",
                [(r.namespace, r.name, r.version) for r in rows],
            )
        self._unlink([r.file for r in rows])
        return len(rows)

    def prune(self, keep: int = 1) -> int:
        """Keep only the newest ``keep`` versions of every concept and remove leftovers of
        interrupted saves; returns how many versions were removed."""
        if keep < 1:
            raise ValueError(f"prune(keep={keep}): keep must be >= 1")
        with self._transaction() as db:
            rows = [
                ConceptRecord._from_row(r)
                for r in db.execute(
                    f"SELECT {_COLUMNS} FROM concepts AS c WHERE "
                    "(SELECT COUNT(*) FROM concepts AS n WHERE n.namespace=c.namespace AND n.name=c.name "
                    "AND n.version > c.version) >= ?",
                    (keep,),
                )
            ]
            db.executemany(
                "DELETE FROM concepts WHERE namespace=? AND name=? AND version=?",
                [(r.namespace, r.name, r.version) for r in rows],
            )
        self._unlink([r.file for r in rows])
        for leftover in self.staging.glob("*.tmp"):
            if not _pid_alive(leftover.name.split("-", 1)[0]):
                leftover.unlink(missing_ok=True)
        return len(rows)

    # ----------------------------------------------------------------- reading

    def list(self, namespace: str | None = None, all_versions: bool = False) -> list[ConceptRecord]:
        """Concepts in the store (one namespace or all), newest version of each unless ``all_versions``."""
        query = f"SELECT {_COLUMNS} FROM concepts AS c"
        where, args = [], []
        if namespace is not None:
            where.append("namespace=?")
            args.append(namespace)
        if not all_versions:
            where.append(
                "version = (SELECT MAX(version) FROM concepts AS n WHERE n.namespace=c.namespace AND n.name=c.name)"
            )
        if where:
            query += " WHERE " + " AND ".join(where)
        query += " ORDER BY namespace, name, version"
        with self._lock:
            return [ConceptRecord._from_row(r) for r in self._db.execute(query, args)]

    def record(self, name: str, namespace: str = "default", version: int | None = None) -> ConceptRecord:
        """The index record of a concept version (the newest when version is None)."""
        with self._lock:
            rows = self._select(self._db, name, namespace, version, newest_only=True)
        if not rows:
            raise ConceptNotFoundError(self._describe_missing(name, namespace, version))
        return rows[0]

    def load(self, name: str, namespace: str = "default", version: int | None = None) -> ConceptAdapter:
        """The concept (newest version unless given), verified against the index."""
        rec = self.record(name, namespace, version)
        return self._read(rec)

    def verify(self) -> list[str]:
        """Every problem found (index integrity, missing, truncated, altered or mismatched
        files); an empty list when the store is healthy."""
        problems = []
        with self._lock:
            (integrity,) = self._db.execute("PRAGMA integrity_check").fetchone()
        if integrity != "ok":
            problems.append(f"index.sqlite: integrity check failed: {integrity}")
        for rec in self.list(all_versions=True):
            try:
                self._read(rec)
            except ConceptStoreError as e:
                problems.append(str(e))
        return problems

    def __contains__(self, name: str) -> bool:
        try:
            self.record(name)
        except ConceptNotFoundError:
            return False
        return True

    def __len__(self) -> int:
        with self._lock:
            (n,) = self._db.execute("SELECT COUNT(DISTINCT namespace || '/' || name) FROM concepts").fetchone()
        return n

    # ---------------------------------------------------------------- internals

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    @staticmethod
    def _select(db, name: str, namespace: str, version: int | None, newest_only: bool) -> list[ConceptRecord]:
        query = f"SELECT {_COLUMNS} FROM concepts WHERE namespace=? AND name=?"
        args: list = [namespace, name]
        if version is not None:
            query += " AND version=?"
            args.append(version)
        query += " ORDER BY version DESC" + (" LIMIT 1" if newest_only else "")
        return [ConceptRecord._from_row(r) for r in db.execute(query, args)]

    def _describe_missing(self, name: str, namespace: str, version: int | None) -> str:
        what = f"concept {namespace}/{name}" + (f" v{version}" if version is not None else "")
        return f"{what} is not in the store at {self.root}"

    def _read(self, rec: ConceptRecord) -> ConceptAdapter:
        what = f"concept {rec.namespace}/{rec.name} v{rec.version} ({rec.file})"
        try:
            data = (self.root / rec.file).read_bytes()
        except FileNotFoundError:
            raise ConceptStoreError(f"{what}: the file is missing") from None
        except OSError as e:
            raise ConceptStoreError(f"{what}: cannot read the file: {e}") from e
        if len(data) != rec.size:
            raise ConceptStoreError(f"{what}: the file has {len(data)} bytes, the index says {rec.size} (truncated?)")
        digest = hashlib.sha256(data).hexdigest()
        if digest != rec.sha256:
            raise ConceptStoreError(f"{what}: sha256 {digest[:12]}… does not match the index ({rec.sha256[:12]}…)")
        try:
            adapter = ConceptAdapter.from_safetensors(safetensors.torch.load(data), _safetensors_metadata(data))
        except Exception as e:  # a file the index vouches for but that does not parse
            raise ConceptStoreError(f"{what}: not a valid concept file: {e}") from e
        if adapter.name != rec.name:
            raise ConceptStoreError(f"{what}: the file holds concept {adapter.name!r}")
        return adapter

    def _unlink(self, files: list[str]) -> None:
        for rel in files:
            (self.root / rel).unlink(missing_ok=True)


def _write_durably(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` string map of a safetensors file held in memory."""
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    return header.get("__metadata__", {})


def _pid_alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def atomic_torch_save(obj, path: str | os.PathLike) -> None:
    """torch.save that never leaves a torn file: temp file, fsync, rename (checkpoints, training state)."""
    path = Path(path)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)

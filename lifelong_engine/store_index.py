"""The index behind a ConceptStore: one row per concept version, on SQLite (embedded) or PostgreSQL (shared).

Both backends keep the same table and give ConceptStore the same few operations, so the store's logic
(file names, durability, verification, pruning) is written once in :mod:`lifelong_engine.store`:

- ``read(query, args)``: rows of one statement, outside any write transaction;
- ``write(key)``: a transaction holding the write lock for one concept name (``key=(namespace, name)``,
  used by save and delete) or for the whole store (``key=None``, used by prune); it yields an object
  with ``execute``/``executemany``. A transaction for a name excludes prune and the other
  transactions for that name; prune excludes every other write. (SQLite has one write lock for the
  whole file, so there every write excludes every other.)
- ``integrity()``: the problems the database itself can find;
- ``errors()``: the database's exceptions as ConceptStoreErrors naming the index.

Queries use ``?`` placeholders; the PostgreSQL backend rewrites them to psycopg's ``%s``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import sqlite3
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

from .errors import ConceptStoreError

__all__ = ["SQLiteIndex", "PostgresIndex", "SCHEMA"]

SCHEMA = """
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
# PostgreSQL's REAL is 4 bytes (it would round `created` to minutes); SQLite's REAL is 8 bytes.
_PG_SCHEMA = SCHEMA.replace("REAL   ", "DOUBLE PRECISION")
# Advisory locks: one bigint key for the whole store (shared by save/delete, exclusive for prune), and
# the two-int key space (a separate space in PostgreSQL) for one concept name.
_STORE_LOCK = int.from_bytes(hashlib.sha256(b"lifelong_engine.ConceptStore").digest()[:8], "big", signed=True)


class SQLiteIndex:
    """``index.sqlite`` in the store's directory, in WAL mode; one write lock for the whole file."""

    def __init__(self, path: Path, timeout: float):
        self.name = str(path)
        self._lock = threading.Lock()
        with contextlib.suppress(FileNotFoundError):
            if not stat.S_ISREG(os.lstat(path).st_mode):
                raise ConceptStoreError(f"{path}: the index is not a regular file")
        with self.errors():
            self.db = sqlite3.connect(path, timeout=timeout, isolation_level=None, check_same_thread=False)
            try:
                self.db.execute("PRAGMA journal_mode=WAL")
                self.db.execute("PRAGMA synchronous=FULL")
                self.db.executescript(SCHEMA)
            except BaseException:
                self.db.close()
                raise

    def read(self, query: str, args=()) -> list[tuple]:
        with self._lock, self.errors():
            return self.db.execute(query, args).fetchall()

    @contextlib.contextmanager
    def write(self, key: tuple[str, str] | None = None) -> Iterator[sqlite3.Connection]:
        with self._lock, self.errors():
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield self.db
            except BaseException:
                if self.db.in_transaction:  # SQLite may have rolled back already (e.g. disk full)
                    self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")

    def integrity(self) -> list[str]:
        (result,) = self.read("PRAGMA integrity_check")[0]
        return [] if result == "ok" else [f"{self.name}: integrity check failed: {result}"]

    @contextlib.contextmanager
    def errors(self) -> Iterator[None]:
        """SQLite's errors (corrupt index, disk full, locked for too long) as ConceptStoreErrors."""
        try:
            yield
        except sqlite3.Error as e:
            raise ConceptStoreError(f"{self.name}: {e}") from e

    def close(self) -> None:
        self.db.close()


class _PgTransaction:
    """The object a PostgreSQL write transaction yields: ``execute``/``executemany`` with ``?`` placeholders."""

    def __init__(self, conn):
        self._conn = conn

    def execute(self, query: str, args=()):
        return self._conn.execute(query.replace("?", "%s"), args)

    def executemany(self, query: str, rows) -> None:
        with self._conn.cursor() as cur:
            cur.executemany(query.replace("?", "%s"), rows)


class PostgresIndex:
    """The ``concepts`` table in a PostgreSQL database (the schema ``search_path`` names), psycopg 3.

    Writes take advisory transaction locks: the store lock shared plus the concept name's lock for a
    save/delete, the store lock exclusive for prune; they wait at most ``timeout`` seconds.
    """

    def __init__(self, url: str, timeout: float):
        self.name = redact(url)
        try:
            import psycopg
        except ImportError as e:
            raise ConceptStoreError(
                f"{self.name}: a PostgreSQL index needs psycopg 3: pip install 'lifelong-engine[postgres]'"
            ) from e
        self._psycopg = psycopg
        self._lock = threading.Lock()
        with self.errors():
            self.db = psycopg.connect(url, autocommit=True, connect_timeout=max(1, round(timeout)))
            try:
                self.db.execute(f"SET lock_timeout = {int(timeout * 1000)}")
                with self.db.transaction():  # concurrent CREATE TABLE IF NOT EXISTS can collide: serialise
                    self.db.execute("SELECT pg_advisory_xact_lock(%s)", (_STORE_LOCK,))
                    self.db.execute(_PG_SCHEMA)
            except BaseException:
                self.db.close()
                raise

    def read(self, query: str, args=()) -> list[tuple]:
        with self._lock, self.errors():
            return self.db.execute(query.replace("?", "%s"), args).fetchall()

    @contextlib.contextmanager
    def write(self, key: tuple[str, str] | None = None) -> Iterator[_PgTransaction]:
        with self._lock, self.errors(), self.db.transaction():
            if key is None:
                self.db.execute("SELECT pg_advisory_xact_lock(%s)", (_STORE_LOCK,))
            else:
                self.db.execute("SELECT pg_advisory_xact_lock_shared(%s)", (_STORE_LOCK,))
                self.db.execute("SELECT pg_advisory_xact_lock(%s, %s)", (_key32(key[0]), _key32(key[1])))
            yield _PgTransaction(self.db)

    def integrity(self) -> list[str]:
        """The table must keep its primary key: without it two writers could record the same version."""
        (keys,) = self.read(
            "SELECT COUNT(*) FROM pg_constraint WHERE conrelid = 'concepts'::regclass AND contype = 'p'"
        )[0]
        return [] if keys == 1 else [f"{self.name}: the concepts table has lost its primary key"]

    @contextlib.contextmanager
    def errors(self) -> Iterator[None]:
        """psycopg's errors (server gone, lock timeout, bad URL) as ConceptStoreErrors naming the index."""
        try:
            yield
        except self._psycopg.Error as e:
            raise ConceptStoreError(f"{self.name}: {' '.join(str(e).split())}") from e

    def close(self) -> None:
        self.db.close()


def redact(url: str) -> str:
    """``url`` without its password (for messages and repr)."""
    url = re.sub(r"^([^:/]+://[^:@/]*):[^@/]*@", r"\1:***@", url)
    return re.sub(r"([?&]password=)[^&]*", r"\1***", url)


def _key32(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "big", signed=True)

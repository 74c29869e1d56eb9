"""ConceptStore: a durable library of concepts on disk.

Where: ``ConceptStore(directory)`` is the embedded default (the layout below, SQLite index);
``ConceptStore("postgresql://…", files=directory)`` keeps the index in PostgreSQL (the same table,
see :mod:`lifelong_engine.store_index`) and the files in ``directory``, shared by every process and
machine using that index; there each host stages in ``staging/<hostname>/``. Every guarantee below
holds for both: "the index's write lock" is SQLite's ``BEGIN IMMEDIATE`` or, on PostgreSQL, an
advisory lock per concept name (saves, deletes) and one for the whole store (prune).

Layout of a store directory::

    index.sqlite                                   SQLite index (WAL), one row per concept version
    concepts/<namespace>/<name>/v<version>-<id>.safetensors   (<id>: random, unique per save)
    staging/                                       files being written (<stem>.<pid>.tmp); training checkpoints

Durability: a save writes the safetensors bytes to ``staging/`` and fsyncs them, then, holding
the index's write lock (``BEGIN IMMEDIATE``), allocates the version, renames the file into
place, fsyncs the directory and commits the index row. A process killed at any moment leaves
the index naming only complete, verified files: before the commit the new version does not
exist (a file renamed into place without its row is an orphan, never listed, and ``prune``
collects it); after it, it is whole. Concurrent writers serialise on the index lock.

Safety against races and hostile files: file names are never reused (a delete racing a save of
the same name cannot unlink the new version's file); every path the store touches is proven to be
the concept's own place under the root (a tampered index cannot make it read or delete anything
else); a file is opened without following links and checked to be a regular file of the recorded
size before a byte is read; a concurrent delete/prune between the index read and the file read makes
``load`` look again instead of failing; ``prune`` removes only the temp files of writers that are no
longer running and the orphans it sees while holding the write lock. Index (SQLite) failures, a
corrupt index or a full disk included, are ConceptStoreErrors naming the index. Loading checks each
file's sha256 against the index and never unpickles.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import os
import re
import socket
import stat
import struct
import time
import uuid
from pathlib import Path

import safetensors.torch
import torch

from .concepts import ConceptAdapter, validate_name
from .errors import ConceptNotFoundError, ConceptStoreError
from .store_index import PostgresIndex, SQLiteIndex, redact

__all__ = ["ConceptStore", "ConceptRecord"]

# Where a version's file may be: its own folder, v<version>[-<id>].safetensors (no id: stores written before ids).
_FILE = re.compile(
    r"concepts/(?P<namespace>[^/]+)/(?P<name>[^/]+)/v(?P<version>[0-9]+)(?:-[0-9a-f]{8,64})?\.safetensors"
)
# Temp files of writers: <stem>.<pid>.tmp (saves, atomic_torch_save) or <pid>-<hex>.tmp (older saves).
_TEMP = re.compile(r"(?:.+\.(?P<pid>[0-9]+)|(?P<old_pid>[0-9]+)-[0-9a-f]+)\.tmp")
# A location that is a URL (scheme://...), never to be taken for a folder name.
_URL = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://")
_POSTGRES_SCHEMES = ("postgresql", "postgres")
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
        types = (str, str, int, str, str, (str, type(None)), str, int, str, str, str, int, (float, int))
        try:
            values[4] = json.loads(values[4]) if isinstance(values[4], str) else None
            ok = all(isinstance(v, t) for v, t in zip(row, types)) and isinstance(values[4], list)
        except ValueError:
            ok = False
        if not ok:  # a tampered or damaged index
            raise ConceptStoreError(f"index.sqlite: a malformed row for concept {row[0]!r}/{row[1]!r}: {row!r}"[:300])
        return cls(*values)


class ConceptStore:
    """A directory of concepts: one safetensors file per concept version and a SQLite index.

    >>> store = ConceptStore("~/concepts")
    >>> version = store.save(adapter)            # 1, then 2, ... for the same name
    >>> adapter = store.load("my-dog")           # the newest version, verified
    """

    def __init__(self, location: str | os.PathLike, files: str | os.PathLike | None = None, timeout: float = 60.0):
        """``location``: a directory (the embedded store: files and a SQLite index in it), or a
        ``postgresql://`` URL for an index many machines share, with ``files`` the shared directory
        (e.g. an NFS mount) holding the concept files. ``timeout``: seconds to wait for the index's
        write lock (and, for PostgreSQL, to connect)."""
        url = os.fspath(location) if isinstance(location, str) else None
        scheme = _URL.match(url) if url is not None else None
        if scheme is None:
            if files is not None:
                raise ValueError(
                    f"ConceptStore({str(location)!r}, files={str(files)!r}): files= goes with a postgresql:// "
                    "index URL; a directory store keeps its files in that directory"
                )
            self.root = Path(location).expanduser()
        elif scheme["scheme"].lower() in _POSTGRES_SCHEMES:
            if files is None:
                raise ValueError(
                    f"ConceptStore({redact(url)!r}): a PostgreSQL index needs files=<a directory every "
                    "process using this index shares> for the concept files"
                )
            self.root = Path(files).expanduser()
        else:
            raise ValueError(
                f"ConceptStore({redact(url)!r}): unsupported URL scheme {scheme['scheme']!r}; expected a "
                "directory path or a postgresql:// URL"
            )
        (self.root / "concepts").mkdir(parents=True, exist_ok=True)
        # A shared directory is written from many machines, where process ids mean nothing: each host
        # stages in its own folder, so prune judges only its own host's temp files by their pid.
        self._staging = self.root / "staging" if scheme is None else self.root / "staging" / _host()
        self._staging.mkdir(parents=True, exist_ok=True)
        self._url = None if scheme is None else redact(url)
        if scheme is None:
            self._index: SQLiteIndex | PostgresIndex = SQLiteIndex(self.root / "index.sqlite", timeout)
        else:
            self._index = PostgresIndex(url, timeout)

    @property
    def staging(self) -> Path:
        """Where files are written before they enter the store (and training checkpoints go)."""
        return self._staging

    def close(self) -> None:
        self._index.close()

    def __enter__(self) -> ConceptStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        if self._url is not None:
            return f"ConceptStore({self._url!r}, files={str(self.root)!r})"
        return f"ConceptStore({str(self.root)!r})"

    # ----------------------------------------------------------------- writing

    def save(self, adapter: ConceptAdapter, namespace: str = "default") -> int:
        """Store ``adapter`` as the next version of its name in ``namespace``; returns the version."""
        validate_name(namespace, "namespace")
        validate_name(adapter.name)  # the adapter may have been renamed since it was built
        if not adapter.is_finite():
            raise ValueError(f"concept {adapter.name!r}: refusing to save non-finite (NaN/inf) tensors")
        tensors, header = adapter.to_safetensors()
        data = safetensors.torch.save(tensors, metadata=header)
        digest = hashlib.sha256(data).hexdigest()
        unique = uuid.uuid4().hex[:16]
        tmp = self.staging / f"save-{unique}.{os.getpid()}.tmp"
        try:
            try:
                _write_durably(tmp, data)
            except OSError as e:  # e.g. a full disk
                raise ConceptStoreError(f"concept {namespace}/{adapter.name}: cannot write {tmp}: {e}") from e
            with self._index.write((namespace, adapter.name)) as db:
                (latest,) = db.execute(
                    "SELECT COALESCE(MAX(version), 0) FROM concepts WHERE namespace=? AND name=?",
                    (namespace, adapter.name),
                ).fetchone()
                version = latest + 1
                rel = f"concepts/{namespace}/{adapter.name}/v{version}-{unique}.safetensors"  # never reused
                final = self.root / rel
                try:
                    try:
                        final.parent.mkdir(parents=True, exist_ok=True)
                        self._check_inside(final, f"concept {namespace}/{adapter.name} v{version}")
                        os.replace(tmp, final)
                        _fsync_dir(final.parent)
                    except OSError as e:
                        raise ConceptStoreError(
                            f"concept {namespace}/{adapter.name} v{version}: cannot write {rel}: {e}"
                        ) from e
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
        with self._index.write((namespace, name)) as db:
            rows = self._select(db.execute, name, namespace, version, newest_only=False)
            if not rows:
                raise ConceptNotFoundError(self._describe_missing(name, namespace, version))
            db.executemany(
                "DELETE FROM concepts WHERE namespace=? AND name=? AND version=?",
                [(r.namespace, r.name, r.version) for r in rows],
            )
        # after the commit (a kill before it must leave every listed file in place); safe outside the
        # lock because file names are never reused: a save racing this delete writes another file
        self._unlink(rows)
        return len(rows)

    def prune(self, keep: int = 1) -> int:
        """Keep only the newest ``keep`` versions of every concept and remove leftovers of
        interrupted saves (orphan version files, temp files of writers no longer running);
        returns how many versions were removed."""
        if keep < 1:
            raise ValueError(f"prune(keep={keep}): keep must be >= 1")
        with self._index.write() as db:
            # Orphans (version files renamed into place by a save killed before its commit): a save
            # renames and commits under this write lock, so no file seen now without a row is a live one.
            # (Files of the rows deleted below go only after the commit: a kill before it keeps them.)
            self._collect_orphans({r[0] for r in db.execute("SELECT file FROM concepts")})
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
        self._unlink(rows)
        for leftover in self.staging.iterdir():
            m = _TEMP.fullmatch(leftover.name)
            if m and not _pid_alive(int(m["pid"] or m["old_pid"])):  # only dead writers' temp files
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
        return [ConceptRecord._from_row(r) for r in self._index.read(query, args)]

    def record(self, name: str, namespace: str = "default", version: int | None = None) -> ConceptRecord:
        """The index record of a concept version (the newest when version is None)."""
        rows = self._select(self._index.read, name, namespace, version, newest_only=True)
        if not rows:
            raise ConceptNotFoundError(self._describe_missing(name, namespace, version))
        return rows[0]

    def load(self, name: str, namespace: str = "default", version: int | None = None) -> ConceptAdapter:
        """The concept (newest version unless given), verified against the index."""
        for _ in range(100):
            rec = self.record(name, namespace, version)
            try:
                return self._read(rec)
            except ConceptStoreError:
                # A delete or prune may have removed this version between the index read and the file
                # read: then look again (a newer version, or ConceptNotFoundError), else it is damage.
                now = self._select(self._index.read, name, namespace, rec.version, newest_only=True)
                if now == [rec]:
                    raise
        raise ConceptStoreError(f"concept {namespace}/{name}: its versions kept changing while being read")

    def verify(self) -> list[str]:
        """Every problem found (index integrity, missing, truncated, altered or mismatched
        files); an empty list when the store is healthy."""
        problems = self._index.integrity()
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
        ((n,),) = self._index.read("SELECT COUNT(DISTINCT namespace || '/' || name) FROM concepts")
        return n

    # ---------------------------------------------------------------- internals

    @staticmethod
    def _select(run, name: str, namespace: str, version: int | None, newest_only: bool) -> list[ConceptRecord]:
        query = f"SELECT {_COLUMNS} FROM concepts WHERE namespace=? AND name=?"
        args: list = [namespace, name]
        if version is not None:
            query += " AND version=?"
            args.append(version)
        query += " ORDER BY version DESC" + (" LIMIT 1" if newest_only else "")
        return [ConceptRecord._from_row(r) for r in run(query, args)]

    def _describe_missing(self, name: str, namespace: str, version: int | None) -> str:
        what = f"concept {namespace}/{name}" + (f" v{version}" if version is not None else "")
        return f"{what} is not in the store at {self.root}"

    def _path(self, rec: ConceptRecord) -> Path:
        """The file of ``rec``, proven to be that version's own place under the root."""
        what = f"concept {rec.namespace}/{rec.name} v{rec.version}"
        m = _FILE.fullmatch(rec.file)
        try:
            valid = m is not None and validate_name(m["namespace"]) and validate_name(m["name"])
        except (TypeError, ValueError):
            valid = False
        if not valid or (m["namespace"], m["name"], int(m["version"])) != (rec.namespace, rec.name, rec.version):
            raise ConceptStoreError(f"{what}: the index names {rec.file!r}, which is not this concept's file")
        path = self.root / rec.file
        self._check_inside(path, what)
        return path

    def _check_inside(self, path: Path, what: str) -> None:
        """``path``'s folder, links resolved, must be under the root's concepts/ (no symlinked folders)."""
        folder, concepts = os.path.realpath(path.parent), os.path.realpath(self.root / "concepts")
        if os.path.commonpath([folder, concepts]) != concepts:
            raise ConceptStoreError(f"{what}: {path.parent} leads outside the store (to {folder})")

    def _read(self, rec: ConceptRecord) -> ConceptAdapter:
        what = f"concept {rec.namespace}/{rec.name} v{rec.version} ({rec.file})"
        path = self._path(rec)
        try:  # no links, and no blocking on a FIFO; then type and size before a byte is read
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            raise ConceptStoreError(f"{what}: the file is missing") from None
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise ConceptStoreError(f"{what}: the file is a symbolic link; store files never are") from None
            raise ConceptStoreError(f"{what}: cannot read the file: {e}") from e
        with os.fdopen(fd, "rb") as f:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise ConceptStoreError(f"{what}: not a regular file (a FIFO, device or directory)")
            if info.st_size != rec.size:
                raise ConceptStoreError(
                    f"{what}: the file has {info.st_size} bytes, the index says {rec.size} (truncated?)"
                )
            try:
                data = f.read(rec.size + 1)
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

    def _unlink(self, rows: list[ConceptRecord]) -> None:
        """Remove the files of index rows already deleted; a row naming any other file touches nothing."""
        for rec in rows:
            with contextlib.suppress(ConceptStoreError):
                self._path(rec).unlink(missing_ok=True)

    def _collect_orphans(self, listed: set[str]) -> None:
        """Remove version files no index row names, and emptied concept folders (under the write lock)."""
        concepts = self.root / "concepts"
        for folder in concepts.glob("*/*"):
            if folder.is_symlink() or folder.parent.is_symlink() or not folder.is_dir():
                continue  # never follow a link out of the store
            for file in folder.iterdir():
                rel = file.relative_to(self.root).as_posix()
                if _FILE.fullmatch(rel) and rel not in listed and not file.is_dir():
                    file.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                folder.rmdir()  # only when empty
        for namespace in concepts.iterdir():
            with contextlib.suppress(OSError):
                namespace.rmdir()


def _host() -> str:
    """This machine's name as a folder name."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname()).lstrip(".") or "host"


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


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except (ValueError, ProcessLookupError, OverflowError):
        return False
    except PermissionError:
        return True
    return True


def atomic_torch_save(obj, path: str | os.PathLike) -> None:
    """torch.save that never leaves a torn file: temp file, fsync, rename (checkpoints, training state).
    The temp file is ``<name>.<pid>.tmp``, which ConceptStore.prune leaves alone while the pid runs."""
    path = Path(path)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write (a full disk) as a RuntimeError
        raise OSError(f"cannot write {path} (disk full?): {' '.join(str(e).split())}") from e
    finally:
        tmp.unlink(missing_ok=True)

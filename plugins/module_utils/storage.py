# Copyright: contributors to pitr.postgresql
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Storage backends: the only code that touches where repository bytes live.

Keys are relative, '/'-separated names (``wal/0000000100000000/000000010000000000000001``).
The interface is deliberately small so that object stores fit behind it later: put a whole
object atomically (never visible half-written, never overwriting unless asked), get, stat,
list by prefix, delete, and a named lock. Standard library only.
"""

from __future__ import annotations

import errno
import fcntl
import os
import time

from ansible_collections.pitr.postgresql.plugins.module_utils.errors import (
    LockHeldError,
    ObjectExistsError,
    ObjectNotFoundError,
    StorageError,
)
from ansible_collections.pitr.postgresql.plugins.module_utils.lean_types import (
    NamedTuple,
    Protocol,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    import typing as t

TEMP_PREFIX = ".tmp-"
LOCK_DIR = "locks"


class ObjectInfo(NamedTuple):
    """What the storage knows about one stored object."""

    key: str
    size: int
    mtime: float


class Storage(Protocol):
    """What the repository may ask of a storage backend."""

    def put(self, key: str, data: bytes, *, overwrite: bool = False) -> None:
        """Store ``data`` atomically; ObjectExistsError if present and not ``overwrite``."""

    def get(self, key: str) -> bytes:
        """Return the whole object; ObjectNotFoundError if absent."""

    def stat(self, key: str) -> ObjectInfo | None:
        """Return the object's info, or None when it is truly absent."""

    def list(self, prefix: str = "") -> t.Iterator[ObjectInfo]:
        """Every object whose key starts with ``prefix`` (a folder-like prefix), any order."""

    def delete(self, key: str) -> None:
        """Remove the object; absent objects are not an error."""

    def lock(self, name: str, *, purpose: str, wait: float = 0.0) -> t.ContextManager[None]:
        """Hold the named exclusive lock; LockHeldError naming the holder when busy."""

    def describe(self) -> str:
        """A human-readable location for messages."""


def _check_key(key: str) -> None:
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise StorageError(f"invalid storage key {key!r}", key=key)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class PosixStorage:
    """A repository in a directory on local disk or a mounted network file system.

    put = write a temporary file in the destination directory, fsync it, link (or rename)
    it to its final name, fsync the directory. The link makes "never overwrite" atomic:
    two writers of one name cannot both win, and the loser learns it (ObjectExistsError).
    """

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)

    def describe(self) -> str:
        return self.root

    def path(self, key: str) -> str:
        """Local path of a key (POSIX backend only; used by callers that stage local files)."""
        _check_key(key)
        return os.path.join(self.root, *key.split("/"))

    def _error(self, action: str, key: str, exc: OSError) -> StorageError:
        return StorageError(
            f"cannot {action} {key!r} in repository {self.root}: {exc.strerror or exc}"
            f" (errno {exc.errno}); check that the repository is mounted, writable by this"
            " user and not full",
            key=key,
            repository=self.root,
            errno=exc.errno,
        )

    def ensure_root(self) -> None:
        """Fail clearly when the repository root is missing or not a directory."""
        try:
            st = os.stat(self.root)
        except OSError as exc:
            raise StorageError(
                f"repository {self.root} is not accessible: {exc.strerror}; create it (the"
                " archiving role does) or mount the storage that holds it",
                repository=self.root,
                errno=exc.errno,
            ) from exc
        if not os.path.isdir(self.root) or st is None:
            raise StorageError(f"repository {self.root} is not a directory", repository=self.root)

    def _makedirs(self, directory: str) -> None:
        """Create missing directories below the root and fsync each new entry's parent."""
        self.ensure_root()
        missing = []
        d = directory
        while d != self.root and d.startswith(self.root) and not os.path.isdir(d):
            missing.append(d)
            d = os.path.dirname(d)
        for d in reversed(missing):
            try:
                os.mkdir(d, 0o700)
            except FileExistsError:
                continue
            _fsync_dir(os.path.dirname(d))

    def put(self, key: str, data: bytes, *, overwrite: bool = False) -> None:
        final = self.path(key)
        directory = os.path.dirname(final)
        try:
            self._makedirs(directory)
            tmp = os.path.join(
                directory,
                f"{TEMP_PREFIX}{os.path.basename(final)}.{os.getpid()}.{os.urandom(4).hex()}",
            )
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as exc:
            raise self._error("write", key, exc) from exc
        try:
            try:
                view = memoryview(data)
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
                os.fsync(fd)
            finally:
                os.close(fd)
            if overwrite:
                os.replace(tmp, final)
            else:
                self._link_no_replace(tmp, final, key)
            _fsync_dir(directory)
        except OSError as exc:
            raise self._error("write", key, exc) from exc
        finally:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            except OSError:
                pass

    def _link_no_replace(self, tmp: str, final: str, key: str) -> None:
        try:
            os.link(tmp, final)
            return
        except FileExistsError:
            raise ObjectExistsError(f"{key!r} already exists", key=key) from None
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK):
                raise
        # File systems without hard links: check, then rename. A concurrent writer of the
        # same name can slip in between; the archive logic compares content afterwards.
        if os.path.lexists(final):
            raise ObjectExistsError(f"{key!r} already exists", key=key)
        os.rename(tmp, final)

    def get(self, key: str) -> bytes:
        with self.open_read(key) as fh:
            try:
                return fh.read()
            except OSError as exc:
                raise self._error("read", key, exc) from exc

    def open_read(self, key: str) -> t.BinaryIO:
        """Open an object for streaming reads."""
        try:
            return open(self.path(key), "rb")
        except FileNotFoundError:
            self._raise_if_root_missing()
            raise ObjectNotFoundError(
                f"{key!r} is not in repository {self.root}", key=key
            ) from None
        except OSError as exc:
            raise self._error("read", key, exc) from exc

    def _raise_if_root_missing(self) -> None:
        # An unmounted repository must never look like "file not archived".
        self.ensure_root()

    def stat(self, key: str) -> ObjectInfo | None:
        try:
            st = os.stat(self.path(key))
        except FileNotFoundError:
            self._raise_if_root_missing()
            return None
        except NotADirectoryError:
            return None
        except OSError as exc:
            raise self._error("stat", key, exc) from exc
        return ObjectInfo(key, st.st_size, st.st_mtime)

    def list(self, prefix: str = "") -> t.Iterator[ObjectInfo]:
        prefix = prefix.strip("/")
        start = self.path(prefix) if prefix else self.root
        self.ensure_root()
        if not os.path.isdir(start):
            return
        for dirpath, dirnames, filenames in os.walk(start, onerror=self._walk_error):
            dirnames.sort()
            rel = os.path.relpath(dirpath, self.root)
            for fn in sorted(filenames):
                if fn.startswith(TEMP_PREFIX):
                    continue
                key = fn if rel == "." else f"{rel.replace(os.sep, '/')}/{fn}"
                try:
                    st = os.stat(os.path.join(dirpath, fn))
                except FileNotFoundError:
                    continue
                yield ObjectInfo(key, st.st_size, st.st_mtime)

    def _walk_error(self, exc: OSError) -> None:
        raise self._error("list", exc.filename or "", exc)

    def delete(self, key: str) -> None:
        path = self.path(key)
        try:
            os.unlink(path)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise self._error("delete", key, exc) from exc
        _fsync_dir(os.path.dirname(path))

    # Whole directories (POSIX only): pg_basebackup writes a backup into a staging directory,
    # which becomes visible under its final prefix in one rename.
    def rename_tree(self, src: str, dst: str) -> None:
        """Atomically move the directory ``src`` to ``dst`` (which must not exist)."""
        source, target = self.path(src), self.path(dst)
        try:
            self._makedirs(os.path.dirname(target))
            if os.path.lexists(target):
                raise ObjectExistsError(f"{dst!r} already exists", key=dst)
            os.rename(source, target)
            _fsync_dir(os.path.dirname(target))
            _fsync_dir(os.path.dirname(source))
        except OSError as exc:
            raise self._error("rename", src, exc) from exc

    def delete_tree(self, key: str) -> None:
        """Remove the directory ``key`` and everything below it; absent is not an error."""
        import shutil

        path = self.path(key)
        if not os.path.lexists(path):
            return
        try:
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.unlink(path)
            _fsync_dir(os.path.dirname(path))
        except OSError as exc:
            raise self._error("delete", key, exc) from exc

    def lock(self, name: str, *, purpose: str, wait: float = 0.0) -> t.ContextManager[None]:
        """An exclusive flock on ``locks/<name>.lock``; the file records the holder."""
        from contextlib import contextmanager  # not at the top: the push path takes no lock

        return contextmanager(self._locked)(name, purpose, wait)

    def _locked(self, name: str, purpose: str, wait: float) -> t.Iterator[None]:
        _check_key(name)
        lock_dir = os.path.join(self.root, LOCK_DIR)
        try:
            self._makedirs(lock_dir)
            fd = os.open(os.path.join(lock_dir, f"{name}.lock"), os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise self._error("lock", f"{LOCK_DIR}/{name}.lock", exc) from exc
        try:
            deadline = time.monotonic() + wait
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        holder = _read_holder(fd)
                        raise LockHeldError(
                            f"the repository lock {name!r} is held by {holder}; wait for it to"
                            " finish (or, if that process is gone, the lock frees itself)",
                            lock=name,
                            holder=holder,
                        ) from None
                    time.sleep(0.1)
            record = {
                "pid": os.getpid(),
                "host": os.uname().nodename,
                "purpose": purpose,
                "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
            import json  # not at the top: the push path takes no lock

            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(record).encode(), 0)
            try:
                yield
            finally:
                os.ftruncate(fd, 0)
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


def _read_holder(fd: int) -> str:
    import json

    try:
        raw = os.pread(fd, 4096, 0)
        rec = json.loads(raw.decode() or "{}")
    except (OSError, ValueError):
        return "another process"
    if not rec:
        return "another process"
    return (
        f"{rec.get('purpose', '?')} (pid {rec.get('pid')} on {rec.get('host')}"
        f" since {rec.get('since')})"
    )

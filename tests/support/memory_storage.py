# Copyright: contributors to pitr.postgresql
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""An in-memory Storage with the semantics of PosixStorage, for unit tests of the layers above.

Same protocol (put/get/stat/list/delete/lock/describe), same errors for the same situations,
plus hooks a test can use to script what a real backend does now and then:

- ``unmounted = True``: every call fails with StorageError, as PosixStorage does when its
  root is missing (never ObjectNotFoundError: an unmounted repository is not "absent").
- ``before_put``: called with (key, data) before a put takes effect; a test can store a
  competing object there to play the second archiver that wins the race.
- ``fail_put``: an exception raised instead of storing (disk full, I/O error).
- ``calls``: every call as (method, key), to assert what was (not) written.

``tests/unit/plugins/module_utils/test_storage.py`` runs the storage contract tests against
both this class and PosixStorage, so the two cannot drift apart.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import typing as t
from contextlib import contextmanager

from ansible_collections.pitr.postgresql.plugins.module_utils.errors import (
    LockHeldError,
    ObjectExistsError,
    ObjectNotFoundError,
    StorageError,
)
from ansible_collections.pitr.postgresql.plugins.module_utils.storage import (
    ObjectInfo,
    _check_key,
)


class MemoryStorage:
    """Objects in a dict; mtimes from a counter so that a rewrite is always visible."""

    def __init__(self, name: str = "memory://test") -> None:
        self.name = name
        self.objects: dict[str, bytes] = {}
        self.mtimes: dict[str, float] = {}
        self.locks: dict[str, dict[str, t.Any]] = {}
        self.calls: list[tuple[str, str]] = []
        self.unmounted = False
        self.before_put: t.Callable[[str, bytes], None] | None = None
        self.fail_put: BaseException | None = None
        self._clock = 1_000_000.0
        self._mutex = threading.Lock()

    # helpers for tests ------------------------------------------------------------------
    def writes(self) -> list[str]:
        """Keys of every put attempted, in order."""
        return [key for method, key in self.calls if method == "put"]

    def corrupt(self, key: str, offset: int = -1) -> None:
        """Flip one byte of a stored object (default: the last one)."""
        blob = bytearray(self.objects[key])
        blob[offset] ^= 0xFF
        self.objects[key] = bytes(blob)

    # the protocol -----------------------------------------------------------------------
    def describe(self) -> str:
        return self.name

    def _check_mounted(self, action: str, key: str) -> None:
        if self.unmounted:
            raise StorageError(
                f"cannot {action} {key!r}: repository {self.name} is not accessible",
                key=key,
                repository=self.name,
            )

    def put(self, key: str, data: bytes, *, overwrite: bool = False) -> None:
        _check_key(key)
        self.calls.append(("put", key))
        self._check_mounted("write", key)
        if self.before_put is not None:
            hook, self.before_put = self.before_put, None
            hook(key, data)
        if self.fail_put is not None:
            raise self.fail_put
        with self._mutex:
            if key in self.objects and not overwrite:
                raise ObjectExistsError(f"{key!r} already exists", key=key)
            self.objects[key] = bytes(data)
            self._clock += 1.0
            self.mtimes[key] = self._clock

    def get(self, key: str) -> bytes:
        _check_key(key)
        self.calls.append(("get", key))
        self._check_mounted("read", key)
        try:
            return self.objects[key]
        except KeyError:
            raise ObjectNotFoundError(
                f"{key!r} is not in repository {self.name}", key=key
            ) from None

    def stat(self, key: str) -> ObjectInfo | None:
        _check_key(key)
        self.calls.append(("stat", key))
        self._check_mounted("stat", key)
        if key not in self.objects:
            return None
        return ObjectInfo(key, len(self.objects[key]), self.mtimes[key])

    def list(self, prefix: str = "") -> t.Iterator[ObjectInfo]:
        prefix = prefix.strip("/")
        self.calls.append(("list", prefix))
        self._check_mounted("list", prefix)
        for key in sorted(self.objects):
            if not prefix or key.startswith(prefix + "/"):
                yield ObjectInfo(key, len(self.objects[key]), self.mtimes[key])

    def delete(self, key: str) -> None:
        _check_key(key)
        self.calls.append(("delete", key))
        self._check_mounted("delete", key)
        self.objects.pop(key, None)
        self.mtimes.pop(key, None)

    @contextmanager
    def lock(self, name: str, *, purpose: str, wait: float = 0.0) -> t.Iterator[None]:
        _check_key(name)
        self.calls.append(("lock", name))
        self._check_mounted("lock", f"locks/{name}.lock")
        deadline = time.monotonic() + wait
        while True:
            with self._mutex:
                holder = self.locks.get(name)
                if holder is None:
                    self.locks[name] = {
                        "pid": os.getpid(),
                        "host": socket.gethostname(),
                        "purpose": purpose,
                        "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    }
                    break
            if time.monotonic() >= deadline:
                desc = (
                    f"{holder.get('purpose', '?')} (pid {holder.get('pid')} on"
                    f" {holder.get('host')} since {holder.get('since')})"
                )
                raise LockHeldError(
                    f"the repository lock {name!r} is held by {desc}; wait for it to finish"
                    " (or, if that process is gone, the lock frees itself)",
                    lock=name,
                    holder=desc,
                )
            time.sleep(0.01)
        try:
            yield
        finally:
            with self._mutex:
                self.locks.pop(name, None)

    def holder_record(self, name: str) -> str:
        """The lock record as PosixStorage writes it into its lock file (JSON)."""
        return json.dumps(self.locks.get(name, {}))

# Copyright: contributors to pitr.postgresql
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The storage contract, run against PosixStorage and the in-memory test double alike,
plus what only the POSIX backend does (durable writes, temp files, directory modes)."""

from __future__ import annotations

import errno
import multiprocessing
import os
import stat
import threading
import typing as t
from pathlib import Path

import pytest

from ansible_collections.pitr.postgresql.plugins.module_utils import storage as storage_mod
from ansible_collections.pitr.postgresql.plugins.module_utils.errors import (
    LockHeldError,
    ObjectExistsError,
    ObjectNotFoundError,
    StorageError,
)
from ansible_collections.pitr.postgresql.plugins.module_utils.storage import PosixStorage
from tests.support.memory_storage import MemoryStorage

KEY = "wal/0000000100000000/000000010000000000000001"


@pytest.fixture(params=["posix", "memory"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> t.Any:
    if request.param == "posix":
        return PosixStorage(str(tmp_path / "repo"))
    return MemoryStorage()


@pytest.fixture
def posix(tmp_path: Path) -> PosixStorage:
    (tmp_path / "repo").mkdir(exist_ok=True)
    return PosixStorage(str(tmp_path / "repo"))


@pytest.fixture(autouse=True)
def _make_roots(tmp_path: Path) -> None:
    (tmp_path / "repo").mkdir(exist_ok=True)


def files_under(root: str) -> list[str]:
    """Every file below root, relative, sorted (temp files included)."""
    found = []
    for dirpath, _dirs, files in os.walk(root):
        for fn in files:
            found.append(os.path.relpath(os.path.join(dirpath, fn), root))
    return sorted(found)


# ---------------------------------------------------------------------------------------------
# the contract: both backends


def test_put_then_get_returns_the_same_bytes(store: t.Any) -> None:
    data = os.urandom(70000)
    store.put(KEY, data)
    assert store.get(KEY) == data
    info = store.stat(KEY)
    assert info is not None
    assert (info.key, info.size) == (KEY, 70000)


def test_put_empty_object(store: t.Any) -> None:
    store.put("a/empty", b"")
    assert store.get("a/empty") == b""
    info = store.stat("a/empty")
    assert info is not None and info.size == 0


def test_put_never_overwrites_by_default(store: t.Any) -> None:
    store.put(KEY, b"first")
    before = store.stat(KEY)
    with pytest.raises(ObjectExistsError, match="already exists") as exc:
        store.put(KEY, b"second")
    assert exc.value.context["key"] == KEY
    assert store.get(KEY) == b"first"
    assert store.stat(KEY) == before


def test_object_exists_error_is_a_storage_error() -> None:
    # Callers that catch StorageError for "the write failed" also see this one.
    assert issubclass(ObjectExistsError, StorageError)
    assert issubclass(ObjectNotFoundError, StorageError)
    assert issubclass(LockHeldError, StorageError)


def test_put_overwrite_replaces(store: t.Any) -> None:
    store.put(KEY, b"first")
    store.put(KEY, b"second, longer", overwrite=True)
    assert store.get(KEY) == b"second, longer"
    info = store.stat(KEY)
    assert info is not None and info.size == len(b"second, longer")


def test_get_missing_raises_not_found(store: t.Any) -> None:
    with pytest.raises(ObjectNotFoundError) as exc:
        store.get(KEY)
    assert exc.value.context["key"] == KEY


def test_stat_missing_is_none(store: t.Any) -> None:
    assert store.stat(KEY) is None
    assert store.stat("nothing/here/at/all") is None


@pytest.mark.parametrize(
    "key", ["", "/abs", "a//b", "a/./b", "./a", "../a", "a/..", "a/b/", "..", "."]
)
def test_invalid_keys_are_refused(store: t.Any, key: str) -> None:
    with pytest.raises(StorageError, match="invalid storage key"):
        store.put(key, b"x")
    with pytest.raises(StorageError, match="invalid storage key"):
        store.get(key)
    with pytest.raises(StorageError, match="invalid storage key"):
        store.stat(key)
    with pytest.raises(StorageError, match="invalid storage key"):
        store.delete(key)


def test_list_is_folder_like_and_complete(store: t.Any) -> None:
    keys = [
        "pitr-repository.json",
        "wal/history/00000002.history",
        "wal/0000000100000000/000000010000000000000001",
        "wal/0000000100000000/000000010000000000000002",
        "wal/0000000200000000/000000020000000000000003",
        "walrus/not-wal",
        "backups/b1/backup.json",
    ]
    for i, key in enumerate(keys):
        store.put(key, b"x" * i)
    listed = {info.key: info.size for info in store.list("wal")}
    assert listed == {
        "wal/history/00000002.history": 1,
        "wal/0000000100000000/000000010000000000000001": 2,
        "wal/0000000100000000/000000010000000000000002": 3,
        "wal/0000000200000000/000000020000000000000003": 4,
    }
    assert {i.key for i in store.list("wal/")} == set(listed)
    assert {i.key for i in store.list("wal/0000000100000000")} == {
        "wal/0000000100000000/000000010000000000000001",
        "wal/0000000100000000/000000010000000000000002",
    }
    assert list(store.list("wa")) == []  # a prefix is a folder, not a string prefix
    assert list(store.list("nothing")) == []
    assert {i.key for i in store.list()} == set(keys)


def test_delete_removes_and_absent_is_fine(store: t.Any) -> None:
    store.put(KEY, b"x")
    store.delete(KEY)
    assert store.stat(KEY) is None
    store.delete(KEY)
    store.put(KEY, b"again")  # the name is free again
    assert store.get(KEY) == b"again"


def test_lock_is_exclusive_and_names_the_holder(store: t.Any) -> None:
    with store.lock("backup", purpose="base backup nightly-1"):
        with pytest.raises(LockHeldError) as exc, store.lock("backup", purpose="expire"):
            pytest.fail("a second holder got the lock")
        message = exc.value.msg
        assert "base backup nightly-1" in message
        assert f"pid {os.getpid()}" in message
        assert exc.value.context["lock"] == "backup"
        assert "base backup nightly-1" in exc.value.context["holder"]
        # another lock name is independent
        with store.lock("expire", purpose="other"):
            pass
    with store.lock("backup", purpose="expire"):  # released
        pass


def test_lock_is_released_when_the_body_raises(store: t.Any) -> None:
    with pytest.raises(RuntimeError), store.lock("backup", purpose="first"):
        raise RuntimeError("boom")
    with store.lock("backup", purpose="second"):
        pass


def test_lock_waits_for_the_holder(store: t.Any) -> None:
    held = threading.Event()
    release = threading.Event()

    def hold() -> None:
        with store.lock("backup", purpose="holder"):
            held.set()
            release.wait(5)

    thread = threading.Thread(target=hold)
    thread.start()
    try:
        assert held.wait(5)
        threading.Timer(0.3, release.set).start()
        with store.lock("backup", purpose="waiter", wait=5.0):
            assert release.is_set()
    finally:
        release.set()
        thread.join(5)


def test_describe_names_the_location(tmp_path: Path) -> None:
    assert PosixStorage(str(tmp_path / "repo")).describe() == str(tmp_path / "repo")
    assert MemoryStorage("memory://x").describe() == "memory://x"


# ---------------------------------------------------------------------------------------------
# an unreachable repository is an error, never "absent"


def test_missing_root_is_an_error_not_absent(tmp_path: Path) -> None:
    gone = PosixStorage(str(tmp_path / "not-mounted"))
    with pytest.raises(StorageError, match="not accessible") as exc:
        gone.get(KEY)
    assert not isinstance(exc.value, ObjectNotFoundError)
    with pytest.raises(StorageError, match="not accessible"):
        gone.stat(KEY)
    with pytest.raises(StorageError, match="not accessible"):
        list(gone.list("wal"))


def test_put_does_not_create_a_missing_root(tmp_path: Path) -> None:
    # An unmounted repository must not silently become a directory on the root disk.
    gone = PosixStorage(str(tmp_path / "not-mounted"))
    with pytest.raises(StorageError):
        gone.put(KEY, b"x")
    assert not (tmp_path / "not-mounted").exists()


def test_root_that_is_a_file_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"x")
    s = PosixStorage(str(tmp_path / "file"))
    with pytest.raises(StorageError, match="not a directory"):
        s.put(KEY, b"x")


def test_memory_storage_unmounted_behaves_like_missing_root() -> None:
    s = MemoryStorage()
    s.put(KEY, b"x")
    s.unmounted = True
    for call in (lambda: s.get(KEY), lambda: s.stat(KEY), lambda: list(s.list("wal"))):
        with pytest.raises(StorageError) as exc:
            call()
        assert not isinstance(exc.value, ObjectNotFoundError)


# ---------------------------------------------------------------------------------------------
# POSIX only: the durable-write recipe


def test_put_writes_final_file_mode_0600_dirs_0700_and_no_temp(posix: PosixStorage) -> None:
    posix.put(KEY, b"payload")
    path = Path(posix.path(KEY))
    assert path.read_bytes() == b"payload"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(path.parent.parent.stat().st_mode) == 0o700
    assert files_under(posix.root) == [KEY]


def test_duplicate_put_leaves_the_file_untouched_and_no_temp(posix: PosixStorage) -> None:
    posix.put(KEY, b"first")
    before = os.stat(posix.path(KEY))
    with pytest.raises(ObjectExistsError):
        posix.put(KEY, b"second")
    after = os.stat(posix.path(KEY))
    assert (after.st_ino, after.st_mtime_ns, after.st_size) == (
        before.st_ino,
        before.st_mtime_ns,
        before.st_size,
    )
    assert Path(posix.path(KEY)).read_bytes() == b"first"
    assert files_under(posix.root) == [KEY]


def test_put_fsyncs_file_and_directory_before_returning(
    posix: PosixStorage, fsynced: list[str]
) -> None:
    synced = fsynced
    posix.put(KEY, b"payload")
    final_dir = os.path.dirname(posix.path(KEY))
    temp_files = [p for p in synced if os.path.basename(p).startswith(storage_mod.TEMP_PREFIX)]
    assert temp_files, synced  # the data, before it got its name
    assert synced.index(temp_files[0]) < synced.index(final_dir)
    assert synced[-1] == final_dir  # the new name itself, last


def test_disk_full_mid_write_leaves_nothing(
    posix: PosixStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_write = os.write
    state = {"n": 0}

    def write(fd: int, data: t.Any) -> int:
        state["n"] += 1
        if state["n"] > 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, bytes(data[:4096]))  # a short write first

    monkeypatch.setattr(os, "write", write)
    with pytest.raises(StorageError, match="No space left on device") as exc:
        posix.put(KEY, os.urandom(100000))
    assert exc.value.context["errno"] == errno.ENOSPC
    assert not isinstance(exc.value, ObjectExistsError)
    assert files_under(posix.root) == []


def test_fsync_failure_leaves_nothing(posix: PosixStorage, monkeypatch: pytest.MonkeyPatch) -> None:
    def fsync(fd: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(StorageError, match="Input/output error"):
        posix.put(KEY, b"payload")
    assert posix.stat(KEY) is None
    assert not any(
        os.path.basename(f).startswith(storage_mod.TEMP_PREFIX) for f in files_under(posix.root)
    )


def test_list_skips_temp_files_of_writes_in_progress(posix: PosixStorage) -> None:
    posix.put(KEY, b"x")
    tmp = Path(posix.path(KEY)).parent / f"{storage_mod.TEMP_PREFIX}000000010000000000000002.1.ab"
    tmp.write_bytes(b"half")
    assert [i.key for i in posix.list("wal")] == [KEY]


@pytest.mark.parametrize("err", [errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK])
def test_file_systems_without_hard_links_fall_back_to_rename(
    posix: PosixStorage, monkeypatch: pytest.MonkeyPatch, err: int
) -> None:
    def no_link(src: str, dst: str) -> None:
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(os, "link", no_link)
    posix.put(KEY, b"first")
    assert posix.get(KEY) == b"first"
    with pytest.raises(ObjectExistsError):
        posix.put(KEY, b"second")
    assert posix.get(KEY) == b"first"
    assert files_under(posix.root) == [KEY]


def test_other_link_errors_are_storage_errors(
    posix: PosixStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_link(src: str, dst: str) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "link", broken_link)
    with pytest.raises(StorageError, match="Input/output error"):
        posix.put(KEY, b"first")
    assert files_under(posix.root) == []


def _race(posix: PosixStorage, key: str, writers: int) -> list[str]:
    outcomes: list[str] = []
    barrier = threading.Barrier(writers)

    def writer(i: int) -> None:
        barrier.wait()
        try:
            posix.put(key, f"writer {i}".encode() * 10000)
            outcomes.append(f"won {i}")
        except ObjectExistsError:
            outcomes.append("exists")

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(writers)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(10)
    return outcomes


def test_concurrent_puts_of_one_key_exactly_one_wins(posix: PosixStorage) -> None:
    for round_ in range(10):
        key = f"race/{round_}"
        outcomes = _race(posix, key, 4)
        winners = [o for o in outcomes if o.startswith("won")]
        assert len(winners) == 1 and outcomes.count("exists") == 3, outcomes
        assert posix.get(key) == f"writer {winners[0][4:]}".encode() * 10000
    assert not any(storage_mod.TEMP_PREFIX in f for f in files_under(posix.root))


def _hold_lock(root: str, started: t.Any, release: t.Any) -> None:
    s = PosixStorage(root)
    with s.lock("backup", purpose="base backup from another process"):
        started.set()
        release.wait(10)


def test_lock_held_by_another_process_names_it(posix: PosixStorage) -> None:
    ctx = multiprocessing.get_context("fork")
    started, release = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=_hold_lock, args=(posix.root, started, release))
    proc.start()
    try:
        assert started.wait(10)
        with pytest.raises(LockHeldError) as exc, posix.lock("backup", purpose="expire", wait=0.2):
            pytest.fail("got a lock another process holds")
        assert "base backup from another process" in exc.value.msg
        assert f"pid {proc.pid}" in exc.value.msg
    finally:
        release.set()
        proc.join(10)
    # the holder is gone: the lock is free, and its record was cleared
    with posix.lock("backup", purpose="expire"):
        pass
    lock_file = Path(posix.root) / "locks" / "backup.lock"
    assert lock_file.read_bytes() == b""


def test_lock_of_a_killed_process_frees_itself(posix: PosixStorage) -> None:
    ctx = multiprocessing.get_context("fork")
    started, release = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=_hold_lock, args=(posix.root, started, release))
    proc.start()
    assert started.wait(10)
    proc.kill()
    proc.join(10)
    with posix.lock("backup", purpose="after a crash"):
        pass


def test_get_of_unreadable_object_is_a_storage_error(
    posix: PosixStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    posix.put(KEY, b"x")
    real_open = open
    denied: list[str] = []

    def deny(path: t.Any, *args: t.Any, **kwargs: t.Any) -> t.Any:
        if str(path) == posix.path(KEY):
            denied.append(str(path))
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_open(path, *args, **kwargs)

    # storage.py reads objects with the builtin open() (not io.open: ruff UP020)
    monkeypatch.setattr("builtins.open", deny)
    with pytest.raises(StorageError, match="Permission denied") as exc:
        posix.get(KEY)
    monkeypatch.undo()
    assert denied == [posix.path(KEY)]
    assert not isinstance(exc.value, ObjectNotFoundError)
    assert posix.get(KEY) == b"x"  # the object itself was fine all along

# Copyright: contributors to pitr.postgresql
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Helpers for the archive contract tests: the real pitr-wal host command and its repositories.

- ``install()``: pitr-wal installed the way the archiving role lays it out, owned by the
  server's OS user, in a directory that user can reach.
- ``pitr_wal(program, *args, cwd=...)``: run it as the server's OS user exactly as PostgreSQL
  does (``/usr/bin/python3 -I -S PROGRAM ...``) and time it.
- ``init_repo(program, repo, datadir)``: ``pitr-wal --repo REPO init --pgdata DATADIR`` as the
  server's OS user, as the archiving role does before the server archives into it.
- ``new_dir()``: a fresh directory owned by the server's OS user (repositories, staging).
- ``tmpfs(size)``: a small tmpfs mounted for the test (needs root), unmounted afterwards;
  ``umount()`` and ``mount_tmpfs()`` take it away and bring an empty one back meanwhile.
- ``pg_quote()``: a string as a postgresql.conf value.
"""

from __future__ import annotations

import hashlib
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
import typing as t
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
for _p in (str(HERE), str(ROOT)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from pgcluster import DEFAULT_OS_USER, give_to_server_user  # noqa: E402

from tests.support.hostcmd_install import install_host_command  # noqa: E402

PYTHON = "/usr/bin/python3"
AS_ROOT = os.geteuid() == 0


def ensure_collection_importable() -> None:
    """``ansible_collections.pitr.postgresql`` from this checkout (make links build/collections;
    without it, a link tree in a temporary directory)."""
    probe = "ansible_collections.pitr.postgresql.plugins.module_utils.hostcmd"
    try:
        __import__(probe)
        return
    except ImportError:
        pass
    linked = ROOT / "build" / "collections"
    if not (linked / "ansible_collections" / "pitr" / "postgresql").exists():
        linked = Path(tempfile.mkdtemp(prefix="pitr-collection-"))
        (linked / "ansible_collections" / "pitr").mkdir(parents=True)
        os.symlink(ROOT, linked / "ansible_collections" / "pitr" / "postgresql")
    sys.path.insert(0, str(linked))
    for name in [n for n in sys.modules if n.startswith("ansible_collections")]:
        del sys.modules[name]
    __import__(probe)


ensure_collection_importable()


@dataclass
class Run:
    """One run of a command: exit status, output, and how long it took."""

    argv: list[str]
    rc: int
    stdout: str
    stderr: str
    elapsed: float

    def __str__(self) -> str:
        return f"{self.argv!r} exited {self.rc} after {self.elapsed:.2f}s\nstderr: {self.stderr}"


def as_server_user(argv: t.Sequence[str]) -> list[str]:
    """``argv`` run as the server's OS user when the tests run as root."""
    return ["runuser", "-u", DEFAULT_OS_USER, "--", *argv] if AS_ROOT else list(argv)


def run(
    argv: t.Sequence[str], *, cwd: str | os.PathLike[str] | None = None, timeout: float = 120
) -> Run:
    started = time.monotonic()
    proc = subprocess.run(
        as_server_user(argv), capture_output=True, text=True, cwd=cwd, timeout=timeout, check=False
    )
    return Run(list(argv), proc.returncode, proc.stdout, proc.stderr, time.monotonic() - started)


def pitr_wal(
    program: str, *args: str, cwd: str | os.PathLike[str] | None = None, timeout: float = 120
) -> Run:
    """Run the host command the way archive_command/restore_command do."""
    return run([PYTHON, "-I", "-S", program, *args], cwd=cwd or "/", timeout=timeout)


def init_repo(program: str, repo: str | os.PathLike[str], datadir: str | os.PathLike[str]) -> Run:
    """Initialise ``repo`` for the cluster of ``datadir`` the way the archiving role does."""
    result = pitr_wal(program, "--repo", str(repo), "init", "--pgdata", str(datadir))
    assert result.rc == 0, str(result)
    assert "init: repository " in result.stderr, str(result)
    return result


def new_dir(prefix: str = "pitr-it-", parent: str | None = None) -> Path:
    """A fresh directory owned by the server's OS user (remove it yourself)."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    give_to_server_user(path)
    return path


def install(prefix_name: str = "pitr-hostcmd-", parent: str | None = None) -> tuple[str, Path]:
    """Install pitr-wal into a fresh prefix owned by the server's OS user: (program, prefix)."""
    prefix = new_dir(prefix_name, parent)
    owner = DEFAULT_OS_USER if AS_ROOT else None
    return install_host_command(prefix, owner=owner), prefix


def pg_quote(value: str) -> str:
    """``value`` as a quoted postgresql.conf string."""
    return "'" + value.replace("'", "''") + "'"


def sha256_file(path: str | os.PathLike[str]) -> str:
    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()


def files_below(root: str | os.PathLike[str]) -> dict[str, tuple[int, int, int]]:
    """Every file below ``root`` -> (inode, size, mtime_ns): a snapshot to compare."""
    found = {}
    for dirpath, _dirs, files in os.walk(root):
        for fn in files:
            st = os.stat(os.path.join(dirpath, fn))
            found[os.path.relpath(os.path.join(dirpath, fn), root)] = (
                st.st_ino,
                st.st_size,
                st.st_mtime_ns,
            )
    return found


def object_path(repo: str | os.PathLike[str], name: str) -> Path:
    """Where PosixStorage keeps the archived file ``name``."""
    from ansible_collections.pitr.postgresql.plugins.module_utils.repository import wal_key

    return Path(repo, *wal_key(name).split("/"))


def archived_names(repo: str | os.PathLike[str]) -> list[str]:
    """Names of the archived WAL files (segments, .partial, .backup, .history), sorted."""
    from ansible_collections.pitr.postgresql.plugins.module_utils.walfile import (
        WalNameError,
        sort_key,
    )

    names = []
    for _dirpath, _dirs, files in os.walk(Path(repo, "wal")):
        for fn in files:
            try:
                sort_key(fn)
            except WalNameError:
                continue
            names.append(fn)
    return sorted(names, key=sort_key)


def assert_push_failed(result: Run, *messages: str) -> None:
    """A push failure PostgreSQL counts: exit 1..125, and the log line says why."""
    assert 1 <= result.rc <= 125, str(result)
    assert "FAILED" in result.stderr, str(result)
    for message in messages:
        assert message in result.stderr, str(result)


def wait_until(predicate: t.Callable[[], t.Any], timeout: float, what: str) -> t.Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)


@contextmanager
def tmpfs(size: str) -> t.Iterator[Path]:
    """A tmpfs of ``size`` owned by the server's OS user; unmounted and removed afterwards."""
    if not AS_ROOT:
        pytest.skip("mounting a tmpfs needs root")
    # The mount point itself belongs to the server user too: once unmounted it is an empty
    # directory that user can read, as an unmounted repository mount point usually is.
    mountpoint = new_dir("pitr-tmpfs-")
    proc = _mount_tmpfs(mountpoint, size)
    if proc.returncode != 0:
        mountpoint.rmdir()
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield mountpoint
    finally:
        if os.path.ismount(mountpoint):
            subprocess.run(["umount", str(mountpoint)], check=False)
        shutil.rmtree(mountpoint, ignore_errors=True)


def _mount_tmpfs(mountpoint: Path, size: str) -> subprocess.CompletedProcess[str]:
    pw = pwd.getpwnam(DEFAULT_OS_USER)
    return subprocess.run(
        [
            "mount",
            "-t",
            "tmpfs",
            "-o",
            f"size={size},uid={pw.pw_uid},gid={pw.pw_gid},mode=0700",
            "tmpfs",
            str(mountpoint),
        ],
        capture_output=True,
        text=True,
        check=False,
    )


def mount_tmpfs(mountpoint: Path, size: str) -> None:
    """Mount a new, empty tmpfs on ``mountpoint`` again (after ``umount``)."""
    proc = _mount_tmpfs(mountpoint, size)
    assert proc.returncode == 0, proc.stderr


def remount(mountpoint: Path, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(mountpoint)], check=True)


def umount(mountpoint: Path) -> None:
    subprocess.run(["umount", str(mountpoint)], check=True)

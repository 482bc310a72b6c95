# Copyright: contributors to pitr.postgresql
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""WAL prefetch: name arithmetic, the spool's identity and files, the foreground's hit and
miss, the prefetcher's rounds (run in this process), discard(), and the imports of a hit."""

from __future__ import annotations

import fcntl
import os
import struct
import subprocess
import threading
import time
import typing as t
from pathlib import Path

import pytest

from ansible_collections.pitr.postgresql.plugins.module_utils import hostcmd, prefetch, repository
from ansible_collections.pitr.postgresql.plugins.module_utils.prefetch import Marker, Spool
from tests.support import wal_samples
from tests.support.hostcmd_install import install_host_command

MiB = 1024 * 1024
SEG = 16 * MiB
SYSID = wal_samples.SYSID_A


def segment(n: int, timeline: int = 1) -> bytes:
    """Segment number ``n`` of cluster A: the recorded first page, its address made ``n``'s."""
    data = bytearray(wal_samples.full_segment(wal_samples.TL1_SEG2_PAGE))
    struct.pack_into("<IQ", data, 4, timeline, n * SEG)
    return bytes(data)


def name(n: int, timeline: int = 1) -> str:
    return f"{timeline:08X}00000000{n:08X}"


# ---------------------------------------------------------------------------------------------
# pure parts


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("000000010000000000000002", True),
        ("00000002000000A1000000FF", True),
        ("00000002.history", False),
        ("000000010000000000000003.partial", False),
        ("000000010000000000000002.00000028.backup", False),
        ("000000010000000000000002\n", False),
        ("RECOVERYXLOG", False),
        ("", False),
    ],
)
def test_is_segment(text: str, expected: bool) -> None:
    assert prefetch.is_segment(text) is expected


@pytest.mark.parametrize(
    ("want", "ahead", "size", "expected"),
    [
        (
            "000000010000000000000002",
            2,
            SEG,
            ["000000010000000000000003", "000000010000000000000004"],
        ),
        # 16 MiB segments: 256 per log id, the next after ...FF is the next log's 00
        (
            "0000000200000003000000FE",
            3,
            SEG,
            ["0000000200000003000000FF", "000000020000000400000000", "000000020000000400000001"],
        ),
        # 1 GiB segments: 4 per log id
        (
            "000000010000000000000003",
            2,
            1024 * MiB,
            ["000000010000000100000000", "000000010000000100000001"],
        ),
        # 1 MiB segments: 4096 per log id
        ("000000010000000000000FFF", 1, MiB, ["000000010000000100000000"]),
        ("000000010000000000000001", 0, SEG, []),
    ],
)
def test_window(want: str, ahead: int, size: int, expected: list[str]) -> None:
    assert prefetch.window(want, ahead, size) == expected


def test_identity_file_is_the_repositorys() -> None:
    assert prefetch.IDENTITY_FILE == repository.IDENTITY_KEY


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    path = tmp_path / "repo"
    path.mkdir()
    repository.Repository.open_posix(str(path)).ensure_identity(
        repository.RepositoryIdentity(SYSID, 15, SEG)
    )
    return path


def test_marker_names_the_repository_and_its_identity_file(repo: Path, tmp_path: Path) -> None:
    text = prefetch.repository_marker(str(repo), SYSID, SEG)
    marker = Marker(text)
    assert (marker.root, marker.system_identifier, marker.segment_size) == (str(repo), SYSID, SEG)
    assert marker.matches(str(repo))
    assert marker.matches(str(tmp_path / "x" / ".." / "repo"))  # the same path
    other = tmp_path / "other"
    other.mkdir()
    (other / "pitr-repository.json").write_bytes((repo / "pitr-repository.json").read_bytes())
    assert not marker.matches(str(other))
    # recreated at the same path (a new identity file): another repository
    (repo / "pitr-repository.json").unlink()
    (other / "pitr-repository.json").rename(repo / "pitr-repository.json")
    assert not marker.matches(str(repo))
    (repo / "pitr-repository.json").unlink()
    assert not marker.matches(str(repo))


@pytest.mark.parametrize(
    "text",
    [
        "",
        "/r\n1\n16777216\n",
        "/r\n1\n16777216\n1:2:3:4\nx\n",
        "/r\nx\n1\n1:2\n",
        "/r\n1\n3000\n1:2\n",
    ],
)
def test_marker_rejects_what_is_not_one(text: str) -> None:
    with pytest.raises(ValueError):
        Marker(text)


def test_segment_is_checks_size_cluster_and_position(tmp_path: Path) -> None:
    marker = Marker(f"/r\n{SYSID}\n{SEG}\n1:2:3:4\n")
    cases = {
        "right": (segment(5), name(5), ""),
        "next timeline, same position": (segment(5), name(5, timeline=2), ""),
        "another segment's bytes": (segment(6), name(5), "its first page is at 0x6000000"),
        "short": (segment(5)[: SEG - 1], name(5), "bytes, not the repository's segment size"),
        "not WAL": (bytes(SEG), name(5), "long-header flag"),
    }
    foreign = bytearray(segment(5))
    struct.pack_into("<Q", foreign, 24, SYSID + 1)
    cases["another cluster"] = (bytes(foreign), name(5), f"system identifier {SYSID + 1}")
    for label, (data, wal, why) in cases.items():
        path = tmp_path / label
        path.write_bytes(data)
        fd = os.open(path, os.O_RDONLY)
        try:
            got = prefetch.segment_is(fd, wal, marker)
        finally:
            os.close(fd)
        assert (why in got and bool(got) == bool(why)) if why else got == "", (label, got)


# ---------------------------------------------------------------------------------------------
# the spool, as the foreground sees it


def archive_segments(repo: Path, *numbers: int) -> None:
    from ansible_collections.pitr.postgresql.plugins.module_utils import archive

    src = repo.parent / "src"
    src.mkdir(exist_ok=True)
    for n in numbers:
        (src / name(n)).write_bytes(segment(n))
        archive.push(repository.Repository.open_posix(str(repo)), str(src / name(n)), codec="none")


@pytest.fixture
def spool_dir(tmp_path: Path) -> Path:
    (tmp_path / "data" / "pg_wal").mkdir(parents=True)
    return tmp_path / "data" / "pg_wal" / "pitr-prefetch"


def test_spool_open_creates_and_claims_it(repo: Path, spool_dir: Path) -> None:
    spool = Spool.open(str(spool_dir), str(repo))
    assert spool is not None
    try:
        assert (spool_dir / "repository").read_text() == prefetch.repository_marker(
            str(repo), SYSID, SEG
        )
        assert spool.marker.segment_size == SEG
        assert sorted(os.listdir(spool_dir)) == ["lock", "repository"]
    finally:
        spool.close()


def test_spool_open_without_parent_or_repository_identity(
    tmp_path: Path, repo: Path, spool_dir: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    assert Spool.open(str(tmp_path / "nowhere" / "pitr-prefetch"), str(repo)) is None
    assert "cannot use the spool" in capfd.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert Spool.open(str(spool_dir), str(empty)) is None  # the direct fetch says why
    assert not (spool_dir / "repository").exists()


def test_spool_of_another_repository_is_emptied(
    repo: Path, spool_dir: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    other = tmp_path / "other"
    other.mkdir()
    (other / "pitr-repository.json").write_bytes((repo / "pitr-repository.json").read_bytes())
    spool_dir.mkdir()
    (spool_dir / "repository").write_text(prefetch.repository_marker(str(other), SYSID, SEG))
    (spool_dir / name(3)).write_bytes(segment(3))
    (spool_dir / "want").write_text(name(2) + "\n")
    spool = Spool.open(str(spool_dir), str(repo))
    assert spool is not None
    spool.close()
    assert sorted(os.listdir(spool_dir)) == ["lock", "repository"]
    assert Marker((spool_dir / "repository").read_text()).matches(str(repo))
    assert "emptied the spool" in capfd.readouterr().err


def test_spool_held_by_another_repositorys_prefetcher_is_not_used(
    repo: Path, spool_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    other = tmp_path / "other"
    other.mkdir()
    (other / "pitr-repository.json").write_text("{}")
    spool_dir.mkdir()
    (spool_dir / "repository").write_text(prefetch.repository_marker(str(other), SYSID, SEG))
    (spool_dir / name(3)).write_bytes(segment(3))
    held = os.open(spool_dir / "lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(held, fcntl.LOCK_EX)
    monkeypatch.setattr(prefetch, "CLAIM_WAIT_SECONDS", 0.2)
    try:
        assert Spool.open(str(spool_dir), str(repo)) is None
    finally:
        os.close(held)
    assert (spool_dir / "stop").exists()  # asked to stop
    assert (spool_dir / name(3)).exists()  # nothing removed under a live prefetcher


def test_take_serves_exactly_the_segment_asked_for(
    repo: Path, spool_dir: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    spool = Spool.open(str(spool_dir), str(repo))
    assert spool is not None
    dest = spool_dir.parent / "RECOVERYXLOG"
    try:
        assert spool.take(name(3), str(dest), 1.0) is None  # not spooled
        (spool_dir / name(3)).write_bytes(segment(4))  # another segment's bytes
        assert spool.take(name(3), str(dest), 1.0) is None
        assert not dest.exists()
        assert not (spool_dir / name(3)).exists()
        assert f"the spooled {name(3)} is not that segment" in capfd.readouterr().err
        (spool_dir / name(4)).write_bytes(segment(4))
        assert spool.take(name(4), str(dest), 1.0) == SEG
        assert dest.read_bytes() == segment(4)
        assert not (spool_dir / name(4)).exists()
    finally:
        spool.close()


def test_take_waits_for_a_prefetch_in_progress(repo: Path, spool_dir: Path) -> None:
    spool = Spool.open(str(spool_dir), str(repo))
    assert spool is not None
    dest = spool_dir.parent / "RECOVERYXLOG"
    lock = os.open(spool_dir / "lock", os.O_RDWR)
    fcntl.flock(lock, fcntl.LOCK_EX)  # a prefetcher is alive ...
    tmp = spool_dir / f"{name(5)}.pitr-tmp.1234"
    tmp.write_bytes(b"")  # ... and fetching segment 5

    def finish() -> None:
        time.sleep(0.3)
        tmp.write_bytes(segment(5))
        tmp.rename(spool_dir / name(5))

    th = threading.Thread(target=finish)
    th.start()
    try:
        assert spool.take(name(5), str(dest), 30.0) == SEG
        assert dest.read_bytes() == segment(5)
    finally:
        th.join()
        os.close(lock)
        spool.close()


def test_take_does_not_wait_for_a_dead_prefetchers_leftover(repo: Path, spool_dir: Path) -> None:
    spool = Spool.open(str(spool_dir), str(repo))
    assert spool is not None
    (spool_dir / f"{name(5)}.pitr-tmp.1234").write_bytes(b"")  # no one holds the lock
    started = time.monotonic()
    try:
        assert spool.take(name(5), str(spool_dir.parent / "X"), 600.0) is None
    finally:
        spool.close()
    assert time.monotonic() - started < 300  # it did not wait out the bound


def test_expect_writes_want_and_advance_starts_one_prefetcher(
    repo: Path, spool_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    started: list[tuple[int, str, int]] = []

    def fake_spawn(dir_fd: int, lock_fd: int, root: str, ahead: int, marker: Marker) -> None:
        started.append((ahead, root, marker.segment_size))
        os.close(lock_fd)

    monkeypatch.setattr(prefetch, "spawn", fake_spawn)
    spool = Spool.open(str(spool_dir), str(repo))
    assert spool is not None
    try:
        spool.expect(name(3))
        spool.advance(name(3), 4, str(repo))
        assert (spool_dir / "want").read_text() == name(3) + "\n"
        assert started == [(4, str(repo), SEG)]
        lock = os.open(spool_dir / "lock", os.O_RDWR)
        fcntl.flock(lock, fcntl.LOCK_EX)  # one runs: no second one
        spool.expect(name(4))
        spool.advance(name(4), 4, str(repo))
        os.close(lock)
        assert (spool_dir / "want").read_text() == name(4) + "\n"
        assert len(started) == 1
        (spool_dir / "stop").touch()  # discarded: none any more
        spool.expect(name(5))
        spool.advance(name(5), 4, str(repo))
        assert len(started) == 1
        assert not [f for f in os.listdir(spool_dir) if ".pitr-tmp." in f]
    finally:
        spool.close()


# ---------------------------------------------------------------------------------------------
# the prefetcher, in this process


def run_prefetcher(
    spool_dir: Path, repo: Path, ahead: int, idle: float = 0.3, data_dir: Path | None = None
) -> str:
    """Run the prefetcher here until it exits. Without ``data_dir`` (where restore_command
    ran, as spawned) it keeps what it fetched when idle, for the tests to look at."""
    dir_fd = os.open(spool_dir, os.O_RDONLY | os.O_DIRECTORY)
    data_fd = os.open(data_dir, os.O_RDONLY | os.O_DIRECTORY) if data_dir else None
    lock_fd = prefetch._try_lock(dir_fd)
    assert lock_fd is not None
    marker = Marker((spool_dir / "repository").read_text())
    try:
        code = prefetch.run(
            dir_fd, lock_fd, str(repo), ahead, marker, idle_seconds=idle, data_dir_fd=data_fd
        )
        assert code == 0
    finally:
        os.close(lock_fd)
        os.close(dir_fd)
        if data_fd is not None:
            os.close(data_fd)
    return (spool_dir / "lock").read_text()


def segments_in(spool_dir: Path) -> list[str]:
    return sorted(f for f in os.listdir(spool_dir) if prefetch.is_segment(f))


def test_prefetcher_fills_the_window_and_stops_at_the_end_of_the_archive(
    repo: Path, spool_dir: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    archive_segments(repo, 2, 3, 4, 5, 7)
    Spool.open(str(spool_dir), str(repo)).close()  # type: ignore[union-attr]
    (spool_dir / "want").write_text(name(2) + "\n")
    (spool_dir / name(1)).write_bytes(segment(1))  # older than want: removed
    (spool_dir / name(9, timeline=2)).write_bytes(segment(9))  # another timeline: removed
    (spool_dir / f"{name(3)}.pitr-tmp.999999").write_bytes(b"x")  # a dead one's leftover
    pid_line = run_prefetcher(spool_dir, repo, ahead=6)
    assert pid_line == f"{os.getpid()}\n"
    # 3, 4, 5; 6 is not archived: nothing past it (7) is fetched
    assert segments_in(spool_dir) == [name(3), name(4), name(5)]
    for n in (3, 4, 5):
        assert (spool_dir / name(n)).read_bytes() == segment(n)
    assert sorted(os.listdir(spool_dir)) == sorted(
        ["lock", "repository", "want", name(3), name(4), name(5)]
    )
    err = capfd.readouterr().err
    assert "prefetch: started" in err
    assert "prefetch: stopped (idle for 0.3 s)" in err


def test_prefetcher_idle_after_recovery_removes_the_segments_nobody_took(
    repo: Path, spool_dir: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    data = spool_dir.parent.parent  # restore_command runs in the data directory
    archive_segments(repo, 2, 3, 4)
    Spool.open(str(spool_dir), str(repo)).close()  # type: ignore[union-attr]
    (spool_dir / "want").write_text(name(2) + "\n")
    (spool_dir / f"{name(5)}.pitr-tmp.999999").write_bytes(b"x")  # a dead one's leftover
    # Still recovering (a slow segment, a pause at the target): idle, it keeps them for the
    # next fetch.
    for signal_file in ("recovery.signal", "standby.signal"):
        (data / signal_file).touch()
        run_prefetcher(spool_dir, repo, ahead=2, idle=0.3, data_dir=data)
        assert segments_in(spool_dir) == [name(3), name(4)]
        (data / signal_file).unlink()
    assert "prefetch: stopped (idle for 0.3 s)\n" in capfd.readouterr().err
    # Recovery is over (promoted: no signal file): nobody will ask for 3 and 4, and nothing
    # else would ever remove them from pg_wal.
    run_prefetcher(spool_dir, repo, ahead=2, idle=0.3, data_dir=data)
    assert segments_in(spool_dir) == []
    # the spool's own files stay: the next fetch uses the spool as before
    assert sorted(os.listdir(spool_dir)) == ["lock", "repository", "want"]
    err = capfd.readouterr().err
    assert "prefetch: stopped (idle for 0.3 s; removed 2 unused segment(s))" in err
    # asked to stop (discard): the segments are discard()'s to remove, with the spool
    run_prefetcher(spool_dir, repo, ahead=2, idle=0.3)
    assert segments_in(spool_dir) == [name(3), name(4)]
    (spool_dir / "stop").touch()
    run_prefetcher(spool_dir, repo, ahead=2, idle=600, data_dir=data)
    assert segments_in(spool_dir) == [name(3), name(4)]
    assert "prefetch: stopped (asked to stop)" in capfd.readouterr().err


def test_prefetcher_skips_and_logs_a_corrupt_segment(
    repo: Path, spool_dir: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    archive_segments(repo, 3, 4, 5)
    obj = repo / repository.wal_key(name(4))
    blob = bytearray(obj.read_bytes())
    blob[len(blob) // 2] ^= 1
    obj.chmod(0o600)
    obj.write_bytes(bytes(blob))
    Spool.open(str(spool_dir), str(repo)).close()  # type: ignore[union-attr]
    (spool_dir / "want").write_text(name(2) + "\n")
    run_prefetcher(spool_dir, repo, ahead=3)
    assert segments_in(spool_dir) == [name(3), name(5)]
    err = capfd.readouterr().err
    assert err.count(f"prefetch {name(4)}: ") == 1  # once, not every round
    assert "(left to the direct fetch)" in err


def test_prefetcher_stops_on_the_stop_file_and_when_its_spool_is_gone(
    repo: Path, spool_dir: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    Spool.open(str(spool_dir), str(repo)).close()  # type: ignore[union-attr]
    (spool_dir / "stop").touch()
    run_prefetcher(spool_dir, repo, ahead=2, idle=600)
    assert "prefetch: stopped (asked to stop)" in capfd.readouterr().err
    (spool_dir / "stop").unlink()
    dir_fd = os.open(spool_dir, os.O_RDONLY | os.O_DIRECTORY)
    lock_fd = prefetch._try_lock(dir_fd)
    assert lock_fd is not None
    marker = Marker((spool_dir / "repository").read_text())
    # the data directory moved away and a new one appeared at the old path
    moved = spool_dir.parent.parent.parent / "moved"
    spool_dir.parent.parent.rename(moved)
    spool_dir.mkdir(parents=True)
    (moved / "pg_wal" / "pitr-prefetch" / "want").write_text(name(2) + "\n")
    archive_segments(repo, 3)
    for fn in os.listdir(moved / "pg_wal" / "pitr-prefetch"):
        if fn not in ("want", "lock", "repository"):
            os.unlink(moved / "pg_wal" / "pitr-prefetch" / fn)
    try:
        prefetch.run(dir_fd, lock_fd, str(repo), 1, marker, idle_seconds=0.3)
    finally:
        os.close(lock_fd)
        os.close(dir_fd)
    assert os.listdir(spool_dir) == []  # nothing written at the old path
    assert (moved / "pg_wal" / "pitr-prefetch" / name(3)).read_bytes() == segment(3)
    # and a removed spool ends it at once
    import shutil

    dir_fd = os.open(moved / "pg_wal" / "pitr-prefetch", os.O_RDONLY | os.O_DIRECTORY)
    lock_fd = prefetch._try_lock(dir_fd)
    assert lock_fd is not None
    shutil.rmtree(moved / "pg_wal" / "pitr-prefetch")
    try:
        prefetch.run(dir_fd, lock_fd, str(repo), 1, marker, idle_seconds=600)
    finally:
        os.close(lock_fd)
        os.close(dir_fd)
    assert "prefetch: stopped (its spool was removed)" in capfd.readouterr().err


# ---------------------------------------------------------------------------------------------
# discard()


def test_discard_without_a_spool(tmp_path: Path) -> None:
    assert prefetch.discard(str(tmp_path / "none")) is True


def test_discard_stops_the_prefetcher_then_removes_the_spool(repo: Path, spool_dir: Path) -> None:
    Spool.open(str(spool_dir), str(repo)).close()  # type: ignore[union-attr]
    done: list[str] = []
    th = threading.Thread(target=lambda: done.append(run_prefetcher(spool_dir, repo, 1, 600)))
    th.start()
    deadline = time.monotonic() + 30
    while not (spool_dir / "lock").read_text() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert prefetch._lock_held(os.open(spool_dir, os.O_RDONLY | os.O_DIRECTORY))
    assert prefetch.discard(str(spool_dir), wait_seconds=60) is True
    th.join(60)
    assert done and not th.is_alive()
    assert not spool_dir.exists()


def test_discard_gives_up_waiting_but_removes_the_spool(repo: Path, spool_dir: Path) -> None:
    Spool.open(str(spool_dir), str(repo)).close()  # type: ignore[union-attr]
    held = os.open(spool_dir / "lock", os.O_RDWR)
    fcntl.flock(held, fcntl.LOCK_EX)
    try:
        assert prefetch.discard(str(spool_dir), wait_seconds=0.2) is False
    finally:
        os.close(held)
    assert not spool_dir.exists()


def test_default_spool() -> None:
    assert (
        prefetch.default_spool("/var/lib/pg/15/main") == "/var/lib/pg/15/main/pg_wal/pitr-prefetch"
    )


# ---------------------------------------------------------------------------------------------
# through the installed program


HEAVY = ("typing", "re", "enum", "collections", "functools", "contextlib", "threading", "json")
FETCH_PATH = ("archive", "repository", "storage", "compression", "errors")


def test_a_hit_imports_little(repo: Path, spool_dir: Path, tmp_path: Path) -> None:
    program = install_host_command(tmp_path / "prefix")
    Spool.open(str(spool_dir), str(repo)).close()  # type: ignore[union-attr]
    (spool_dir / name(3)).write_bytes(segment(3))
    (spool_dir / "stop").touch()  # no prefetcher from this test
    mu = "ansible_collections.pitr.postgresql.plugins.module_utils."
    probe = (
        "import sys; sys.argv = sys.argv[1:]; path = sys.argv[0]\n"
        "with open(path) as fh: launcher = compile(fh.read(), path, 'exec')\n"
        "try:\n exec(launcher, {'__name__': '__main__', '__file__': path})\n"
        "except SystemExit as exc: code = exc.code\n"
        f"print(code, sorted(m for m in {HEAVY!r} if m in sys.modules),"
        f" sorted(m for m in {FETCH_PATH!r} if {mu!r} + m in sys.modules))"
    )
    argv = [program, "--repo", str(repo), "--prefetch", "4", "fetch", name(3), "pg_wal/RX"]
    out = subprocess.run(
        ["/usr/bin/python3", "-I", "-S", "-c", probe, *argv],
        capture_output=True,
        text=True,
        check=True,
        cwd=spool_dir.parent.parent,
        timeout=60,
    )
    assert out.stdout.strip().splitlines()[-1] == "0 [] []", out.stdout + out.stderr
    assert f"fetch {name(3)}: restored 16.0 MiB from prefetch" in out.stderr
    assert (spool_dir.parent / "RX").read_bytes() == segment(3)


def test_fetch_through_main_serves_then_falls_back(
    repo: Path, spool_dir: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    archive_segments(repo, 3, 4)
    spawned: list[int] = []

    def fake_spawn(dir_fd: int, lock_fd: int, root: str, ahead: int, marker: Marker) -> None:
        spawned.append(ahead)
        os.close(lock_fd)

    monkeypatch.setattr(prefetch, "spawn", fake_spawn)
    wanted_at_take: list[str] = []
    real_take = Spool.take

    def take(self: Spool, segment_name: str, dest: str, wait_seconds: float) -> int | None:
        wanted_at_take.append((spool_dir / "want").read_text().strip())
        return real_take(self, segment_name, dest, wait_seconds)

    monkeypatch.setattr(Spool, "take", take)
    monkeypatch.chdir(spool_dir.parent.parent)
    args: list[str] = ["--repo", str(repo), "--timeout", "0", "--prefetch", "2"]
    assert hostcmd.main([*args, "fetch", name(3), "pg_wal/RECOVERYXLOG"]) == 0
    err = capfd.readouterr().err
    assert f"fetch {name(3)}: restored 16.0 MiB (none)" in err
    assert spawned == [2]
    assert (spool_dir / "want").read_text() == name(3) + "\n"
    (spool_dir / name(4)).write_bytes(segment(4))
    assert hostcmd.main([*args, "fetch", name(4), "pg_wal/RECOVERYXLOG"]) == 0
    assert f"fetch {name(4)}: restored 16.0 MiB from prefetch" in capfd.readouterr().err
    assert Path("pg_wal/RECOVERYXLOG").read_bytes() == segment(4)
    # not archived: 1 from the foreground's own look, nothing written; want says what was
    # asked (a prefetcher looks past it, where nothing is archived either), none is started
    os.unlink("pg_wal/RECOVERYXLOG")
    assert hostcmd.main([*args, "fetch", name(5), "pg_wal/RECOVERYXLOG"]) == 1
    assert not os.path.exists("pg_wal/RECOVERYXLOG")
    assert (spool_dir / "want").read_text() == name(5) + "\n"
    assert spawned == [2, 2]
    # want named each segment before the spool was looked into (see expect())
    assert wanted_at_take == [name(3), name(4), name(5)]
    # a spool that cannot be made: the direct fetch, one line
    monkeypatch.chdir(repo.parent)
    assert hostcmd.main([*args, "fetch", name(3), "RECOVERYXLOG"]) == 0
    err = capfd.readouterr().err
    assert "cannot use the spool pg_wal/pitr-prefetch" in err
    assert f"fetch {name(3)}: restored 16.0 MiB (none)" in err


def test_fetch_keeps_its_exit_code_when_the_spool_breaks(
    repo: Path, spool_dir: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    archive_segments(repo, 3)

    def broken(*args: t.Any, **kwargs: t.Any) -> t.Any:
        raise KeyError("a bug")

    monkeypatch.setattr(prefetch.Spool, "take", broken)
    monkeypatch.setattr(prefetch.Spool, "advance", broken)
    monkeypatch.chdir(spool_dir.parent.parent)
    args = ["--repo", str(repo), "--timeout", "0", "--prefetch", "2"]
    assert hostcmd.main([*args, "fetch", name(3), "pg_wal/RECOVERYXLOG"]) == 0
    assert Path("pg_wal/RECOVERYXLOG").read_bytes() == segment(3)
    assert hostcmd.main([*args, "fetch", name(4), "pg_wal/X"]) == 1
    assert not os.path.exists("pg_wal/X")
    err = capfd.readouterr().err
    assert "the prefetch spool is unusable (KeyError" in err
    assert "cannot start the prefetch (KeyError" in err


def test_a_segment_being_taken_is_not_fetched_again(repo: Path, spool_dir: Path) -> None:
    """The foreground writes want before it takes the segment out of the spool: a round
    that began with the old want and finds the segment gone skips it instead of fetching it
    again, and a round of the new want does not tidy it away before it is taken."""
    archive_segments(repo, 3, 4, 5)
    spool = Spool.open(str(spool_dir), str(repo))
    assert spool is not None
    dir_fd = os.open(spool_dir, os.O_RDONLY | os.O_DIRECTORY)
    fetched: list[str] = []
    try:
        pf = prefetch.Prefetcher(
            dir_fd, repository.Repository.open_posix(str(repo)), 3, spool.marker, threads=1
        )
        real_fetch_one = pf.fetch_one

        def counting_fetch_one(segment_name: str) -> bool:
            fetched.append(segment_name)
            return real_fetch_one(segment_name)

        pf.fetch_one = counting_fetch_one  # type: ignore[method-assign]
        for n in (3, 4):
            (spool_dir / name(n)).write_bytes(segment(n))
        spool.expect(name(3))
        pf.round(name(3))  # the new want's round: 3 stays for the foreground, 5 is fetched
        assert segments_in(spool_dir) == [name(3), name(4), name(5)]
        assert fetched == [name(5)]
        (spool_dir / name(5)).unlink()
        dest = spool_dir.parent / "RECOVERYXLOG"
        assert spool.take(name(3), str(dest), 0) == SEG
        pf.round(name(2))  # a round that read the old want before the take
        assert fetched == [name(5), name(5)]  # 3 was skipped: it is at or below want
        assert segments_in(spool_dir) == [name(4), name(5)]
    finally:
        os.close(dir_fd)
        spool.close()


def test_prefetcher_leaves_the_foregrounds_files_alone(repo: Path, spool_dir: Path) -> None:
    Spool.open(str(spool_dir), str(repo)).close()  # type: ignore[union-attr]
    (spool_dir / "want").write_text(name(2) + "\n")
    foreground = ["want.pitr-tmp.4242", "repository.pitr-tmp.4242", "stop.pitr-tmp.4242"]
    for fn in foreground:
        (spool_dir / fn).write_text("x")
    run_prefetcher(spool_dir, repo, ahead=2, idle=0.2)
    assert set(foreground) <= set(os.listdir(spool_dir))

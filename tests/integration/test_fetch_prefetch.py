# Copyright: contributors to pitr.postgresql
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""``pitr-wal fetch --prefetch N`` against real PostgreSQL 15 and the installed host command.

A source cluster archives pgbench WAL through ``pitr-wal push``; a copy of its base backup
replays that WAL through a restore_command with ``--prefetch 4`` to the end of the archive.
The restore contract holds with prefetch on: a missing file exits 1 and writes nothing, a
corrupted segment the prefetcher met is never served and the foreground exits 255, a spool of
another repository or a spooled file that is not the segment asked for never reaches ``%p``.

The prefetcher is detached and keeps the command's stderr: these tests send that stderr to a
file (PostgreSQL's system() waits for the shell only; a captured pipe would wait for the
prefetcher too) and read the lines back from it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
import typing as t
from dataclasses import dataclass
from pathlib import Path

import pytest
from archive_fixtures import (
    PYTHON,
    archived_names,
    as_server_user,
    init_repo,
    install,
    new_dir,
    object_path,
    pg_quote,
    pitr_wal,
    run,
    wait_until,
)
from pgcluster import PgCluster, give_to_server_user

from ansible_collections.pitr.postgresql.plugins.module_utils import hostcmd, prefetch

SEGMENT_RE = re.compile(r"^[0-9A-F]{24}$")


@pytest.fixture(scope="module")
def program() -> t.Iterator[str]:
    path, prefix = install()
    yield path
    shutil.rmtree(prefix, ignore_errors=True)


@dataclass
class Source:
    cluster: PgCluster
    repo: Path
    backup: Path  # a plain base backup taken before the load (-X none: its WAL is archived)
    accounts: int
    marker: str

    def segments(self) -> list[str]:
        return [n for n in archived_names(self.repo) if SEGMENT_RE.match(n)]


@pytest.fixture(scope="module")
def source(program: str) -> t.Iterator[Source]:
    repo = new_dir("pitr-prefetch-repo-")
    backup_parent = new_dir("pitr-prefetch-backup-")
    conf = {
        "wal_level": "replica",
        "archive_mode": "on",
        "archive_command": pg_quote(hostcmd.archive_command_for(program=program, repo=str(repo))),
        "max_wal_size": "'1GB'",
        # The archive's end must stay where the tests found it: no autovacuum after the load
        # filling a segment meanwhile (CI once saw one more segment archived mid-test).
        "autovacuum": "off",
    }
    cluster = PgCluster.create(conf=conf)
    try:
        init_repo(program, repo, cluster.datadir)
        cluster.start()
        conn = ["-h", str(cluster.sockdir), "-p", str(cluster.port), "-U", "postgres"]
        backup = backup_parent / "data"
        taken = run(
            [cluster.bin("pg_basebackup"), *conn, "-D", str(backup), "-X", "none", "-c", "fast"]
        )
        assert taken.rc == 0, str(taken)
        init = run([cluster.bin("pgbench"), "-i", "-q", "-s", "8", *conn, "postgres"])
        assert init.rc == 0, str(init)
        bench = run([cluster.bin("pgbench"), "-T", "3", "-c", "2", "-j", "2", *conn, "postgres"])
        assert bench.rc == 0, str(bench)
        marker = f"replayed-{os.getpid()}-{time.time_ns()}"
        cluster.sql("CREATE TABLE prefetch_marker AS SELECT %s::text AS m", (marker,))
        accounts = cluster.scalar("SELECT count(*) FROM pgbench_accounts")
        name = cluster.switch_wal()
        wait_until(
            lambda: cluster.scalar("SELECT last_archived_wal >= %s FROM pg_stat_archiver", (name,)),
            120,
            f"{name} to be archived",
        )
        yield Source(cluster, repo, backup, accounts, marker)
    finally:
        cluster.destroy()
        shutil.rmtree(repo, ignore_errors=True)
        shutil.rmtree(backup_parent, ignore_errors=True)


@dataclass
class Fetch:
    rc: int
    stderr: str


class Workdir:
    """A stand-in data directory (restore_command's cwd) with pg_wal, and a log file."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.pg_wal = base / "pg_wal"
        self.pg_wal.mkdir()
        give_to_server_user(self.pg_wal)
        self.spool = self.pg_wal / "pitr-prefetch"
        self.log = base / "stderr.log"

    @property
    def dest(self) -> Path:
        return self.pg_wal / "RECOVERYXLOG"

    def fetch(self, program: str, repo: Path, name: str, *extra: str) -> Fetch:
        """``fetch NAME pg_wal/RECOVERYXLOG`` as restore_command runs it (cwd: the data
        directory); stderr, the prefetcher's included, goes to the log file."""
        before = self.log_text()
        argv = [PYTHON, "-I", "-S", program, "--repo", str(repo), *extra]
        with open(self.log, "a", encoding="utf-8") as err:
            proc = subprocess.run(
                as_server_user([*argv, "fetch", name, "pg_wal/RECOVERYXLOG"]),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                cwd=self.base,
                timeout=120,
                check=False,
            )
        return Fetch(proc.returncode, self.log_text()[len(before) :])

    def log_text(self) -> str:
        try:
            return self.log.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def spooled(self) -> list[str]:
        return sorted(n for n in os.listdir(self.spool) if SEGMENT_RE.match(n))


@pytest.fixture
def work() -> t.Iterator[Workdir]:
    base = new_dir("pitr-prefetch-work-")
    w = Workdir(base)
    try:
        yield w
    finally:
        stopped = prefetch.discard(str(w.spool), wait_seconds=30)
        shutil.rmtree(base, ignore_errors=True)
        assert stopped, "the prefetcher did not stop within 30 s of discard()"


def chown_tree(path: Path) -> None:
    give_to_server_user(path)
    for dirpath, dirs, files in os.walk(path):
        for n in dirs + files:
            give_to_server_user(Path(dirpath, n))


def copy_repo(src: Path) -> Path:
    dst = new_dir("pitr-prefetch-copy-")
    shutil.copytree(src, dst, dirs_exist_ok=True)
    chown_tree(dst)
    return dst


def segment_bytes(program: str, repo: Path, names: list[str]) -> dict[str, bytes]:
    out = new_dir("pitr-prefetch-out-")
    try:
        found = {}
        for name in names:
            res = pitr_wal(program, "--repo", str(repo), "fetch", name, str(out / name))
            assert res.rc == 0, str(res)
            found[name] = (out / name).read_bytes()
        return found
    finally:
        shutil.rmtree(out, ignore_errors=True)


def prefetcher_pid(spool: Path) -> int:
    text = wait_until(lambda: (spool / "lock").read_text().strip(), 30, "the prefetcher's pid")
    return int(text)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            return fh.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


# ---------------------------------------------------------------------------------------------
# a real restore


def start_clone(clone: PgCluster, source: Source, conf: dict[str, str]) -> None:
    """Start ``clone``, a copy of the source's base backup, in archive recovery with ``conf``."""
    clone.sockdir.mkdir()
    give_to_server_user(clone.sockdir)
    shutil.copytree(source.backup, clone.datadir, symlinks=True)
    chown_tree(clone.datadir)
    os.chmod(clone.datadir, 0o700)
    clone.append_conf(
        {
            "port": str(clone.port),
            "unix_socket_directories": pg_quote(str(clone.sockdir)),
            "archive_mode": "off",
            **conf,
        }
    )
    (clone.datadir / "recovery.signal").touch()
    give_to_server_user(clone.datadir / "recovery.signal")
    clone.start(timeout=300)


def test_restore_replays_the_archive_through_prefetch(source: Source, program: str) -> None:
    restore_command = hostcmd.restore_command_for(
        program=program, repo=str(source.repo), prefetch=4
    )
    assert restore_command.endswith(" --prefetch 4 fetch %f %p")
    clone = PgCluster(new_dir("pitr-prefetch-clone-"))
    try:
        start_clone(clone, source, {"restore_command": pg_quote(restore_command)})
        clone.wait_for("SELECT pg_is_in_recovery()", False, timeout=300)
        assert clone.scalar("SELECT count(*) FROM pgbench_accounts") == source.accounts
        assert clone.scalar("SELECT m FROM prefetch_marker") == source.marker
        log = clone.log_text()
        served = re.findall(r"fetch ([0-9A-F]{24}): restored 16\.0 MiB from prefetch", log)
        direct = re.findall(r"fetch ([0-9A-F]{24}): restored 16\.0 MiB \(", log)
        restored = re.findall(r'restored log file "([0-9A-F]{24})" from archive', log)
        # every segment after the backup's came from the archive; most of them prefetched
        assert len(restored) >= 6, log
        assert set(served) | set(direct) == set(restored), log
        assert len(served) >= len(restored) // 2, log
        assert "prefetch: started (pid " in log
        spool = clone.datadir / "pg_wal" / "pitr-prefetch"
        assert spool.is_dir()
        pid = int((spool / "lock").read_text().strip() or 0)
        assert prefetch.discard(str(spool), wait_seconds=30) is True
        assert not spool.exists()
        assert not pid or not alive(pid), f"prefetcher {pid} still runs after discard()"
        assert sorted(p.name for p in (clone.datadir / "pg_wal").iterdir() if p.is_dir()) == [
            "archive_status"
        ]
    finally:
        clone.destroy()


def test_segments_nobody_took_go_once_recovery_is_over(source: Source, program: str) -> None:
    # A restore that stops early (recovery_target immediate) and promotes by itself: the
    # segments prefetched past its end are never asked for. Nobody discards the spool here (as
    # when a server left paused is promoted by hand): the prefetcher removes them itself once
    # idle, because recovery.signal is gone.
    restore_command = hostcmd.restore_command_for(
        program=program, repo=str(source.repo), prefetch=4
    )
    clone = PgCluster(new_dir("pitr-prefetch-early-"))
    try:
        start_clone(
            clone,
            source,
            {
                "restore_command": pg_quote(restore_command),
                "recovery_target": "'immediate'",
                "recovery_target_action": "'promote'",
            },
        )
        clone.wait_for("SELECT pg_is_in_recovery()", False, timeout=300)
        assert not (clone.datadir / "recovery.signal").exists()
        pattern = re.compile(r"prefetch: stopped \(idle for 10 s; removed ([0-9]+) unused segment")
        found = wait_until(
            lambda: pattern.search(clone.log_text()), 120, "the idle prefetcher to clean up"
        )
        assert int(found.group(1)) >= 1, clone.log_text()
        spool = clone.datadir / "pg_wal" / "pitr-prefetch"
        assert [n for n in os.listdir(spool) if SEGMENT_RE.match(n)] == []
    finally:
        clone.destroy()


# ---------------------------------------------------------------------------------------------
# the restore contract with prefetch on


@pytest.mark.parametrize("name", ["0000000100000000000000FE", "000000050000000000000001"])
def test_missing_segment_exits_1_and_writes_nothing(
    source: Source, program: str, work: Workdir, name: str
) -> None:
    result = work.fetch(program, source.repo, name, "--prefetch", "4")
    assert result.rc == 1, result.stderr
    assert f"fetch {name}: not in the archive" in result.stderr
    assert sorted(os.listdir(work.pg_wal)) == ["pitr-prefetch"]
    assert work.spooled() == []


def test_prefetched_segments_are_served_and_the_end_of_the_archive_still_exits_1(
    source: Source, program: str, work: Workdir
) -> None:
    names = source.segments()[-4:]
    data = segment_bytes(program, source.repo, names)
    first = work.fetch(program, source.repo, names[0], "--prefetch", "8")
    assert first.rc == 0, first.stderr
    assert work.dest.read_bytes() == data[names[0]]
    pid = prefetcher_pid(work.spool)
    # the prefetcher fetches the rest of the archive and stops there (nothing past its end)
    wait_until(lambda: work.spooled() == names[1:], 60, f"{names[1:]} to be spooled")
    for name in names[1:]:
        result = work.fetch(program, source.repo, name, "--prefetch", "8")
        assert result.rc == 0, result.stderr
        assert f"fetch {name}: restored 16.0 MiB from prefetch" in result.stderr
        assert work.dest.read_bytes() == data[name]
    after = prefetch.window(names[-1], 1, 16 * 1024 * 1024)[0]
    result = work.fetch(program, source.repo, after, "--prefetch", "8")
    assert result.rc == 1, result.stderr
    assert f"fetch {after}: not in the archive" in result.stderr
    # Nothing past the end of the archive is ever spooled, and no segment the foreground took
    # is fetched again: it writes want before it takes the segment out of the spool (before
    # that order, CI saw the last segment spooled a second time, in a round that had read the
    # old want).
    assert work.spooled() == []
    assert alive(pid)
    assert prefetch.discard(str(work.spool), wait_seconds=30) is True
    assert not alive(pid)
    assert not work.spool.exists()


def test_corrupted_segment_met_by_the_prefetcher_is_not_served_and_exits_255(
    source: Source, program: str, work: Workdir
) -> None:
    repo = copy_repo(source.repo)
    try:
        names = source.segments()[2:6]
        data = segment_bytes(program, source.repo, names)
        obj = object_path(repo, names[2])
        blob = bytearray(obj.read_bytes())
        blob[len(blob) // 2] ^= 0x01
        obj.write_bytes(bytes(blob))
        result = work.fetch(program, repo, names[0], "--prefetch", "4")
        assert result.rc == 0, result.stderr
        wait_until(
            lambda: f"prefetch {names[2]}: " in work.log_text(),
            60,
            "the prefetcher to meet the corrupted segment",
        )
        assert "it is corrupt (left to the direct fetch)" in work.log_text()
        wait_until(lambda: names[3] in work.spooled(), 60, f"{names[3]} to be spooled")
        assert names[2] not in work.spooled()
        result = work.fetch(program, repo, names[1], "--prefetch", "4")
        assert result.rc == 0, result.stderr
        assert work.dest.read_bytes() == data[names[1]]
        work.dest.unlink()
        result = work.fetch(
            program, repo, names[2], "--prefetch", "4", "--retries", "3", "--retry-delay", "0.3"
        )
        assert result.rc == 255, result.stderr
        assert result.stderr.count("the archived copy fails its checksum") == 3, result.stderr
        assert f"fetch {names[2]} FAILED after 3 attempt(s)" in result.stderr
        assert not work.dest.exists()
        assert sorted(os.listdir(work.pg_wal)) == ["pitr-prefetch"]
    finally:
        shutil.rmtree(repo, ignore_errors=True)


def test_spool_of_another_repository_is_emptied_not_used(
    source: Source, program: str, work: Workdir
) -> None:
    other = copy_repo(source.repo)
    try:
        name = source.segments()[1]
        good = segment_bytes(program, source.repo, [name])[name]
        # A spool filled from another repository: its copy of the segment looks right (size,
        # first page header) but is not this repository's.
        forged = bytearray(good)
        forged[len(forged) // 2] ^= 0x01
        work.spool.mkdir()
        sysid = source.cluster.scalar("SELECT system_identifier FROM pg_control_system()")
        marker = prefetch.repository_marker(str(other), sysid, 16 * 1024 * 1024)
        (work.spool / "repository").write_text(marker)
        (work.spool / name).write_bytes(bytes(forged))
        chown_tree(work.spool)
        result = work.fetch(program, source.repo, name, "--prefetch", "1")
        assert result.rc == 0, result.stderr
        assert "prefetch: emptied the spool" in result.stderr
        assert "from prefetch" not in result.stderr
        assert work.dest.read_bytes() == good
        assert (work.spool / "repository").read_text() != marker
    finally:
        shutil.rmtree(other, ignore_errors=True)


def test_spooled_file_of_another_segment_never_reaches_dest(
    source: Source, program: str, work: Workdir
) -> None:
    names = source.segments()[1:3]
    data = segment_bytes(program, source.repo, names)
    # This repository's spool, with the next segment's bytes under the asked-for name.
    work.spool.mkdir()
    sysid = source.cluster.scalar("SELECT system_identifier FROM pg_control_system()")
    (work.spool / "repository").write_text(
        prefetch.repository_marker(str(source.repo), sysid, 16 * 1024 * 1024)
    )
    (work.spool / names[0]).write_bytes(data[names[1]])
    chown_tree(work.spool)
    result = work.fetch(program, source.repo, names[0], "--prefetch", "1")
    assert result.rc == 0, result.stderr
    assert f"prefetch: the spooled {names[0]} is not that segment" in result.stderr
    assert "from prefetch" not in result.stderr
    assert work.dest.read_bytes() == data[names[0]]


def test_history_file_goes_the_direct_way(source: Source, program: str, work: Workdir) -> None:
    result = work.fetch(program, source.repo, "00000001.history", "--prefetch", "4")
    assert result.rc == 1, result.stderr
    assert not work.spool.exists()
    assert not work.dest.exists()

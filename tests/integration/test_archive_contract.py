# Copyright: contributors to pitr.postgresql
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""PostgreSQL's archiving contract, one rule per test, against real PostgreSQL 15 servers and
the real pitr-wal host command (installed as the archiving role installs it, run as postgres).

The module shares one archiving primary (loaded with pgbench) and a standby promoted from it;
tests that break things (disk full, unwritable or unmounted repositories, hung destinations)
get their own repositories or clusters.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import tempfile
import time
import typing as t
from dataclasses import dataclass
from pathlib import Path

import pytest
from archive_fixtures import (
    PYTHON,
    Run,
    archived_names,
    as_server_user,
    assert_push_failed,
    files_below,
    init_repo,
    install,
    mount_tmpfs,
    new_dir,
    object_path,
    pg_quote,
    pitr_wal,
    remount,
    run,
    sha256_file,
    tmpfs,
    umount,
    wait_until,
)
from pgcluster import PgCluster, give_to_server_user

from ansible_collections.pitr.postgresql.plugins.module_utils import hostcmd

MiB = 1024 * 1024
SEGMENT_RE = re.compile(r"^[0-9A-F]{24}$")


# ---------------------------------------------------------------------------------------------
# module fixtures


@pytest.fixture(scope="module")
def program() -> t.Iterator[str]:
    path, prefix = install()
    yield path
    shutil.rmtree(prefix, ignore_errors=True)


@dataclass
class Primary:
    cluster: PgCluster
    repo: Path
    archived_while_loaded: int = 0

    @property
    def pg_wal(self) -> Path:
        return self.cluster.datadir / "pg_wal"

    def archiver(self) -> dict[str, t.Any]:
        with self.cluster.connect() as conn:
            row = conn.execute(
                "SELECT archived_count, last_archived_wal, failed_count, last_failed_wal"
                " FROM pg_stat_archiver"
            ).fetchone()
        assert row is not None
        return dict(zip(("archived", "last_archived", "failed", "last_failed"), row, strict=True))

    def switch_and_wait(self, timeout: float = 60) -> str:
        """Complete the current segment and wait until the archiver has stored it."""
        name = self.cluster.switch_wal()
        wait_until(
            lambda: self.cluster.scalar(
                "SELECT last_archived_wal >= %s FROM pg_stat_archiver", (name,)
            ),
            timeout,
            f"{name} to be archived",
        )
        return name


def archiving_conf(program: str, repo: Path) -> dict[str, str]:
    return {
        "wal_level": "replica",
        "archive_mode": "on",
        "archive_command": pg_quote(hostcmd.archive_command_for(program=program, repo=str(repo))),
        "restore_command": pg_quote(hostcmd.restore_command_for(program=program, repo=str(repo))),
        # every archived segment stays in pg_wal, to compare with what the archive returns
        "wal_keep_size": "'2GB'",
        "max_wal_size": "'2GB'",
        "max_wal_senders": "5",
    }


@pytest.fixture(scope="module")
def primary(program: str) -> t.Iterator[Primary]:
    repo = new_dir("pitr-repo-")
    cluster = PgCluster.create(conf=archiving_conf(program, repo))
    try:
        # as the archiving role does it: the repository is initialised before the server
        # archives into it (push never initialises one)
        init_repo(program, repo, cluster.datadir)
        cluster.start()
        yield Primary(cluster, repo)
    finally:
        cluster.destroy()
        shutil.rmtree(repo, ignore_errors=True)


@pytest.fixture(scope="module")
def loaded(primary: Primary) -> Primary:
    """The primary after pgbench: many segments archived while it worked."""
    c = primary.cluster
    conn = ["-h", str(c.sockdir), "-p", str(c.port), "-U", "postgres", "postgres"]
    init = run([c.bin("pgbench"), "-i", "-q", "-s", "5", *conn], timeout=120)
    assert init.rc == 0, str(init)
    bench = run([c.bin("pgbench"), "-T", "4", "-c", "2", "-j", "2", *conn], timeout=120)
    assert bench.rc == 0, str(bench)
    assert re.search(r"number of failed transactions: 0 ", bench.stdout), bench.stdout
    primary.archived_while_loaded = primary.archiver()["archived"]
    primary.switch_and_wait(timeout=120)
    return primary


def archived_segments(p: Primary) -> list[str]:
    """The primary's own archived segments (timeline 1; the promoted standby adds timeline 2)."""
    return [n for n in archived_names(p.repo) if SEGMENT_RE.match(n) and n.startswith("00000001")]


def fetch_to(program: str, repo: Path, name: str, dest_dir: Path, *extra: str) -> tuple[Run, Path]:
    dest = dest_dir / "RECOVERYXLOG"
    return pitr_wal(program, "--repo", str(repo), *extra, "fetch", name, str(dest)), dest


@pytest.fixture
def out_dir() -> t.Iterator[Path]:
    """Where a test's fetches write (owned by postgres, checked for leftovers)."""
    d = new_dir("pitr-out-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def repo_dir() -> t.Iterator[Path]:
    d = new_dir("pitr-repo-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# a live server


def test_live_server_archives_under_pgbench_and_every_segment_fetches_back_identical(
    loaded: Primary, program: str, out_dir: Path
) -> None:
    segments = archived_segments(loaded)
    assert len(segments) >= 4, segments  # pgbench -i -s 5 alone writes ~60 MB of WAL
    assert loaded.archived_while_loaded >= 2  # archived while pgbench ran, not only after
    stats = loaded.archiver()
    assert stats["failed"] == 0, stats
    assert stats["last_failed"] is None
    assert stats["archived"] >= len(segments)
    assert segments[-1] == stats["last_archived"]
    for name in segments:
        result, dest = fetch_to(program, loaded.repo, name, out_dir)
        assert result.rc == 0, str(result)
        assert sha256_file(dest) == sha256_file(loaded.pg_wal / name), name
        assert os.path.getsize(dest) == 16 * MiB
    # stored compressed, and nothing else left in the repository
    stored = sum(os.path.getsize(object_path(loaded.repo, n)) for n in segments)
    assert stored < len(segments) * 16 * MiB
    assert not [f for f in files_below(loaded.repo) if ".tmp-" in f]


def test_identical_duplicate_push_exits_0_and_leaves_the_object_unchanged(
    loaded: Primary, program: str
) -> None:
    name = archived_segments(loaded)[1]
    obj = object_path(loaded.repo, name)
    before = os.stat(obj)
    content = obj.read_bytes()
    result = pitr_wal(
        program, "--repo", str(loaded.repo), "push", f"pg_wal/{name}", cwd=loaded.cluster.datadir
    )
    assert result.rc == 0, str(result)
    assert f"push {name}: already archived" in result.stderr
    after = os.stat(obj)
    assert (after.st_ino, after.st_mtime_ns, after.st_size) == (
        before.st_ino,
        before.st_mtime_ns,
        before.st_size,
    )
    assert obj.read_bytes() == content


def test_differing_duplicate_push_fails_loudly_and_leaves_the_archive_untouched(
    loaded: Primary, program: str, out_dir: Path
) -> None:
    name = archived_segments(loaded)[1]
    forged = bytearray((loaded.pg_wal / name).read_bytes())
    forged[MiB] ^= 0xFF  # past the page header: same cluster, same name, other content
    (out_dir / name).write_bytes(bytes(forged))
    before = files_below(loaded.repo)
    result = pitr_wal(
        program, "--repo", str(loaded.repo), "push", str(out_dir / name), cwd=loaded.cluster.datadir
    )
    assert_push_failed(result, f"{name} is already archived", "different content", "left untouched")
    assert files_below(loaded.repo) == before
    fetched, dest = fetch_to(program, loaded.repo, name, out_dir)
    assert fetched.rc == 0
    assert sha256_file(dest) == sha256_file(loaded.pg_wal / name)


SPIN_THEN_EXEC = 'go=$1; shift; until [ -e "$go" ]; do :; done; exec "$@"'


def race_twice(go: Path, inner: list[str], cwd: Path) -> list[str]:
    """Run ``inner`` twice at the same moment as the server user; their stderr, in order."""
    # both processes spin until the go file appears, then exec pitr-wal at once
    argv = ["/bin/sh", "-c", SPIN_THEN_EXEC, "sh", str(go), *inner]
    procs = [
        subprocess.Popen(as_server_user(argv), cwd=cwd, stderr=subprocess.PIPE, text=True)
        for _round in range(2)
    ]
    time.sleep(0.05)
    go.touch()
    errs = []
    for proc in procs:
        _unused, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, f"exit {proc.returncode}: {err}"
        errs.append(err)
    return errs


def test_two_simultaneous_pushes_of_one_segment_both_exit_0(loaded: Primary, program: str) -> None:
    # archive_mode = always: a primary and its standby archive the same segment at once.
    # Twenty rounds, each into a fresh repository that two `pitr-wal init` race to initialise
    # first (the role run on both hosts), on a tmpfs: the race is in link() and rename(),
    # and fsync on a busy disk only adds time.
    from ansible_collections.pitr.postgresql.plugins.module_utils.repository import Repository

    name = archived_segments(loaded)[0]
    source = loaded.pg_wal / name
    want = source.read_bytes()
    datadir = loaded.cluster.datadir
    with tmpfs("128m") as parent:
        for round_ in range(20):
            repo = parent / f"repo{round_}"
            repo.mkdir()
            give_to_server_user(repo)
            init = [PYTHON, "-I", "-S", program, "--repo", str(repo), "init"]
            errs = race_twice(parent / f"init{round_}", [*init, "--pgdata", str(datadir)], datadir)
            said = sorted(
                "initialised" if "init: repository initialised" in e else "already belongs to"
                for e in errs
            )
            assert said == ["already belongs to", "initialised"], (round_, errs)
            assert sorted(os.listdir(repo)) == ["pitr-repository.json"]

            push = [PYTHON, "-I", "-S", program, "--repo", str(repo), "push", str(source)]
            errs = race_twice(parent / f"go{round_}", push, datadir)
            outcomes = ["already archived" if "already archived" in e else "archived" for e in errs]
            assert sorted(outcomes) == ["already archived", "archived"], (round_, errs)
            assert sorted(files_below(repo)) == [
                "pitr-repository.json",
                str(object_path(repo, name).relative_to(repo)),
            ]
            assert Repository.open_posix(str(repo)).get_wal(name)[1] == want
            shutil.rmtree(repo)


def test_segment_of_a_foreign_cluster_is_refused(
    loaded: Primary, program: str, repo_dir: Path
) -> None:
    foreign = PgCluster.create()  # initdb only: its pg_wal holds a real first segment
    try:
        name = "000000010000000000000001"
        segment = foreign.datadir / "pg_wal" / name
        assert segment.exists()
        before = files_below(loaded.repo)
        result = pitr_wal(
            program, "--repo", str(loaded.repo), "push", f"pg_wal/{name}", cwd=foreign.datadir
        )
        assert_push_failed(result, "belongs to another cluster")
        assert files_below(loaded.repo) == before

        # and into a repository initialised for the primary that has nothing archived yet
        init = pitr_wal(
            program, "--repo", str(repo_dir), "init", "--pgdata", str(loaded.cluster.datadir)
        )
        assert init.rc == 0, str(init)
        result = pitr_wal(
            program, "--repo", str(repo_dir), "push", str(segment), cwd=foreign.datadir
        )
        assert_push_failed(result, "belongs to another cluster")
        assert list(files_below(repo_dir)) == ["pitr-repository.json"]

        # a history file carries no header: the pushing cluster is the data directory it runs in
        history = foreign.datadir / "pg_wal" / "00000002.history"
        history.write_text("1\t0/3000000\tno recovery target specified\n")
        give_to_server_user(history)
        result = pitr_wal(
            program, "--repo", str(repo_dir), "push", "pg_wal/00000002.history", cwd=foreign.datadir
        )
        assert_push_failed(result, "belongs to another cluster")
        assert list(files_below(repo_dir)) == ["pitr-repository.json"]
    finally:
        foreign.destroy()


# ---------------------------------------------------------------------------------------------
# .backup, .history and .partial from a real base backup and promotion


@dataclass
class Promotion:
    primary: Primary
    standby: PgCluster
    backup_name: str
    backup_content: bytes
    partial_name: str


@pytest.fixture(scope="module")
def promotion(loaded: Primary) -> t.Iterator[Promotion]:
    p = loaded.cluster
    standby_base = new_dir("pitr-standby-")
    standby = PgCluster(standby_base)
    standby.sockdir.mkdir()
    give_to_server_user(standby.sockdir)
    try:
        backup = run(
            [
                p.bin("pg_basebackup"),
                "-h",
                str(p.sockdir),
                "-p",
                str(p.port),
                "-U",
                "postgres",
                "-D",
                str(standby.datadir),
                "-R",
                "-X",
                "stream",
                "-c",
                "fast",
            ],
            timeout=120,
        )
        assert backup.rc == 0, str(backup)
        backups = sorted(loaded.pg_wal.glob("*.backup"))
        assert backups, "pg_basebackup left no backup history file in pg_wal"
        backup_file = backups[-1]
        content = backup_file.read_bytes()
        standby.append_conf(
            {
                "port": str(standby.port),
                "unix_socket_directories": pg_quote(str(standby.sockdir)),
                "archive_mode": "on",  # a promoted standby archives its .partial and .history
            }
        )
        standby.start()
        standby.wait_for("SELECT pg_is_in_recovery()", True)
        p.sql("CREATE TABLE after_backup AS SELECT 1 AS x")
        lsn = p.scalar("SELECT pg_current_wal_lsn()::text")
        standby.wait_for(f"SELECT pg_last_wal_replay_lsn() >= '{lsn}'::pg_lsn", True)
        promote = run([standby.bin("pg_ctl"), "promote", "-w", "-D", str(standby.datadir)])
        assert promote.rc == 0, str(promote)
        standby.wait_for("SELECT pg_is_in_recovery()", False)
        partials = wait_until(
            lambda: [n for n in archived_names(loaded.repo) if n.endswith(".partial")],
            30,
            "the promoted standby to archive its .partial",
        )
        wait_until(
            lambda: "00000002.history" in archived_names(loaded.repo),
            30,
            "the promoted standby to archive 00000002.history",
        )
        yield Promotion(loaded, standby, backup_file.name, content, partials[0])
    finally:
        standby.destroy()


def test_backup_history_file_is_archived_byte_exactly(
    promotion: Promotion, program: str, out_dir: Path
) -> None:
    assert promotion.backup_name in archived_names(promotion.primary.repo)
    result, dest = fetch_to(program, promotion.primary.repo, promotion.backup_name, out_dir)
    assert result.rc == 0, str(result)
    assert dest.read_bytes() == promotion.backup_content
    assert dest.read_bytes().startswith(b"START WAL LOCATION: ")


def test_history_file_of_a_promotion_is_archived_byte_exactly(
    promotion: Promotion, program: str, out_dir: Path
) -> None:
    result, dest = fetch_to(program, promotion.primary.repo, "00000002.history", out_dir)
    assert result.rc == 0, str(result)
    original = (promotion.standby.datadir / "pg_wal" / "00000002.history").read_bytes()
    assert dest.read_bytes() == original
    assert re.match(rb"1\t[0-9A-F]+/[0-9A-F]+\t", original)


def test_partial_of_a_promotion_is_archived_byte_exactly_and_never_replaces_the_segment(
    promotion: Promotion, program: str, out_dir: Path
) -> None:
    partial = promotion.partial_name
    segment = partial.removesuffix(".partial")
    assert partial.startswith("00000001")
    result, dest = fetch_to(program, promotion.primary.repo, partial, out_dir)
    assert result.rc == 0, str(result)
    partial_bytes = dest.read_bytes()
    assert partial_bytes == (promotion.standby.datadir / "pg_wal" / partial).read_bytes()

    # the old primary goes on with timeline 1: its full segment of that name arrives too
    p = promotion.primary
    for _round in range(3):
        if segment in archived_names(p.repo):
            break
        p.switch_and_wait()
    result, dest = fetch_to(program, p.repo, segment, out_dir)
    assert result.rc == 0, str(result)
    full = dest.read_bytes()
    assert full == (p.pg_wal / segment).read_bytes()
    assert full != partial_bytes  # the primary wrote on after the standby left
    again, dest = fetch_to(program, p.repo, partial, out_dir)
    assert again.rc == 0 and dest.read_bytes() == partial_bytes


def test_partial_pushed_after_the_full_segment_does_not_shadow_it(
    loaded: Primary, program: str, out_dir: Path
) -> None:
    name = archived_segments(loaded)[2]
    full = (loaded.pg_wal / name).read_bytes()
    partial = bytearray(full)
    partial[8 * MiB :] = bytes(8 * MiB)  # as if the timeline had ended half-way
    staged = out_dir / f"{name}.partial"
    staged.write_bytes(bytes(partial))
    before = os.stat(object_path(loaded.repo, name))
    result = pitr_wal(
        program, "--repo", str(loaded.repo), "push", str(staged), cwd=loaded.cluster.datadir
    )
    assert result.rc == 0, str(result)
    staged.unlink()
    assert os.stat(object_path(loaded.repo, name)).st_ino == before.st_ino
    fetched, dest = fetch_to(program, loaded.repo, name, out_dir)
    assert fetched.rc == 0 and dest.read_bytes() == full
    fetched, dest = fetch_to(program, loaded.repo, f"{name}.partial", out_dir)
    assert fetched.rc == 0 and dest.read_bytes() == bytes(partial)


# ---------------------------------------------------------------------------------------------
# storage failures


def test_disk_full_mid_copy_leaves_nothing_and_the_next_push_succeeds(
    loaded: Primary, program: str, out_dir: Path
) -> None:
    name = archived_segments(loaded)[0]
    with tmpfs("3m") as repo:
        init_repo(program, repo, loaded.cluster.datadir)
        push = ["--repo", str(repo), "--compress", "none", "push", f"pg_wal/{name}"]
        result = pitr_wal(program, *push, cwd=loaded.cluster.datadir)
        assert_push_failed(result, "No space left on device")
        left = files_below(repo)
        assert list(left) == ["pitr-repository.json"], left  # no partial object, no temp file
        assert not object_path(repo, name).exists()

        remount(repo, "64m")
        result = pitr_wal(program, *push, cwd=loaded.cluster.datadir)
        assert result.rc == 0, str(result)
        assert f"push {name}: archived" in result.stderr
        fetched, dest = fetch_to(program, repo, name, out_dir)
        assert fetched.rc == 0
        assert sha256_file(dest) == sha256_file(loaded.pg_wal / name)


def test_unwritable_repository_is_counted_by_pg_stat_archiver(program: str) -> None:
    repo = Path(tempfile.mkdtemp(prefix="pitr-root-only-"))  # root's, mode 0700
    os.chmod(repo, 0o700)
    cluster = PgCluster.create(
        conf={
            "wal_level": "replica",
            "archive_mode": "on",
            "archive_command": pg_quote(
                hostcmd.archive_command_for(program=program, repo=str(repo))
            ),
        }
    )
    try:
        cluster.start()
        name = cluster.switch_wal()
        failed = wait_until(
            lambda: (n := cluster.scalar("SELECT failed_count FROM pg_stat_archiver")) >= 2 and n,
            30,
            "pg_stat_archiver.failed_count to grow",
        )
        assert failed >= 2
        row = cluster.sql(
            "SELECT archived_count, last_failed_wal, last_archived_wal FROM pg_stat_archiver"
        )[0]
        assert row == (0, name, None)
        assert name in cluster.ready_files()  # PostgreSQL keeps it for the next try
        codes = {
            int(c)
            for c in re.findall(r"archive command failed with exit code (\d+)", cluster.log_text())
        }
        assert codes and all(1 <= c <= 125 for c in codes), codes
        assert "pitr-wal: push" in cluster.log_text() and "FAILED" in cluster.log_text()
        assert "Permission denied" in cluster.log_text()
        assert os.listdir(repo) == []
    finally:
        cluster.destroy()
        shutil.rmtree(repo, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# push only into an initialised repository: an unmounted one is an empty directory

NOT_INITIALISED = (
    "is not initialised (no pitr-repository.json)",
    "check that it is mounted",
    "`pitr-wal --repo PATH init --pgdata DATADIR`",
)


def test_push_into_an_uninitialised_repository_is_refused(
    loaded: Primary, program: str, repo_dir: Path, out_dir: Path
) -> None:
    name = archived_segments(loaded)[0]
    history = out_dir / "00000007.history"  # no page header: the data directory says who
    history.write_text("1\t0/3000000\tno recovery target specified\n")
    give_to_server_user(history)
    paths = [f"pg_wal/{name}", str(history)]
    for path in paths:
        result = pitr_wal(
            program, "--repo", str(repo_dir), "push", path, cwd=loaded.cluster.datadir
        )
        assert_push_failed(result, f"repository {repo_dir} is not initialised", *NOT_INITIALISED)
        assert result.rc == 1
        assert os.listdir(repo_dir) == []  # no identity made up, nothing stored

    # initialised as the archiving role does it, the same pushes go through
    init_repo(program, repo_dir, loaded.cluster.datadir)
    for path in paths:
        result = pitr_wal(
            program, "--repo", str(repo_dir), "push", path, cwd=loaded.cluster.datadir
        )
        assert result.rc == 0, str(result)
    assert sorted(archived_names(repo_dir)) == sorted([name, history.name])


def test_archiving_into_an_unmounted_repository_is_refused_and_counted(
    program: str, out_dir: Path
) -> None:
    # The repository's storage goes away under a running server: its mount point is left,
    # an empty directory the server user can write to. Archiving there would fill the root
    # disk with WAL nobody will find; every attempt must fail and be counted instead, and
    # the segments wait in pg_wal until the storage is back.
    with tmpfs("64m") as mnt:
        cluster = PgCluster.create(conf=archiving_conf(program, mnt))
        try:
            init_repo(program, mnt, cluster.datadir)
            cluster.start()
            first = cluster.switch_wal()
            wait_until(
                lambda: cluster.scalar("SELECT last_archived_wal FROM pg_stat_archiver") == first,
                30,
                f"{first} to be archived",
            )
            assert archived_names(mnt) == [first]

            umount(mnt)
            assert os.listdir(mnt) == []
            by_hand = pitr_wal(
                program, "--repo", str(mnt), "push", f"pg_wal/{first}", cwd=cluster.datadir
            )
            assert_push_failed(by_hand, f"repository {mnt} is not initialised", *NOT_INITIALISED)

            second = cluster.switch_wal()
            wait_until(
                lambda: cluster.scalar("SELECT failed_count FROM pg_stat_archiver") >= 2,
                30,
                "pg_stat_archiver.failed_count to grow",
            )
            row = cluster.sql(
                "SELECT archived_count, last_archived_wal, last_failed_wal FROM pg_stat_archiver"
            )[0]
            assert row == (1, first, second)
            assert second in cluster.ready_files()  # PostgreSQL keeps it for the next try
            log = cluster.log_text()
            codes = {
                int(c) for c in re.findall(r"archive command failed with exit code (\d+)", log)
            }
            assert codes == {1}, codes
            assert f"pitr-wal: push {second} FAILED: repository {mnt} is not initialised" in log
            assert os.listdir(mnt) == []  # nothing went to the mount point's own disk

            # the storage is back (a new, empty tmpfs here) and initialised again: the
            # waiting segment is archived with the next one
            mount_tmpfs(mnt, "64m")
            init_repo(program, mnt, cluster.datadir)
            third = cluster.switch_wal()
            wait_until(
                lambda: cluster.scalar("SELECT last_archived_wal FROM pg_stat_archiver") == third,
                60,
                f"{second} and {third} to be archived",
            )
            assert archived_names(mnt) == [second, third]
            assert second not in cluster.ready_files()
            for name in (second, third):
                fetched, dest = fetch_to(program, mnt, name, out_dir)
                assert fetched.rc == 0, str(fetched)
                assert sha256_file(dest) == sha256_file(cluster.datadir / "pg_wal" / name)
        finally:
            cluster.destroy()


# ---------------------------------------------------------------------------------------------
# fetch: absent is 1, everything else is above 125


@pytest.mark.parametrize(
    "name", ["0000000100000000000000FE", "00000009.history", "000000050000000000000001"]
)
def test_fetch_of_a_missing_file_exits_1_and_writes_nothing(
    loaded: Primary, program: str, out_dir: Path, name: str
) -> None:
    result, _unused = fetch_to(program, loaded.repo, name, out_dir)
    assert result.rc == 1, str(result)
    assert f"fetch {name}: not in the archive" in result.stderr
    assert os.listdir(out_dir) == []


def test_fetch_of_a_corrupted_archived_file_exits_255_after_retries_and_writes_nothing(
    loaded: Primary, program: str, repo_dir: Path, out_dir: Path
) -> None:
    name = archived_segments(loaded)[0]
    init_repo(program, repo_dir, loaded.cluster.datadir)
    pushed = pitr_wal(
        program, "--repo", str(repo_dir), "push", f"pg_wal/{name}", cwd=loaded.cluster.datadir
    )
    assert pushed.rc == 0, str(pushed)
    obj = object_path(repo_dir, name)
    blob = bytearray(obj.read_bytes())
    assert blob.startswith(b"PITRWAL2")  # what push writes: envelope version 2
    blob[len(blob) // 2] ^= 0x01
    obj.write_bytes(bytes(blob))
    result, _unused = fetch_to(
        program, repo_dir, name, out_dir, "--retries", "3", "--retry-delay", "0.3"
    )
    assert result.rc == 255, str(result)
    assert result.elapsed >= 0.6  # it did retry, with the pause between attempts
    assert result.stderr.count("retrying") == 2
    assert result.stderr.count("the archived copy fails its checksum") == 3, str(result)
    assert f"fetch {name} FAILED after 3 attempt(s)" in result.stderr
    assert os.listdir(out_dir) == []


def envelope_v1(name: str, data: bytes, codec: str) -> bytes:
    """``data`` archived the way pitr-wal wrote it before envelope version 2: a JSON header
    with the SHA-256 of the original bytes, then the payload (zstd frames without a content
    checksum). tests/unit/.../test_repository.py holds objects the old code wrote, byte for byte.
    """
    import hashlib
    import json
    import struct

    from ansible_collections.pitr.postgresql.plugins.module_utils import compression

    if codec == "zstd":
        payload = bytes(
            compression._import_optional("zstandard").ZstdCompressor(level=1).compress(data)
        )
    else:
        assert codec == "none"
        payload = data
    header = {
        "v": 1,
        "name": name,
        "size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "codec": codec,
        "stored_size": len(payload),
    }
    raw = json.dumps(header, sort_keys=True).encode()
    return b"PITRWAL1" + struct.pack(">I", len(raw)) + raw + payload


def test_objects_of_envelope_version_1_fetch_verify_and_count_as_archived(
    loaded: Primary, program: str, repo_dir: Path, out_dir: Path
) -> None:
    # A repository filled before the upgrade: fetch must restore its objects, and PostgreSQL
    # re-archiving one of them (after a crash) must find it already archived.
    init_repo(program, repo_dir, loaded.cluster.datadir)
    names = archived_segments(loaded)[:2]
    for name, codec in zip(names, ("zstd", "none"), strict=True):
        obj = object_path(repo_dir, name)
        obj.parent.mkdir(parents=True, exist_ok=True)
        give_to_server_user(obj.parent)
        obj.write_bytes(envelope_v1(name, (loaded.pg_wal / name).read_bytes(), codec))
        content = obj.read_bytes()
        result, dest = fetch_to(program, repo_dir, name, out_dir)
        assert result.rc == 0, str(result)
        assert sha256_file(dest) == sha256_file(loaded.pg_wal / name), name
        dest.unlink()
        pushed = pitr_wal(
            program, "--repo", str(repo_dir), "push", f"pg_wal/{name}", cwd=loaded.cluster.datadir
        )
        assert pushed.rc == 0, str(pushed)
        assert f"push {name}: already archived" in pushed.stderr
        assert obj.read_bytes() == content
    # A flipped byte in a version 1 object is caught on fetch (255, nothing written) ...
    obj = object_path(repo_dir, names[1])
    blob = bytearray(obj.read_bytes())
    blob[len(blob) - 5000] ^= 0x01
    obj.write_bytes(bytes(blob))
    result, _unused = fetch_to(program, repo_dir, names[1], out_dir, "--retries", "1")
    assert result.rc == 255, str(result)
    assert "fails its checksum" in result.stderr, str(result)
    assert os.listdir(out_dir) == []
    # ... and on push, which never calls a damaged copy "already archived".
    pushed = pitr_wal(
        program, "--repo", str(repo_dir), "push", f"pg_wal/{names[1]}", cwd=loaded.cluster.datadir
    )
    assert pushed.rc == 1, str(pushed)
    assert "fails its checksum" in pushed.stderr
    assert obj.read_bytes() == bytes(blob)


def test_fetch_when_the_repository_root_is_missing_exits_255(
    loaded: Primary, program: str, out_dir: Path
) -> None:
    missing = Path(tempfile.gettempdir(), f"pitr-never-mounted-{os.getpid()}", "repo")
    name = archived_segments(loaded)[0]
    result, _unused = fetch_to(program, missing, name, out_dir, "--retry-delay", "0")
    assert result.rc == 255, str(result)
    assert "not accessible" in result.stderr
    assert os.listdir(out_dir) == []


def test_fetch_when_the_repository_is_unmounted_exits_255_not_1(
    loaded: Primary, program: str, out_dir: Path
) -> None:
    name = archived_segments(loaded)[0]
    with tmpfs("64m") as mnt:
        init_repo(program, mnt, loaded.cluster.datadir)
        pushed = pitr_wal(
            program, "--repo", str(mnt), "push", f"pg_wal/{name}", cwd=loaded.cluster.datadir
        )
        assert pushed.rc == 0, str(pushed)
        ok, dest = fetch_to(program, mnt, name, out_dir)
        assert ok.rc == 0
        dest.unlink()
        umount(mnt)  # the mount point stays: an empty directory the server user can read
        assert os.listdir(mnt) == []
        for wanted in (name, "00000002.history"):  # archived before, and never archived
            result, _unused = fetch_to(program, mnt, wanted, out_dir, "--retry-delay", "0")
            assert result.rc == 255, str(result)
            assert "no identity file" in result.stderr
        assert os.listdir(out_dir) == []
        # (push into it is refused too: test_archiving_into_an_unmounted_repository_...)


# ---------------------------------------------------------------------------------------------
# quoting: paths with spaces, quotes and % through a real archive_command and restore_command

WEIRD = 'it\'s a 100% "odd" $HOME dir'


def test_paths_with_space_quote_and_percent_work_through_real_commands() -> None:
    base = new_dir("pitr-weird-")
    try:
        odd = base / WEIRD
        odd.mkdir()
        give_to_server_user(odd)
        # pg_ctl puts -D in double quotes for its shell: the data directory may hold a space, a
        # single quote and %, but not a double quote or $; the repository and program may.
        program, _prefix = install("host cmd 's 100% ", parent=str(odd))
        repo = odd / "repo 'x' \"y\" 50%"
        repo.mkdir()
        give_to_server_user(repo)
        data_parent = base / "data 'q' 100%"
        data_parent.mkdir()
        give_to_server_user(data_parent)
        waldir = base / "wal 'w' 100%"  # initdb --waldir: pg_wal is a symlink to it

        cluster = PgCluster(base / "cluster")
        cluster.basedir.mkdir()
        give_to_server_user(cluster.basedir)
        cluster.sockdir.mkdir()
        give_to_server_user(cluster.sockdir)
        cluster.datadir = data_parent / "main"
        archive_command = hostcmd.archive_command_for(program=program, repo=str(repo), timeout=60)
        restore_command = hostcmd.restore_command_for(program=program, repo=str(repo), timeout=60)
        try:
            cluster.initdb(f"--waldir={waldir}")
            assert os.path.islink(cluster.datadir / "pg_wal")
            cluster.append_conf(
                {
                    "listen_addresses": "'127.0.0.1'",
                    "port": str(cluster.port),
                    "unix_socket_directories": pg_quote(str(cluster.sockdir)),
                    "fsync": "off",
                    "wal_level": "replica",
                    "archive_mode": "on",
                    "archive_command": pg_quote(archive_command),
                    "max_wal_senders": "5",
                }
            )
            cluster.start()
            assert cluster.show("archive_command") == archive_command
            init = pitr_wal(program, "--repo", str(repo), "init", "--pgdata", str(cluster.datadir))
            assert init.rc == 0, str(init)
            first = cluster.switch_wal()
            wait_until(
                lambda: cluster.scalar("SELECT last_archived_wal FROM pg_stat_archiver") == first,
                30,
                f"{first} to be archived",
            )
            assert cluster.scalar("SELECT failed_count FROM pg_stat_archiver") == 0
            fetched = pitr_wal(program, "--repo", str(repo), "fetch", first, str(odd / "copy"))
            assert fetched.rc == 0, str(fetched)
            assert sha256_file(odd / "copy") == sha256_file(waldir / first)

            # a standby from a base backup, in a directory as odd, restores through the
            # restore_command string from the archive
            standby = PgCluster(base / "standby")
            standby.basedir.mkdir()
            give_to_server_user(standby.basedir)
            standby.sockdir.mkdir()
            give_to_server_user(standby.sockdir)
            standby.datadir = data_parent / "standby 's 100%"
            backup = run(
                [
                    cluster.bin("pg_basebackup"),
                    "-h",
                    str(cluster.sockdir),
                    "-p",
                    str(cluster.port),
                    "-U",
                    "postgres",
                    "-D",
                    str(standby.datadir),
                    "-X",
                    "stream",
                    "-c",
                    "fast",
                ]
            )
            assert backup.rc == 0, str(backup)
            cluster.sql("CREATE TABLE after_backup AS SELECT 42 AS answer")
            later = cluster.switch_wal()
            wait_until(
                lambda: cluster.scalar("SELECT last_archived_wal FROM pg_stat_archiver") == later,
                30,
                f"{later} to be archived",
            )
            standby.append_conf(
                {
                    "port": str(standby.port),
                    "unix_socket_directories": pg_quote(str(standby.sockdir)),
                    "archive_mode": "off",
                    "restore_command": pg_quote(restore_command),
                }
            )
            (standby.datadir / "standby.signal").touch()
            give_to_server_user(standby.datadir / "standby.signal")
            try:
                standby.start()
                assert standby.show("restore_command") == restore_command
                wait_until(
                    lambda: f'restored log file "{later}" from archive' in standby.log_text(),
                    30,
                    f"the standby to restore {later} from the archive",
                )
                standby.wait_for("SELECT count(*) FROM pg_class WHERE relname = 'after_backup'", 1)
            finally:
                standby.destroy()
        finally:
            cluster.destroy()
    finally:
        shutil.rmtree(base, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# a hung destination


def test_hung_destination_times_out(
    loaded: Primary, program: str, repo_dir: Path, out_dir: Path
) -> None:
    name = archived_segments(loaded)[0]
    init = pitr_wal(
        program, "--repo", str(repo_dir), "init", "--pgdata", str(loaded.cluster.datadir)
    )
    assert init.rc == 0, str(init)
    fifo = object_path(repo_dir, name)
    fifo.parent.mkdir(parents=True)
    give_to_server_user(fifo.parent)
    os.mkfifo(fifo, 0o600)  # opening it for reading blocks until a writer comes: never
    give_to_server_user(fifo)

    push = pitr_wal(
        program,
        "--repo",
        str(repo_dir),
        "--timeout",
        "2",
        "push",
        f"pg_wal/{name}",
        cwd=loaded.cluster.datadir,
        timeout=30,
    )
    assert_push_failed(push, "no answer from the repository within 2 s")
    assert push.rc == 1
    assert 1.8 <= push.elapsed < 8, push.elapsed

    fetch, _unused = fetch_to(
        program, repo_dir, name, out_dir, "--timeout", "2", "--retries", "1", "--retry-delay", "0"
    )
    assert fetch.rc == 255, str(fetch)
    assert "no answer from the repository within 2 s" in fetch.stderr
    assert 1.8 <= fetch.elapsed < 8, fetch.elapsed
    assert os.listdir(out_dir) == []

    # --timeout bounds each attempt: two hung attempts of 1 s with a 0.5 s pause, at most
    # retries x (timeout + delay) and some start-up
    fetch, _unused = fetch_to(
        program, repo_dir, name, out_dir, "--timeout", "1", "--retries", "2", "--retry-delay", "0.5"
    )
    assert fetch.rc == 255, str(fetch)
    assert fetch.stderr.count(f"fetch {name} FAILED: no answer from the repository within 1 s") == 2
    assert f"fetch {name}: attempt 1 of 2 failed; retrying" in fetch.stderr
    assert f"fetch {name} FAILED after 2 attempt(s)" in fetch.stderr
    assert 2 * 1 + 0.5 - 0.1 <= fetch.elapsed <= 2 * (1 + 0.5) + 5, fetch.elapsed
    assert os.listdir(out_dir) == []
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)  # nothing replaced it


def test_pitr_wal_runs_as_python_isolated_and_fast(program: str) -> None:
    # once per segment: start-up counts (the interpreter path is absolute, no shim)
    assert os.path.isabs(PYTHON)
    timings = []
    for _round in range(3):
        started = time.monotonic()
        out = subprocess.run(
            [PYTHON, "-I", "-S", program, "version"], capture_output=True, check=True
        )
        timings.append(time.monotonic() - started)
        assert out.stdout.strip()
    assert min(timings) < 0.5, timings


def test_init_records_the_clusters_own_segment_size(program: str, repo_dir: Path) -> None:
    """`init --pgdata` reads the segment size from the cluster's WAL, not a 16 MiB default."""
    cluster = PgCluster.create(initdb_args=["--wal-segsize=1"])
    try:
        result = init_repo(program, repo_dir, cluster.datadir)
        assert "WAL segment size 1048576" in result.stderr, str(result)
        name = sorted(n for n in os.listdir(cluster.datadir / "pg_wal") if len(n) == 24)[0]
        pushed = pitr_wal(
            program, "--repo", str(repo_dir), "push", f"pg_wal/{name}", cwd=cluster.datadir
        )
        assert pushed.rc == 0, str(pushed)
        assert archived_names(repo_dir) == [name]
    finally:
        shutil.rmtree(cluster.basedir, ignore_errors=True)

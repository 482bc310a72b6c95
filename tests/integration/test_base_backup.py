# Copyright: contributors to pitr.postgresql
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""pitr.postgresql.base_backup and backup_info through ansible-playbook, on real PostgreSQL 15.

One scratch cluster for the whole file (pgbench data, WAL archived into the repository with
the collection's own ``pitr-wal``); each test uses its own labels. Each property is checked on
disk and in the catalog, not only in the module's answer.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
import typing as t
from pathlib import Path

import pytest
from ansible_runner import TaskResult, collections_path, run_module
from pgcluster import DEFAULT_BINDIR, PgCluster, give_to_server_user

ROOT = Path(__file__).resolve().parents[2]
if str(collections_path()) not in sys.path:
    sys.path.append(collections_path())
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

from ansible_collections.pitr.postgresql.plugins.module_utils import (  # noqa: E402
    catalog,
    manifest,
)
from ansible_collections.pitr.postgresql.plugins.module_utils.hostcmd import (  # noqa: E402
    archive_command_for,
)
from ansible_collections.pitr.postgresql.plugins.module_utils.repository import (  # noqa: E402
    Repository,
)
from tests.support.hostcmd_install import install_host_command  # noqa: E402

BACKUP = "pitr.postgresql.base_backup"
INFO = "pitr.postgresql.backup_info"
# auto checksums for tar: CRC32C when a C CRC-32C library is importable (python3-crc32c)
TAR_CHECKSUMS = "CRC32C" if manifest.fast_crc32c() is not None else "SHA256"
PGBENCH_SCALE = 3  # ~45 MB: big enough that a rate-limited backup runs for seconds


class Env(t.NamedTuple):
    cluster: PgCluster
    repo_path: Path
    repo: Repository

    def params(self, **extra: t.Any) -> dict[str, t.Any]:
        return {**self.cluster.module_params, "repository_path": str(self.repo_path), **extra}


@pytest.fixture(scope="module")
def env() -> t.Iterator[Env]:
    base = Path(tempfile.mkdtemp(prefix="pitr-bb-"))
    give_to_server_user(base)
    repo_path = base / "repo"
    repo_path.mkdir()
    give_to_server_user(repo_path)
    program = install_host_command(base / "prefix", owner="postgres" if os.geteuid() == 0 else None)
    cluster = PgCluster.create(
        conf={
            "wal_level": "replica",
            "max_wal_senders": "10",
            "track_commit_timestamp": "on",
            "archive_mode": "on",
            "archive_command": "'"
            + archive_command_for(program=program, repo=str(repo_path)).replace("'", "''")
            + "'",
        }
    )
    try:
        cluster.start()
        subprocess_run_as_owner(
            cluster,
            [
                cluster.bin("pgbench"),
                "-i",
                "-q",
                "-s",
                str(PGBENCH_SCALE),
                "-h",
                str(cluster.sockdir),
                "-p",
                str(cluster.port),
                "-U",
                "postgres",
                "postgres",
            ],
        )
        # as the archiving role does: the repository's identity, written by the server's user
        cluster.init_repository(program, repo_path)
        cluster.switch_wal()
        yield Env(cluster, repo_path, Repository.open_posix(str(repo_path)))
    finally:
        cluster.destroy()
        shutil.rmtree(base, ignore_errors=True)


def subprocess_run_as_owner(cluster: PgCluster, argv: list[str]) -> None:
    cluster._run_as_owner(argv)


def backup(env: Env, check: bool = False, **args: t.Any) -> TaskResult:
    return run_module(BACKUP, env.params(**args), check=check)


def info(env: Env, **args: t.Any) -> TaskResult:
    result = run_module(INFO, {"repository_path": str(env.repo_path), **args})
    assert not result.failed, result.msg
    return result


def backup_dir(env: Env, label: str) -> Path:
    return env.repo_path / "backups" / label


def wait_archived(cluster: PgCluster, segment: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        last = cluster.scalar("SELECT coalesce(last_archived_wal, '') FROM pg_stat_archiver")
        if last >= segment:
            return
        time.sleep(0.2)
    stats = cluster.sql(
        "SELECT last_archived_wal, last_failed_wal, failed_count FROM pg_stat_archiver"
    )
    raise AssertionError(
        f"{segment} was not archived within {timeout}s: {stats}\n{cluster.log_text()[-3000:]}"
    )


def pg_basebackup_pids(staging: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if cmd and cmd[0].endswith(b"pg_basebackup") and f"--pgdata={staging}".encode() in cmd:
            pids.append(int(entry))
    return pids


def parent_pid(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def in_thread(fn: t.Callable[[], TaskResult]) -> tuple[threading.Thread, list[TaskResult]]:
    out: list[TaskResult] = []
    th = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    th.start()
    return th, out


def wait_for_pids(staging: str, timeout: float = 60) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = pg_basebackup_pids(staging)
        if pids:
            return pids
        time.sleep(0.1)
    raise AssertionError(f"no pg_basebackup writing to {staging} appeared within {timeout}s")


# ---------------------------------------------------------------------------------------------


def test_check_mode_backup_verify_catalog_rerun(env: Env) -> None:
    label = "first"
    predicted = backup(env, check=True, label=label)
    assert not predicted.failed, predicted.msg
    assert predicted.changed is True
    cmd = predicted["cmd"]
    assert cmd[0] == f"{DEFAULT_BINDIR}/pg_basebackup"
    assert f"--pgdata={env.repo_path}/staging/backups/{label}" in cmd
    assert "--checkpoint=fast" in cmd and "--wal-method=stream" in cmd
    assert "--compress=server-zstd:1" in cmd and f"--manifest-checksums={TAR_CHECKSUMS}" in cmd
    assert not backup_dir(env, label).exists()
    assert not (env.repo_path / "staging" / "backups" / label).exists()

    result = backup(env, label=label)
    assert not result.failed, result.msg
    assert result.changed is True and result["usable"] is True
    rec = result["backup"]
    assert rec["status"] == "ok" and rec["verified"] is True
    assert rec["verification"]["tool"] == "pitr.postgresql tar verifier"
    assert rec["system_identifier"] == int(
        env.cluster.scalar("SELECT system_identifier FROM pg_control_system()")
    )
    assert rec["timeline"] == 1 and rec["pg_major"] == 15 and rec["pg_version"].startswith("15.")
    assert rec["compression"] == "server-zstd:1" and rec["checksum_algorithm"] == TAR_CHECKSUMS
    assert sorted(rec["files"]) == ["backup_manifest", "base.tar.zst", "pg_wal.tar"]
    assert rec["cluster_size"] > 40 * 1024 * 1024 > rec["size_on_disk"] > 0
    assert rec["stop_wal"] >= rec["start_wal"] and rec["stop_time"] >= rec["start_time"]
    progress = result["progress"]
    assert progress["done_bytes"] == progress["total_bytes"] > 0 and progress["percent"] == 100.0
    assert progress["verify_bytes"] >= rec["cluster_size"]

    # on disk: the record is the one in the repository, and every listed file exists
    on_disk = json.loads((backup_dir(env, label) / "backup.json").read_text())
    assert on_disk == rec
    assert all((backup_dir(env, label) / f).is_file() for f in rec["files"])
    assert not any((env.repo_path / "staging" / "backups").iterdir())
    assert catalog.usable(catalog.read_backup(env.repo, label))  # type: ignore[arg-type]

    again = backup(env, label=label)
    assert not again.failed, again.msg
    assert again.changed is False
    assert again["backup"] == rec

    predicted_again = backup(env, check=True, label=label)
    assert predicted_again.changed is False


def test_plain_format_verified_by_pg_verifybackup(env: Env) -> None:
    result = backup(env, label="plain1", format="plain")
    assert not result.failed, result.msg
    rec = result["backup"]
    assert rec["verification"]["tool"] == "pg_verifybackup"
    assert rec["backup_format"] == "plain" and rec["checksum_algorithm"] == "CRC32C"
    assert (backup_dir(env, "plain1") / "PG_VERSION").read_text().strip() == "15"
    assert "backup_label" in rec["files"] and "backup_manifest" in rec["files"]

    # Verifying it again later reads the stored copy, which now holds backup.json beside the
    # manifest's files: still verified, nothing changed.
    again = backup(env, label="plain1", format="plain", state="verified")
    assert not again.failed, again.msg
    assert again.changed is False
    assert catalog.usable(catalog.read_backup(env.repo, "plain1"))  # type: ignore[arg-type]


def test_flipped_byte_makes_backup_unusable(env: Env) -> None:
    label = "flip"
    result = backup(env, label=label, compression="none")
    assert not result.failed, result.msg
    tar = backup_dir(env, label) / "base.tar"
    size = tar.stat().st_size
    with open(tar, "r+b") as fh:
        fh.seek(size // 2)
        byte = fh.read(1)
        fh.seek(size // 2)
        fh.write(bytes([byte[0] ^ 0x01]))

    predicted = backup(env, check=True, label=label, state="verified")
    assert predicted.changed is True
    assert catalog.usable(catalog.read_backup(env.repo, label))  # type: ignore[arg-type]

    verified = backup(env, label=label, state="verified")
    assert verified.failed is True
    assert verified.changed is True
    assert "checksum" in verified.msg or "tar" in verified.msg, verified.msg
    rec = catalog.read_backup(env.repo, label)
    assert rec is not None and rec.status == "failed" and rec.verified is False
    assert not catalog.usable(rec)
    listed = {b["label"]: b["usable"] for b in info(env)["backups"]}
    assert listed[label] is False


def test_concurrent_backup_refused_and_killed_backup_unusable(env: Env) -> None:
    slow = "slow"
    staging = f"{env.repo_path}/staging/backups/{slow}"
    th, out = in_thread(lambda: backup(env, label=slow, max_rate="2M", compression="none"))
    pids = wait_for_pids(staging)

    second = backup(env, label="second")
    assert second.failed is True
    assert "held by base backup slow" in second.msg, second.msg
    assert not backup_dir(env, "second").exists()

    running = info(env)["in_progress"]
    assert [(p["label"], p["alive"]) for p in running] == [(slow, True)]

    # Kill pg_basebackup itself, not its WAL streaming child: the module must notice, clean
    # up the child and the staging directory, and record the backup as failed.
    parent = min(pids, key=lambda pid: (parent_pid(pid) in pids, pid))
    os.kill(parent, signal.SIGKILL)
    th.join(timeout=120)
    assert out, "the slow backup did not return"
    first = out[0]
    assert first.failed is True
    assert "pg_basebackup was killed by SIGKILL" in first.msg, first.msg
    rec = catalog.read_backup(env.repo, slow)
    assert rec is not None and rec.status == "failed" and not catalog.usable(rec)
    assert rec.files == []
    assert sorted(os.listdir(backup_dir(env, slow))) == ["backup.json"]
    assert not Path(staging).exists()
    assert slow not in info(env)["window"][0]["backups"]


def test_pg_basebackup_older_than_server_is_refused(env: Env, tmp_path: Path) -> None:
    fake = tmp_path / "bin"
    fake.mkdir()
    script = fake / "pg_basebackup"
    script.write_text("#!/bin/sh\necho 'pg_basebackup (PostgreSQL) 14.9'\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    (fake / "psql").symlink_to(f"{DEFAULT_BINDIR}/psql")
    result = backup(env, check=True, label="old", pg_bindir=str(fake))
    assert result.failed is True
    assert "pg_basebackup 14 is older than the server (15)" in result.msg


def test_window_ends_at_the_last_commit(env: Env) -> None:
    result = backup(env, label="window-base")
    assert not result.failed, result.msg
    with env.cluster.connect() as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS marker (at timestamptz)")
        for _row in range(3):
            conn.execute("INSERT INTO marker VALUES (clock_timestamp())")
        row = conn.execute("SELECT timestamp FROM pg_last_committed_xact()").fetchone()
    assert row is not None
    last_commit: dt.datetime = row[0]
    segment = env.cluster.switch_wal()
    # switch_wal commits one more transaction (its INSERT) before switching: that one is last
    row2 = env.cluster.sql("SELECT timestamp FROM pg_last_committed_xact()")
    last_commit = row2[0][0] if row2 and row2[0][0] else last_commit
    wait_archived(env.cluster, segment)

    report = info(env)
    tl1 = next(w for w in report["window"] if w["timeline"] == 1)
    end = dt.datetime.fromisoformat(tl1["end_time"])
    assert tl1["end_exact"] is True
    assert abs((end - last_commit).total_seconds()) < 0.001, (end, last_commit)
    oldest = [b for b in report["backups"] if b["usable"]][-1]
    assert tl1["start_time"] == oldest["stop_time"]
    assert tl1["gaps"] == []
    assert report["latest_usable"] == "window-base"
    assert report["usable_count"] == len([b for b in report["backups"] if b["usable"]])
    assert report["changed"] is False


@pytest.fixture
def host_dir() -> t.Iterator[Path]:
    base = Path(tempfile.mkdtemp(prefix="pitr-bbhost-"))
    give_to_server_user(base)
    yield base
    shutil.rmtree(base, ignore_errors=True)


def test_pitr_backup_host_command_for_the_timer(env: Env, host_dir: Path) -> None:
    """What the systemd timer runs: pitr-backup as the PostgreSQL user, no Ansible."""
    base = host_dir
    install_host_command(base / "prefix", owner="postgres" if os.geteuid() == 0 else None)
    program = base / "prefix" / "bin" / "pitr-backup"
    shutil.copy2(ROOT / "roles" / "base_backup" / "files" / "pitr-backup", program)
    repo = base / "repo"
    repo.mkdir()
    give_to_server_user(repo)
    give_to_server_user(program)
    as_owner = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    wal = str(base / "prefix" / "bin" / "pitr-wal")
    init = [*as_owner, "/usr/bin/python3", "-I", "-S", wal, "--repo", str(repo), "init"]
    subprocess.run([*init, "--pgdata", str(env.cluster.datadir)], check=True, cwd="/")
    argv = [
        *as_owner,
        "/usr/bin/python3",
        "-I",
        str(program),
        "--repo",
        str(repo),
        "--socket-dir",
        str(env.cluster.sockdir),
        "--port",
        str(env.cluster.port),
        "--user",
        "postgres",
        "--min-interval",
        "1h",
    ]
    first = subprocess.run(argv, capture_output=True, text=True, check=False, cwd="/")
    assert first.returncode == 0, first.stderr
    result = json.loads(first.stdout)
    assert result["changed"] is True and result["usable"] is True
    assert "verified:" in first.stderr and "MiB" in first.stderr
    label = result["label"]
    rec = catalog.read_backup(Repository.open_posix(str(repo)), label)
    assert rec is not None and catalog.usable(rec)

    second = subprocess.run(argv, capture_output=True, text=True, check=False, cwd="/")
    assert second.returncode == 0, second.stderr
    assert json.loads(second.stdout)["changed"] is False
    assert "nothing to do" in second.stderr

    # a failure is an exit status the unit's monitoring sees
    bad = subprocess.run(
        [*argv[:-2], "--format", "plain", "--compress", "client-zstd"],
        capture_output=True,
        text=True,
        check=False,
        cwd="/",
    )
    assert bad.returncode == 1
    assert json.loads(bad.stdout)["failed"] is True

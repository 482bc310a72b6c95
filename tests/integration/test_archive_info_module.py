# Copyright: contributors to pitr.postgresql
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""pitr.postgresql.archive_info run through ansible-playbook against scratch PostgreSQL 15.

Archiving is driven with plain shell commands here: ``/bin/false`` fails for real, and
``test ! -f DIR/%f && cp %p DIR/%f`` archives for real. The collection's own pitr-wal command
is tested with the host command.
"""

from __future__ import annotations

import sys
import time
import typing as t
from pathlib import Path

import pytest
from ansible_runner import TaskResult, collections_path, run_module
from pgcluster import PgCluster, free_port

MODULE = "pitr.postgresql.archive_info"
MakePgCluster = t.Callable[..., PgCluster]


def info(cluster: PgCluster, check: bool = False, **args: t.Any) -> TaskResult:
    result = run_module(MODULE, {**cluster.module_params, **args}, check=check)
    assert not result.failed, result.msg
    assert result.changed is False
    return result


def copy_command(directory: Path, marker: str = "") -> str:
    """A working (if not durable) archive_command into ``directory``."""
    return f"'test ! -f {directory}/%f && cp %p {directory}/%f{marker}'"


def wait_archived(cluster: PgCluster, count: int) -> None:
    cluster.wait_for(f"SELECT archived_count >= {count} FROM pg_stat_archiver", True)
    cluster.wait_for("SELECT count(*) FROM pg_ls_archive_statusdir() WHERE name LIKE '%.ready'", 0)


def test_fresh_cluster_archiving_off(pg_cluster: PgCluster) -> None:
    sysid = pg_cluster.scalar("SELECT system_identifier FROM pg_control_system()")
    for check in (True, False):
        result = info(pg_cluster, check=check)
        assert result["healthy"] is False
        assert result["reasons"] == ["archiving_off", "command_not_ours"]
        assert len(result["messages"]) == 2
        assert result["settings"] == {
            "wal_level": "replica",
            "archive_mode": "off",
            "archive_command": "",
            "archive_timeout": "0s",
            "archive_library": "",
        }
        assert result["ready_count"] == 0
        assert result["pg_stat_archiver"]["archived_count"] == 0
        assert result["pg_stat_archiver"]["last_archived_wal"] is None
        assert result["last_archived_age_seconds"] is None
        assert result["system_identifier"] == sysid
        assert result["server_version"] == int(pg_cluster.show("server_version_num"))
        assert result["in_recovery"] is False
        assert "repository" not in result


def test_failing_command(make_pg_cluster: MakePgCluster) -> None:
    cluster = make_pg_cluster(conf={"archive_mode": "on", "archive_command": "'/bin/false'"})
    first = cluster.switch_wal()
    cluster.switch_wal()
    cluster.wait_for("SELECT failed_count >= 1 FROM pg_stat_archiver", True)
    ready = cluster.ready_files()
    assert first in ready

    result = info(cluster)
    assert result["healthy"] is False
    assert result["reasons"] == ["command_not_ours", "failing"]
    failing = result["messages"][1]
    assert failing.startswith("archiving is failing: the last attempt (")
    archiver = result["pg_stat_archiver"]
    assert archiver["failed_count"] >= 1
    assert archiver["archived_count"] == 0
    assert archiver["last_failed_wal"] == first  # the oldest waits first
    assert archiver["last_failed_wal"] in failing
    assert result["ready_count"] == len(ready) >= 2
    assert result["last_archived_age_seconds"] is None

    # Tighter limits add the backlog, and staleness once max_age has passed.
    time.sleep(1.5)
    strict = info(cluster, max_ready=1, max_age="1s")
    assert strict["reasons"] == ["command_not_ours", "failing", "backlog", "stale"]
    assert f"{len(ready)} .ready files" in strict["messages"][2]


def test_working_command_counts(make_pg_cluster: MakePgCluster, scratch_dir: Path) -> None:
    cluster = make_pg_cluster(
        conf={"archive_mode": "on", "archive_command": copy_command(scratch_dir)}
    )
    switched = [cluster.switch_wal() for _round in range(3)]
    wait_archived(cluster, 3)

    result = info(cluster)
    archiver = result["pg_stat_archiver"]
    assert archiver["archived_count"] == 3
    assert archiver["failed_count"] == 0
    assert archiver["last_archived_wal"] == switched[-1]
    assert result["ready_count"] == 0
    assert result["pending_segments"] == 0
    assert 0 <= result["last_archived_age_seconds"] < 60
    assert result["reasons"] == ["command_not_ours"]  # cp is not pitr-wal
    assert sorted(p.name for p in scratch_dir.iterdir()) == switched


def test_healthy_when_archiving_works(make_pg_cluster: MakePgCluster, scratch_dir: Path) -> None:
    # The shell comment makes the command count as ours; the test of pitr-wal itself is the
    # host command's.
    cluster = make_pg_cluster(
        conf={"archive_mode": "on", "archive_command": copy_command(scratch_dir, " # pitr-wal")}
    )
    cluster.switch_wal()
    wait_archived(cluster, 1)
    result = info(cluster, max_age="1s")
    assert result["healthy"] is True
    assert result["reasons"] == [] and result["messages"] == []

    # Idle: nothing waits, so a last archive older than max_age is not stale.
    time.sleep(1.5)
    idle = info(cluster, max_age="1s")
    assert idle["healthy"] is True
    assert idle["last_archived_age_seconds"] > 1


def test_after_a_failure_is_fixed_it_is_healthy_again(
    make_pg_cluster: MakePgCluster, scratch_dir: Path
) -> None:
    cluster = make_pg_cluster(
        conf={"archive_mode": "on", "archive_command": "'/bin/false # pitr-wal'"}
    )
    cluster.switch_wal()
    cluster.wait_for("SELECT failed_count >= 1 FROM pg_stat_archiver", True)
    assert info(cluster)["reasons"] == ["failing"]

    cluster.sql(f"ALTER SYSTEM SET archive_command = {copy_command(scratch_dir, ' # pitr-wal')}")
    cluster.reload()
    wait_archived(cluster, 1)
    result = info(cluster)
    assert result["healthy"] is True
    assert result["pg_stat_archiver"]["failed_count"] >= 1  # history, not the present


def test_role_without_pg_monitor_gets_an_estimate(
    make_pg_cluster: MakePgCluster, scratch_dir: Path
) -> None:
    cluster = make_pg_cluster(
        conf={"archive_mode": "on", "archive_command": copy_command(scratch_dir, " # pitr-wal")}
    )
    cluster.sql("CREATE ROLE watcher LOGIN")
    cluster.switch_wal()
    wait_archived(cluster, 1)
    params = {**cluster.module_params, "login_user": "watcher", "login_db": "postgres"}
    result = run_module(MODULE, params)
    assert not result.failed, result.msg
    assert result["ready_count"] is None
    assert result["pending_segments"] == 0
    assert any("pg_monitor" in w for w in result.warnings)
    assert result["healthy"] is True

    cluster.sql("GRANT pg_monitor TO watcher")
    result = run_module(MODULE, params)
    assert result["ready_count"] == 0
    assert not result.warnings


def _write_identity(path: Path, system_identifier: int) -> None:
    sys.path.insert(0, collections_path())
    from ansible_collections.pitr.postgresql.plugins.module_utils.repository import (
        Repository,
        RepositoryIdentity,
    )

    Repository.open_posix(str(path)).ensure_identity(
        RepositoryIdentity(system_identifier, 15, 16 * 1024 * 1024)
    )


def test_repository_report_and_identity_guard(pg_cluster: PgCluster, tmp_path: Path) -> None:
    sysid = pg_cluster.scalar("SELECT system_identifier FROM pg_control_system()")
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    ours.mkdir()
    theirs.mkdir()
    _write_identity(ours, sysid)
    _write_identity(theirs, sysid + 1)

    result = info(pg_cluster, repository_path=str(ours))
    assert result["repository"]["path"] == str(ours)
    assert result["repository"]["identity"] == {
        "system_identifier": sysid,
        "pg_major": 15,
        "wal_segment_size": 16 * 1024 * 1024,
    }
    assert result["repository"]["wal_summary"]["files"] == 0
    assert "identity_mismatch" not in result["reasons"]

    other = info(pg_cluster, repository_path=str(theirs))
    assert other["reasons"][-1] == "identity_mismatch"
    assert f"system identifier {sysid}" in other["messages"][-1]


@pytest.mark.parametrize(
    ("name", "why"),
    [
        pytest.param("missing", "No such file or directory", id="missing"),
        pytest.param("a-file", "is not a directory", id="a-file"),
        pytest.param("a-file/repo", "Not a directory", id="below-a-file"),
    ],
)
def test_unreadable_repository_fails_the_check(
    pg_cluster: PgCluster, tmp_path: Path, name: str, why: str
) -> None:
    """Archiving into a repository that cannot be read cannot work: unhealthy, not a warning."""
    (tmp_path / "a-file").write_text("not a repository")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    path = str(tmp_path / name)
    for check in (True, False):
        result = info(pg_cluster, check=check, repository_path=path)
        assert result["healthy"] is False
        assert result["reasons"][-1] == "repository_unreadable"
        assert "identity_mismatch" not in result["reasons"]
        message = result["messages"][-1]
        assert message.startswith(f"the repository {path} cannot be read by root, so WAL")
        assert why in message
        assert "setup_archiving.yml" in message and "read and write access" in message
        assert result["repository"] == {"path": path, "error": result["repository"]["error"]}
        assert why in result["repository"]["error"]
        assert not any("repository" in w for w in result.warnings)
    # Read-only: nothing was created.
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


@pytest.mark.parametrize(
    ("args", "words"),
    [
        ({"max_age": "soon"}, ["max_age", "15min"]),
        ({"login_host": "127.0.0.1", "connect_timeout": 3}, ["cannot connect to PostgreSQL"]),
    ],
)
def test_failures(args: dict[str, t.Any], words: list[str]) -> None:
    result = run_module(MODULE, {"port": free_port(), **args})
    assert result.failed
    for word in words:
        assert word in result.msg

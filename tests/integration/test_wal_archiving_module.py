# Copyright: contributors to pitr.postgresql
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""pitr.postgresql.wal_archiving run through ansible-playbook against scratch PostgreSQL 15.

Each case: check mode (predicted result, server unchanged) -> real run -> the server says so
-> run again -> changed is false.
"""

from __future__ import annotations

import subprocess
import sys
import typing as t
from pathlib import Path

from ansible_runner import TaskResult, run_module, run_playbook_text
from pgcluster import PgCluster, free_port

MODULE = "pitr.postgresql.wal_archiving"
CMD = "cp %p /mnt/archive/%f"
NEW_CMD = "cp %p /mnt/other/%f"
ALL_FOUR = ("wal_level", "archive_mode", "archive_command", "archive_timeout")


def run(cluster: PgCluster, check: bool = False, diff: bool = False, **args: t.Any) -> TaskResult:
    args.setdefault("archive_command", CMD)
    result = run_module(MODULE, {**cluster.module_params, **args}, check=check, diff=diff)
    return result


def configured(cluster: PgCluster, name: str) -> str | None:
    """What the configuration files say (the last entry wins), None when they say nothing."""
    rows = cluster.sql(
        "SELECT setting FROM pg_file_settings WHERE name = %s ORDER BY seqno DESC LIMIT 1", [name]
    )
    return rows[0][0] if rows else None


def archive_settings(cluster: PgCluster) -> dict[str, str]:
    """Running values, looking through '(disabled)' for archive_command."""
    rows = cluster.sql(
        "SELECT name, CASE WHEN setting = '(disabled)' THEN reset_val ELSE setting END"
        " FROM pg_settings WHERE name = ANY(%s)",
        [list(ALL_FOUR)],
    )
    return dict(rows)


def assert_ok(result: TaskResult) -> None:
    assert not result.failed, result.msg


def test_fresh_cluster_check_apply_idempotent_restart(pg_cluster: PgCluster) -> None:
    before_auto_conf = pg_cluster.auto_conf()
    expected_queries = [
        "ALTER SYSTEM SET \"archive_mode\" = 'on'",
        f"ALTER SYSTEM SET \"archive_command\" = '{CMD}'",
        "ALTER SYSTEM SET \"archive_timeout\" = '60s'",
        "SELECT pg_catalog.pg_reload_conf()",
    ]
    expected_diff = {
        "before": {
            "wal_level": "replica",
            "archive_mode": "off",
            "archive_command": "",
            "archive_timeout": "0s",
        },
        "after": {
            "wal_level": "replica",
            "archive_mode": "on",
            "archive_command": CMD,
            "archive_timeout": "60s",
        },
    }

    predicted = run(pg_cluster, check=True, diff=True)
    assert_ok(predicted)
    assert predicted.changed is True
    assert predicted["queries"] == expected_queries
    assert predicted["restart_required"] is True
    assert predicted["pending_restart"] == ["archive_mode"]
    assert predicted["reload_required"] is True
    assert predicted["diff"] == expected_diff
    assert predicted["previous_archive_command"] == ""
    # Check mode changed nothing.
    assert pg_cluster.auto_conf() == before_auto_conf
    assert configured(pg_cluster, "archive_mode") is None
    assert pg_cluster.show("archive_timeout") == "0"

    applied = run(pg_cluster, diff=True)
    assert_ok(applied)
    assert applied.changed is True
    assert applied["queries"] == expected_queries
    assert applied["diff"] == expected_diff
    assert applied["restart_required"] is True
    # ALTER SYSTEM wrote all three; the reload applied the sighup ones, archive_mode waits.
    assert configured(pg_cluster, "archive_mode") == "on"
    assert configured(pg_cluster, "archive_command") == CMD
    assert pg_cluster.show("archive_timeout") == "1min"
    assert archive_settings(pg_cluster)["archive_command"] == CMD
    assert pg_cluster.show("archive_mode") == "off"
    assert (
        pg_cluster.scalar("SELECT pending_restart FROM pg_settings WHERE name = 'archive_mode'")
        is True
    )

    again = run(pg_cluster, diff=True)
    assert_ok(again)
    assert again.changed is False
    assert again["queries"] == []
    assert again["restart_required"] is True  # still waiting for the restart
    assert again["pending_restart"] == ["archive_mode"]
    assert again["reload_required"] is False
    assert again["diff"]["before"] == again["diff"]["after"] == expected_diff["after"]

    pg_cluster.restart()
    assert pg_cluster.show("archive_mode") == "on"
    assert pg_cluster.show("archive_command") == CMD
    after_restart = run(pg_cluster)
    assert_ok(after_restart)
    assert after_restart.changed is False
    assert after_restart["restart_required"] is False
    assert after_restart["queries"] == []
    assert after_restart["previous_archive_command"] == CMD


def test_command_only_change_needs_no_restart(make_pg_cluster: t.Callable[..., PgCluster]) -> None:
    cluster = make_pg_cluster(
        conf={"archive_mode": "on", "archive_command": f"'{CMD}'", "archive_timeout": "60"}
    )

    predicted = run(cluster, check=True, diff=True, archive_command=NEW_CMD)
    assert_ok(predicted)
    assert predicted.changed is True
    assert predicted["queries"] == [
        f"ALTER SYSTEM SET \"archive_command\" = '{NEW_CMD}'",
        "SELECT pg_catalog.pg_reload_conf()",
    ]
    assert predicted["restart_required"] is False
    assert predicted["reload_required"] is True
    assert predicted["diff"]["before"]["archive_command"] == CMD
    assert predicted["diff"]["after"]["archive_command"] == NEW_CMD
    assert cluster.show("archive_command") == CMD  # unchanged by check mode

    applied = run(cluster, archive_command=NEW_CMD)
    assert_ok(applied)
    assert applied.changed is True
    assert applied["restart_required"] is False
    assert applied["previous_archive_command"] == CMD
    # The module waited for the reload: a new session already sees the new command.
    assert cluster.show("archive_command") == NEW_CMD
    assert configured(cluster, "archive_command") == NEW_CMD

    # '1min' is the '60' in postgresql.conf: nothing to do.
    again = run(cluster, archive_command=NEW_CMD, archive_timeout="1min")
    assert_ok(again)
    assert again.changed is False
    assert again["queries"] == []
    assert again["reload_required"] is False


def test_wal_level_logical_needs_restart_and_is_kept(pg_cluster: PgCluster) -> None:
    predicted = run(pg_cluster, check=True, wal_level="logical")
    assert_ok(predicted)
    assert "ALTER SYSTEM SET \"wal_level\" = 'logical'" in predicted["queries"]
    assert set(predicted["pending_restart"]) == {"wal_level", "archive_mode"}
    assert configured(pg_cluster, "wal_level") is None

    applied = run(pg_cluster, wal_level="logical")
    assert_ok(applied)
    assert applied["restart_required"] is True
    assert configured(pg_cluster, "wal_level") == "logical"
    pg_cluster.restart()
    assert pg_cluster.show("wal_level") == "logical"

    # Asking for replica (the default) does not lower logical.
    kept = run(pg_cluster, check=True, diff=True)
    assert_ok(kept)
    assert kept.changed is False
    assert kept["queries"] == []
    assert kept["settings"]["wal_level"] == "logical"
    assert kept["restart_required"] is False
    kept = run(pg_cluster)
    assert kept.changed is False
    assert pg_cluster.show("wal_level") == "logical"
    assert configured(pg_cluster, "wal_level") == "logical"


def test_archive_library_set_fails_and_changes_nothing(pg_cluster: PgCluster) -> None:
    pg_cluster.sql("ALTER SYSTEM SET archive_library = 'basic_archive'")
    pg_cluster.reload()
    pg_cluster.wait_for("SHOW archive_library", "basic_archive")
    auto_conf = pg_cluster.auto_conf()

    for check in (True, False):
        result = run(pg_cluster, check=check)
        assert result.failed
        assert "archive_library is set" in result.msg
        assert "'basic_archive'" in result.msg
        assert "ALTER SYSTEM RESET archive_library" in result.msg
        assert result["setting"] == "archive_library"
    assert pg_cluster.auto_conf() == auto_conf
    assert configured(pg_cluster, "archive_mode") is None

    # Doing what the message says makes the module work.
    pg_cluster.sql("ALTER SYSTEM RESET archive_library")
    pg_cluster.reload()
    pg_cluster.wait_for("SHOW archive_library", "")
    fixed = run(pg_cluster)
    assert_ok(fixed)
    assert fixed.changed is True


def test_wal_level_minimal_is_refused(pg_cluster: PgCluster) -> None:
    result = run(pg_cluster, wal_level="minimal")
    assert result.failed
    assert "wal_level" in result.msg
    assert "replica" in result.msg and "minimal" in result.msg
    assert configured(pg_cluster, "wal_level") is None


def test_unreachable_server_fails_clearly(pg_cluster: PgCluster) -> None:
    port = free_port()
    result = run_module(
        MODULE,
        {"login_host": "127.0.0.1", "port": port, "archive_command": CMD, "connect_timeout": 3},
    )
    assert result.failed
    assert result.msg.startswith("cannot connect to PostgreSQL (host=127.0.0.1 port=")
    assert f"port={port}" in result.msg
    assert "Connection refused" in result.msg


def test_tcp_login_and_wrong_password_is_not_echoed(pg_cluster: PgCluster) -> None:
    """Over TCP (login_host) with trust auth; a password given is never in the result."""
    result = run_module(
        MODULE,
        {
            "login_host": "127.0.0.1",
            "port": pg_cluster.port,
            "login_password": "s3cret-value",
            "login_db": "postgres",
            "archive_command": CMD,
        },
        check=True,
    )
    assert_ok(result)
    assert result.changed is True
    assert "s3cret-value" not in repr(result.result)


def test_unquoted_yaml_on_reaches_the_module_as_on(pg_cluster: PgCluster) -> None:
    """archive_mode: on (unquoted) is YAML's boolean true; Ansible maps it back to 'on'."""
    playbook = f"""
- hosts: localhost
  tasks:
    - name: Configure archiving with an unquoted on
      pitr.postgresql.wal_archiving:
        login_unix_socket: {pg_cluster.sockdir}
        port: {pg_cluster.port}
        archive_mode: on
        archive_command: "{CMD}"
"""
    [result] = run_playbook_text(playbook)
    assert_ok(result)
    assert result["settings"]["archive_mode"] == "on"
    assert configured(pg_cluster, "archive_mode") == "on"


def test_distribution_psycopg_runs_the_module(pg_cluster: PgCluster) -> None:
    """Debian's python3-psycopg (3.1) is what database hosts have: the module works with it."""
    probe = subprocess.run(
        ["/usr/bin/python3", "-c", "import psycopg; print(psycopg.__version__)"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert probe.returncode == 0, "python3-psycopg is missing: run make bootstrap"
    result = run_module(
        MODULE,
        {**pg_cluster.module_params, "archive_command": CMD},
        interpreter="/usr/bin/python3",
    )
    assert_ok(result)
    assert result.changed is True
    assert configured(pg_cluster, "archive_command") == CMD


def test_missing_psycopg_names_the_library(pg_cluster: PgCluster, tmp_path: Path) -> None:
    bare = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True)
    result = run_module(
        MODULE,
        {**pg_cluster.module_params, "archive_command": CMD},
        interpreter=str(bare / "bin" / "python"),
    )
    assert result.failed
    assert "Failed to import the required Python library (psycopg)" in result.msg
    assert configured(pg_cluster, "archive_command") is None


def test_non_superuser_with_the_documented_grants(pg_cluster: PgCluster) -> None:
    """The grants the module's notes name are enough, and the warning names the missing ones."""
    pg_cluster.sql("CREATE ROLE archiver LOGIN")
    pg_cluster.sql(
        "GRANT ALTER SYSTEM ON PARAMETER wal_level, archive_mode, archive_command,"
        " archive_timeout TO archiver"
    )
    pg_cluster.sql("GRANT EXECUTE ON FUNCTION pg_reload_conf() TO archiver")
    params = {**pg_cluster.module_params, "login_user": "archiver", "login_db": "postgres"}

    first = run_module(MODULE, {**params, "archive_command": CMD})
    assert_ok(first)
    assert first.changed is True
    assert configured(pg_cluster, "archive_mode") == "on"
    assert any("pg_show_all_file_settings()" in w for w in first.warnings)
    # Without pg_file_settings the value waiting for the restart is not seen: written again.
    blind = run_module(MODULE, {**params, "archive_command": CMD})
    assert blind["queries"] == ["ALTER SYSTEM SET \"archive_mode\" = 'on'"]

    pg_cluster.sql("GRANT SELECT ON pg_file_settings TO archiver")
    pg_cluster.sql("GRANT EXECUTE ON FUNCTION pg_show_all_file_settings() TO archiver")
    seeing = run_module(MODULE, {**params, "archive_command": CMD})
    assert_ok(seeing)
    assert seeing.changed is False
    assert seeing["restart_required"] is True
    assert not seeing.warnings

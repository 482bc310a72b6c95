# Copyright: contributors to pitr.postgresql
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The base_backup role, run for real: ``ansible-playbook playbooks/take_base_backup.yml``.

Against a scratch PostgreSQL 15 cluster whose replication connections need a SCRAM password
(pg_hba.conf rewritten for that), with a dedicated REPLICATION role the role creates: check
mode changes nothing -> the backup is taken as that role through the password file -> a second
run with base_backup_min_interval changes nothing. The systemd timer needs systemd (Molecule).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import typing as t
from pathlib import Path

import pytest
from ansible_runner import recap, run_playbook_file
from pgcluster import PgCluster, give_to_server_user

ROOT = Path(__file__).resolve().parents[2]
PLAYBOOK = ROOT / "playbooks" / "take_base_backup.yml"
HOST_PYTHON = "/usr/bin/python3"
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

from tests.support.hostcmd_install import install_host_command  # noqa: E402

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="the role writes root-owned files and becomes postgres: run as root"
)
PASSWORD = "s3cret:with\\odd chars"


class Target:
    def __init__(self, cluster: PgCluster, workdir: Path) -> None:
        self.cluster = cluster
        self.workdir = workdir
        self.repository = workdir / "repo"
        self.passfile = workdir / "etc" / "base_backup.pgpass"

    def run(self, *, check: bool = False, extra: dict[str, t.Any] | None = None) -> tuple[int, str]:
        hostvars = {
            "ansible_connection": "local",
            "ansible_python_interpreter": HOST_PYTHON,
            "pitr_repository_path": str(self.repository),
            "pitr_install_prefix": str(self.workdir / "prefix"),
            "base_backup_login_unix_socket": str(self.cluster.sockdir),
            "base_backup_login_port": self.cluster.port,
            "base_backup_replication_user": "pitr_backup",
            "base_backup_replication_password": PASSWORD,
            "base_backup_passfile": str(self.passfile),
            "base_backup_poll_interval": 1,
            **(extra or {}),
        }
        return run_playbook_file(
            PLAYBOOK, {"localhost": hostvars}, self.workdir, check=check, timeout=300
        )

    def backups(self) -> list[str]:
        d = self.repository / "backups"
        return sorted(p.name for p in d.iterdir()) if d.exists() else []


@pytest.fixture
def target() -> t.Iterator[Target]:
    workdir = Path(tempfile.mkdtemp(prefix="pitr-bbrole-"))
    give_to_server_user(workdir)
    cluster = PgCluster.create(conf={"wal_level": "replica", "max_wal_senders": "5"})
    try:
        # Replication connections need a password here (trust stays for local admin access).
        hba = cluster.datadir / "pg_hba.conf"
        lines = [ln for ln in hba.read_text().splitlines() if "replication" not in ln]
        lines.append("host replication all 127.0.0.1/32 scram-sha-256")
        hba.write_text("\n".join(lines) + "\n")
        cluster.start()
        tgt = Target(cluster, workdir)
        tgt.repository.mkdir()
        give_to_server_user(tgt.repository)
        program = install_host_command(workdir / "prefix", owner="postgres")
        cluster.init_repository(program, tgt.repository)
        yield tgt
    finally:
        cluster.destroy()
        shutil.rmtree(workdir, ignore_errors=True)


def test_role_check_then_backup_as_replication_role_then_idempotent(target: Target) -> None:
    rc, out = target.run(check=True)
    assert rc == 0, out[-6000:]
    assert "Check mode: the replication role pitr_backup and its password file" in out
    assert target.backups() == []
    assert not target.passfile.exists()
    assert target.cluster.sql("SELECT 1 FROM pg_roles WHERE rolname = 'pitr_backup'") == []

    rc, out = target.run()
    assert rc == 0, out[-6000:]
    assert recap(out)[3] == 0
    labels = target.backups()
    assert len(labels) == 1
    record = json.loads((target.repository / "backups" / labels[0] / "backup.json").read_text())
    assert record["status"] == "ok" and record["verified"] is True
    assert re.search(r"Backup \S+: .* of .* \(100.0%\) copied", out), out[-3000:]

    # the role: REPLICATION, not superuser; its pg_hba.conf lines; the private password file
    role = target.cluster.sql(
        "SELECT rolreplication, rolsuper, rolcanlogin FROM pg_roles WHERE rolname = 'pitr_backup'"
    )
    assert role == [(True, False, True)]
    hba_rules = target.cluster.sql(
        "SELECT type, database, user_name, address, auth_method FROM pg_hba_file_rules"
        " WHERE 'pitr_backup' = ANY(user_name)"
    )
    assert sorted(r[3] for r in hba_rules) == ["127.0.0.1", "::1"]
    assert all(
        r[0] == "host" and r[1] == ["replication"] and r[4] == "scram-sha-256" for r in hba_rules
    )
    assert oct(target.passfile.stat().st_mode & 0o777) == "0o600"
    assert target.passfile.owner() == "postgres"
    assert PASSWORD not in out  # never in the log

    # replication as pitr_backup needs the password, and the password file provides it
    def identify(passfile: str) -> subprocess.CompletedProcess[str]:
        argv = [
            "runuser",
            "-u",
            "postgres",
            "--",
            "env",
            f"PGPASSFILE={passfile}",
            target.cluster.bin("psql"),
            "-X",
            "-w",
            "-At",
            "-h",
            "127.0.0.1",
            "-p",
            str(target.cluster.port),
            "-U",
            "pitr_backup",
            "-d",
            "dbname=replication replication=true",
            "-c",
            "IDENTIFY_SYSTEM",
        ]
        return subprocess.run(argv, capture_output=True, text=True, check=False, cwd="/")

    assert identify("/nonexistent").returncode != 0
    assert identify(str(target.passfile)).returncode == 0

    rc, out = target.run(check=True)
    assert rc == 0, out[-6000:]
    assert "Check mode: would run" in out and "/pg_basebackup --pgdata=" in out
    assert len(target.backups()) == 1

    rc, out = target.run(extra={"base_backup_min_interval": "1h"})
    assert rc == 0, out[-6000:]
    assert recap(out)[1] == 0, out[-6000:]
    assert "No backup taken" in out

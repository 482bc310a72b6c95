# Copyright: contributors to pitr.postgresql
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The base_backup role shows a backup's progress while it runs (playbooks/take_base_backup.yml).

Against a scratch PostgreSQL 15 cluster with about 40 MB of data, the backup is throttled with
``base_backup_max_rate`` (pg_basebackup --max-rate) and taken uncompressed, so that it lasts
several seconds however fast the machine is (a slower machine only makes it longer), and
``base_backup_poll_interval: 1``. The playbook's stdout must hold progress lines of the running
backup with growing byte counts, then the final total; check mode still starts no backup and
shows the argv; a backup that fails makes the role fail with the module's own message.
"""

from __future__ import annotations

import json
import os
import re
import shutil
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
SIZE = r"([\d.]+ (?:Bytes|KB|MB|GB|TB))"
COPYING = re.compile(
    rf"^\[localhost\] backup (\S+): {SIZE} of {SIZE} \(([\d.]+)%\), {SIZE}/s$", re.M
)
FINAL = re.compile(
    rf"^\[localhost\] backup (\S+): {SIZE} of {SIZE} \(([\d.]+)%\) in [\d.]+ s, verified$", re.M
)
UNITS = {"Bytes": 1, "KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30, "TB": 1 << 40}
MAX_RATE = "2M"  # 2 MB/s: about 20 s for the 40 MB below, however fast the machine


def size(text: str) -> float:
    """``12.34 MB`` (Ansible's human_readable) -> bytes."""
    number, unit = text.split()
    return float(number) * UNITS[unit]


class Target:
    def __init__(self, cluster: PgCluster, workdir: Path) -> None:
        self.cluster = cluster
        self.workdir = workdir
        self.repository = workdir / "repo"

    def run(self, *, check: bool = False, extra: dict[str, t.Any] | None = None) -> tuple[int, str]:
        hostvars = {
            "ansible_connection": "local",
            "ansible_python_interpreter": HOST_PYTHON,
            "pitr_repository_path": str(self.repository),
            "pitr_install_prefix": str(self.workdir / "prefix"),
            "base_backup_install_packages": False,
            "base_backup_login_unix_socket": str(self.cluster.sockdir),
            "base_backup_login_port": self.cluster.port,
            "base_backup_compression": "none",  # --max-rate counts the bytes sent
            "base_backup_max_rate": MAX_RATE,
            "base_backup_poll_interval": 1,
            **(extra or {}),
        }
        return run_playbook_file(
            PLAYBOOK, {"localhost": hostvars}, self.workdir, check=check, timeout=600
        )

    def records(self) -> dict[str, dict[str, t.Any]]:
        d = self.repository / "backups"
        if not d.exists():
            return {}
        return {
            p.name: json.loads((p / "backup.json").read_text())
            for p in sorted(d.iterdir())
            if (p / "backup.json").exists()
        }


@pytest.fixture
def target() -> t.Iterator[Target]:
    workdir = Path(tempfile.mkdtemp(prefix="pitr-bbprogress-"))
    give_to_server_user(workdir)
    cluster = PgCluster.create(conf={"wal_level": "replica", "max_wal_senders": "5"})
    try:
        cluster.start()
        # About 20 MB of table on top of the ~22 MB of a new cluster.
        cluster.sql(
            "CREATE TABLE filler AS SELECT g AS id, md5(g::text) AS a, md5((-g)::text) AS b"
            " FROM generate_series(1, 200000) g"
        )
        cluster.sql("CHECKPOINT")
        tgt = Target(cluster, workdir)
        tgt.repository.mkdir()
        give_to_server_user(tgt.repository)
        program = install_host_command(workdir / "prefix", owner="postgres")
        cluster.init_repository(program, tgt.repository)
        yield tgt
    finally:
        cluster.destroy()
        shutil.rmtree(workdir, ignore_errors=True)


def test_progress_lines_while_the_backup_runs(target: Target) -> None:
    # Check mode: no backup, no progress, the argv with the rate limit.
    rc, out = target.run(check=True)
    assert rc == 0, out[-6000:]
    assert "Check mode: would run" in out and f"--max-rate={MAX_RATE}" in out, out[-4000:]
    assert not COPYING.search(out) and not FINAL.search(out), out[-4000:]
    assert target.records() == {}

    rc, out = target.run()
    assert rc == 0, out[-6000:]
    assert recap(out)[3] == 0
    records = target.records()
    assert len(records) == 1, records
    label, record = next(iter(records.items()))
    assert record["status"] == "ok" and record["verified"] is True

    lines = COPYING.findall(out)
    assert lines, out[-6000:]
    assert {line[0] for line in lines} == {label}, lines
    done = [size(line[1]) for line in lines]
    totals = [size(line[2]) for line in lines]
    # Growing byte counts while it runs: never backwards, at least two distinct values.
    assert done == sorted(done), lines
    assert len(set(done)) >= 2, lines
    assert all(d <= tot for d, tot in zip(done, totals, strict=True)), lines
    assert all(size(line[4]) > 0 for line in lines), lines
    # Each line: done of total with the percentage of the two.
    for line in lines:
        if size(line[2]) > 0:
            assert abs(float(line[3]) - 100 * size(line[1]) / size(line[2])) < 1.0, line
    # Then the final total: all of it, and as large as any total shown while it ran.
    final = FINAL.findall(out)
    assert len(final) == 1, out[-6000:]
    assert final[0][0] == label
    assert final[0][1] == final[0][2] and final[0][3] == "100.0", final
    assert size(final[0][2]) >= max(totals) * 0.99
    assert size(final[0][2]) >= 40e6 * 0.9  # the data really is about 40 MB
    # The final line comes after the progress lines, and the role's summary after it.
    last_progress = list(COPYING.finditer(out))[-1].start()
    final_at = FINAL.search(out)
    assert final_at is not None and final_at.start() > last_progress
    summary = re.search(rf"Backup {label}: .* of .* \(100.0%\) copied", out)
    assert summary is not None and summary.start() > final_at.start(), out[-3000:]
    # The job's status file is removed once the wait has its result.
    async_dir = Path("~postgres").expanduser() / ".ansible_async"
    for job in async_dir.iterdir() if async_dir.exists() else []:
        assert f'"label": "{label}"' not in job.read_text(errors="replace"), job


def test_failed_backup_fails_the_role_with_the_module_message(target: Target) -> None:
    # pg_basebackup refuses a rate below 32 kB/s: the module records a failed backup and fails.
    rc, out = target.run(extra={"base_backup_max_rate": "1"})
    assert rc != 0, out[-6000:]
    assert recap(out)[3] == 1
    records = target.records()
    assert len(records) == 1 and next(iter(records.values()))["status"] == "failed", records
    label = next(iter(records))
    assert f"base backup {label} is not usable (failed): pg_basebackup failed" in out, out[-6000:]
    assert "transfer rate" in out, out[-6000:]
    assert "Wait for the backup to finish, printing its progress" in out
    assert not FINAL.search(out)

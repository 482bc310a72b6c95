# Copyright: contributors to pitr.postgresql
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The pitr_restore role on real PostgreSQL 15 clusters, through ansible-playbook.

One source cluster for the whole file: WAL archived into a repository with the collection's
own pitr-wal, one base backup taken with pitr.postgresql.base_backup while pgbench runs and a
marker table gets one committed row per second. Every marker's commit time (from
track_commit_timestamp), transaction ID and the WAL position after its commit are recorded,
so each restore can be checked for exactly the markers it must contain.

To stay fast on two cores, restores run as several inventory hosts of one playbook run (all
on localhost, each restoring a clone into its own data directory and port). The tests then
check each clone. The in-place restore of the source itself comes last, followed by restores
to a point on the original timeline after it created a new one.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import typing as t
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import psycopg
import pytest
from ansible_runner import _environment, collections_path, run_tasks
from pgcluster import DEFAULT_BINDIR, PgCluster, free_port, give_to_server_user

ROOT = Path(__file__).resolve().parents[2]
for _p in (collections_path(), str(ROOT)):
    if _p not in sys.path:
        sys.path.append(_p)

from ansible_collections.pitr.postgresql.plugins.module_utils import (  # noqa: E402
    catalog,
    restore_lease,
)
from ansible_collections.pitr.postgresql.plugins.module_utils.hostcmd import (  # noqa: E402
    archive_command_for,
)
from ansible_collections.pitr.postgresql.plugins.module_utils.repository import (  # noqa: E402
    Repository,
    wal_key,
)
from ansible_collections.pitr.postgresql.plugins.module_utils.walfile import (  # noqa: E402
    parse_lsn,
    segment_for_lsn,
)
from tests.support.hostcmd_install import install_host_command  # noqa: E402

SEG = 16 * 1024 * 1024
RESTORE_POINT = "pitr-test-point"
MARKERS_AFTER_BACKUP = 11


@dataclass(frozen=True)
class Marker:
    id: int
    commit_time: datetime
    xid: int
    lsn_after: int


@dataclass
class Source:
    cluster: PgCluster
    base: Path
    repo: Path
    prefix: Path
    markers: list[Marker]
    restore_point_after: int
    backup: catalog.BackupRecord
    clones: list[Path] = field(default_factory=list)

    def after_backup(self) -> list[Marker]:
        stop = datetime.fromisoformat(self.backup.stop_time)
        return [m for m in self.markers if m.commit_time > stop]

    def marker(self, n_after_backup: int) -> Marker:
        """The n-th marker committed after the backup ended (1-based)."""
        return self.after_backup()[n_after_backup - 1]

    def common_vars(self) -> dict[str, t.Any]:
        return {
            "pitr_repository_path": str(self.repo),
            "pitr_install_prefix": str(self.prefix),
            "pitr_restore_pg_bindir": DEFAULT_BINDIR,
            "pitr_restore_service_manager": "pg_ctl",
            "pitr_restore_login_unix_socket": str(self.cluster.sockdir),
            "pitr_restore_progress_interval": 2,
            "pitr_restore_recovery_timeout": 180,
        }

    def clone_vars(self, name: str, **extra: t.Any) -> dict[str, t.Any]:
        data_dir = self.base / "clones" / name
        self.clones.append(data_dir)
        return {
            **self.common_vars(),
            "pitr_restore_clone": True,
            "pitr_restore_clone_port": free_port(),
            "pitr_restore_data_dir": str(data_dir),
            **extra,
        }

    def in_place_vars(self, **extra: t.Any) -> dict[str, t.Any]:
        return {
            **self.common_vars(),
            "pitr_restore_data_dir": str(self.cluster.datadir),
            "pitr_restore_login_port": self.cluster.port,
            "pitr_restore_pg_ctl_log_file": str(self.cluster.logfile),
            **extra,
        }


def utc_text(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f+00")


def lsn_text(lsn: int) -> str:
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def ids_up_to(source: Source, predicate: t.Callable[[Marker], bool]) -> list[int]:
    return [m.id for m in source.markers if predicate(m)]


# --------------------------------------------------------------------------------------------
# The source cluster


def run_as_postgres(argv: list[str]) -> subprocess.CompletedProcess[str]:
    if os.geteuid() == 0:
        argv = ["runuser", "-u", "postgres", "--", *argv]
    return subprocess.run(argv, capture_output=True, text=True, check=True, cwd="/")


def wait_archived(cluster: PgCluster, segment: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        last = cluster.scalar("SELECT coalesce(last_archived_wal, '') FROM pg_stat_archiver")
        if last >= segment:
            return
        time.sleep(0.2)
    raise AssertionError(f"{segment} was not archived within {timeout}s")


def switch_and_archive(cluster: PgCluster) -> str:
    with cluster.connect() as conn:
        conn.execute("SELECT pg_logical_emit_message(false, 'test', 'switch')")
        segment = conn.execute("SELECT pg_walfile_name(pg_switch_wal())").fetchone()[0]
    wait_archived(cluster, segment)
    return str(segment)


class MarkerWriter(threading.Thread):
    """One committed marker row per second; every third one also switches WAL."""

    def __init__(self, cluster: PgCluster) -> None:
        super().__init__(daemon=True)
        self.cluster = cluster
        self.markers: list[Marker] = []
        self.stop_after: int | None = None
        self.restore_point_at: int | None = None
        self.restore_point_done: int | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with self.cluster.connect() as conn:
                n = 0
                while self.stop_after is None or len(self.markers) < self.stop_after:
                    n += 1
                    started = time.monotonic()
                    xid = conn.execute(
                        "INSERT INTO marker (id) VALUES (%s) RETURNING xmin::text::bigint", (n,)
                    ).fetchone()[0]
                    when, lsn = conn.execute(
                        "SELECT pg_xact_commit_timestamp(%s::text::xid),"
                        " pg_current_wal_lsn()::text",
                        (str(xid),),
                    ).fetchone()
                    self.markers.append(Marker(n, when.astimezone(UTC), int(xid), parse_lsn(lsn)))
                    if self.restore_point_at is not None and n >= self.restore_point_at:
                        conn.execute("SELECT pg_create_restore_point(%s)", (RESTORE_POINT,))
                        self.restore_point_done, self.restore_point_at = n, None
                    if n % 3 == 0:
                        conn.execute("SELECT pg_switch_wal()")
                    time.sleep(max(0.0, 1.0 - (time.monotonic() - started)))
        except BaseException as exc:  # reported by the fixture
            self.error = exc


@pytest.fixture(scope="module")
def source() -> t.Iterator[Source]:
    base = Path(tempfile.mkdtemp(prefix="pitr-rs-"))
    give_to_server_user(base)
    repo = base / "repo"
    repo.mkdir()
    give_to_server_user(repo)
    (base / "clones").mkdir()
    give_to_server_user(base / "clones")
    owner = "postgres" if os.geteuid() == 0 else None
    program = install_host_command(base / "prefix", owner=owner)
    cluster = PgCluster.create(
        parent=str(base),
        conf={
            "wal_level": "replica",
            "max_wal_senders": "10",
            "max_connections": "40",
            "track_commit_timestamp": "on",
            "archive_mode": "on",
            "archive_command": "'"
            + archive_command_for(program=program, repo=str(repo)).replace("'", "''")
            + "'",
        },
    )
    src: Source | None = None
    pgbench: subprocess.Popen[bytes] | None = None
    try:
        cluster.init_repository(program, repo)
        cluster.start()
        sock, port = str(cluster.sockdir), str(cluster.port)
        pgbench_argv = [cluster.bin("pgbench"), "-h", sock, "-p", port, "-U", "postgres"]
        run_as_postgres([*pgbench_argv, "-i", "-q", "-s", "1", "postgres"])
        cluster.sql("CREATE TABLE marker (id int PRIMARY KEY)")
        switch_and_archive(cluster)
        bench = [*pgbench_argv, "-n", "-c", "2", "-j", "1", "-R", "20", "-T", "300", "postgres"]
        pgbench = subprocess.Popen(
            ["runuser", "-u", "postgres", "--", *bench] if os.geteuid() == 0 else bench,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd="/",
            start_new_session=True,
        )
        writer = MarkerWriter(cluster)
        writer.start()
        while len(writer.markers) < 2:
            time.sleep(0.1)
        result = run_tasks(
            [
                {
                    "name": "take the base backup",
                    "pitr.postgresql.base_backup": {
                        **cluster.module_params,
                        "repository_path": str(repo),
                    },
                    "become": True,
                    "become_user": "postgres",
                }
            ]
        )
        assert not result[-1].failed, result[-1].result
        backup = catalog.list_backups(Repository.open_posix(str(repo)))[0]
        stop = datetime.fromisoformat(backup.stop_time)
        while sum(m.commit_time > stop for m in writer.markers) < 6:
            time.sleep(0.1)
        writer.restore_point_at = len(writer.markers) + 1
        writer.stop_after = (
            len([m for m in writer.markers if m.commit_time <= stop]) + MARKERS_AFTER_BACKUP
        )
        writer.join(timeout=60)
        assert writer.error is None, writer.error
        os.killpg(pgbench.pid, signal.SIGINT)
        pgbench.wait(timeout=30)
        switch_and_archive(cluster)
        assert writer.restore_point_done is not None
        src = Source(
            cluster, base, repo, base / "prefix", writer.markers, writer.restore_point_done, backup
        )
        assert len(src.after_backup()) >= MARKERS_AFTER_BACKUP - 1
        yield src
    finally:
        if pgbench is not None and pgbench.poll() is None:
            os.killpg(pgbench.pid, signal.SIGKILL)
        for path in list(base.glob("clones/*")) + list(base.glob("pitr-pg-*/data*")):
            if (path / "postmaster.pid").exists():
                subprocess.run(
                    [
                        "runuser",
                        "-u",
                        "postgres",
                        "--",
                        cluster.bin("pg_ctl"),
                        "stop",
                        "-D",
                        str(path),
                        "-m",
                        "immediate",
                    ],
                    capture_output=True,
                    check=False,
                    cwd="/",
                )
        cluster.destroy()
        shutil.rmtree(base, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Running the role on several "hosts" at once


@dataclass
class HostRun:
    name: str
    tasks: list[tuple[str, dict[str, t.Any]]]
    stats: dict[str, t.Any]

    @property
    def failed(self) -> bool:
        return bool(self.stats.get("failures")) or bool(self.stats.get("unreachable"))

    @property
    def failure(self) -> dict[str, t.Any]:
        for _name, result in reversed(self.tasks):
            if result.get("failed"):
                return result
        return {}

    def task(self, prefix: str) -> dict[str, t.Any]:
        found = [r for n, r in self.tasks if n.startswith(prefix) and not r.get("skipped")]
        assert found, f"{self.name}: no task {prefix!r} ran: {[task[0] for task in self.tasks]}"
        return found[-1]

    @property
    def plan(self) -> dict[str, t.Any]:
        return self.task("plan | Plan the restore")

    @property
    def result(self) -> dict[str, t.Any]:
        return dict(self.task("report | Settle the result")["ansible_facts"]["pitr_restore_result"])

    @property
    def changed_tasks(self) -> list[str]:
        return [n for n, r in self.tasks if r.get("changed")]


def run_restores(
    hosts: dict[str, dict[str, t.Any]],
    *,
    check: bool = False,
    playbook: str | None = None,
    extra_vars: dict[str, t.Any] | None = None,
    timeout: float = 600,
) -> dict[str, HostRun]:
    """Run the role (or a playbook) once for all ``hosts``; return what happened per host."""
    workdir = Path(tempfile.mkdtemp(prefix="pitr-rs-play-"))
    try:
        inventory = {
            "postgresql": {
                "hosts": {
                    name: {
                        "ansible_connection": "local",
                        "ansible_python_interpreter": sys.executable,
                        **host_vars,
                    }
                    for name, host_vars in hosts.items()
                }
            }
        }
        (workdir / "inventory.json").write_text(json.dumps(inventory), encoding="utf-8")
        if playbook is None:
            play = [
                {
                    "name": "restore",
                    "hosts": "postgresql",
                    "gather_facts": False,
                    "roles": [{"role": "pitr.postgresql.pitr_restore"}],
                }
            ]
            (workdir / "playbook.json").write_text(json.dumps(play), encoding="utf-8")
            playbook = str(workdir / "playbook.json")
        argv = [
            str(Path(sys.executable).parent / "ansible-playbook"),
            "-i",
            str(workdir / "inventory.json"),
            playbook,
        ]
        if check:
            argv.append("--check")
        if extra_vars:
            argv += ["-e", json.dumps(extra_vars)]
        env = _environment({"ANSIBLE_FORKS": str(len(hosts)), "ANSIBLE_PIPELINING": "1"})
        proc = subprocess.run(
            argv, cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout, check=False
        )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    try:
        report = json.loads(proc.stdout)
    except json.JSONDecodeError as exc:
        raise AssertionError(
            f"ansible-playbook exited {proc.returncode} without a JSON report\n"
            f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        ) from exc
    runs = {name: HostRun(name, [], report.get("stats", {}).get(name, {})) for name in hosts}
    for play in report.get("plays", []):
        for task in play.get("tasks", []):
            for name, result in task.get("hosts", {}).items():
                # "pitr.postgresql.pitr_restore : plan | ..." -> "plan | ..."
                runs[name].tasks.append((task["task"]["name"].split(" : ", 1)[-1], result))
    return runs


def marker_ids(port: int, sockdir: Path) -> list[int]:
    with psycopg.connect(
        host=str(sockdir), port=port, user="postgres", dbname="postgres", autocommit=True
    ) as conn:
        return [r[0] for r in conn.execute("SELECT id FROM marker ORDER BY id").fetchall()]


def scalar(port: int, sockdir: Path, query: str) -> t.Any:
    with psycopg.connect(
        host=str(sockdir), port=port, user="postgres", dbname="postgres", autocommit=True
    ) as conn:
        return conn.execute(query).fetchone()[0]


def state_file(data_dir: str | Path) -> dict[str, t.Any]:
    return json.loads(Path(data_dir, "pitr_restore.json").read_text(encoding="utf-8"))


def beside(path: Path) -> list[str]:
    """Names next to ``path`` that the restore would create (staging, old data dirs)."""
    return sorted(p.name for p in path.parent.iterdir() if p.name.startswith(path.name + "."))


def copy_repository(source: Source, name: str) -> Path:
    copy = source.base / name
    subprocess.run(["cp", "-a", str(source.repo), str(copy)], check=True)
    return copy


def segment_after_backup(source: Source, marker: Marker) -> str:
    """The archived segment holding ``marker``'s commit (after the backup's own WAL)."""
    name = segment_for_lsn(1, marker.lsn_after - 1)
    assert name > source.backup.stop_wal
    return name


# --------------------------------------------------------------------------------------------
# Planning: check mode and refusals change nothing


def test_check_mode_shows_the_plan_and_changes_nothing(source: Source) -> None:
    cluster = source.cluster
    pid = (cluster.datadir / "postmaster.pid").read_text()
    gap_repo = copy_repository(source, "repo-gap-check")
    late = source.marker(9)
    missing = segment_after_backup(source, late)
    (gap_repo / wal_key(missing)).unlink()
    target = source.marker(4)
    runs = run_restores(
        {
            "in-place": source.in_place_vars(pitr_restore_target_time=utc_text(target.commit_time)),
            "before-gap": source.clone_vars(
                "check-gap",
                pitr_repository_path=str(gap_repo),
                pitr_restore_target_time=utc_text(target.commit_time),
            ),
        },
        check=True,
    )
    for run in runs.values():
        assert not run.failed, run.failure
        assert run.changed_tasks == [], run.changed_tasks
    plan = runs["in-place"].plan
    assert plan["decision"] == "restore"
    assert plan["backup"]["label"] == source.backup.label
    assert plan["data_dir"]["running"] is True
    assert plan["data_dir"]["old_data_dir"].startswith(f"{cluster.datadir}.pitr-old-")
    assert plan["steps"][0].startswith("stop PostgreSQL")
    assert plan["settings"]["recovery_target_time"] == utc_text(target.commit_time)
    assert plan["wal"]["last_is_exact"] is True
    # Replay stops at the first commit after the target: at the latest the next marker's.
    assert segment_for_lsn(1, target.lsn_after - 1) <= plan["wal"]["last"]
    assert plan["wal"]["last"] <= segment_for_lsn(1, source.marker(5).lsn_after)
    # Before the gap the target is reachable: the plan does not need the missing segment.
    gap_plan = runs["before-gap"].plan
    assert gap_plan["wal"]["last"] < missing
    # Nothing changed: the same server runs, nothing was created beside the data directories.
    assert (cluster.datadir / "postmaster.pid").read_text() == pid
    assert beside(cluster.datadir) == []
    assert not (cluster.datadir / "pitr_restore.json").exists()
    assert not (source.base / "clones" / "check-gap").exists()
    assert beside(source.base / "clones" / "check-gap") == []


def test_unreachable_targets_are_refused_before_anything_changes(source: Source) -> None:
    cluster = source.cluster
    pid_file = (cluster.datadir / "postmaster.pid").read_text()
    gap_repo = copy_repository(source, "repo-gap")
    gap_marker = source.marker(6)
    missing = segment_after_backup(source, gap_marker)
    (gap_repo / wal_key(missing)).unlink()
    # A pitr-wal from before --prefetch (as the last release's parse_args answers it).
    old_prefix = source.base / "old-prefix"
    (old_prefix / "bin").mkdir(parents=True, exist_ok=True)
    (old_prefix / "bin" / "pitr-wal").write_text(
        "import sys\n"
        "if '--prefetch' in sys.argv:\n"
        "    sys.stderr.write('pitr-wal: unknown option --prefetch\\n')\n"
        "    sys.exit(2)\n"
    )
    runs = run_restores(
        {
            "after-end": source.in_place_vars(
                pitr_restore_target_time=utc_text(datetime.now(UTC) + timedelta(hours=1))
            ),
            "before-backup": source.clone_vars(
                "refused-before",
                pitr_restore_target_time=utc_text(
                    datetime.fromisoformat(source.backup.start_time) - timedelta(seconds=30)
                ),
            ),
            "gap": source.clone_vars(
                "refused-gap",
                pitr_repository_path=str(gap_repo),
                pitr_restore_target_time=utc_text(source.marker(9).commit_time),
            ),
            "naive-time": source.clone_vars(
                "refused-naive", pitr_restore_target_time="2026-11-25 10:30:00"
            ),
            "abbreviation": source.clone_vars(
                "refused-abbrev", pitr_restore_target_time="2026-11-25 10:30:00 CET"
            ),
            "two-targets": source.clone_vars(
                "refused-two", pitr_restore_target_xid="1000", pitr_restore_target="latest"
            ),
            "old-pitr-wal": source.clone_vars(
                "refused-old-pitr-wal",
                pitr_install_prefix=str(old_prefix),
                pitr_restore_target_time=utc_text(source.marker(9).commit_time),
            ),
            "no-pitr-wal": source.clone_vars(
                "refused-no-pitr-wal",
                pitr_install_prefix=str(source.base / "not-installed"),
                pitr_restore_target_time=utc_text(source.marker(9).commit_time),
            ),
        }
    )
    for run in runs.values():
        assert run.failed, run.name
        assert run.changed_tasks == [], (run.name, run.changed_tasks)
    after = runs["after-end"].failure
    assert after["reason"] == "after_archive_end", after["msg"]
    assert "after the end of the archived WAL" in after["msg"]
    assert after["window"]["earliest_time"] == source.backup.stop_time
    assert after["window"]["latest_commit_time"]
    assert any(n.get("target_time") for n in after["nearest_targets"])
    before = runs["before-backup"].failure
    assert before["reason"] == "before_oldest_backup"
    assert f"oldest usable backup ({source.backup.label}" in before["msg"]
    assert before["nearest_targets"][0]["after_time"] == source.backup.stop_time
    gap = runs["gap"].failure
    assert gap["reason"] == "wal_gap"
    assert gap["gap"] == [missing]
    assert f"WAL segment {missing} is missing from the archive" in gap["msg"]
    assert "no time zone" in runs["naive-time"].failure["msg"]
    assert "2026-11-25 10:30:00+00" in runs["naive-time"].failure["msg"]
    assert "abbreviation" in runs["abbreviation"].failure["msg"]
    assert "exactly one recovery target" in runs["two-targets"].failure["msg"]
    old_pitr_wal = runs["old-pitr-wal"].failure["msg"]
    assert "does not know --prefetch" in old_pitr_wal, old_pitr_wal
    assert "pitr_restore_wal_prefetch=0" in old_pitr_wal
    no_pitr_wal = runs["no-pitr-wal"].failure["msg"]
    assert f"{source.base / 'not-installed'}/bin/pitr-wal is missing" in no_pitr_wal
    assert "playbooks/install_host_command.yml" in no_pitr_wal
    # The running source was not touched; no clone directory was made.
    assert (cluster.datadir / "postmaster.pid").read_text() == pid_file
    assert beside(cluster.datadir) == []
    assert sorted(p.name for p in (source.base / "clones").iterdir()) == []


# --------------------------------------------------------------------------------------------
# Many restores in one run


@pytest.fixture(scope="module")
def restores(source: Source) -> dict[str, t.Any]:
    m = source.marker
    corrupt_repo = copy_repository(source, "repo-corrupt")
    corrupt_segment = segment_after_backup(source, m(5))
    obj = corrupt_repo / wal_key(corrupt_segment)
    data = bytearray(obj.read_bytes())
    data[-100] ^= 0xFF  # a flipped bit in the compressed payload: the checksum fails
    obj.write_bytes(bytes(data))
    # A clone directory that already holds data (same cluster): moved aside, never deleted.
    occupied = source.base / "clones" / "corrupt"
    (occupied / "global").mkdir(parents=True)
    shutil.copy2(source.cluster.datadir / "global" / "pg_control", occupied / "global")
    (occupied / "precious.txt").write_text("keep me\n")
    subprocess.run(["chown", "-R", "postgres:postgres", str(occupied)], check=True)

    def mid(a: Marker, b: Marker) -> datetime:
        return a.commit_time + (b.commit_time - a.commit_time) / 2

    berlin = m(3).commit_time.astimezone(ZoneInfo("Europe/Berlin"))
    hosts = {
        "time-between-incl": {"pitr_restore_target_time": utc_text(mid(m(2), m(3)))},
        "time-exact-incl": {"pitr_restore_target_time": utc_text(m(4).commit_time)},
        "time-exact-excl": {
            "pitr_restore_target_time": utc_text(m(4).commit_time),
            "pitr_restore_target_inclusive": False,
        },
        "time-between-excl": {
            "pitr_restore_target_time": utc_text(mid(m(6), m(7))),
            "pitr_restore_target_inclusive": False,
        },
        "time-zone-name": {
            "pitr_restore_target_time": berlin.strftime("%Y-%m-%d %H:%M:%S.%f") + " Europe/Berlin"
        },
        "lsn": {"pitr_restore_target_lsn": lsn_text(m(5).lsn_after)},
        "xid-excl": {
            "pitr_restore_target_xid": str(m(8).xid),
            "pitr_restore_target_inclusive": False,
        },
        "name": {"pitr_restore_target_name": RESTORE_POINT},
        "immediate": {"pitr_restore_target": "immediate"},
        "corrupt": {
            "pitr_repository_path": str(corrupt_repo),
            "pitr_restore_target_xid": str(m(9).xid),
        },
        "pause": {
            "pitr_restore_target_time": utc_text(m(6).commit_time),
            "pitr_restore_target_action": "pause",
        },
        "interrupted": {
            "pitr_restore_target_time": utc_text(m(5).commit_time),
            # The server cannot start: the restore stops after putting the data in place.
            "pitr_restore_pg_ctl_options": "-c shared_buffers=nonsense",
        },
    }
    host_vars = {name: source.clone_vars(name, **v) for name, v in hosts.items()}
    runs = run_restores(host_vars)
    return {
        "runs": runs,
        "vars": host_vars,
        "corrupt_segment": corrupt_segment,
        "occupied": occupied,
    }


def check_clone(source: Source, restores: dict[str, t.Any], name: str) -> list[int]:
    run: HostRun = restores["runs"][name]
    assert not run.failed, (name, run.failure.get("msg"))
    v = restores["vars"][name]
    result = run.result
    assert result["phase"] == "completed"
    assert result["backup"] == source.backup.label
    assert int(result["timeline"]) == 2
    state = state_file(v["pitr_restore_data_dir"])
    assert state["phase"] == "completed"
    port = int(v["pitr_restore_clone_port"])
    assert scalar(port, source.cluster.sockdir, "SELECT pg_is_in_recovery()") is False
    # A clone never archives into the production archive, and its recovery settings are gone.
    assert scalar(port, source.cluster.sockdir, "SHOW archive_mode") == "off"
    auto = Path(v["pitr_restore_data_dir"], "postgresql.auto.conf").read_text()
    assert "recovery_target" not in auto and "restore_command" not in auto
    # The role watched the start through postmaster.pid: no refused connection in the log.
    log = Path(v["pitr_restore_data_dir"] + ".pitr-restore.log").read_text(errors="replace")
    assert "not yet accepting connections" not in log
    assert "the database system is starting up" not in log
    # The WAL prefetch spool (pitr_restore_wal_prefetch, on by default) went with the restore.
    assert not Path(v["pitr_restore_data_dir"], "pg_wal", "pitr-prefetch").exists()
    return marker_ids(port, source.cluster.sockdir)


# Host -> (which markers it must hold, relative to the n-th marker after the backup).
EXPECTED = {
    "time-between-incl": ("committed at or before", 2),  # target between markers 2 and 3
    "time-exact-incl": ("committed at or before", 4),  # target = marker 4's commit time
    "time-exact-excl": ("committed before", 4),
    "time-between-excl": ("committed at or before", 6),  # between markers 6 and 7
    "time-zone-name": ("committed at or before", 3),  # marker 3's time in Europe/Berlin
    "lsn": ("up to", 5),  # the WAL position right after marker 5's commit
    "xid-excl": ("before", 8),  # marker 8's transaction, exclusive
    "name": ("up to the restore point", 0),
}


def expected_ids(source: Source, rule: str, n: int) -> list[int]:
    if rule == "up to the restore point":
        return ids_up_to(source, lambda x: x.id <= source.restore_point_after)
    ref = source.marker(n)
    tests: dict[str, t.Callable[[Marker], bool]] = {
        "committed at or before": lambda x: x.commit_time <= ref.commit_time,
        "committed before": lambda x: x.commit_time < ref.commit_time,
        "up to": lambda x: x.id <= ref.id,
        "before": lambda x: x.id < ref.id,
    }
    return ids_up_to(source, tests[rule])


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_restore_recovers_exactly_the_markers_before_the_target(
    source: Source, restores: dict[str, t.Any], name: str
) -> None:
    want = expected_ids(source, *EXPECTED[name])
    assert want and want[-1] < source.markers[-1].id  # a real cut, not everything
    assert check_clone(source, restores, name) == want


def test_a_copy_into_a_new_directory_is_started_by_the_staging_call(
    restores: dict[str, t.Any],
) -> None:
    # With pg_ctl, the staging call that puts a copy into a new directory in place also starts
    # the server, which replays while the next tasks run; the follow calls only watch it.
    for name in EXPECTED:
        run: HostRun = restores["runs"][name]
        staged = run.task("stage | Lay the backup down")
        assert staged["swapped"] is True, name
        cmd = staged["started"]["cmd"]
        assert cmd[1] == "start" and "--no-wait" in cmd, (name, cmd)
        follows = [
            r for n, r in run.tasks if n.startswith("follow | Follow") and not r.get("skipped")
        ]
        assert follows and all("cmd" not in r for r in follows), (name, follows)
    # Where a directory was (an occupied clone directory), the staging call does not start
    # anything: the swap moves the directory aside first, then the follow step starts it.
    corrupt: HostRun = restores["runs"]["corrupt"]
    staged = corrupt.task("stage | Lay the backup down")
    assert staged["swapped"] is False and "started" not in staged
    assert corrupt.task("swap | Put the restored data directory in place")["changed"] is True


def test_exclusive_and_inclusive_differ_by_the_marker_at_the_target(
    source: Source, restores: dict[str, t.Any]
) -> None:
    incl = check_clone(source, restores, "time-exact-incl")
    excl = check_clone(source, restores, "time-exact-excl")
    assert incl == [*excl, source.marker(4).id]
    stop = restores["runs"]["time-exact-excl"].result["stop_point"]
    assert f"transaction {source.marker(4).xid}" in stop


def test_immediate_stops_at_the_end_of_the_backup(
    source: Source, restores: dict[str, t.Any]
) -> None:
    got = check_clone(source, restores, "immediate")
    stop_lsn = parse_lsn(source.backup.stop_lsn)
    stop_time = datetime.fromisoformat(source.backup.stop_time)
    # Every marker whose commit was written before the backup's end is there, none after it.
    assert set(got) >= {m.id for m in source.markers if m.lsn_after <= stop_lsn}
    assert set(got) <= {m.id for m in source.markers if m.commit_time <= stop_time}
    assert got == list(range(1, len(got) + 1))


def test_corrupted_segment_stops_recovery_without_promotion(
    source: Source, restores: dict[str, t.Any]
) -> None:
    run: HostRun = restores["runs"]["corrupt"]
    assert run.failed
    msg = run.failure["msg"]
    assert "Recovery failed" in msg, msg
    assert "Nothing was promoted" in msg
    assert restores["corrupt_segment"] in msg  # the pitr-wal / FATAL lines name it
    data_dir = Path(restores["vars"]["corrupt"]["pitr_restore_data_dir"])
    assert not (data_dir / "postmaster.pid").exists()
    assert (data_dir / "recovery.signal").exists()
    assert state_file(data_dir)["phase"] == "failed"
    control = subprocess.run(
        [f"{DEFAULT_BINDIR}/pg_controldata", str(data_dir)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "in archive recovery" in control
    assert "Latest checkpoint's TimeLineID:       1" in control
    # The directory that was there is kept, intact, beside it.
    old = [p for p in data_dir.parent.iterdir() if p.name.startswith("corrupt.pitr-old-")]
    assert len(old) == 1
    assert (old[0] / "precious.txt").read_text() == "keep me\n"
    assert state_file(data_dir)["old_data_dir"] == str(old[0])


def test_interrupted_restore_never_starts_as_if_nothing_happened_and_resumes(
    source: Source, restores: dict[str, t.Any]
) -> None:
    run: HostRun = restores["runs"]["interrupted"]
    assert run.failed
    v = dict(restores["vars"]["interrupted"])
    data_dir = Path(v["pitr_restore_data_dir"])
    assert (data_dir / "recovery.signal").exists()
    assert "recovery_target_time" in (data_dir / "postgresql.auto.conf").read_text()
    # The restore left paused for inspection: read-only, at the target.
    paused = restores["vars"]["pause"]
    paused_port = int(paused["pitr_restore_clone_port"])
    want_paused = ids_up_to(source, lambda x: x.commit_time <= source.marker(6).commit_time)
    assert not restores["runs"]["pause"].failed, restores["runs"]["pause"].failure.get("msg")
    assert restores["runs"]["pause"].result["phase"] == "paused"
    assert scalar(paused_port, source.cluster.sockdir, "SELECT pg_is_in_recovery()") is True
    assert marker_ids(paused_port, source.cluster.sockdir) == want_paused
    # The paused one keeps its restore lease (promoting it reads WAL again), taken by the
    # staging step (root) and handed to the repository's owner like the rest of it.
    (lease,) = [
        x
        for x in held_leases(source.repo, restores)
        if x.data_dir == paused["pitr_restore_data_dir"]
    ]
    assert lease.backup_label == source.backup.label
    assert lease.first_segment and lease.timeline == 1
    lease_file = source.repo / restore_lease.lease_key(lease.lease_id)
    assert lease_file.stat().st_uid == source.repo.stat().st_uid != 0
    assert lease_file.parent.stat().st_uid == source.repo.stat().st_uid
    # Run again: the interrupted one fixed, the paused one now to be promoted, and a finished
    # restore that must not change.
    del v["pitr_restore_pg_ctl_options"]
    again = run_restores(
        {
            "interrupted": v,
            "pause": {**paused, "pitr_restore_target_action": "promote"},
            "time-exact-incl": restores["vars"]["time-exact-incl"],
        }
    )
    promoted = again["pause"]
    assert not promoted.failed, promoted.failure.get("msg")
    assert restore_lease.get(Repository.open_posix(str(source.repo)), lease.lease_id) is None
    assert promoted.plan["decision"] == "resume"
    assert promoted.result["phase"] == "completed"
    assert scalar(paused_port, source.cluster.sockdir, "SELECT pg_is_in_recovery()") is False
    assert marker_ids(paused_port, source.cluster.sockdir) == want_paused
    assert (
        "recovery_target"
        not in Path(paused["pitr_restore_data_dir"], "postgresql.auto.conf").read_text()
    )
    resumed = again["interrupted"]
    assert not resumed.failed, resumed.failure.get("msg")
    assert resumed.plan["decision"] == "resume"
    assert not any(n.startswith("stage |") for n in resumed.changed_tasks)
    port = int(v["pitr_restore_clone_port"])
    want = ids_up_to(source, lambda x: x.commit_time <= source.marker(5).commit_time)
    assert marker_ids(port, source.cluster.sockdir) == want
    unchanged = again["time-exact-incl"]
    assert not unchanged.failed
    assert unchanged.plan["decision"] == "none"
    assert unchanged.changed_tasks == []


def test_promoted_clones_replayed_prefetched_wal_and_left_no_prefetcher(
    source: Source, restores: dict[str, t.Any]
) -> None:
    # restore_command is pitr-wal fetch --prefetch 8 (the role's default): the server log of a
    # clone that replayed several segments shows segments served from the spool.
    served = {}
    for name in EXPECTED:
        log = Path(restores["vars"][name]["pitr_restore_data_dir"] + ".pitr-restore.log")
        served[name] = log.read_text(errors="replace").count("from prefetch in")
    assert sum(served.values()) > 0, served
    assert served["time-between-excl"] > 0, served
    # No prefetcher outlives its restore (each finished one discarded its spool).
    left = subprocess.run(
        ["pgrep", "-f", f"pitr-wal --repo {source.repo} .*--prefetch"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert left.stdout.strip() == "", left.stdout


def held_leases(repo: Path, restores: dict[str, t.Any]) -> list[restore_lease.Lease]:
    """The restore leases in ``repo`` taken by the fixture's restores (by data directory)."""
    dirs = {v["pitr_restore_data_dir"] for v in restores["vars"].values()}
    leases, unreadable = restore_lease.scan(Repository.open_posix(str(repo)))
    assert unreadable == []
    return [x for x in leases if x.data_dir in dirs]


def test_restore_leases_are_dropped_once_promoted_or_failed(
    source: Source, restores: dict[str, t.Any]
) -> None:
    # Every restore took a lease on its backup before laying it down (a retention prune keeps
    # what a restore reads): recorded in its state file, dropped once promoted or failed. (The
    # paused one keeps it: test_interrupted_restore_never_starts_as_if_nothing_happened_...)
    for name in ("time-exact-incl", "immediate", "interrupted"):
        lease = state_file(restores["vars"][name]["pitr_restore_data_dir"]).get("lease")
        assert lease and lease["repository"] == str(source.repo), (name, lease)
    paused = restores["vars"]["pause"]["pitr_restore_data_dir"]
    held = [x.data_dir for x in held_leases(source.repo, restores) if x.data_dir != paused]
    assert held == []
    corrupt_repo = Path(restores["vars"]["corrupt"]["pitr_repository_path"])
    assert held_leases(corrupt_repo, restores) == []


# --------------------------------------------------------------------------------------------
# In place, then back to the original timeline


def test_in_place_restore_then_a_point_on_the_original_timeline(source: Source) -> None:
    cluster = source.cluster
    target = source.marker(3)
    old_pid = (cluster.datadir / "postmaster.pid").read_text().split()[0]
    host = {"source": source.in_place_vars()}
    extra = {"target_time": utc_text(target.commit_time)}
    first = run_restores(host, playbook="pitr.postgresql.pitr_restore", extra_vars=extra)
    run = first["source"]
    assert not run.failed, run.failure.get("msg")
    result = run.result
    assert result["phase"] == "completed" and int(result["timeline"]) == 2
    assert result["history_archived"] is True
    # The running server was stopped and its data directory kept aside, complete.
    old = Path(result["old_data_dir"])
    assert old.parent == cluster.datadir.parent and old.name.startswith("data.pitr-old-")
    assert (old / "PG_VERSION").exists() and (old / "global" / "pg_control").exists()
    assert not (old / "postmaster.pid").exists()
    new_pid = (cluster.datadir / "postmaster.pid").read_text().split()[0]
    assert new_pid != old_pid
    want = ids_up_to(source, lambda x: x.commit_time <= target.commit_time)
    assert marker_ids(cluster.port, cluster.sockdir) == want
    assert (source.repo / wal_key("00000002.history")).exists()
    # The production archive keeps going on the new timeline.
    assert cluster.show("archive_mode") == "on"
    cluster.sql("INSERT INTO marker VALUES (1000)")
    segment = switch_and_archive(cluster)
    assert segment.startswith("00000002")

    # The same command again changes nothing.
    again = run_restores(host, playbook="pitr.postgresql.pitr_restore", extra_vars=extra)
    assert not again["source"].failed
    assert again["source"].plan["decision"] == "none"
    assert again["source"].changed_tasks == []

    # A later point on the original timeline 1 (which the in-place restore left behind) and the
    # same point along the newest timeline, where timeline 2 begins after marker 3.
    later = source.marker(8)
    runs = run_restores(
        {
            "timeline-1": source.clone_vars(
                "timeline-1",
                pitr_restore_target_time=utc_text(later.commit_time),
                pitr_restore_target_timeline="1",
            ),
            "timeline-latest": source.clone_vars(
                "timeline-latest", pitr_restore_target_time=utc_text(later.commit_time)
            ),
        }
    )
    t1, tl = runs["timeline-1"], runs["timeline-latest"]
    assert not t1.failed, t1.failure.get("msg")
    assert not tl.failed, tl.failure.get("msg")
    assert t1.plan["timeline"]["resolved"] == 1
    assert tl.plan["timeline"]["resolved"] == 2
    ids_t1 = marker_ids(int(t1.plan["clone_settings"]["port"]), cluster.sockdir)
    ids_tl = marker_ids(int(tl.plan["clone_settings"]["port"]), cluster.sockdir)
    assert ids_t1 == ids_up_to(source, lambda x: x.commit_time <= later.commit_time)
    assert ids_tl == want
    # Promoting a clone from timeline 1 picks a timeline number no other history uses.
    assert int(t1.result["timeline"]) == 3


# --------------------------------------------------------------------------------------------
# A clone of a cluster laid out as Debian does: configuration outside the data directory


def test_clone_of_a_cluster_configured_outside_its_data_directory() -> None:
    """pg_ctl can start the copy; a start that fails is reported in the server's own words."""
    base = Path(tempfile.mkdtemp(prefix="pitr-rs-debian-"))
    give_to_server_user(base)
    repo = base / "repo"
    repo.mkdir()
    give_to_server_user(repo)
    (base / "clones").mkdir()
    give_to_server_user(base / "clones")
    owner = "postgres" if os.geteuid() == 0 else None
    program = install_host_command(base / "prefix", owner=owner)
    cluster = PgCluster.create(
        parent=str(base),
        conf={
            "wal_level": "replica",
            "max_wal_senders": "4",
            "archive_mode": "on",
            "archive_command": "'"
            + archive_command_for(program=program, repo=str(repo)).replace("'", "''")
            + "'",
        },
    )
    # As /etc/postgresql/MAJOR/main: the three files live in a directory of their own, and
    # postgresql.conf names the data directory and the other two.
    etc = cluster.basedir / "etc"
    etc.mkdir()
    for name in ("postgresql.conf", "pg_hba.conf", "pg_ident.conf"):
        shutil.move(str(cluster.datadir / name), str(etc / name))
    with (etc / "postgresql.conf").open("a", encoding="utf-8") as fh:
        fh.write(
            f"data_directory = '{cluster.datadir}'\n"
            f"hba_file = '{etc / 'pg_hba.conf'}'\nident_file = '{etc / 'pg_ident.conf'}'\n"
        )
    give_to_server_user(etc)
    subprocess.run(["chown", "-R", "postgres:postgres", str(etc)], check=True)
    clones: list[Path] = []
    try:
        cluster.init_repository(program, repo)
        run_as_postgres(
            [cluster.bin("pg_ctl"), "start", "-w", "-t", "60", "-D", str(etc),
             "-l", str(cluster.logfile)]
        )  # fmt: skip
        assert not (cluster.datadir / "postgresql.conf").exists()
        cluster.sql("CREATE TABLE marker (id int PRIMARY KEY)")
        cluster.sql("INSERT INTO marker VALUES (1), (2)")
        result = run_tasks(
            [
                {
                    "name": "take the base backup",
                    "pitr.postgresql.base_backup": {
                        **cluster.module_params,
                        "repository_path": str(repo),
                    },
                    "become": True,
                    "become_user": "postgres",
                }
            ]
        )
        assert not result[-1].failed, result[-1].result
        common = {
            "pitr_repository_path": str(repo),
            "pitr_install_prefix": str(base / "prefix"),
            "pitr_restore_pg_bindir": DEFAULT_BINDIR,
            "pitr_restore_service_manager": "pg_ctl",
            "pitr_restore_login_unix_socket": str(cluster.sockdir),
            # The copy's sockets go where the test connects (Debian's default is
            # /var/run/postgresql).
            "pitr_restore_pg_ctl_options": f"-k {cluster.sockdir}",
            "pitr_restore_progress_interval": 2,
            "pitr_restore_recovery_timeout": 180,
            "pitr_restore_target": "immediate",
            "pitr_restore_clone": True,
        }
        hosts = {}
        for name in ("copy", "bad-config"):
            clones.append(base / "clones" / name)
            hosts[name] = {
                **common,
                "pitr_restore_clone_port": free_port(),
                "pitr_restore_data_dir": str(clones[-1]),
            }
        # A start that cannot work: the server says why on stderr, without a FATAL prefix.
        missing = base / "nowhere" / "postgresql.conf"
        hosts["bad-config"]["pitr_restore_pg_ctl_options"] += f" -c config_file={missing}"
        source_conf = (etc / "postgresql.conf").read_text(encoding="utf-8")
        runs = run_restores(hosts)

        copy = runs["copy"]
        assert not copy.failed, copy.failure.get("msg")
        assert copy.result["phase"] == "completed"
        port = int(hosts["copy"]["pitr_restore_clone_port"])

        def on_copy(query: str) -> str:
            # The copy's pg_hba.conf allows local connections by OS user name (peer).
            return run_as_postgres(
                [cluster.bin("psql"), "-h", str(cluster.sockdir), "-p", str(port), "-X", "-A",
                 "-t", "-d", "postgres", "-c", query]
            ).stdout.strip()  # fmt: skip

        assert on_copy("SELECT string_agg(id::text, ',' ORDER BY id) FROM marker") == "1,2"
        # Its own configuration, never the source's files.
        assert on_copy("SHOW config_file") == str(clones[0] / "postgresql.conf")
        assert on_copy("SHOW data_directory") == str(clones[0])
        assert on_copy("SHOW hba_file") == str(clones[0] / "pg_hba.conf")
        assert on_copy("SHOW archive_mode") == "off"
        on_copy("INSERT INTO marker VALUES (3)")
        assert on_copy("SELECT max(id) FROM marker") == "3"
        assert (etc / "postgresql.conf").read_text(encoding="utf-8") == source_conf

        bad = runs["bad-config"]
        assert bad.failed
        msg = bad.failure["msg"]
        assert "could not access the server configuration file" in msg, msg
        assert str(missing) in msg
        assert "without saying why" not in msg
        assert "Nothing was promoted" in msg
        assert state_file(clones[1])["phase"] == "failed"
    finally:
        for path in clones:
            if (path / "postmaster.pid").exists():
                subprocess.run(
                    ["runuser", "-u", "postgres", "--", cluster.bin("pg_ctl"), "stop", "-D",
                     str(path), "-m", "immediate"],
                    capture_output=True, check=False, cwd="/",
                )  # fmt: skip
        subprocess.run(
            ["runuser", "-u", "postgres", "--", cluster.bin("pg_ctl"), "stop", "-D", str(etc),
             "-m", "immediate"],
            capture_output=True, check=False, cwd="/",
        )  # fmt: skip
        cluster.destroy()
        shutil.rmtree(base, ignore_errors=True)

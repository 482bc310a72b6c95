# Copyright: contributors to pitr.postgresql
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Retention on real PostgreSQL 15: prune by window and by count across a timeline switch,
then restore the oldest kept backup to its earliest and to the latest point.

One source cluster for the whole file, archiving into a repository with the collection's own
pitr-wal. Marker rows are committed between the steps, so each restore can be checked for
exactly the markers it must hold:

    markers 1-3, backup b1, markers 4-6, backup b2, markers 7-9      (timeline 1)
    in-place restore (pitr_restore role) to just after marker 8 -> timeline 2
    markers 101-103, backup b3, markers 104-106                     (timeline 2)

The tests run in order, each on what the one before left: restore leases (on a copy of the
repository: a lease on b1 keeps it and its WAL from a prune that removes it without; expired
leases protect nothing and go); the retention module by recovery
window (check mode, prune, re-run; a copy of the repository is kept as it left it); the
retention role by count (check mode, prune); restores of the oldest backup each prune kept
(b2 from the copy, b3), to its end and to the latest point, in one run; the pitr-prune
command of the role's systemd unit; a deleted segment reported as a gap.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import typing as t
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import pytest
from ansible_runner import (
    TaskResult,
    _environment,
    collections_path,
    run_module,
    run_playbook_text,
    run_tasks,
)
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
    WalFileName,
    parse_lsn,
)
from tests.support.hostcmd_install import install_host_command  # noqa: E402

AS_ROOT = os.geteuid() == 0
SEG = 16 * 1024 * 1024
TL1_BEFORE_B1 = [1, 2, 3]
TL1_B1_B2 = [4, 5, 6]
TL1_AFTER_B2 = [7, 8, 9]
TL2_BEFORE_B3 = [101, 102, 103]
TL2_AFTER_B3 = [104, 105, 106]
# Seconds between the stop times of b2 and b3, so a window can start half-way between them.
B2_B3_MIN_GAP = 20


@dataclass
class World:
    cluster: PgCluster
    base: Path
    repo_path: Path
    prefix: Path
    b2_stop: dt.datetime
    b3_stop: dt.datetime
    clones: list[Path] = field(default_factory=list)

    @property
    def repo(self) -> Repository:
        return Repository.open_posix(str(self.repo_path))

    def backup(self, label: str) -> catalog.BackupRecord:
        rec = catalog.read_backup(self.repo, label)
        assert rec is not None, label
        return rec

    def labels(self) -> list[str]:
        return [r.label for r in catalog.list_backups(self.repo)]

    def wal_names(self) -> set[str]:
        return {w.name for w, _info in self.repo.list_wal()}

    def module_args(self, **extra: t.Any) -> dict[str, t.Any]:
        return {**self.cluster.module_params, "repository_path": str(self.repo_path), **extra}

    def restore_vars(self, name: str, repo: Path, **extra: t.Any) -> dict[str, t.Any]:
        data_dir = self.base / "clones" / name
        self.clones.append(data_dir)
        return {
            "pitr_repository_path": str(repo),
            "pitr_install_prefix": str(self.prefix),
            "pitr_restore_pg_bindir": DEFAULT_BINDIR,
            "pitr_restore_service_manager": "pg_ctl",
            "pitr_restore_login_unix_socket": str(self.cluster.sockdir),
            "pitr_restore_login_port": self.cluster.port,
            "pitr_restore_progress_interval": 2,
            "pitr_restore_recovery_timeout": 180,
            # Every step of the source ended with a WAL switch that reached the archive.
            "pitr_restore_switch_wal": False,
            "pitr_restore_clone": True,
            "pitr_restore_clone_port": free_port(),
            "pitr_restore_data_dir": str(data_dir),
            **extra,
        }


# --------------------------------------------------------------------------------------------
# Helpers


def as_postgres(argv: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *argv] if AS_ROOT else argv


def run_as_postgres(argv: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(as_postgres(argv), capture_output=True, text=True, check=check, cwd="/")


def switch_and_archive(cluster: PgCluster, timeout: float = 60) -> str:
    with cluster.connect() as conn:
        conn.execute("SELECT pg_logical_emit_message(false, 'test', 'switch')")
        segment = str(conn.execute("SELECT pg_walfile_name(pg_switch_wal())").fetchone()[0])
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        last = cluster.scalar("SELECT coalesce(last_archived_wal, '') FROM pg_stat_archiver")
        if last >= segment:
            return segment
        time.sleep(0.2)
    raise AssertionError(f"{segment} was not archived within {timeout}s")


def insert_markers(cluster: PgCluster, ids: t.Iterable[int]) -> str:
    """Commit one row per id; return the WAL position after the last commit."""
    with cluster.connect() as conn:
        for n in ids:
            conn.execute("INSERT INTO marker VALUES (%s)", (n,))
        return str(conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()[0])


def as_postgres_task(module: str, args: dict[str, t.Any], check: bool = False) -> TaskResult:
    """Run one module as the PostgreSQL user, as the roles do."""
    become = {"become": True, "become_user": "postgres"} if AS_ROOT else {}
    results = run_tasks([{"name": module, module: args, **become}], check=check)
    assert len(results) == 1, results
    return results[0]


def take_backup(cluster: PgCluster, repo_path: Path, label: str) -> None:
    args = {**cluster.module_params, "repository_path": str(repo_path), "label": label}
    result = as_postgres_task("pitr.postgresql.base_backup", args)
    assert not result.failed, result.result


def backup_file(rec: catalog.BackupRecord) -> str:
    """The name of the .backup file PostgreSQL archived for ``rec``."""
    return f"{rec.start_wal}.{parse_lsn(rec.start_lsn) % SEG:08X}.backup"


def run_role(
    role: str,
    hosts: dict[str, dict[str, t.Any]],
    *,
    check: bool = False,
    timeout: float = 600,
) -> dict[str, list[tuple[str, dict[str, t.Any]]]]:
    """Run ``role`` once on several local inventory hosts at once; task results per host."""
    workdir = Path(tempfile.mkdtemp(prefix="pitr-rt-play-"))
    try:
        inventory = {
            "all": {
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
        play = [{"name": role, "hosts": "all", "gather_facts": False, "roles": [role]}]
        (workdir / "playbook.json").write_text(json.dumps(play), encoding="utf-8")
        argv = [
            str(Path(sys.executable).parent / "ansible-playbook"),
            "-i",
            str(workdir / "inventory.json"),
            str(workdir / "playbook.json"),
        ]
        if check:
            argv.append("--check")
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
    runs: dict[str, list[tuple[str, dict[str, t.Any]]]] = {name: [] for name in hosts}
    for p in report.get("plays", []):
        for task in p.get("tasks", []):
            for name, result in task.get("hosts", {}).items():
                runs[name].append((task["task"]["name"].split(" : ", 1)[-1], result))
    return runs


def failure(tasks: list[tuple[str, dict[str, t.Any]]]) -> dict[str, t.Any]:
    for _name, result in reversed(tasks):
        if result.get("failed"):
            return result
    return {}


def task(tasks: list[tuple[str, dict[str, t.Any]]], prefix: str) -> dict[str, t.Any]:
    found = [r for n, r in tasks if n.startswith(prefix) and not r.get("skipped")]
    assert found, f"no task {prefix!r} ran: {[n for n, _result in tasks]}"
    return found[-1]


def markers_of_clone(world: World, host_vars: dict[str, t.Any]) -> list[int]:
    port = int(host_vars["pitr_restore_clone_port"])
    with psycopg.connect(
        host=str(world.cluster.sockdir), port=port, user="postgres", dbname="postgres"
    ) as conn:
        rows = conn.execute("SELECT id FROM marker ORDER BY id").fetchall()
    stop_clone(Path(host_vars["pitr_restore_data_dir"]))
    return [r[0] for r in rows]


def stop_clone(data_dir: Path) -> None:
    if (data_dir / "postmaster.pid").exists():
        run_as_postgres(
            [os.path.join(DEFAULT_BINDIR, "pg_ctl"), "stop", "-D", str(data_dir), "-m", "fast"],
            check=False,
        )


def restore_earliest_and_latest(
    world: World, cases: dict[str, tuple[Path, str]]
) -> dict[str, dict[str, list[int]]]:
    """Restore each (repository, backup label) to the backup's end (``immediate``) and to the
    end of the archive (``latest``), all in one run; the markers each copy holds."""
    hosts, labels = {}, {}
    for tag, (repo, label) in cases.items():
        for point, target in (("earliest", "immediate"), ("latest", "latest")):
            name = f"{tag}-{point}"
            labels[name] = label
            hosts[name] = world.restore_vars(
                name, repo, pitr_restore_backup_label=label, pitr_restore_target=target
            )
    runs = run_role("pitr.postgresql.pitr_restore", hosts)
    found: dict[str, dict[str, list[int]]] = {tag: {} for tag in cases}
    for name, tasks in runs.items():
        assert not failure(tasks), (name, failure(tasks).get("msg"))
        result = task(tasks, "report | Settle the result")["ansible_facts"]["pitr_restore_result"]
        assert result["phase"] == "completed", (name, result)
        assert result["backup"] == labels[name]
        tag, point = name.split("-", 1)
        found[tag][point] = markers_of_clone(world, hosts[name])
    return found


def files_below(root: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for fn in files:
            if "locks" in Path(dirpath).relative_to(root).parts:
                continue
            st = os.stat(os.path.join(dirpath, fn))
            out[os.path.relpath(os.path.join(dirpath, fn), root)] = (st.st_size, st.st_mtime_ns)
    return out


def retention(world: World, check: bool = False, **args: t.Any) -> dict[str, t.Any]:
    result = as_postgres_task("pitr.postgresql.retention", world.module_args(**args), check)
    assert not result.failed, result.result
    return result.result


def segno(name: str) -> int:
    return WalFileName.parse(name).segment_number(SEG)


# --------------------------------------------------------------------------------------------
# The source cluster and its history


@pytest.fixture(scope="module")
def world() -> t.Iterator[World]:
    base = Path(tempfile.mkdtemp(prefix="pitr-rt-"))
    give_to_server_user(base)
    repo = base / "repo"
    repo.mkdir()
    give_to_server_user(repo)
    (base / "clones").mkdir()
    give_to_server_user(base / "clones")
    owner = "postgres" if AS_ROOT else None
    program = install_host_command(base / "prefix", owner=owner)
    prune = base / "prefix" / "bin" / "pitr-prune"
    shutil.copy2(ROOT / "roles" / "retention" / "files" / "pitr-prune", prune)
    if owner:
        shutil.chown(prune, owner, owner)
    cluster = PgCluster.create(
        parent=str(base),
        conf={
            "wal_level": "replica",
            "max_wal_senders": "10",
            "archive_mode": "on",
            "archive_command": "'"
            + archive_command_for(program=program, repo=str(repo)).replace("'", "''")
            + "'",
        },
    )
    world: World | None = None
    try:
        cluster.init_repository(program, repo)
        cluster.start()
        cluster.sql("CREATE TABLE marker (id int PRIMARY KEY)")
        insert_markers(cluster, TL1_BEFORE_B1)
        switch_and_archive(cluster)
        take_backup(cluster, repo, "b1")
        insert_markers(cluster, TL1_B1_B2)
        switch_and_archive(cluster)
        take_backup(cluster, repo, "b2")
        insert_markers(cluster, TL1_AFTER_B2[:2])
        target_lsn = insert_markers(cluster, [])
        insert_markers(cluster, TL1_AFTER_B2[2:])
        switch_and_archive(cluster)
        # A restore in place to just after marker 8: the cluster continues on timeline 2.
        in_place = {
            "pitr_repository_path": str(repo),
            "pitr_install_prefix": str(base / "prefix"),
            "pitr_restore_pg_bindir": DEFAULT_BINDIR,
            "pitr_restore_service_manager": "pg_ctl",
            "pitr_restore_login_unix_socket": str(cluster.sockdir),
            "pitr_restore_login_port": cluster.port,
            "pitr_restore_progress_interval": 2,
            "pitr_restore_recovery_timeout": 180,
            "pitr_restore_data_dir": str(cluster.datadir),
            "pitr_restore_pg_ctl_log_file": str(cluster.logfile),
            "pitr_restore_target_lsn": target_lsn,
        }
        runs = run_role("pitr.postgresql.pitr_restore", {"source": in_place})
        assert not failure(runs["source"]), failure(runs["source"]).get("msg")
        assert (repo / wal_key("00000002.history")).exists()
        insert_markers(cluster, TL2_BEFORE_B3)
        switch_and_archive(cluster)
        # The window tests put a window's start half-way between b2's and b3's stop times and
        # need room on both sides; the restore above usually takes long enough, but not always.
        b2_rec = catalog.read_backup(Repository.open_posix(str(repo)), "b2")
        assert b2_rec is not None
        b2_stopped = dt.datetime.fromisoformat(b2_rec.stop_time)
        time.sleep(max(0.0, B2_B3_MIN_GAP - (dt.datetime.now(dt.UTC) - b2_stopped).total_seconds()))
        take_backup(cluster, repo, "b3")
        insert_markers(cluster, TL2_AFTER_B3)
        assert switch_and_archive(cluster).startswith("00000002")
        r = Repository.open_posix(str(repo))
        stops = {b.label: dt.datetime.fromisoformat(b.stop_time) for b in catalog.list_backups(r)}
        assert catalog.read_backup(r, "b3").timeline == 2  # type: ignore[union-attr]
        world = World(cluster, base, repo, base / "prefix", stops["b2"], stops["b3"])
        yield world
    finally:
        for path in list(base.glob("clones/*")):
            stop_clone(path)
        cluster.destroy()
        shutil.rmtree(base, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# By recovery window, with the module


def window_between_b2_and_b3(world: World) -> str:
    """A recovery window whose start lies half-way between b2's and b3's stop times."""
    middle = world.b2_stop + (world.b3_stop - world.b2_stop) / 2
    assert (world.b3_stop - world.b2_stop).total_seconds() >= B2_B3_MIN_GAP
    return f"{int((dt.datetime.now(dt.UTC) - middle).total_seconds())}s"


def take_lease(
    repo_path: Path, rec: catalog.BackupRecord, data_dir: str, **extra: t.Any
) -> restore_lease.Lease:
    """A restore lease on ``rec``, readable by the PostgreSQL user the prune runs as."""
    taken = restore_lease.take(
        Repository.open_posix(str(repo_path)),
        backup_label=rec.label,
        data_dir=data_dir,
        target="latest",
        first_segment=rec.start_wal,
        timeline=int(rec.timeline),
        **extra,
    )
    assert taken.lease is not None, taken.reason
    for path in (
        repo_path / "leases",
        repo_path / "leases" / "restore",
        repo_path / taken.lease.key,
    ):
        give_to_server_user(path)
    return taken.lease


def test_a_restore_lease_keeps_its_backup_and_wal_from_a_prune_until_dropped(
    world: World,
) -> None:
    """On a copy of the repository: the window prune below removes b1 and the WAL before b2.
    A lease on b1 keeps both; after the lease is dropped the prune removes them. Expired
    leases protect nothing, and the real prune removes them."""
    copy = world.base / "repo-lease"
    subprocess.run(["cp", "-a", str(world.repo_path), str(copy)], check=True)
    b1, b2 = world.backup("b1"), world.backup("b2")
    names = {w.name for w, _info in Repository.open_posix(str(copy)).list_wal()}
    b1_wal = {n for n in names if n.startswith("00000001") and not n.endswith(".backup")
              and segno(b1.start_wal) <= segno(n) < segno(b2.start_wal)}  # fmt: skip
    assert b1_wal and backup_file(b1) in names
    drill = str(world.base / "clones" / "drill")
    lease = take_lease(copy, b1, drill)
    long_ago = dt.datetime.now(dt.UTC) - dt.timedelta(days=2)
    stale = take_lease(copy, b1, "/srv/old-drill", now=long_ago)  # expired a day ago

    def prune(check: bool = False) -> dict[str, t.Any]:
        args = world.module_args(repository_path=str(copy))
        args["recovery_window"] = window_between_b2_and_b3(world)
        result = as_postgres_task("pitr.postgresql.retention", args, check)
        assert not result.failed, result.result
        return result.result

    def wal_left() -> set[str]:
        return {w.name for w, _info in Repository.open_posix(str(copy)).list_wal()}

    before = files_below(copy)
    preview = prune(check=True)
    assert files_below(copy) == before  # the expired lease too stays in check mode
    assert preview["backups_kept"] == ["b3", "b2", "b1"] and preview["backups_removed"] == []
    decision = next(b for b in preview["backups"] if b["label"] == "b1")
    assert decision["reasons"] == ["leased"]
    assert [(x["lease_id"], x["data_dir"]) for x in decision["leases"]] == [(lease.lease_id, drill)]
    assert preview["leases_removed"] == [stale.lease_id]
    assert f"kept in use by a restore: b1 ({lease.host}:{drill})" in preview["msg"]
    assert preview["wal_kept_from"]["1"] == b1.start_wal

    done = prune()
    assert done["backups_removed"] == [] and done["leases_removed"] == [stale.lease_id]
    assert [r.label for r in catalog.list_backups(Repository.open_posix(str(copy)))] == [
        "b3",
        "b2",
        "b1",
    ]
    left = wal_left()
    assert b1_wal <= left and backup_file(b1) in left
    assert (copy / lease.key).exists() and not (copy / stale.key).exists()
    assert done["continuity"]["continuous"] is True
    assert done["continuity"]["oldest_backup"] == "b1"

    # The restore ends: its lease goes, and so do b1 and its WAL; a stale lease does not help.
    restore_lease.drop(Repository.open_posix(str(copy)), lease.lease_id)
    stale = take_lease(copy, b1, "/srv/old-drill", now=long_ago)
    done = prune()
    assert done["backups_removed"] == ["b1"] and done["leases_removed"] == [stale.lease_id]
    assert done["leases"] == []
    left = wal_left()
    assert not b1_wal & left and backup_file(b1) not in left
    assert not (copy / stale.key).exists()
    assert done["continuity"]["continuous"] is True
    shutil.rmtree(copy)


def test_window_preview_prune_and_rerun(world: World) -> None:
    b1, b2 = world.backup("b1"), world.backup("b2")
    assert backup_file(b1) in world.wal_names()
    tl1_before_b2 = {n for n in world.wal_names() if n.startswith("00000001")
                     and segno(n) < segno(b2.start_wal) and not n.endswith(".backup")}  # fmt: skip
    assert tl1_before_b2
    before = files_below(world.repo_path)
    window = window_between_b2_and_b3(world)

    preview = retention(world, check=True, recovery_window=window)
    assert files_below(world.repo_path) == before  # the preview changes nothing
    assert preview["changed"] is True
    assert preview["backups_removed"] == ["b1"]
    assert preview["backups_kept"] == ["b3", "b2"]
    reasons = {b["label"]: b["reasons"] for b in preview["backups"]}
    assert reasons == {"b3": ["window"], "b2": ["window_base"], "b1": ["expired"]}
    assert [r["timeline"] for r in preview["wal_removed"]] == [1]
    assert preview["wal_kept_from"]["1"] == b2.start_wal
    assert preview["earliest_recoverable"]["backup"] == "b2"
    assert preview["earliest_recoverable_before"]["backup"] == "b1"
    assert preview["bytes_freed"] > b1.size_on_disk
    assert preview["continuity"]["continuous"] is True
    assert preview["cluster"]["system_identifier"] == int(
        world.cluster.scalar("SELECT system_identifier FROM pg_control_system()")
    )

    done = retention(world, recovery_window=window)
    for key in ("backups_removed", "wal_removed", "wal_kept_from", "bytes_freed"):
        assert done[key] == preview[key], key
    assert world.labels() == ["b3", "b2"]
    assert not (world.repo_path / "backups" / "b1").exists()
    names = world.wal_names()
    assert not names & tl1_before_b2
    assert backup_file(b1) not in names and backup_file(b2) in names
    assert "00000002.history" in names
    assert done["continuity"]["continuous"] is True
    assert done["continuity"]["oldest_backup"] == "b2"

    again = retention(world, recovery_window=window_between_b2_and_b3(world))
    assert again["changed"] is False
    assert again["backups_removed"] == [] and again["wal_removed_files"] == 0
    # Kept as it is now for the restores below (all restores run at once, to save time).
    subprocess.run(["cp", "-a", str(world.repo_path), str(world.base / "repo-window")], check=True)


# --------------------------------------------------------------------------------------------
# By count, with the role


def role_vars(world: World, **extra: t.Any) -> dict[str, t.Any]:
    return {
        "pitr_repository_path": str(world.repo_path),
        "pitr_install_prefix": str(world.prefix),
        "retention_login_unix_socket": str(world.cluster.sockdir),
        "retention_login_port": world.cluster.port,
        **extra,
    }


def test_count_preview_then_prune_with_the_role(world: World) -> None:
    before = files_below(world.repo_path)
    hosts = {"db": role_vars(world, retention_redundancy=1)}
    preview = run_role("pitr.postgresql.retention", hosts, check=True)["db"]
    assert not failure(preview), failure(preview).get("msg")
    assert files_below(world.repo_path) == before
    planned = task(preview, "prune | Apply the retention policy")
    assert planned["backups_removed"] == ["b2"]
    assert [r["whole_timeline"] for r in planned["wal_removed"] if r["timeline"] == 1] == [True]

    runs = run_role("pitr.postgresql.retention", {"db": role_vars(world, retention_redundancy=1)})
    tasks = runs["db"]
    assert not failure(tasks), failure(tasks).get("msg")
    done = task(tasks, "prune | Apply the retention policy")
    assert done["changed"] is True and done["backups_removed"] == ["b2"]
    assert task(tasks, "prune | Report what the prune removed")["msg"].startswith(
        "retention removed 1 base backup(s)"
    )
    assert world.labels() == ["b3"]
    names = world.wal_names()
    # Timeline 1 is gone entirely (no kept backup can reach it); its history stays with 2's.
    assert not any(n.startswith("00000001") for n in names)
    b3 = world.backup("b3")
    tl2 = sorted(segno(n) for n in names if n.startswith("00000002") and len(n) == 24)
    assert tl2[0] == segno(b3.start_wal)
    assert "00000002.history" in names
    assert done["earliest_recoverable"]["backup"] == "b3"
    assert done["continuity"]["continuous"] is True


def test_the_oldest_kept_backup_restores_to_its_end_and_to_the_latest_point(
    world: World,
) -> None:
    """After each prune, restore the oldest backup it kept: b2 after the window prune (from
    the copy taken then), b3 after the count prune."""
    found = restore_earliest_and_latest(
        world, {"window": (world.base / "repo-window", "b2"), "count": (world.repo_path, "b3")}
    )
    head = TL1_BEFORE_B1 + TL1_B1_B2 + TL1_AFTER_B2[:2]  # timeline 2 branched after marker 8
    # b2 ended after marker 6; its latest point follows timeline 1, then timeline 2.
    assert found["window"]["earliest"] == TL1_BEFORE_B1 + TL1_B1_B2
    assert found["window"]["latest"] == head + TL2_BEFORE_B3 + TL2_AFTER_B3
    # b3 (timeline 2) ended after marker 103; timeline 1 is gone from the archive.
    assert found["count"]["earliest"] == head + TL2_BEFORE_B3
    assert found["count"]["latest"] == head + TL2_BEFORE_B3 + TL2_AFTER_B3


# --------------------------------------------------------------------------------------------
# The command of the role's systemd unit, and a gap


def test_the_units_command_prunes_as_the_postgresql_user(world: World) -> None:
    """Render the role's service unit and run its ExecStart as systemd would (as postgres)."""
    out = world.base / "unit"
    out.mkdir()
    play = [
        {
            "hosts": "localhost",
            "gather_facts": False,
            "vars": {
                **role_vars(world, retention_redundancy=1, retention_recovery_window="1d"),
                "pitr_python": "/usr/bin/python3",
                "pitr_postgres_user": "postgres",
                "retention_min_backups": 1,
                "retention_dump_redundancy": 0,
                "retention_dump_max_age": "",
                "retention_lock_wait": 5,
                "retention_timer_on_calendar": "",
                "__retention_unit_data_directory": str(world.cluster.datadir),
            },
            "tasks": [
                {
                    "name": "render",
                    "ansible.builtin.template": {
                        "src": str(ROOT / "roles/retention/templates/pitr-prune.service.j2"),
                        "dest": str(out / "pitr-prune.service"),
                        "mode": "0644",
                    },
                }
            ],
        }
    ]
    results = run_playbook_text(json.dumps(play))
    assert not results[-1].failed, results[-1].result
    unit = (out / "pitr-prune.service").read_text()
    assert "After=pitr-base-backup.service" in unit and "WantedBy=pitr-base-backup.service" in unit
    exec_start = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
    argv = shlex.split(exec_start.removeprefix("ExecStart="))
    assert argv[:3] == ["/usr/bin/python3", "-I", str(world.prefix / "bin" / "pitr-prune")]
    before = files_below(world.repo_path)
    dry = run_as_postgres([*argv, "--dry-run"])
    assert files_below(world.repo_path) == before
    result = json.loads(dry.stdout)
    assert result["backups_kept"] == ["b3"] and result["changed"] is False
    assert "pitr-prune: retention would remove 0 base backup(s)" in dry.stderr
    real = run_as_postgres(argv)
    assert json.loads(real.stdout)["changed"] is False
    # Another cluster's data directory is refused, and nothing is removed.
    other = PgCluster.create(parent=str(world.base))
    try:
        refused = run_as_postgres(
            [*argv[:3], "--repo", str(world.repo_path), "--pgdata", str(other.datadir),
             "--redundancy", "1"],
            check=False,
        )  # fmt: skip
    finally:
        other.destroy()
    assert refused.returncode == 1
    assert "belongs to another cluster" in refused.stderr
    assert files_below(world.repo_path) == before


def test_a_deleted_segment_is_reported_as_a_gap(world: World) -> None:
    b3 = world.backup("b3")
    switch_and_archive(world.cluster)  # archiving goes on
    switch_and_archive(world.cluster)
    tl2 = sorted(n for n in world.wal_names() if n.startswith("00000002") and len(n) == 24)
    victim = next(n for n in tl2 if segno(n) > segno(b3.stop_wal))
    assert victim != tl2[-1]
    (world.repo_path / wal_key(victim)).unlink()
    info = run_module(
        "pitr.postgresql.archive_continuity_info", {"repository_path": str(world.repo_path)}
    )
    assert not info.failed, info.result
    assert info["continuous"] is False
    assert [(g["timeline"], g["from_wal"], g["to_wal"]) for g in info["gaps"]] == [
        (2, victim, victim)
    ]
    assert f"WAL segment {victim} is missing" in info["reason"]
    assert info["oldest_backup"] == "b3"
    # The role fails loudly on it (after a prune that removed nothing).
    runs = run_role("pitr.postgresql.retention", {"db": role_vars(world, retention_redundancy=1)})
    failed = failure(runs["db"])
    assert "The archive has a gap after the prune" in failed.get("msg", ""), failed
    assert victim in failed["msg"]
    assert world.labels() == ["b3"]

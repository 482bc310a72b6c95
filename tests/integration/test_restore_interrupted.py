# Copyright: contributors to pitr.postgresql
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""An interrupted restore never leaves a cluster that starts as if nothing happened (issue 5).

``ansible-playbook pitr.postgresql.pitr_restore -e target_time=...`` restores over a running
server (a copy of the source cluster: same system identifier, its own port, a file
``precious.txt`` that identifies it) and is killed with SIGKILL at one step of the restore.
At ``stopping`` only the playbook's process group is killed (what it ran through sudo gets
SIGHUP from its lost pty, or goes on: the ``pg_ctl stop`` waiting for the held shutdown does);
at the other steps every process the playbook started dies with it, so that the module at
work stops where it is (tar half way through the backup) instead of finishing its step:

- ``stopping``: the server is shutting down (postmaster.pid says ``stopping``; a backend that
  ignores SIGTERM holds it there);
- ``unpacking``: the base backup is being unpacked into ``<data_dir>.pitr-staging``
  (backup_label is there, global/pg_control, the last file of the archive, not yet; the
  backup is large enough for this to take a while);
- ``staged``: the staging directory is complete (its state file says ``prepared``), the
  original still in place;
- ``between-renames``: the original moved aside, the staging directory not yet in place.
  The swap's two renames are one module call, microseconds apart, so no poll can kill between
  them: this state is made from a real kill at ``staged`` by doing the first rename as the
  role does, to the name its state file records;
- ``swapped``: the restored directory in place, the server not started;
- ``recovering``: the server runs, consistent and in recovery, while a fetch of a WAL
  segment after the backup is held (a ``pitr-wal`` wrapper in front of the real one);
- ``paused``: replay stopped at the target, before the role promotes (the playbook is frozen
  while fetches are held, they are released, and the kill comes when the server paused);
- ``recovering-group-only``: as ``recovering``, but only the playbook's process group is
  killed, as at ``stopping``.

The kill is triggered by that state appearing, not by task names or time. After the kill,
whatever is at the data directory's path is the untouched original, a directory that carries
recovery.signal and the recovery target (with ``recovery_target_action=pause``), or nothing;
the original is whole, in place or at ``<data_dir>.pitr-old-<UTC stamp>``. Then the same
playbook runs again and must complete: exactly the markers committed at or before the target,
out of recovery, the original still aside and named in the state file.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
import typing as t
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pytest
import test_pitr_restore
from ansible_runner import run_tasks
from pgcluster import DEFAULT_BINDIR
from restore_fixtures import (
    FetchGate,
    Interruption,
    ServerProbe,
    ShutdownHold,
    pm_status,
    postgres_setting,
    read_state,
    run_and_kill,
    wait_gone,
)
from test_pitr_restore import (
    Marker,
    Source,
    marker_ids,
    run_as_postgres,
    run_restores,
    scalar,
    state_file,
    switch_and_archive,
    utc_text,
)

from ansible_collections.pitr.postgresql.plugins.module_utils import catalog
from ansible_collections.pitr.postgresql.plugins.module_utils.repository import Repository
from ansible_collections.pitr.postgresql.plugins.module_utils.walfile import (
    parse_lsn,
    segment_for_lsn,
)

# The module-scoped source cluster of test_pitr_restore, as a fixture of this module too.
source = test_pitr_restore.source

PRECIOUS = "keep me: the original data directory\n"
# Rows of about 100 bytes that compress to about half: the base backup takes a while to
# unpack, so that the kill lands while tar is still writing.
BULK_ROWS = 1_500_000
MARKERS = 6


@dataclass
class Setup:
    """The source cluster plus a second, larger base backup and markers written after it."""

    source: Source
    backup: catalog.BackupRecord
    markers: list[Marker]  # every marker of the cluster, oldest first
    template: Path  # a stopped copy of the source cluster, to make originals from
    gate: FetchGate

    def marker(self, n: int) -> Marker:
        """The n-th marker written after the second backup (1-based)."""
        return self.markers[-MARKERS:][n - 1]

    def expected(self, target: datetime) -> list[int]:
        return [m.id for m in self.markers if m.commit_time <= target]


@pytest.fixture(scope="module")
def setup(source: Source) -> Setup:
    cluster = source.cluster
    template = source.base / "template-original"
    run_as_postgres(
        [
            cluster.bin("pg_basebackup"),
            "-h",
            str(cluster.sockdir),
            "-p",
            str(cluster.port),
            "-U",
            "postgres",
            "-D",
            str(template),
            "-X",
            "stream",
            "-c",
            "fast",
        ]
    )
    cluster.sql(
        "CREATE TABLE bulk AS SELECT g, md5(g::text) || md5((-g)::text) AS pad"
        f" FROM generate_series(1, {BULK_ROWS}) AS g"
    )
    result = run_tasks(
        [
            {
                "name": "take the second base backup",
                "pitr.postgresql.base_backup": {
                    **cluster.module_params,
                    "repository_path": str(source.repo),
                },
                "become": True,
                "become_user": "postgres",
            }
        ]
    )
    assert not result[-1].failed, result[-1].result
    backups = catalog.list_backups(Repository.open_posix(str(source.repo)))
    backup = max(backups, key=lambda b: datetime.fromisoformat(b.stop_time))
    assert backup.label != source.backup.label
    # Some MB of WAL between the backup's end and the first marker: recovery reads ahead
    # (recovery_prefetch) up to 512 kB, and must be able to pass its consistency point while
    # the fetch of a later segment is held (the "recovering" kill point).
    cluster.sql("INSERT INTO bulk SELECT g, md5(g::text) FROM generate_series(1, 40000) AS g")
    markers = list(source.markers)
    with cluster.connect() as conn:
        for n in range(1001, 1001 + MARKERS):
            xid = conn.execute(
                "INSERT INTO marker (id) VALUES (%s) RETURNING xmin::text::bigint", (n,)
            ).fetchone()[0]
            when, lsn = conn.execute(
                "SELECT pg_xact_commit_timestamp(%s::text::xid), pg_current_wal_lsn()::text",
                (str(xid),),
            ).fetchone()
            markers.append(Marker(n, when.astimezone(UTC), int(xid), parse_lsn(lsn)))
            # Each marker in a WAL segment of its own; commit times a second apart.
            conn.execute("SELECT pg_switch_wal()")
            time.sleep(1)
    switch_and_archive(cluster)
    assert markers[-MARKERS].commit_time > datetime.fromisoformat(backup.stop_time)
    gate = FetchGate(
        source.base / "gated-prefix", str(source.prefix / "bin" / "pitr-wal"), source.base / "gates"
    )
    return Setup(source, backup, markers, template, gate)


# --------------------------------------------------------------------------------------------
# The original: a running copy of the source cluster at the restore's data directory


@dataclass
class Original:
    name: str
    data_dir: Path
    port: int
    inode: int
    auto_conf: bytes
    host_vars: dict[str, t.Any]
    cleanups: list[t.Callable[[], None]] = field(default_factory=list)

    @property
    def staging(self) -> Path:
        return self.data_dir.with_name(self.data_dir.name + ".pitr-staging")

    def old_dirs(self) -> list[Path]:
        return sorted(self.data_dir.parent.glob(self.data_dir.name + ".pitr-old-*"))


def make_original(setup: Setup, name: str) -> Original:
    host_vars = setup.source.clone_vars(name, pitr_install_prefix=str(setup.gate.prefix))
    data_dir = Path(host_vars["pitr_restore_data_dir"])
    port = int(host_vars["pitr_restore_clone_port"])
    subprocess.run(["cp", "-a", str(setup.template), str(data_dir)], check=True)
    with open(data_dir / "postgresql.conf", "a", encoding="utf-8") as fh:
        fh.write(f"\nport = {port}\narchive_mode = off\n")
    (data_dir / "precious.txt").write_text(PRECIOUS, encoding="utf-8")
    subprocess.run(["chown", "-R", "postgres:postgres", str(data_dir)], check=True)
    run_as_postgres(
        [
            f"{DEFAULT_BINDIR}/pg_ctl",
            "start",
            "-D",
            str(data_dir),
            "-l",
            str(setup.source.base / f"{name}.original.log"),
            "-w",
            "-t",
            "120",
        ]
    )
    assert scalar(port, setup.source.cluster.sockdir, "SELECT pg_is_in_recovery()") is False
    return Original(
        name,
        data_dir,
        port,
        data_dir.stat().st_ino,
        (data_dir / "postgresql.auto.conf").read_bytes(),
        host_vars,
    )


# --------------------------------------------------------------------------------------------
# The kill points: (setup before the run, condition that triggers the kill, what must be at
# the data directory's path right after it)


@dataclass
class Step:
    marker: int  # the target lies at or after the commit of this marker (after the backup)
    between: bool  # True: halfway to the next marker; False: exactly at its commit
    at_path: str  # "original", "nothing" or "restored"
    prepare: t.Callable[[Setup, Original], None]
    condition: t.Callable[[Setup, Original], t.Callable[[], dict[str, t.Any] | None]]
    confirm: t.Callable[[Setup, Original], None]  # the kill landed where intended
    release: t.Callable[[Setup, Original], None]
    # True: every process the playbook started dies with it (the module at work included);
    # False: only its process group, the rest gets SIGHUP from the lost pty (or keeps going).
    kill_tree: bool = True
    after_kill: t.Callable[[Setup, Original], None] | None = None
    # Freeze the playbook when ``condition`` holds, run ``on_freeze``, kill once this holds.
    freeze_until: t.Callable[[Setup, Original], t.Callable[[], dict[str, t.Any] | None]] | None = (
        None
    )
    on_freeze: t.Callable[[Setup, Original], None] | None = None


def nothing(_s: Setup, _o: Original) -> None:
    return None


def hold_shutdown(s: Setup, o: Original) -> None:
    hold = ShutdownHold(s.source.cluster.sockdir, o.port, s.source.base / f"{o.name}.hold")
    o.cleanups.append(hold.release)


def when_stopping(_s: Setup, o: Original) -> t.Callable[[], dict[str, t.Any] | None]:
    def check() -> dict[str, t.Any] | None:
        status = pm_status(o.data_dir)
        return {"postmaster": status} if status == "stopping" else None

    return check


def still_stopping(_s: Setup, o: Original) -> None:
    assert pm_status(o.data_dir) == "stopping"
    assert not o.staging.exists()


def release_shutdown(_s: Setup, o: Original) -> None:
    for cleanup in o.cleanups:
        cleanup()
    deadline = time.monotonic() + 120
    while (o.data_dir / "postmaster.pid").exists():
        assert time.monotonic() < deadline, "the original did not finish stopping"
        time.sleep(0.1)


def when_unpacking(_s: Setup, o: Original) -> t.Callable[[], dict[str, t.Any] | None]:
    def check() -> dict[str, t.Any] | None:
        staging = o.staging
        if (staging / "backup_label").exists() and not (staging / "global" / "pg_control").exists():
            return {"staging": sorted(p.name for p in staging.iterdir())}
        return None

    return check


def unpack_unfinished(_s: Setup, o: Original) -> None:
    assert o.staging.is_dir()
    assert not (o.staging / "recovery.signal").exists()
    state = read_state(o.staging)
    assert state is None or state.get("phase") != "prepared", state


def when_staged(_s: Setup, o: Original) -> t.Callable[[], dict[str, t.Any] | None]:
    def check() -> dict[str, t.Any] | None:
        state = read_state(o.staging)
        if state is not None and state.get("phase") == "prepared":
            return {"staging_state": state.get("phase")}
        return None

    return check


def staged_not_swapped(_s: Setup, o: Original) -> None:
    assert (o.staging / "recovery.signal").exists()
    assert (o.data_dir / "precious.txt").exists()
    assert o.old_dirs() == []


def move_original_aside(_s: Setup, o: Original) -> None:
    """What a kill between the swap's two renames leaves (they are one module call now)."""
    state = read_state(o.staging)
    assert state is not None and state.get("old_data_dir"), state
    os.rename(o.data_dir, state["old_data_dir"])


def between_renames(_s: Setup, o: Original) -> None:
    assert not o.data_dir.exists()
    assert o.staging.is_dir()


def when_swapped(_s: Setup, o: Original) -> t.Callable[[], dict[str, t.Any] | None]:
    def check() -> dict[str, t.Any] | None:
        dd = o.data_dir
        if (dd / "recovery.signal").exists() and not (dd / "postmaster.pid").exists():
            return {"data_dir": "restored, not started"}
        return None

    return check


def swapped_not_started(_s: Setup, o: Original) -> None:
    assert not (o.data_dir / "postmaster.pid").exists()
    assert not o.staging.exists()


def hold_fetches(s: Setup, o: Original) -> None:
    # Hold the segments after the first marker's: by then the server is consistent (it
    # accepts connections), and the target lies segments later.
    s.gate.close(o.data_dir, segment_for_lsn(1, s.marker(1).lsn_after - 1))
    o.cleanups.append(lambda: s.gate.open(o.data_dir))


def when_recovering(s: Setup, o: Original) -> t.Callable[[], dict[str, t.Any] | None]:
    probe = ServerProbe(s.source.cluster.sockdir, o.port)

    def check() -> dict[str, t.Any] | None:
        held = s.gate.held(o.data_dir)
        if not held or not (o.data_dir / "postmaster.pid").exists():
            return None
        row = probe.query("SELECT pg_is_in_recovery(), pg_last_wal_replay_lsn()::text")
        if row is None or row[0] is not True:
            return None
        probe.close()
        return {"held": held, "replayed": row[1]}

    return check


def replay_held(s: Setup, o: Original) -> None:
    row = scalar(
        o.port,
        s.source.cluster.sockdir,
        "SELECT pg_is_in_recovery()::text || ' ' || pg_get_wal_replay_pause_state()",
    )
    assert row == "true not paused", row


def open_fetches(s: Setup, o: Original) -> None:
    s.gate.open(o.data_dir)


def release_all(_s: Setup, o: Original) -> None:
    for cleanup in o.cleanups:
        cleanup()


def when_paused(s: Setup, o: Original) -> t.Callable[[], dict[str, t.Any] | None]:
    probe = ServerProbe(s.source.cluster.sockdir, o.port)

    def check() -> dict[str, t.Any] | None:
        if not (o.data_dir / "recovery.signal").exists():
            return None
        row = probe.query("SELECT pg_is_in_recovery(), pg_get_wal_replay_pause_state()")
        if row is not None and row[0] is True and row[1] == "paused":
            probe.close()
            return {"replay": row[1]}
        return None

    return check


def paused_not_promoted(s: Setup, o: Original) -> None:
    row = scalar(
        o.port,
        s.source.cluster.sockdir,
        "SELECT pg_is_in_recovery()::text || ' ' || pg_get_wal_replay_pause_state()",
    )
    assert row == "true paused", row


STEPS = {
    "stopping": Step(
        2,
        True,
        "original",
        hold_shutdown,
        when_stopping,
        still_stopping,
        release_shutdown,
        kill_tree=False,
    ),
    "unpacking": Step(
        3, False, "original", nothing, when_unpacking, unpack_unfinished, release_all
    ),
    "staged": Step(3, True, "original", nothing, when_staged, staged_not_swapped, release_all),
    "between-renames": Step(
        4,
        True,
        "nothing",
        nothing,
        when_staged,
        between_renames,
        release_all,
        after_kill=move_original_aside,
    ),
    "swapped": Step(2, False, "restored", nothing, when_swapped, swapped_not_started, release_all),
    "recovering": Step(
        5, True, "restored", hold_fetches, when_recovering, replay_held, release_all
    ),
    # The role follows the server every fraction of a second and promotes as soon as it sees
    # the pause: to kill it in between without a race, the playbook is frozen while the
    # fetches are held (replay cannot reach the target yet), the fetches are released, and
    # the kill comes once the server paused at the target by itself.
    "paused": Step(
        4,
        False,
        "restored",
        hold_fetches,
        when_recovering,
        paused_not_promoted,
        release_all,
        freeze_until=when_paused,
        on_freeze=open_fetches,
    ),
    # As an operator's Ctrl-C or a lost SSH session: only the playbook's process group is
    # killed; the module following recovery, in its sudo session, gets SIGHUP from the lost
    # pty (here it ends with it; the test only waits until it is gone, whatever it did).
    "recovering-group-only": Step(
        4,
        True,
        "restored",
        hold_fetches,
        when_recovering,
        replay_held,
        release_all,
        kill_tree=False,
    ),
}


# --------------------------------------------------------------------------------------------
# What may be at the path, and where the original is


def check_at_path(setup: Setup, o: Original, target: datetime) -> str:
    """Classify what is at the data directory's path; fail if it would start unrecovered."""
    dd = o.data_dir
    if not dd.exists():
        return "nothing"
    if (dd / "precious.txt").exists():
        # The original: untouched (the same directory, no recovery set up in it).
        assert dd.stat().st_ino == o.inode
        assert (dd / "postgresql.auto.conf").read_bytes() == o.auto_conf
        assert not (dd / "recovery.signal").exists()
        assert not (dd / "standby.signal").exists()
        return "original"
    # Anything else must recover to the target and pause there, never start as a primary.
    assert (dd / "recovery.signal").exists(), sorted(p.name for p in dd.iterdir())
    assert not (dd / "standby.signal").exists()
    written = postgres_setting(DEFAULT_BINDIR, dd, "recovery_target_time")
    assert written, "recovery.signal without a recovery target"
    assert datetime.fromisoformat(written) == target, (written, target)
    assert postgres_setting(DEFAULT_BINDIR, dd, "recovery_target_action") == "pause"
    if pm_status(dd) not in (None, "stopping"):
        # A running server there is still in recovery.
        in_recovery = scalar(o.port, setup.source.cluster.sockdir, "SELECT pg_is_in_recovery()")
        assert in_recovery is True
    return "restored"


OLD_NAME = re.compile(r"\.pitr-old-\d{8}T\d{6}Z(-\d+)?$")


def original_location(o: Original) -> Path:
    """Where the original is now: in place or aside under a dated name; it is whole."""
    holders = [
        p for p in [o.data_dir, *o.old_dirs()] if p.is_dir() and (p / "precious.txt").exists()
    ]
    assert len(holders) == 1, (holders, o.old_dirs())
    where = holders[0]
    if where != o.data_dir:
        assert OLD_NAME.search(where.name), where.name
    assert (where / "precious.txt").read_text(encoding="utf-8") == PRECIOUS
    assert (where / "PG_VERSION").read_text().strip() == "15"
    assert (where / "global" / "pg_control").stat().st_size == 8192
    assert (where / "base").is_dir()
    return where


# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("step_name", list(STEPS))
def test_killed_restore_never_starts_as_if_nothing_happened_and_reruns(
    setup: Setup, step_name: str
) -> None:
    step = STEPS[step_name]
    o = make_original(setup, step_name.replace("-", "_"))
    m = setup.marker(step.marker)
    target = m.commit_time
    if step.between:
        target += (setup.marker(step.marker + 1).commit_time - m.commit_time) / 2
    extra = {"target_time": utc_text(target)}
    hosts = {o.name: o.host_vars}
    killed: Interruption | None = None
    try:
        step.prepare(setup, o)
        on_freeze = step.on_freeze
        killed = run_and_kill(
            hosts,
            step.condition(setup, o),
            extra_vars=extra,
            kill_tree=step.kill_tree,
            freeze_until=step.freeze_until(setup, o) if step.freeze_until else None,
            on_freeze=(lambda: on_freeze(setup, o)) if on_freeze is not None else None,
        )
        assert killed.seen is not None, (
            f"kill point {step_name!r} was not reached: {killed.explain()}"
        )
        assert killed.returncode == -9, killed.explain()
        print(f"{step_name}: killed on {killed.seen}, stragglers {killed.stragglers}")
        if step.after_kill is not None:
            step.after_kill(setup, o)
        step.confirm(setup, o)

        # Right after the kill: never a directory that starts as if nothing happened.
        assert check_at_path(setup, o, target) == step.at_path, killed.seen
        original_location(o)
    finally:
        step.release(setup, o)
        # What the playbook left running (a pg_ctl waiting for the held shutdown) ends now.
        left = wait_gone(killed.stragglers, 120) if killed is not None else []
    assert left == [], f"processes of the killed playbook still ran: {left}"

    # The same playbook again completes the restore.
    again = run_restores(hosts, playbook="pitr.postgresql.pitr_restore", extra_vars=extra)
    run = again[o.name]
    assert not run.failed, (run.plan.get("decision"), run.failure.get("msg"))
    result = run.result
    assert result["phase"] == "completed", result
    sock = setup.source.cluster.sockdir
    assert scalar(o.port, sock, "SELECT pg_is_in_recovery()") is False
    want = setup.expected(target)
    assert setup.marker(step.marker).id in want
    assert setup.marker(step.marker + 1).id not in want
    assert marker_ids(o.port, sock) == want
    assert scalar(o.port, sock, "SHOW archive_mode") == "off"
    assert not (o.data_dir / "recovery.signal").exists()
    auto = (o.data_dir / "postgresql.auto.conf").read_text()
    assert "recovery_target" not in auto and "restore_command" not in auto
    assert not o.staging.exists()
    # The original is kept aside, whole, and the state file says where.
    old = original_location(o)
    assert old != o.data_dir
    assert state_file(o.data_dir)["old_data_dir"] == str(old)
    assert result["old_data_dir"] == str(old)
    assert os.path.samefile(old, o.old_dirs()[0]) and len(o.old_dirs()) == 1

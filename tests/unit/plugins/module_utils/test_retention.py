# Copyright: contributors to pitr.postgresql
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Retention: the pruning planner over generated repositories (timelines, branch points,
partial files, pinned and failed backups, dumps), removal that survives interruption, pins,
continuity, and a property test that nothing a kept backup or the window needs is planned
for deletion."""

from __future__ import annotations

import datetime as dt
import json
import struct
import typing as t
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ansible_collections.pitr.postgresql.plugins.module_utils import (
    catalog,
    continuity,
    dumps,
    restore_lease,
    retention,
)
from ansible_collections.pitr.postgresql.plugins.module_utils.catalog import BackupRecord
from ansible_collections.pitr.postgresql.plugins.module_utils.errors import (
    IdentityMismatchError,
    LockHeldError,
    RepositoryError,
)
from ansible_collections.pitr.postgresql.plugins.module_utils.recovery import (
    segment_on_path,
    span_of,
    timeline_path,
)
from ansible_collections.pitr.postgresql.plugins.module_utils.repository import (
    Repository,
    RepositoryIdentity,
    wal_key,
)
from ansible_collections.pitr.postgresql.plugins.module_utils.restore_lease import (
    Lease,
    Unreadable,
)
from ansible_collections.pitr.postgresql.plugins.module_utils.retention import (
    KEEP_LEASED,
    RepositoryState,
    RetentionError,
    RetentionPolicy,
    plan_retention,
)
from ansible_collections.pitr.postgresql.plugins.module_utils.storage import ObjectInfo
from ansible_collections.pitr.postgresql.plugins.module_utils.walfile import (
    BACKUP,
    HISTORY,
    WalFileName,
    format_lsn,
    history_name,
    parse_lsn,
    segment_name,
)
from tests.support.memory_storage import MemoryStorage

SEG = 16 * 1024 * 1024
WAL_SIZE = 4 * 1024 * 1024  # stored (compressed) size of each generated segment
NOW = dt.datetime(2026, 11, 25, 12, 0, tzinfo=dt.UTC)
DAY = 86400.0
SYSID = 7441120211222063101
IDENTITY = RepositoryIdentity(SYSID, 15, SEG)


def seg(tl: int, n: int) -> str:
    return segment_name(tl, n, SEG)


def lsn(n: int, offset: int = 0x28) -> str:
    return format_lsn(n * SEG + offset)


def ago(days: float = 0, hours: float = 0) -> dt.datetime:
    return NOW - dt.timedelta(days=days, hours=hours)


def iso(moment: dt.datetime) -> str:
    return moment.isoformat()


def record(
    label: str,
    tl: int,
    start: int,
    *,
    when: dt.datetime,
    stop: int | None = None,
    status: str = "ok",
    verified: bool = True,
) -> BackupRecord:
    """A backup on timeline ``tl`` that started in segment ``start`` and ended at ``when``."""
    stop = start if stop is None else stop
    return BackupRecord(
        label=label,
        status=status,
        verified=verified,
        timeline=tl,
        start_lsn=lsn(start),
        stop_lsn=lsn(stop, 0x138),
        start_wal=seg(tl, start),
        stop_wal=seg(tl, stop),
        start_time=iso(when - dt.timedelta(minutes=5)),
        stop_time=iso(when),
        system_identifier=SYSID,
        pg_major=15,
        size_on_disk=1000,
    )


def backup_file_name(rec: BackupRecord) -> str:
    start = parse_lsn(rec.start_lsn)
    return f"{rec.start_wal}.{start % SEG:08X}.backup"


@dataclass
class Gen:
    """A generated repository: WAL listing, history files, catalog, pins."""

    wal: list[tuple[WalFileName, ObjectInfo]] = field(default_factory=list)
    histories: dict[int, str] = field(default_factory=dict)
    backups: list[BackupRecord] = field(default_factory=list)
    pins: dict[str, set[str]] = field(default_factory=dict)
    dumps: list[t.Any] = field(default_factory=list)
    leases: list[Lease] = field(default_factory=list)
    unreadable_leases: list[Unreadable] = field(default_factory=list)

    def add(self, name: str, size: int = WAL_SIZE, when: dt.datetime = NOW) -> None:
        if any(w.name == name for w, _info in self.wal):
            return
        self.wal.append(
            (WalFileName.parse(name), ObjectInfo(wal_key(name), size, when.timestamp()))
        )

    def segments(self, tl: int, numbers: t.Iterable[int], when: dt.datetime = NOW) -> Gen:
        for n in numbers:
            self.add(seg(tl, n), when=when)
        return self

    def partial(self, tl: int, n: int) -> Gen:
        self.add(seg(tl, n) + ".partial")
        return self

    def branch(self, tl: int, parent_history: list[tuple[int, int]]) -> Gen:
        """Timeline ``tl`` with history lines (parent timeline, switch LSN)."""
        text = "".join(
            f"{parent}\t{format_lsn(switch)}\tno recovery target specified\n"
            for parent, switch in parent_history
        )
        self.histories[tl] = text
        self.add(history_name(tl), size=len(text))
        return self

    def backup(self, rec: BackupRecord, with_file: bool = True) -> Gen:
        self.backups.append(rec)
        if with_file:
            self.add(backup_file_name(rec), size=300)
        return self

    def pin(self, label: str) -> Gen:
        self.pins.setdefault("backups", set()).add(label)
        return self

    def lease(self, label: str, *, expired: bool = False, first: str | None = None) -> Gen:
        """A restore lease on ``label`` (from its start segment), active at NOW or expired."""
        rec = next((b for b in self.backups if b.label == label), None)
        self.leases.append(
            make_lease(
                label,
                first=first or (rec.start_wal if rec else None),
                timeline=rec.timeline if rec else None,
                n=len(self.leases),
                expired=expired,
            )
        )
        return self

    def state(self) -> RepositoryState:
        return RepositoryState(
            backups=list(self.backups),
            wal=sorted(self.wal, key=lambda x: x[0]),
            histories=dict(self.histories),
            backup_bytes={b.label: 10_000 for b in self.backups},
            dumps=list(self.dumps),
            dump_bytes={d.label: int(d.size) for d in self.dumps},
            pins={k: set(v) for k, v in self.pins.items()},
            segment_size=SEG,
            leases=list(self.leases),
            unreadable_leases=list(self.unreadable_leases),
        )


def make_lease(
    label: str,
    *,
    first: str | None = None,
    timeline: int | None = None,
    n: int = 0,
    expired: bool = False,
    data_dir: str = "/srv/drill",
) -> Lease:
    taken = ago(days=2) if expired else ago(hours=1)
    return Lease(
        lease_id=f"db1-{n}",
        backup_label=label,
        host="db1",
        data_dir=data_dir,
        target="latest",
        first_segment=first,
        timeline=timeline,
        created=taken,
        renewed=taken,
        expires=taken + dt.timedelta(days=1),
        ttl_seconds=DAY,
    )


def plan(gen: Gen, **policy: t.Any) -> retention.RetentionPlan:
    return plan_retention(gen.state(), RetentionPolicy(**policy), NOW)


def kept(p: retention.RetentionPlan) -> list[str]:
    return [d.label for d in p.backups if d.keep]


def reasons(p: retention.RetentionPlan) -> dict[str, list[str]]:
    return {d.label: list(d.reasons) for d in p.backups}


def one_timeline() -> Gen:
    """Timeline 1, segments 1..30, four daily backups starting in segments 2, 8, 15, 22."""
    g = Gen().segments(1, range(1, 31))
    g.backup(record("b1", 1, 2, when=ago(days=4)))
    g.backup(record("b2", 1, 8, when=ago(days=3)))
    g.backup(record("b3", 1, 15, when=ago(days=2)))
    g.backup(record("b4", 1, 22, when=ago(days=1)))
    return g


# Policies on one timeline --------------------------------------------------------------------


def test_redundancy_keeps_the_newest_and_removes_wal_before_the_oldest_kept_start() -> None:
    p = plan(one_timeline(), redundancy=2)
    assert kept(p) == ["b4", "b3"]
    assert [d.label for d in p.backups_removed] == ["b2", "b1"]
    assert reasons(p)["b2"] == ["expired"]
    # Every segment before b3's start segment (15) goes, and the .backup files of b1 and b2.
    expected = [seg(1, n) for n in range(1, 15)]
    expected += [backup_file_name(r) for r in one_timeline().backups[:2]]
    assert sorted(p.wal_removed) == sorted(expected)
    assert p.wal_kept_from == {1: seg(1, 15)}
    assert p.wal_ranges == [
        {
            "timeline": 1,
            "from_wal": seg(1, 1),
            "to_wal": seg(1, 14),
            "segments": 14,
            "partial": 0,
            "backup_files": 2,
            "bytes": 14 * WAL_SIZE + 2 * 300,
            "whole_timeline": False,
        }
    ]
    assert p.bytes_freed == 14 * WAL_SIZE + 600 + 2 * 10_000
    assert p.earliest_before is not None and p.earliest_before["backup"] == "b1"
    assert p.earliest_after == {
        "time": iso(ago(days=2)),
        "lsn": lsn(15, 0x138),
        "timeline": 1,
        "backup": "b3",
    }
    # Removed in replay order: oldest first, so an interruption leaves no hole.
    segments = [n for n in p.wal_removed if not n.endswith(".backup")]
    assert segments == sorted(segments)
    assert not any(n.endswith(".history") for n in p.wal_removed)


def test_recovery_window_keeps_the_newest_backup_before_the_window_start() -> None:
    p = plan(one_timeline(), recovery_window=2.5 * DAY)
    assert kept(p) == ["b4", "b3", "b2"]
    assert reasons(p) == {
        "b4": ["window"],
        "b3": ["window"],
        "b2": ["window_base"],
        "b1": ["expired"],
    }
    assert p.wal_kept_from == {1: seg(1, 8)}
    assert p.window_start == ago(days=2.5)


def test_both_policies_keep_the_union() -> None:
    p = plan(one_timeline(), redundancy=3, recovery_window=0.5 * DAY)
    # redundancy keeps b4 b3 b2; the window (half a day) keeps only b4 as its base.
    assert kept(p) == ["b4", "b3", "b2"]
    assert reasons(p)["b4"] == ["redundancy", "window_base"]


def test_min_backups_is_never_undercut() -> None:
    p = plan(one_timeline(), redundancy=1, min_backups=3)
    assert kept(p) == ["b4", "b3", "b2"]
    assert reasons(p)["b3"] == ["minimum"]


def test_a_window_shorter_than_the_newest_backup_keeps_it_as_base() -> None:
    p = plan(one_timeline(), recovery_window=3600)
    assert kept(p) == ["b4"]
    assert reasons(p)["b4"] == ["window_base"]
    assert p.warnings == []


def test_a_window_longer_than_the_archive_keeps_everything_and_says_so() -> None:
    p = plan(one_timeline(), recovery_window=30 * DAY)
    assert kept(p) == ["b4", "b3", "b2", "b1"]
    assert p.wal_removed == [seg(1, 1)]  # before b1's start segment
    assert any("not covered back to its start" in w for w in p.warnings)


def test_a_stalled_archive_still_keeps_the_newest_backup_before_the_window() -> None:
    """No WAL and no backup inside the window (archiving broke 8 days ago): the newest backup
    before the window still stays, even though a pin already satisfies min_backups."""
    g = Gen().segments(1, range(1, 20), when=ago(days=8))
    g.backup(record("b1", 1, 2, when=ago(days=10)))
    g.backup(record("b2", 1, 8, when=ago(days=9)))
    g.backup(record("b3", 1, 15, when=ago(days=8.5)))
    p = plan(g.pin("b1"), recovery_window=7 * DAY)
    assert reasons(p) == {"b3": ["window_base"], "b2": ["expired"], "b1": ["pinned"]}


def test_pinned_backup_is_kept_and_keeps_its_wal_while_the_ones_between_go() -> None:
    g = one_timeline().pin("b1")
    p = plan(g, redundancy=1)
    assert kept(p) == ["b4", "b1"]
    assert reasons(p)["b1"] == ["pinned"]
    # b1 needs all WAL from its start: only segment 1 goes, plus the .backup files of b2, b3.
    assert sorted(p.wal_removed) == sorted(
        [seg(1, 1), backup_file_name(g.backups[1]), backup_file_name(g.backups[2])]
    )
    assert p.earliest_after is not None and p.earliest_after["backup"] == "b1"


def test_unusable_backups_go_once_a_newer_usable_one_is_kept() -> None:
    g = one_timeline()
    g.backup(record("f-old", 1, 5, when=ago(days=3.5), status="failed", verified=False))
    g.backup(record("unverified", 1, 18, when=ago(days=1.5), verified=False))
    g.backup(record("f-new", 1, 28, when=ago(hours=1), status="failed", verified=False))
    g.backup(record("expiring", 1, 10, when=ago(days=2.7), status="expiring"))
    p = plan(g, redundancy=4)
    r = reasons(p)
    assert r["f-old"] == ["unusable"] and r["unverified"] == ["unusable"]
    assert r["f-new"] == ["newest_unusable"]  # kept until a usable backup is newer
    assert r["expiring"] == ["expiring"]  # an interrupted prune is finished
    assert kept(p) == ["f-new", "b4", "b3", "b2", "b1"]


def test_a_running_backup_is_never_removed() -> None:
    g = one_timeline().backup(record("now", 1, 29, when=NOW, status="running", verified=False))
    p = plan(g, redundancy=1)
    assert reasons(p)["now"] == ["running"]


def test_pinned_expiring_backup_is_kept_with_a_warning() -> None:
    g = one_timeline().backup(record("half", 1, 10, when=ago(days=2.5), status="expiring"))
    p = plan(g.pin("half"), redundancy=1)
    assert "half" in kept(p)
    assert any("half is pinned but was being removed" in w for w in p.warnings)


def test_no_policy_keeps_everything() -> None:
    p = plan(one_timeline())
    assert kept(p) == ["b4", "b3", "b2", "b1"]
    assert {tuple(x) for x in reasons(p).values()} == {("no_policy",)}
    assert p.wal_removed == [seg(1, 1)]


@pytest.mark.parametrize(
    ("policy", "message"),
    [
        ({"redundancy": 0}, "redundancy must be 1 or more"),
        ({"recovery_window": -1.0}, "recovery_window must be a positive duration"),
        ({"redundancy": 1, "min_backups": 0}, "never removes every backup"),
        ({"dump_redundancy": 0}, "dump_redundancy must be 1 or more"),
    ],
)
def test_invalid_policies_are_refused(policy: dict[str, t.Any], message: str) -> None:
    with pytest.raises(RetentionError, match=message):
        plan(one_timeline(), **policy)


def test_policy_from_module_parameters() -> None:
    p = RetentionPolicy.from_params(
        {"redundancy": 2, "recovery_window": "14d", "min_backups": None, "dump_max_age": "36h"}
    )
    assert p == RetentionPolicy(2, 14 * DAY, 1, None, 36 * 3600.0)
    assert p.dump_count == 2 and p.dump_age == 36 * 3600.0
    with pytest.raises(RetentionError, match=r"recovery_window: .*not a duration"):
        RetentionPolicy.from_params({"recovery_window": "a fortnight"})
    with pytest.raises(RetentionError, match="min_backups must be 1"):
        RetentionPolicy.from_params({"redundancy": 1, "min_backups": 0})


def test_no_usable_backup_removes_no_wal() -> None:
    g = Gen().segments(1, range(1, 10))
    g.backup(record("bad", 1, 5, when=ago(days=1), status="failed", verified=False))
    p = plan(g, redundancy=1)
    assert p.wal_removed == [] and kept(p) == ["bad"]
    assert "no usable base backup is kept: no WAL is removed" in p.warnings


def test_a_kept_backup_without_start_point_stops_wal_removal() -> None:
    g = one_timeline()
    g.backups[3] = g.backups[3].with_changes(start_lsn="", start_wal="")
    p = plan(g, redundancy=2)
    assert kept(p) == ["b4", "b3"]
    assert p.wal_removed == []
    assert any("b4 has no start point" in w for w in p.warnings)


# Timelines ----------------------------------------------------------------------------------


def promoted() -> Gen:
    """Timeline 1 segments 1..12 (partial 9); timeline 2 from the switch in segment 9.

    b1 (TL1, start 2) and b2 (TL1, start 6) end before the switch and reach timeline 2;
    b3 (TL2, start 14) and b4 (TL2, start 20) are on timeline 2.
    """
    switch = 9 * SEG + 0x5000
    g = Gen().segments(1, range(1, 9)).partial(1, 9)
    g.branch(2, [(1, switch)]).segments(2, range(9, 25))
    g.backup(record("b1", 1, 2, when=ago(days=4)))
    g.backup(record("b2", 1, 6, when=ago(days=3)))
    g.backup(record("b3", 2, 14, when=ago(days=2)))
    g.backup(record("b4", 2, 20, when=ago(days=1)))
    return g


def test_a_timeline_no_kept_backup_reaches_goes_entirely_history_stays() -> None:
    p = plan(promoted(), redundancy=2)
    assert kept(p) == ["b4", "b3"]
    removed = set(p.wal_removed)
    assert {seg(1, n) for n in range(1, 9)} <= removed
    assert seg(1, 9) + ".partial" in removed
    assert {seg(2, n) for n in range(9, 14)} <= removed
    assert seg(2, 14) not in removed
    assert "00000002.history" not in removed
    assert p.wal_kept_from == {1: None, 2: seg(2, 14)}
    tl1 = [r for r in p.wal_ranges if r["timeline"] == 1]
    assert tl1 and all(r["whole_timeline"] for r in tl1)
    assert tl1[-1]["partial"] == 1


def test_a_backup_before_the_switch_keeps_its_timeline_up_to_the_switch() -> None:
    p = plan(promoted(), redundancy=3)
    assert kept(p) == ["b4", "b3", "b2"]
    assert p.wal_kept_from == {1: seg(1, 6), 2: seg(2, 9)}
    assert seg(1, 9) + ".partial" not in p.wal_removed


def test_after_an_in_place_restore_the_newest_timeline_keeps_a_backup_that_reaches_it() -> None:
    """b2 was taken on timeline 1 after the point timeline 2 later branched off from."""
    switch = 5 * SEG + 0x100
    g = Gen().segments(1, range(1, 12)).partial(1, 12)
    g.branch(2, [(1, switch)]).segments(2, range(5, 8))
    g.backup(record("b1", 1, 2, when=ago(days=3)))
    g.backup(record("b2", 1, 8, when=ago(days=2)))  # on the abandoned end of timeline 1
    p = plan(g, redundancy=1)
    # The newest backup (b2) cannot reach timeline 2; b1 can, so it stays too.
    assert kept(p) == ["b2", "b1"]
    assert reasons(p)["b1"] == ["redundancy"]
    assert p.wal_kept_from == {1: seg(1, 2), 2: seg(2, 5)}
    # The recovery window does the same per timeline.
    w = plan(g, recovery_window=0.5 * DAY)
    assert reasons(w) == {"b2": ["window_base"], "b1": ["window_base"]}


def test_a_timeline_without_history_file_keeps_its_wal() -> None:
    g = promoted().segments(3, range(22, 26))  # no 00000003.history
    p = plan(g, redundancy=1)
    assert not any(n.startswith("00000003") for n in p.wal_removed)
    assert any("timeline 3 has no history file" in w and "its WAL is kept" in w for w in p.warnings)
    g.backup(record("b5", 3, 24, when=ago(hours=1)))
    p = plan(g, redundancy=1)
    # b5 is newest; b4 is the newest backup of the newest timeline that can be followed.
    assert kept(p) == ["b5", "b4"]
    assert p.wal_removed == []
    assert any("timeline 3 of a kept backup cannot be followed" in w for w in p.warnings)


def test_three_timelines_with_a_dead_branch() -> None:
    """TL2 branched from TL1 at segment 4 and died; TL3 branched from TL1 at segment 10."""
    g = Gen().segments(1, range(1, 13)).partial(1, 10)
    g.branch(2, [(1, 4 * SEG + 0x10)]).segments(2, range(4, 7)).partial(2, 7)
    g.branch(3, [(1, 10 * SEG + 0x10)]).segments(3, range(10, 20))
    g.backup(record("b1", 1, 2, when=ago(days=3)))
    g.backup(record("b2", 1, 6, when=ago(days=2)))
    g.backup(record("b3", 3, 15, when=ago(days=1)))
    p = plan(g, redundancy=2)
    assert kept(p) == ["b3", "b2"]
    # b2 (TL1, segment 6) reaches TL3 and TL1 but not TL2, which branched before it.
    assert p.wal_kept_from == {1: seg(1, 6), 2: None, 3: seg(3, 10)}


def test_backup_files_go_with_their_backup_not_by_position() -> None:
    g = one_timeline()
    stray = f"{seg(1, 3)}.00000100.backup"  # no catalogued backup started there
    g.add(stray, size=300)
    p = plan(g, redundancy=3)
    # b1 removed: its .backup file goes although segment 2 (its start) goes too; the stray
    # one goes by the segment rule (segment 3 is older than b2's start, 8).
    assert backup_file_name(g.backups[0]) in p.wal_removed
    assert stray in p.wal_removed
    assert backup_file_name(g.backups[1]) not in p.wal_removed


# Dumps --------------------------------------------------------------------------------------


def dump(label: str, database: str, when: dt.datetime, **changes: t.Any) -> dumps.DumpRecord:
    rec = dumps.DumpRecord(
        label=label,
        database=database,
        status="ok",
        verified=True,
        start_time=iso(when - dt.timedelta(minutes=1)),
        end_time=iso(when),
        size=500,
    )
    return rec.with_changes(**changes)


def test_dumps_are_kept_per_database_by_count_and_age() -> None:
    g = one_timeline()
    g.dumps = [
        dump("shop-1", "shop", ago(days=5)),
        dump("shop-2", "shop", ago(days=3)),
        dump("shop-3", "shop", ago(days=1)),
        dump("crm-1", "crm", ago(days=9)),
        dump("crm-2", "crm", ago(days=8), status="failed", verified=False),
        dump("g-1", "globals", ago(days=6), scope="globals"),
        dump("g-2", "globals", ago(days=2), scope="globals"),
    ]
    p = plan(g, redundancy=1, dump_max_age=4 * DAY)
    d = {x.label: list(x.reasons) for x in p.dumps}
    assert d["shop-3"] == ["redundancy", "window"]
    assert d["shop-2"] == ["window"]
    assert d["shop-1"] == ["expired"]
    assert d["crm-1"] == ["redundancy"]  # the newest of its database, however old
    assert d["crm-2"] == ["newest_unusable"]  # no newer usable crm dump yet
    assert d["g-2"] == ["redundancy", "window"] and d["g-1"] == ["expired"]
    assert p.bytes_freed >= 1000
    g.pins["dumps"] = {"shop-1"}
    assert "shop-1" not in [x.label for x in plan(g, redundancy=1).dumps_removed]


# Check mode, removal, re-run, interruption (in-memory repository) -----------------------------


def memory_repo(gen: Gen) -> tuple[Repository, MemoryStorage]:
    """A real repository (envelopes, catalog records, backup files) holding ``gen``."""
    storage = MemoryStorage()
    repo = Repository(storage)
    fill(repo, gen)
    return repo, storage


def fill(repo: Repository, gen: Gen) -> None:
    storage = repo.storage
    repo.ensure_identity(IDENTITY)
    for w, _info in gen.wal:
        data = gen.histories[w.timeline].encode() if w.kind == HISTORY else b"w" * 64
        repo.put_wal(w.name, data, "none")
    for rec in gen.backups:
        storage.put(f"{repo.backup_prefix(rec.label)}/base.tar", b"b" * 100)
        storage.put(f"{repo.backup_prefix(rec.label)}/pg_wal/x", b"x" * 10)
        catalog.write_backup(repo, rec)
    for d in gen.dumps:
        storage.put(f"{repo.dump_prefix(d.label)}/database.dump", b"d" * 50)
        dumps.write_dump(repo, d)


def run(repo: Repository, check: bool = False, **kwargs: t.Any) -> dict[str, t.Any]:
    policy = RetentionPolicy(**{k: kwargs.pop(k) for k in list(kwargs) if k != "pin"})
    return retention.run_retention(
        repo, policy, IDENTITY, check_mode=check, pin=kwargs.get("pin", ()), now=NOW
    )


def test_check_mode_is_the_preview_and_the_real_run_removes_exactly_that() -> None:
    g = promoted()
    g.dumps = [dump("shop-1", "shop", ago(days=5)), dump("shop-2", "shop", ago(days=1))]
    repo, storage = memory_repo(g)
    before = dict(storage.objects)
    names_before = {w.name for w, _info in repo.list_wal()}
    expected = plan_retention(retention.read_state(repo), RetentionPolicy(redundancy=2), NOW)
    calls = len(storage.calls)
    preview = run(repo, check=True, redundancy=2, dump_redundancy=1)
    assert storage.objects == before  # nothing changed, nothing locked
    assert not [c for c in storage.calls[calls:] if c[0] in ("put", "delete", "lock")]
    assert preview["changed"] is True
    assert preview["backups_removed"] == ["b2", "b1"]
    assert preview["dumps_removed"] == ["shop-1"]
    assert preview["continuity"]["continuous"] is True
    done = run(repo, redundancy=2, dump_redundancy=1)
    for key in ("backups_removed", "dumps_removed", "wal_removed", "bytes_freed"):
        assert done[key] == preview[key], key
    assert [r.label for r in catalog.list_backups(repo)] == ["b4", "b3"]
    assert [d.label for d in dumps.list_dumps(repo)] == ["shop-2"]
    left = {w.name for w, _info in repo.list_wal()}
    assert expected.wal_removed and left == names_before - set(expected.wal_removed)
    assert not any(k.startswith(("backups/b1/", "backups/b2/")) for k in storage.objects)
    assert "00000002.history" in left
    assert not any(n.startswith("00000001") for n in left)
    assert done["continuity"]["continuous"] is True
    assert done["continuity"]["oldest_backup"] == "b3"
    # Both locks were taken.
    assert ("lock", "backup") in storage.calls and ("lock", "dump") in storage.calls
    again = run(repo, redundancy=2, dump_redundancy=1)
    assert again["changed"] is False
    assert again["backups_removed"] == [] and again["wal_removed_files"] == 0


class PowerCut:
    """A storage delete that works ``limit`` times, then fails as if the power went."""

    def __init__(self, delete: t.Callable[[str], None], limit: int) -> None:
        self.delete, self.limit, self.done = delete, limit, 0

    def __call__(self, key: str) -> None:
        if self.done >= self.limit:
            raise RepositoryError("power cut")
        self.done += 1
        self.delete(key)


def test_an_interrupted_prune_keeps_every_kept_backup_restorable_and_a_rerun_finishes() -> None:
    g = promoted()
    reference_repo, reference = memory_repo(g)
    run(reference_repo, redundancy=2)
    final = dict(reference.objects)
    deletes = sum(1 for c in reference.calls if c[0] == "delete")
    assert deletes > 10
    for stop_after in range(deletes):
        repo, storage = memory_repo(g)
        real_delete = storage.delete
        storage.delete = PowerCut(real_delete, stop_after)  # type: ignore[method-assign]
        with pytest.raises(RepositoryError, match="power cut"):
            run(repo, redundancy=2)
        # Every kept backup is intact and usable, and the WAL it needs is all there.
        for label in ("b3", "b4"):
            rec = catalog.read_backup(repo, label)
            assert rec is not None and catalog.usable(rec)
            assert f"backups/{label}/base.tar" in storage.objects
        wal = repo.list_wal()
        report = continuity.check_continuity(
            [r for r in catalog.list_backups(repo) if r.label in ("b3", "b4")],
            wal,
            continuity.read_histories(repo, wal),
            SEG,
        )
        assert report["gaps"] == [], stop_after
        # A removed backup is never usable again, even when its files are still there.
        for label in ("b1", "b2"):
            rec = catalog.read_backup(repo, label)
            assert rec is None or rec.status == "expiring", (stop_after, rec)
        storage.delete = real_delete  # type: ignore[method-assign]
        run(repo, redundancy=2)
        assert dict(storage.objects).keys() == final.keys(), stop_after


def test_wal_archived_while_the_prune_runs_is_never_removed() -> None:
    g = one_timeline()
    repo, storage = memory_repo(g)
    real_delete = storage.delete

    def archive_meanwhile(key: str) -> None:
        storage.delete = real_delete  # type: ignore[method-assign]
        # Archiving goes on: a new segment, and an old one archived again after a crash.
        repo.put_wal(seg(1, 31), b"n" * 64, "none")
        repo.put_wal(seg(1, 3) + ".partial", b"p" * 64, "none")
        real_delete(key)

    storage.delete = archive_meanwhile  # type: ignore[method-assign]
    done = run(repo, redundancy=1)
    names = {w.name for w, _info in repo.list_wal()}
    assert seg(1, 31) in names and seg(1, 3) + ".partial" in names
    assert seg(1, 3) not in names and done["wal_removed_files"] > 0


def test_a_prune_waits_for_no_one_holding_the_backup_lock() -> None:
    repo, storage = memory_repo(one_timeline())
    with storage.lock("backup", purpose="base backup x"):
        with pytest.raises(LockHeldError, match="base backup x"):
            run(repo, redundancy=1)
        assert run(repo, check=True, redundancy=1)["backups_removed"] == ["b3", "b2", "b1"]
    assert len(catalog.list_backups(repo)) == 4


def test_identity_must_match_and_the_repository_be_initialised() -> None:
    repo, _storage = memory_repo(one_timeline())
    other = RepositoryIdentity(SYSID + 1, 15, SEG)
    with pytest.raises(IdentityMismatchError, match="belongs to another cluster"):
        retention.run_retention(repo, RetentionPolicy(redundancy=1), other, check_mode=True)
    assert len(catalog.list_backups(repo)) == 4
    empty = Repository(MemoryStorage())
    with pytest.raises(RepositoryError, match="not initialised"):
        retention.run_retention(empty, RetentionPolicy(redundancy=1), IDENTITY, check_mode=False)
    with pytest.raises(RetentionError, match="no retention policy given"):
        retention.run_retention(repo, RetentionPolicy(), IDENTITY, check_mode=False)


def test_pins_are_stored_beside_the_backup_and_honoured() -> None:
    repo, storage = memory_repo(one_timeline())
    preview = run(repo, check=True, redundancy=1, pin=["b1"])
    assert preview["pins_changed"] == {"pinned": ["b1"], "unpinned": []}
    assert "b1" not in preview["backups_removed"]
    assert "pins/backups/b1.json" not in storage.objects  # check mode writes nothing
    done = run(repo, redundancy=1, pin=["b1"])
    pin = json.loads(storage.objects["pins/backups/b1.json"])
    assert pin["label"] == "b1" and pin["kind"] == "backups" and pin["since"] == iso(NOW)
    assert done["pins"] == {"backups": ["b1"], "dumps": []}
    assert [r.label for r in catalog.list_backups(repo)] == ["b4", "b1"]
    # The backup's own directory is untouched by the pin.
    assert sorted(k for k in storage.objects if k.startswith("backups/b1/")) == [
        "backups/b1/backup.json",
        "backups/b1/base.tar",
        "backups/b1/pg_wal/x",
    ]
    unpinned = retention.run_retention(
        repo, RetentionPolicy(redundancy=1), IDENTITY, check_mode=False, unpin=["b1"], now=NOW
    )
    assert unpinned["pins_changed"]["unpinned"] == ["b1"]
    assert unpinned["backups_removed"] == ["b1"]
    with pytest.raises(RetentionError, match="no base backup or logical dump has that label"):
        run(repo, check=True, redundancy=1, pin=["nope"])


# Restore leases --------------------------------------------------------------------------------


def test_an_active_lease_keeps_its_backup_and_the_wal_it_needs_an_expired_one_does_not() -> None:
    p = plan(one_timeline().lease("b1"), redundancy=1)
    assert kept(p) == ["b4", "b1"]
    assert reasons(p)["b1"] == ["leased"]
    assert p.wal_kept_from == {1: seg(1, 2)}
    # b1 reads from segment 2 on: only segment 1 goes, and the .backup files of b2 and b3.
    assert [n for n in p.wal_removed if not n.endswith(".backup")] == [seg(1, 1)]
    assert backup_file_name(one_timeline().backups[0]) not in p.wal_removed
    leased = next(d for d in p.backups if d.label == "b1").to_dict()
    assert leased["leases"] == [
        {
            "lease_id": "db1-0",
            "backup": "b1",
            "host": "db1",
            "data_dir": "/srv/drill",
            "target": "latest",
            "timeline": 1,
            "first_segment": seg(1, 2),
            "expires": iso(ago(hours=1) + dt.timedelta(days=1)),
        }
    ]
    assert [x["lease_id"] for x in p.to_dict()["leases"]] == ["db1-0"]
    # The same lease, expired: it protects nothing.
    expired = plan(one_timeline().lease("b1", expired=True), redundancy=1)
    assert kept(expired) == ["b4"]
    assert expired.wal_kept_from == {1: seg(1, 22)}
    assert expired.to_dict()["leases"] == [] and expired.to_dict()["leases_expired"] == ["db1-0"]


def test_a_lease_on_a_backup_between_kept_ones_and_its_first_segment_are_kept() -> None:
    p = plan(one_timeline().lease("b2"), redundancy=1)
    assert kept(p) == ["b4", "b2"]
    assert p.wal_kept_from == {1: seg(1, 8)}
    # A lease whose backup is not in the catalog still keeps WAL from its first segment.
    g = one_timeline().lease("gone", first=seg(1, 12))
    p = plan(g, redundancy=1)
    assert kept(p) == ["b4"]
    assert p.wal_kept_from == {1: seg(1, 12)}
    assert seg(1, 11) in p.wal_removed and seg(1, 12) not in p.wal_removed


def test_a_lease_on_the_abandoned_timeline_keeps_its_branch() -> None:
    p = plan(promoted().lease("b1"), redundancy=2)
    assert kept(p) == ["b4", "b3", "b1"]
    removed = set(p.wal_removed)
    # b1 (timeline 1, start 2) reaches timeline 2 through the switch in segment 9.
    assert not removed & {seg(1, n) for n in range(2, 9)}
    assert seg(1, 1) in removed
    assert not removed & {seg(2, n) for n in range(9, 25)}


def test_an_unreadable_lease_keeps_every_backup_and_names_its_file() -> None:
    g = one_timeline()
    g.unreadable_leases.append(
        Unreadable("leases/restore/x.json", "/repo/leases/restore/x.json", "not JSON")
    )
    p = plan(g, redundancy=1)
    assert kept(p) == ["b4", "b3", "b2", "b1"]
    assert set(reasons(p)["b1"]) == {"lease_unreadable"}
    assert any(
        "/repo/leases/restore/x.json cannot be read (not JSON)" in w and "remove that file" in w
        for w in p.warnings
    )
    # Only what no backup needs goes: the segment before the oldest backup's start.
    assert p.wal_removed == [seg(1, 1)]
    assert p.to_dict()["leases_unreadable"] == [
        {"key": "leases/restore/x.json", "path": "/repo/leases/restore/x.json", "why": "not JSON"}
    ]


def take_lease(repo: Repository, label: str, *, now: dt.datetime = NOW, ttl: float = DAY) -> Lease:
    rec = catalog.read_backup(repo, label)
    assert rec is not None
    taken = restore_lease.take(
        repo,
        backup_label=label,
        data_dir=f"/srv/restore-{label}",
        target="latest",
        first_segment=rec.start_wal,
        timeline=int(rec.timeline),
        ttl_seconds=ttl,
        host="drill1",
        now=now,
    )
    assert taken.lease is not None, taken.reason
    return taken.lease


def test_prune_keeps_a_leased_backup_removes_expired_leases_and_after_drop_the_backup() -> None:
    repo, storage = memory_repo(one_timeline())
    lease = take_lease(repo, "b1")
    old = take_lease(repo, "b2", now=NOW - dt.timedelta(days=2))  # expired a day ago
    before = dict(storage.objects)
    preview = run(repo, check=True, redundancy=1)
    assert storage.objects == before  # check mode removes no lease either
    assert preview["backups_kept"] == ["b4", "b1"]
    assert preview["backups_removed"] == ["b3", "b2"]
    assert {b["label"]: b["reasons"] for b in preview["backups"]}["b1"] == ["leased"]
    assert preview["leases_removed"] == [old.lease_id]
    assert preview["wal_kept_from"] == {"1": seg(1, 2)}
    assert "kept in use by a restore: b1 (drill1:/srv/restore-b1)" in preview["msg"]
    done = run(repo, redundancy=1)
    for key in ("backups_removed", "wal_removed", "leases_removed", "leases"):
        assert done[key] == preview[key], key
    assert [r.label for r in catalog.list_backups(repo)] == ["b4", "b1"]
    assert seg(1, 2) in {w.name for w, _info in repo.list_wal()}
    assert old.key not in storage.objects and lease.key in storage.objects
    assert done["continuity"]["continuous"] is True
    assert done["continuity"]["oldest_backup"] == "b1"
    again = run(repo, redundancy=1)
    assert again["changed"] is False and again["leases_removed"] == []
    restore_lease.drop(repo, lease.lease_id)
    after = run(repo, redundancy=1)
    assert after["backups_removed"] == ["b1"] and after["leases"] == []
    assert [r.label for r in catalog.list_backups(repo)] == ["b4"]
    assert min(w.name for w, _info in repo.list_wal() if w.kind == "segment") == seg(1, 22)


def test_an_unreadable_lease_file_stops_backup_removal_in_a_real_prune_too() -> None:
    repo, storage = memory_repo(one_timeline())
    storage.put("leases/restore/broken.json", b"{")
    done = run(repo, redundancy=1)
    assert done["backups_removed"] == []
    assert len(catalog.list_backups(repo)) == 4
    assert any(
        "restore lease leases/restore/broken.json in memory://test cannot be read (Expecting" in w
        for w in done["warnings"]
    ), done["warnings"]
    assert "leases/restore/broken.json" in storage.objects  # never removed by a prune
    storage.delete("leases/restore/broken.json")
    assert run(repo, redundancy=1)["backups_removed"] == ["b3", "b2", "b1"]


def test_a_lease_taken_while_the_prune_plans_stops_it_before_anything_is_removed() -> None:
    repo, storage = memory_repo(one_timeline())
    before = dict(storage.objects)
    taken: list[Lease] = []

    def restore_starts(key: str, data: bytes) -> None:
        # The first put of the prune marks b3 expiring; the restore of b1 takes its lease
        # just before that, so the plan (made earlier) does not know it.
        assert key == "backups/b3/backup.json", key
        taken.append(take_lease(repo, "b1"))
        storage.before_put = None

    storage.before_put = restore_starts
    with pytest.raises(RetentionError, match="drill1:/srv/restore-b1 took a lease on backup b1"):
        run(repo, redundancy=1)
    (lease,) = taken
    left = {k: v for k, v in storage.objects.items() if k != lease.key}
    assert left == before  # every record back as it was, nothing removed
    again = run(repo, redundancy=1)
    assert again["backups_removed"] == ["b3", "b2"]
    assert [r.label for r in catalog.list_backups(repo)] == ["b4", "b1"]


def test_a_restore_cannot_lease_a_backup_the_prune_already_marked() -> None:
    repo, storage = memory_repo(one_timeline())
    refused: list[str] = []
    real_delete = storage.delete

    def restore_starts(key: str) -> None:
        # Deleting starts after every record was marked: too late for a lease on b1.
        storage.delete = real_delete  # type: ignore[method-assign]
        with pytest.raises(restore_lease.LeaseError, match="being removed") as exc:
            take_lease(repo, "b1")
        refused.append(str(exc.value))
        real_delete(key)

    storage.delete = restore_starts  # type: ignore[method-assign]
    done = run(repo, redundancy=1)
    assert refused and done["backups_removed"] == ["b3", "b2", "b1"]
    assert not [k for k in storage.objects if k.startswith("leases/")]


def fake_data_directory(path: Path, sysid: int) -> Path:
    """Just what ``cluster_identity_from_datadir`` reads: pg_control's first bytes, PG_VERSION."""
    (path / "global").mkdir(parents=True)
    (path / "global" / "pg_control").write_bytes(struct.pack("<Q", sysid) + bytes(100))
    (path / "PG_VERSION").write_text("15\n")
    (path / "pg_wal").mkdir()
    return path


def test_pitr_prune_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    repo = Repository.open_posix(str(tmp_path / "repo"))
    (tmp_path / "repo").mkdir()
    fill(repo, one_timeline())
    pgdata = fake_data_directory(tmp_path / "data", SYSID)
    argv = ["--repo", str(tmp_path / "repo"), "--pgdata", str(pgdata), "--redundancy", "2"]
    assert retention.host_main([*argv, "--dry-run"]) == 0
    out, err = capsys.readouterr()
    preview = json.loads(out)
    assert preview["backups_removed"] == ["b2", "b1"] and preview["changed"] is True
    assert "pitr-prune: retention would remove 2 base backup(s)" in err
    assert len(catalog.list_backups(repo)) == 4
    assert retention.host_main(argv) == 0
    assert json.loads(capsys.readouterr()[0])["backups_removed"] == ["b2", "b1"]
    assert [r.label for r in catalog.list_backups(repo)] == ["b4", "b3"]
    assert not (tmp_path / "repo" / "backups" / "b1").exists()
    other = fake_data_directory(tmp_path / "other", SYSID + 1)
    assert retention.host_main([*argv[:3], str(other), "--redundancy", "1"]) == 1
    out, err = capsys.readouterr()
    assert json.loads(out)["failed"] is True
    assert "FAILED: this repository" in err and "belongs to another cluster" in err
    assert [r.label for r in catalog.list_backups(repo)] == ["b4", "b3"]


# Continuity ---------------------------------------------------------------------------------


def test_continuity_reports_every_gap_from_the_oldest_backup() -> None:
    g = promoted()
    g.wal = [(w, i) for w, i in g.wal if w.name not in (seg(1, 7), seg(2, 16), seg(2, 17))]
    report = continuity.check_continuity(g.backups, g.wal, g.histories, SEG)
    assert report["continuous"] is False
    assert [(x["timeline"], x["from_wal"], x["to_wal"]) for x in report["gaps"]] == [
        (1, seg(1, 7), seg(1, 7)),
        (2, seg(2, 16), seg(2, 17)),
    ]
    tl1 = report["timelines"][0]
    # Timeline 1 is walked from b1's start up to the segment before the switch.
    assert (tl1["from_wal"], tl1["to_wal"]) == (seg(1, 2), seg(1, 8))
    assert report["oldest_backup"] == "b1"
    assert "WAL segment 000000010000000000000007 is missing" in report["reason"]


def test_continuity_sees_a_missing_tail_before_a_timeline_switch() -> None:
    g = promoted()
    g.wal = [(w, i) for w, i in g.wal if w.name != seg(1, 8)]  # the last one before the switch
    report = continuity.check_continuity(g.backups, g.wal, g.histories, SEG)
    assert [x["from_wal"] for x in report["gaps"]] == [seg(1, 8)]


def test_continuity_ignores_timelines_no_backup_reaches_and_reports_missing_history() -> None:
    g = promoted().segments(3, range(30, 32))
    g.backups = [b for b in g.backups if b.label in ("b3", "b4")]
    g.wal = [(w, i) for w, i in g.wal if not (w.timeline == 1 and w.segment_number(SEG) == 4)]
    report = continuity.check_continuity(g.backups, g.wal, g.histories, SEG)
    assert report["gaps"] == []  # timeline 1 is not reachable from b3 or b4
    assert report["timelines"][0]["reachable"] is False
    assert report["missing_history"] == [3]
    assert report["continuous"] is False and "timeline 3 has no history file" in report["reason"]


def test_continuity_without_usable_backups_checks_each_timeline_end_to_end() -> None:
    g = Gen().segments(1, [1, 2, 4, 5])
    report = continuity.check_continuity([], g.wal, {}, SEG)
    assert [x["from_wal"] for x in report["gaps"]] == [seg(1, 3)]
    assert "no usable base backup" in report["reason"]


# Property: nothing a kept backup or the window needs is ever planned for deletion ------------


@st.composite
def repositories(draw: st.DrawFn) -> tuple[Gen, RetentionPolicy]:
    g = Gen()
    # Timelines: 1, then up to three more, each branching from an earlier one at a segment
    # within the parent's archived range.
    ranges: dict[int, tuple[int, int]] = {1: (1, draw(st.integers(4, 40)))}
    history: dict[int, list[tuple[int, int]]] = {1: []}
    for tli in range(2, draw(st.integers(1, 4)) + 1):
        parent = draw(st.sampled_from(sorted(ranges)))
        lo, hi = ranges[parent]
        at = draw(st.integers(lo, hi))
        switch = at * SEG + draw(st.integers(0x28, SEG - 1))
        history[tli] = [*history[parent], (parent, switch)]
        ranges[tli] = (at, at + draw(st.integers(0, 30)))
        if draw(st.booleans()):
            g.partial(parent, at)
    age = {tli: draw(st.floats(0, 20)) for tli in ranges}
    for tli, (lo, hi) in ranges.items():
        holes = draw(st.sets(st.integers(lo, hi), max_size=3))
        g.segments(tli, [n for n in range(lo, hi + 1) if n not in holes], when=ago(days=age[tli]))
        if tli > 1 and draw(st.integers(0, 9)) > 0:  # now and then a history file is lost
            g.branch(tli, history[tli])
    for i in range(draw(st.integers(0, 7))):
        tli = draw(st.sampled_from(sorted(ranges)))
        lo, hi = ranges[tli]
        start = draw(st.integers(lo, hi))
        stop = min(start + draw(st.integers(0, 2)), hi)
        status = draw(st.sampled_from(["ok", "ok", "ok", "failed", "expiring", "running"]))
        rec = record(
            f"b{i}",
            tli,
            start,
            stop=stop,
            when=ago(days=draw(st.floats(0, 20))),
            status=status,
            verified=status == "ok" and draw(st.integers(0, 5)) > 0,
        )
        g.backup(rec, with_file=draw(st.booleans()))
        if draw(st.integers(0, 6)) == 0:
            g.pin(rec.label)
        lease = draw(st.integers(0, 9))
        if lease < 2 and status == "ok":  # a restore reads it, or did (an expired lease)
            g.lease(rec.label, expired=lease == 1)
    policy = RetentionPolicy(
        redundancy=draw(st.none() | st.integers(1, 3)),
        recovery_window=draw(st.none() | st.floats(0.1, 15).map(lambda d: d * DAY)),
        min_backups=draw(st.integers(1, 2)),
    )
    return g, policy


def needed_files(g: Gen, p: retention.RetentionPlan) -> set[str]:
    """Every segment name a restore from a kept backup reads, on any timeline it can reach,
    from its start segment to the newest archived segment: PostgreSQL's own file choice
    (``recovery.segment_on_path``), an independent reading of the history files."""
    timelines = {w.timeline for w, _i in g.wal} | set(g.histories) | {b.timeline for b in g.backups}
    newest = max((w.segment_number(SEG) for w, _i in g.wal if w.kind != HISTORY), default=0)
    needed: set[str] = set()
    for d in p.backups:
        if not (d.keep and d.record.status == "ok"):
            continue
        b = d.record
        start = WalFileName.parse(b.start_wal).segment_number(SEG)
        for target in timelines:
            try:
                path = timeline_path(target, g.histories)
            except Exception:
                continue  # PostgreSQL cannot follow it either
            span = span_of(path, b.timeline)
            if span is None or (span.end is not None and parse_lsn(b.stop_lsn) > span.end):
                continue
            for n in range(start, newest + 1):
                needed.add(segment_on_path(path, n, SEG))
    return needed


@settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(repositories())
def test_no_planned_deletion_is_needed_by_a_kept_backup_or_the_window(
    case: tuple[Gen, RetentionPolicy],
) -> None:
    g, policy = case
    state = g.state()
    p = plan_retention(state, policy, NOW)
    removed = set(p.wal_removed)
    kept_labels = {d.label for d in p.backups if d.keep}
    # Nothing a kept backup reads on its way to any point of any timeline it reaches.
    assert not (removed & needed_files(g, p))
    # History files always stay; a .backup file goes only with its backup or its segment.
    assert not any(WalFileName.parse(n).kind == HISTORY for n in removed)
    for n in removed:
        w = WalFileName.parse(n)
        if w.kind == BACKUP:
            owners = [b for b in g.backups if backup_file_name(b) == n]
            assert not owners or all(o.label not in kept_labels for o in owners)
    # Pinned, leased and running backups stay; expiring ones go unless pinned.
    leased = {lease.backup_label for lease in g.leases if lease.is_active(NOW)}
    for b in g.backups:
        if b.label in g.pins.get("backups", set()) | leased or b.status == "running":
            assert b.label in kept_labels
            assert (KEEP_LEASED in dict(reasons(p))[b.label]) == (b.label in leased)
        elif b.status == "expiring":
            assert b.label not in kept_labels
    good = sorted(
        (b for b in g.backups if catalog.usable(b)),
        key=lambda b: (b.stop_time, b.label),
        reverse=True,
    )
    kept_good = [b for b in good if b.label in kept_labels]
    assert len(kept_good) >= min(policy.min_backups, len(good))
    if good:
        assert kept_good, "a prune never removes every usable backup"
    if policy.redundancy is not None:
        assert {b.label for b in good[: policy.redundancy]} <= kept_labels
    if policy.recovery_window is not None:
        start = NOW - dt.timedelta(seconds=policy.recovery_window)
        # Every backup inside the window stays ...
        assert {b.label for b in good if retention.parse_time(b.stop_time) >= start} <= kept_labels
        # ... and for each timeline with WAL in the window, a backup from before the window
        # that reaches it stays, whenever one existed.
        for tli in set(g.histories) | {1}:
            try:
                path = timeline_path(tli, g.histories)
            except Exception:
                continue
            active = [i for w, i in g.wal if w.timeline == tli and i.mtime >= start.timestamp()]
            if not active:
                continue

            anchors = [(b, continuity.anchor_of(b, SEG)) for b in good]
            before = [
                b
                for b, a in anchors
                if retention.parse_time(b.stop_time) <= start
                and a is not None
                and continuity.reaches(a, path)
            ]
            if before:
                assert any(b.label in kept_labels for b in before)
    # The WAL removed is exactly what the report counts.
    assert sum(r["segments"] + r["partial"] + r["backup_files"] for r in p.wal_ranges) == len(
        removed
    )


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(repositories())
def test_on_one_timeline_everything_before_the_oldest_kept_start_goes(
    case: tuple[Gen, RetentionPolicy],
) -> None:
    """The other half: the planner is not merely timid."""
    g, policy = case
    if set(g.histories) or any(w.timeline != 1 for w, _i in g.wal):
        return
    p = plan_retention(g.state(), policy, NOW)
    anchors = [
        WalFileName.parse(d.record.start_wal).segment_number(SEG)
        for d in p.backups
        if d.keep and d.record.status == "ok"
    ]
    if anchors:  # a lease names its backup's start segment: never below the oldest anchor
        anchors += [
            WalFileName.parse(lease.first_segment).segment_number(SEG)
            for lease in g.leases
            if lease.is_active(NOW) and lease.first_segment
        ]
    if not anchors:
        assert p.wal_removed == []
        return
    cut = min(anchors)
    for w, _i in g.wal:
        if w.kind in ("segment", "partial"):
            assert (w.name in p.wal_removed) == (w.segment_number(SEG) < cut)

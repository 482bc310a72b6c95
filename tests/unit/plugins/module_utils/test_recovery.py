# Copyright: contributors to pitr.postgresql
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The recovery planner: targets, timelines, backup selection, WAL presence, the plan."""

from __future__ import annotations

import os
import typing as t
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from ansible_collections.pitr.postgresql.plugins.module_utils import recovery
from ansible_collections.pitr.postgresql.plugins.module_utils.catalog import BackupRecord
from ansible_collections.pitr.postgresql.plugins.module_utils.recovery import (
    DataDirState,
    RecoveryPlanError,
    RestoreRequest,
    SegmentSummary,
    TargetError,
    TimelineSpan,
    parse_target,
    parse_target_time,
)
from ansible_collections.pitr.postgresql.plugins.module_utils.storage import ObjectInfo
from ansible_collections.pitr.postgresql.plugins.module_utils.walfile import (
    WalFileName,
    segment_name,
)

SEG = 16 * 1024 * 1024
T0 = datetime(2026, 11, 25, 10, 0, 0, tzinfo=UTC)


# --------------------------------------------------------------------------------------------
# Target validation

GOOD_TIMES = [
    ("2026-11-25 10:30:00+00", "2026-11-25 10:30:00+00"),
    ("2026-11-25 10:30:00 +00", "2026-11-25 10:30:00+00"),
    ("2026-11-25T10:30:00Z", "2026-11-25 10:30:00+00"),
    ("2026-11-25 10:30+00", "2026-11-25 10:30:00+00"),
    ("2026-11-25 10:30:00.25+00", "2026-11-25 10:30:00.250000+00"),
    ("2026-11-25 10:30:00.123456+00:00", "2026-11-25 10:30:00.123456+00"),
    ("2026-11-25 11:30:00+01", "2026-11-25 10:30:00+00"),
    ("2026-11-25 16:00:00+0530", "2026-11-25 10:30:00+00"),
    ("2026-11-25 02:30:00-08:00", "2026-11-25 10:30:00+00"),
    ("2026-11-25 11:30:00 Europe/Berlin", "2026-11-25 10:30:00+00"),  # CET in winter
    ("2026-07-01 12:30:00 Europe/Berlin", "2026-07-01 10:30:00+00"),  # CEST in summer
    ("2026-11-25 05:30:00 America/New_York", "2026-11-25 10:30:00+00"),
    ("2026-11-25 10:30:00 UTC", "2026-11-25 10:30:00+00"),
    ("2026-11-25 10:30:00 Etc/UTC", "2026-11-25 10:30:00+00"),
    ("  2026-11-25 10:30:00+00  ", "2026-11-25 10:30:00+00"),
]


@pytest.mark.parametrize(("text", "expected"), GOOD_TIMES)
def test_accepted_times_are_normalised_to_utc(text: str, expected: str) -> None:
    target = parse_target(target_time=text)
    assert target.kind == "time"
    assert target.value == expected
    assert target.time is not None and target.time.utcoffset() == timedelta(0)


BAD_TIMES = [
    ("2026-11-25 10:30:00", "no time zone"),
    ("2026-11-25T10:30:00", "no time zone"),
    ("2026-11-25 10:30:00 CET", "abbreviation"),
    ("2026-11-25 10:30:00 EST", "abbreviation"),
    ("2026-11-25 10:30:00 PST", "abbreviation"),
    ("2026-11-25 10:30:00 CEST", "abbreviation"),
    ("2026-11-25 10:30:00 GMT", "abbreviation"),
    ("2026-11-25 10:30:00 EST5EDT", "abbreviation"),
    ("2026-11-25 10:30:00 Europe/Atlantis", "not a time zone"),
    ("2026-11-25 10:30:00 +25", "not a valid UTC offset"),
    ("2026-11-25 10:30:00 UTC+3", "POSIX-style"),
    ("2026-11-25 10:30:00 +01 CET", "neither"),
    ("2026-11-25", "not a date and time"),
    ("yesterday", "not a date and time"),
    ("2026-02-30 10:30:00+00", "not a valid date"),
    ("2026-11-25 25:30:00+00", "not a valid date"),
    ("2026-10-25 02:30:00 Europe/Berlin", "happens twice"),  # clocks go back 03:00 -> 02:00
    ("2026-03-29 02:30:00 Europe/Berlin", "does not exist"),  # clocks jump 02:00 -> 03:00
]


@pytest.mark.parametrize(("text", "why"), BAD_TIMES)
def test_rejected_times_say_why_and_show_the_accepted_form(text: str, why: str) -> None:
    with pytest.raises(TargetError) as info:
        parse_target_time(text)
    assert why in info.value.msg
    assert "2026-11-25 10:30:00+00" in info.value.msg
    assert "Europe/Berlin" in info.value.msg


def test_exactly_one_target() -> None:
    with pytest.raises(TargetError, match="given: none"):
        parse_target()
    with pytest.raises(TargetError, match="given: target_lsn, target_time"):
        parse_target(target_time="2026-11-25 10:30:00+00", target_lsn="0/3000000")
    with pytest.raises(TargetError, match="given: target, target_name"):
        parse_target(target_name="before-upgrade", target="immediate")
    # Empty strings are "not given" (a playbook's default('') must not count as a target).
    assert parse_target(target_time="", target_name="x").kind == "name"


@pytest.mark.parametrize(
    ("kwargs", "kind", "value", "setting"),
    [
        ({"target_lsn": "0/3000148"}, "lsn", "0/3000148", "recovery_target_lsn"),
        ({"target_lsn": " 1/a0 "}, "lsn", "1/A0", "recovery_target_lsn"),
        ({"target_xid": "1234"}, "xid", "1234", "recovery_target_xid"),
        ({"target_xid": 1234}, "xid", "1234", "recovery_target_xid"),
        ({"target_name": "before upgrade"}, "name", "before upgrade", "recovery_target_name"),
        ({"target": "immediate"}, "immediate", "immediate", "recovery_target"),
        ({"target": "Latest"}, "latest", "", None),
    ],
)
def test_other_targets(kwargs: dict[str, t.Any], kind: str, value: str, setting: str) -> None:
    target = parse_target(**kwargs)
    assert (target.kind, target.value, target.setting_name) == (kind, value, setting)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"target_lsn": "3000148"}, "not an LSN"),
        ({"target_lsn": "0/0"}, "not a WAL position"),
        ({"target_lsn": "0/XYZ"}, "not an LSN"),
        ({"target_xid": "-5"}, "not a transaction ID"),
        ({"target_xid": "12a"}, "not a transaction ID"),
        ({"target_xid": "2"}, "not a normal transaction ID"),
        ({"target_name": "x" * 64}, "63-byte"),
        ({"target": "now"}, "not 'immediate'"),
        ({"target_name": "x", "inclusive": False}, "no meaning"),
        ({"target": "immediate", "inclusive": False}, "no meaning"),
        ({"target": "latest", "action": "pause"}, "needs a target to stop at"),
        ({"target": "latest", "action": "shutdown"}, "needs a target to stop at"),
        ({"target_xid": "1234", "action": "stop"}, "not one of"),
        ({"target_xid": "1234", "timeline": "newest"}, "not 'latest', 'current'"),
        ({"target_xid": "1234", "timeline": 0}, "out of range"),
    ],
)
def test_invalid_targets(kwargs: dict[str, t.Any], match: str) -> None:
    with pytest.raises(TargetError, match=match):
        parse_target(**kwargs)


def test_target_defaults_and_options() -> None:
    target = parse_target(target_xid="900")
    assert (target.inclusive, target.timeline, target.action) == (True, "latest", "promote")
    target = parse_target(target_xid="900", inclusive=False, timeline="2", action="pause")
    assert (target.inclusive, target.timeline, target.action) == (False, "2", "pause")
    assert parse_target(target_xid="900", timeline="current").timeline == "current"
    assert parse_target(target_xid="900", timeline=3).timeline == "3"


def test_recovery_settings_for_each_target() -> None:
    cmd = "/usr/bin/python3 -I -S /p/pitr-wal --repo /r fetch %f %p"
    time_t = parse_target(target_time="2026-11-25 10:30:00+00", inclusive=False)
    assert recovery.recovery_settings(time_t, cmd, 1) == {
        "restore_command": cmd,
        "recovery_target_time": "2026-11-25 10:30:00+00",
        "recovery_target_inclusive": "off",
        "recovery_target_action": "pause",
        "recovery_target_timeline": "1",
        "hot_standby": "on",
    }
    name_t = parse_target(target_name="rp", action="shutdown")
    settings = recovery.recovery_settings(name_t, cmd, 2)
    assert settings["recovery_target_name"] == "rp"
    assert "recovery_target_inclusive" not in settings
    # The role always pauses at the target to confirm it; the action comes after.
    assert settings["recovery_target_action"] == "pause"
    latest = recovery.recovery_settings(parse_target(target="latest"), cmd, 3)
    assert not any(
        k.startswith("recovery_target") and k != "recovery_target_timeline" for k in latest
    )
    assert latest["recovery_target_timeline"] == "3"


# --------------------------------------------------------------------------------------------
# Timelines

HISTORY_3 = "1\t0/5000000\tno recovery target specified\n\n2\t0/9000100\tat restore point\n"


def test_parse_history_and_paths() -> None:
    path = recovery.parse_history(HISTORY_3, 3)
    assert path == [
        TimelineSpan(1, 0, 0x5000000),
        TimelineSpan(2, 0x5000000, 0x9000100),
        TimelineSpan(3, 0x9000100, None),
    ]
    assert recovery.timeline_path(1, {}) == [TimelineSpan(1, 0, None)]
    with pytest.raises(RecoveryPlanError, match=r"00000004\.history"):
        recovery.timeline_path(4, {3: HISTORY_3})
    with pytest.raises(RecoveryPlanError, match="out of order"):
        recovery.parse_history("2\t0/5000000\tx\n1\t0/6000000\ty\n", 3)
    with pytest.raises(RecoveryPlanError, match="line 1"):
        recovery.parse_history("garbage\n", 2)


def test_resolve_timeline_like_postgresql() -> None:
    assert recovery.resolve_timeline("latest", 1, {2, 3}) == 3
    assert recovery.resolve_timeline("latest", 1, {3}) == 1  # 2 missing: probing stops
    assert recovery.resolve_timeline("current", 2, {3}) == 2
    assert recovery.resolve_timeline("5", 1, set()) == 5


def test_segment_on_path_takes_the_switch_segment_from_the_new_timeline() -> None:
    path = recovery.parse_history(HISTORY_3, 3)
    assert recovery.segment_on_path(path, 4) == "000000010000000000000004"
    assert recovery.segment_on_path(path, 5) == "000000020000000000000005"
    assert recovery.segment_on_path(path, 8) == "000000020000000000000008"
    assert recovery.segment_on_path(path, 9) == "000000030000000000000009"
    assert recovery.segment_on_path(path, 12) == "00000003000000000000000C"


# --------------------------------------------------------------------------------------------
# Fixtures: backups, WAL listings, an inspector


def backup(
    label: str,
    start_seg: int,
    stop_time: datetime,
    *,
    timeline: int = 1,
    stop_offset: int = 0x138,
    status: str = "ok",
    verified: bool = True,
    files: list[str] | None = None,
) -> BackupRecord:
    start_lsn = start_seg * SEG + 0x28
    stop_lsn = start_seg * SEG + stop_offset
    return BackupRecord(
        label=label,
        status=status,
        verified=verified,
        start_lsn=f"{start_lsn >> 32:X}/{start_lsn & 0xFFFFFFFF:X}",
        stop_lsn=f"{stop_lsn >> 32:X}/{stop_lsn & 0xFFFFFFFF:X}",
        start_wal=segment_name(timeline, start_seg),
        stop_wal=segment_name(timeline, (stop_lsn - 1) // SEG),
        start_time=(stop_time - timedelta(seconds=5)).isoformat(),
        stop_time=stop_time.isoformat(),
        timeline=timeline,
        system_identifier=7001,
        pg_version="15.14",
        pg_major=15,
        backup_format="tar",
        compression="server-zstd:1",
        wal_method="stream",
        size_on_disk=3 * SEG,
        cluster_size=30 * 1024 * 1024,
        files=files or ["base.tar.zst", "pg_wal.tar.zst", "backup_manifest"],
    )


def wal_listing(*names: str) -> list[tuple[WalFileName, ObjectInfo]]:
    out = []
    for name in names:
        w = WalFileName.parse(name)
        out.append((w, ObjectInfo(f"wal/{name[:16]}/{name}", 1_000_000, 0.0)))
    return out


def segments(timeline: int, first: int, last: int) -> list[str]:
    return [segment_name(timeline, n) for n in range(first, last + 1)]


class FakeInspector:
    """Commit times per segment (minutes after T0), and the last record LSN."""

    def __init__(self, commits: dict[str, list[float]], last_lsn: dict[str, int] | None = None):
        self.commits = commits
        self.last_lsn = last_lsn or {}
        self.calls: list[str] = []

    def summary(self, segment: str) -> SegmentSummary:
        self.calls.append(segment)
        times = tuple(T0 + timedelta(minutes=m) for m in self.commits.get(segment, []))
        return SegmentSummary(segment, times)

    def last_record_lsn(self, segment: str) -> int | None:
        self.calls.append(segment)
        return self.last_lsn.get(segment)


def at(minutes: float) -> str:
    return recovery.format_target_time(T0 + timedelta(minutes=minutes))


def request(target: recovery.RecoveryTarget, **kw: t.Any) -> RestoreRequest:
    defaults: dict[str, t.Any] = {
        "repository": "/srv/pitr",
        "data_dir": "/var/lib/postgresql/15/main",
        "restore_command": "/usr/bin/python3 -I -S /x/pitr-wal --repo /srv/pitr fetch %f %p",
    }
    defaults.update(kw)
    return RestoreRequest(target=target, **defaults)


def data_dir(**kw: t.Any) -> DataDirState:
    defaults: dict[str, t.Any] = {
        "path": "/var/lib/postgresql/15/main",
        "exists": True,
        "empty": False,
        "running": True,
        "pid": 4242,
        "system_identifier": 7001,
        "free_bytes": 100 * 1024**3,
    }
    defaults.update(kw)
    return DataDirState(**defaults)


def plan(
    target: recovery.RecoveryTarget,
    backups: list[BackupRecord],
    wal: list[str],
    inspector: FakeInspector | None = None,
    *,
    histories: dict[int, str] | None = None,
    state: DataDirState | None = None,
    **kw: t.Any,
) -> recovery.RecoveryPlan:
    return recovery.plan_recovery(
        request(target, **kw),
        backups=backups,
        wal=wal_listing(*wal),
        histories=histories or {},
        data_dir=state or data_dir(),
        inspector=inspector or FakeInspector({}),
        now=T0 + timedelta(hours=2),
        system_identifier=7001,
    )


# One backup on timeline 1 in segment 2 (ended at minute 1), WAL archived from 2 to 9, and
# commits at minutes 2..9 (one per segment 3..9 plus some in segment 2 before the backup end).
B_OLD = backup("b-old", 2, T0 + timedelta(minutes=1))
B_NEW = backup("b-new", 6, T0 + timedelta(minutes=5, seconds=30))
COMMITS = {segment_name(1, n): [n - 1.0, n - 0.5] for n in range(3, 10)}
COMMITS[segment_name(1, 2)] = [0.5]


# --------------------------------------------------------------------------------------------
# Backup selection


def test_time_target_chooses_newest_backup_that_ended_before_it() -> None:
    wal = segments(1, 2, 9)
    p = plan(parse_target(target_time=at(6)), [B_NEW, B_OLD], wal, FakeInspector(COMMITS))
    assert p.backup["label"] == "b-new"
    p = plan(parse_target(target_time=at(4)), [B_NEW, B_OLD], wal, FakeInspector(COMMITS))
    assert p.backup["label"] == "b-old"
    # stop_time < target strictly: a target equal to a backup's stop time needs an older one.
    p = plan(
        parse_target(target_time=B_NEW.stop_time.replace("T", " ")),
        [B_NEW, B_OLD],
        wal,
        FakeInspector(COMMITS),
    )
    assert p.backup["label"] == "b-old"


def test_lsn_target_chooses_by_stop_lsn() -> None:
    wal = segments(1, 2, 9)
    target = parse_target(target_lsn=B_NEW.stop_lsn)  # stop_lsn <= target: allowed
    p = plan(target, [B_NEW, B_OLD], wal, FakeInspector(COMMITS))
    assert p.backup["label"] == "b-new"
    target = parse_target(target_lsn="0/5000000")
    assert plan(target, [B_NEW, B_OLD], wal).backup["label"] == "b-old"


@pytest.mark.parametrize(
    "kwargs",
    [{"target_xid": "5000"}, {"target_name": "rp"}, {"target": "immediate"}, {"target": "latest"}],
)
def test_xid_name_immediate_latest_choose_the_newest_usable_backup(
    kwargs: dict[str, t.Any],
) -> None:
    failed = backup("b-failed", 8, T0 + timedelta(minutes=7), status="failed")
    unverified = backup("b-unverified", 7, T0 + timedelta(minutes=6), verified=False)
    p = plan(parse_target(**kwargs), [failed, unverified, B_NEW, B_OLD], segments(1, 2, 9))
    assert p.backup["label"] == "b-new"


def test_explicit_backup_label() -> None:
    wal = segments(1, 2, 9)
    p = plan(parse_target(target="latest"), [B_NEW, B_OLD], wal, backup_label="b-old")
    assert p.backup["label"] == "b-old"
    with pytest.raises(RecoveryPlanError, match="not in the repository's catalog"):
        plan(parse_target(target="latest"), [B_NEW], wal, backup_label="nope")
    failed = backup("b-failed", 8, T0 + timedelta(minutes=7), status="failed")
    with pytest.raises(RecoveryPlanError, match="not usable"):
        plan(parse_target(target="latest"), [failed, B_NEW], wal, backup_label="b-failed")


def test_target_before_the_oldest_backup_is_refused_with_the_window() -> None:
    with pytest.raises(RecoveryPlanError) as info:
        plan(parse_target(target_time=at(0.5)), [B_NEW, B_OLD], segments(1, 2, 9))
    err = info.value
    assert "before the end of the oldest usable backup (b-old" in err.msg
    assert err.context["reason"] == "before_oldest_backup"
    assert err.context["window"]["earliest_time"] == B_OLD.stop_time
    assert err.context["nearest_targets"][0]["after_time"] == B_OLD.stop_time
    with pytest.raises(RecoveryPlanError, match="before the end of the oldest"):
        plan(parse_target(target_lsn="0/2000100"), [B_OLD], segments(1, 2, 9))


def test_no_usable_backup() -> None:
    failed = backup("b-failed", 8, T0 + timedelta(minutes=7), status="failed")
    with pytest.raises(RecoveryPlanError, match="no usable base backup"):
        plan(parse_target(target="latest"), [failed], segments(1, 2, 9))


def test_backup_of_another_cluster_is_never_chosen() -> None:
    foreign = BackupRecord(**{**B_NEW.to_dict(), "label": "foreign", "system_identifier": 1})
    p = plan(parse_target(target="latest"), [foreign, B_OLD], segments(1, 2, 9))
    assert p.backup["label"] == "b-old"


def test_tablespaces_are_refused() -> None:
    ts = backup(
        "b-ts",
        2,
        T0 + timedelta(minutes=1),
        files=["base.tar", "16385.tar", "pg_wal.tar", "backup_manifest"],
    )
    with pytest.raises(RecoveryPlanError, match=r"tablespaces \(16385.tar\)"):
        plan(parse_target(target="latest"), [ts], segments(1, 2, 9))


# --------------------------------------------------------------------------------------------
# WAL presence, gaps, the end of the archive


def test_time_target_finds_the_stop_segment_and_wal_range() -> None:
    inspector = FakeInspector(COMMITS)
    p = plan(parse_target(target_time=at(4.75)), [B_OLD], segments(1, 2, 9), inspector)
    # Commits at 4.5 (segment 5) and 5.0 (segment 6): replay stops before 5.0, in segment 6.
    assert p.wal["first"] == segment_name(1, 2)
    assert p.wal["last"] == segment_name(1, 6)
    assert p.wal["segments"] == 5
    assert p.wal["last_is_exact"] is True
    assert p.wal["stored_bytes"] == 5_000_000
    assert p.wal["bytes"] == 5 * SEG
    assert p.window["latest_commit_time"] == at(8.5)


def test_time_target_inclusive_and_exclusive_at_a_commit_time() -> None:
    # A commit exactly at the target: inclusive keeps it (stops at the next one), exclusive
    # stops before it.
    inclusive = plan(
        parse_target(target_time=at(5)), [B_OLD], segments(1, 2, 9), FakeInspector(COMMITS)
    )
    exclusive = plan(
        parse_target(target_time=at(5), inclusive=False),
        [B_OLD],
        segments(1, 2, 9),
        FakeInspector(COMMITS),
    )
    assert inclusive.wal["last"] == segment_name(1, 6)  # stops before 5.5, in segment 6
    assert exclusive.wal["last"] == segment_name(1, 6)  # stops before 5.0, in segment 6
    inclusive = plan(
        parse_target(target_time=at(5.5)), [B_OLD], segments(1, 2, 9), FakeInspector(COMMITS)
    )
    assert inclusive.wal["last"] == segment_name(1, 7)


def test_time_target_needs_few_waldump_calls() -> None:
    many = {segment_name(1, n): [float(n)] for n in range(3, 1003)}
    inspector = FakeInspector(many)
    old = backup("b", 2, T0 + timedelta(minutes=1))
    p = plan(parse_target(target_time=at(500.5)), [old], segments(1, 2, 1002), inspector)
    assert p.wal["last"] == segment_name(1, 501)
    assert len(inspector.calls) < 30


def test_archive_times_point_the_search_at_the_stop_in_two_waldump_calls() -> None:
    many = {segment_name(1, n): [float(n)] for n in range(3, 1003)}
    wal = wal_listing(*segments(1, 2, 1002))
    # each segment archived half a minute after its commit, as archive_command does
    wal = [
        (
            w,
            ObjectInfo(
                info.key,
                info.size,
                (T0 + timedelta(minutes=w.segment_number(SEG) + 0.5)).timestamp(),
            ),
        )
        for w, info in wal
    ]
    inspector = FakeInspector(many)
    p = recovery.plan_recovery(
        request(parse_target(target_time=at(500.7))),
        backups=[backup("b", 2, T0 + timedelta(minutes=1))],
        wal=wal,
        histories={},
        data_dir=data_dir(),
        inspector=inspector,
        now=T0 + timedelta(hours=30),
        system_identifier=7001,
    )
    assert p.wal["last"] == segment_name(1, 501)
    # the newest segment, the hinted one (501) and the one before it: nothing else
    assert sorted(set(inspector.calls)) == sorted([*segments(1, 500, 501), segment_name(1, 1002)])


@pytest.mark.parametrize("target_minute", [3.0, 3.5, 4.2, 6.0, 6.5, 8.9])
@pytest.mark.parametrize("inclusive", [True, False])
def test_any_hint_gives_the_answer_of_the_plain_search(
    target_minute: float, inclusive: bool
) -> None:
    # File times can be anything (a copied repository, clock skew): the hint only orders the
    # look-ups, the answer stays the binary search's.
    target = parse_target(target_time=at(target_minute), inclusive=inclusive)
    commits = dict(COMMITS)
    commits[segment_name(1, 5)] = []  # a segment without commits on the way
    scan = recovery.WalScan(2, 9, 9, (), tuple(segments(1, 2, 9)))
    plain = recovery.find_time_stop(target, scan, 2, FakeInspector(commits))
    for hint in [None, *range(0, 12)]:
        hinted = recovery.find_time_stop(target, scan, 2, FakeInspector(commits), hint)
        assert hinted == plain, (hint, hinted, plain)


def test_target_after_the_end_of_the_archive_is_refused() -> None:
    with pytest.raises(RecoveryPlanError) as info:
        plan(parse_target(target_time=at(8.5)), [B_OLD], segments(1, 2, 9), FakeInspector(COMMITS))
    err = info.value
    assert err.context["reason"] == "after_archive_end"
    assert "after the end of the archived WAL" in err.msg
    assert at(8.5) in err.msg  # the last archived commit
    nearest = err.context["nearest_targets"]
    assert {"edge": "latest", "target_time": at(8.5), "inclusive": False}.items() <= nearest[
        1
    ].items()
    # Exclusive at the very last commit is reachable: replay stops before it.
    p = plan(
        parse_target(target_time=at(8.5), inclusive=False),
        [B_OLD],
        segments(1, 2, 9),
        FakeInspector(COMMITS),
    )
    assert p.wal["last"] == segment_name(1, 9)


def test_gap_before_the_target_is_refused_and_named() -> None:
    wal = [n for n in segments(1, 2, 9) if n != segment_name(1, 5)]
    with pytest.raises(RecoveryPlanError) as info:
        plan(parse_target(target_time=at(6)), [B_OLD], wal, FakeInspector(COMMITS))
    err = info.value
    assert err.context["reason"] == "wal_gap"
    assert err.context["gap"] == [segment_name(1, 5)]
    assert f"WAL segment {segment_name(1, 5)} is missing from the archive" in err.msg
    assert err.context["window"]["gap"] == [segment_name(1, 5)]
    # window.py's per-timeline view names the gap too.
    timelines = err.context["window"]["timelines"]
    assert timelines[0]["gaps"][0]["from_wal"] == segment_name(1, 5)


def test_gap_after_the_target_does_not_matter() -> None:
    wal = [n for n in segments(1, 2, 9) if n != segment_name(1, 8)]
    p = plan(parse_target(target_time=at(4.2)), [B_OLD], wal, FakeInspector(COMMITS))
    assert p.wal["last"] == segment_name(1, 5)


def test_latest_refuses_a_gap_that_would_silently_lose_wal() -> None:
    wal = [n for n in segments(1, 2, 9) if n != segment_name(1, 7)]
    with pytest.raises(RecoveryPlanError, match="would stop early and silently"):
        plan(parse_target(target="latest"), [B_OLD], wal)
    p = plan(parse_target(target="latest"), [B_OLD], segments(1, 2, 9))
    assert (p.wal["first"], p.wal["last"]) == (segment_name(1, 2), segment_name(1, 9))


def test_xid_and_name_with_a_gap_warn() -> None:
    wal = [n for n in segments(1, 2, 9) if n != segment_name(1, 7)]
    p = plan(parse_target(target_xid="800"), [B_OLD], wal)
    assert "000000010000000000000007 is missing" in p.warnings[0]
    assert p.wal["last"] == segment_name(1, 6)
    assert p.wal["last_is_exact"] is False


def test_wal_the_backup_needs_to_become_consistent() -> None:
    # The backup ends in segment 6; its own WAL covers 6 only up to the stop point.
    wal = segments(1, 2, 5)
    with pytest.raises(RecoveryPlanError, match="needs to become consistent"):
        plan(parse_target(target="latest"), [B_NEW], wal)
    # immediate needs nothing beyond the backup's own WAL.
    p = plan(parse_target(target="immediate"), [B_NEW], [])
    assert (p.wal["first"], p.wal["last"]) == (segment_name(1, 6), segment_name(1, 6))


def test_lsn_target_reachability() -> None:
    wal = segments(1, 2, 9)
    last = 9 * SEG + 0x5000
    inspector = FakeInspector(COMMITS, {segment_name(1, 9): last})
    p = plan(parse_target(target_lsn="0/7000100"), [B_OLD], wal, inspector)
    assert p.wal["last"] == segment_name(1, 8)  # the record crossing it may end in the next
    p = plan(parse_target(target_lsn=f"0/{last:X}"), [B_OLD], wal, inspector)
    assert p.wal["last"] == segment_name(1, 9)
    with pytest.raises(RecoveryPlanError, match="archived WAL ends before it"):
        plan(parse_target(target_lsn=f"0/{last + 1:X}"), [B_OLD], wal, inspector)
    with pytest.raises(RecoveryPlanError, match="archived WAL ends before it"):
        plan(parse_target(target_lsn="0/A000000"), [B_OLD], wal, inspector)


# --------------------------------------------------------------------------------------------
# Timelines in planning


def tl2_history() -> dict[int, str]:
    # Timeline 2 branched from 1 at 0/5000100 (a first restore promoted there).
    return {2: "1\t0/5000100\tbefore transaction 900\n"}


def test_latest_timeline_follows_the_branch() -> None:
    wal = segments(1, 2, 9) + segments(2, 5, 7)
    commits = dict(COMMITS)
    commits.update({segment_name(2, n): [100.0 + n] for n in range(5, 8)})
    p = plan(
        parse_target(target="latest"), [B_OLD], wal, FakeInspector(commits), histories=tl2_history()
    )
    assert p.timeline["resolved"] == 2
    assert p.settings["recovery_target_timeline"] == "2"
    assert p.wal["last"] == segment_name(2, 7)
    assert p.wal["segments"] == 6  # 1/2,3,4 then 2/5,6,7


def test_original_timeline_after_a_branch() -> None:
    wal = segments(1, 2, 9) + segments(2, 5, 7)
    commits = dict(COMMITS)
    commits.update({segment_name(2, n): [100.0 + n] for n in range(5, 8)})
    # On timeline 2, a target at minute 7 stops at the first timeline-2 commit (minute 105):
    p2 = plan(
        parse_target(target_time=at(7)),
        [B_OLD],
        wal,
        FakeInspector(commits),
        histories=tl2_history(),
    )
    assert p2.wal["last"] == segment_name(2, 5)
    # On timeline 1 it replays the original history up to minute 7.
    p1 = plan(
        parse_target(target_time=at(7), timeline="1"),
        [B_OLD],
        wal,
        FakeInspector(commits),
        histories=tl2_history(),
    )
    assert p1.timeline["resolved"] == 1
    assert p1.wal["last"] == segment_name(1, 8)
    assert all(n.startswith("00000001") for n in [p1.wal["first"], p1.wal["last"]])


def test_backup_after_the_branch_point_cannot_reach_the_new_timeline() -> None:
    late = backup("late", 6, T0 + timedelta(minutes=5, seconds=30))
    wal = segments(1, 2, 9) + segments(2, 5, 7)
    p = plan(parse_target(target="latest"), [late, B_OLD], wal, histories=tl2_history())
    assert p.backup["label"] == "b-old"
    with pytest.raises(RecoveryPlanError, match="after timeline 2 branched off timeline 1"):
        plan(parse_target(target="latest"), [late], wal, histories=tl2_history())


def test_missing_history_file_for_an_explicit_timeline() -> None:
    with pytest.raises(RecoveryPlanError, match=r"00000003\.history"):
        plan(parse_target(target="latest", timeline="3"), [B_OLD], segments(1, 2, 9))


# --------------------------------------------------------------------------------------------
# The plan: data directory, idempotence, resume


def test_plan_moves_the_data_directory_aside_under_a_dated_name() -> None:
    p = plan(parse_target(target="latest"), [B_OLD], segments(1, 2, 9))
    assert p.decision == "restore"
    dd = p.data_dir
    assert dd["old_data_dir"] == "/var/lib/postgresql/15/main.pitr-old-20261125T120000Z"
    assert dd["staging_dir"] == "/var/lib/postgresql/15/main.pitr-staging"
    assert p.steps[0] == "stop PostgreSQL (running with PID 4242)"
    assert any("kept, never deleted" in s for s in p.steps)
    taken = data_dir(siblings=("main.pitr-old-20261125T120000Z",))
    p = plan(parse_target(target="latest"), [B_OLD], segments(1, 2, 9), state=taken)
    assert p.data_dir["old_data_dir"].endswith(".pitr-old-20261125T120000Z-2")
    empty = data_dir(empty=True, running=False)
    assert (
        plan(parse_target(target="latest"), [B_OLD], segments(1, 2, 9), state=empty).data_dir[
            "old_data_dir"
        ]
        is None
    )


def test_plan_refusals_about_the_data_directory() -> None:
    wal = segments(1, 2, 9)
    with pytest.raises(RecoveryPlanError, match="mount point"):
        plan(parse_target(target="latest"), [B_OLD], wal, state=data_dir(is_mount_point=True))
    with pytest.raises(RecoveryPlanError, match="system identifier 99"):
        plan(parse_target(target="latest"), [B_OLD], wal, state=data_dir(system_identifier=99))
    with pytest.raises(RecoveryPlanError, match="not made by this role"):
        plan(parse_target(target="latest"), [B_OLD], wal, state=data_dir(staging_exists=True))
    with pytest.raises(RecoveryPlanError, match="not enough free space") as info:
        plan(parse_target(target="latest"), [B_OLD], wal, state=data_dir(free_bytes=1024))
    assert info.value.context["reason"] == "no_space"


def test_same_arguments_after_success_plan_nothing() -> None:
    target = parse_target(target_time=at(4.75))
    first = plan(target, [B_OLD], segments(1, 2, 9), FakeInspector(COMMITS))
    done = recovery.restore_state(first, recovery.PHASE_COMPLETED, T0)
    again = plan(
        target,
        [B_OLD],
        segments(1, 2, 9),
        FakeInspector(COMMITS),
        state=data_dir(restore_state=done),
    )
    assert again.decision == "none"
    assert again.steps == []
    assert again.backup["label"] == "b-old"
    # The action is not part of "the same restore": paused then promote resumes.
    paused = recovery.restore_state(first, recovery.PHASE_PAUSED, T0)
    resumed = plan(target, [B_OLD], segments(1, 2, 9), state=data_dir(restore_state=paused))
    assert resumed.decision == "resume"
    paused_again = plan(
        parse_target(target_time=at(4.75), action="pause"),
        [B_OLD],
        segments(1, 2, 9),
        state=data_dir(restore_state=paused),
    )
    assert paused_again.decision == "none"
    # Another target is another restore.
    other = plan(
        parse_target(target_time=at(4.5)),
        [B_OLD],
        segments(1, 2, 9),
        FakeInspector(COMMITS),
        state=data_dir(restore_state=done),
    )
    assert other.decision == "restore"
    forced = plan(
        target,
        [B_OLD],
        segments(1, 2, 9),
        FakeInspector(COMMITS),
        state=data_dir(restore_state=done),
        force=True,
    )
    assert forced.decision == "restore"


def test_interrupted_restores_resume() -> None:
    target = parse_target(target="latest")
    first = plan(target, [B_OLD], segments(1, 2, 9))
    recovering = recovery.restore_state(first, recovery.PHASE_RECOVERING, T0)
    p = plan(
        target, [B_OLD], segments(1, 2, 9), state=data_dir(restore_state=recovering, running=False)
    )
    assert p.decision == "resume"
    assert p.steps == ["start PostgreSQL", "follow recovery to the target, then finish as asked"]
    prepared = recovery.restore_state(first, recovery.PHASE_PREPARED, T0)
    gone = data_dir(exists=False, running=False, staging_exists=True, staging_state=prepared)
    p = plan(target, [B_OLD], segments(1, 2, 9), state=gone)
    assert p.decision == "resume"
    assert p.steps[0].startswith("move /var/lib/postgresql/15/main.pitr-staging to")
    assert p.data_dir["old_data_dir"] == first.data_dir["old_data_dir"]
    # A staging directory that was not finished is rebuilt.
    staging = recovery.restore_state(first, recovery.PHASE_STAGING, T0)
    p = plan(
        target,
        [B_OLD],
        segments(1, 2, 9),
        state=data_dir(staging_exists=True, staging_state=staging),
    )
    assert p.decision == "restore"
    assert p.data_dir["remove_stale_staging"] is True


def test_clone_settings() -> None:
    p = plan(parse_target(target="latest"), [B_OLD], segments(1, 2, 9), clone=True, port=5499)
    assert p.clone_settings == {"archive_mode": "off", "port": "5499"}
    assert plan(parse_target(target="latest"), [B_OLD], segments(1, 2, 9)).clone_settings == {}


def test_fingerprint_ignores_the_action_only() -> None:
    a = request(parse_target(target_xid="900"))
    b = request(parse_target(target_xid="900", action="pause"))
    c = request(parse_target(target_xid="900", inclusive=False))
    d = request(parse_target(target_xid="900"), data_dir="/other")
    assert recovery.request_fingerprint(a) == recovery.request_fingerprint(b)
    assert len({recovery.request_fingerprint(x) for x in (a, c, d)}) == 3


def test_plan_to_dict_is_plain_data() -> None:
    import json

    p = plan(parse_target(target_time=at(4.75)), [B_OLD], segments(1, 2, 9), FakeInspector(COMMITS))
    data = json.loads(json.dumps(p.to_dict()))
    assert data["target"]["kind"] == "time"
    assert data["settings"]["recovery_target_time"] == at(4.75)
    assert data["backup"]["path"] == "/srv/pitr/backups/b-old"


# --------------------------------------------------------------------------------------------
# pg_waldump output (recorded from PostgreSQL 15 with TZ=UTC)

WALDUMP = """\
rmgr: Heap        len (rec/tot):     54/  4862, tx:        737, lsn: 0/03010230, prev 0/030101D0, desc: INSERT off 14 flags 0x01, blkref #0: rel 1663/5/2619 blk 18 FPW
rmgr: Transaction len (rec/tot):     66/    66, tx:        737, lsn: 0/03013550, prev 0/03011530, desc: COMMIT 2026-11-25 14:24:05.527105 UTC; inval msgs: catcache 63
rmgr: Standby     len (rec/tot):     50/    50, tx:          0, lsn: 0/03013598, prev 0/03013550, desc: RUNNING_XACTS nextXid 738 latestCompletedXid 737 oldestRunningXid 738
rmgr: Transaction len (rec/tot):     34/    34, tx:        738, lsn: 0/03013610, prev 0/030135D0, desc: ABORT 2026-11-25 14:25:26.794920 UTC
rmgr: Transaction len (rec/tot):     34/    34, tx:        739, lsn: 0/03013678, prev 0/03013638, desc: COMMIT 2026-11-25 14:25:26.796765 UTC
rmgr: XLOG        len (rec/tot):     98/    98, tx:          0, lsn: 0/030136A0, prev 0/03013678, desc: RESTORE_POINT x
rmgr: XLOG        len (rec/tot):     24/    24, tx:          0, lsn: 0/030137B8, prev 0/03013740, desc: SWITCH
"""  # noqa: E501


def test_parse_waldump() -> None:
    summary = recovery.parse_waldump("000000010000000000000003", WALDUMP)
    assert [m.isoformat() for m in summary.commit_times] == [
        "2026-11-25T14:24:05.527105+00:00",
        "2026-11-25T14:25:26.794920+00:00",  # aborts stop replay too
        "2026-11-25T14:25:26.796765+00:00",
    ]
    assert summary.last_record_lsn == 0x030137B8
    assert summary.last_commit == datetime(2026, 11, 25, 14, 25, 26, 796765, tzinfo=UTC)
    assert recovery.parse_waldump("x", "").commit_times == ()


# --------------------------------------------------------------------------------------------
# Following recovery: the server log, the stop point, the phase

# A PostgreSQL 15 server log of a restore to a time target (recorded; pitr-wal lines included).
LOG_TIME_TARGET = """\
2026-11-25 14:36:38.627 UTC [7239] LOG:  starting point-in-time recovery to 2026-11-25 14:32:22.788004+00
pitr-wal: fetch 000000010000000000000002: restored 16.0 MiB (zstd) in 97 ms
2026-11-25 14:36:38.949 UTC [7239] LOG:  restored log file "000000010000000000000002" from archive
pitr-wal: fetch 000000010000000000000005: not in the archive
2026-11-25 14:36:39.729 UTC [7239] LOG:  consistent recovery state reached at 0/2000100
2026-11-25 14:36:39.729 UTC [7239] LOG:  recovery stopping before commit of transaction 731, time 2026-11-25 14:32:23.848327+00
2026-11-25 14:36:39.729 UTC [7239] LOG:  pausing at the end of recovery
2026-11-25 14:36:39.729 UTC [7239] HINT:  Execute pg_wal_replay_resume() to promote.
2026-11-25 14:36:39.740 UTC [7250] FATAL:  the database system is not yet accepting connections
2026-11-25 14:36:42.158 UTC [7239] LOG:  selected new timeline ID: 2
"""  # noqa: E501
TARGET_TIME = "2026-11-25 14:32:22.788004+00"
LAST_REPLAYED = datetime(2026, 11, 25, 14, 32, 22, 788004, tzinfo=UTC)

LOG_ENDED_EARLY = """\
2026-11-25 14:50:01.100 UTC [800] LOG:  redo done at 0/7000060 system usage: CPU: user: 0.00 s
2026-11-25 14:50:01.100 UTC [800] FATAL:  recovery ended before configured recovery target was reached
2026-11-25 14:50:01.103 UTC [790] LOG:  startup process (PID 800) exited with exit code 1
2026-11-25 14:50:01.103 UTC [790] LOG:  aborting startup due to startup process failure
"""  # noqa: E501

LOG_FETCH_FAILED = """\
pitr-wal: fetch 000000010000000000000007: attempt 1 of 3 failed: wal/0000000100000000/000000010000000000000007 fails its checksum
pitr-wal: fetch 000000010000000000000007 FAILED after 3 attempts: wal/0000000100000000/000000010000000000000007 fails its checksum. Recovery must stop here (exit 255) rather than treat this as the end of the archive.
2026-11-25 14:51:00.200 UTC [900] FATAL:  could not restore file "000000010000000000000007" from archive: child process exited with exit code 255
2026-11-25 14:51:00.203 UTC [890] LOG:  startup process (PID 900) exited with exit code 1
"""  # noqa: E501


def test_parse_recovery_log_time_target() -> None:
    log = recovery.parse_recovery_log(LOG_TIME_TARGET)
    assert log.stop == {
        "kind": "xact",
        "edge": "before",
        "record": "commit",
        "xid": 731,
        "time": datetime(2026, 11, 25, 14, 32, 23, 848327, tzinfo=UTC),
    }
    assert log.paused_at_target and log.new_timeline == 2
    assert log.failures == ()  # a refused connection is not a server failure
    assert any("pitr-wal: fetch 000000010000000000000002" in line for line in log.lines)


def test_parse_recovery_log_failures() -> None:
    early = recovery.parse_recovery_log(LOG_ENDED_EARLY)
    assert early.ended_before_target and not early.stop
    assert len(early.failures) == 1
    failed = recovery.parse_recovery_log(LOG_FETCH_FAILED)
    assert "could not restore file" in failed.failures[0]
    assert any("FAILED after 3 attempts" in line for line in failed.lines)


@pytest.mark.parametrize(
    ("line", "stop"),
    [
        (
            'LOG:  recovery stopping at restore point "before", time 2026-11-25 10:00:00+01',
            {
                "kind": "name",
                "edge": "at",
                "name": "before",
                "time": datetime(2026, 11, 25, 9, 0, tzinfo=UTC),
            },
        ),
        (
            'LOG:  recovery stopping after WAL location (LSN) "0/7000148"',
            {"kind": "lsn", "edge": "after", "lsn": 0x7000148},
        ),
        (
            "LOG:  recovery stopping after abort of transaction 900, time 2026-11-25 10:00:00.5+00",
            {
                "kind": "xact",
                "edge": "after",
                "record": "abort",
                "xid": 900,
                "time": datetime(2026, 11, 25, 10, 0, 0, 500000, tzinfo=UTC),
            },
        ),
        (
            "LOG:  recovery stopping after reaching consistency",
            {"kind": "immediate", "edge": "after"},
        ),
    ],
)
def test_parse_recovery_log_stop_lines(line: str, stop: dict[str, t.Any]) -> None:
    assert recovery.parse_recovery_log(line).stop == stop


def target_dict(**kw: t.Any) -> dict[str, t.Any]:
    return parse_target(**kw).to_dict()


def log_of(line: str) -> recovery.RecoveryLog:
    return recovery.parse_recovery_log(line)


def test_confirm_time_target() -> None:
    log = recovery.parse_recovery_log(LOG_TIME_TARGET)
    ok, where = recovery.confirm_stop(
        target_dict(target_time=TARGET_TIME), log, None, LAST_REPLAYED
    )
    assert ok is True
    assert "before the commit of transaction 731" in where
    # Exclusive at the same time: the commit at exactly the target must not have been replayed.
    ok, where = recovery.confirm_stop(
        target_dict(target_time=TARGET_TIME, inclusive=False), log, None, LAST_REPLAYED
    )
    assert ok is False and "after the target" in where
    # A stop at a commit that does not lie beyond the target is not the target.
    ok = recovery.confirm_stop(
        target_dict(target_time="2026-11-25 14:32:24+00"), log, None, LAST_REPLAYED
    )[0]
    assert ok is False
    # Without the log, the last replayed commit time alone decides.
    assert (
        recovery.confirm_stop(
            target_dict(target_time=TARGET_TIME), log_of(""), None, LAST_REPLAYED
        )[0]
        is True
    )
    assert (
        recovery.confirm_stop(target_dict(target_time=TARGET_TIME), log_of(""), None, None)[0]
        is None
    )


def test_confirm_other_targets() -> None:
    after = log_of(
        "LOG:  recovery stopping after commit of transaction 900, time 2026-11-25 10:00:00+00"
    )
    before = log_of(
        "LOG:  recovery stopping before commit of transaction 900, time 2026-11-25 10:00:00+00"
    )
    assert recovery.confirm_stop(target_dict(target_xid="900"), after, None, None)[0] is True
    assert recovery.confirm_stop(target_dict(target_xid="900"), before, None, None)[0] is False
    assert (
        recovery.confirm_stop(target_dict(target_xid="900", inclusive=False), before, None, None)[0]
        is True
    )
    assert recovery.confirm_stop(target_dict(target_xid="901"), after, None, None)[0] is False
    # An xid with an epoch (xid8) is compared on its low 32 bits, as PostgreSQL does.
    assert (
        recovery.confirm_stop(target_dict(target_xid=str((1 << 32) + 900)), after, None, None)[0]
        is True
    )
    lsn_after = log_of('LOG:  recovery stopping after WAL location (LSN) "0/7000148"')
    assert (
        recovery.confirm_stop(target_dict(target_lsn="0/7000100"), lsn_after, 0x7000200, None)[0]
        is True
    )
    assert (
        recovery.confirm_stop(
            target_dict(target_lsn="0/7000100", inclusive=False), lsn_after, 0x7000200, None
        )[0]
        is False
    )
    rp = log_of('LOG:  recovery stopping at restore point "rp1", time 2026-11-25 10:00:00+00')
    assert recovery.confirm_stop(target_dict(target_name="rp1"), rp, None, None)[0] is True
    assert recovery.confirm_stop(target_dict(target_name="rp2"), rp, None, None)[0] is False
    consistent = log_of("LOG:  recovery stopping after reaching consistency")
    assert recovery.confirm_stop(target_dict(target="immediate"), consistent, None, None)[0]
    assert recovery.confirm_stop(target_dict(target="immediate"), rp, None, None)[0] is False
    # Nothing in the log: cannot tell (the role then refuses to promote).
    for kw in ({"target_xid": "900"}, {"target_name": "rp1"}, {"target": "immediate"}):
        assert recovery.confirm_stop(target_dict(**kw), log_of(""), None, None)[0] is None
    assert recovery.confirm_stop(target_dict(target="latest"), log_of(""), None, None)[0]


@pytest.mark.parametrize(
    ("running", "connected", "in_recovery", "pause", "log", "phase"),
    [
        (False, False, None, None, "", "stopped"),
        (False, False, None, None, LOG_ENDED_EARLY, "failed"),
        (False, False, None, None, LOG_FETCH_FAILED, "failed"),
        (True, False, None, None, LOG_FETCH_FAILED, "starting"),
        (True, True, True, "not paused", "", "recovering"),
        (True, True, True, "pause requested", "", "recovering"),
        (True, True, True, "paused", LOG_TIME_TARGET, "paused"),
        (True, True, False, None, LOG_TIME_TARGET, "promoted"),
    ],
)
def test_recovery_phase(
    running: bool,
    connected: bool,
    in_recovery: bool | None,
    pause: str | None,
    log: str,
    phase: str,
) -> None:
    assert (
        recovery.recovery_phase(
            running=running,
            connected=connected,
            in_recovery=in_recovery,
            pause_state=pause,
            log=recovery.parse_recovery_log(log),
        )
        == phase
    )


def test_read_data_dir_state(tmp_path: Path) -> None:
    data = tmp_path / "main"
    state = recovery.read_data_dir_state(str(data))
    assert (state.exists, state.running, state.staging_exists) == (False, False, False)
    (data / "global").mkdir(parents=True)
    (data / "global" / "pg_control").write_bytes((7001).to_bytes(8, "little") + b"\0" * 100)
    (data / "postmaster.pid").write_text("999999999\n")  # no such process: a stale file
    (data / recovery.STATE_FILE).write_text('{"fingerprint": "x", "phase": "completed"}')
    (tmp_path / "main.pitr-old-20261125T100000Z").mkdir()
    (tmp_path / "main.pitr-staging").mkdir()
    state = recovery.read_data_dir_state(str(data))
    assert state.exists and not state.empty and not state.running
    assert state.system_identifier == 7001
    assert state.restore_state == {"fingerprint": "x", "phase": "completed"}
    assert state.staging_exists and state.staging_state is None
    assert state.siblings == ("main.pitr-old-20261125T100000Z",)
    assert state.free_bytes and state.free_bytes > 0
    (data / "postmaster.pid").write_text(f"{os.getpid()}\n")  # a live process, but not postgres
    assert recovery.postmaster_pid(str(data)) is None


def test_backup_layout_and_programs() -> None:
    layout = recovery.backup_layout(B_OLD)
    assert layout == {
        "format": "tar",
        "base": "base.tar.zst",
        "wal": "pg_wal.tar.zst",
        "decompress": "zstd",
        "wal_decompress": "zstd",
    }
    assert recovery.required_programs(layout, "/usr/lib/postgresql/15/bin") == [
        "/usr/lib/postgresql/15/bin/pg_ctl",
        "tar",
        "zstd",
    ]
    mixed = backup("m", 2, T0, files=["base.tar.lz4", "pg_wal.tar", "backup_manifest"])
    layout = recovery.backup_layout(mixed)
    assert (layout["decompress"], layout["wal"], layout["wal_decompress"]) == (
        "lz4",
        "pg_wal.tar",
        None,
    )
    plain = BackupRecord(**{**B_OLD.to_dict(), "backup_format": "plain", "files": ["PG_VERSION"]})
    assert recovery.backup_layout(plain)["format"] == "plain"
    assert "cp" in recovery.required_programs(recovery.backup_layout(plain), "/x")
    with pytest.raises(RecoveryPlanError, match=r"no base\.tar"):
        recovery.backup_layout(backup("n", 2, T0, files=["backup_manifest"]))


def test_parse_waldump_keeps_records_that_start_in_the_segment() -> None:
    # pg_waldump reads on into the next segment (for a record crossing the boundary); only
    # records starting in [first, end) belong to the segment asked for.
    summary = recovery.parse_waldump("x", WALDUMP, 0x03000000, 0x03013640)
    assert len(summary.commit_times) == 2
    assert summary.last_record_lsn == 0x03013610
    assert recovery.parse_waldump("x", WALDUMP, 0x04000000, 0x05000000).commit_times == ()


def test_postmaster_status_line(tmp_path: Path) -> None:
    assert recovery.postmaster_status(str(tmp_path)) is None
    pid_file = tmp_path / "postmaster.pid"
    pid_file.write_text("4242\n/data\n1700000000\n5432\n/tmp\n*\n  1234 5\n")
    assert recovery.postmaster_status(str(tmp_path)) == ""  # the status line not written yet
    for status in ("starting", "standby", "ready", "stopping"):
        pid_file.write_text(f"4242\n/data\n1700000000\n5432\n/tmp\n*\n  1234 5\n{status:<8}\n")
        assert recovery.postmaster_status(str(tmp_path)) == status

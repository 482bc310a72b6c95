# Copyright: contributors to pitr.postgresql
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The recoverable window per timeline, gaps, and pg_waldump COMMIT parsing."""

from __future__ import annotations

import typing as t

import pytest

from ansible_collections.pitr.postgresql.plugins.module_utils import window as w
from ansible_collections.pitr.postgresql.plugins.module_utils.catalog import BackupRecord
from ansible_collections.pitr.postgresql.plugins.module_utils.storage import ObjectInfo
from ansible_collections.pitr.postgresql.plugins.module_utils.walfile import WalFileName

SEG = 16 * 1024 * 1024


def seg(tl: int, n: int) -> str:
    return f"{tl:08X}{n // 256:08X}{n % 256:08X}"


def wal(*names: str) -> list[tuple[WalFileName, ObjectInfo]]:
    return [(WalFileName.parse(n), ObjectInfo(f"wal/{n[:16]}/{n}", 100, 0.0)) for n in names]


def segs(tl: int, numbers: t.Iterable[int]) -> list[str]:
    return [seg(tl, n) for n in numbers]


def bk(
    label: str, tl: int, stop_seg: int, stop_time: str, status: str = "ok", verified: bool = True
) -> BackupRecord:
    return BackupRecord(
        label=label,
        status=status,
        verified=verified,
        timeline=tl,
        start_lsn=f"0/{stop_seg:X}000028",
        stop_lsn=f"0/{stop_seg:X}000138",
        start_wal=seg(tl, stop_seg),
        stop_wal=seg(tl, stop_seg),
        stop_time=stop_time,
        start_time=stop_time,
    )


T1 = "2026-11-25T10:00:00+00:00"
T2 = "2026-11-25T12:00:00+00:00"
T3 = "2026-11-25T14:00:00+00:00"
COMMIT = "2026-11-25T15:30:00.123456+00:00"


def test_continuous_window_to_newest_commit() -> None:
    res = w.recoverable_window(
        [bk("b2", 1, 5, T2), bk("b1", 1, 2, T1)], wal(*segs(1, range(1, 9))), {1: COMMIT}, SEG
    )
    e = res[1]
    assert e["recoverable"] is True
    assert (e["start_time"], e["start_lsn"], e["start_wal"]) == (T1, "0/2000138", seg(1, 2))
    assert (e["end_time"], e["end_lsn"], e["end_wal"], e["end_exact"]) == (
        COMMIT,
        "0/9000000",
        seg(1, 8),
        True,
    )
    assert e["gaps"] == []
    assert e["backups"] == ["b2", "b1"]
    assert len(e["ranges"]) == 1 and e["ranges"][0]["backups"] == ["b2", "b1"]
    assert e["newest_wal"] == seg(1, 8)
    assert e["reason"] == ""


def test_gap_cuts_window_and_newer_backup_resumes() -> None:
    names = segs(1, [2, 3, 4]) + segs(1, [7, 8, 9, 10])  # 5 and 6 missing
    res = w.recoverable_window(
        [bk("old", 1, 2, T1), bk("new", 1, 8, T3)], wal(*names), {1: COMMIT}, SEG
    )
    e = res[1]
    assert e["gaps"] == [
        {
            "timeline": 1,
            "from_wal": seg(1, 5),
            "to_wal": seg(1, 6),
            "segments": 2,
            "from_lsn": "0/5000000",
            "to_lsn": "0/7000000",
        }
    ]
    first, second = e["ranges"]
    assert (first["start_time"], first["end_wal"], first["end_lsn"], first["end_exact"]) == (
        T1,
        seg(1, 4),
        "0/5000000",
        False,
    )
    assert first["end_time"] == T1  # commits before the gap are not known
    assert (second["start_time"], second["end_time"], second["end_exact"]) == (T3, COMMIT, True)
    assert (e["start_time"], e["end_time"]) == (T1, COMMIT)


def test_gap_after_only_backup_ends_window_early() -> None:
    names = segs(1, [2, 3]) + segs(1, [6, 7])
    e = w.recoverable_window([bk("only", 1, 2, T1)], wal(*names), {1: COMMIT}, SEG)[1]
    assert e["end_wal"] == seg(1, 3)
    assert e["end_exact"] is False and e["end_time"] == T1
    assert "WAL gap from 000000010000000000000004" in e["reason"]


def test_gaps_before_oldest_backup_do_not_count() -> None:
    names = segs(1, [1, 4, 5, 6])  # 2, 3 missing but the backup stops in 4
    e = w.recoverable_window([bk("b", 1, 4, T2)], wal(*names), {1: COMMIT}, SEG)[1]
    assert e["gaps"] == []
    assert e["end_exact"] is True
    assert w.find_gaps(wal(*names), SEG)[0]["from_wal"] == seg(1, 2)


def test_unusable_backups_are_ignored() -> None:
    backups = [
        bk("failed", 1, 2, T1, status="failed", verified=False),
        bk("unverified", 1, 3, T2, verified=False),
    ]
    e = w.recoverable_window(backups, wal(*segs(1, range(1, 6))), {1: COMMIT}, SEG)[1]
    assert e["recoverable"] is False and e["backups"] == []
    assert e["start_time"] is None and e["end_time"] is None
    assert "no usable base backup on timeline 1" in e["reason"]


def test_backup_without_archive_reaches_its_own_stop() -> None:
    e = w.recoverable_window([bk("b", 1, 3, T2)], [], {}, SEG)[1]
    assert (e["start_time"], e["end_time"], e["end_lsn"]) == (T2, T2, "0/3000138")
    assert e["end_exact"] is False
    assert "no WAL archived" in e["reason"]


def test_commit_older_than_backup_stop_keeps_backup_stop() -> None:
    e = w.recoverable_window([bk("b", 1, 2, T3)], wal(*segs(1, [2, 3])), {1: T1}, SEG)[1]
    assert e["end_time"] == T3


def test_unknown_commit_time() -> None:
    e = w.recoverable_window([bk("b", 1, 2, T1)], wal(*segs(1, [2, 3])), None, SEG)[1]
    assert e["end_exact"] is False and e["end_time"] == T1
    assert "not known" in e["reason"]


def test_timelines_are_separate() -> None:
    names = (
        segs(1, [1, 2, 3, 4]) + segs(2, [4, 5, 6]) + ["00000002.history", seg(1, 4) + ".partial"]
    )
    res = w.recoverable_window(
        [bk("t1", 1, 2, T1), bk("t2", 2, 5, T3)], wal(*names), {1: T2, 2: COMMIT}, SEG
    )
    assert sorted(res) == [1, 2]
    assert (res[1]["start_time"], res[1]["end_time"], res[1]["end_wal"]) == (T1, T2, seg(1, 4))
    assert (res[2]["start_time"], res[2]["end_time"], res[2]["backups"]) == (T3, COMMIT, ["t2"])


def test_timeline_with_wal_but_no_backup() -> None:
    res = w.recoverable_window(
        [bk("t1", 1, 2, T1)], wal(*segs(1, [2, 3]), *segs(2, [3, 4])), {}, SEG
    )
    assert res[2]["recoverable"] is False and res[2]["newest_wal"] == seg(2, 4)


@pytest.mark.parametrize(
    ("present", "bounds", "expected"),
    [
        ([1, 2, 3], {}, []),
        ([1, 3], {}, [(2, 2)]),
        ([1, 4, 5, 9], {}, [(2, 3), (6, 8)]),
        ([3, 4], {"from_wal": seg(1, 1), "to_wal": seg(1, 6)}, [(1, 2), (5, 6)]),
        ([], {"from_wal": seg(1, 1), "to_wal": seg(1, 2)}, [(1, 2)]),
    ],
)
def test_find_gaps_table(
    present: list[int], bounds: dict[str, str], expected: list[tuple[int, int]]
) -> None:
    gaps = w.find_gaps(wal(*segs(1, present)), SEG, **bounds)  # type: ignore[arg-type]
    assert [(g["from_wal"], g["to_wal"]) for g in gaps] == [
        (seg(1, a), seg(1, b)) for a, b in expected
    ]
    assert all(
        g["segments"] == int(g["to_wal"][-8:], 16) - int(g["from_wal"][-8:], 16) + 1 for g in gaps
    )


def test_find_gaps_crosses_log_boundary() -> None:
    names = [seg(1, 254), seg(1, 257)]  # 000000010000000000000FE .. 0000000100000001 00000001
    gaps = w.find_gaps(wal(*names), SEG)
    assert [(g["from_wal"], g["to_wal"], g["segments"]) for g in gaps] == [
        ("0000000100000000000000FF", "000000010000000100000000", 2)
    ]


def test_find_gaps_other_segment_size() -> None:
    size = 64 * 1024 * 1024  # 64 segments per log
    names = ["000000010000000000000001", "000000010000000000000003"]
    gaps = w.find_gaps(wal(*names), size)
    assert gaps[0]["from_lsn"] == "0/8000000" and gaps[0]["to_lsn"] == "0/C000000"


# pg_waldump --rmgr=Transaction output recorded from PostgreSQL 15.18 with TZ=UTC
WALDUMP = "".join(
    [
        "rmgr: Transaction len (rec/tot):    405/   405, tx:        746, lsn: 0/63015E78,"
        " prev 0/63015E30, desc: COMMIT 2026-11-25 14:23:18.193372 UTC; inval msgs:"
        " catcache 80 catcache 79 snapshot 2608 relcache 16410\n",
        "rmgr: Transaction len (rec/tot):     34/    34, tx:        747, lsn: 0/63016068,"
        " prev 0/63016028, desc: COMMIT 2026-11-25 14:23:18.194219 UTC\n",
        "rmgr: Transaction len (rec/tot):     34/    34, tx:        748, lsn: 0/63016108,"
        " prev 0/630160C8, desc: ABORT 2026-11-25 14:23:18.197990 UTC\n",
        "pg_waldump: error: error in WAL record at 0/63016108: invalid record length at"
        " 0/63016130: wanted 24, got 0\n",
    ]
)


def test_parse_waldump_xacts() -> None:
    assert w.parse_waldump_xacts(WALDUMP) == [
        ("0/63015E78", "COMMIT", "2026-11-25T14:23:18.193372+00:00"),
        ("0/63016068", "COMMIT", "2026-11-25T14:23:18.194219+00:00"),
        ("0/63016108", "ABORT", "2026-11-25T14:23:18.197990+00:00"),
    ]


def test_newest_commit_ignores_abort() -> None:
    assert w.newest_commit(WALDUMP) == "2026-11-25T14:23:18.194219+00:00"
    assert w.newest_commit("") is None


def test_commit_prepared_and_offsets() -> None:
    text = (
        "rmgr: Transaction len (rec/tot): 50/50, tx: 0, lsn: 1/00000010, prev 0/0,"
        " desc: COMMIT_PREPARED 755: 2026-11-25 16:00:00.5 +01\n"
        "rmgr: Transaction len (rec/tot): 50/50, tx: 0, lsn: 0/FFFFFFF0, prev 0/0,"
        " desc: COMMIT 2026-11-25 17:00:00 UTC\n"
        "rmgr: Transaction len (rec/tot): 50/50, tx: 0, lsn: 0/10, prev 0/0,"
        " desc: COMMIT 2026-11-25 17:00:00 CET\n"
    )
    # highest LSN wins, not the latest clock time; a zone name other than UTC is skipped
    assert w.newest_commit(text) == "2026-11-25T15:00:00.500000+00:00"
    assert len(w.parse_waldump_xacts(text)) == 2

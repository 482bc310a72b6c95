# Copyright: contributors to pitr.postgresql
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The recoverable window: which points in time a restore can reach, per timeline. Pure.

A point is recoverable on timeline T when a usable base backup taken on T ended (its
``stop_lsn``) before it and every WAL segment from the backup's ``stop_wal`` up to the point is
archived. The base backup itself carries its WAL from start to stop (``-X stream``), so a
usable backup is always recoverable to its own stop point even with no archive at all.

``recoverable_window(backups, wal, newest_commit_time, segment_size)`` returns, for each
timeline that has a usable backup or archived segments, a dict::

    {
      "timeline": 1,
      "recoverable": True,                 # at least one usable backup on this timeline
      "start_time": "2026-11-25T14:15:07+00:00",   # stop_time of the oldest usable backup
      "start_lsn": "0/5000100", "start_wal": "000000010000000000000005",
      "end_time": "2026-11-25T16:02:11.123456+00:00",
      "end_lsn": "0/9000000", "end_wal": "000000010000000000000008",
      "end_exact": True,        # end_time is the newest commit read from the archive
      "gaps": [{"timeline": 1, "from_wal": ..., "to_wal": ..., "segments": 2,
                "from_lsn": ..., "to_lsn": ...}],
      "backups": ["20261125T150000Z", "20261125T141500Z"],   # usable, newest first
      "ranges": [ {"start_time", "start_lsn", "end_time", "end_lsn", "end_wal",
                   "end_exact", "backups": [...] } ],   # continuous pieces, oldest first
      "newest_wal": "000000010000000000000008",
      "reason": "",             # why the window is empty or ends early
    }

- ``start_*``: the stop point of the oldest usable backup on the timeline.
- ``end_*``: the furthest point reachable: the end of the continuous run of segments that
  starts at some usable backup's ``stop_wal``. ``end_lsn`` is the end of the last segment of
  that run (an upper bound; the WAL in it may end earlier). ``end_time`` is
  ``newest_commit_time[T]`` when the run reaches the newest archived segment of T (that is
  where the caller read the commit time), and otherwise the stop time of the newest backup
  before the gap, with ``end_exact`` False: the commits just before a gap are not known.
- ``gaps``: missing segments between the oldest usable backup's stop segment and the newest
  archived segment of the timeline. A gap cuts the window: targets between the gap and the
  next usable backup's stop point cannot be reached (``ranges`` lists what can).

Timelines are independent here: a backup on timeline 1 can also reach timeline 2 through
``00000002.history``; the restore planner follows history files, this summary does not.

Times are ISO 8601 strings with offsets; ``newest_commit_time`` maps timeline -> such a
string (``newest_commit`` below extracts it from ``pg_waldump`` output).
"""

from __future__ import annotations

import datetime as dt
import re
import typing as t

from ansible_collections.pitr.postgresql.plugins.module_utils.catalog import (
    BackupRecord,
    usable,
)
from ansible_collections.pitr.postgresql.plugins.module_utils.storage import ObjectInfo
from ansible_collections.pitr.postgresql.plugins.module_utils.walfile import (
    DEFAULT_SEGMENT_SIZE,
    SEGMENT,
    WalFileName,
    format_lsn,
    parse_lsn,
    segment_name,
)


def _parse_time(text: str) -> dt.datetime | None:
    if not text:
        return None
    try:
        when = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return when if when.tzinfo else when.replace(tzinfo=dt.UTC)


def _segno(name: str, segment_size: int) -> int:
    return WalFileName.parse(name).segment_number(segment_size)


def archived_segments(
    wal: t.Iterable[tuple[WalFileName, ObjectInfo]], segment_size: int = DEFAULT_SEGMENT_SIZE
) -> dict[int, set[int]]:
    """Timeline -> set of archived full-segment numbers (``.partial`` files do not count)."""
    out: dict[int, set[int]] = {}
    for w, _info in wal:
        if w.kind == SEGMENT:
            out.setdefault(w.timeline, set()).add(w.segment_number(segment_size))
    return out


def _runs_of_missing(present: set[int], first: int, last: int) -> list[tuple[int, int]]:
    missing: list[tuple[int, int]] = []
    n = first
    while n <= last:
        if n in present:
            n += 1
            continue
        start = n
        while n <= last and n not in present:
            n += 1
        missing.append((start, n - 1))
    return missing


def find_gaps(
    wal: t.Iterable[tuple[WalFileName, ObjectInfo]],
    segment_size: int = DEFAULT_SEGMENT_SIZE,
    *,
    timeline: int | None = None,
    from_wal: str | None = None,
    to_wal: str | None = None,
) -> list[dict[str, t.Any]]:
    """Missing segments per timeline, between ``from_wal`` and ``to_wal`` (inclusive).

    Without bounds, a timeline is checked from its oldest to its newest archived segment.
    Each gap is ``{"timeline", "from_wal", "to_wal", "segments", "from_lsn", "to_lsn"}``
    where ``from_lsn`` is where the missing WAL starts and ``to_lsn`` where it ends (the start
    of the next archived segment). Gaps are ordered by timeline, then position.
    """
    segs = archived_segments(wal, segment_size)
    lo_bound = _segno(from_wal, segment_size) if from_wal else None
    hi_bound = _segno(to_wal, segment_size) if to_wal else None
    if timeline is None and from_wal:
        timeline = WalFileName.parse(from_wal).timeline
    gaps: list[dict[str, t.Any]] = []
    for tl in sorted(segs if timeline is None else [timeline]):
        present = segs.get(tl, set())
        if not present and (lo_bound is None or hi_bound is None):
            continue
        first = lo_bound if lo_bound is not None else min(present)
        last = hi_bound if hi_bound is not None else max(present)
        for a, b in _runs_of_missing(present, first, last):
            gaps.append(_gap(tl, a, b, segment_size))
    return gaps


def _gap(tl: int, a: int, b: int, segment_size: int) -> dict[str, t.Any]:
    return {
        "timeline": tl,
        "from_wal": segment_name(tl, a, segment_size),
        "to_wal": segment_name(tl, b, segment_size),
        "segments": b - a + 1,
        "from_lsn": format_lsn(a * segment_size),
        "to_lsn": format_lsn((b + 1) * segment_size),
    }


def _stop_segno(rec: BackupRecord, segment_size: int) -> int:
    if rec.stop_wal:
        return _segno(rec.stop_wal, segment_size)
    lsn = parse_lsn(rec.stop_lsn)
    return max(lsn - 1, 0) // segment_size


def _later(a: str, b: str) -> str:
    ta, tb = _parse_time(a), _parse_time(b)
    if ta is None:
        return b
    if tb is None:
        return a
    return a if ta >= tb else b


def recoverable_window(
    backups: t.Sequence[BackupRecord],
    wal: t.Sequence[tuple[WalFileName, ObjectInfo]],
    newest_commit_time: t.Mapping[int, str] | None = None,
    segment_size: int = DEFAULT_SEGMENT_SIZE,
) -> dict[int, dict[str, t.Any]]:
    """The recoverable window per timeline (see the module docstring for the shape).

    ``backups`` may hold any records: only ``usable`` ones count. ``wal`` is
    ``Repository.list_wal()``. ``newest_commit_time`` maps a timeline to the timestamp of the
    newest COMMIT record found in its newest archived segments (None or missing: unknown).
    """
    commit_times = dict(newest_commit_time or {})
    segs = archived_segments(wal, segment_size)
    good = [b for b in backups if usable(b) and b.stop_lsn]
    timelines = sorted(set(segs) | {b.timeline for b in good})
    result: dict[int, dict[str, t.Any]] = {}
    for tl in timelines:
        present = segs.get(tl, set())
        newest = max(present) if present else None
        bks = sorted(
            (b for b in good if b.timeline == tl), key=lambda b: (parse_lsn(b.stop_lsn), b.label)
        )
        entry: dict[str, t.Any] = {
            "timeline": tl,
            "recoverable": bool(bks),
            "start_time": None,
            "start_lsn": None,
            "start_wal": None,
            "end_time": None,
            "end_lsn": None,
            "end_wal": None,
            "end_exact": False,
            "gaps": [],
            "backups": [b.label for b in reversed(bks)],
            "ranges": [],
            "newest_wal": segment_name(tl, newest, segment_size) if newest is not None else None,
            "reason": "",
        }
        result[tl] = entry
        if not bks:
            entry["reason"] = (
                f"no usable base backup on timeline {tl}: take one (a backup on an earlier"
                " timeline may still reach it through its history file)"
            )
            continue
        oldest = bks[0]
        entry["start_time"] = oldest.stop_time
        entry["start_lsn"] = oldest.stop_lsn
        entry["start_wal"] = oldest.stop_wal or segment_name(
            tl, _stop_segno(oldest, segment_size), segment_size
        )
        first_seg = _stop_segno(oldest, segment_size)
        if newest is not None and newest >= first_seg:
            entry["gaps"] = [
                _gap(tl, a, b, segment_size)
                for a, b in _runs_of_missing(present, first_seg, newest)
            ]

        # Continuous ranges: each backup reaches from its stop point to the end of the run of
        # archived segments that starts at its stop segment.
        ranges: list[dict[str, t.Any]] = []
        for b in bks:
            seg = _stop_segno(b, segment_size)
            if seg in present:
                end_seg = seg
                while end_seg + 1 in present:
                    end_seg += 1
                end_lsn = format_lsn((end_seg + 1) * segment_size)
                end_wal = segment_name(tl, end_seg, segment_size)
            else:
                end_seg = seg
                end_lsn = b.stop_lsn
                end_wal = b.stop_wal or segment_name(tl, seg, segment_size)
            reaches_newest = newest is not None and seg in present and end_seg == newest
            commit = commit_times.get(tl) if reaches_newest else None
            end_time = _later(commit, b.stop_time) if commit else b.stop_time
            in_run = seg in present
            if ranges and in_run and ranges[-1]["_in_run"] and ranges[-1]["_end_seg"] == end_seg:
                # Same continuous run as the previous (older) backup: one range.
                ranges[-1]["backups"].append(b.label)
                ranges[-1]["end_time"] = _later(ranges[-1]["end_time"], end_time)
                continue
            ranges.append(
                {
                    "start_time": b.stop_time,
                    "start_lsn": b.stop_lsn,
                    "end_time": end_time,
                    "end_lsn": end_lsn,
                    "end_wal": end_wal,
                    "end_exact": bool(commit),
                    "backups": [b.label],
                    "_end_seg": end_seg,
                    "_in_run": in_run,
                }
            )
        for r in ranges:
            r["backups"].reverse()  # newest first, like everywhere else
            del r["_end_seg"], r["_in_run"]
        entry["ranges"] = ranges
        last = ranges[-1]
        entry["end_time"] = last["end_time"]
        entry["end_lsn"] = last["end_lsn"]
        entry["end_wal"] = last["end_wal"]
        entry["end_exact"] = last["end_exact"]
        if not present:
            entry["reason"] = (
                "no WAL archived on this timeline: only the backups' own stop points can be"
                " restored"
            )
        elif entry["gaps"] and not last["end_exact"]:
            entry["reason"] = (
                f"WAL gap from {entry['gaps'][-1]['from_wal']}: the window ends before the"
                " newest archived segment; take a new base backup"
            )
        elif not last["end_exact"] and newest is not None:
            entry["reason"] = "the newest commit time in the archive is not known"
    return result


# pg_waldump -------------------------------------------------------------------------------------

_XACT_RE = re.compile(
    r"lsn: ([0-9A-F]+/[0-9A-F]+),.*?desc: (COMMIT|COMMIT_PREPARED|ABORT|ABORT_PREPARED)"
    r"(?: \d+:)? (\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}(?:\.\d+)?)"
    r" ?([A-Za-z]+|[+-]\d{2}(?::?\d{2})?)?"
)


def parse_waldump_xacts(text: str) -> list[tuple[str, str, str]]:
    """(lsn, kind, ISO time) of every transaction end record in ``pg_waldump`` output.

    Run pg_waldump with ``TZ=UTC`` (the runner does): it prints times in its own zone, and
    only ``UTC``/``GMT`` or numeric offsets are read; other zone names yield no entry.
    """
    found: list[tuple[str, str, str]] = []
    for line in text.splitlines():
        m = _XACT_RE.search(line)
        if not m:
            continue
        zone = m[4] or "UTC"
        if zone in ("UTC", "GMT"):
            tz = dt.UTC
        else:
            zm = re.fullmatch(r"([+-])(\d{2}):?(\d{2})?", zone)
            if not zm:
                continue
            delta = dt.timedelta(hours=int(zm[2]), minutes=int(zm[3] or 0))
            tz = dt.timezone(delta if zm[1] == "+" else -delta)
        when = dt.datetime.fromisoformat(m[3]).replace(tzinfo=tz)
        found.append((m[1], m[2], when.astimezone(dt.UTC).isoformat()))
    return found


def newest_commit(text: str) -> str | None:
    """The time of the COMMIT (or COMMIT_PREPARED) record with the highest LSN, or None."""
    best: tuple[int, str] | None = None
    for lsn, kind, when in parse_waldump_xacts(text):
        if not kind.startswith("COMMIT"):
            continue
        pos = parse_lsn(lsn)
        if best is None or pos > best[0]:
            best = (pos, when)
    return best[1] if best else None

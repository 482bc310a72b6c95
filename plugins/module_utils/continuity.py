# Copyright: contributors to pitr.postgresql
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Which archived WAL the base backups need, following timeline history, and where it has gaps.

A restore from a base backup reads WAL from the backup's start segment on, along the timeline
path of its recovery target timeline (PostgreSQL's ``XLogFileReadAnyTLI``: for each segment,
the newest timeline on the path whose first segment is at or before it; the segment holding a
switch point comes from the new timeline). So for a set of backups (*anchors*), each timeline
has a first segment some restore may read (``TimelineNeed.first``) and, when a path leaves it
for a child timeline, a last segment that path reads from it (``TimelineNeed.through``).

- ``wal_needs`` computes those per timeline; retention deletes only below ``first``, and a
  timeline no anchor can reach has no need at all.
- ``check_continuity`` walks each reachable timeline from ``first`` to its newest archived
  segment (or ``through``, if later) and reports every missing segment, with the gap finder of
  ``window.find_gaps`` (one implementation of "which segments are missing").

A backup reaches timeline T when its own timeline is on T's path and it ended (``stop_lsn``)
at or before the point where that path leaves its timeline, as PostgreSQL demands ("requested
timeline does not contain minimum recovery point" otherwise). Timeline paths come from the
archived history files through ``recovery.timeline_path``. A timeline above 1 without a
history file cannot be followed: it is reported, and retention keeps its WAL.

Pure except ``read_histories`` and ``continuity_info``, which read a repository.
Standard library only.
"""

from __future__ import annotations

import typing as t
from dataclasses import dataclass

from ansible_collections.pitr.postgresql.plugins.module_utils import window
from ansible_collections.pitr.postgresql.plugins.module_utils.catalog import (
    BackupRecord,
    list_backups,
    usable,
)
from ansible_collections.pitr.postgresql.plugins.module_utils.errors import RepositoryError
from ansible_collections.pitr.postgresql.plugins.module_utils.recovery import (
    RecoveryPlanError,
    TimelineSpan,
    span_of,
    timeline_path,
)
from ansible_collections.pitr.postgresql.plugins.module_utils.repository import Repository
from ansible_collections.pitr.postgresql.plugins.module_utils.storage import ObjectInfo
from ansible_collections.pitr.postgresql.plugins.module_utils.walfile import (
    DEFAULT_SEGMENT_SIZE,
    HISTORY,
    WalFileName,
    WalNameError,
    history_name,
    parse_lsn,
    segment_name,
)

WalListing = t.Sequence[tuple[WalFileName, ObjectInfo]]


@dataclass(frozen=True)
class Anchor:
    """Where a restore from one base backup starts reading WAL, and where it must get to."""

    label: str
    timeline: int  # the timeline the backup ended on
    start_segno: int  # the segment holding its start LSN
    stop_lsn: int  # consistent from here on

    def to_dict(self, segment_size: int = DEFAULT_SEGMENT_SIZE) -> dict[str, t.Any]:
        return {
            "backup": self.label,
            "timeline": self.timeline,
            "start_wal": segment_name(self.timeline, self.start_segno, segment_size),
        }


def anchor_of(record: BackupRecord, segment_size: int = DEFAULT_SEGMENT_SIZE) -> Anchor | None:
    """The anchor of a catalogued backup, or None when its record lacks the start point."""
    try:
        start_tli = 0
        if record.start_wal:
            start = WalFileName.parse(record.start_wal)
            start_segno, start_tli = start.segment_number(segment_size), start.timeline
        elif record.start_lsn:
            start_segno = parse_lsn(record.start_lsn) // segment_size
        else:
            return None
        stop = parse_lsn(record.stop_lsn) if record.stop_lsn else start_segno * segment_size
    except (ValueError, WalNameError):
        return None
    timeline = int(record.timeline or start_tli)
    if timeline < 1:
        return None
    return Anchor(record.label, timeline, start_segno, stop)


def reaches(anchor: Anchor, path: t.Sequence[TimelineSpan]) -> bool:
    """Can a restore from ``anchor`` follow ``path`` (a target timeline's spans)?"""
    span = span_of(path, anchor.timeline)
    return span is not None and (span.end is None or anchor.stop_lsn <= span.end)


def known_timelines(
    wal: WalListing, histories: t.Mapping[int, str], backups: t.Iterable[BackupRecord] = ()
) -> set[int]:
    """Every timeline the repository mentions: archived files, history files, backups."""
    found = {w.timeline for w, _info in wal} | set(histories)
    found |= {int(b.timeline) for b in backups if int(b.timeline or 0) > 0}
    return found


def timeline_paths(
    timelines: t.Iterable[int], histories: t.Mapping[int, str]
) -> tuple[dict[int, list[TimelineSpan]], dict[int, str]]:
    """(timeline -> its path, timeline -> why its path is unknown) for ``timelines``."""
    paths: dict[int, list[TimelineSpan]] = {}
    unknown: dict[int, str] = {}
    for tli in sorted(timelines):
        try:
            paths[tli] = timeline_path(tli, histories)
        except RecoveryPlanError as exc:
            unknown[tli] = exc.msg
    return paths, unknown


@dataclass
class TimelineNeed:
    """What the anchors need from one timeline (segment numbers)."""

    timeline: int
    first: int  # the oldest segment a restore may read from this timeline
    through: int | None = None  # a path leaves for a child after this segment (None: none)

    def merge(self, first: int, through: int | None) -> None:
        self.first = min(self.first, first)
        if through is not None:
            self.through = through if self.through is None else max(self.through, through)


def wal_needs(
    anchors: t.Iterable[Anchor],
    paths: t.Mapping[int, t.Sequence[TimelineSpan]],
    segment_size: int = DEFAULT_SEGMENT_SIZE,
) -> dict[int, TimelineNeed]:
    """Per timeline, the WAL a restore from any anchor to any reachable timeline may read.

    For each anchor and each target timeline it reaches, span k of the target's path supplies
    the segments from its first segment up to (not including) the next span's first segment;
    the anchor reads those at or after its own start segment.
    """
    needs: dict[int, TimelineNeed] = {}
    for anchor in anchors:
        for path in paths.values():
            if not reaches(anchor, path):
                continue
            for k, span in enumerate(path):
                lo = span.begin // segment_size
                hi = path[k + 1].begin // segment_size if k + 1 < len(path) else None
                first = max(lo, anchor.start_segno)
                if hi is not None and first >= hi:
                    continue  # this span supplies nothing at or after the anchor's start
                through = hi - 1 if hi is not None else None
                if span.tli in needs:
                    needs[span.tli].merge(first, through)
                else:
                    needs[span.tli] = TimelineNeed(span.tli, first, through)
    return needs


def read_histories(repo: Repository, wal: WalListing) -> dict[int, str]:
    """Timeline -> text of its archived history file (read through the checksum check)."""
    found: dict[int, str] = {}
    for w, _info in wal:
        if w.kind == HISTORY:
            _header, data = repo.get_wal(w.name)
            found[w.timeline] = data.decode("utf-8", errors="replace")
    return found


def check_continuity(
    backups: t.Sequence[BackupRecord],
    wal: WalListing,
    histories: t.Mapping[int, str],
    segment_size: int = DEFAULT_SEGMENT_SIZE,
) -> dict[str, t.Any]:
    """Walk the archive per timeline from the oldest usable backup's start; report every gap.

    Only ``usable`` backups are anchors. Without any, each timeline is checked from its
    oldest to its newest archived segment. Returns::

        {"continuous": bool, "anchors": [{"backup", "timeline", "start_wal"}],
         "oldest_backup": label or None, "gaps": [...window.find_gaps entries...],
         "missing_history": [timelines], "timelines": [per timeline, see below], "reason": str}

    Each timeline entry: ``timeline``, ``reachable`` (some anchor can restore onto it),
    ``history_file``, ``from_wal``/``to_wal`` (the range checked, or None), ``oldest_wal``,
    ``newest_wal``, ``segments_checked``, ``segments_missing``, ``gaps``.
    """
    good = [b for b in backups if usable(b)]
    anchors = [a for a in (anchor_of(b, segment_size) for b in good) if a is not None]
    timelines = known_timelines(wal, histories, good)
    paths, unknown = timeline_paths(timelines, histories)
    needs = wal_needs(anchors, paths, segment_size)
    present = window.archived_segments(wal, segment_size)
    gaps: list[dict[str, t.Any]] = []
    entries: list[dict[str, t.Any]] = []
    for tli in sorted(timelines):
        segs = present.get(tli, set())
        entry: dict[str, t.Any] = {
            "timeline": tli,
            "reachable": tli in needs,
            "history_file": tli == 1 or tli in histories,
            "from_wal": None,
            "to_wal": None,
            "oldest_wal": segment_name(tli, min(segs), segment_size) if segs else None,
            "newest_wal": segment_name(tli, max(segs), segment_size) if segs else None,
            "segments_checked": 0,
            "segments_missing": 0,
            "gaps": [],
        }
        entries.append(entry)
        need = needs.get(tli)
        if need is not None:
            first = need.first
            ends = [x for x in (max(segs) if segs else None, need.through) if x is not None]
            last = max(ends) if ends else None
        elif not anchors or tli in unknown:
            # Nothing anchors this timeline's checks: its own archived run, end to end.
            first = min(segs) if segs else 0
            last = max(segs) if segs else None
        else:
            continue  # no usable backup can restore onto it: nothing there is needed
        if last is None or last < first:
            continue
        entry["from_wal"] = segment_name(tli, first, segment_size)
        entry["to_wal"] = segment_name(tli, last, segment_size)
        entry["segments_checked"] = last - first + 1
        found = window.find_gaps(
            wal,
            segment_size,
            timeline=tli,
            from_wal=entry["from_wal"],
            to_wal=entry["to_wal"],
        )
        entry["gaps"] = found
        entry["segments_missing"] = sum(g["segments"] for g in found)
        gaps.extend(found)
    missing_history = sorted(unknown)
    oldest = _oldest(good)
    reason = ""
    if not anchors:
        reason = "no usable base backup: each timeline was checked from its oldest archived segment"
    elif gaps:
        first_gap = gaps[0]
        reason = (
            f"WAL segment {first_gap['from_wal']} is missing: restores that need it stop there"
            f" ({len(gaps)} gap{'s' if len(gaps) > 1 else ''}); take a new base backup"
        )
    elif missing_history:
        reason = (
            f"timeline {missing_history[0]} has no history file"
            f" ({history_name(missing_history[0])}) in the archive: PostgreSQL cannot follow it"
        )
    return {
        "continuous": not gaps and not missing_history,
        "anchors": [a.to_dict(segment_size) for a in anchors],
        "oldest_backup": oldest.label if oldest else None,
        "gaps": gaps,
        "missing_history": missing_history,
        "timelines": entries,
        "reason": reason,
    }


def _oldest(records: t.Sequence[BackupRecord]) -> BackupRecord | None:
    if not records:
        return None
    return min(records, key=lambda r: (r.stop_time or r.start_time or "", r.label))


def continuity_info(repo: Repository) -> dict[str, t.Any]:
    """Everything the ``archive_continuity_info`` module returns (reads only)."""
    identity = repo.identity()
    if identity is None:
        raise RepositoryError(
            f"repository {repo.describe()} is not initialised (no identity record): check that"
            " its storage is mounted and the path is right",
            repository=repo.describe(),
        )
    wal = repo.list_wal()
    histories = read_histories(repo, wal)
    result = check_continuity(list_backups(repo), wal, histories, identity.wal_segment_size)
    result["changed"] = False
    result["repository"] = repo.describe()
    result["wal_segment_size"] = identity.wal_segment_size
    return result


__all__ = [
    "Anchor",
    "TimelineNeed",
    "anchor_of",
    "check_continuity",
    "continuity_info",
    "known_timelines",
    "reaches",
    "read_histories",
    "timeline_paths",
    "wal_needs",
]

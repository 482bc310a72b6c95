# Copyright: contributors to pitr.postgresql
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The recovery planner: what a point-in-time restore will do, decided before anything changes.

Pure functions over facts the module reads (repository listing, timeline history files,
catalog records, the data directory's state), so that every rule is unit-testable:

- target validation: exactly one target; times with an explicit offset or a full zone name;
- timelines: the path of timelines PostgreSQL will follow, from the history files;
- backup selection: the newest usable backup on that path whose stop point lies before the
  target (time: stop_time < target; LSN: stop_lsn <= target; xid, name, immediate, latest: the
  newest usable backup, since the WAL position of an xid or a restore point is unknown until
  replay reaches it);
- WAL presence: every segment from the backup's start along the timeline path up to the
  segment where replay stops (found from the commit times in the archived WAL), no gap;
- the plan: backup, WAL range and size, data directory moves, settings, steps.

The one effectful helper, ``WaldumpInspector``, reads commit times of archived segments with
``pg_waldump``; the planner only sees the ``WalInspector`` protocol.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import typing as t
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta, timezone

from ansible_collections.pitr.postgresql.plugins.module_utils import window as window_mod
from ansible_collections.pitr.postgresql.plugins.module_utils.catalog import BackupRecord, usable
from ansible_collections.pitr.postgresql.plugins.module_utils.errors import PitrError
from ansible_collections.pitr.postgresql.plugins.module_utils.walfile import (
    DEFAULT_SEGMENT_SIZE,
    SEGMENT,
    WalFileName,
    format_lsn,
    history_name,
    parse_lsn,
    segment_name,
)

TARGET_KINDS = ("time", "lsn", "xid", "name", "immediate", "latest")
ACTIONS = ("promote", "pause", "shutdown")
ACCEPTED_TIME_FORM = "2026-11-25 10:30:00+00"
ACCEPTED_ZONE_FORM = "2026-11-25 10:30:00 Europe/Berlin"

# Files and names the restore keeps next to, and in, the data directory.
STATE_FILE = "pitr_restore.json"
STAGING_SUFFIX = ".pitr-staging"
OLD_INFIX = ".pitr-old-"
STATE_FORMAT = 1

# Restore point names are limited to MAXFNAMELEN - 1 bytes by PostgreSQL.
MAX_RESTORE_POINT_NAME = 63
FIRST_NORMAL_XID = 3

# Phases recorded in the data directory's state file.
PHASE_STAGING = "staging"  # being laid down in the staging directory
PHASE_PREPARED = "prepared"  # laid down, settings written, not started yet
PHASE_RECOVERING = "recovering"  # started in recovery
PHASE_PAUSED = "paused"  # stopped at the target, left paused as asked
PHASE_SHUTDOWN = "shutdown"  # stopped at the target, shut down as asked
PHASE_COMPLETED = "completed"  # promoted, recovery settings removed
PHASE_FAILED = "failed"
FINAL_PHASE_FOR_ACTION = {
    "promote": PHASE_COMPLETED,
    "pause": PHASE_PAUSED,
    "shutdown": PHASE_SHUTDOWN,
}


class RecoveryPlanError(PitrError):
    """The restore cannot be done as asked; nothing was changed (context says why)."""


class TargetError(RecoveryPlanError):
    """The requested recovery target is not valid."""


# --------------------------------------------------------------------------------------------
# Targets


@dataclass(frozen=True)
class RecoveryTarget:
    """A validated recovery target, with the value PostgreSQL will be given."""

    kind: str
    value: str
    inclusive: bool = True
    timeline: str = "latest"
    action: str = "promote"
    time: datetime | None = None
    lsn: int | None = None
    xid: int | None = None

    @property
    def setting_name(self) -> str | None:
        """The recovery_target* parameter for this target (None for latest)."""
        return {
            "time": "recovery_target_time",
            "lsn": "recovery_target_lsn",
            "xid": "recovery_target_xid",
            "name": "recovery_target_name",
            "immediate": "recovery_target",
        }.get(self.kind)

    @property
    def uses_inclusive(self) -> bool:
        return self.kind in ("time", "lsn", "xid")

    def describe(self) -> str:
        if self.kind == "latest":
            return "the end of the archived WAL (latest)"
        if self.kind == "immediate":
            return "the end of the base backup (immediate)"
        edge = ""
        if self.uses_inclusive:
            edge = " inclusive" if self.inclusive else " exclusive"
        label = {"time": "time", "lsn": "LSN", "xid": "transaction", "name": "restore point"}
        return f"{label[self.kind]} {self.value}{edge}"

    def to_dict(self) -> dict[str, t.Any]:
        return {
            "kind": self.kind,
            "value": self.value,
            "inclusive": self.inclusive,
            "timeline": self.timeline,
            "action": self.action,
            "description": self.describe(),
        }


_TIME_RE = re.compile(
    r"^(?P<date>\d{4}-\d{2}-\d{2})[ T](?P<clock>\d{2}:\d{2}(?::\d{2}(?:\.\d{1,6})?)?)"
    r"(?P<zone>.*)$"
)
_OFFSET_RE = re.compile(r"^\s*(?:(?P<z>[Zz])|(?P<sign>[+-])(?P<h>\d{2})(?::?(?P<m>\d{2}))?)$")
_ZONE_NAME_RE = re.compile(r"^\s+(?P<name>[A-Za-z][A-Za-z0-9_+\-]*(?:/[A-Za-z0-9_+\-]+)*)$")
# Full zone names that carry no ambiguity although they have no "Area/" part.
_BARE_ZONE_NAMES = {"UTC", "Etc/UTC", "Zulu"}


def _time_error(text: str, why: str) -> TargetError:
    return TargetError(
        f"target_time {text!r}: {why}. Write the time with an explicit UTC offset, for example"
        f" '{ACCEPTED_TIME_FORM}', or with a full time zone name, for example"
        f" '{ACCEPTED_ZONE_FORM}'.",
        target_time=text,
        accepted_forms=[ACCEPTED_TIME_FORM, ACCEPTED_ZONE_FORM],
    )


def _zoneinfo(name: str) -> t.Any:
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return None


def parse_target_time(text: str) -> datetime:
    """Parse a target time that names its zone unambiguously; return it as aware UTC.

    Accepted: ``YYYY-MM-DD HH:MM[:SS[.ffffff]]`` (or with ``T``) followed by an offset
    (``+00``, ``+0530``, ``-08:00``, ``Z``) or by a space and a full tz database name
    (``Europe/Berlin``, ``UTC``). Rejected: no zone (whose local time?), abbreviations such as
    CET or EST (ambiguous, and PostgreSQL resolves them with its own table), and local times
    that a daylight-saving change makes ambiguous or non-existent.
    """
    raw = text
    text = text.strip()
    m = _TIME_RE.match(text)
    if not m:
        raise _time_error(raw, "not a date and time")
    clock = m["clock"]
    if clock.count(":") == 1:
        clock += ":00"
    try:
        naive = datetime.fromisoformat(f"{m['date']} {clock}")
    except ValueError as exc:
        raise _time_error(raw, f"not a valid date and time ({exc})") from None
    zone = m["zone"]
    if not zone.strip():
        raise _time_error(raw, "it has no time zone, so it is not clear whose clock it means")
    om = _OFFSET_RE.match(zone)
    if om:
        if om["z"]:
            return naive.replace(tzinfo=UTC)
        hours, minutes = int(om["h"]), int(om["m"] or 0)
        if hours > 15 or minutes > 59:
            raise _time_error(raw, f"{zone.strip()!r} is not a valid UTC offset")
        delta = timedelta(hours=hours, minutes=minutes)
        tz = timezone(delta if om["sign"] == "+" else -delta)
        return naive.replace(tzinfo=tz).astimezone(UTC)
    zm = _ZONE_NAME_RE.match(zone)
    if not zm:
        raise _time_error(raw, f"{zone.strip()!r} is neither a UTC offset nor a time zone name")
    name = zm["name"]
    if re.match(r"^[A-Za-z]+[+-]\d", name):
        raise _time_error(
            raw,
            f"{name!r} is a POSIX-style zone, where the sign is reversed (PostgreSQL reads"
            " UTC+3 as three hours west of UTC)",
        )
    if "/" not in name and name not in _BARE_ZONE_NAMES:
        raise _time_error(
            raw,
            f"{name!r} is a time zone abbreviation or an unqualified name; abbreviations are"
            " ambiguous (CST is three different zones) and PostgreSQL reads them from its own"
            " table, not the tz database",
        )
    tz = _zoneinfo(name)
    if tz is None:
        raise _time_error(raw, f"{name!r} is not a time zone in the tz database")
    first = naive.replace(tzinfo=tz, fold=0)
    second = naive.replace(tzinfo=tz, fold=1)
    as_utc = first.astimezone(UTC)
    if as_utc.astimezone(tz).replace(tzinfo=None) != naive:
        raise _time_error(
            raw,
            f"{naive} does not exist in {name} (a daylight-saving change skips it); give the"
            " UTC offset you mean",
        )
    if first.utcoffset() != second.utcoffset():
        raise _time_error(
            raw,
            f"{naive} happens twice in {name} (a daylight-saving change turns the clock back),"
            " so it is ambiguous; give the UTC offset you mean",
        )
    return as_utc


def format_target_time(moment: datetime) -> str:
    """The form written to recovery_target_time: UTC with an explicit offset."""
    utc = moment.astimezone(UTC)
    text = utc.strftime("%Y-%m-%d %H:%M:%S")
    if utc.microsecond:
        text += f".{utc.microsecond:06d}"
    return text + "+00"


def parse_timeline(value: t.Any) -> str:
    """Normalise target_timeline: 'latest', 'current' or a positive timeline number."""
    if value is None or value == "":
        return "latest"
    text = str(value).strip().lower()
    if text in ("latest", "current"):
        return text
    try:
        number = int(text, 16) if text.startswith("0x") else int(text)
    except ValueError:
        raise TargetError(
            f"target_timeline {value!r} is not 'latest', 'current' or a timeline number",
            target_timeline=value,
        ) from None
    if number < 1 or number > 0xFFFFFFFF:
        raise TargetError(f"target_timeline {value!r} is out of range", target_timeline=value)
    return str(number)


def parse_target(
    *,
    target_time: str | None = None,
    target_lsn: str | None = None,
    target_xid: str | int | None = None,
    target_name: str | None = None,
    target: str | None = None,
    inclusive: bool | None = None,
    timeline: t.Any = None,
    action: str | None = None,
) -> RecoveryTarget:
    """Validate the request: exactly one target, with its options."""
    given = {
        name: value
        for name, value in (
            ("target_time", target_time),
            ("target_lsn", target_lsn),
            ("target_xid", target_xid),
            ("target_name", target_name),
            ("target", target),
        )
        if value not in (None, "")
    }
    if len(given) != 1:
        listed = ", ".join(sorted(given)) if given else "none"
        raise TargetError(
            "give exactly one recovery target: target_time, target_lsn, target_xid,"
            f" target_name, or target=immediate|latest (given: {listed})",
            given=sorted(given),
        )
    action = action or "promote"
    if action not in ACTIONS:
        raise TargetError(f"action {action!r} is not one of {', '.join(ACTIONS)}", action=action)
    tl = parse_timeline(timeline)
    ((option, raw),) = given.items()
    kind = {
        "target_time": "time",
        "target_lsn": "lsn",
        "target_xid": "xid",
        "target_name": "name",
    }.get(option)
    moment: datetime | None = None
    lsn: int | None = None
    xid: int | None = None
    if kind is None:
        kind = str(raw).strip().lower()
        if kind not in ("immediate", "latest"):
            raise TargetError(
                f"target {raw!r} is not 'immediate' (the end of the base backup) or 'latest'"
                " (the end of the archived WAL); for a time, an LSN, a transaction or a restore"
                " point use target_time, target_lsn, target_xid or target_name",
                target=raw,
            )
        value = "immediate" if kind == "immediate" else ""
    elif kind == "time":
        moment = parse_target_time(str(raw))
        value = format_target_time(moment)
    elif kind == "lsn":
        try:
            lsn = parse_lsn(str(raw))
        except ValueError as exc:
            raise TargetError(
                f"target_lsn {raw!r} is not an LSN: write it as PostgreSQL prints it, for"
                " example 0/3000148",
                target_lsn=raw,
            ) from exc
        if lsn == 0:
            raise TargetError("target_lsn 0/0 is not a WAL position", target_lsn=raw)
        value = format_lsn(lsn)
    elif kind == "xid":
        text = str(raw).strip()
        if not text.isdigit():
            raise TargetError(
                f"target_xid {raw!r} is not a transaction ID (a positive integer such as 1234)",
                target_xid=raw,
            )
        xid = int(text)
        if xid < FIRST_NORMAL_XID or xid >= 1 << 64:
            raise TargetError(
                f"target_xid {raw!r} is not a normal transaction ID (3 or more)",
                target_xid=raw,
            )
        value = str(xid)
    else:
        value = str(raw)
        if len(value.encode()) > MAX_RESTORE_POINT_NAME:
            raise TargetError(
                f"target_name {raw!r} is longer than PostgreSQL's {MAX_RESTORE_POINT_NAME}-byte"
                " limit for restore point names",
                target_name=raw,
            )
        if "\n" in value or "\x00" in value:
            raise TargetError("target_name must be one line of text", target_name=raw)
    uses_inclusive = kind in ("time", "lsn", "xid")
    if inclusive is False and not uses_inclusive:
        raise TargetError(
            f"inclusive=false has no meaning for {option}={raw}: PostgreSQL stops exactly at a"
            " restore point and at the end of a backup",
            inclusive=False,
        )
    if kind == "latest" and action != "promote":
        raise TargetError(
            f"action={action} needs a target to stop at; target=latest replays all archived WAL"
            " and then ends recovery (promotes). Give a target_time, target_lsn, target_xid"
            " or target_name to stop there and inspect.",
            action=action,
        )
    return RecoveryTarget(
        kind=kind,
        value=value,
        inclusive=True if inclusive is None else bool(inclusive),
        timeline=tl,
        action=action,
        time=moment,
        lsn=lsn,
        xid=xid,
    )


# --------------------------------------------------------------------------------------------
# Timelines


@dataclass(frozen=True)
class TimelineSpan:
    """One timeline on a path: WAL from ``begin`` (inclusive) to ``end`` (exclusive, None=open)."""

    tli: int
    begin: int
    end: int | None

    def to_dict(self) -> dict[str, t.Any]:
        return {
            "timeline": self.tli,
            "begin_lsn": format_lsn(self.begin),
            "end_lsn": None if self.end is None else format_lsn(self.end),
        }


def parse_history(text: str, tli: int) -> list[TimelineSpan]:
    """The timeline path of ``tli`` from its history file (``parent<TAB>switchpoint<TAB>why``)."""
    spans: list[TimelineSpan] = []
    begin = 0
    last_parent = 0
    for lineno, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        fields = stripped.split(None, 2)
        try:
            parent = int(fields[0])
            switch = parse_lsn(fields[1])
        except (ValueError, IndexError) as exc:
            raise RecoveryPlanError(
                f"{history_name(tli)} line {lineno} is not 'timeline<TAB>LSN<TAB>reason': {line!r}",
                history_file=history_name(tli),
            ) from exc
        if parent <= last_parent or parent >= tli or switch < begin:
            raise RecoveryPlanError(
                f"{history_name(tli)} line {lineno} is out of order: {line!r}",
                history_file=history_name(tli),
            )
        spans.append(TimelineSpan(parent, begin, switch))
        begin, last_parent = switch, parent
    spans.append(TimelineSpan(tli, begin, None))
    return spans


def resolve_timeline(requested: str, backup_tli: int, history_tlis: t.Collection[int]) -> int:
    """The timeline number recovery will aim for (as PostgreSQL resolves 'latest')."""
    if requested == "current":
        return backup_tli
    if requested == "latest":
        # PostgreSQL's findNewestTimeLine: probe history files upwards from the start timeline.
        newest = backup_tli
        while newest + 1 in history_tlis:
            newest += 1
        return newest
    return int(requested)


def timeline_path(tli: int, histories: t.Mapping[int, str]) -> list[TimelineSpan]:
    """The spans PostgreSQL follows to reach timeline ``tli``."""
    if tli == 1:
        return [TimelineSpan(1, 0, None)]
    if tli not in histories:
        raise RecoveryPlanError(
            f"timeline {tli} has no history file ({history_name(tli)}) in the archive; without"
            " it PostgreSQL cannot follow that timeline",
            timeline=tli,
        )
    return parse_history(histories[tli], tli)


def span_of(path: t.Sequence[TimelineSpan], tli: int) -> TimelineSpan | None:
    for span in path:
        if span.tli == tli:
            return span
    return None


def segment_on_path(
    path: t.Sequence[TimelineSpan], segno: int, segment_size: int = DEFAULT_SEGMENT_SIZE
) -> str:
    """The file PostgreSQL reads for segment ``segno`` when following ``path``.

    As XLogFileReadAnyTLI: the newest timeline whose start segment is at or before ``segno``.
    The segment holding a switch point comes from the new timeline.
    """
    for span in reversed(path):
        if span.begin // segment_size <= segno:
            return segment_name(span.tli, segno, segment_size)
    return segment_name(path[0].tli, segno, segment_size)


# --------------------------------------------------------------------------------------------
# Backups


def parse_record_time(text: str) -> datetime:
    """A catalog time (ISO 8601 with offset) as aware UTC."""
    moment = datetime.fromisoformat(str(text).strip().replace("Z", "+00:00"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


@dataclass(frozen=True)
class BackupChoice:
    record: t.Any
    path: list[TimelineSpan]
    timeline: int


def _backup_summary(record: BackupRecord) -> dict[str, t.Any]:
    return {
        "label": record.label,
        "start_time": record.start_time,
        "stop_time": record.stop_time,
        "start_lsn": record.start_lsn,
        "stop_lsn": record.stop_lsn,
        "start_wal": record.start_wal,
        "stop_wal": record.stop_wal,
        "timeline": record.timeline,
        "backup_format": record.backup_format,
        "compression": record.compression,
        "size_on_disk": record.size_on_disk,
        "cluster_size": record.cluster_size,
    }


def _stops_before(record: BackupRecord, target: RecoveryTarget) -> bool:
    if target.kind == "time" and target.time is not None:
        return parse_record_time(record.stop_time) < target.time
    if target.kind == "lsn" and target.lsn is not None:
        return parse_lsn(record.stop_lsn) <= target.lsn
    return True


def backup_tablespaces(record: BackupRecord) -> list[str]:
    """Tablespace archives in a tar-format backup (``<oid>.tar[.ext]``)."""
    if record.backup_format != "tar":
        return []
    return [f for f in record.files if re.match(r"^\d+\.tar(\.\w+)?$", f)]


def select_backup(
    target: RecoveryTarget,
    backups: t.Sequence[BackupRecord],
    histories: t.Mapping[int, str],
    *,
    label: str | None = None,
    system_identifier: int | None = None,
) -> BackupChoice:
    """The newest usable backup that can reach ``target`` (see the module docstring)."""
    history_tlis = set(histories)
    candidates = [b for b in backups if usable(b)]
    if system_identifier is not None:
        candidates = [b for b in candidates if int(b.system_identifier) == system_identifier]
    if label:
        chosen = [b for b in backups if b.label == label]
        if not chosen:
            raise RecoveryPlanError(
                f"backup {label!r} is not in the repository's catalog",
                backups=[b.label for b in backups],
            )
        if chosen[0] not in candidates:
            raise RecoveryPlanError(
                f"backup {label!r} is not usable (status {chosen[0].status}, verified"
                f" {chosen[0].verified}); choose another or let the planner choose",
                backup=_backup_summary(chosen[0]),
            )
        candidates = chosen
    if not candidates:
        raise RecoveryPlanError(
            "the repository has no usable base backup (finished and verified); take one first"
            " (pitr.postgresql.base_backup)",
            backups=[
                {"label": b.label, "status": b.status, "verified": b.verified} for b in backups
            ],
        )
    # Newest first: by stop time, then stop LSN.
    candidates = sorted(
        candidates,
        key=lambda b: (parse_record_time(b.stop_time), parse_lsn(b.stop_lsn)),
        reverse=True,
    )
    problems: list[str] = []
    before_target = [b for b in candidates if _stops_before(b, target)]
    if not before_target:
        oldest = candidates[-1]
        raise RecoveryPlanError(
            f"target {target.describe()} is before the end of the oldest usable backup"
            f" ({oldest.label}, which ended at {oldest.stop_time}, LSN {oldest.stop_lsn}):"
            " a base backup can only be rolled forward, so no backup can reach it",
            reason="before_oldest_backup",
            oldest_backup=_backup_summary(oldest),
        )
    for record in before_target:
        tli = resolve_timeline(target.timeline, int(record.timeline), history_tlis)
        try:
            path = timeline_path(tli, histories)
        except RecoveryPlanError as exc:
            problems.append(f"{record.label}: {exc.msg}")
            continue
        span = span_of(path, int(record.timeline))
        if span is None:
            problems.append(
                f"{record.label} is on timeline {record.timeline}, which is not in the history"
                f" of timeline {tli}"
            )
            continue
        if span.end is not None and parse_lsn(record.stop_lsn) > span.end:
            problems.append(
                f"{record.label} ends at {record.stop_lsn}, after timeline {tli} branched off"
                f" timeline {span.tli} at {format_lsn(span.end)}"
            )
            continue
        return BackupChoice(record, path, tli)
    raise RecoveryPlanError(
        f"no usable backup lies on the timeline history asked for ({target.timeline}): "
        + "; ".join(problems),
        reason="no_backup_on_timeline",
        problems=problems,
    )


# --------------------------------------------------------------------------------------------
# WAL


@dataclass(frozen=True)
class SegmentSummary:
    """What replay finds in one archived segment: commit/abort times and the last record."""

    name: str
    commit_times: tuple[datetime, ...] = ()
    last_record_lsn: int | None = None

    @property
    def last_commit(self) -> datetime | None:
        return max(self.commit_times) if self.commit_times else None


class WalInspector(t.Protocol):
    """Reads archived segments for the planner (pg_waldump in production, tables in tests)."""

    def summary(self, segment: str) -> SegmentSummary:
        """The commit and abort times in an archived segment, in WAL order."""

    def last_record_lsn(self, segment: str) -> int | None:
        """Where the last complete record of an archived segment starts."""


@dataclass(frozen=True)
class WalScan:
    """WAL available along a timeline path from a backup's start segment."""

    start_segno: int
    last_segno: int  # the last segment of the unbroken run (start_segno - 1 when none)
    archive_last_segno: int | None  # the newest archived segment on the path
    missing: tuple[str, ...]  # segments missing between the run's end and the newest one
    names: tuple[str, ...]  # the run, in replay order
    from_backup: frozenset[int] = frozenset()

    @property
    def gap(self) -> bool:
        return bool(self.missing)


def scan_wal(
    path: t.Sequence[TimelineSpan],
    start_segno: int,
    archived: t.Mapping[str, int],
    *,
    from_backup: t.Collection[int] = (),
    segment_size: int = DEFAULT_SEGMENT_SIZE,
) -> WalScan:
    """Find the unbroken run of segments from ``start_segno`` along ``path``.

    ``archived`` maps archived segment names to their stored size; ``from_backup`` are segment
    numbers the base backup brings with it (its pg_wal).
    """
    on_path_max: int | None = None
    for name in archived:
        try:
            w = WalFileName.parse(name)
        except ValueError:
            continue
        if w.kind != SEGMENT:
            continue
        segno = w.segment_number(segment_size)
        if segno >= start_segno and segment_on_path(path, segno, segment_size) == name:
            on_path_max = segno if on_path_max is None else max(on_path_max, segno)
    names: list[str] = []
    segno = start_segno
    while True:
        name = segment_on_path(path, segno, segment_size)
        if name in archived or segno in from_backup:
            names.append(name)
            segno += 1
            continue
        break
    last = segno - 1
    missing: list[str] = []
    if on_path_max is not None and on_path_max > last:
        for s in range(last + 1, on_path_max + 1):
            name = segment_on_path(path, s, segment_size)
            if name not in archived and s not in from_backup:
                missing.append(name)
    return WalScan(
        start_segno, last, on_path_max, tuple(missing), tuple(names), frozenset(from_backup)
    )


def describe_gap(missing: t.Sequence[str]) -> str:
    if not missing:
        return ""
    if len(missing) == 1:
        return f"WAL segment {missing[0]} is missing from the archive"
    return (
        f"{len(missing)} WAL segments are missing from the archive, first {missing[0]}, last"
        f" {missing[-1]}"
    )


@dataclass
class _Finder:
    """Cached look-ups of commit times along the unbroken run."""

    scan: WalScan
    inspector: WalInspector
    lo: int
    cache: dict[int, SegmentSummary] = field(default_factory=dict)

    def summary(self, segno: int) -> SegmentSummary:
        if segno not in self.cache:
            name = self.scan.names[segno - self.scan.start_segno]
            self.cache[segno] = self.inspector.summary(name)
        return self.cache[segno]

    def last_commit_upto(self, segno: int) -> datetime | None:
        """The newest commit time in the nearest segment at or before ``segno`` having one."""
        s = segno
        while s >= self.lo:
            found = self.summary(s).last_commit
            if found is not None:
                return found
            s -= 1
        return None


_T = t.TypeVar("_T")


def _given(value: _T | None, what: str) -> _T:
    """``value``, which the target's kind guarantees; a clear error if a caller broke that."""
    if value is None:
        raise TargetError(f"the target has no {what}")
    return value


def _passes(moment: datetime, target: RecoveryTarget) -> bool:
    """Would PostgreSQL stop at a commit with this time (recoveryStopsBefore)?"""
    wanted = _given(target.time, "time")
    return moment > wanted if target.inclusive else moment >= wanted


def _archived_after(
    scan: WalScan, wal: t.Sequence[tuple[WalFileName, t.Any]], target: RecoveryTarget
) -> int | None:
    """The first segment of the run archived (file time) after the target time: a segment
    is archived after its last commit, so the stop is most likely there (a hint only)."""
    wanted = _given(target.time, "time").timestamp()
    mtimes = {w.name: float(getattr(info, "mtime", 0.0) or 0.0) for w, info in wal}
    for i, name in enumerate(scan.names):
        if mtimes.get(name, 0.0) >= wanted:
            return scan.start_segno + i
    return None


def find_time_stop(
    target: RecoveryTarget,
    scan: WalScan,
    consistent_segno: int,
    inspector: WalInspector,
    hint: int | None = None,
) -> tuple[int | None, datetime | None]:
    """The segment where replay stops for a time target, and the run's last commit time.

    Replay stops before the first commit (or abort) whose time lies beyond the target; if the
    run holds none, recovery would end before the target. Binary search over the run keeps
    the pg_waldump calls logarithmic; the answer is an upper bound that is always safe: a
    commit beyond the target exists at or before the segment returned.

    ``hint``: the segment most likely to hold the stop (the first one archived after the
    target, by the repository's file times). It only orders the look-ups: the hinted segment
    and its neighbour are read first, and when they bracket the stop the search ends there
    (two pg_waldump calls instead of log2 of the run); a wrong hint costs two calls more.
    """
    lo, hi = consistent_segno, scan.last_segno
    if hi < lo:
        return None, None
    finder = _Finder(scan, inspector, lo)
    newest = finder.last_commit_upto(hi)
    if newest is None or not _passes(newest, target):
        return None, newest

    def passes_at(segno: int) -> bool:
        found = finder.last_commit_upto(segno)
        return found is not None and _passes(found, target)

    if hint is not None and lo <= hint <= hi:
        if passes_at(hint):
            if hint == lo or not passes_at(hint - 1):
                return hint, newest
            hi = hint - 1
        else:
            lo = hint + 1
            if passes_at(lo):
                return lo, newest
            lo += 1
    while lo < hi:
        mid = (lo + hi) // 2
        found = finder.last_commit_upto(mid)
        if found is not None and _passes(found, target):
            hi = mid
        else:
            lo = mid + 1
    return hi, newest


# --------------------------------------------------------------------------------------------
# Data directory and plan


@dataclass(frozen=True)
class DataDirState:
    """What the module found at the data directory before planning."""

    path: str
    exists: bool = False
    empty: bool = True
    running: bool = False
    pid: int | None = None
    system_identifier: int | None = None
    is_mount_point: bool = False
    restore_state: dict[str, t.Any] | None = None
    staging_exists: bool = False
    staging_state: dict[str, t.Any] | None = None
    free_bytes: int | None = None
    siblings: tuple[str, ...] = ()  # names in the parent directory (to pick a free old name)


@dataclass(frozen=True)
class RestoreRequest:
    target: RecoveryTarget
    repository: str
    data_dir: str
    restore_command: str
    backup_label: str | None = None
    clone: bool = False
    port: int | None = None
    force: bool = False
    space_margin: float = 0.10


def request_fingerprint(request: RestoreRequest) -> str:
    """Identifies "the same restore" across runs (the action is not part of it)."""
    t_ = request.target
    data = {
        "kind": t_.kind,
        "value": t_.value,
        "inclusive": t_.inclusive if t_.uses_inclusive else None,
        "timeline": t_.timeline,
        "backup": request.backup_label or "",
        "repository": os.path.normpath(request.repository),
        "data_dir": os.path.normpath(request.data_dir),
        "clone": request.clone,
    }
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:32]


def old_data_dir_name(data_dir: str, now: datetime, siblings: t.Collection[str] = ()) -> str:
    """A dated name beside the data directory, never one that exists."""
    base = os.path.normpath(data_dir)
    stamp = now.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")
    candidate = f"{base}{OLD_INFIX}{stamp}"
    n = 2
    taken = {os.path.basename(s) for s in siblings}
    while os.path.basename(candidate) in taken:
        candidate = f"{base}{OLD_INFIX}{stamp}-{n}"
        n += 1
    return candidate


def recovery_settings(
    target: RecoveryTarget, restore_command: str, timeline: int
) -> dict[str, str]:
    """The settings written for recovery (in the order written)."""
    settings: dict[str, str] = {"restore_command": restore_command}
    if target.setting_name:
        settings[target.setting_name] = target.value
        if target.uses_inclusive:
            settings["recovery_target_inclusive"] = "on" if target.inclusive else "off"
        # Always pause at the target: the role confirms where replay stopped, then acts.
        settings["recovery_target_action"] = "pause"
    settings["recovery_target_timeline"] = str(timeline)
    # Connections during recovery let the role watch progress and confirm the stop point.
    settings["hot_standby"] = "on"
    return settings


def clone_settings(port: int | None) -> dict[str, str]:
    """Settings that keep a clone from touching the production archive or port."""
    settings = {"archive_mode": "off"}
    if port:
        settings["port"] = str(port)
    return settings


@dataclass
class RecoveryPlan:
    """Everything the restore will do; ``to_dict`` is the module's structured output."""

    decision: str  # restore | resume | none
    reason: str
    target: RecoveryTarget
    fingerprint: str
    backup: dict[str, t.Any] = field(default_factory=dict)
    timeline: dict[str, t.Any] = field(default_factory=dict)
    wal: dict[str, t.Any] = field(default_factory=dict)
    window: dict[str, t.Any] = field(default_factory=dict)
    data_dir: dict[str, t.Any] = field(default_factory=dict)
    space: dict[str, t.Any] = field(default_factory=dict)
    settings: dict[str, str] = field(default_factory=dict)
    clone_settings: dict[str, str] = field(default_factory=dict)
    steps: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    state: dict[str, t.Any] | None = None

    def to_dict(self) -> dict[str, t.Any]:
        result = asdict(self)
        result["target"] = self.target.to_dict()
        return result


def _window_summary(
    choice_path: t.Sequence[TimelineSpan],
    oldest: BackupRecord | None,
    scan: WalScan | None,
    newest_commit: datetime | None,
    segment_size: int,
    per_timeline: t.Sequence[dict[str, t.Any]] = (),
) -> dict[str, t.Any]:
    """The window along the chosen timeline path, plus window.py's view per timeline."""
    window: dict[str, t.Any] = {
        "timeline_path": [s.to_dict() for s in choice_path],
        "earliest_time": oldest.stop_time if oldest is not None else None,
        "earliest_lsn": oldest.stop_lsn if oldest is not None else None,
        "latest_commit_time": format_target_time(newest_commit) if newest_commit else None,
        "latest_lsn": None,
        "last_segment": None,
        "gap": [],
    }
    if scan is not None and scan.names:
        window["last_segment"] = scan.names[-1]
        window["latest_lsn"] = format_lsn((scan.last_segno + 1) * segment_size)
        window["gap"] = list(scan.missing)
    window["timelines"] = list(per_timeline)
    return window


def timelines_window(
    backups: t.Sequence[BackupRecord],
    wal: t.Sequence[tuple[WalFileName, t.Any]],
    segment_size: int,
    newest_commit: t.Mapping[int, datetime] | None = None,
) -> list[dict[str, t.Any]]:
    """window.recoverable_window as a list (one entry per timeline, oldest first)."""
    commit_times = {tl: when.isoformat() for tl, when in (newest_commit or {}).items()}
    per = window_mod.recoverable_window(backups, wal, commit_times, segment_size)
    return [per[tl] for tl in sorted(per)]


def nearest_targets(window: t.Mapping[str, t.Any]) -> list[dict[str, t.Any]]:
    """Targets that would be accepted, nearest the edges of the recoverable window."""
    found: list[dict[str, t.Any]] = []
    if window.get("earliest_time"):
        found.append(
            {
                "edge": "earliest",
                "after_time": window["earliest_time"],
                "note": "any target_time after the end of the oldest usable backup",
            }
        )
    if window.get("latest_commit_time"):
        found.append(
            {
                "edge": "latest",
                "target_time": window["latest_commit_time"],
                "inclusive": False,
                "note": "recovers every transaction committed before the last archived commit",
            }
        )
    if window.get("last_segment") and not window.get("gap"):
        found.append({"edge": "latest", "target": "latest", "note": "recovers everything archived"})
    return found


def _refuse(msg: str, window: dict[str, t.Any], **context: t.Any) -> RecoveryPlanError:
    return RecoveryPlanError(msg, window=window, nearest_targets=nearest_targets(window), **context)


def _wal_size(
    scan: WalScan, archived: t.Mapping[str, int], upto: int, segment_size: int
) -> dict[str, t.Any]:
    names = scan.names[: max(0, upto - scan.start_segno + 1)]
    stored = sum(archived.get(n, 0) for n in names)
    return {
        "first": names[0] if names else None,
        "last": names[-1] if names else None,
        "segments": len(names),
        "stored_bytes": stored,
        "bytes": len(names) * segment_size,
    }


def decide_action(
    request: RestoreRequest, fingerprint: str, state: DataDirState
) -> tuple[str, str]:
    if request.force:
        return "restore", "force: restoring again"
    current = state.restore_state
    if current and current.get("fingerprint") == fingerprint:
        phase = current.get("phase")
        if phase == FINAL_PHASE_FOR_ACTION[request.target.action]:
            return "none", f"already restored to this target ({phase} at {current.get('updated')})"
        if phase == PHASE_COMPLETED:
            return "none", (
                f"already restored to this target and promoted at {current.get('updated')}"
            )
        return "resume", f"a restore to this target stopped in phase {phase!r}: resuming it"
    staged = state.staging_state
    if (
        not state.exists
        and staged
        and staged.get("fingerprint") == fingerprint
        and staged.get("phase") == PHASE_PREPARED
    ):
        return "resume", "the restored data directory is prepared beside it: putting it in place"
    return "restore", "restoring"


def plan_recovery(
    request: RestoreRequest,
    *,
    backups: t.Sequence[BackupRecord],
    wal: t.Sequence[tuple[WalFileName, t.Any]],
    histories: t.Mapping[int, str],
    data_dir: DataDirState,
    inspector: WalInspector | None,
    now: datetime,
    system_identifier: int | None = None,
    segment_size: int = DEFAULT_SEGMENT_SIZE,
) -> RecoveryPlan:
    """Decide the restore, or raise RecoveryPlanError (with the window) before any change.

    ``wal`` is ``Repository.list_wal()``; ``histories`` maps timeline numbers to the text of
    their archived history files.
    """
    target = request.target
    fingerprint = request_fingerprint(request)
    action, reason = decide_action(request, fingerprint, data_dir)
    plan = RecoveryPlan(decision=action, reason=reason, target=target, fingerprint=fingerprint)
    if action != "restore":
        plan.state = data_dir.restore_state or data_dir.staging_state
        plan.data_dir = {
            "path": data_dir.path,
            "exists": data_dir.exists,
            "running": data_dir.running,
            "pid": data_dir.pid,
            "staging_dir": os.path.normpath(data_dir.path) + STAGING_SUFFIX,
        }
        recorded = plan.state or {}
        plan.backup = dict(recorded.get("backup") or {})
        plan.settings = dict(recorded.get("settings") or {})
        plan.clone_settings = dict(recorded.get("clone_settings") or {})
        plan.timeline = dict(recorded.get("timeline") or {})
        plan.data_dir["old_data_dir"] = recorded.get("old_data_dir")
        plan.steps = _resume_steps(action, data_dir, recorded)
        return plan

    _check_data_dir(data_dir, system_identifier)
    archived = {w.name: int(info.size) for w, info in wal if w.kind == SEGMENT}
    try:
        choice = select_backup(
            target,
            backups,
            histories,
            label=request.backup_label,
            system_identifier=system_identifier,
        )
    except RecoveryPlanError as exc:
        per_timeline = timelines_window(backups, wal, segment_size)
        oldest = min(
            (b for b in backups if usable(b)),
            key=lambda b: parse_record_time(b.stop_time),
            default=None,
        )
        window = _window_summary([], oldest, None, None, segment_size, per_timeline)
        context = dict(exc.context)
        context.setdefault("window", window)
        context.setdefault("nearest_targets", nearest_targets(window))
        raise RecoveryPlanError(exc.msg, **context) from None
    record = choice.record
    path = choice.path
    oldest_on_path = _oldest_on_path(backups, path)
    per_timeline = timelines_window(backups, wal, segment_size)
    tablespaces = backup_tablespaces(record)
    if tablespaces:
        raise RecoveryPlanError(
            f"backup {record.label} holds tablespaces ({', '.join(tablespaces)}); restoring"
            " tablespaces is not supported yet",
            backup=_backup_summary(record),
        )
    start_segno = parse_lsn(record.start_lsn) // segment_size
    stop_lsn = parse_lsn(record.stop_lsn)
    # The segment holding the last byte before stop_lsn (the catalog's stop_wal): replay is
    # consistent once it has read that far.
    stop_segno = max(stop_lsn - 1, 0) // segment_size
    # The backup's own WAL (pg_wal.tar, or pg_wal in a plain copy) covers its start up to the
    # segment before the one it stopped in; that last one is only partly streamed.
    from_backup: set[int] = set()
    if (record.wal_method or "").lower() == "stream":
        from_backup = set(range(start_segno, stop_segno))
        if target.kind == "immediate":
            from_backup.add(stop_segno)
    scan = scan_wal(path, start_segno, archived, from_backup=from_backup, segment_size=segment_size)
    window = _window_summary(path, oldest_on_path, scan, None, segment_size, per_timeline)

    if scan.last_segno < stop_segno:
        missing = segment_on_path(path, scan.last_segno + 1, segment_size)
        raise _refuse(
            f"the archive lacks WAL that backup {record.label} needs to become consistent:"
            f" segment {missing} is missing (the backup ended in"
            f" {segment_on_path(path, stop_segno, segment_size)})",
            window,
            reason="wal_gap",
            gap=[missing],
        )

    last_needed = scan.last_segno
    exact = False
    if target.kind == "time":
        if inspector is None:
            raise RecoveryPlanError("a time target needs the WAL inspector (pg_waldump)")
        stop_segno_t, newest = find_time_stop(
            target, scan, stop_segno, inspector, _archived_after(scan, wal, target)
        )
        if newest is not None and scan.last_segno == scan.archive_last_segno:
            per_timeline = timelines_window(backups, wal, segment_size, {path[-1].tli: newest})
        window = _window_summary(path, oldest_on_path, scan, newest, segment_size, per_timeline)
        if stop_segno_t is None:
            edge = (
                f"the last commit archived after backup {record.label} is at"
                f" {format_target_time(newest)}"
                if newest
                else f"no transaction committed in the archived WAL after backup {record.label}"
            )
            if scan.gap:
                raise _refuse(
                    f"target {target.describe()} cannot be reached: {describe_gap(scan.missing)}"
                    f" and {edge} (before the gap). Restore the missing segments, or choose a"
                    " target before the gap.",
                    window,
                    reason="wal_gap",
                    gap=list(scan.missing),
                )
            raise _refuse(
                f"target {target.describe()} is after the end of the archived WAL: {edge}."
                " Recovery would end before reaching the target. Choose an earlier target,"
                " or wait until the WAL that holds it is archived.",
                window,
                reason="after_archive_end",
            )
        last_needed, exact = stop_segno_t, True
    elif target.kind == "lsn":
        target_lsn = _given(target.lsn, "LSN")
        target_segno = target_lsn // segment_size
        if target_lsn < stop_lsn:
            raise _refuse(
                f"target LSN {target.value} is before the end of backup {record.label}"
                f" ({record.stop_lsn}): the cluster is not consistent before that point",
                window,
                reason="before_oldest_backup",
            )
        reachable = target_segno < scan.last_segno
        if target_segno == scan.last_segno and inspector is not None:
            last = inspector.last_record_lsn(scan.names[-1])
            reachable = last is not None and last >= target_lsn
        if not reachable:
            why = describe_gap(scan.missing) if scan.gap else "the archived WAL ends before it"
            raise _refuse(
                f"target LSN {target.value} cannot be reached: {why} (the unbroken WAL ends"
                f" with {scan.names[-1]}).",
                window,
                reason="wal_gap" if scan.gap else "after_archive_end",
                gap=list(scan.missing),
            )
        # The record that crosses the target may end in the next segment.
        last_needed, exact = min(target_segno + 1, scan.last_segno), True
    elif target.kind == "immediate":
        last_needed, exact = stop_segno, True
    elif target.kind == "latest":
        if scan.gap:
            raise _refuse(
                f"target latest would stop early and silently: {describe_gap(scan.missing)},"
                f" and WAL archived after the gap (up to"
                f" {segment_on_path(path, scan.archive_last_segno or 0, segment_size)}) would"
                " be lost. Restore the missing segments, or give a target before the gap.",
                window,
                reason="wal_gap",
                gap=list(scan.missing),
            )
    elif scan.gap:  # xid, name: where they lie is only known during replay
        plan.warnings.append(
            f"{describe_gap(scan.missing)}: replay can only reach"
            f" {scan.names[-1]}; if the {target.kind} target lies after it, recovery will stop"
            " with 'recovery ended before configured recovery target was reached'"
        )

    plan.backup = _backup_summary(record)
    plan.backup["path"] = record_path(request.repository, record.label)
    plan.backup["layout"] = backup_layout(record)
    plan.timeline = {
        "requested": target.timeline,
        "resolved": choice.timeline,
        "backup_timeline": int(record.timeline),
        "path": [s.to_dict() for s in path],
    }
    plan.wal = _wal_size(scan, archived, last_needed, segment_size)
    plan.wal["last_is_exact"] = exact
    plan.wal["end_lsn"] = format_lsn((last_needed + 1) * segment_size)
    plan.wal["archive_last"] = (
        segment_on_path(path, scan.archive_last_segno, segment_size)
        if scan.archive_last_segno is not None
        else None
    )
    plan.window = window
    plan.settings = recovery_settings(target, request.restore_command, choice.timeline)
    plan.clone_settings = clone_settings(request.port) if request.clone else {}
    plan.data_dir = _data_dir_plan(data_dir, now)
    plan.space = _space_plan(record, plan.wal, data_dir, request.space_margin)
    if not plan.space["ok"]:
        raise _refuse(
            f"not enough free space beside {data_dir.path}: the restore needs about"
            f" {_human(plan.space['needed_bytes'])} and"
            f" {_human(plan.space['available_bytes'])} is free (the old data directory is"
            " kept, not deleted). Free space or restore elsewhere (a clone).",
            window,
            reason="no_space",
            space=plan.space,
        )
    plan.steps = _restore_steps(plan, data_dir)
    plan.state = restore_state(plan, PHASE_STAGING, now)
    return plan


def record_path(repository: str, label: str) -> str:
    """Local path of a backup in a POSIX repository (the repository owns the key)."""
    from ansible_collections.pitr.postgresql.plugins.module_utils.repository import Repository

    return os.path.join(repository, *Repository.backup_prefix(label).split("/"))


def _oldest_on_path(
    backups: t.Sequence[BackupRecord], path: t.Sequence[TimelineSpan]
) -> BackupRecord | None:
    on_path = []
    for b in backups:
        span = span_of(path, int(b.timeline))
        if not usable(b) or span is None:
            continue
        if span.end is not None and parse_lsn(b.stop_lsn) > span.end:
            continue
        on_path.append(b)
    if not on_path:
        return None
    return min(on_path, key=lambda b: parse_record_time(b.stop_time))


def _check_data_dir(state: DataDirState, system_identifier: int | None) -> None:
    if state.is_mount_point:
        raise RecoveryPlanError(
            f"{state.path} is a mount point, so it cannot be moved aside and replaced. Restore"
            " into a directory below the mount point (and point the server at it), or move the"
            " data away by hand first.",
            data_dir=state.path,
        )
    if state.staging_exists and state.staging_state is None:
        raise RecoveryPlanError(
            f"{state.path}{STAGING_SUFFIX} exists but was not made by this role (it has no"
            f" {STATE_FILE}); move it away first",
            data_dir=state.path,
        )
    if (
        state.exists
        and system_identifier is not None
        and state.system_identifier is not None
        and state.system_identifier != system_identifier
    ):
        raise RecoveryPlanError(
            f"{state.path} holds a cluster with system identifier {state.system_identifier},"
            f" not the repository's {system_identifier}: is this the right data directory and"
            " repository? (Nothing was changed.)",
            data_dir=state.path,
        )


def _data_dir_plan(state: DataDirState, now: datetime) -> dict[str, t.Any]:
    move = state.exists and not state.empty
    return {
        "path": state.path,
        "exists": state.exists,
        "empty": state.empty,
        "running": state.running,
        "pid": state.pid,
        "old_data_dir": old_data_dir_name(state.path, now, state.siblings) if move else None,
        "staging_dir": os.path.normpath(state.path) + STAGING_SUFFIX,
        "remove_stale_staging": state.staging_exists,
    }


def _space_plan(
    record: BackupRecord, wal: t.Mapping[str, t.Any], state: DataDirState, margin: float
) -> dict[str, t.Any]:
    data = int(record.cluster_size or 0) or int(record.size_on_disk or 0)
    # Restored segments pass through pg_wal and are recycled at restartpoints: room for up to
    # 64 of them, plus a few new ones. A stale staging directory is removed first, but its
    # size is not counted as freed (conservative).
    wal_room = min(int(wal.get("bytes") or 0), 64 * DEFAULT_SEGMENT_SIZE) + 4 * DEFAULT_SEGMENT_SIZE
    needed = int((data + wal_room) * (1 + margin))
    available = state.free_bytes
    return {
        "needed_bytes": needed,
        "available_bytes": available,
        "ok": available is None or available >= needed,
    }


def _human(n: int | None) -> str:
    if n is None:
        return "an unknown amount"
    value = float(n)
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} bytes"


def _restore_steps(plan: RecoveryPlan, state: DataDirState) -> list[str]:
    dd = plan.data_dir
    steps = []
    if state.running:
        steps.append(f"stop PostgreSQL (running with PID {state.pid})")
    if dd["remove_stale_staging"]:
        steps.append(f"remove the unfinished staging directory {dd['staging_dir']}")
    steps.append(
        f"lay down backup {plan.backup['label']} ({plan.backup['backup_format']},"
        f" {plan.backup['compression']}) in {dd['staging_dir']}"
    )
    steps.append("write the recovery settings and recovery.signal into it")
    if dd["old_data_dir"]:
        steps.append(f"move {dd['path']} aside to {dd['old_data_dir']} (kept, never deleted)")
    steps.append(f"move {dd['staging_dir']} to {dd['path']}")
    wal = plan.wal
    steps.append(
        f"start PostgreSQL and replay WAL {wal['first']} .. {wal['last']}"
        f" ({wal['segments']} segments) to {plan.target.describe()}"
    )
    if plan.target.kind != "latest":
        steps.append("confirm where replay stopped")
    steps.append(
        {
            "promote": "promote, remove the recovery settings, archive the new timeline",
            "pause": "leave it paused at the target for inspection",
            "shutdown": "shut it down at the target",
        }[plan.target.action]
    )
    return steps


def _resume_steps(action: str, state: DataDirState, recorded: t.Mapping[str, t.Any]) -> list[str]:
    if action == "none":
        return []
    steps = []
    if not state.exists:
        steps.append(f"move {state.path}{STAGING_SUFFIX} to {state.path}")
    if not state.running:
        steps.append("start PostgreSQL")
    steps.append("follow recovery to the target, then finish as asked")
    return steps


def restore_state(
    plan: RecoveryPlan, phase: str, now: datetime, **extra: t.Any
) -> dict[str, t.Any]:
    """The state file content the role writes into the data directory."""
    state = {
        "format": STATE_FORMAT,
        "fingerprint": plan.fingerprint,
        "phase": phase,
        "updated": now.astimezone(UTC).isoformat(timespec="seconds"),
        "target": plan.target.to_dict(),
        "backup": plan.backup,
        "timeline": plan.timeline,
        "settings": plan.settings,
        "clone_settings": plan.clone_settings,
        "old_data_dir": plan.data_dir.get("old_data_dir"),
    }
    state.update(extra)
    return state


# --------------------------------------------------------------------------------------------
# Reading commit times with pg_waldump

_WALDUMP_RECORD = re.compile(r"\blsn: (?P<lsn>[0-9A-F]+/[0-9A-F]+),")
_WALDUMP_END_OF_WAL = ("could not find file", "invalid record length")


def parse_waldump(
    name: str, output: str, first_lsn: int | None = None, end_lsn: int | None = None
) -> SegmentSummary:
    """Commit/abort times (in WAL order) and the last record's LSN from ``pg_waldump`` output.

    Only records that start in ``[first_lsn, end_lsn)`` count, when given: those belong to
    the segment (a record that continues into the next segment belongs to the one it starts
    in). Times are read by window.parse_waldump_xacts (run pg_waldump with TZ=UTC): replay
    stops for a time target at commit and abort records alike.
    """

    def inside(lsn: int) -> bool:
        return (first_lsn is None or lsn >= first_lsn) and (end_lsn is None or lsn < end_lsn)

    times = tuple(
        parse_record_time(when)
        for lsn, _kind, when in window_mod.parse_waldump_xacts(output)
        if inside(parse_lsn(lsn))
    )
    last: int | None = None
    for line in output.splitlines():
        rec = _WALDUMP_RECORD.search(line)
        if rec and inside(parse_lsn(rec["lsn"])):
            last = parse_lsn(rec["lsn"])
    return SegmentSummary(name, times, last)


class WaldumpInspector:
    """Decompress archived segments into a private directory and read them with pg_waldump.

    pg_waldump follows a record across a segment boundary, so the next segment is placed
    beside the one read when it is archived. A record cut at the end of the last archived
    segment makes pg_waldump exit non-zero after printing every record before it, which is
    exactly what we want to know, so its exit status is not used.
    """

    def __init__(self, repo: t.Any, pg_waldump: str, segment_size: int) -> None:
        self.repo = repo
        self.pg_waldump = pg_waldump
        self.segment_size = segment_size
        self.calls = 0
        self._placeholders: set[str] = set()
        # Not /dev/shm: it is 64 MiB in a container, and a binary search holds a dozen segments.
        self._dir = tempfile.mkdtemp(prefix="pitr-waldump-")

    def close(self) -> None:
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> WaldumpInspector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _materialise(self, name: str) -> bool:
        """Put archived segment ``name`` in the private directory; False when not archived."""
        path = os.path.join(self._dir, name)
        if name in self._placeholders:
            return False
        if os.path.exists(path):
            return True
        if self.repo.wal_stat(name) is None:
            return False
        data = self.repo.get_wal(name)[1]  # verifies the checksum
        with open(path, "wb") as fh:
            fh.write(data)
        return True

    def _placeholder(self, name: str) -> None:
        """A sparse all-zero file standing for a segment that is not archived.

        pg_waldump retries a missing segment ten times, half a second apart, before giving up
        (5 s for every read that reaches the end of the archive). A page of zeros ends its
        read at once with "invalid magic number 0000 ... <name>": the same answer, now.
        """
        with open(os.path.join(self._dir, name), "wb") as fh:
            fh.truncate(self.segment_size)
        self._placeholders.add(name)

    def _dump(self, segment: str, *extra: str) -> SegmentSummary:
        """pg_waldump over ``segment`` and, for a record crossing its end, the next one."""
        from ansible_collections.pitr.postgresql.plugins.module_utils import runner

        self.calls += 1
        self._materialise(segment)
        w = WalFileName.parse(segment)
        segno = w.segment_number(self.segment_size)
        following = segment_name(w.timeline, segno + 1, self.segment_size)
        if not self._materialise(following) and following not in self._placeholders:
            self._placeholder(following)
        first = segno * self.segment_size
        stop = first + self.segment_size
        # The read is bounded to this segment and the next (the private directory keeps
        # other segments too); records are then kept only when they start in this segment.
        result = runner.run(
            [
                self.pg_waldump,
                f"--path={self._dir}",
                *extra,
                # STARTSEG ENDSEG: from the start of this segment to the end of the next.
                # Named, so that pg_waldump reads the segment size from this file and not
                # from whichever file it lists first (a placeholder has no header).
                segment,
                following,
            ],
            check=False,
            timeout=600,
        )
        # pg_waldump exits non-zero where the readable WAL ends (the next segment is not
        # archived, or zeros follow the last record): expected, everything before it was
        # printed. Anything else, with nothing printed, is a real failure.
        end_of_wal = any(m in result.stderr for m in _WALDUMP_END_OF_WAL) or (
            "invalid magic number 0000" in result.stderr and following in result.stderr
        )
        if result.rc != 0 and not end_of_wal and not _WALDUMP_RECORD.search(result.stdout):
            raise RecoveryPlanError(
                f"pg_waldump cannot read archived segment {segment}:"
                f" {result.stderr.strip()[-500:]}",
                wal=segment,
                cmd=result.cmd,
                rc=result.rc,
            )
        return parse_waldump(segment, result.stdout, first, stop)

    def summary(self, segment: str) -> SegmentSummary:
        return SegmentSummary(segment, self._dump(segment, "--rmgr=Transaction").commit_times)

    def last_record_lsn(self, segment: str) -> int | None:
        return self._dump(segment).last_record_lsn


# --------------------------------------------------------------------------------------------
# Following recovery: the server log and the confirmation of the stop point (pure)

_STOP_RE = re.compile(
    r"recovery stopping (?P<edge>before|after) (?P<rec>commit|abort) of transaction"
    r" (?P<xid>\d+), time (?P<time>\S+ \S+)"
    r"|recovery stopping at restore point \"(?P<name>.*)\", time (?P<rptime>\S+ \S+)"
    r"|recovery stopping (?P<lsnedge>before|after) WAL location \(LSN\) \"(?P<lsn>[0-9A-F/]+)\""
    r"|recovery stopping after reaching (?P<consistency>consistency)"
)
_NEW_TLI_RE = re.compile(r"selected new timeline ID: (\d+)")
_FAILURE_RE = re.compile(r"\b(FATAL|PANIC):")
# What the server program writes to stderr before its logging is set up (no severity prefix):
# "postgres: could not access the server configuration file ...", "postgres does not know
# where to find the server configuration file", "pg_ctl: could not start server".
_PROGRAM_FAILURE_RE = re.compile(
    r"^\s*(postgres|postmaster|pg_ctl)(: (could not|cannot|invalid|unrecognized|.*error)"
    r"| does not know| cannot)"
)
_INTEREST = (
    "recovery stopping",
    "pausing at the end of recovery",
    "recovery has paused",
    "consistent recovery state reached",
    "redo done at",
    "last completed transaction",
    "selected new timeline ID",
    "archive recovery complete",
    "recovery ended before configured recovery target was reached",
    "could not restore file",
    "startup process",
    "pitr-wal: fetch",
    "database system is ready",
    "database system is shut down",
)
# FATAL lines that are about a client connection, not about the server.
_CLIENT_FATAL = (
    "the database system is starting up",
    "the database system is not yet accepting connections",
    "the database system is shutting down",
    "terminating connection due to administrator command",
    "the database system is in recovery mode",
)


def parse_log_time(text: str) -> datetime:
    """A timestamptz as PostgreSQL prints it in messages: ``2026-11-25 10:30:00.12+01``."""
    m = re.match(r"^(\S+ \d\d:\d\d:\d\d(?:\.\d+)?)([+-]\d\d)(?::?(\d\d))?$", text.strip())
    if not m:
        return parse_record_time(text)
    offset = f"{m[2]}:{m[3] or '00'}"
    return datetime.fromisoformat(f"{m[1]}{offset}").astimezone(UTC)


@dataclass(frozen=True)
class RecoveryLog:
    """What the server log says about the recovery since the restore started it."""

    stop_line: str | None = None
    stop: dict[str, t.Any] = field(default_factory=dict)
    paused_at_target: bool = False
    new_timeline: int | None = None
    ended_before_target: bool = False
    failures: tuple[str, ...] = ()
    lines: tuple[str, ...] = ()
    tail: tuple[str, ...] = ()  # the last lines, whatever they say


def parse_recovery_log(text: str, max_lines: int = 60) -> RecoveryLog:
    """Pick the lines that tell how recovery went (stop point, pause, failures)."""
    stop_line: str | None = None
    stop: dict[str, t.Any] = {}
    paused = False
    new_tli: int | None = None
    ended_early = False
    failures: list[str] = []
    lines: list[str] = []
    for line in text.splitlines():
        m = _STOP_RE.search(line)
        if m:
            stop_line = line.strip()
            if m["xid"]:
                stop = {
                    "kind": "xact",
                    "edge": m["edge"],
                    "record": m["rec"],
                    "xid": int(m["xid"]),
                    "time": parse_log_time(m["time"]),
                }
            elif m["name"] is not None:
                stop = {
                    "kind": "name",
                    "edge": "at",
                    "name": m["name"],
                    "time": parse_log_time(m["rptime"]),
                }
            elif m["lsn"]:
                stop = {"kind": "lsn", "edge": m["lsnedge"], "lsn": parse_lsn(m["lsn"])}
            else:
                stop = {"kind": "immediate", "edge": "after"}
        if "pausing at the end of recovery" in line:
            paused = True
        tli = _NEW_TLI_RE.search(line)
        if tli:
            new_tli = int(tli.group(1))
        if "recovery ended before configured recovery target was reached" in line:
            ended_early = True
        program_failure = bool(_PROGRAM_FAILURE_RE.search(line))
        if (
            _FAILURE_RE.search(line) and not any(c in line for c in _CLIENT_FATAL)
        ) or program_failure:
            failures.append(line.strip())
        if any(k in line for k in _INTEREST) or _FAILURE_RE.search(line) or program_failure:
            lines.append(line.strip())
    return RecoveryLog(
        stop_line,
        stop,
        paused,
        new_tli,
        ended_early,
        tuple(failures[-20:]),
        tuple(lines[-max_lines:]),
        tuple(line.strip() for line in text.splitlines()[-12:] if line.strip()),
    )


def confirm_stop(
    target: t.Mapping[str, t.Any],
    log: RecoveryLog,
    replay_lsn: int | None,
    replay_time: datetime | None,
) -> tuple[bool | None, str]:
    """Did replay stop where the target says? (True, False, or None when it cannot tell.)

    ``target`` is ``RecoveryTarget.to_dict()`` (kind, value, inclusive). The log line
    PostgreSQL writes when it stops is the primary evidence; the last replayed commit time
    and replay position back it up where they apply.
    """
    kind = target.get("kind")
    inclusive = bool(target.get("inclusive", True))
    value = str(target.get("value", ""))
    stop = log.stop
    if kind == "latest":
        return True, "replayed to the end of the archived WAL"
    if kind == "time":
        moment = parse_target_time(value)
        problems = []
        if replay_time is not None:
            ok = replay_time <= moment if inclusive else replay_time < moment
            if not ok:
                problems.append(
                    f"the last replayed commit is at {format_target_time(replay_time)}, after"
                    " the target"
                )
        if stop.get("kind") == "xact":
            first_excluded = stop["time"]
            ok = first_excluded > moment if inclusive else first_excluded >= moment
            if stop["edge"] != "before" or not ok:
                problems.append(f"PostgreSQL stopped at an unexpected point: {log.stop_line}")
        elif stop:
            problems.append(f"PostgreSQL stopped at an unexpected point: {log.stop_line}")
        if problems:
            return False, "; ".join(problems)
        if not stop and replay_time is None:
            return None, "neither the server log nor pg_last_xact_replay_timestamp() tell"
        where = (
            f"stopped before the {stop['record']} of transaction {stop['xid']} at"
            f" {format_target_time(stop['time'])}"
            if stop
            else "stopped"
        )
        last = (
            f"; last replayed commit at {format_target_time(replay_time)}"
            if replay_time is not None
            else ""
        )
        return True, where + last
    if kind == "lsn":
        wanted = parse_lsn(value)
        if stop.get("kind") == "lsn":
            edge_ok = stop["edge"] == ("after" if inclusive else "before")
            if not edge_ok or stop["lsn"] < wanted:
                return False, f"PostgreSQL stopped at an unexpected point: {log.stop_line}"
            if inclusive and replay_lsn is not None and replay_lsn < wanted:
                return False, f"replay stopped at {format_lsn(replay_lsn)}, before {value}"
            return True, f"stopped {stop['edge']} the record at {format_lsn(stop['lsn'])}"
        if stop:
            return False, f"PostgreSQL stopped at an unexpected point: {log.stop_line}"
        if inclusive and replay_lsn is not None:
            return (replay_lsn >= wanted), f"replayed up to {format_lsn(replay_lsn)}"
        return None, "the server log does not say where replay stopped"
    if kind == "xid":
        wanted_xid = int(value) & 0xFFFFFFFF
        if stop.get("kind") == "xact":
            ok = stop["xid"] == wanted_xid and stop["edge"] == ("after" if inclusive else "before")
            text = f"stopped {stop['edge']} the {stop['record']} of transaction {stop['xid']}"
            return ok, text if ok else f"PostgreSQL stopped at an unexpected point: {text}"
        if stop:
            return False, f"PostgreSQL stopped at an unexpected point: {log.stop_line}"
        return None, "the server log does not say where replay stopped"
    if kind == "name":
        if stop.get("kind") == "name":
            ok = stop["name"] == value
            return ok, f"stopped at restore point {stop['name']!r}"
        if stop:
            return False, f"PostgreSQL stopped at an unexpected point: {log.stop_line}"
        return None, "the server log does not say where replay stopped"
    if kind == "immediate":
        if stop.get("kind") == "immediate":
            return True, "stopped as soon as the backup was consistent"
        if stop:
            return False, f"PostgreSQL stopped at an unexpected point: {log.stop_line}"
        return None, "the server log does not say where replay stopped"
    return None, f"unknown target kind {kind!r}"


PHASES = ("stopped", "starting", "recovering", "paused", "promoted", "failed")
TERMINAL_PHASES = ("stopped", "paused", "promoted", "failed")


def recovery_phase(
    *,
    running: bool,
    connected: bool,
    in_recovery: bool | None,
    pause_state: str | None,
    log: RecoveryLog,
) -> str:
    """Where a restored server is: stopped, starting, recovering, paused, promoted or failed."""
    if not running:
        return "failed" if (log.failures or log.ended_before_target) else "stopped"
    if not connected:
        return "starting"
    if in_recovery:
        return "paused" if pause_state == "paused" else "recovering"
    return "promoted"


# --------------------------------------------------------------------------------------------
# Reading the data directory (effects, kept small)


def postmaster_pid(data_dir: str) -> int | None:
    """The PID of the postmaster running on ``data_dir``, or None when none runs."""
    try:
        with open(os.path.join(data_dir, "postmaster.pid"), encoding="ascii") as fh:
            pid = int(fh.readline().strip())
    except (OSError, ValueError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # alive, owned by another user
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            cmdline = fh.read()
        if b"postgres" not in cmdline and b"postmaster" not in cmdline:
            return None  # a stale PID file whose number was reused
    except OSError:
        pass
    return pid


def postmaster_status(data_dir: str) -> str | None:
    """The status line of ``postmaster.pid`` (``starting``, ``stopping``, ``ready``,
    ``standby``: read-only connections), "" when the file has none yet, None without a file."""
    try:
        with open(os.path.join(data_dir, "postmaster.pid"), encoding="ascii") as fh:
            lines = fh.read().splitlines()
    except (OSError, ValueError):
        return None
    return lines[7].strip() if len(lines) > 7 else ""


def _read_json(path: str) -> dict[str, t.Any] | None:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_data_dir_state(path: str) -> DataDirState:
    """What is at ``path`` (and beside it) now."""
    path = os.path.normpath(path)
    exists = os.path.isdir(path)
    empty = True
    sysid: int | None = None
    if exists:
        empty = not os.listdir(path)
        try:
            from ansible_collections.pitr.postgresql.plugins.module_utils.walfile import (
                read_system_identifier_from_control,
            )

            with open(os.path.join(path, "global", "pg_control"), "rb") as fh:
                sysid = read_system_identifier_from_control(fh.read(8))
        except (OSError, ValueError):
            sysid = None
    staging = path + STAGING_SUFFIX
    parent = os.path.dirname(path) or "."
    base = os.path.basename(path)
    try:
        siblings = tuple(n for n in os.listdir(parent) if n.startswith(base + OLD_INFIX))
    except OSError:
        siblings = ()
    free: int | None
    try:
        st = os.statvfs(parent)
        free = st.f_bavail * st.f_frsize
    except OSError:
        free = None
    pid = postmaster_pid(path) if exists else None
    return DataDirState(
        path=path,
        exists=exists,
        empty=empty,
        running=pid is not None,
        pid=pid,
        system_identifier=sysid,
        is_mount_point=exists and os.path.ismount(path),
        restore_state=_read_json(os.path.join(path, STATE_FILE)) if exists else None,
        staging_exists=os.path.isdir(staging),
        staging_state=_read_json(os.path.join(staging, STATE_FILE)),
        free_bytes=free,
        siblings=siblings,
    )


def backup_layout(record: BackupRecord) -> dict[str, t.Any]:
    """How to lay the backup down: which archives, which decompressor (tar) or a copy."""
    if record.backup_format == "plain":
        return {"format": "plain", "base": None, "wal": None, "decompress": None}
    programs = {".zst": "zstd", ".lz4": "lz4", ".gz": "gzip", "": None}

    def find(stem: str) -> tuple[str | None, str | None]:
        for ext, program in programs.items():
            if f"{stem}.tar{ext}" in record.files:
                return f"{stem}.tar{ext}", program
        return None, None

    base, decompress = find("base")
    wal, wal_decompress = find("pg_wal")
    if base is None:
        raise RecoveryPlanError(
            f"backup {record.label} has no base.tar archive among its files"
            f" ({', '.join(record.files)}); it cannot be restored",
            backup=record.label,
        )
    return {
        "format": "tar",
        "base": base,
        "wal": wal,
        "decompress": decompress,
        "wal_decompress": wal_decompress,
    }


def required_programs(layout: t.Mapping[str, t.Any], pg_bindir: str) -> list[str]:
    """Programs the role runs for this backup: absolute paths, or names looked up in PATH."""
    programs = [os.path.join(pg_bindir, "pg_ctl")]
    if layout.get("format") == "tar":
        programs.append("tar")
        for key in ("decompress", "wal_decompress"):
            if layout.get(key):
                programs.append(str(layout[key]))
    else:
        programs.append("cp")
    return list(dict.fromkeys(programs))


def history_timeline(name: str) -> int:
    """The timeline of a ``TTTTTTTT.history`` file name."""
    return WalFileName.parse(name).timeline

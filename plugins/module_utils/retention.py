# Copyright: contributors to pitr.postgresql
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Retention: which base backups, logical dumps and archived WAL a policy removes, and removing
them without ever breaking a restore of what is kept.

Policy (``RetentionPolicy``), for base backups:

- ``redundancy`` N: keep the newest N usable backups, and the newest N usable backups from
  which the newest timeline can be reached (after an in-place restore, the newest backups may
  sit on the abandoned timeline; production lives on the newest one).
- ``recovery_window`` D: keep every usable backup that ended within the last D, and, for the
  newest timeline and each other timeline with WAL archived within the last D, the newest
  usable backup that ended before the window start and can reach that timeline: every point
  of the window stays restorable.
- ``min_backups``: never fewer usable backups kept than this, nor fewer that reach the newest
  timeline (counts the newest ones first).
- pinned backups (``Repository.pin_key``) are never removed; a backup being taken
  (``running``) neither.
- a backup named by an active restore lease (``restore_lease``: a restore in progress reads
  it) is kept like a pinned one, and so is the WAL it needs (it counts as kept for the WAL
  rules below; a lease's first segment on its timeline, and the segments after it, are kept
  too). Expired leases protect nothing; a prune (not check mode) removes them. A lease record
  that cannot be read keeps every base backup (it might name any of them), with a warning
  naming the file; fix or remove that file to prune backups again.
- a backup that is not usable (failed, or not verified) goes once a newer usable backup is
  kept; an ``expiring`` one (an interrupted prune) goes in any case.

With both policies, a backup either keeps stays (the union). Logical dumps follow the same
rules per series (``dumps.series_key``: one per database, plus the globals): ``dump_redundancy``
newest usable ones (default ``redundancy``), those younger than ``dump_max_age`` (default
``recovery_window``), at least ``min_backups`` per series.

WAL: ``continuity.wal_needs`` says, per timeline, which is the oldest segment a restore from a
kept backup may read, following the history files. Segments and ``.partial`` files below it
go; a timeline no kept backup can reach goes entirely; ``.history`` files always stay; a
``.backup`` file goes with its backup (matched by start segment and offset), otherwise by the
segment rule. When the kept backups cannot be placed (a record without start point, a
timeline without history file) no WAL at all is removed.

Refused: a policy that would remove every usable backup (``min_backups`` is at least 1, so
this is a last guard), and a repository whose identity is not the cluster's.

Removing (``apply_plan``), under the repository locks of base backups and dumps:

1. every backup and dump to remove is marked ``expiring`` in the catalog (restore never
   selects it again);
2. WAL files go, oldest first on each timeline, so an interruption leaves no hole: what
   remains of each timeline is a continuous suffix;
3. each backup's files go, then its record; dumps through ``dumps.remove_dump``.

Between 1 and 2 the leases are read again: a restore that took a lease on a backup to remove
while the prune was planning makes the prune put the records back as they were and stop,
before anything is removed (``restore_lease.take`` checks the other side: a backup already
marked ``expiring`` is refused).

An interrupted prune therefore leaves every kept backup restorable, and a re-run removes the
``expiring`` leftovers. The plan lists file names, never "everything below X", so WAL
archived while the prune runs is never touched.

Standard library only (the ``pitr-prune`` host command runs this on database hosts).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import typing as t
from contextlib import ExitStack
from dataclasses import dataclass, field

from ansible_collections.pitr.postgresql.plugins.module_utils import (
    catalog,
    continuity,
    dumps,
    restore_lease,
)
from ansible_collections.pitr.postgresql.plugins.module_utils.backup import (
    LOCK_NAME as BACKUP_LOCK,
)
from ansible_collections.pitr.postgresql.plugins.module_utils.backup import (
    parse_duration,
)
from ansible_collections.pitr.postgresql.plugins.module_utils.catalog import BackupRecord
from ansible_collections.pitr.postgresql.plugins.module_utils.errors import (
    PitrError,
    RepositoryError,
)
from ansible_collections.pitr.postgresql.plugins.module_utils.recovery import TimelineSpan
from ansible_collections.pitr.postgresql.plugins.module_utils.repository import (
    BACKUP_PREFIX,
    DUMP_PREFIX,
    Repository,
    RepositoryIdentity,
)
from ansible_collections.pitr.postgresql.plugins.module_utils.restore_lease import (
    Lease,
    Unreadable,
)
from ansible_collections.pitr.postgresql.plugins.module_utils.storage import ObjectInfo
from ansible_collections.pitr.postgresql.plugins.module_utils.walfile import (
    BACKUP,
    DEFAULT_SEGMENT_SIZE,
    HISTORY,
    PARTIAL,
    SEGMENT,
    WalFileName,
    WalNameError,
    parse_lsn,
    segment_for_lsn,
    segment_name,
    sort_key,
)

BACKUPS = "backups"
DUMPS = "dumps"
PIN_KINDS = (BACKUPS, DUMPS)
EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
PinChanges = t.Mapping[str, t.Mapping[str, t.Sequence[str]]]

# Why something is kept, or removed.
KEEP_PINNED = "pinned"
KEEP_LEASED = "leased"  # in use by a restore (an active restore lease names it)
KEEP_LEASE_UNREADABLE = "lease_unreadable"  # a restore lease cannot be read: keep everything
KEEP_RUNNING = "running"
KEEP_REDUNDANCY = "redundancy"
KEEP_WINDOW = "window"
KEEP_WINDOW_BASE = "window_base"
KEEP_MINIMUM = "minimum"
KEEP_NO_POLICY = "no_policy"
KEEP_NEWEST_UNUSABLE = "newest_unusable"
REMOVE_EXPIRED = "expired"
REMOVE_UNUSABLE = "unusable"
REMOVE_EXPIRING = "expiring"


class RetentionError(PitrError):
    """The prune cannot be planned or done as asked; nothing was removed."""


@dataclass(frozen=True)
class RetentionPolicy:
    """What to keep. Durations in seconds; None means the rule is not used."""

    redundancy: int | None = None
    recovery_window: float | None = None
    min_backups: int = 1
    dump_redundancy: int | None = None
    dump_max_age: float | None = None

    @property
    def has_backup_rule(self) -> bool:
        return self.redundancy is not None or self.recovery_window is not None

    @property
    def dump_count(self) -> int | None:
        return self.dump_redundancy if self.dump_redundancy is not None else self.redundancy

    @property
    def dump_age(self) -> float | None:
        return self.dump_max_age if self.dump_max_age is not None else self.recovery_window

    def check(self) -> None:
        for name in ("redundancy", "dump_redundancy"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise RetentionError(f"{name} must be 1 or more (got {value})")
        for name in ("recovery_window", "dump_max_age"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise RetentionError(f"{name} must be a positive duration (got {value} s)")
        if self.min_backups < 1:
            raise RetentionError(
                f"min_backups must be 1 or more (got {self.min_backups}): a prune never removes"
                " every backup"
            )

    def to_dict(self) -> dict[str, t.Any]:
        return {
            "redundancy": self.redundancy,
            "recovery_window": self.recovery_window,
            "min_backups": self.min_backups,
            "dump_redundancy": self.dump_count,
            "dump_max_age": self.dump_age,
        }

    @classmethod
    def from_params(cls, params: t.Mapping[str, t.Any]) -> RetentionPolicy:
        """From the module's options (durations as ``7d``, ``36h``, seconds)."""

        def seconds(name: str) -> float | None:
            text = params.get(name)
            if text in (None, ""):
                return None
            try:
                return parse_duration(text)
            except PitrError as exc:
                raise RetentionError(f"{name}: {exc.msg}") from exc

        def count(name: str) -> int | None:
            value = params.get(name)
            return None if value in (None, "") else int(value)

        policy = cls(
            redundancy=count("redundancy"),
            recovery_window=seconds("recovery_window"),
            min_backups=1 if params.get("min_backups") is None else int(params["min_backups"]),
            dump_redundancy=count("dump_redundancy"),
            dump_max_age=seconds("dump_max_age"),
        )
        policy.check()
        return policy


class DumpLike(t.Protocol):
    """What retention reads from a logical dump's catalog record (``dumps.DumpRecord``)."""

    @property
    def label(self) -> str: ...
    @property
    def database(self) -> str: ...
    @property
    def status(self) -> str: ...
    @property
    def verified(self) -> bool: ...
    @property
    def start_time(self) -> str: ...
    @property
    def end_time(self) -> str: ...
    @property
    def size(self) -> int: ...


@dataclass
class RepositoryState:
    """What the planner reads from a repository (``read_state``), as plain data."""

    backups: list[BackupRecord]
    wal: list[tuple[WalFileName, ObjectInfo]]
    histories: dict[int, str] = field(default_factory=dict)
    backup_bytes: dict[str, int] = field(default_factory=dict)
    dumps: list[t.Any] = field(default_factory=list)  # DumpLike records
    dump_bytes: dict[str, int] = field(default_factory=dict)
    pins: dict[str, set[str]] = field(default_factory=dict)
    segment_size: int = DEFAULT_SEGMENT_SIZE
    leases: list[Lease] = field(default_factory=list)  # expired ones too
    unreadable_leases: list[Unreadable] = field(default_factory=list)

    def pinned(self, kind: str) -> set[str]:
        return self.pins.get(kind, set())

    def active_leases(self, now: dt.datetime) -> list[Lease]:
        return [lease for lease in self.leases if lease.is_active(now)]


@dataclass(frozen=True)
class Decision:
    """Keep or remove one backup or dump, and why."""

    kind: str  # "backup" or "dump"
    label: str
    keep: bool
    reasons: tuple[str, ...]
    status: str
    usable: bool
    time: str  # stop time of a backup, end time of a dump
    bytes: int
    timeline: int | None = None
    database: str | None = None
    record: t.Any = field(default=None, compare=False, repr=False)
    leases: tuple[Lease, ...] = ()

    def to_dict(self) -> dict[str, t.Any]:
        d: dict[str, t.Any] = {
            "label": self.label,
            "keep": self.keep,
            "reasons": list(self.reasons),
            "status": self.status,
            "usable": self.usable,
            "bytes": self.bytes,
        }
        if self.kind == "backup":
            d.update(
                stop_time=self.time,
                timeline=self.timeline,
                leases=[lease_summary(lease) for lease in self.leases],
            )
        else:
            d.update(end_time=self.time, database=self.database)
        return d


@dataclass
class RetentionPlan:
    """The outcome of ``plan_retention``: what goes, what stays, what it frees."""

    policy: RetentionPolicy
    now: dt.datetime
    window_start: dt.datetime | None
    backups: list[Decision]
    dumps: list[Decision]
    wal_removed: list[str]  # names, in replay order (oldest first on each timeline)
    wal_ranges: list[dict[str, t.Any]]
    wal_kept_from: dict[int, str | None]
    wal_bytes: int
    earliest_before: dict[str, t.Any] | None
    earliest_after: dict[str, t.Any] | None
    warnings: list[str] = field(default_factory=list)
    leases: list[Lease] = field(default_factory=list)  # active at ``now``
    leases_expired: list[Lease] = field(default_factory=list)
    leases_unreadable: list[Unreadable] = field(default_factory=list)

    @property
    def backups_removed(self) -> list[Decision]:
        return [d for d in self.backups if not d.keep]

    @property
    def dumps_removed(self) -> list[Decision]:
        return [d for d in self.dumps if not d.keep]

    @property
    def bytes_freed(self) -> int:
        return (
            self.wal_bytes
            + sum(d.bytes for d in self.backups_removed)
            + sum(d.bytes for d in self.dumps_removed)
        )

    @property
    def removes_anything(self) -> bool:
        return bool(self.wal_removed or self.backups_removed or self.dumps_removed)

    def to_dict(self) -> dict[str, t.Any]:
        return {
            "policy": {
                **self.policy.to_dict(),
                "window_start": _iso(self.window_start) if self.window_start else None,
                "now": _iso(self.now),
            },
            "backups": [d.to_dict() for d in self.backups],
            "backups_kept": [d.label for d in self.backups if d.keep],
            "backups_removed": [d.label for d in self.backups_removed],
            "dumps": [d.to_dict() for d in self.dumps],
            "dumps_removed": [d.label for d in self.dumps_removed],
            "wal_removed": self.wal_ranges,
            "wal_removed_files": len(self.wal_removed),
            "wal_kept_from": {str(k): v for k, v in sorted(self.wal_kept_from.items())},
            "bytes_freed": self.bytes_freed,
            "earliest_recoverable": self.earliest_after,
            "earliest_recoverable_before": self.earliest_before,
            "leases": [lease_summary(lease) for lease in self.leases],
            "leases_expired": [lease.lease_id for lease in self.leases_expired],
            "leases_unreadable": [u._asdict() for u in self.leases_unreadable],
        }


def lease_summary(lease: Lease) -> dict[str, t.Any]:
    """What the plan output says about a restore lease."""
    return {
        "lease_id": lease.lease_id,
        "backup": lease.backup_label,
        "host": lease.host,
        "data_dir": lease.data_dir,
        "target": lease.target,
        "timeline": lease.timeline,
        "first_segment": lease.first_segment,
        "expires": _iso(lease.expires),
    }


# Time ------------------------------------------------------------------------------------------


def _iso(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).isoformat()


def parse_time(text: str | None) -> dt.datetime | None:
    """An ISO 8601 catalog time as aware UTC, or None when empty or unreadable."""
    if not text:
        return None
    try:
        moment = dt.datetime.fromisoformat(str(text).strip().replace("Z", "+00:00"))
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return moment.astimezone(dt.UTC)


def _backup_time(record: BackupRecord) -> dt.datetime:
    """When a backup ended (unknown: the epoch, so that it counts as old)."""
    return parse_time(record.stop_time) or parse_time(record.start_time) or EPOCH


def _dump_time(record: t.Any) -> dt.datetime:
    return parse_time(record.end_time) or parse_time(record.start_time) or EPOCH


def _newest_first(
    records: t.Iterable[t.Any], when: t.Callable[[t.Any], dt.datetime]
) -> list[t.Any]:
    return sorted(records, key=lambda r: (when(r), r.label), reverse=True)


# Backups ---------------------------------------------------------------------------------------


class _Keeper:
    """Reasons collected per label, in the order the rules found them."""

    def __init__(self) -> None:
        self.reasons: dict[str, list[str]] = {}

    def keep(self, label: str, reason: str) -> None:
        found = self.reasons.setdefault(label, [])
        if reason not in found:
            found.append(reason)

    def __contains__(self, label: object) -> bool:
        return label in self.reasons


def _timeline_activity(state: RepositoryState) -> dict[int, dt.datetime]:
    """Per timeline, the newest sign of life: archive times of its files, backup stop times."""
    seen: dict[int, dt.datetime] = {}

    def note(tli: int, moment: dt.datetime) -> None:
        if tli not in seen or moment > seen[tli]:
            seen[tli] = moment

    for w, info in state.wal:
        note(w.timeline, dt.datetime.fromtimestamp(info.mtime, dt.UTC))
    for b in state.backups:
        if b.timeline:
            note(int(b.timeline), _backup_time(b))
    return seen


def _decide_backups(
    state: RepositoryState,
    policy: RetentionPolicy,
    window_start: dt.datetime | None,
    paths: t.Mapping[int, t.Sequence[TimelineSpan]],
    warnings: list[str],
    leases: t.Sequence[Lease] = (),
) -> list[Decision]:
    seg = state.segment_size
    records = _newest_first(state.backups, _backup_time)
    good = [r for r in records if catalog.usable(r)]
    anchors = {r.label: continuity.anchor_of(r, seg) for r in good}
    latest = max(paths) if paths else None

    def reaches(record: BackupRecord, tli: int) -> bool:
        anchor = anchors.get(record.label)
        # A record without a start point cannot be placed: count it as reaching everywhere,
        # which only ever keeps more.
        return anchor is None or (tli in paths and continuity.reaches(anchor, paths[tli]))

    kept = _Keeper()
    pinned = state.pinned(BACKUPS)
    leased: dict[str, list[Lease]] = {}
    for lease in leases:
        leased.setdefault(lease.backup_label, []).append(lease)
    for r in records:
        if r.label in pinned:
            kept.keep(r.label, KEEP_PINNED)
        if r.label in leased:
            kept.keep(r.label, KEEP_LEASED)
        if state.unreadable_leases:
            kept.keep(r.label, KEEP_LEASE_UNREADABLE)
        if r.status == "running":
            kept.keep(r.label, KEEP_RUNNING)
    if not policy.has_backup_rule:
        for r in records:
            if r.status != "expiring":
                kept.keep(r.label, KEEP_NO_POLICY)
    reaching_latest = [r for r in good if latest is None or reaches(r, latest)]
    if policy.redundancy is not None:
        for r in good[: policy.redundancy] + reaching_latest[: policy.redundancy]:
            kept.keep(r.label, KEEP_REDUNDANCY)
    if window_start is not None:
        for r in good:
            if _backup_time(r) >= window_start:
                kept.keep(r.label, KEEP_WINDOW)
        activity = _timeline_activity(state)
        for tli in sorted(paths):
            if tli != latest and activity.get(tli, EPOCH) < window_start:
                continue  # nothing on this old timeline is inside the window
            for r in good:
                if _backup_time(r) <= window_start and reaches(r, tli):
                    kept.keep(r.label, KEEP_WINDOW_BASE)
                    break
    for pool in (good, reaching_latest):
        missing = policy.min_backups - sum(r.label in kept for r in pool)
        for r in pool:
            if missing <= 0:
                break
            if r.label not in kept:
                kept.keep(r.label, KEEP_MINIMUM)
                missing -= 1
    for r in records:
        if r.status == "expiring" or catalog.usable(r) or r.label in kept:
            continue
        newer_kept = any(g.label in kept and _backup_time(g) > _backup_time(r) for g in good)
        if not newer_kept:
            kept.keep(r.label, KEEP_NEWEST_UNUSABLE)
    if good and not any(r.label in kept for r in good):
        raise RetentionError(
            "the policy would remove every usable base backup; refusing (set min_backups)"
        )
    decisions = []
    for r in records:
        size = state.backup_bytes.get(r.label, r.size_on_disk)
        if r.label in kept:
            reasons = tuple(kept.reasons[r.label])
            if r.status == "expiring":
                warnings.append(
                    f"backup {r.label} is {' and '.join(kept.reasons[r.label])} but was being"
                    " removed by an interrupted prune (status expiring): it is kept, but it is"
                    " not usable"
                )
        elif r.status == "expiring":
            reasons = (REMOVE_EXPIRING,)
        elif not catalog.usable(r):
            reasons = (REMOVE_UNUSABLE,)
        else:
            reasons = (REMOVE_EXPIRED,)
        decisions.append(
            Decision(
                kind="backup",
                label=r.label,
                keep=r.label in kept,
                reasons=reasons,
                status=r.status,
                usable=catalog.usable(r),
                time=r.stop_time,
                bytes=size,
                timeline=int(r.timeline),
                record=r,
                leases=tuple(leased.get(r.label, ())),
            )
        )
    return decisions


# Dumps -----------------------------------------------------------------------------------------


def _series(record: t.Any) -> tuple[str, str]:
    return (str(getattr(record, "scope", "database")), str(record.database))


def _dump_usable(record: t.Any) -> bool:
    return record.status == "ok" and record.verified is True


def _decide_dumps(
    state: RepositoryState, policy: RetentionPolicy, now: dt.datetime
) -> list[Decision]:
    count, age = policy.dump_count, policy.dump_age
    oldest_allowed = now - dt.timedelta(seconds=age) if age is not None else None
    pinned = state.pinned(DUMPS)
    kept = _Keeper()
    by_series: dict[tuple[str, str], list[t.Any]] = {}
    for r in _newest_first(state.dumps, _dump_time):
        by_series.setdefault(_series(r), []).append(r)
    for records in by_series.values():
        good = [r for r in records if _dump_usable(r)]
        for r in records:
            if r.label in pinned:
                kept.keep(r.label, KEEP_PINNED)
            if r.status == "running":
                kept.keep(r.label, KEEP_RUNNING)
            if count is None and age is None and r.status != "expiring":
                kept.keep(r.label, KEEP_NO_POLICY)
        if count is not None:
            for r in good[:count]:
                kept.keep(r.label, KEEP_REDUNDANCY)
        if oldest_allowed is not None:
            for r in good:
                if _dump_time(r) >= oldest_allowed:
                    kept.keep(r.label, KEEP_WINDOW)
        missing = policy.min_backups - sum(r.label in kept for r in good)
        for r in good:
            if missing <= 0:
                break
            if r.label not in kept:
                kept.keep(r.label, KEEP_MINIMUM)
                missing -= 1
        for r in records:
            if r.status == "expiring" or _dump_usable(r) or r.label in kept:
                continue
            if not any(g.label in kept and _dump_time(g) > _dump_time(r) for g in good):
                kept.keep(r.label, KEEP_NEWEST_UNUSABLE)
    decisions = []
    for r in _newest_first(state.dumps, _dump_time):
        if r.label in kept:
            reasons = tuple(kept.reasons[r.label])
        elif r.status == "expiring":
            reasons = (REMOVE_EXPIRING,)
        elif not _dump_usable(r):
            reasons = (REMOVE_UNUSABLE,)
        else:
            reasons = (REMOVE_EXPIRED,)
        decisions.append(
            Decision(
                kind="dump",
                label=r.label,
                keep=r.label in kept,
                reasons=reasons,
                status=r.status,
                usable=_dump_usable(r),
                time=r.end_time,
                bytes=state.dump_bytes.get(r.label, int(r.size or 0)),
                database=r.database,
                record=r,
            )
        )
    return decisions


# WAL -------------------------------------------------------------------------------------------


def _backup_file_key(record: BackupRecord, segment_size: int) -> tuple[str, int] | None:
    """(start segment name, offset) of the ``.backup`` file PostgreSQL wrote for ``record``."""
    if not record.start_lsn:
        return None
    try:
        lsn = parse_lsn(record.start_lsn)
        tli = WalFileName.parse(record.start_wal).timeline if record.start_wal else 0
    except (ValueError, WalNameError):
        return None
    tli = tli or int(record.timeline or 0)
    if tli < 1:
        return None
    return (segment_for_lsn(tli, lsn, segment_size), lsn % segment_size)


def _lease_floors(leases: t.Iterable[Lease], segment_size: int) -> dict[int, int]:
    """Per timeline, the lowest first segment an active lease names (kept with what follows)."""
    floors: dict[int, int] = {}
    for lease in leases:
        if not lease.first_segment:
            continue
        try:
            w = WalFileName.parse(lease.first_segment)
        except WalNameError:
            continue
        if w.kind != SEGMENT:
            continue
        n = w.segment_number(segment_size)
        floors[w.timeline] = min(n, floors.get(w.timeline, n))
    return floors


def _plan_wal(
    state: RepositoryState,
    backups: t.Sequence[Decision],
    paths: t.Mapping[int, t.Sequence[TimelineSpan]],
    unknown: t.Mapping[int, str],
    warnings: list[str],
    leases: t.Sequence[Lease] = (),
) -> tuple[list[tuple[WalFileName, ObjectInfo]], dict[int, str | None]]:
    """The WAL files to remove, and per timeline the first segment kept (None: all go)."""
    seg = state.segment_size
    removed = _wal_to_remove(state, backups, paths, unknown, warnings)
    floors = _lease_floors(leases, seg)
    if floors:
        removed = [
            (w, info)
            for w, info in removed
            if w.kind == BACKUP
            or w.timeline not in floors
            or w.segment_number(seg) < floors[w.timeline]
        ]
    removed.sort(key=lambda x: sort_key(x[0].name))
    gone = {w.name for w, _info in removed}
    kept_from: dict[int, str | None] = {}
    for tli in sorted({w.timeline for w, _info in state.wal if w.kind != HISTORY}):
        left = [
            w.segment_number(seg)
            for w, _info in state.wal
            if w.timeline == tli and w.kind in (SEGMENT, PARTIAL) and w.name not in gone
        ]
        kept_from[tli] = segment_name(tli, min(left), seg) if left else None
    return removed, kept_from


def _wal_to_remove(
    state: RepositoryState,
    backups: t.Sequence[Decision],
    paths: t.Mapping[int, t.Sequence[TimelineSpan]],
    unknown: t.Mapping[int, str],
    warnings: list[str],
) -> list[tuple[WalFileName, ObjectInfo]]:
    seg = state.segment_size
    kept = [d.record for d in backups if d.keep and d.status == "ok"]
    if not kept:
        warnings.append("no usable base backup is kept: no WAL is removed")
        return []
    anchors = [continuity.anchor_of(r, seg) for r in kept]
    placed = [a for a in anchors if a is not None]
    if len(placed) < len(anchors):
        bad = [r.label for r, a in zip(kept, anchors, strict=True) if a is None]
        warnings.append(
            f"backup {bad[0]} has no start point in its record: no WAL is removed until it is"
            " re-verified or removed"
        )
        return []
    lost = sorted({a.timeline for a in placed if a.timeline in unknown})
    if lost:
        warnings.append(
            f"timeline {lost[0]} of a kept backup cannot be followed ({unknown[lost[0]]}):"
            " no WAL is removed"
        )
        return []
    archived = {w.timeline for w, _info in state.wal if w.kind != HISTORY}
    for tli in sorted(unknown):
        if tli in archived:
            warnings.append(f"{unknown[tli]}; its WAL is kept")
    needs = continuity.wal_needs(placed, paths, seg)
    removed_backups = {
        k for d in backups if not d.keep and (k := _backup_file_key(d.record, seg)) is not None
    }
    kept_backups = {
        k for d in backups if d.keep and (k := _backup_file_key(d.record, seg)) is not None
    }
    removed: list[tuple[WalFileName, ObjectInfo]] = []
    for w, info in state.wal:
        if w.kind == HISTORY:
            continue
        if w.kind == BACKUP:
            key = (w.segment_name, w.backup_offset)
            if key in kept_backups:
                continue
            if key in removed_backups:
                removed.append((w, info))
                continue
        if w.timeline in unknown:
            continue
        need = needs.get(w.timeline)
        if need is None or w.segment_number(seg) < need.first:
            removed.append((w, info))
    return removed


def _wal_ranges(
    removed: t.Sequence[tuple[WalFileName, ObjectInfo]],
    kept_from: t.Mapping[int, str | None],
    segment_size: int,
) -> list[dict[str, t.Any]]:
    """Removed WAL as continuous runs of segment numbers per timeline, for the report."""
    ranges: list[dict[str, t.Any]] = []
    for w, info in removed:
        n = w.segment_number(segment_size)
        last = ranges[-1] if ranges else None
        if last is None or last["timeline"] != w.timeline or n > last["_to"] + 1:
            last = {
                "timeline": w.timeline,
                "_from": n,
                "_to": n,
                "segments": 0,
                "partial": 0,
                "backup_files": 0,
                "bytes": 0,
                "whole_timeline": kept_from.get(w.timeline, "") is None,
            }
            ranges.append(last)
        last["_to"] = max(last["_to"], n)
        last["bytes"] += info.size
        key = {SEGMENT: "segments", PARTIAL: "partial", BACKUP: "backup_files"}[w.kind]
        last[key] += 1
    for r in ranges:
        tli = r["timeline"]
        r["from_wal"] = segment_name(tli, r.pop("_from"), segment_size)
        r["to_wal"] = segment_name(tli, r.pop("_to"), segment_size)
    return ranges


def _earliest(decisions: t.Iterable[Decision]) -> dict[str, t.Any] | None:
    """The oldest point a restore can reach: the stop point of the oldest usable backup."""
    good = [d for d in decisions if d.usable]
    if not good:
        return None
    oldest = min(good, key=lambda d: (_backup_time(d.record), d.label))
    return {
        "time": oldest.record.stop_time,
        "lsn": oldest.record.stop_lsn,
        "timeline": int(oldest.record.timeline),
        "backup": oldest.label,
    }


# The plan --------------------------------------------------------------------------------------


def plan_retention(
    state: RepositoryState, policy: RetentionPolicy, now: dt.datetime
) -> RetentionPlan:
    """What ``policy`` removes from the repository described by ``state`` at ``now``. Pure."""
    policy.check()
    warnings: list[str] = []
    window_start = (
        now - dt.timedelta(seconds=policy.recovery_window)
        if policy.recovery_window is not None
        else None
    )
    timelines = continuity.known_timelines(state.wal, state.histories, state.backups)
    paths, unknown = continuity.timeline_paths(timelines, state.histories)
    leases = state.active_leases(now)
    for bad in state.unreadable_leases:
        warnings.append(
            f"restore lease {bad.path} cannot be read ({bad.why}): every base backup is kept."
            " If no restore is running, remove that file; otherwise let the restore finish"
            " and fix or remove it then"
        )
    backups = _decide_backups(state, policy, window_start, paths, warnings, leases)
    dump_decisions = _decide_dumps(state, policy, now)
    removed, kept_from = _plan_wal(state, backups, paths, unknown, warnings, leases)
    if window_start is not None and not any(
        d.usable and d.keep and _backup_time(d.record) <= window_start for d in backups
    ):
        warnings.append(
            "no usable backup ended before the recovery window starts: the window is not"
            " covered back to its start yet"
        )
    return RetentionPlan(
        policy=policy,
        now=now,
        window_start=window_start,
        backups=backups,
        dumps=dump_decisions,
        wal_removed=[w.name for w, _info in removed],
        wal_ranges=_wal_ranges(removed, kept_from, state.segment_size),
        wal_kept_from=kept_from,
        wal_bytes=sum(info.size for _w, info in removed),
        earliest_before=_earliest(backups),
        earliest_after=_earliest(d for d in backups if d.keep),
        warnings=warnings,
        leases=leases,
        leases_expired=[lease for lease in state.leases if not lease.is_active(now)],
        leases_unreadable=list(state.unreadable_leases),
    )


def state_after(state: RepositoryState, plan: RetentionPlan) -> RepositoryState:
    """The repository as it will be once ``plan`` is applied (for the check-mode preview)."""
    gone_wal = set(plan.wal_removed)
    gone_backups = {d.label for d in plan.backups_removed}
    gone_dumps = {d.label for d in plan.dumps_removed}
    return RepositoryState(
        backups=[b for b in state.backups if b.label not in gone_backups],
        wal=[(w, i) for w, i in state.wal if w.name not in gone_wal],
        histories=dict(state.histories),
        backup_bytes={k: v for k, v in state.backup_bytes.items() if k not in gone_backups},
        dumps=[d for d in state.dumps if d.label not in gone_dumps],
        dump_bytes={k: v for k, v in state.dump_bytes.items() if k not in gone_dumps},
        pins={k: set(v) for k, v in state.pins.items()},
        segment_size=state.segment_size,
        leases=[lease for lease in state.leases if lease not in plan.leases_expired],
        unreadable_leases=list(state.unreadable_leases),
    )


# Reading and changing a repository -------------------------------------------------------------


def _sizes_by_label(repo: Repository, prefix: str) -> dict[str, int]:
    sizes: dict[str, int] = {}
    for info in repo.storage.list(prefix):
        parts = info.key.split("/")
        if len(parts) >= 3:
            sizes[parts[1]] = sizes.get(parts[1], 0) + info.size
    return sizes


def read_pins(repo: Repository) -> dict[str, set[str]]:
    pins: dict[str, set[str]] = {}
    for kind in PIN_KINDS:
        labels = set()
        for info in repo.storage.list(repo.pin_prefix(kind)):
            name = info.key.rsplit("/", 1)[-1]
            if name.endswith(".json"):
                labels.add(name[: -len(".json")])
        pins[kind] = labels
    return pins


def read_state(repo: Repository) -> RepositoryState:
    """Read everything the planner needs (catalogs, WAL listing, history files, pins)."""
    identity = repo.identity()
    wal = repo.list_wal()
    leases, unreadable = restore_lease.scan(repo)
    return RepositoryState(
        backups=catalog.list_backups(repo),
        wal=wal,
        histories=continuity.read_histories(repo, wal),
        backup_bytes=_sizes_by_label(repo, BACKUP_PREFIX),
        dumps=list(dumps.list_dumps(repo)),
        dump_bytes=_sizes_by_label(repo, DUMP_PREFIX),
        pins=read_pins(repo),
        segment_size=identity.wal_segment_size if identity else DEFAULT_SEGMENT_SIZE,
        leases=leases,
        unreadable_leases=unreadable,
    )


def pin_changes(
    state: RepositoryState, pin: t.Sequence[str], unpin: t.Sequence[str]
) -> dict[str, dict[str, list[str]]]:
    """Which pins to add and remove per kind; a label names a backup, a dump, or both.

    Raises RetentionError for a label to pin that names neither, or one in both lists.
    """
    both = sorted(set(pin) & set(unpin))
    if both:
        raise RetentionError(f"{both[0]} is both in pin and unpin")
    labels = {
        BACKUPS: {b.label for b in state.backups},
        DUMPS: {d.label for d in state.dumps},
    }
    changes: dict[str, dict[str, list[str]]] = {k: {"add": [], "remove": []} for k in PIN_KINDS}
    for label in pin:
        kinds = [k for k in PIN_KINDS if label in labels[k]]
        if not kinds:
            raise RetentionError(
                f"cannot pin {label!r}: no base backup or logical dump has that label",
                label=label,
            )
        for kind in kinds:
            if label not in state.pinned(kind) and label not in changes[kind]["add"]:
                changes[kind]["add"].append(label)
    for label in unpin:
        for kind in PIN_KINDS:
            if label in state.pinned(kind) and label not in changes[kind]["remove"]:
                changes[kind]["remove"].append(label)
    return changes


def with_pins(state: RepositoryState, changes: PinChanges) -> None:
    """Apply pin changes to ``state`` in memory."""
    for kind, change in changes.items():
        labels = state.pins.setdefault(kind, set())
        labels.update(change["add"])
        labels.difference_update(change["remove"])


def write_pins(repo: Repository, changes: PinChanges, now: dt.datetime) -> None:
    for kind, change in changes.items():
        for label in change["add"]:
            rec = {
                "kind": kind,
                "label": label,
                "since": _iso(now),
                "by": f"{_user()}@{socket.gethostname()}",
            }
            repo.storage.put(
                repo.pin_key(kind, label),
                json.dumps(rec, indent=2, sort_keys=True).encode() + b"\n",
                overwrite=True,
            )
        for label in change["remove"]:
            repo.storage.delete(repo.pin_key(kind, label))


def _user() -> str:
    try:
        import pwd

        return pwd.getpwuid(os.geteuid()).pw_name
    except (ImportError, KeyError):
        return str(os.geteuid())


def delete_backup(repo: Repository, label: str) -> None:
    """Remove a backup's files, then its record, then (POSIX) its emptied directories.

    The record goes last: until then an interrupted removal leaves an ``expiring`` record that
    the next prune finds, never a directory without a record that nothing would list.
    """
    prefix = repo.backup_prefix(catalog.check_label(label))
    record_key = repo.backup_record_key(label)
    delete_tree = getattr(repo.storage, "delete_tree", None)
    if delete_tree is not None:
        # POSIX: whole subdirectories at once (a plain-format backup holds thousands of files).
        subdirs = {
            info.key.split("/")[2] for info in repo.storage.list(prefix) if info.key.count("/") >= 3
        }
        for name in sorted(subdirs):
            delete_tree(f"{prefix}/{name}")
    for info in list(repo.storage.list(prefix)):
        if info.key != record_key:
            repo.storage.delete(info.key)
    repo.storage.delete(record_key)
    if delete_tree is not None:
        delete_tree(prefix)


def apply_plan(repo: Repository, plan: RetentionPlan) -> list[str]:
    """Remove what ``plan`` says, crash-safely (see the module docstring). Hold the locks.

    Returns the ids of the expired restore leases removed. Raises RetentionError, with every
    record as it was and nothing removed, when a restore took a lease on a backup to remove
    while the plan was made.
    """
    marked_backups = [d for d in plan.backups_removed if d.record.status != "expiring"]
    marked_dumps = [d for d in plan.dumps_removed if d.record.status != "expiring"]
    for d in marked_backups:
        catalog.write_backup(repo, d.record.with_changes(status="expiring"))
    for d in marked_dumps:
        dumps.write_dump(repo, d.record.with_changes(status="expiring"))
    conflict = _lease_conflict(repo, plan) if plan.backups_removed or plan.wal_removed else None
    if conflict:
        for d in marked_backups:
            catalog.write_backup(repo, d.record)
        for d in marked_dumps:
            dumps.write_dump(repo, d.record)
        raise RetentionError(
            f"{conflict} while this prune was being planned; nothing was removed: run the"
            " prune again (it keeps what the restore reads)"
        )
    for name in plan.wal_removed:
        repo.delete_wal(name)
    for d in plan.backups_removed:
        delete_backup(repo, d.label)
    for d in plan.dumps_removed:
        dumps.remove_dump(repo, d.label)
    return restore_lease.remove_expired(repo, plan.leases_expired, plan.now)


def _lease_conflict(repo: Repository, plan: RetentionPlan) -> str | None:
    """What changed in the leases since ``plan`` was made that the plan did not allow for."""
    leases, unreadable = restore_lease.scan(repo)
    known = {u.key for u in plan.leases_unreadable}
    for bad in unreadable:
        if bad.key not in known:
            return f"restore lease {bad.path} appeared and cannot be read ({bad.why})"
    removed = {d.label for d in plan.backups_removed}
    planned = {lease.lease_id for lease in plan.leases}
    for lease in leases:
        if not lease.is_active(plan.now) or lease.lease_id in planned:
            continue
        if lease.backup_label in removed:
            return (
                f"a restore on {lease.holder} took a lease on backup {lease.backup_label}"
                f" (lease {lease.lease_id})"
            )
        first = lease.first_segment or ""
        # Same timeline (first 8 hex digits); fixed-width hex names sort like their numbers.
        if len(first) == 24 and any(
            n[:8] == first[:8] and n[8:24] >= first[8:24] for n in plan.wal_removed
        ):
            return (
                f"a restore on {lease.holder} took a lease on WAL from {first}"
                f" (lease {lease.lease_id})"
            )
    return None


# Entry points for the module and the host command ----------------------------------------------


def server_identity(params: t.Mapping[str, t.Any]) -> tuple[RepositoryIdentity, dict[str, t.Any]]:
    """The cluster's identity read from the server (connection options in ``params``)."""
    from ansible_collections.pitr.postgresql.plugins.module_utils import postgres

    with postgres.connect(params) as conn:
        sysid = postgres.system_identifier(conn)
        major = postgres.server_major(conn)
        rows = postgres.pg_settings_rows(conn, ["wal_segment_size", "data_directory"])
    settings = {r["name"]: r["setting"] for r in rows}
    identity = RepositoryIdentity(sysid, major, int(settings.get("wal_segment_size") or 0))
    return identity, {"data_directory": settings.get("data_directory")}


def datadir_identity(pgdata: str) -> tuple[RepositoryIdentity, dict[str, t.Any]]:
    """The cluster's identity read from its data directory (as the PostgreSQL user)."""
    from ansible_collections.pitr.postgresql.plugins.module_utils.archive import (
        cluster_identity_from_datadir,
    )

    identity = cluster_identity_from_datadir(pgdata, with_segment_size=True)
    if identity is None:
        raise RetentionError(
            f"{pgdata} is not a readable PostgreSQL data directory (global/pg_control,"
            " PG_VERSION): give the data directory of the cluster this repository belongs to,"
            " and run as the user PostgreSQL runs as",
            pgdata=pgdata,
        )
    return identity, {"data_directory": pgdata}


def run_retention(
    repo: Repository,
    policy: RetentionPolicy,
    cluster: RepositoryIdentity,
    *,
    check_mode: bool,
    pin: t.Sequence[str] = (),
    unpin: t.Sequence[str] = (),
    lock_wait: float = 0.0,
    now: dt.datetime | None = None,
) -> dict[str, t.Any]:
    """Plan, and unless ``check_mode`` apply, one prune; return the module's result."""
    now = now or dt.datetime.now(dt.UTC)
    identity = repo.identity()
    if identity is None:
        raise RepositoryError(
            f"repository {repo.describe()} is not initialised (no identity record): check that"
            " its storage is mounted and the path is right; nothing was removed",
            repository=repo.describe(),
        )
    repo.check_identity(cluster, identity)
    no_rule = not policy.has_backup_rule and policy.dump_count is None and policy.dump_age is None
    if no_rule and not pin and not unpin:
        raise RetentionError(
            "no retention policy given: set redundancy and/or recovery_window (or only"
            " pin/unpin backups)"
        )
    if check_mode:
        state = read_state(repo)
        changes = pin_changes(state, pin, unpin)
        with_pins(state, changes)
        plan = plan_retention(state, policy, now)
        after = state_after(state, plan)
        leases_removed = [lease.lease_id for lease in plan.leases_expired]
    else:
        with ExitStack() as stack:
            for name in (BACKUP_LOCK, dumps.LOCK_NAME):
                stack.enter_context(
                    repo.storage.lock(name, purpose="retention prune", wait=lock_wait)
                )
            # Planned under the locks: no backup or dump starts or finishes meanwhile, and
            # WAL archived from now on is newer than anything the plan names.
            state = read_state(repo)
            changes = pin_changes(state, pin, unpin)
            write_pins(repo, changes, now)
            with_pins(state, changes)
            plan = plan_retention(state, policy, now)
            leases_removed = apply_plan(repo, plan)
            after = read_state(repo)
    pins_changed = any(c["add"] or c["remove"] for c in changes.values())
    result = plan.to_dict()
    result["continuity"] = continuity.check_continuity(
        after.backups, after.wal, after.histories, after.segment_size
    )
    result["pins"] = {k: sorted(v) for k, v in sorted(after.pins.items())}
    result["pins_changed"] = {
        "pinned": sorted({x for c in changes.values() for x in c["add"]}),
        "unpinned": sorted({x for c in changes.values() for x in c["remove"]}),
    }
    result["leases_removed"] = leases_removed
    result["changed"] = plan.removes_anything or pins_changed or bool(leases_removed)
    result["warnings"] = list(plan.warnings)
    result["msg"] = summary(plan, check_mode)
    return result


def _human(n: int) -> str:
    size = float(n)
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{int(size)} bytes" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} bytes"  # pragma: no cover - the loop always returns


def summary(plan: RetentionPlan, check_mode: bool) -> str:
    """One line a person reads: what goes, how much it frees, the new earliest point."""
    verb = "would remove" if check_mode else "removed"
    parts = [
        f"{len(plan.backups_removed)} base backup(s)",
        f"{len(plan.wal_removed)} WAL file(s)",
    ]
    if plan.dumps:
        parts.insert(1, f"{len(plan.dumps_removed)} logical dump(s)")
    text = f"retention {verb} {', '.join(parts)}, freeing {_human(plan.bytes_freed)}"
    in_use = [d for d in plan.backups if KEEP_LEASED in d.reasons]
    if in_use:
        text += "; kept in use by a restore: " + ", ".join(
            f"{d.label} ({', '.join(lease.holder for lease in d.leases)})" for d in in_use
        )
    if plan.leases_unreadable:
        text += (
            f"; every base backup kept: {len(plan.leases_unreadable)} unreadable restore lease(s)"
        )
    earliest = plan.earliest_after
    if earliest:
        text += (
            f"; earliest recoverable point: {earliest['time']} (timeline {earliest['timeline']},"
            f" backup {earliest['backup']})"
        )
    return text


def run_module_params(params: t.Mapping[str, t.Any], *, check_mode: bool) -> dict[str, t.Any]:
    """Everything the ``retention`` module does, from its parameters."""
    policy = RetentionPolicy.from_params(params)
    if params.get("pgdata"):
        cluster, facts = datadir_identity(str(params["pgdata"]))
    else:
        cluster, facts = server_identity(params)
    repo = Repository.open_posix(str(params["repository_path"]))
    result = run_retention(
        repo,
        policy,
        cluster,
        check_mode=check_mode,
        pin=list(params.get("pin") or []),
        unpin=list(params.get("unpin") or []),
        lock_wait=float(params.get("lock_wait") or 0),
    )
    result["cluster"] = {
        "system_identifier": cluster.system_identifier,
        "pg_major": cluster.pg_major,
        "wal_segment_size": cluster.wal_segment_size,
        **facts,
    }
    result["repository"] = repo.describe()
    return result


# The pitr-prune host command (the retention role's systemd unit runs it) -----------------------

HOST_USAGE = """usage: pitr-prune --repo PATH --pgdata DIR [policy options] [--dry-run]

Remove base backups, logical dumps and archived WAL that the retention policy no longer keeps
(what the retention module does), for a systemd unit or cron. A summary goes to stderr (the
journal); the result is one JSON object on stdout. Exit status 0 on success, 1 otherwise.
"""


def host_main(argv: t.Sequence[str] | None = None) -> int:
    """``pitr-prune``: the retention module as a command on the database host."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="pitr-prune", usage=HOST_USAGE)
    parser.add_argument("--repo", required=True, dest="repository_path")
    parser.add_argument("--pgdata", required=True)
    parser.add_argument("--redundancy", type=int, default=None)
    parser.add_argument("--recovery-window", dest="recovery_window", default=None)
    parser.add_argument("--min-backups", dest="min_backups", type=int, default=1)
    parser.add_argument("--dump-redundancy", dest="dump_redundancy", type=int, default=None)
    parser.add_argument("--dump-max-age", dest="dump_max_age", default=None)
    parser.add_argument("--lock-wait", dest="lock_wait", type=float, default=0.0)
    parser.add_argument("--dry-run", dest="dry_run", action="store_true")
    args = parser.parse_args(argv)
    params = vars(args)

    def say(text: str) -> None:
        sys.stderr.write(f"pitr-prune: {text}\n")
        sys.stderr.flush()

    try:
        result = run_module_params(params, check_mode=bool(args.dry_run))
    except PitrError as exc:
        say(f"FAILED: {exc.msg}")
        sys.stdout.write(json.dumps({"failed": True, "msg": exc.msg}) + "\n")
        return 1
    for warning in result.get("warnings", []):
        say(f"warning: {warning}")
    say(result["msg"])
    if not result["continuity"]["continuous"]:
        say(f"warning: {result['continuity']['reason']}")
    sys.stdout.write(json.dumps(result, sort_keys=True) + "\n")
    return 0

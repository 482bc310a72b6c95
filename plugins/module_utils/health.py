# Copyright: contributors to pitr.postgresql
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Is WAL archiving healthy, and if not, why: a verdict from facts the server reports.

``assess_archiving`` is pure: it takes ``ArchivingFacts`` (pg_stat_archiver, the ``.ready``
count, the WAL position, the archiving settings) and thresholds, and returns a
``HealthVerdict`` with stable reason codes and one sentence per reason:

- ``archiving_off``: archive_mode is off, or wal_level is minimal;
- ``command_not_ours``: archive_command does not run ``pitr-wal`` (or archive_library is set);
- ``failing``: the last attempt failed (last_failed_time is after last_archived_time);
- ``backlog``: more files wait than ``max_ready``;
- ``stale``: files wait and nothing was archived for longer than ``max_age``;
- ``repository_unreadable``: the repository cannot be read (missing, not mounted, no
  permission), so archiving into it cannot work;
- ``identity_mismatch``: the repository belongs to another cluster.

An idle server writes no WAL, so it archives nothing, and that is not stale: staleness needs
waiting work, seen as ``.ready`` files or, when those cannot be counted, as completed segments
between the last archived one and the one being written.

``inspect_repository`` reads a repository (identity and WAL summary) for the report.
"""

from __future__ import annotations

import datetime as dt
import typing as t
from dataclasses import asdict, dataclass

from ansible_collections.pitr.postgresql.plugins.module_utils.errors import (
    IdentityMismatchError,
    PitrError,
)
from ansible_collections.pitr.postgresql.plugins.module_utils.walfile import (
    DEFAULT_SEGMENT_SIZE,
    SEGMENT,
    WalFileName,
    WalNameError,
    parse_lsn,
)

OUR_COMMAND_MARK = "pitr-wal"
DEFAULT_MAX_READY = 10
DEFAULT_MAX_AGE = 15 * 60.0

ARCHIVING_OFF = "archiving_off"
COMMAND_NOT_OURS = "command_not_ours"
FAILING = "failing"
BACKLOG = "backlog"
STALE = "stale"
REPOSITORY_UNREADABLE = "repository_unreadable"
IDENTITY_MISMATCH = "identity_mismatch"


@dataclass(frozen=True)
class ArchivingFacts:
    """What the server reports about archiving (times are timezone-aware)."""

    now: dt.datetime
    archived_count: int = 0
    last_archived_wal: str | None = None
    last_archived_time: dt.datetime | None = None
    failed_count: int = 0
    last_failed_wal: str | None = None
    last_failed_time: dt.datetime | None = None
    stats_reset: dt.datetime | None = None
    postmaster_start_time: dt.datetime | None = None
    in_recovery: bool = False
    current_wal_lsn: str | None = None  # the write position; None on a standby
    wal_segment_size: int = DEFAULT_SEGMENT_SIZE
    ready_count: int | None = None  # None: the role may not list pg_wal/archive_status
    wal_level: str = "replica"
    archive_mode: str = "off"
    archive_command: str = ""
    archive_library: str = ""

    @classmethod
    def from_status(
        cls,
        status: t.Mapping[str, t.Any],
        settings: t.Mapping[str, str],
        ready_count: int | None,
    ) -> ArchivingFacts:
        """Build from ``postgres.archiver_status()`` and the settings' running values."""
        return cls(
            now=status["now"],
            archived_count=int(status.get("archived_count") or 0),
            last_archived_wal=status.get("last_archived_wal"),
            last_archived_time=status.get("last_archived_time"),
            failed_count=int(status.get("failed_count") or 0),
            last_failed_wal=status.get("last_failed_wal"),
            last_failed_time=status.get("last_failed_time"),
            stats_reset=status.get("stats_reset"),
            postmaster_start_time=status.get("postmaster_start_time"),
            in_recovery=bool(status.get("in_recovery")),
            current_wal_lsn=status.get("current_wal_lsn"),
            wal_segment_size=int(status.get("wal_segment_size") or DEFAULT_SEGMENT_SIZE),
            ready_count=ready_count,
            wal_level=settings.get("wal_level", "replica"),
            archive_mode=settings.get("archive_mode", "off"),
            archive_command=settings.get("archive_command", ""),
            archive_library=settings.get("archive_library", ""),
        )


@dataclass(frozen=True)
class HealthVerdict:
    """The answer: healthy or not, with a reason code and a sentence per problem."""

    healthy: bool
    reasons: tuple[str, ...]
    messages: tuple[str, ...]
    last_archived_age_seconds: float | None
    pending_segments: int | None  # completed segments not archived yet, from WAL positions

    def as_dict(self) -> dict[str, t.Any]:
        result = asdict(self)
        result["reasons"] = list(self.reasons)
        result["messages"] = list(self.messages)
        return result


def pending_segments(facts: ArchivingFacts) -> int | None:
    """Completed segments after the last archived one, up to the write position.

    None when it cannot be told: on a standby, before anything was archived, or when the last
    archived file is a history or backup file (its name says nothing about the position).
    """
    if facts.current_wal_lsn is None or not facts.last_archived_wal:
        return None
    try:
        last = WalFileName.parse(facts.last_archived_wal)
        write_position = parse_lsn(facts.current_wal_lsn)
    except (WalNameError, ValueError):
        return None
    if last.kind != SEGMENT:
        return None
    size = facts.wal_segment_size
    # The segment holding the write position is not complete; those before it are. Segment
    # numbers are positions in the WAL stream, comparable across timelines.
    return max(0, write_position // size - last.segment_number(size) - 1)


def _seconds(delta: dt.timedelta) -> float:
    return round(delta.total_seconds(), 3)


def assess_archiving(
    facts: ArchivingFacts,
    *,
    max_ready: int = DEFAULT_MAX_READY,
    max_age: float = DEFAULT_MAX_AGE,
    repository_problem: str | None = None,
    repository_unreadable: str | None = None,
) -> HealthVerdict:
    """The verdict on archiving. ``max_age`` is in seconds; ``repository_problem`` is the
    message of an identity mismatch between the repository and the server, if any;
    ``repository_unreadable`` the message of a repository that could not be read
    (``unreadable_repository_message``).
    """
    problems: dict[str, str] = {}  # reason code -> sentence, in a fixed order
    mode = facts.archive_mode.lower()
    if mode == "off" or facts.wal_level.lower() == "minimal":
        problems[ARCHIVING_OFF] = (
            f"archiving is off (archive_mode {facts.archive_mode}, wal_level {facts.wal_level}):"
            " no WAL reaches the archive, so no point in time can be restored"
        )
    if facts.archive_library:
        problems[COMMAND_NOT_OURS] = (
            f"archive_library {facts.archive_library!r} is set and takes the place of"
            " archive_command; clear it with ALTER SYSTEM RESET archive_library and reload"
        )
    elif OUR_COMMAND_MARK not in facts.archive_command:
        problems[COMMAND_NOT_OURS] = (
            f"archive_command {facts.archive_command!r} does not run {OUR_COMMAND_MARK}: WAL"
            " goes somewhere this collection does not manage"
        )

    if facts.last_failed_time is not None and (
        facts.last_archived_time is None or facts.last_failed_time > facts.last_archived_time
    ):
        problems[FAILING] = (
            f"archiving is failing: the last attempt ({facts.last_failed_wal} at"
            f" {facts.last_failed_time.isoformat()}) failed and nothing was archived since;"
            f" {facts.failed_count} failures since {_when(facts.stats_reset)}. The server log"
            " has the archive_command's error"
        )

    pending = pending_segments(facts)
    waiting = facts.ready_count if facts.ready_count is not None else pending
    if waiting is not None and waiting > max_ready:
        counted = ".ready files" if facts.ready_count is not None else "completed segments"
        problems[BACKLOG] = (
            f"{waiting} {counted} wait for archiving (more than {max_ready}): pg_wal grows"
            " until archiving catches up"
        )

    age = None
    if facts.last_archived_time is not None:
        age = _seconds(facts.now - facts.last_archived_time)
    # Time the archiver has had: since the last success, the statistics reset or the start.
    candidates = (facts.last_archived_time, facts.stats_reset, facts.postmaster_start_time)
    since = [x for x in candidates if x is not None]
    if waiting and since:
        idle_for = _seconds(facts.now - max(since))
        if idle_for > max_age:
            last = (
                f"the last file archived was {facts.last_archived_wal} {age:.0f}s ago"
                if age is not None
                else "nothing was archived since the server started or the statistics reset"
            )
            problems[STALE] = (
                f"archiving is stale: {waiting} WAL files wait and {last} (limit {max_age:.0f}s)"
            )

    if repository_unreadable:
        problems[REPOSITORY_UNREADABLE] = repository_unreadable
    if repository_problem:
        problems[IDENTITY_MISMATCH] = repository_problem

    return HealthVerdict(
        healthy=not problems,
        reasons=tuple(problems),
        messages=tuple(problems.values()),
        last_archived_age_seconds=age,
        pending_segments=pending,
    )


def _when(moment: dt.datetime | None) -> str:
    return moment.isoformat() if moment is not None else "the statistics were created"


def unreadable_repository_message(path: str, error: str, user: str | None = None) -> str:
    """The ``repository_unreadable`` sentence: the path, why, and what to do."""
    who = f" by {user}" if user else ""
    return (
        f"the repository {path} cannot be read{who}, so WAL cannot be archived into it"
        f" ({error}). Mount the storage that holds it, or create it with the archiving role"
        " (playbooks/setup_archiving.yml makes it owned by the PostgreSQL user, mode 0700),"
        " and give the PostgreSQL user read and write access; run this check as that user"
    )


def inspect_repository(
    path: str,
    *,
    system_identifier: int,
    pg_major: int,
    wal_segment_size: int,
) -> tuple[dict[str, t.Any], str | None]:
    """Read a POSIX repository: (report, identity problem or None).

    The report has ``path``, ``identity`` (None for a repository not used yet) and
    ``wal_summary``. Raises PitrError when the repository cannot be read.
    """
    # Imported here: only this function needs the repository and storage code.
    from ansible_collections.pitr.postgresql.plugins.module_utils.repository import (
        Repository,
        RepositoryIdentity,
    )

    try:
        repo = Repository.open_posix(path)
        identity = repo.identity()
        summary = repo.wal_summary()
    except PitrError:
        raise
    except OSError as exc:
        raise PitrError(f"cannot read the repository at {path}: {exc}", path=path) from exc
    problem = None
    if identity is not None:
        try:
            repo.check_identity(
                RepositoryIdentity(system_identifier, pg_major, wal_segment_size), identity
            )
        except IdentityMismatchError as exc:
            problem = exc.msg
    report = {
        "path": path,
        "identity": identity._asdict() if identity is not None else None,
        "wal_summary": summary,
    }
    return report, problem

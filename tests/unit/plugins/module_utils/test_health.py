# Copyright: contributors to pitr.postgresql
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The archiving health verdict: recorded PostgreSQL 15 states, then tables of edges."""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import json
import typing as t
from pathlib import Path

import pytest

from ansible_collections.pitr.postgresql.plugins.module_utils.errors import PitrError
from ansible_collections.pitr.postgresql.plugins.module_utils.health import (
    ARCHIVING_OFF,
    BACKLOG,
    COMMAND_NOT_OURS,
    FAILING,
    IDENTITY_MISMATCH,
    REPOSITORY_UNREADABLE,
    STALE,
    ArchivingFacts,
    assess_archiving,
    inspect_repository,
    pending_segments,
    unreadable_repository_message,
)
from ansible_collections.pitr.postgresql.plugins.module_utils.repository import (
    Repository,
    RepositoryIdentity,
)
from ansible_collections.pitr.postgresql.plugins.module_utils.settings import (
    ServerSetting,
    display,
    normalise,
)

FIXTURE = Path(__file__).parent / "fixtures" / "pg15_archiving.json"
RECORDED = json.loads(FIXTURE.read_text(encoding="utf-8"))
OURS = "/usr/bin/python3 -I -S /usr/local/lib/pitr-postgresql/bin/pitr-wal --repo /r push %p"
MIB16 = 16 * 1024 * 1024


def recorded_facts(name: str) -> ArchivingFacts:
    """Facts built the way archive_info builds them, from a recorded server state."""
    recorded = copy.deepcopy(RECORDED["states"][name])
    status = recorded["archiver_status"]
    for key, value in status.items():
        if key in ("now", "postmaster_start_time", "stats_reset") or key.endswith("_time"):
            status[key] = dt.datetime.fromisoformat(value) if value else None
    rows = [ServerSetting.from_row(r) for r in recorded["settings"]]
    settings = {s.name: display(s, normalise(s, s.running_text)) for s in rows}
    return ArchivingFacts.from_status(status, settings, recorded["ready_count"])


# recorded states -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("state", "command", "reasons"),
    [
        pytest.param("fresh", None, (ARCHIVING_OFF, COMMAND_NOT_OURS), id="fresh-cluster"),
        pytest.param("failing", None, (COMMAND_NOT_OURS, FAILING), id="bin-false-failing"),
        pytest.param("failing", OURS, (FAILING,), id="failing-with-our-command"),
        pytest.param("working_after_failure", None, (COMMAND_NOT_OURS,), id="cp-works"),
        pytest.param("working_after_failure", OURS, (), id="recovered-is-healthy"),
    ],
)
def test_recorded_states(state: str, command: str | None, reasons: tuple[str, ...]) -> None:
    facts = recorded_facts(state)
    if command is not None:
        facts = dataclasses.replace(facts, archive_command=command)
    verdict = assess_archiving(facts)
    assert verdict.reasons == reasons
    assert verdict.healthy is (reasons == ())
    assert len(verdict.messages) == len(reasons)


def test_recorded_failing_state_counts_and_names_the_file() -> None:
    facts = recorded_facts("failing")
    assert facts.failed_count >= 1
    assert facts.ready_count is not None and facts.ready_count >= 3
    verdict = assess_archiving(facts)
    message = verdict.messages[verdict.reasons.index(FAILING)]
    assert facts.last_failed_wal is not None and facts.last_failed_wal in message
    assert verdict.last_archived_age_seconds is None


def test_recorded_working_state_has_nothing_pending() -> None:
    facts = recorded_facts("working_after_failure")
    assert facts.ready_count == 0
    verdict = assess_archiving(facts)
    assert verdict.pending_segments == 0
    assert verdict.last_archived_age_seconds is not None
    assert 0 <= verdict.last_archived_age_seconds < 60


# tables of edges -------------------------------------------------------------------------------
NOW = dt.datetime(2026, 11, 25, 13, 0, 0, tzinfo=dt.UTC)


def ago(**kwargs: float) -> dt.datetime:
    return NOW - dt.timedelta(**kwargs)


HEALTHY = ArchivingFacts(
    now=NOW,
    archived_count=100,
    last_archived_wal="000000010000000000000005",
    last_archived_time=ago(seconds=30),
    stats_reset=ago(days=30),
    postmaster_start_time=ago(days=2),
    current_wal_lsn="0/6000100",  # in segment 6: 5 archived, 6 being written
    ready_count=0,
    wal_level="replica",
    archive_mode="on",
    archive_command=OURS,
)


@pytest.mark.parametrize(
    ("changes", "reasons"),
    [
        pytest.param({}, (), id="healthy"),
        pytest.param(
            {"last_archived_time": ago(days=2)}, (), id="idle-two-days-nothing-waiting-is-not-stale"
        ),
        pytest.param(
            {"ready_count": 3, "last_archived_time": ago(minutes=20)}, (STALE,), id="stale"
        ),
        pytest.param(
            {"ready_count": 3, "last_archived_time": ago(minutes=14)},
            (),
            id="waiting-but-within-max-age",
        ),
        pytest.param(
            {
                "ready_count": 3,
                "last_archived_time": ago(hours=5),
                "postmaster_start_time": ago(minutes=1),
            },
            (),
            id="just-restarted-gets-time",
        ),
        pytest.param({"ready_count": 11}, (BACKLOG,), id="backlog"),
        pytest.param({"ready_count": 10}, (), id="backlog-limit-is-inclusive"),
        pytest.param(
            {"ready_count": 40, "last_archived_time": ago(hours=1)},
            (BACKLOG, STALE),
            id="backlog-and-stale",
        ),
        pytest.param(
            {"ready_count": None, "current_wal_lsn": "0/12000000"},
            (BACKLOG,),
            id="no-ready-count-backlog-from-wal-position",
        ),
        pytest.param(
            {
                "ready_count": None,
                "current_wal_lsn": "0/8000000",
                "last_archived_time": ago(hours=1),
            },
            (STALE,),
            id="no-ready-count-stale-from-wal-position",
        ),
        pytest.param(
            {"ready_count": None, "current_wal_lsn": None, "in_recovery": True},
            (),
            id="standby-without-ready-count-tells-nothing",
        ),
        pytest.param(
            {"failed_count": 2, "last_failed_time": ago(seconds=5), "last_failed_wal": "X"},
            (FAILING,),
            id="failed-after-last-success",
        ),
        pytest.param(
            {"failed_count": 2, "last_failed_time": ago(minutes=5)}, (), id="failed-then-recovered"
        ),
        pytest.param(
            {
                "last_archived_time": None,
                "last_archived_wal": None,
                "failed_count": 1,
                "last_failed_time": ago(seconds=1),
            },
            (FAILING,),
            id="failed-never-archived",
        ),
        pytest.param(
            {
                "last_archived_time": None,
                "last_archived_wal": None,
                "ready_count": 2,
                "stats_reset": ago(days=3),
                "postmaster_start_time": ago(hours=1),
            },
            (STALE,),
            id="never-archived-files-waiting-an-hour",
        ),
        pytest.param({"archive_mode": "off"}, (ARCHIVING_OFF,), id="archive-mode-off"),
        pytest.param({"wal_level": "minimal"}, (ARCHIVING_OFF,), id="wal-level-minimal"),
        pytest.param({"archive_mode": "always"}, (), id="archive-mode-always"),
        pytest.param({"archive_command": "/bin/true"}, (COMMAND_NOT_OURS,), id="not-our-command"),
        pytest.param(
            {"archive_library": "basic_archive"}, (COMMAND_NOT_OURS,), id="archive-library-set"
        ),
        pytest.param(
            {
                "archive_mode": "off",
                "archive_command": "",
                "ready_count": 50,
                "last_failed_time": ago(seconds=1),
                "last_archived_time": ago(hours=2),
            },
            (ARCHIVING_OFF, COMMAND_NOT_OURS, FAILING, BACKLOG, STALE),
            id="reasons-come-in-a-fixed-order",
        ),
    ],
)
def test_verdict(changes: dict[str, t.Any], reasons: tuple[str, ...]) -> None:
    verdict = assess_archiving(dataclasses.replace(HEALTHY, **changes))
    assert verdict.reasons == reasons
    assert verdict.healthy is (reasons == ())


def test_thresholds_are_options() -> None:
    facts = dataclasses.replace(HEALTHY, ready_count=3, last_archived_time=ago(minutes=3))
    assert assess_archiving(facts).reasons == ()
    assert assess_archiving(facts, max_ready=2).reasons == (BACKLOG,)
    assert assess_archiving(facts, max_age=120).reasons == (STALE,)


def test_repository_problem_is_a_reason_with_its_message() -> None:
    verdict = assess_archiving(HEALTHY, repository_problem="belongs to another cluster")
    assert verdict.reasons == (IDENTITY_MISMATCH,)
    assert verdict.messages == ("belongs to another cluster",)


def test_unreadable_repository_fails_the_check_naming_path_and_fix() -> None:
    message = unreadable_repository_message(
        "/srv/pitr/repo", "repository /srv/pitr/repo is not accessible: Permission denied", "pg"
    )
    verdict = assess_archiving(HEALTHY, repository_unreadable=message)
    assert verdict.healthy is False
    assert verdict.reasons == (REPOSITORY_UNREADABLE,)
    (text,) = verdict.messages
    assert text.startswith("the repository /srv/pitr/repo cannot be read by pg, so WAL cannot")
    assert "Permission denied" in text
    assert "setup_archiving.yml" in text and "read and write access" in text


def test_unreadable_repository_comes_before_an_identity_mismatch_in_the_order() -> None:
    facts = dataclasses.replace(HEALTHY, archive_mode="off")
    verdict = assess_archiving(facts, repository_unreadable="u", repository_problem="m")
    assert verdict.reasons == (ARCHIVING_OFF, REPOSITORY_UNREADABLE, IDENTITY_MISMATCH)


def test_messages_say_what_is_wrong() -> None:
    facts = dataclasses.replace(
        HEALTHY,
        ready_count=12,
        last_archived_time=ago(minutes=20),
        archive_library="basic_archive",
    )
    verdict = assess_archiving(facts)
    messages = dict(zip(verdict.reasons, verdict.messages, strict=True))
    assert "ALTER SYSTEM RESET archive_library" in messages[COMMAND_NOT_OURS]
    assert "12 .ready files" in messages[BACKLOG]
    assert "000000010000000000000005 1200s ago" in messages[STALE]


def test_age_is_reported_from_the_server_clock() -> None:
    verdict = assess_archiving(dataclasses.replace(HEALTHY, last_archived_time=ago(seconds=42.5)))
    assert verdict.last_archived_age_seconds == 42.5
    as_dict = verdict.as_dict()
    assert as_dict["reasons"] == [] and as_dict["healthy"] is True


@pytest.mark.parametrize(
    ("last", "lsn", "size", "expected"),
    [
        ("000000010000000000000005", "0/6000100", MIB16, 0),
        ("000000010000000000000005", "0/6000000", MIB16, 0),  # at the boundary: 6 just began
        ("000000010000000000000003", "0/6000000", MIB16, 2),  # 4 and 5 complete, not archived
        ("000000010000000000000005", "0/5FFFFFF", MIB16, 0),  # never negative
        ("000000010000000000000005", "0/9000028", MIB16, 3),  # the write position is on TL 2
        ("0000000100000000000000FF", "1/1000028", MIB16, 1),  # across a log boundary
        ("000000010000000000000001", "0/C000010", 64 * 1024 * 1024, 1),
        ("00000002.history", "0/6000100", MIB16, None),
        ("000000010000000000000004.00000028.backup", "0/6000100", MIB16, None),
        ("000000010000000000000004", None, MIB16, None),
        (None, "0/6000100", MIB16, None),
        ("not-a-wal-name", "0/6000100", MIB16, None),
    ],
)
def test_pending_segments(
    last: str | None, lsn: str | None, size: int, expected: int | None
) -> None:
    facts = dataclasses.replace(
        HEALTHY, last_archived_wal=last, current_wal_lsn=lsn, wal_segment_size=size
    )
    assert pending_segments(facts) == expected


# repository report --------------------------------------------------------------------------
IDENTITY = RepositoryIdentity(
    system_identifier=7441120211222063101, pg_major=15, wal_segment_size=MIB16
)


def test_inspect_repository_of_this_cluster(tmp_path: Path) -> None:
    Repository.open_posix(str(tmp_path)).ensure_identity(IDENTITY)
    report, problem = inspect_repository(
        str(tmp_path),
        system_identifier=IDENTITY.system_identifier,
        pg_major=15,
        wal_segment_size=MIB16,
    )
    assert problem is None
    assert report["identity"] == IDENTITY._asdict()
    assert report["wal_summary"]["files"] == 0
    assert report["path"] == str(tmp_path)


def test_inspect_repository_of_another_cluster(tmp_path: Path) -> None:
    Repository.open_posix(str(tmp_path)).ensure_identity(IDENTITY)
    _report, problem = inspect_repository(
        str(tmp_path), system_identifier=42, pg_major=15, wal_segment_size=MIB16
    )
    assert problem is not None
    assert "system identifier 42" in problem


def test_inspect_unused_repository_has_no_identity(tmp_path: Path) -> None:
    report, problem = inspect_repository(
        str(tmp_path), system_identifier=42, pg_major=15, wal_segment_size=MIB16
    )
    assert report["identity"] is None and problem is None


def test_inspect_missing_repository_raises(tmp_path: Path) -> None:
    with pytest.raises(PitrError, match="not accessible"):
        inspect_repository(
            str(tmp_path / "missing"), system_identifier=42, pg_major=15, wal_segment_size=MIB16
        )

# Copyright: contributors to pitr.postgresql
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The settings planner against rows recorded from a real PostgreSQL 15 server.

fixtures/pg15_archiving.json holds, per server state, the ``pg_settings`` and
``pg_file_settings`` rows of the archiving parameters, recorded with
fixtures/record_archiving.py (which says how each state was reached).
"""

from __future__ import annotations

import copy
import json
import typing as t
from pathlib import Path

import pytest

from ansible_collections.pitr.postgresql.plugins.module_utils.errors import SettingsError
from ansible_collections.pitr.postgresql.plugins.module_utils.settings import (
    ServerSetting,
    display,
    normalise,
    parse_duration,
    parse_quantity,
    plan_settings,
    plan_wal_archiving,
)

FIXTURE = Path(__file__).parent / "fixtures" / "pg15_archiving.json"
RECORDED = json.loads(FIXTURE.read_text(encoding="utf-8"))
CMD = "cp %p /archive/%f"  # the archive_command the recorded server was given first
OTHER = "cp %p /other/%f"


def state(name: str) -> tuple[list[dict[str, t.Any]], list[dict[str, t.Any]]]:
    """(pg_settings rows, pg_file_settings rows) of a recorded state, as fresh copies."""
    recorded = RECORDED["states"][name]
    return copy.deepcopy(recorded["settings"]), copy.deepcopy(recorded["file_settings"])


def plan(
    name: str,
    *,
    wal_level: str = "replica",
    archive_mode: str = "on",
    archive_command: str = CMD,
    archive_timeout: str = "60s",
    files_readable: bool = True,
) -> t.Any:
    rows, files = state(name)
    return plan_wal_archiving(
        rows,
        files if files_readable else None,
        wal_level=wal_level,
        archive_mode=archive_mode,
        archive_command=archive_command,
        archive_timeout=archive_timeout,
    )


def test_fixture_comes_from_postgresql_15() -> None:
    assert RECORDED["version"].startswith("PostgreSQL 15.")


# what the recorded server states mean ---------------------------------------------------------
@pytest.mark.parametrize(
    ("state_name", "kwargs", "assignments", "reload", "pending_restart", "changed"),
    [
        pytest.param(
            "fresh",
            {},
            [("archive_mode", "on"), ("archive_command", CMD), ("archive_timeout", "60s")],
            True,
            ("archive_mode",),
            True,
            id="fresh-cluster-needs-all-but-wal_level",
        ),
        pytest.param(
            "altered_reloaded_pending_restart",
            {},
            [],
            False,
            ("archive_mode",),
            False,
            id="second-run-before-restart-is-a-no-op-that-still-needs-restart",
        ),
        pytest.param(
            "altered_not_reloaded",
            {},
            [],
            True,
            ("archive_mode",),
            True,
            id="written-but-not-reloaded-gets-the-reload-only",
        ),
        pytest.param(
            "archiving_on", {}, [], False, (), False, id="applied-and-restarted-is-a-no-op"
        ),
        pytest.param(
            "archiving_on",
            {"archive_command": OTHER},
            [("archive_command", OTHER)],
            True,
            (),
            True,
            id="command-only-change-reloads-without-restart",
        ),
        pytest.param(
            "archiving_on",
            {"archive_mode": "always"},
            [("archive_mode", "always")],
            False,
            ("archive_mode",),
            True,
            id="archive-mode-always-needs-restart",
        ),
        pytest.param(
            "archiving_on",
            {"wal_level": "logical"},
            [("wal_level", "logical")],
            False,
            ("wal_level",),
            True,
            id="raising-wal-level-needs-restart",
        ),
        pytest.param(
            "logical", {}, [], False, (), False, id="logical-is-kept-when-replica-is-asked"
        ),
        pytest.param(
            "command_set_mode_off",
            {},
            [("archive_mode", "on"), ("archive_timeout", "60s")],
            True,
            ("archive_mode",),
            True,
            id="command-shown-as-disabled-is-read-through-reset_val",
        ),
        pytest.param(
            "command_altered_not_reloaded",
            {"archive_command": OTHER},
            [],
            True,
            (),
            True,
            id="command-written-but-not-reloaded-gets-the-reload",
        ),
        pytest.param(
            "command_altered_not_reloaded",
            {"archive_command": CMD},
            [("archive_command", CMD)],
            False,
            (),
            True,
            id="pending-command-is-put-back-to-the-running-one-without-reload",
        ),
    ],
)
def test_plan_for_recorded_state(
    state_name: str,
    kwargs: dict[str, str],
    assignments: list[tuple[str, str]],
    reload: bool,
    pending_restart: tuple[str, ...],
    changed: bool,
) -> None:
    result = plan(state_name, **kwargs)
    assert result.assignments == assignments
    assert result.reload_required is reload
    assert result.pending_restart == pending_restart
    assert result.restart_required is bool(pending_restart)
    assert result.changed is changed


@pytest.mark.parametrize("timeout", ["60", "60s", "1min", "60000ms", " 60 s", "0.0166667h"])
def test_archive_timeout_spellings_of_sixty_seconds_are_equal(timeout: str) -> None:
    result = plan("archiving_on", archive_timeout=timeout)
    assert result.assignments == []
    assert result.after["archive_timeout"] == "60s"


@pytest.mark.parametrize(("timeout", "written"), [("5min", "300s"), ("0", "0s"), ("90", "90s")])
def test_archive_timeout_is_written_in_seconds(timeout: str, written: str) -> None:
    result = plan("archiving_on", archive_timeout=timeout)
    assert result.assignments == [("archive_timeout", written)]
    assert result.reload_required is True
    assert result.restart_required is False


def test_diff_of_fresh_cluster() -> None:
    result = plan("fresh")
    assert result.before == {
        "wal_level": "replica",
        "archive_mode": "off",
        "archive_command": "",
        "archive_timeout": "0s",
    }
    assert result.after == {
        "wal_level": "replica",
        "archive_mode": "on",
        "archive_command": CMD,
        "archive_timeout": "60s",
    }
    assert result.running["archive_command"] == ""


def test_diff_before_restart_shows_no_change_but_restart_is_pending() -> None:
    result = plan("altered_reloaded_pending_restart")
    assert result.before == result.after
    assert result.before["archive_mode"] == "on"  # configured, waiting for the restart
    assert result.running["archive_mode"] == "off"


def test_diff_when_only_a_reload_is_missing_shows_the_running_value() -> None:
    result = plan("altered_not_reloaded")
    assert result.before["archive_timeout"] == "0s"
    assert result.after["archive_timeout"] == "60s"


def test_previous_command_is_the_running_one() -> None:
    result = plan("archiving_on", archive_command=OTHER)
    assert result.running["archive_command"] == CMD
    assert result.before["archive_command"] == CMD
    assert result.after["archive_command"] == OTHER


def test_logical_kept_shows_in_after() -> None:
    result = plan("logical")
    assert result.after["wal_level"] == "logical"
    assert result.running["wal_level"] == "logical"


# refusals ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "state_name", "words"),
    [
        pytest.param(
            {},
            "archive_library_set",
            ["archive_library", "'basic_archive'", "ALTER SYSTEM RESET archive_library", "reload"],
            id="archive-library-set",
        ),
        pytest.param(
            {"wal_level": "minimal"},
            "archiving_on",
            ["'minimal'", "'replica'"],
            id="wal-level-minimal",
        ),
        pytest.param({"wal_level": "hot_standby"}, "fresh", ["'replica'"], id="wal-level-unknown"),
        pytest.param({"archive_mode": "off"}, "fresh", ["'on'", "'always'"], id="mode-off"),
        pytest.param({"archive_command": "  "}, "fresh", ["must not be empty"], id="empty-command"),
        pytest.param({"archive_timeout": "-1"}, "fresh", ["out of range", "0s"], id="timeout-<0"),
        pytest.param({"archive_timeout": "1GB"}, "fresh", ["unit 'GB'"], id="timeout-memory"),
        pytest.param({"archive_timeout": "soon"}, "fresh", ["not a number"], id="timeout-text"),
    ],
)
def test_refusals_name_the_problem(
    kwargs: dict[str, str], state_name: str, words: list[str]
) -> None:
    with pytest.raises(SettingsError) as err:
        plan(state_name, **kwargs)
    for word in words:
        assert word in err.value.msg


def test_archive_library_refusal_names_the_file() -> None:
    with pytest.raises(SettingsError) as err:
        plan("archive_library_set")
    assert "postgresql.auto.conf" in err.value.msg
    assert err.value.context["archive_library"] == "basic_archive"


def test_archive_library_reset_but_not_reloaded_is_refused_until_reloaded() -> None:
    with pytest.raises(SettingsError) as err:
        plan("archive_library_reset_not_reloaded")
    assert "running 'basic_archive'" in err.value.msg
    assert "configured" not in err.value.msg  # the configuration is already clear
    assert "pg_reload_conf()" in err.value.msg


def test_archive_library_only_configured_is_refused_too() -> None:
    rows, files = state("archiving_on")
    files.append(
        {"name": "archive_library", "setting": "basic_archive", "seqno": 99, "sourcefile": "x"}
    )
    with pytest.raises(SettingsError, match="configured 'basic_archive'"):
        plan_wal_archiving(
            rows,
            files,
            wal_level="replica",
            archive_mode="on",
            archive_command=CMD,
            archive_timeout="60s",
        )


def test_archive_library_absent_before_postgresql_15_is_fine() -> None:
    rows, files = state("archiving_on")
    rows = [r for r in rows if r["name"] != "archive_library"]
    result = plan_wal_archiving(
        rows,
        files,
        wal_level="replica",
        archive_mode="on",
        archive_command=CMD,
        archive_timeout="60s",
    )
    assert result.changed is False


def test_command_line_setting_cannot_be_changed_by_alter_system() -> None:
    rows, files = state("fresh")
    for row in rows:
        if row["name"] == "archive_mode":
            row["source"] = "command line"
    with pytest.raises(SettingsError, match="command line"):
        plan_wal_archiving(
            rows,
            files,
            wal_level="replica",
            archive_mode="on",
            archive_command=CMD,
            archive_timeout="60s",
        )


# synthetic edges ------------------------------------------------------------------------------
def test_wal_level_is_not_lowered_below_running_logical() -> None:
    """Running logical, someone configured minimal: writing replica would lower it."""
    rows, files = state("logical")
    files.append({"name": "wal_level", "setting": "minimal", "seqno": 99})
    result = plan_wal_archiving(
        rows,
        files,
        wal_level="replica",
        archive_mode="on",
        archive_command=CMD,
        archive_timeout="60s",
    )
    assert result.assignments == [("wal_level", "logical")]
    assert result.restart_required is False


def _archive_mode(
    rows: list[dict[str, t.Any]], files: list[dict[str, t.Any]], **values: str
) -> None:
    """Set archive_mode's running value (``running``) and configured value (``configured``)."""
    for row in rows:
        if row["name"] == "archive_mode" and "running" in values:
            row["setting"] = row["reset_val"] = values["running"]
    if "configured" in values:
        files.append({"name": "archive_mode", "setting": values["configured"], "seqno": 99})


@pytest.mark.parametrize(
    ("running", "configured", "pending_restart"),
    [
        pytest.param("always", "always", (), id="running-and-configured"),
        pytest.param("on", "always", (), id="configured-waiting-for-a-restart"),
        pytest.param("off", "always", ("archive_mode",), id="configured-server-not-archiving-yet"),
    ],
)
def test_always_satisfies_on_and_is_kept_with_a_note(
    running: str, configured: str, pending_restart: tuple[str, ...]
) -> None:
    rows, files = state("archiving_on")
    _archive_mode(rows, files, running=running, configured=configured)
    result = plan_wal_archiving(
        rows,
        files,
        wal_level="replica",
        archive_mode="on",
        archive_command=CMD,
        archive_timeout="60s",
    )
    assert result.assignments == []
    assert result.changed is False
    assert result.before["archive_mode"] == result.after["archive_mode"] == "always"
    assert result.pending_restart == pending_restart
    assert len(result.warnings) == 1
    note = result.warnings[0]
    assert "archive_mode is 'always' where 'on' was asked" in note
    assert "satisfies 'on'" in note and "left as it is" in note


def test_always_when_asked_has_no_note() -> None:
    rows, files = state("archiving_on")
    _archive_mode(rows, files, running="always", configured="always")
    result = plan_wal_archiving(
        rows,
        files,
        wal_level="replica",
        archive_mode="always",
        archive_command=CMD,
        archive_timeout="60s",
    )
    assert result.assignments == [] and result.warnings == ()


def test_running_always_does_not_keep_a_configured_off() -> None:
    """Someone configured off (restart pending): asking for on writes on, not always."""
    rows, files = state("archiving_on")
    _archive_mode(rows, files, running="always", configured="off")
    result = plan_wal_archiving(
        rows,
        files,
        wal_level="replica",
        archive_mode="on",
        archive_command=CMD,
        archive_timeout="60s",
    )
    assert result.assignments == [("archive_mode", "on")]
    assert result.pending_restart == ()  # the running always archives as on does
    assert result.warnings == ()


def test_on_running_is_raised_to_always_when_always_is_asked() -> None:
    result = plan("archiving_on", archive_mode="always")
    assert result.assignments == [("archive_mode", "always")]
    assert result.pending_restart == ("archive_mode",)
    assert result.warnings == ()


def test_last_file_entry_wins() -> None:
    """postgresql.conf says off, postgresql.auto.conf (read later) says on."""
    rows, files = state("altered_reloaded_pending_restart")
    files.insert(0, {"name": "archive_mode", "setting": "off", "seqno": 3, "sourcefile": "pg.conf"})
    result = plan_wal_archiving(
        rows,
        files,
        wal_level="replica",
        archive_mode="on",
        archive_command=CMD,
        archive_timeout="60s",
    )
    assert result.assignments == []
    assert result.pending_restart == ("archive_mode",)


def test_without_file_settings_running_values_stand_in_and_a_warning_says_so() -> None:
    result = plan("altered_reloaded_pending_restart", files_readable=False)
    assert result.assignments == [("archive_mode", "on")]  # cannot see the pending value
    assert result.file_settings_known is False
    assert "pg_file_settings" in result.warnings[0]


def test_invalid_value_in_a_configuration_file_is_named() -> None:
    rows, files = state("archiving_on")
    files.append({"name": "archive_timeout", "setting": "soon", "seqno": 99, "error": "invalid"})
    with pytest.raises(SettingsError, match="archive_timeout in the configuration files"):
        plan_wal_archiving(
            rows, files, wal_level="replica", archive_mode="on", archive_command=CMD,
            archive_timeout="60s",
        )  # fmt: skip


def test_generic_planner_refuses_unknown_parameter() -> None:
    rows, files = state("fresh")
    with pytest.raises(SettingsError, match="no parameter 'archive_cleanup'"):
        plan_settings(rows, files, {"archive_cleanup": "x"})


# normalisation ------------------------------------------------------------------------------------
def recorded_setting(name: str) -> ServerSetting:
    rows, _files = state("archiving_on")
    return ServerSetting.from_row(next(r for r in rows if r["name"] == name))


@pytest.mark.parametrize(
    ("text", "unit", "expected"),
    [
        ("60", "s", 60),
        ("60s", "s", 60),
        ("1min", "s", 60),
        ("1h", "s", 3600),
        ("1d", "s", 86400),
        ("1500ms", "s", 1.5),
        ("2s", "ms", 2000),
        ("1min", "min", 1),
        ("1MB", "kB", 1024),
        ("1GB", "8kB", 131072),
        ("16MB", "MB", 16),
        ("7", None, 7),
        ("1e3", "ms", 1000),
    ],
)
def test_parse_quantity(text: str, unit: str | None, expected: float) -> None:
    assert parse_quantity(text, unit) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("text", "unit"),
    [("1min", None), ("1kB", "s"), ("1 Min", "s"), ("", "s"), ("1.2.3", "s"), ("x1", "s")],
)
def test_parse_quantity_rejects(text: str, unit: str | None) -> None:
    with pytest.raises(ValueError):
        parse_quantity(text, unit)


@pytest.mark.parametrize(
    ("text", "seconds"), [("15min", 900), ("900", 900), ("1h", 3600), ("90s", 90), ("500ms", 0.5)]
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("name", "value", "canonical", "shown"),
    [
        ("archive_timeout", "1min", "60", "60s"),
        ("archive_timeout", "1.4s", "1", "1s"),
        ("archive_timeout", "1.6s", "2", "2s"),
        ("archive_mode", "ON", "on", "on"),
        ("wal_level", " Logical ", "logical", "logical"),
        ("archive_command", " cp %p x ", " cp %p x ", " cp %p x "),
    ],
)
def test_normalise_and_display(name: str, value: str, canonical: str, shown: str) -> None:
    setting = recorded_setting(name)
    assert normalise(setting, value) == canonical
    assert display(setting, canonical) == shown


@pytest.mark.parametrize(
    ("value", "canonical"), [("on", "on"), ("TRUE", "on"), ("yes", "on"), ("0", "off")]
)
def test_normalise_bool(value: str, canonical: str) -> None:
    setting = ServerSetting(name="fsync", setting="on", vartype="bool")
    assert normalise(setting, value) == canonical


def test_display_with_a_multiplied_unit() -> None:
    setting = ServerSetting(name="shared_buffers", setting="16384", unit="8kB", vartype="integer")
    assert normalise(setting, "128MB") == "16384"
    assert display(setting, "16384") == "131072kB"

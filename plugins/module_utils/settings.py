# Copyright: contributors to pitr.postgresql
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The settings planner: which ALTER SYSTEM statements bring a server to the wanted settings,
and whether a reload or a restart is then needed.

Pure: the input is what the server reports (rows of ``pg_settings`` and ``pg_file_settings``)
and the wanted values; the output is a ``SettingsPlan``. The connection helper runs it.

Each parameter has three values that matter:

- *running*: what the server uses now (``pg_settings.setting``);
- *configured*: what it will use after the next reload or restart, i.e. the last entry for the
  parameter in the configuration files, ``postgresql.auto.conf`` (ALTER SYSTEM) included
  (``pg_file_settings``, which the server re-reads on every query of the view);
- *wanted*: what the caller asks for.

ALTER SYSTEM runs when *configured* is not the wanted value. That makes a second run after
ALTER SYSTEM but before the restart a no-op (``changed`` false) which still reports
``restart_required``: the running value of a ``postmaster`` parameter is not the wanted one.
Parameters of context ``sighup`` take effect with a reload, which the caller performs.

Values are compared after normalisation: ``'60'``, ``'60s'`` and ``'1min'`` are the same
archive_timeout; enum values are case-insensitive.
"""

from __future__ import annotations

import math
import re
import typing as t
from dataclasses import dataclass, field, replace

from ansible_collections.pitr.postgresql.plugins.module_utils.errors import SettingsError

WAL_LEVELS = ("minimal", "replica", "logical")
ARCHIVE_MODES = ("on", "always")
# Values that satisfy a wish besides the wished value itself: 'always' archives on a primary
# as 'on' does (and during recovery too), so it is kept when 'on' is asked.
ARCHIVE_MODE_SATISFIED_BY = {"on": ("always",)}
ARCHIVING_SETTINGS = ("wal_level", "archive_mode", "archive_command", "archive_timeout")
# Everything the archiving planner reads: archive_library (PostgreSQL 15+) must be empty.
ARCHIVING_READ_SETTINGS = (*ARCHIVING_SETTINGS, "archive_library")

# Units PostgreSQL accepts, in its base units (milliseconds, bytes). Case-sensitive, as in
# PostgreSQL (``min``, ``kB``).
TIME_UNITS_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "min": 6e4, "h": 3.6e6, "d": 8.64e7}
MEMORY_UNITS_B = {"B": 1.0, "kB": 1024.0, "MB": 1024.0**2, "GB": 1024.0**3, "TB": 1024.0**4}

# Sources that outrank the configuration files: ALTER SYSTEM cannot change these values.
_OVERRIDING_SOURCES = ("command line", "override")
_BOOL_WORDS = {w: "on" for w in ("on", "true", "yes", "1")} | {
    w: "off" for w in ("off", "false", "no", "0")
}
_QUANTITY_RE = re.compile(r"^\s*([-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?)\s*([A-Za-z]*)\s*$")
_UNIT_RE = re.compile(r"^(\d*)([A-Za-z]+)$")


@dataclass(frozen=True)
class ServerSetting:
    """One row of ``pg_settings`` (the columns the planner uses)."""

    name: str
    setting: str
    unit: str | None = None
    context: str = "sighup"
    vartype: str = "string"
    source: str = "default"
    min_val: str | None = None
    max_val: str | None = None
    enumvals: tuple[str, ...] | None = None
    boot_val: str | None = None
    reset_val: str | None = None
    sourcefile: str | None = None
    pending_restart: bool = False

    @classmethod
    def from_row(cls, row: t.Mapping[str, t.Any]) -> ServerSetting:
        enumvals = row.get("enumvals")
        return cls(
            name=str(row["name"]),
            setting="" if row.get("setting") is None else str(row["setting"]),
            unit=row.get("unit"),
            context=str(row.get("context") or "sighup"),
            vartype=str(row.get("vartype") or "string"),
            source=str(row.get("source") or "default"),
            min_val=row.get("min_val"),
            max_val=row.get("max_val"),
            enumvals=tuple(enumvals) if enumvals is not None else None,
            boot_val=row.get("boot_val"),
            reset_val=row.get("reset_val"),
            sourcefile=row.get("sourcefile"),
            pending_restart=bool(row.get("pending_restart")),
        )

    @property
    def running_text(self) -> str:
        """The running value as text, looking through display hooks.

        ``archive_command`` shows ``(disabled)`` while archive_mode is off; ``reset_val`` then
        holds the value loaded from the configuration.
        """
        if self.name == "archive_command" and self.setting == "(disabled)":
            return self.reset_val or ""
        return self.setting


@dataclass(frozen=True)
class FileSetting:
    """One row of ``pg_file_settings``: an entry in a configuration file."""

    name: str
    setting: str
    seqno: int = 0
    sourcefile: str | None = None
    sourceline: int | None = None
    applied: bool = True
    error: str | None = None

    @classmethod
    def from_row(cls, row: t.Mapping[str, t.Any]) -> FileSetting:
        return cls(
            name=str(row["name"]),
            setting="" if row.get("setting") is None else str(row["setting"]),
            seqno=int(row.get("seqno") or 0),
            sourcefile=row.get("sourcefile"),
            sourceline=row.get("sourceline"),
            applied=bool(row.get("applied")),
            error=row.get("error"),
        )


@dataclass(frozen=True)
class SettingChange:
    """One ALTER SYSTEM SET the plan needs."""

    name: str
    value: str  # the text ALTER SYSTEM writes, e.g. '60s'
    before: str  # the configured value it replaces (display form)
    context: str


@dataclass(frozen=True)
class SettingsPlan:
    """What to run, and what the server needs afterwards.

    ``before`` and ``after`` map each wanted parameter to its display value (``60s``): for
    ``sighup`` parameters the value the server will run with once reloaded, for ``postmaster``
    parameters the configured value (a restart is the caller's business). ``changed`` is
    derived from them.
    """

    changes: tuple[SettingChange, ...]
    reload_required: bool
    pending_restart: tuple[str, ...]
    before: dict[str, str]
    after: dict[str, str]
    running: dict[str, str]
    file_settings_known: bool = True
    warnings: tuple[str, ...] = field(default=())

    @property
    def changed(self) -> bool:
        return self.before != self.after

    @property
    def restart_required(self) -> bool:
        return bool(self.pending_restart)

    @property
    def assignments(self) -> list[tuple[str, str]]:
        """(name, value) pairs for ``ALTER SYSTEM SET name = 'value'``, in order."""
        return [(c.name, c.value) for c in self.changes]


# normalisation --------------------------------------------------------------------------------
def parse_unit(unit: str | None) -> tuple[float, str]:
    """``'8kB'`` -> (8, 'kB'); ``'s'`` -> (1, 's'); None -> (1, '')."""
    if not unit:
        return 1.0, ""
    m = _UNIT_RE.match(unit)
    if not m:
        raise ValueError(f"unknown unit {unit!r}")
    return float(m[1] or 1), m[2]


def parse_quantity(text: str, unit: str | None) -> float:
    """A number with an optional unit, in multiples of ``unit`` (the parameter's base unit).

    ``parse_quantity('1min', 's') == 60``; ``parse_quantity('60', 's') == 60``.
    """
    m = _QUANTITY_RE.match(text)
    if not m:
        raise ValueError(f"{text!r} is not a number with an optional unit")
    number, given = float(m[1]), m[2]
    if not given:
        return number
    multiplier, base = parse_unit(unit)
    for table in (TIME_UNITS_MS, MEMORY_UNITS_B):
        if base in table:
            if given not in table:
                raise ValueError(
                    f"unit {given!r} does not fit a value in {unit}; use one of " + ", ".join(table)
                )
            return number * table[given] / (table[base] * multiplier)
    raise ValueError(f"{text!r} has a unit, but the parameter takes none")


def parse_duration(text: str, default_unit: str = "s") -> float:
    """A duration such as ``'15min'``, ``'900'`` (in ``default_unit``) or ``'1h'``, in seconds."""
    value = parse_quantity(text, default_unit)
    return value * TIME_UNITS_MS[default_unit] / 1000.0


def normalise(setting: ServerSetting, value: str) -> str:
    """The canonical text of ``value`` for this parameter (base unit, lower-case enum)."""
    if setting.vartype == "bool":
        word = value.strip().lower()
        if word not in _BOOL_WORDS:
            raise ValueError(f"{value!r} is not a boolean (on/off)")
        return _BOOL_WORDS[word]
    if setting.vartype == "enum":
        return value.strip().lower()
    if setting.vartype in ("integer", "real"):
        number = parse_quantity(value, setting.unit)
        if setting.vartype == "integer":
            # PostgreSQL rounds to the nearest integer in the base unit (rint).
            return str(round(number))
        return repr(float(number))
    return value


def display(setting: ServerSetting, canonical: str) -> str:
    """A canonical value in the form ALTER SYSTEM and people read: ``60`` -> ``60s``."""
    if setting.vartype not in ("integer", "real") or not setting.unit:
        return canonical
    multiplier, base = parse_unit(setting.unit)
    number = float(canonical) * multiplier
    text = str(int(number)) if number.is_integer() else repr(number)
    return f"{text}{base}"


def _validate(setting: ServerSetting, canonical: str, asked: str) -> None:
    if setting.vartype == "enum" and setting.enumvals and canonical not in setting.enumvals:
        raise SettingsError(
            f"{asked!r} is not a valid {setting.name}: choose one of "
            + ", ".join(setting.enumvals),
            setting=setting.name,
        )
    if setting.vartype in ("integer", "real"):
        number = float(canonical)
        low = float(setting.min_val) if setting.min_val not in (None, "") else -math.inf
        high = float(setting.max_val) if setting.max_val not in (None, "") else math.inf
        if not low <= number <= high:
            raise SettingsError(
                f"{setting.name} = {asked!r} is out of range: PostgreSQL accepts"
                f" {display(setting, setting.min_val or '')} to"
                f" {display(setting, setting.max_val or '')}",
                setting=setting.name,
            )


# planning ---------------------------------------------------------------------------------
def _configured_text(setting: ServerSetting, files: list[FileSetting] | None) -> str:
    """What the parameter will be after the next reload or restart."""
    if files is None or setting.source in _OVERRIDING_SOURCES:
        return setting.running_text
    entries = [f for f in files if f.name == setting.name]
    if entries:
        return max(entries, key=lambda f: f.seqno).setting
    if setting.source == "environment variable":
        return setting.running_text
    return setting.boot_val if setting.boot_val is not None else setting.running_text


def _rank(levels: t.Sequence[str], value: str) -> int:
    return levels.index(value) if value in levels else -1


def _satisfies(
    value: str,
    want: str,
    levels: t.Sequence[str] | None,
    also: t.Mapping[str, t.Sequence[str]] | None = None,
) -> bool:
    """Exact equality, a value ``also`` accepts for ``want``, or for ordered parameters
    (wal_level) at least the wanted level."""
    if levels is not None:
        return _rank(levels, value) >= _rank(levels, want)
    return value == want or value in (also or {}).get(want, ())


def plan_settings(
    rows: t.Iterable[t.Mapping[str, t.Any]],
    file_rows: t.Iterable[t.Mapping[str, t.Any]] | None,
    wanted: t.Mapping[str, str],
    *,
    at_least: t.Mapping[str, t.Sequence[str]] | None = None,
    satisfied_by: t.Mapping[str, t.Mapping[str, t.Sequence[str]]] | None = None,
) -> SettingsPlan:
    """Plan ALTER SYSTEM statements that give each parameter in ``wanted`` its value.

    ``rows``: ``pg_settings`` rows (dicts); ``file_rows``: ``pg_file_settings`` rows, or None
    when they could not be read (then the running values stand in for the configured ones,
    and a restart-pending value cannot be recognised). ``at_least`` names ordered parameters
    that are never lowered (``{'wal_level': WAL_LEVELS}``): a higher value satisfies the wish.
    ``satisfied_by`` names other values that satisfy a wish and are then kept
    (``{'archive_mode': {'on': ('always',)}}``).
    """
    at_least = at_least or {}
    satisfied_by = satisfied_by or {}
    settings = {s.name: s for s in (ServerSetting.from_row(r) for r in rows)}
    files = [FileSetting.from_row(r) for r in file_rows] if file_rows is not None else None
    changes: list[SettingChange] = []
    pending_restart: list[str] = []
    before: dict[str, str] = {}
    after: dict[str, str] = {}
    running: dict[str, str] = {}
    reload_required = False

    for name, asked in wanted.items():
        setting = settings.get(name)
        if setting is None:
            raise SettingsError(f"the server has no parameter {name!r}", setting=name)
        try:
            want = normalise(setting, asked)
            run = normalise(setting, setting.running_text)
        except ValueError as exc:
            raise SettingsError(f"{name}: {exc}", setting=name) from exc
        try:
            conf = normalise(setting, _configured_text(setting, files))
        except ValueError as exc:
            raise SettingsError(
                f"{name} in the configuration files is invalid ({exc}): the server would not"
                " accept it at the next reload or restart; correct or remove that line",
                setting=name,
            ) from exc
        _validate(setting, want, asked)

        levels = at_least.get(name)
        also = satisfied_by.get(name)
        target = conf
        if not _satisfies(conf, want, levels, also):
            target = want
            if levels is not None and _rank(levels, run) > _rank(levels, want):
                target = run  # never lower what the server runs with
            changes.append(
                SettingChange(
                    name, display(setting, target), display(setting, conf), setting.context
                )
            )

        if not _satisfies(run, want, levels, also) and setting.source in _OVERRIDING_SOURCES:
            raise SettingsError(
                f"{name} is set to {display(setting, run)!r} on the server's command line"
                f" (source: {setting.source}), which overrides ALTER SYSTEM: remove it from the"
                " server's start options (pg_ctl -o, the service unit) and set it in the"
                " configuration instead",
                setting=name,
            )

        running[name] = display(setting, run)
        if setting.context == "postmaster":
            before[name] = display(setting, conf)
            if not _satisfies(run, want, levels, also):
                pending_restart.append(name)
        else:
            # Reloaded by the caller: what counts is the value the server will run with.
            before[name] = display(setting, conf if target != conf else run)
            if run != target:
                reload_required = True
        after[name] = display(setting, target)

    warnings: tuple[str, ...] = ()
    if files is None:
        warnings = (
            "pg_file_settings could not be read (it needs superuser, or SELECT on it and"
            " EXECUTE on pg_show_all_file_settings()):"
            " values set with ALTER SYSTEM that wait for a restart are not recognised, so the"
            " statements may run again",
        )
    return SettingsPlan(
        changes=tuple(changes),
        reload_required=reload_required,
        pending_restart=tuple(pending_restart),
        before=before,
        after=after,
        running=running,
        file_settings_known=files is not None,
        warnings=warnings,
    )


def check_archive_library(
    rows: t.Iterable[t.Mapping[str, t.Any]],
    file_rows: t.Iterable[t.Mapping[str, t.Any]] | None,
) -> None:
    """Refuse to plan while archive_library is set (running or configured).

    PostgreSQL 15 lets archive_library take precedence over archive_command; 16 and later
    refuse to archive when both are set. Either way our archive_command would not run.
    """
    settings = {s.name: s for s in (ServerSetting.from_row(r) for r in rows)}
    setting = settings.get("archive_library")
    if setting is None:
        return  # PostgreSQL 13 and 14 have no archive_library
    files = [FileSetting.from_row(r) for r in file_rows] if file_rows is not None else None
    entries = [f for f in files or [] if f.name == "archive_library"]
    configured = max(entries, key=lambda f: f.seqno) if entries else None
    values = {"running": setting.setting}
    if files is not None:
        values["configured"] = configured.setting if configured else ""
    if not any(values.values()):
        return
    where = (configured.sourcefile if configured else None) or setting.sourcefile
    shown = ", ".join(f"{k} {v!r}" for k, v in values.items() if v)
    raise SettingsError(
        f"archive_library is set ({shown}{f', in {where}' if where else ''}): it takes"
        " precedence over archive_command in PostgreSQL 15, and PostgreSQL 16 and later refuse"
        " to archive when both are set. Clear it with ALTER SYSTEM RESET archive_library"
        " (and remove it from postgresql.conf if it is set there), then reload the server"
        " (SELECT pg_reload_conf()), and run this again",
        setting="archive_library",
        archive_library=setting.setting or (configured.setting if configured else ""),
    )


def plan_wal_archiving(
    rows: t.Iterable[t.Mapping[str, t.Any]],
    file_rows: t.Iterable[t.Mapping[str, t.Any]] | None,
    *,
    wal_level: str,
    archive_mode: str,
    archive_command: str,
    archive_timeout: str,
) -> SettingsPlan:
    """Plan the four archiving parameters with the archiving rules.

    - wal_level: 'replica' or 'logical'; 'minimal' is refused; a higher running or configured
      level (logical when replica is asked) is kept, never lowered.
    - archive_mode: 'on' or 'always'. 'always' (configured) satisfies 'on', since it archives
      on a primary too: it is kept, with a note in ``warnings``.
    - archive_command: replaced when different; must not be empty.
    - archive_timeout: compared after normalisation ('60', '60s', '1min' are equal).
    - archive_library must be empty (PostgreSQL 15+).
    """
    rows = list(rows)
    file_rows = list(file_rows) if file_rows is not None else None
    level = wal_level.strip().lower()
    if level not in WAL_LEVELS[1:]:
        hint = (
            "'minimal' does not write enough WAL to archive or to recover from"
            if level == "minimal"
            else f"{wal_level!r} is not a wal_level"
        )
        raise SettingsError(
            f"wal_level {wal_level!r} cannot be used for archiving: {hint}. Ask for 'replica'"
            " (the default) or 'logical'",
            setting="wal_level",
        )
    mode = archive_mode.strip().lower()
    if mode not in ARCHIVE_MODES:
        raise SettingsError(
            f"archive_mode {archive_mode!r} does not archive: ask for 'on' (a primary archives)"
            " or 'always' (a standby archives too)",
            setting="archive_mode",
        )
    if not archive_command.strip():
        raise SettingsError(
            "archive_command must not be empty: with archive_mode on and no command, WAL piles"
            " up in pg_wal until the disk is full",
            setting="archive_command",
        )
    check_archive_library(rows, file_rows)
    plan = plan_settings(
        rows,
        file_rows,
        {
            "wal_level": level,
            "archive_mode": mode,
            "archive_command": archive_command,
            "archive_timeout": archive_timeout,
        },
        at_least={"wal_level": WAL_LEVELS},
        satisfied_by={"archive_mode": ARCHIVE_MODE_SATISFIED_BY},
    )
    if mode == "on" and plan.after.get("archive_mode") == "always":
        note = (
            "archive_mode is 'always' where 'on' was asked: 'always' archives on a primary too"
            " (and also during recovery), so it satisfies 'on' and is left as it is. Ask for"
            " 'always' to keep it without this note, or, to stop archiving during recovery,"
            " run ALTER SYSTEM SET archive_mode = 'on' and restart the server"
        )
        plan = replace(plan, warnings=(*plan.warnings, note))
    return plan

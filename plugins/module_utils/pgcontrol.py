# Copyright: contributors to pitr.postgresql
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Parsers for ``pg_controldata`` output and a base backup's ``backup_label``.

Pure functions over text. Run ``pg_controldata`` with ``LC_ALL=C`` and ``TZ=UTC`` (the
runner's default environment) so that its times read as ``Wed Nov 25 14:19:52 2026`` in UTC;
other locales still parse into the raw mapping, only the typed times become None.
Standard library only.
"""

from __future__ import annotations

import datetime as dt
import re
import typing as t
from dataclasses import dataclass

from ansible_collections.pitr.postgresql.plugins.module_utils.walfile import (
    format_lsn,
    parse_lsn,
)


class ParseError(ValueError):
    """Text is not the output the parser expects."""


def parse_controldata_text(text: str) -> dict[str, str]:
    """``pg_controldata`` output as a mapping of its labels to their values (both stripped).

    Labels keep PostgreSQL's spelling (``Latest checkpoint's TimeLineID``). One label,
    ``Latest checkpoint's oldestCommitTsXid:0``, has no space after its colon; the split is
    on the last colon that is followed by whitespace or by the value column.
    """
    values: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.rstrip()
        if not line.strip():
            continue
        label, value = _split_control_line(line)
        if label:
            values[label] = value
    if "Database system identifier" not in values:
        raise ParseError("this is not pg_controldata output: no 'Database system identifier' line")
    return values


def _split_control_line(line: str) -> tuple[str, str]:
    # Values never contain ": " except the times' colons, which are not followed by a space;
    # labels end at the first ':' followed by spaces, or (oldestCommitTsXid) by a digit run.
    m = re.match(r"^(.*?):\s+(.*)$", line)
    if m:
        return m[1].strip(), m[2].strip()
    m = re.match(r"^(.*?):(\S+)$", line)
    if m:
        return m[1].strip(), m[2].strip()
    return "", ""


def parse_c_time(text: str) -> dt.datetime | None:
    """A ``%c`` time in the C locale, read as UTC (``Wed Nov 25 14:19:52 2026``)."""
    try:
        return dt.datetime.strptime(text.strip(), "%a %b %d %H:%M:%S %Y").replace(tzinfo=dt.UTC)
    except ValueError:
        return None


@dataclass(frozen=True)
class ControlData:
    """The fields of ``pg_controldata`` the collection uses."""

    system_identifier: int
    cluster_state: str
    pg_control_version: int
    catalog_version: int
    checkpoint_lsn: str
    redo_lsn: str
    redo_wal_file: str
    timeline: int
    prev_timeline: int
    checkpoint_time: str
    min_recovery_end_lsn: str
    min_recovery_end_timeline: int
    backup_start_lsn: str
    backup_end_lsn: str
    end_of_backup_record_required: bool
    wal_level: str
    wal_segment_size: int
    wal_block_size: int
    block_size: int
    data_checksum_version: int
    raw: dict[str, str]

    @property
    def data_checksums(self) -> bool:
        return self.data_checksum_version != 0

    @property
    def shut_down_cleanly(self) -> bool:
        """True for ``shut down`` and ``shut down in recovery``."""
        return self.cluster_state.startswith("shut down")


def _int(values: t.Mapping[str, str], label: str, default: int = 0) -> int:
    v = values.get(label)
    if v is None or v == "":
        return default
    try:
        return int(v)
    except ValueError as exc:
        raise ParseError(f"pg_controldata: {label!r} is {v!r}, not a number") from exc


def _lsn(values: t.Mapping[str, str], label: str) -> str:
    v = values.get(label, "0/0")
    try:
        return format_lsn(parse_lsn(v))
    except ValueError as exc:
        raise ParseError(f"pg_controldata: {label!r} is {v!r}, not an LSN") from exc


def _iso(text: str) -> str:
    when = parse_c_time(text)
    return when.isoformat() if when else ""


def parse_controldata(text: str) -> ControlData:
    """Typed ``pg_controldata`` output (PostgreSQL 13-18 label spelling)."""
    v = parse_controldata_text(text)
    return ControlData(
        system_identifier=_int(v, "Database system identifier"),
        cluster_state=v.get("Database cluster state", ""),
        pg_control_version=_int(v, "pg_control version number"),
        catalog_version=_int(v, "Catalog version number"),
        checkpoint_lsn=_lsn(v, "Latest checkpoint location"),
        redo_lsn=_lsn(v, "Latest checkpoint's REDO location"),
        redo_wal_file=v.get("Latest checkpoint's REDO WAL file", ""),
        timeline=_int(v, "Latest checkpoint's TimeLineID"),
        prev_timeline=_int(v, "Latest checkpoint's PrevTimeLineID"),
        checkpoint_time=_iso(v.get("Time of latest checkpoint", "")),
        min_recovery_end_lsn=_lsn(v, "Minimum recovery ending location"),
        min_recovery_end_timeline=_int(v, "Min recovery ending loc's timeline"),
        backup_start_lsn=_lsn(v, "Backup start location"),
        backup_end_lsn=_lsn(v, "Backup end location"),
        end_of_backup_record_required=v.get("End-of-backup record required", "no") == "yes",
        wal_level=v.get("wal_level setting", ""),
        wal_segment_size=_int(v, "Bytes per WAL segment"),
        wal_block_size=_int(v, "WAL block size"),
        block_size=_int(v, "Database block size"),
        data_checksum_version=_int(v, "Data page checksum version"),
        raw=v,
    )


# backup_label ----------------------------------------------------------------------------------

_START_WAL = re.compile(r"^([0-9A-Fa-f]+/[0-9A-Fa-f]+) \(file ([0-9A-F]{24})\)$")
_LABEL_TIME = re.compile(r"^(\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2})(?: (\S+))?$")


@dataclass(frozen=True)
class BackupLabel:
    """The ``backup_label`` file a base backup starts with."""

    start_lsn: str
    start_wal: str
    checkpoint_lsn: str
    backup_method: str
    backup_from: str
    start_time_text: str
    start_time: str  # ISO 8601 with offset when the zone is UTC/GMT or numeric, else ""
    label: str
    start_timeline: int
    incremental_from_lsn: str = ""
    incremental_from_timeline: int = 0

    @property
    def timeline(self) -> int:
        """START TIMELINE, else the timeline in the start WAL file name."""
        return self.start_timeline or int(self.start_wal[:8], 16)


def _label_time(text: str) -> str:
    m = _LABEL_TIME.match(text.strip())
    if not m:
        return ""
    base = dt.datetime.strptime(m[1], "%Y-%m-%d %H:%M:%S")
    zone = m[2] or ""
    if zone in ("UTC", "GMT", "Z", "UCT", "Etc/UTC"):
        return base.replace(tzinfo=dt.UTC).isoformat()
    zm = re.fullmatch(r"([+-])(\d{1,2})(?::?(\d{2}))?", zone)
    if zm:
        delta = dt.timedelta(hours=int(zm[2]), minutes=int(zm[3] or 0))
        tz = dt.timezone(delta if zm[1] == "+" else -delta)
        return base.replace(tzinfo=tz).isoformat()
    return ""  # a zone abbreviation such as CET is ambiguous: keep only the text


def parse_backup_label(text: str) -> BackupLabel:
    """Parse ``backup_label`` (PostgreSQL 13-18); ParseError when a required line is missing."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(": ")
        if sep:
            fields[key.strip()] = value.strip()
    start = fields.get("START WAL LOCATION", "")
    m = _START_WAL.match(start)
    if not m:
        raise ParseError(f"backup_label has no usable START WAL LOCATION line (got {start!r})")
    checkpoint = fields.get("CHECKPOINT LOCATION", "")
    try:
        start_lsn = format_lsn(parse_lsn(m[1]))
        checkpoint_lsn = format_lsn(parse_lsn(checkpoint)) if checkpoint else ""
    except ValueError as exc:
        raise ParseError(f"backup_label: {exc}") from exc
    inc_lsn, inc_tli = "", 0
    if "INCREMENTAL FROM LSN" in fields:
        inc_lsn = format_lsn(parse_lsn(fields["INCREMENTAL FROM LSN"]))
        inc_tli = int(fields.get("INCREMENTAL FROM TLI", "0") or 0)
    time_text = fields.get("START TIME", "")
    return BackupLabel(
        start_lsn=start_lsn,
        start_wal=m[2],
        checkpoint_lsn=checkpoint_lsn,
        backup_method=fields.get("BACKUP METHOD", ""),
        backup_from=fields.get("BACKUP FROM", ""),
        start_time_text=time_text,
        start_time=_label_time(time_text),
        label=fields.get("LABEL", ""),
        start_timeline=int(fields.get("START TIMELINE", "0") or 0),
        incremental_from_lsn=inc_lsn,
        incremental_from_timeline=inc_tli,
    )

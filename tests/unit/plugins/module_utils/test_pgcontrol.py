# Copyright: contributors to pitr.postgresql
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""pg_controldata and backup_label parsing, on outputs recorded from PostgreSQL 15.18."""

# ruff: noqa: E501 (recorded tool output keeps its real line length)
from __future__ import annotations

import pytest

from ansible_collections.pitr.postgresql.plugins.module_utils.pgcontrol import (
    ParseError,
    parse_backup_label,
    parse_c_time,
    parse_controldata,
    parse_controldata_text,
)

# `LC_ALL=C TZ=UTC pg_controldata` of a running PostgreSQL 15.18 cluster (Debian 12).
CONTROLDATA_PG15 = """\
pg_control version number:            1300
Catalog version number:               202209061
Database system identifier:           7712112821732407675
Database cluster state:               in production
pg_control last modified:             Wed Nov 25 14:19:52 2026
Latest checkpoint location:           0/62000060
Latest checkpoint's REDO location:    0/62000028
Latest checkpoint's REDO WAL file:    000000010000000000000062
Latest checkpoint's TimeLineID:       1
Latest checkpoint's PrevTimeLineID:   1
Latest checkpoint's full_page_writes: on
Latest checkpoint's NextXID:          0:746
Latest checkpoint's NextOID:          24576
Latest checkpoint's NextMultiXactId:  1
Latest checkpoint's NextMultiOffset:  0
Latest checkpoint's oldestXID:        716
Latest checkpoint's oldestXID's DB:   1
Latest checkpoint's oldestActiveXID:  746
Latest checkpoint's oldestMultiXid:   1
Latest checkpoint's oldestMulti's DB: 1
Latest checkpoint's oldestCommitTsXid:0
Latest checkpoint's newestCommitTsXid:0
Time of latest checkpoint:            Wed Nov 25 14:19:52 2026
Fake LSN counter for unlogged rels:   0/3E8
Minimum recovery ending location:     0/0
Min recovery ending loc's timeline:   0
Backup start location:                0/0
Backup end location:                  0/0
End-of-backup record required:        no
wal_level setting:                    replica
wal_log_hints setting:                off
max_connections setting:              100
max_worker_processes setting:         8
max_wal_senders setting:              5
max_prepared_xacts setting:           0
max_locks_per_xact setting:           64
track_commit_timestamp setting:       off
Maximum data alignment:               8
Database block size:                  8192
Blocks per segment of large relation: 131072
WAL block size:                       8192
Bytes per WAL segment:                16777216
Maximum length of identifiers:        64
Maximum columns in an index:          32
Maximum size of a TOAST chunk:        1996
Size of a large-object chunk:         2048
Date/time type storage:               64-bit integers
Float8 argument passing:              by value
Data page checksum version:           1
Mock authentication nonce:            065e01a90b2222da708d2264435ab65f4905cf7482c89c7d7297709a46207bfc
"""

# backup_label from `pg_basebackup -Ft` of the same cluster (inside base.tar.zst).
BACKUP_LABEL_PG15 = """\
START WAL LOCATION: 0/62000028 (file 000000010000000000000062)
CHECKPOINT LOCATION: 0/62000060
BACKUP METHOD: streamed
BACKUP FROM: primary
START TIME: 2026-11-25 14:19:52 UTC
LABEL: pg_basebackup base backup
START TIMELINE: 1
"""

# PostgreSQL 17 adds INCREMENTAL FROM lines for incremental backups (format from the docs).
BACKUP_LABEL_PG17_INCREMENTAL = """\
START WAL LOCATION: 0/9000028 (file 000000020000000000000009)
CHECKPOINT LOCATION: 0/9000080
BACKUP METHOD: streamed
BACKUP FROM: standby
START TIME: 2026-11-25 15:00:00 +0100
LABEL: pitr.postgresql 20261125T140000Z
START TIMELINE: 2
INCREMENTAL FROM LSN: 0/7000028
INCREMENTAL FROM TLI: 2
"""


def test_controldata_typed_fields() -> None:
    cd = parse_controldata(CONTROLDATA_PG15)
    assert cd.system_identifier == 7712112821732407675
    assert cd.cluster_state == "in production"
    assert cd.pg_control_version == 1300
    assert cd.catalog_version == 202209061
    assert cd.checkpoint_lsn == "0/62000060"
    assert cd.redo_lsn == "0/62000028"
    assert cd.redo_wal_file == "000000010000000000000062"
    assert cd.timeline == 1 and cd.prev_timeline == 1
    assert cd.checkpoint_time == "2026-11-25T14:19:52+00:00"
    assert cd.min_recovery_end_lsn == "0/0"
    assert cd.backup_end_lsn == "0/0"
    assert cd.end_of_backup_record_required is False
    assert cd.wal_level == "replica"
    assert cd.wal_segment_size == 16 * 1024 * 1024
    assert cd.block_size == 8192 and cd.wal_block_size == 8192
    assert cd.data_checksums is True
    assert cd.shut_down_cleanly is False


def test_controldata_label_without_space_after_colon() -> None:
    raw = parse_controldata_text(CONTROLDATA_PG15)
    assert raw["Latest checkpoint's oldestCommitTsXid"] == "0"
    assert raw["Latest checkpoint's NextXID"] == "0:746"
    assert raw["pg_control last modified"] == "Wed Nov 25 14:19:52 2026"
    assert len(raw) == CONTROLDATA_PG15.count("\n")


@pytest.mark.parametrize(
    ("state", "clean"),
    [("shut down", True), ("shut down in recovery", True), ("in crash recovery", False)],
)
def test_controldata_states(state: str, clean: bool) -> None:
    text = CONTROLDATA_PG15.replace("in production", state)
    assert parse_controldata(text).shut_down_cleanly is clean


def test_controldata_other_locale_keeps_raw_time() -> None:
    text = CONTROLDATA_PG15.replace(
        "Time of latest checkpoint:            Wed Nov 25 14:19:52 2026",
        "Time of latest checkpoint:            Mi 25 Nov 2026 14:19:52 UTC",
    )
    cd = parse_controldata(text)
    assert cd.checkpoint_time == ""
    assert cd.raw["Time of latest checkpoint"] == "Mi 25 Nov 2026 14:19:52 UTC"


def test_controldata_rejects_other_text() -> None:
    with pytest.raises(ParseError):
        parse_controldata("pg_controldata: error: could not open file")


def test_c_time() -> None:
    assert parse_c_time("Wed Nov 25 14:19:52 2026").isoformat() == "2026-11-25T14:19:52+00:00"  # type: ignore[union-attr]
    assert parse_c_time("yesterday") is None


def test_backup_label_pg15() -> None:
    bl = parse_backup_label(BACKUP_LABEL_PG15)
    assert bl.start_lsn == "0/62000028"
    assert bl.start_wal == "000000010000000000000062"
    assert bl.checkpoint_lsn == "0/62000060"
    assert bl.backup_method == "streamed"
    assert bl.backup_from == "primary"
    assert bl.start_time_text == "2026-11-25 14:19:52 UTC"
    assert bl.start_time == "2026-11-25T14:19:52+00:00"
    assert bl.label == "pg_basebackup base backup"
    assert bl.start_timeline == 1 and bl.timeline == 1
    assert bl.incremental_from_lsn == ""


def test_backup_label_incremental_numeric_zone() -> None:
    bl = parse_backup_label(BACKUP_LABEL_PG17_INCREMENTAL)
    assert bl.start_wal == "000000020000000000000009"
    assert bl.start_time == "2026-11-25T15:00:00+01:00"
    assert bl.backup_from == "standby"
    assert bl.incremental_from_lsn == "0/7000028"
    assert bl.incremental_from_timeline == 2


def test_backup_label_zone_abbreviation_is_not_guessed() -> None:
    bl = parse_backup_label(BACKUP_LABEL_PG15.replace(" UTC", " CET"))
    assert bl.start_time == ""
    assert bl.start_time_text == "2026-11-25 14:19:52 CET"


def test_backup_label_timeline_from_file_name_when_line_missing() -> None:
    text = BACKUP_LABEL_PG15.replace("START TIMELINE: 1\n", "").replace(
        "(file 000000010000000000000062)", "(file 000000030000000000000062)"
    )
    assert parse_backup_label(text).timeline == 3


@pytest.mark.parametrize(
    "text",
    [
        "",
        "CHECKPOINT LOCATION: 0/1\n",
        "START WAL LOCATION: nowhere (file 000000010000000000000001)\n",
    ],
)
def test_backup_label_rejects_incomplete(text: str) -> None:
    with pytest.raises(ParseError):
        parse_backup_label(text)

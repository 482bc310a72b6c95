# Copyright: contributors to pitr.postgresql
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""WAL file names, LSNs and page headers (real headers recorded from PostgreSQL 15)."""

from __future__ import annotations

import random
import struct

import pytest

from ansible_collections.pitr.postgresql.plugins.module_utils import walfile
from ansible_collections.pitr.postgresql.plugins.module_utils.walfile import (
    BACKUP,
    HISTORY,
    PARTIAL,
    SEGMENT,
    WalFileName,
    WalNameError,
)
from tests.support import wal_samples

MiB = 1024 * 1024

# name -> (timeline, log, seg, kind, backup_offset, segment_name)
VALID_NAMES = {
    "000000010000000000000001": (1, 0, 1, SEGMENT, 0, "000000010000000000000001"),
    "00000001000000000000000A": (1, 0, 10, SEGMENT, 0, "00000001000000000000000A"),
    "0000000100000000000000FF": (1, 0, 255, SEGMENT, 0, "0000000100000000000000FF"),
    "000000010000000100000000": (1, 1, 0, SEGMENT, 0, "000000010000000100000000"),
    "0000000A000000FF000000FE": (10, 255, 254, SEGMENT, 0, "0000000A000000FF000000FE"),
    "FFFFFFFFFFFFFFFFFFFFFFFF": (
        0xFFFFFFFF,
        0xFFFFFFFF,
        0xFFFFFFFF,
        SEGMENT,
        0,
        "FFFFFFFFFFFFFFFFFFFFFFFF",
    ),
    "000000010000000000000003.partial": (1, 0, 3, PARTIAL, 0, "000000010000000000000003"),
    wal_samples.BACKUP_NAME: (1, 0, 2, BACKUP, 0x28, "000000010000000000000002"),
    "0000000200000001000000C3.00F1A2B0.backup": (
        2,
        1,
        0xC3,
        BACKUP,
        0xF1A2B0,
        "0000000200000001000000C3",
    ),
    wal_samples.HISTORY_NAME: (2, 0, 0, HISTORY, 0, ""),
    "0000002A.history": (42, 0, 0, HISTORY, 0, ""),
}


@pytest.mark.parametrize("name", sorted(VALID_NAMES))
def test_parse_valid_names(name: str) -> None:
    timeline, log, seg, kind, offset, segment = VALID_NAMES[name]
    w = WalFileName.parse(name)
    assert (w.timeline, w.log, w.seg, w.kind, w.backup_offset) == (
        timeline,
        log,
        seg,
        kind,
        offset,
    )
    assert w.name == name
    assert w.segment_name == segment


INVALID_NAMES = [
    "",
    "00000001000000000000001",  # 23 digits
    "0000000100000000000000001",  # 25 digits
    "000000010000000000000001 ",
    " 000000010000000000000001",
    "000000010000000000000001\n",  # a line read without strip() must not pass
    "00000001000000000000000a",  # PostgreSQL writes upper case only
    "00000001000000000000000G",
    "pg_wal/000000010000000000000001",  # a path, not a file name
    "000000010000000000000001.PARTIAL",
    "000000010000000000000001.partial.partial",
    "000000010000000000000001.backup",  # no offset
    "000000010000000000000001.0000028.backup",  # 7-digit offset
    "000000010000000000000001.00000028.backup.partial",
    "00000001.history.partial",
    "0000001.history",
    "000000010000000000000001.history",
    "00000002.history\n",
    "RECOVERYXLOG",
    "RECOVERYHISTORY",
    "000000010000000000000001.ready",
    "archive_status",
]


@pytest.mark.parametrize("name", INVALID_NAMES)
def test_parse_rejects_invalid_names(name: str) -> None:
    with pytest.raises(WalNameError, match="is not a WAL file name"):
        WalFileName.parse(name)


def test_wal_name_error_is_a_value_error() -> None:
    assert issubclass(WalNameError, ValueError)


# Replay order: per timeline, history first, then by position; at one position the segment,
# then its backup history files, then the partial.
REPLAY_ORDER = [
    "000000010000000000000001",
    "000000010000000000000002",
    "000000010000000000000002.00000028.backup",
    "000000010000000000000002.00000F00.backup",
    "000000010000000000000003",
    "000000010000000000000003.partial",
    "0000000100000000000000FF",
    "000000010000000100000000",
    "000000010000000100000001",
    "00000002.history",
    "000000020000000000000003",
    "000000020000000000000004",
    "0000000A.history",
    "0000000A0000000000000001",
]


def test_sort_key_orders_files_for_replay() -> None:
    shuffled = REPLAY_ORDER[:]
    for seed in range(5):
        random.Random(seed).shuffle(shuffled)
        assert sorted(shuffled, key=walfile.sort_key) == REPLAY_ORDER


def test_sort_key_rejects_invalid_name() -> None:
    with pytest.raises(WalNameError):
        walfile.sort_key("RECOVERYXLOG")


def test_parsed_names_order_by_timeline_then_position() -> None:
    names = ["000000020000000000000001", "000000010000000100000000", "0000000100000000000000FF"]
    assert [w.name for w in sorted(WalFileName.parse(n) for n in names)] == [
        "0000000100000000000000FF",
        "000000010000000100000000",
        "000000020000000000000001",
    ]


# (segment size, name, segment number, start LSN)
SEGMENT_NUMBERS = [
    (16 * MiB, "000000010000000000000001", 1, 0x1000000),
    (16 * MiB, "0000000100000000000000FF", 255, 0xFF000000),
    (16 * MiB, "000000010000000100000000", 256, 0x100000000),
    (16 * MiB, "000000050000001200000034", 0x12 * 256 + 0x34, 0x1234000000),
    (MiB, "00000001000000000000000A", 10, 0xA00000),
    (MiB, "000000010000000100000000", 4096, 0x100000000),
    (MiB, "000000010000000100000FFF", 4096 + 4095, 0x1FFF00000),
    (1024 * MiB, "000000010000000100000003", 7, 0x1C0000000),
]


@pytest.mark.parametrize(("size", "name", "segno", "lsn"), SEGMENT_NUMBERS)
def test_segment_number_and_start_lsn(size: int, name: str, segno: int, lsn: int) -> None:
    w = WalFileName.parse(name)
    assert w.segment_number(size) == segno
    assert w.start_lsn(size) == lsn
    assert walfile.segment_name(w.timeline, segno, size) == name
    assert walfile.segment_for_lsn(w.timeline, lsn, size) == name


@pytest.mark.parametrize(
    ("size", "per_log"), [(MiB, 4096), (16 * MiB, 256), (64 * MiB, 64), (1024 * MiB, 4)]
)
def test_segments_per_log(size: int, per_log: int) -> None:
    assert walfile.segments_per_log(size) == per_log


# (timeline, LSN as PostgreSQL prints it, segment size, pg_walfile_name() of it)
# The first four were read from real servers (pg_walfile_name / backup history files).
LSN_TO_SEGMENT = [
    (1, "0/2000028", 16 * MiB, "000000010000000000000002"),
    (1, "0/3006098", 16 * MiB, "000000010000000000000003"),
    (1, "0/E78788", MiB, "00000001000000000000000E"),
    (2, "0/4000028", 16 * MiB, "000000020000000000000004"),
    (1, "0/0", 16 * MiB, "000000010000000000000000"),
    (1, "0/FFFFFF", 16 * MiB, "000000010000000000000000"),
    (1, "0/1000000", 16 * MiB, "000000010000000000000001"),
    (1, "0/FFFFFFFF", 16 * MiB, "0000000100000000000000FF"),
    (1, "1/0", 16 * MiB, "000000010000000100000000"),
    (3, "16/B374D848", 16 * MiB, "0000000300000016000000B3"),
    (3, "16/B374D848", MiB, "000000030000001600000B37"),
    (1, "FFFFFFFF/FFFFFFFF", 16 * MiB, "00000001FFFFFFFF000000FF"),
]


@pytest.mark.parametrize(("timeline", "lsn", "size", "name"), LSN_TO_SEGMENT)
def test_segment_for_lsn(timeline: int, lsn: str, size: int, name: str) -> None:
    assert walfile.segment_for_lsn(timeline, walfile.parse_lsn(lsn), size) == name


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("0/0", 0),
        ("0/16B3740", 0x16B3740),
        ("16/B374D848", 0x16B374D848),
        ("0/16b3740", 0x16B3740),  # pg_lsn input is case-insensitive
        ("FFFFFFFF/FFFFFFFF", 0xFFFFFFFFFFFFFFFF),
        (" 0/3006098\n", 0x3006098),  # as read from a file or psql output
    ],
)
def test_parse_lsn(text: str, value: int) -> None:
    assert walfile.parse_lsn(text) == value


@pytest.mark.parametrize(
    "text",
    [
        "",
        "16B3740",
        "0/",
        "/0",
        "0/xyz",
        "0/1/2",
        "0/100000000",  # the low half overflows 32 bits: pg_lsn refuses it
        "100000000/0",  # beyond 64 bits
        "-1/0",
        "+1/0",
        "0x1/0",
        "1_0/0",
        "0/1_0",
        "1 /0",
    ],
)
def test_parse_lsn_rejects_what_postgresql_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        walfile.parse_lsn(text)


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (0, "0/0"),
        (0x16B3740, "0/16B3740"),
        (0x16B374D848, "16/B374D848"),
        (0x100000000, "1/0"),
        (0xFFFFFFFFFFFFFFFF, "FFFFFFFF/FFFFFFFF"),
    ],
)
def test_format_lsn_prints_like_postgresql(value: int, text: str) -> None:
    assert walfile.format_lsn(value) == text
    assert walfile.parse_lsn(text) == value


def test_lsn_round_trip_random_values() -> None:
    rng = random.Random(15)
    for _round in range(500):
        value = rng.getrandbits(64)
        assert walfile.parse_lsn(walfile.format_lsn(value)) == value


@pytest.mark.parametrize(
    ("timeline", "name"),
    [(1, "00000001.history"), (2, "00000002.history"), (0x2A, "0000002A.history")],
)
def test_history_name(timeline: int, name: str) -> None:
    assert walfile.history_name(timeline) == name
    assert WalFileName.parse(name).timeline == timeline


# ---------------------------------------------------------------------------------------------
# page headers recorded from PostgreSQL 15


@pytest.mark.parametrize("name", sorted(wal_samples.HEADERS))
def test_long_page_header_of_real_segments(name: str) -> None:
    page, expected = wal_samples.HEADERS[name]
    header = walfile.parse_long_page_header(page)
    got = {field: getattr(header, field) for field in expected}
    assert got == expected
    assert header.pg_major == 15


def test_new_timeline_segment_keeps_the_old_timeline_in_its_header() -> None:
    # After promotion, PostgreSQL starts timeline 2 with a copy of timeline 1's last segment:
    # the header's timeline is not the file name's. Nothing may rely on them agreeing.
    header = walfile.parse_long_page_header(wal_samples.TL2_SEG3_PAGE)
    assert WalFileName.parse("000000020000000000000003").timeline == 2
    assert header.timeline == 1


def test_header_pageaddr_matches_the_segment_start() -> None:
    for name, (page, expected) in wal_samples.HEADERS.items():
        w = WalFileName.parse(name)
        header = walfile.parse_long_page_header(page)
        assert header.pageaddr == w.start_lsn(expected["segment_size"]), name


def test_header_of_whole_segment_equals_header_of_first_page() -> None:
    page, _unused = wal_samples.HEADERS["00000001000000000000000A"]
    whole = wal_samples.full_segment(page, MiB)
    assert len(whole) == MiB
    assert walfile.parse_long_page_header(whole) == walfile.parse_long_page_header(page)


def _with(page: bytes, offset: int, fmt: str, value: int) -> bytes:
    buf = bytearray(page)
    struct.pack_into(fmt, buf, offset, value)
    return bytes(buf)


REAL_PAGE = wal_samples.TL1_SEG2_PAGE


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "40-byte page header; got 0 bytes"),
        (REAL_PAGE[:39], "got 39 bytes"),
        (bytes(8192), "lacks the long-header flag"),
        (_with(REAL_PAGE, 2, "<H", 0x0000), "lacks the long-header flag"),
        (_with(REAL_PAGE, 2, "<H", 0x0001), "lacks the long-header flag"),
        (_with(REAL_PAGE, 0, "<H", 0x1234), "magic 0x1234 is not PostgreSQL WAL"),
        (_with(REAL_PAGE, 0, "<H", 0x10D1), "is not PostgreSQL WAL"),  # big-endian magic
        (b"PITRWAL1" + bytes(64), r"not (a WAL segment start|PostgreSQL WAL)"),
    ],
)
def test_parse_long_page_header_rejects_non_wal(data: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        walfile.parse_long_page_header(data)


def test_exactly_40_bytes_is_enough() -> None:
    assert walfile.LONG_HEADER_SIZE == 40
    header = walfile.parse_long_page_header(REAL_PAGE[:40])
    assert header.system_identifier == wal_samples.SYSID_A


@pytest.mark.parametrize(
    ("magic", "major"),
    [(0xD106, 13), (0xD10D, 14), (0xD110, 15), (0xD113, 16), (0xD116, 17), (0xD199, None)],
)
def test_pg_major_from_magic(magic: int, major: int | None) -> None:
    header = walfile.parse_long_page_header(_with(REAL_PAGE, 0, "<H", magic))
    assert header.pg_major == major


def test_system_identifier_from_real_pg_control() -> None:
    assert (
        walfile.read_system_identifier_from_control(wal_samples.PG_CONTROL_HEAD)
        == wal_samples.SYSID_A
    )
    assert walfile.read_system_identifier_from_control(wal_samples.PG_CONTROL_HEAD[:8]) == (
        wal_samples.SYSID_A
    )


def test_system_identifier_from_short_pg_control() -> None:
    with pytest.raises(ValueError, match="shorter than 8 bytes"):
        walfile.read_system_identifier_from_control(wal_samples.PG_CONTROL_HEAD[:7])

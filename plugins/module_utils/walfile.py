# Copyright: contributors to pitr.postgresql
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""WAL file names and WAL page headers.

PostgreSQL names archived files in four shapes (``src/include/access/xlog_internal.h``):

- segment:  ``TTTTTTTTXXXXXXXXYYYYYYYY`` (timeline, log, seg; 24 upper-case hex digits)
- partial:  the segment name plus ``.partial`` (the last, incomplete segment of a timeline
  that was promoted away from)
- backup:   the segment name plus ``.XXXXXXXX.backup`` (backup history file)
- history:  ``TTTTTTTT.history`` (timeline history file)

Standard library only: the host command imports this file once per archived segment.
"""

from __future__ import annotations

import struct

from ansible_collections.pitr.postgresql.plugins.module_utils.lean_types import NamedTuple

SEGMENT = "segment"
PARTIAL = "partial"
BACKUP = "backup"
HISTORY = "history"

# Names are parsed by hand, not with regular expressions: compiling them cost the host command
# about 1 ms of CPU per archived segment. Only upper-case hex digits, as PostgreSQL writes them.
_UPPER_HEX = "0123456789ABCDEF"


def _upper_hex(text: str) -> bool:
    return bool(text) and not text.strip(_UPPER_HEX)


DEFAULT_SEGMENT_SIZE = 16 * 1024 * 1024

# XLOG_PAGE_MAGIC per major version: the WAL format changes with each major release.
XLOG_PAGE_MAGIC_BY_MAJOR = {
    13: 0xD106,
    14: 0xD10D,
    15: 0xD110,
    16: 0xD113,
    17: 0xD116,
    18: 0xD118,
}
MAJOR_BY_XLOG_PAGE_MAGIC = {magic: major for major, magic in XLOG_PAGE_MAGIC_BY_MAJOR.items()}

XLP_LONG_HEADER = 0x0002
# XLogLongPageHeaderData: magic u16, info u16, tli u32, pageaddr u64, rem_len u32, pad 4,
# sysid u64, seg_size u32, xlog_blcksz u32 (40 bytes, little-endian on the platforms we run).
_LONG_HEADER = struct.Struct("<HHIQI4xQII")
LONG_HEADER_SIZE = _LONG_HEADER.size


class WalNameError(ValueError):
    """The string is not a WAL file name PostgreSQL would archive."""


# NamedTuple, not dataclass: dataclasses imports inspect, which costs the host command
# ~15 ms of CPU per archived segment (and lean_types' NamedTuple, not typing's: see there).
class WalFileName(NamedTuple):
    """A parsed archived-file name. Orders by timeline, then position, then kind."""

    timeline: int
    log: int
    seg: int
    kind: str
    name: str
    backup_offset: int = 0

    @classmethod
    def parse(cls, name: str) -> WalFileName:
        """Parse ``name`` (a bare file name, no directory) or raise WalNameError."""
        # Exact lengths and suffixes: nothing may trail a name (not even "\n").
        if len(name) >= 24 and _upper_hex(name[:24]):
            tli, log, seg = int(name[:8], 16), int(name[8:16], 16), int(name[16:24], 16)
            rest = name[24:]
            if not rest:
                return cls(tli, log, seg, SEGMENT, name)
            if rest == ".partial":
                return cls(tli, log, seg, PARTIAL, name)
            if (
                len(rest) == 16
                and rest[0] == "."
                and rest[9:] == ".backup"
                and _upper_hex(rest[1:9])
            ):
                return cls(tli, log, seg, BACKUP, name, int(rest[1:9], 16))
        elif len(name) == 16 and name[8:] == ".history" and _upper_hex(name[:8]):
            return cls(int(name[:8], 16), 0, 0, HISTORY, name)
        raise WalNameError(
            f"{name!r} is not a WAL file name: expected 24 hex digits (a segment), optionally "
            "followed by .partial or .XXXXXXXX.backup, or TTTTTTTT.history"
        )

    @property
    def segment_name(self) -> str:
        """The 24-character segment name this file belongs to (history files: empty)."""
        if self.kind == HISTORY:
            return ""
        return self.name[:24]

    def segment_number(self, segment_size: int = DEFAULT_SEGMENT_SIZE) -> int:
        """Position of the segment in the WAL stream (independent of timeline)."""
        return self.log * segments_per_log(segment_size) + self.seg

    def start_lsn(self, segment_size: int = DEFAULT_SEGMENT_SIZE) -> int:
        """The LSN at which this segment begins."""
        return self.segment_number(segment_size) * segment_size


def segments_per_log(segment_size: int = DEFAULT_SEGMENT_SIZE) -> int:
    """How many segments share one 'log' id (the middle 8 hex digits)."""
    return 0x100000000 // segment_size


def segment_name(timeline: int, segno: int, segment_size: int = DEFAULT_SEGMENT_SIZE) -> str:
    """Build a segment file name from a timeline and a segment number."""
    per = segments_per_log(segment_size)
    return f"{timeline:08X}{segno // per:08X}{segno % per:08X}"


def segment_for_lsn(timeline: int, lsn: int, segment_size: int = DEFAULT_SEGMENT_SIZE) -> str:
    """The segment file that holds ``lsn`` on ``timeline``."""
    return segment_name(timeline, lsn // segment_size, segment_size)


def parse_lsn(text: str) -> int:
    """Parse PostgreSQL's ``X/Y`` LSN notation (each half 1-8 hex digits, as pg_lsn does)."""
    import re  # not at the top: the host command never parses an LSN (re caches the pattern)

    m = re.fullmatch(r"([0-9A-Fa-f]{1,8})/([0-9A-Fa-f]{1,8})", text.strip())
    if not m:
        raise ValueError(f"{text!r} is not an LSN: expected the form 0/16B3740")
    return (int(m[1], 16) << 32) | int(m[2], 16)


def format_lsn(lsn: int) -> str:
    """Format an LSN as PostgreSQL prints it."""
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def history_name(timeline: int) -> str:
    """The name of a timeline's history file."""
    return f"{timeline:08X}.history"


class WalPageHeader(NamedTuple):
    """The long page header at the start of every WAL segment."""

    magic: int
    info: int
    timeline: int
    pageaddr: int
    system_identifier: int
    segment_size: int
    block_size: int

    @property
    def pg_major(self) -> int | None:
        """The PostgreSQL major version that writes this WAL format, if known."""
        return MAJOR_BY_XLOG_PAGE_MAGIC.get(self.magic)


def parse_long_page_header(data: bytes) -> WalPageHeader:
    """Parse the first page header of a WAL segment; raise ValueError if it is not one."""
    if len(data) < LONG_HEADER_SIZE:
        raise ValueError(
            f"a WAL segment starts with a {LONG_HEADER_SIZE}-byte page header;"
            f" got {len(data)} bytes"
        )
    magic, info, tli, pageaddr, _rem, sysid, seg_size, blcksz = _LONG_HEADER.unpack_from(data)
    if not info & XLP_LONG_HEADER:
        raise ValueError("the first WAL page lacks the long-header flag: not a WAL segment start")
    if magic & 0xFF00 != 0xD100:
        raise ValueError(f"WAL page magic {magic:#06x} is not PostgreSQL WAL")
    return WalPageHeader(magic, info, tli, pageaddr, sysid, seg_size, blcksz)


def read_system_identifier_from_control(pg_control: bytes) -> int:
    """The system identifier: the first 8 bytes of ``global/pg_control``."""
    if len(pg_control) < 8:
        raise ValueError("global/pg_control is shorter than 8 bytes")
    return int(struct.unpack_from("<Q", pg_control)[0])


def sort_key(name: str) -> tuple[int, int, int, int, str]:
    """A key that orders archived file names the way WAL is replayed."""
    w = WalFileName.parse(name)
    order = {HISTORY: 0, SEGMENT: 1, BACKUP: 2, PARTIAL: 3}[w.kind]
    return (w.timeline, w.log, w.seg, order, name)

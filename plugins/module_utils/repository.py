# Copyright: contributors to pitr.postgresql
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The repository: the one owner of the layout on top of a storage backend.

Layout (keys in the storage)::

    pitr-repository.json                      identity: system identifier, major, segment size
    wal/history/TTTTTTTT.history              timeline history files
    wal/TTTTTTTTLLLLLLLL/<name>               segments, .partial and .backup files
    backups/<label>/...                       base backups (files and backup.json catalog record)
    staging/backups/<label>/                  a base backup being taken (POSIX: renamed into
                                              backups/<label>/ when complete)
    dumps/<label>/...                         logical dumps (files and dump.json catalog record)
    staging/dumps/<label>/                    a logical dump being written (POSIX: renamed into
                                              dumps/<label>/ with its record when complete)
    pins/<kind>/<label>.json                  retention pins (kind: backups or dumps): a pinned
                                              backup or dump is never pruned
    leases/restore/<id>.json                  restore leases (restore_lease.py): a restore in
                                              progress; a prune keeps its backup and WAL
    locks/<name>.lock                         named locks (storage-level)

Every archived WAL file is one object: an envelope (magic, header length, JSON header)
followed by the compressed bytes. The checksums travel with the data, so an object store's
atomic PUT keeps them together. Two envelope versions exist; fetch reads both:

- version 1 (magic ``PITRWAL1``): the header records the SHA-256 of the original bytes.
  Written by earlier releases; still read (fetch, duplicate checks), no longer written.
- version 2 (magic ``PITRWAL2``, written now): the header records the SHA-256 of the stored
  (compressed) bytes, and every compressed frame carries the codec's own checksum of the
  original bytes (zstd XXH64, lz4 XXH32, gzip CRC-32), which decompression verifies; with
  ``none`` the stored bytes are the original ones. Damage in storage fails the SHA-256; a
  codec that got the content wrong fails its frame checksum. The push no longer hashes the
  whole 16 MiB segment with SHA-256, only the (about 6x smaller) stored bytes.

Standard library only.
"""

from __future__ import annotations

import hashlib
import struct
import time

from ansible_collections.pitr.postgresql.plugins.module_utils import compression
from ansible_collections.pitr.postgresql.plugins.module_utils.errors import (
    IdentityMismatchError,
    IntegrityError,
    ObjectExistsError,
    RepositoryError,
)
from ansible_collections.pitr.postgresql.plugins.module_utils.lean_types import NamedTuple
from ansible_collections.pitr.postgresql.plugins.module_utils.storage import (
    ObjectInfo,
    PosixStorage,
    Storage,
)
from ansible_collections.pitr.postgresql.plugins.module_utils.walfile import (
    HISTORY,
    WalFileName,
    WalNameError,
    sort_key,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    import typing as t

IDENTITY_KEY = "pitr-repository.json"
REPOSITORY_FORMAT = 1
WAL_PREFIX = "wal"
BACKUP_PREFIX = "backups"
DUMP_PREFIX = "dumps"
PIN_PREFIX = "pins"
STAGING_PREFIX = "staging"
ENVELOPE_MAGIC_V1 = b"PITRWAL1"
ENVELOPE_MAGIC = b"PITRWAL2"  # what put_wal writes
_MAGIC_LEN = len(ENVELOPE_MAGIC)
_LEN = struct.Struct(">I")
_MAX_HEADER = 64 * 1024


class RepositoryIdentity(NamedTuple):
    """The cluster a repository belongs to."""

    system_identifier: int
    pg_major: int
    wal_segment_size: int

    def describe(self) -> str:
        return (
            f"system identifier {self.system_identifier}, PostgreSQL {self.pg_major},"
            f" WAL segment size {self.wal_segment_size}"
        )


class WalObjectHeader(NamedTuple):
    """The envelope header of one archived WAL file."""

    name: str
    size: int
    sha256: str  # version 1: of the original bytes; version 2: "" (not recorded)
    codec: str
    stored_size: int
    version: int = 1
    stored_sha256: str = ""  # version 2: of the stored bytes


def wal_key(name: str) -> str:
    """The storage key of an archived WAL file name (validated)."""
    w = WalFileName.parse(name)
    if w.kind == HISTORY:
        return f"{WAL_PREFIX}/history/{name}"
    return f"{WAL_PREFIX}/{name[:16]}/{name}"


def encode_wal_object(name: str, data: bytes, codec: str, level: int | None = None) -> bytes:
    """Build the stored object (envelope version 2) for ``data`` with ``codec`` (resolved)."""
    return b"".join(encode_wal_parts(name, data, codec, level))


def encode_wal_parts(
    name: str, data: bytes, codec: str, level: int | None = None
) -> tuple[bytes, bytes]:
    """The stored object (envelope version 2) as its head (magic, length, header) and payload."""
    if codec not in compression.CODECS:
        raise ValueError(f"unknown codec {codec!r}")
    WalFileName.parse(name)  # the name goes into the header verbatim: only valid names
    payload = compression.compress(data, codec, level)
    if codec != "none" and not compression.has_content_checksum(payload, codec):
        raise IntegrityError(f"the {codec} codec wrote a frame without a content checksum")
    # The header is JSON (sorted keys, as json.dumps writes it) built by hand: every value is
    # a validated name, a known codec, an integer or hex digits, so nothing needs escaping,
    # and the push path does not import json.
    raw = (
        f'{{"codec": "{codec}", "name": "{name}", "size": {len(data)},'
        f' "stored_sha256": "{hashlib.sha256(payload).hexdigest()}",'
        f' "stored_size": {len(payload)}, "v": 2}}'
    ).encode()
    return b"".join((ENVELOPE_MAGIC, _LEN.pack(len(raw)), raw)), payload


def decode_wal_header(blob: bytes, key: str = "") -> tuple[WalObjectHeader, int]:
    """Parse an envelope's header (version 1 or 2); return it and the payload offset."""
    magic = bytes(blob[:_MAGIC_LEN])
    if magic not in (ENVELOPE_MAGIC, ENVELOPE_MAGIC_V1) or len(blob) < _MAGIC_LEN + 4:
        raise IntegrityError(
            f"{key or 'object'} is not a pitr.postgresql WAL object (bad magic or truncated)",
            key=key,
        )
    (hlen,) = _LEN.unpack_from(blob, _MAGIC_LEN)
    start = _MAGIC_LEN + 4
    if hlen > _MAX_HEADER or len(blob) < start + hlen:
        raise IntegrityError(f"{key or 'object'} has a truncated header", key=key)
    import json

    try:
        h = json.loads(bytes(blob[start : start + hlen]))
        if magic == ENVELOPE_MAGIC_V1:
            header = WalObjectHeader(
                str(h["name"]),
                int(h["size"]),
                str(h["sha256"]),
                str(h["codec"]),
                int(h["stored_size"]),
            )
        else:
            if h["v"] != 2:
                raise ValueError(f"envelope version {h['v']!r} under version 2's magic")
            header = WalObjectHeader(
                str(h["name"]),
                int(h["size"]),
                "",
                str(h["codec"]),
                int(h["stored_size"]),
                2,
                str(h["stored_sha256"]),
            )
    except (ValueError, KeyError, TypeError) as exc:
        raise IntegrityError(f"{key or 'object'} has an unreadable header: {exc}", key=key) from exc
    return header, start + hlen


def decode_wal_object(blob: bytes, key: str = "") -> tuple[WalObjectHeader, bytes]:
    """Verify and decompress a stored WAL object; IntegrityError on any mismatch."""
    header, offset = decode_wal_header(blob, key)
    payload = memoryview(blob)[offset:]
    if len(payload) != header.stored_size:
        raise IntegrityError(
            f"{key} is truncated or padded: {len(payload)} stored bytes, header says"
            f" {header.stored_size}",
            key=key,
        )
    if header.version == 2:
        digest = hashlib.sha256(payload).hexdigest()
        if digest != header.stored_sha256:
            raise IntegrityError(
                f"{key}: the archived copy fails its checksum (sha256 of the stored bytes"
                f" {digest}, recorded {header.stored_sha256}): it is corrupt",
                key=key,
            )
    try:
        data = compression.decompress(bytes(payload), header.codec, header.size)
    except compression.CompressionError as exc:
        raise IntegrityError(f"{key}: {exc.msg}", key=key) from exc
    if len(data) != header.size:
        raise IntegrityError(
            f"{key} decompresses to {len(data)} bytes, expected {header.size}", key=key
        )
    # Decompression verified the frame's checksum of the content, if the frame has one:
    # version 2 objects always do, so a frame without one is damage, not a choice.
    if (
        header.version == 2
        and header.codec != "none"
        and not compression.has_content_checksum(payload, header.codec)
    ):
        raise IntegrityError(
            f"{key}: its {header.codec} data carries no content checksum, which version 2"
            " objects always have: the archived copy is damaged",
            key=key,
        )
    if header.version == 1:
        digest = hashlib.sha256(data).hexdigest()
        if digest != header.sha256:
            raise IntegrityError(
                f"{key} fails its checksum (sha256 {digest}, recorded {header.sha256}): the"
                " archived copy is corrupt",
                key=key,
            )
    return header, data


_JSON_SPACE = " \t\n\r"


def load_record(raw: bytes) -> t.Any:
    """``json.loads(raw)``, without importing json for the flat records the push path reads.

    The identity record is a flat object of integers and plain strings; such text is parsed
    here (importing json costs the host command about 2 ms of CPU per segment). Anything else
    (nesting, escapes, floats, literals, odd whitespace) goes to json.loads, so the result is
    always what json.loads returns, or its error.
    """
    record = _flat_record(raw)
    if record is None:
        import json

        return json.loads(raw)
    return record


def _flat_record(raw: bytes) -> dict[str, t.Any] | None:
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        return None
    if "\\" in text or any(c < " " and c not in _JSON_SPACE for c in text):
        return None
    text = text.strip(_JSON_SPACE)
    if len(text) < 2 or text[0] != "{" or text[-1] != "}":
        return None
    record: dict[str, t.Any] = {}
    body = text[1:-1].strip(_JSON_SPACE)
    if not body:
        return record
    for item in body.split(","):
        key, colon, value = item.partition(":")
        key, value = key.strip(_JSON_SPACE), value.strip(_JSON_SPACE)
        if not colon or not _plain_string(key):
            return None
        if value[:1] == '"':
            if not _plain_string(value):
                return None
            record[key[1:-1]] = value[1:-1]
            continue
        digits = value[1:] if value.startswith("-") else value
        if not digits.isdigit() or not digits.isascii() or (len(digits) > 1 and digits[0] == "0"):
            return None
        record[key[1:-1]] = int(value)
    return record


def _plain_string(text: str) -> bool:
    """A JSON string without escapes or control characters (which JSON forbids raw)."""
    inner = text[1:-1]
    return (
        len(text) >= 2
        and text[0] == text[-1] == '"'
        and '"' not in inner
        and all(c >= " " for c in inner)
    )


class Repository:
    """Layout and identity of one repository on one storage backend."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage

    @classmethod
    def open_posix(cls, path: str) -> Repository:
        return cls(PosixStorage(path))

    def describe(self) -> str:
        return self.storage.describe()

    # identity -------------------------------------------------------------------------
    def identity(self) -> RepositoryIdentity | None:
        """The recorded identity, or None for a repository not used yet."""
        if self.storage.stat(IDENTITY_KEY) is None:
            return None
        try:
            rec = load_record(self.storage.get(IDENTITY_KEY))
            return RepositoryIdentity(
                int(rec["system_identifier"]), int(rec["pg_major"]), int(rec["wal_segment_size"])
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise RepositoryError(
                f"{IDENTITY_KEY} in {self.describe()} is unreadable ({exc}); restore it from a"
                " copy or recreate it with `pitr-wal init`",
            ) from exc

    def ensure_identity(self, wanted: RepositoryIdentity) -> tuple[RepositoryIdentity, bool]:
        """Record ``wanted`` on first use; otherwise check it. Returns (identity, created)."""
        current = self.identity()
        created = False
        if current is None:
            rec: dict[str, t.Any] = wanted._asdict()
            rec.update(
                format=REPOSITORY_FORMAT,
                created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            )
            import json

            try:
                self.storage.put(IDENTITY_KEY, json.dumps(rec, indent=2).encode() + b"\n")
                created = True
            except ObjectExistsError:
                pass  # another process initialised it first: check against theirs
            current = self.identity()
            if current is None:
                raise RepositoryError(f"{IDENTITY_KEY} vanished from {self.describe()}")
        self.check_identity(wanted, current)
        return current, created

    def check_identity(
        self, wanted: RepositoryIdentity, current: RepositoryIdentity | None = None
    ) -> None:
        current = current or self.identity()
        if current is None:
            return
        problems = []
        if wanted.system_identifier != current.system_identifier:
            problems.append(
                f"system identifier {wanted.system_identifier} is not the repository's"
                f" {current.system_identifier}"
            )
        if wanted.pg_major and wanted.pg_major != current.pg_major:
            problems.append(
                f"PostgreSQL {wanted.pg_major} is not the repository's {current.pg_major}"
            )
        if wanted.wal_segment_size and wanted.wal_segment_size != current.wal_segment_size:
            problems.append(
                f"WAL segment size {wanted.wal_segment_size} is not the repository's"
                f" {current.wal_segment_size}"
            )
        if problems:
            raise IdentityMismatchError(
                f"this repository ({self.describe()}) belongs to another cluster: "
                + "; ".join(problems)
                + ". Two clusters must never share an archive: give this cluster its own"
                " repository (after a major upgrade or a new initdb, a new repository).",
                repository=self.describe(),
                repository_identity=current._asdict(),
                cluster_identity=wanted._asdict(),
            )

    # WAL --------------------------------------------------------------------------------
    def wal_stat(self, name: str) -> ObjectInfo | None:
        return self.storage.stat(wal_key(name))

    def wal_header(self, name: str) -> WalObjectHeader | None:
        """The header of an archived file, or None when it is not archived."""
        key = wal_key(name)
        if self.storage.stat(key) is None:
            return None
        return decode_wal_header(self.storage.get(key), key)[0]

    def put_wal(self, name: str, data: bytes, codec: str, level: int | None = None) -> int:
        """Store an archived file; ObjectExistsError if that name is already stored."""
        blob = encode_wal_object(name, data, codec, level)
        self.storage.put(wal_key(name), blob)
        return len(blob)

    def get_wal(self, name: str) -> tuple[WalObjectHeader, bytes]:
        """Read, decompress and verify an archived file."""
        key = wal_key(name)
        return decode_wal_object(self.storage.get(key), key)

    def delete_wal(self, name: str) -> None:
        self.storage.delete(wal_key(name))

    def list_wal(self) -> list[tuple[WalFileName, ObjectInfo]]:
        """Every archived WAL file, in replay order."""
        found = []
        for info in self.storage.list(WAL_PREFIX):
            name = info.key.rsplit("/", 1)[-1]
            try:
                found.append((sort_key(name), WalFileName.parse(name), info))
            except WalNameError:
                continue
        found.sort(key=lambda x: x[0])
        return [(entry[1], entry[2]) for entry in found]

    def wal_summary(self) -> dict[str, t.Any]:
        """Counts and bounds per timeline, for reports."""
        timelines: dict[str, dict[str, t.Any]] = {}
        total_files = 0
        total_bytes = 0
        history = []
        for w, info in self.list_wal():
            total_files += 1
            total_bytes += info.size
            if w.kind == HISTORY:
                history.append(w.name)
                continue
            tl = timelines.setdefault(
                f"{w.timeline:08X}",
                {
                    "segments": 0,
                    "partial": 0,
                    "backup_files": 0,
                    "bytes": 0,
                    "oldest": None,
                    "newest": None,
                },
            )
            tl["bytes"] += info.size
            if w.kind == "segment":
                tl["segments"] += 1
                tl["oldest"] = tl["oldest"] or w.name
                tl["newest"] = w.name
            elif w.kind == "partial":
                tl["partial"] += 1
            else:
                tl["backup_files"] += 1
        return {
            "files": total_files,
            "bytes": total_bytes,
            "timelines": timelines,
            "history_files": history,
        }

    # backups and dumps: key builders, so nothing else spells the layout -------------------
    @staticmethod
    def backup_prefix(label: str) -> str:
        return f"{BACKUP_PREFIX}/{label}"

    @staticmethod
    def backup_record_key(label: str) -> str:
        return f"{BACKUP_PREFIX}/{label}/backup.json"

    @staticmethod
    def backup_staging_prefix(label: str) -> str:
        """Where a base backup is written while it is taken (never read by restore)."""
        return f"{STAGING_PREFIX}/{BACKUP_PREFIX}/{label}"

    @staticmethod
    def backup_progress_key(label: str) -> str:
        """Progress of a base backup being taken (JSON, rewritten while it runs)."""
        return f"{STAGING_PREFIX}/{BACKUP_PREFIX}/{label}.progress.json"

    @staticmethod
    def dump_prefix(label: str) -> str:
        return f"{DUMP_PREFIX}/{label}"

    @staticmethod
    def dump_record_key(label: str) -> str:
        return f"{DUMP_PREFIX}/{label}/dump.json"

    @staticmethod
    def dump_staging_prefix(label: str) -> str:
        """Where a logical dump is written while it is taken (never read by restore)."""
        return f"{STAGING_PREFIX}/{DUMP_PREFIX}/{label}"

    @staticmethod
    def pin_prefix(kind: str) -> str:
        """Where the retention pins of ``kind`` (``backups`` or ``dumps``) are kept."""
        return f"{PIN_PREFIX}/{kind}"

    @staticmethod
    def pin_key(kind: str, label: str) -> str:
        """The pin of one backup or dump: while it exists, retention never removes it.

        Kept outside ``backups/<label>/``, so that a backup's own files (which
        ``pg_verifybackup`` compares with the manifest) never change.
        """
        return f"{PIN_PREFIX}/{kind}/{label}.json"

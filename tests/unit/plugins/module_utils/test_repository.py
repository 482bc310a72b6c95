# Copyright: contributors to pitr.postgresql
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Repository layout, the WAL object envelope (and its corruption cases), and identity."""

from __future__ import annotations

import hashlib
import json
import struct
import typing as t
from pathlib import Path

import pytest

from ansible_collections.pitr.postgresql.plugins.module_utils import compression
from ansible_collections.pitr.postgresql.plugins.module_utils import repository as repo_mod
from ansible_collections.pitr.postgresql.plugins.module_utils.errors import (
    IdentityMismatchError,
    IntegrityError,
    ObjectExistsError,
    ObjectNotFoundError,
    RepositoryError,
)
from ansible_collections.pitr.postgresql.plugins.module_utils.repository import (
    ENVELOPE_MAGIC,
    IDENTITY_KEY,
    Repository,
    RepositoryIdentity,
    decode_wal_header,
    decode_wal_object,
    encode_wal_object,
    wal_key,
)
from ansible_collections.pitr.postgresql.plugins.module_utils.walfile import WalNameError
from tests.support import wal_samples
from tests.support.memory_storage import MemoryStorage

MiB = 1024 * 1024
SEG = "000000010000000000000002"
SEG_DATA = wal_samples.full_segment(wal_samples.TL1_SEG2_PAGE)
IDENT_A = RepositoryIdentity(wal_samples.SYSID_A, 15, 16 * MiB)
CODECS = [c for c in compression.CODECS if compression.available(c)]


@pytest.fixture
def mem() -> MemoryStorage:
    return MemoryStorage()


@pytest.fixture
def repo(mem: MemoryStorage) -> Repository:
    return Repository(mem)


# ---------------------------------------------------------------------------------------------
# layout


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("000000010000000000000001", "wal/0000000100000000/000000010000000000000001"),
        ("0000000100000001000000A0", "wal/0000000100000001/0000000100000001000000A0"),
        ("000000020000000000000003", "wal/0000000200000000/000000020000000000000003"),
        (
            "000000010000000000000003.partial",
            "wal/0000000100000000/000000010000000000000003.partial",
        ),
        (wal_samples.BACKUP_NAME, f"wal/0000000100000000/{wal_samples.BACKUP_NAME}"),
        ("00000002.history", "wal/history/00000002.history"),
    ],
)
def test_wal_key_layout(name: str, key: str) -> None:
    assert wal_key(name) == key


@pytest.mark.parametrize("name", ["RECOVERYXLOG", "../../etc/passwd", "00000001", "", "a/b"])
def test_wal_key_refuses_non_wal_names(name: str) -> None:
    with pytest.raises(WalNameError):
        wal_key(name)


def test_partial_and_full_segment_have_distinct_keys() -> None:
    assert wal_key("000000010000000000000003") != wal_key("000000010000000000000003.partial")


def test_backup_and_dump_keys() -> None:
    assert Repository.backup_prefix("b1") == "backups/b1"
    assert Repository.backup_record_key("b1") == "backups/b1/backup.json"
    assert Repository.dump_prefix("d1") == "dumps/d1"


# ---------------------------------------------------------------------------------------------
# the envelope


@pytest.mark.parametrize("codec", CODECS)
def test_envelope_round_trip(codec: str) -> None:
    blob = encode_wal_object(SEG, SEG_DATA, codec)
    assert blob.startswith(ENVELOPE_MAGIC)
    header, data = decode_wal_object(blob, "k")
    assert data == SEG_DATA
    assert header.name == SEG
    assert header.size == 16 * MiB
    assert header.sha256 == hashlib.sha256(SEG_DATA).hexdigest()
    assert header.codec == codec
    assert header.stored_size == len(blob) - len(ENVELOPE_MAGIC) - 4 - _header_len(blob)


def _header_len(blob: bytes) -> int:
    return int(struct.unpack_from(">I", blob, len(ENVELOPE_MAGIC))[0])


def _header_json(blob: bytes) -> dict[str, t.Any]:
    start = len(ENVELOPE_MAGIC) + 4
    return dict(json.loads(blob[start : start + _header_len(blob)]))


def _with_header(blob: bytes, **changes: t.Any) -> bytes:
    start = len(ENVELOPE_MAGIC) + 4
    payload = blob[start + _header_len(blob) :]
    header = _header_json(blob)
    header.update(changes)
    for key in [k for k, v in changes.items() if v is None]:
        del header[key]
    raw = json.dumps(header).encode()
    return ENVELOPE_MAGIC + struct.pack(">I", len(raw)) + raw + payload


def test_envelope_header_is_json_with_the_documented_fields() -> None:
    blob = encode_wal_object(SEG, b"abc", "none")
    assert _header_json(blob) == {
        "v": 1,
        "name": SEG,
        "size": 3,
        "sha256": hashlib.sha256(b"abc").hexdigest(),
        "codec": "none",
        "stored_size": 3,
    }
    assert blob.endswith(b"abc")


def test_envelope_accepts_a_precomputed_digest() -> None:
    digest = hashlib.sha256(SEG_DATA).hexdigest()
    blob = encode_wal_object(SEG, SEG_DATA, "none", None, digest)
    assert decode_wal_object(blob, "k")[1] == SEG_DATA


def test_decode_header_only_does_not_verify_the_payload() -> None:
    blob = encode_wal_object(SEG, b"abc", "none")
    header, offset = decode_wal_header(blob[:-1] + b"X", "k")
    assert (header.name, header.size, offset) == (SEG, 3, len(blob) - 3)


BLOB = encode_wal_object(SEG, SEG_DATA, "zstd" if "zstd" in CODECS else "gzip")
PLAIN = encode_wal_object(SEG, wal_samples.TL1_SEG2_PAGE, "none")


def _flip(blob: bytes, offset: int) -> bytes:
    b = bytearray(blob)
    b[offset] ^= 0x01
    return bytes(b)


CORRUPTIONS = {
    "empty": (b"", "bad magic or truncated"),
    "magic only": (ENVELOPE_MAGIC, "bad magic or truncated"),
    "magic and 2 bytes": (ENVELOPE_MAGIC + b"\x00\x00", "bad magic or truncated"),
    "other magic": (b"PITRWAL2" + BLOB[8:], "bad magic or truncated"),
    "a raw WAL segment": (wal_samples.TL1_SEG2_PAGE, "bad magic or truncated"),
    "header length beyond the blob": (
        ENVELOPE_MAGIC + struct.pack(">I", 1000) + b"{}",
        "truncated header",
    ),
    "absurd header length": (
        ENVELOPE_MAGIC + struct.pack(">I", 0xFFFFFFFF) + BLOB[12:],
        "truncated header",
    ),
    "header not JSON": (
        ENVELOPE_MAGIC + struct.pack(">I", 5) + b"nope!" + b"payload",
        "unreadable header",
    ),
    "header a JSON list": (
        ENVELOPE_MAGIC + struct.pack(">I", 2) + b"[]",
        "unreadable header",
    ),
    "header without sha256": (_with_header(PLAIN, sha256=None), "unreadable header"),
    "size not a number": (_with_header(PLAIN, size="big"), "unreadable header"),
    "truncated payload": (BLOB[:-10], "truncated or padded"),
    "padded payload": (BLOB + b"\x00", "truncated or padded"),
    "flipped payload byte (compressed)": (
        _flip(BLOB, len(BLOB) - 40),
        r"does not decompress|checksum|decompresses to",
    ),
    "flipped payload byte (none)": (_flip(PLAIN, len(PLAIN) - 100), "fails its checksum"),
    "recorded sha256 altered": (
        _with_header(PLAIN, sha256=hashlib.sha256(b"other").hexdigest()),
        "fails its checksum",
    ),
    "recorded size larger": (
        _with_header(PLAIN, size=len(wal_samples.TL1_SEG2_PAGE) + 1),
        "decompresses to 8192 bytes, expected 8193",
    ),
    "recorded codec unknown": (_with_header(PLAIN, codec="brotli"), "unknown compression"),
    "recorded codec wrong": (_with_header(PLAIN, codec="gzip"), "does not decompress"),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_corrupt_envelopes_raise_integrity_error(case: str) -> None:
    blob, message = CORRUPTIONS[case]
    with pytest.raises(IntegrityError, match=message) as exc:
        decode_wal_object(blob, "wal/0000000100000000/" + SEG)
    assert exc.value.context["key"] == "wal/0000000100000000/" + SEG


def test_every_single_byte_flip_in_a_small_envelope_is_caught() -> None:
    blob = encode_wal_object(SEG, b"0123456789" * 20, "none")
    header_end = len(ENVELOPE_MAGIC) + 4 + _header_len(blob)
    for offset in range(len(blob)):
        damaged = _flip(blob, offset)
        try:
            _unused, data = decode_wal_object(damaged, "k")
        except IntegrityError:
            continue
        # A flip inside the JSON may keep it valid only where it changes nothing verified
        # (the "v" value, whitespace): the data must still be the original.
        assert offset < header_end, offset
        assert data == b"0123456789" * 20, offset


# ---------------------------------------------------------------------------------------------
# WAL objects in a repository


def test_put_get_wal_round_trip(repo: Repository, mem: MemoryStorage) -> None:
    stored = repo.put_wal(SEG, SEG_DATA, "none")
    key = wal_key(SEG)
    assert list(mem.objects) == [key]
    assert stored == len(mem.objects[key])
    header, data = repo.get_wal(SEG)
    assert data == SEG_DATA and header.name == SEG
    assert repo.wal_header(SEG) == header
    info = repo.wal_stat(SEG)
    assert info is not None and info.size == stored


def test_put_wal_never_overwrites(repo: Repository, mem: MemoryStorage) -> None:
    repo.put_wal(SEG, SEG_DATA, "none")
    before = mem.objects[wal_key(SEG)]
    with pytest.raises(ObjectExistsError):
        repo.put_wal(SEG, b"different", "none")
    assert mem.objects[wal_key(SEG)] == before


def test_missing_wal(repo: Repository) -> None:
    assert repo.wal_header(SEG) is None
    assert repo.wal_stat(SEG) is None
    with pytest.raises(ObjectNotFoundError):
        repo.get_wal(SEG)


def test_get_wal_detects_corruption_in_storage(repo: Repository, mem: MemoryStorage) -> None:
    repo.put_wal(SEG, SEG_DATA, "none")
    mem.corrupt(wal_key(SEG), -5)
    with pytest.raises(IntegrityError, match="fails its checksum"):
        repo.get_wal(SEG)


def test_delete_wal(repo: Repository) -> None:
    repo.put_wal(SEG, b"x", "none")
    repo.delete_wal(SEG)
    assert repo.wal_header(SEG) is None


def test_list_wal_in_replay_order_and_ignores_strangers(
    repo: Repository, mem: MemoryStorage
) -> None:
    names = [
        "000000020000000000000004",
        "00000002.history",
        "000000010000000000000003.partial",
        "000000010000000000000002",
        wal_samples.BACKUP_NAME,
        "000000010000000000000001",
        "000000020000000000000003",
    ]
    for n in names:
        repo.put_wal(n, n.encode(), "none")
    mem.put("wal/0000000100000000/notes.txt", b"x")
    mem.put(IDENTITY_KEY, b"{}")
    assert [entry[0].name for entry in repo.list_wal()] == [
        "000000010000000000000001",
        "000000010000000000000002",
        wal_samples.BACKUP_NAME,
        "000000010000000000000003.partial",
        "00000002.history",
        "000000020000000000000003",
        "000000020000000000000004",
    ]


def test_wal_summary_counts(repo: Repository) -> None:
    for n in [
        "000000010000000000000001",
        "000000010000000000000002",
        wal_samples.BACKUP_NAME,
        "000000010000000000000003.partial",
        "00000002.history",
        "000000020000000000000003",
    ]:
        repo.put_wal(n, b"x" * 10, "none")
    summary = repo.wal_summary()
    assert summary["files"] == 6
    assert summary["history_files"] == ["00000002.history"]
    assert summary["bytes"] == sum(entry[1].size for entry in repo.list_wal())
    tl1 = summary["timelines"]["00000001"]
    assert (tl1["segments"], tl1["partial"], tl1["backup_files"]) == (2, 1, 1)
    assert (tl1["oldest"], tl1["newest"]) == (
        "000000010000000000000001",
        "000000010000000000000002",
    )
    tl2 = summary["timelines"]["00000002"]
    assert (tl2["segments"], tl2["oldest"], tl2["newest"]) == (
        1,
        "000000020000000000000003",
        "000000020000000000000003",
    )


def test_open_posix(tmp_path: Path) -> None:
    repo = Repository.open_posix(str(tmp_path))
    repo.put_wal(SEG, b"abc", "none")
    assert (tmp_path / "wal" / "0000000100000000" / SEG).is_file()
    assert repo.describe() == str(tmp_path)


# ---------------------------------------------------------------------------------------------
# identity


def test_new_repository_has_no_identity(repo: Repository) -> None:
    assert repo.identity() is None
    repo.check_identity(IDENT_A)  # nothing to check against yet


def test_ensure_identity_records_then_checks(repo: Repository, mem: MemoryStorage) -> None:
    identity, created = repo.ensure_identity(IDENT_A)
    assert (identity, created) == (IDENT_A, True)
    rec = json.loads(mem.objects[IDENTITY_KEY])
    assert rec["system_identifier"] == wal_samples.SYSID_A
    assert (rec["pg_major"], rec["wal_segment_size"], rec["format"]) == (15, 16 * MiB, 1)
    assert "created" in rec
    before = mem.objects[IDENTITY_KEY]
    assert repo.ensure_identity(IDENT_A) == (IDENT_A, False)
    assert mem.objects[IDENTITY_KEY] == before
    assert repo.identity() == IDENT_A


@pytest.mark.parametrize(
    ("other", "message"),
    [
        (
            RepositoryIdentity(wal_samples.SYSID_B, 15, 16 * MiB),
            f"system identifier {wal_samples.SYSID_B} is not the repository's"
            f" {wal_samples.SYSID_A}",
        ),
        (
            RepositoryIdentity(wal_samples.SYSID_A, 16, 16 * MiB),
            "PostgreSQL 16 is not the repository's 15",
        ),
        (
            RepositoryIdentity(wal_samples.SYSID_A, 15, MiB),
            f"WAL segment size {MiB} is not the repository's {16 * MiB}",
        ),
    ],
)
def test_identity_mismatch_is_refused_and_named(
    repo: Repository, mem: MemoryStorage, other: RepositoryIdentity, message: str
) -> None:
    repo.ensure_identity(IDENT_A)
    before = dict(mem.objects)
    for call in (lambda: repo.check_identity(other), lambda: repo.ensure_identity(other)):
        with pytest.raises(IdentityMismatchError, match=message) as exc:
            call()
        assert "belongs to another cluster" in exc.value.msg
        assert exc.value.context["repository_identity"]["system_identifier"] == wal_samples.SYSID_A
        assert exc.value.context["cluster_identity"] == {
            "system_identifier": other.system_identifier,
            "pg_major": other.pg_major,
            "wal_segment_size": other.wal_segment_size,
        }
    assert mem.objects == before


def test_unknown_parts_of_an_identity_are_not_compared(repo: Repository) -> None:
    repo.ensure_identity(IDENT_A)
    repo.check_identity(RepositoryIdentity(wal_samples.SYSID_A, 0, 0))
    with pytest.raises(IdentityMismatchError):
        repo.check_identity(RepositoryIdentity(wal_samples.SYSID_B, 0, 0))


@pytest.mark.parametrize("content", [b"", b"not json", b"{}", b'{"system_identifier": "x"}', b"[]"])
def test_unreadable_identity_is_a_repository_error(
    repo: Repository, mem: MemoryStorage, content: bytes
) -> None:
    mem.put(IDENTITY_KEY, content)
    with pytest.raises(RepositoryError, match=f"{IDENTITY_KEY} in memory://test is unreadable"):
        repo.identity()


def test_concurrent_initialisation_same_cluster(repo: Repository, mem: MemoryStorage) -> None:
    def other_writer(key: str, data: bytes) -> None:
        Repository(mem).ensure_identity(IDENT_A)

    mem.before_put = other_writer
    identity, created = repo.ensure_identity(IDENT_A)
    assert (identity, created) == (IDENT_A, False)


def test_concurrent_initialisation_by_another_cluster(repo: Repository, mem: MemoryStorage) -> None:
    other = RepositoryIdentity(wal_samples.SYSID_B, 15, 16 * MiB)

    def other_writer(key: str, data: bytes) -> None:
        Repository(mem).ensure_identity(other)

    mem.before_put = other_writer
    with pytest.raises(IdentityMismatchError):
        repo.ensure_identity(IDENT_A)
    assert repo.identity() == other


def test_identity_describe() -> None:
    assert IDENT_A.describe() == (
        f"system identifier {wal_samples.SYSID_A}, PostgreSQL 15, WAL segment size {16 * MiB}"
    )


def test_module_constants_match_the_documented_layout() -> None:
    assert (repo_mod.IDENTITY_KEY, repo_mod.WAL_PREFIX, repo_mod.ENVELOPE_MAGIC) == (
        "pitr-repository.json",
        "wal",
        b"PITRWAL1",
    )

# Copyright: contributors to pitr.postgresql
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Repository layout, the WAL object envelope (and its corruption cases), and identity."""

from __future__ import annotations

import base64
import hashlib
import json
import random
import re
import struct
import typing as t
import zlib
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


# The patterns WalFileName.parse used before it parsed names by hand (no re on the push path).
FORMER_NAME_PATTERNS = (
    r"([0-9A-F]{8})([0-9A-F]{8})([0-9A-F]{8})",
    r"([0-9A-F]{8})([0-9A-F]{8})([0-9A-F]{8})\.partial",
    r"([0-9A-F]{8})([0-9A-F]{8})([0-9A-F]{8})\.([0-9A-F]{8})\.backup",
    r"([0-9A-F]{8})\.history",
)


def _mutations(rng: random.Random, name: str) -> t.Iterator[str]:
    alphabet = "0123456789ABCDEFabcdefGx._-+ \n/\u0661"
    yield name
    for _round in range(30):
        chars = list(name)
        i = rng.randrange(len(chars) + 1)
        action = rng.randrange(3)
        if action == 0 and chars:
            chars[min(i, len(chars) - 1)] = rng.choice(alphabet)
        elif action == 1:
            chars.insert(i, rng.choice(alphabet))
        elif chars:
            del chars[min(i, len(chars) - 1)]
        yield "".join(chars)


def test_wal_names_parse_exactly_as_the_former_regular_expressions() -> None:
    rng = random.Random(20261125)
    seeds = [
        "000000010000000000000001",
        "0000000A00000001000000FF.partial",
        "000000010000000000000002.00000028.backup",
        "0000000B.history",
    ]
    checked = 0
    for seed in seeds:
        for name in _mutations(rng, seed):
            former = [re.fullmatch(p, name) for p in FORMER_NAME_PATTERNS]
            try:
                wal_key(name)
                parsed = True
            except WalNameError:
                parsed = False
            assert parsed == any(former), name
            checked += 1
    assert checked == len(seeds) * 31


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
    assert header.version == 2
    assert header.sha256 == ""  # version 2 records no digest of the original bytes
    assert header.codec == codec
    assert header.stored_size == len(_payload(blob))
    assert header.stored_sha256 == hashlib.sha256(_payload(blob)).hexdigest()


@pytest.mark.parametrize("codec", [c for c in CODECS if c != "none"])
def test_every_compressed_frame_carries_a_content_checksum(codec: str) -> None:
    payload = _payload(encode_wal_object(SEG, SEG_DATA, codec))
    assert compression.has_content_checksum(payload, codec)


def _header_len(blob: bytes) -> int:
    return int(struct.unpack_from(">I", blob, len(ENVELOPE_MAGIC))[0])


def _header_json(blob: bytes) -> dict[str, t.Any]:
    start = len(ENVELOPE_MAGIC) + 4
    return dict(json.loads(blob[start : start + _header_len(blob)]))


def _payload(blob: bytes) -> bytes:
    return blob[len(ENVELOPE_MAGIC) + 4 + _header_len(blob) :]


def _with_header(blob: bytes, payload: bytes | None = None, **changes: t.Any) -> bytes:
    magic = blob[: len(ENVELOPE_MAGIC)]
    payload = _payload(blob) if payload is None else payload
    header = _header_json(blob)
    header.update(changes)
    for key in [k for k, v in changes.items() if v is None]:
        del header[key]
    raw = json.dumps(header).encode()
    return magic + struct.pack(">I", len(raw)) + raw + payload


def test_envelope_header_is_json_with_the_documented_fields() -> None:
    blob = encode_wal_object(SEG, b"abc", "none")
    expected = {
        "v": 2,
        "name": SEG,
        "size": 3,
        "codec": "none",
        "stored_size": 3,
        "stored_sha256": hashlib.sha256(b"abc").hexdigest(),
    }
    assert _header_json(blob) == expected
    # Written by hand (no json import on the push path), exactly as json.dumps would.
    start = len(ENVELOPE_MAGIC) + 4
    assert blob[start : start + _header_len(blob)] == json.dumps(expected, sort_keys=True).encode()
    assert blob.endswith(b"abc")


@pytest.mark.parametrize(
    ("name", "codec"), [("../x", "none"), (SEG + '", "v": 3', "none"), (SEG, "brotli")]
)
def test_envelope_refuses_names_and_codecs_it_cannot_write(name: str, codec: str) -> None:
    with pytest.raises(ValueError):
        encode_wal_object(name, b"abc", codec)


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


def _resealed(blob: bytes, payload: bytes) -> bytes:
    """``blob`` with another payload and that payload's correct stored checksum: damage that
    only the codec's own frame checksum can notice."""
    return _with_header(
        blob, payload, stored_sha256=hashlib.sha256(payload).hexdigest(), stored_size=len(payload)
    )


def _zstd_frame_without_checksum() -> bytes:
    if "zstd" not in CODECS:
        return _payload(BLOB)[:-4]  # gzip: no member trailer (fails to decompress)
    mod = compression._import_optional("zstandard")
    return bytes(mod.ZstdCompressor(level=1).compress(SEG_DATA))


CORRUPTIONS = {
    "empty": (b"", "bad magic or truncated"),
    "magic only": (ENVELOPE_MAGIC, "bad magic or truncated"),
    "magic and 2 bytes": (ENVELOPE_MAGIC + b"\x00\x00", "bad magic or truncated"),
    "other magic": (b"PITRWAL3" + BLOB[8:], "bad magic or truncated"),
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
    "header without stored_sha256": (
        _with_header(PLAIN, stored_sha256=None),
        "unreadable header",
    ),
    "header of version 3 under version 2's magic": (
        _with_header(PLAIN, v=3),
        "unreadable header",
    ),
    "size not a number": (_with_header(PLAIN, size="big"), "unreadable header"),
    "truncated payload": (BLOB[:-10], "truncated or padded"),
    "padded payload": (BLOB + b"\x00", "truncated or padded"),
    "flipped payload byte (compressed)": (_flip(BLOB, len(BLOB) - 40), "fails its checksum"),
    "flipped payload byte (none)": (_flip(PLAIN, len(PLAIN) - 100), "fails its checksum"),
    "flipped frame checksum, stored checksum resealed": (
        _resealed(BLOB, _flip(_payload(BLOB), len(_payload(BLOB)) - 1)),
        "does not decompress: .*checksum" if "zstd" in CODECS else "does not decompress",
    ),
    "frame without a content checksum, stored checksum resealed": (
        _resealed(BLOB, _zstd_frame_without_checksum()),
        "carries no content checksum" if "zstd" in CODECS else "does not decompress",
    ),
    "recorded stored_sha256 altered": (
        _with_header(PLAIN, stored_sha256=hashlib.sha256(b"other").hexdigest()),
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


@pytest.mark.parametrize("codec", CODECS)
def test_every_single_byte_flip_in_a_small_envelope_is_caught(codec: str) -> None:
    original = b"0123456789" * 20
    blob = encode_wal_object(SEG, original, codec)
    header_end = len(ENVELOPE_MAGIC) + 4 + _header_len(blob)
    for offset in range(len(blob)):
        damaged = _flip(blob, offset)
        try:
            _unused, data = decode_wal_object(damaged, "k")
        except IntegrityError:
            continue
        # A flip inside the JSON may keep it valid only where it changes nothing verified
        # (whitespace): the data must still be the original.
        assert offset < header_end, offset
        assert data == original, offset


# ---------------------------------------------------------------------------------------------
# envelope version 1: written by earlier releases, still read


# Objects written by envelope version 1 (pitr-wal before version 2, commit a294fa5), kept
# byte for byte: zlib-compressed, base64. Segments: SEG_DATA; none: the history sample.
V1_OBJECTS = {
    "zstd": (
        "eNoL8AwJCnf0MWRgYNhYrZScn5KarGSloFRVXJKipKOglJeYmwriG0CAoQEqMAKpKc5INDI1A6lKsrQwSExJTklL"
        "NU5OMk0zNjY3tjCxSEw0SzYySzU0Mk4yNU9LMjZKTLawNEkyTjE3NTcxTEtKNDQwN0xKTEkxBpuWWQWy0dDM3Nzc"
        "yNAMJFKSX5SaEg+VAIoDxcpASmo1tur/bfAAOp3xCQtD0nEJ5QWrLfslq29HrGs+/FaMP0z7TXSkTMm/N88feX6U"
        "Sn1kLaqYysXgw1ztNNvsQluS5eGqD/qZWyrm3A37dm6jrdbZ5yGmnxL3v5meanLkwDPLDh7/K9aerRs2LPit2iuy"
        "kPPJp9L4di5xhvv/dvIwPJtz5pA7j9uN5gUmTxhyc1UbuxfP5pdh5RR4or3I+nCWR7+FsUHUhFAHJgOdDWWMFkwM"
        "AgyjeORhZiAGAF4ThLw="
    ),
    "lz4": (
        "eNrt0b1qVEEUAOCz1xiDCImJSmw0XJsUgnv3ZvcmYhE7lQgiQrQyd/9Q/AlEUVFsLK18Ai1MYa1VULAWbJQIQUsR"
        "LLTyAda9auMr6HdgGM7MmZnDN2dOnju7fHwpi4jn99LOarfXSY/OpFfvzqWHZ9Lr5bVeldZ/R1b/OxpVzY1LZaPZ"
        "qqraC/P1stvp9nt5p93s53mRz8/Nl2Wr02j1skbebhb9dt4oO/MLc+28WzSLuazfLrN6kbXLbjf/ddvlu9WLWaso"
        "ikbWqlZurq71uhf/bLQW8qwYrt6qiu6PpKenTywOe68NR2y8Gk7lxLtkmNZidzIa25L4kTzt3/586vvolV9lMxGN"
        "6cjqj24diacTYxHNbwvvB9P740vEsa0XH5KIamwuxdTawZiaXYn1ieHBjxuzFwbnJ2N3rRPJWKQRi1FLYt/Knkjf"
        "JrtibDYmlx7H9iT2frgZZ6tu0h1xKFbuxPqZYfLk4ctPg7E7kSQx8jqmtmbjQdX25vKz7QdiPInB/x1vKqOIncP/"
        "G6/97xiDrzRo0KBBgwYNGjRo0KBBgwYNGjRo0KBBgwYNGjRo0KBBgwYNGjRo0KBBgwYNGjRo0KBBgwYNGjRo0KBB"
        "gwYNGjRo0KBBgwYNGjRo0KBBgwYNGjRo0KBBgwYNGjRo0KBBgwYNGjRo0KBBgwYNGjRo0KBBgwYNGjRo0KBBgwYN"
        "GjRo0KBBgwYNGjRo0KBBgwYNGjRo0KBBgwYNGjRo0KBBgwYNGjRo0KBBgwYNGjRo0KBBgwYNGjRo0KBBgwYNGjRo"
        "0KBBgwYNGjRo0KBBgwYNGjRo0KBBgwYNGjRo0KBBgwYNGjRo0KBBgwYNGjRo0KBBgwYNGjRo0KBBgwYNGjRo0KBB"
        "gwYNGjRo0KBBgwYNGjRo0KBBgwYNGjRo0KBBgwYNGjRo0KBBgwYNGjT+VY0qfgKG3Lv9"
    ),
    "gzip": (
        "eNrt2s1LFGEcB/BxXbZAD66UN3N3kPVSNM88s/OMopAHiV5ZysXeQOZtaw/rSspiI7aHkA4dDCqCCqpDeAxaAjGH"
        "iF5IBScUI92De7FLiTCIkC5uzQaCf4GwfD+n7/N7fjwPPMcfT+xU94WezrOE47jcMK+nDVPn20L8dSvZzx8N8X1q"
        "yvTWwn9E2Ev0egZuqGJU9rq0VkVQDd1ImFTXoglKGVUkRVVlXZRNIlItyhIaFVVdaZU0arAok0hCU4nAiKYaBi2f"
        "lrS8G4nMGBOJ7FUG0zdNo3d3Q1K8asbLI033DnJl1b+dl+c/xg4FCguR+9Onmzvj9fX+af+TUH8tG/0QLjTGpqp8"
        "dIyf8gXeRGoe5PL04bv5zNWh0fUzOxs/Hbtl/HPPkcuS+8O1ticmLq2tvNIb7gZbUtli8du144Hg+GxufetFVnxm"
        "x5Nf2hZufx/ZPpb/0zXjDN+6ODYZyc9cWbQb05NOsWTPvl+zFud2Tj4Nn8s+ct0N8vrA6tzzzC9nebPdtDqWajgA"
        "AAAAAAAAqBCFxx1KXTm52ZQ/DgAAAAAAAACV7vBm4UR5FvC19DbYjfcAAAAAAAAAqHjLd6p93iwgXOplzfgoAQAA"
        "AAAAALCfhLquT7X2v1D1F0WLPK8="
    ),
    "none": (
        "eNpNTbsKwjAU7Vq/onQWzU2TNHFzFBxEBEdJbm5tBxtpS6GKP+OX2ujiWc4LzjnsTsfzdg9JkryfOQZPmG+yvA0t"
        "5cuZ7Y2iZz/wVd30Q+im2PW15VLF1hRIHBxqTtZ5Us4AxwK0JqE0qrKywjphQTmBnhtVFpKj1VIyIyuQ8rvWPOKT"
        "gKjnC/KX/2icBbwgZeuCMcWMTtuQdYRhpG7KBttdacj6O2FTNeQXH7IoPCg="
    ),
}


def _v1_object(codec: str) -> bytes:
    return zlib.decompress(base64.b64decode("".join(V1_OBJECTS[codec])))


def _v1_original(codec: str) -> tuple[str, bytes]:
    if codec == "none":
        return wal_samples.HISTORY_NAME, wal_samples.HISTORY_FILE
    return SEG, SEG_DATA


@pytest.mark.parametrize("codec", CODECS)
def test_an_object_written_by_envelope_version_1_still_fetches_and_verifies(codec: str) -> None:
    blob = _v1_object(codec)
    assert blob.startswith(repo_mod.ENVELOPE_MAGIC_V1)
    name, original = _v1_original(codec)
    header, data = decode_wal_object(blob, "k")
    assert data == original
    assert (header.version, header.name, header.codec, header.size) == (
        1,
        name,
        codec,
        len(original),
    )
    assert header.sha256 == hashlib.sha256(original).hexdigest()
    assert header.stored_sha256 == ""


@pytest.mark.parametrize("codec", CODECS)
def test_a_flipped_byte_in_a_version_1_object_is_detected(codec: str) -> None:
    blob = _v1_object(codec)
    start = len(repo_mod.ENVELOPE_MAGIC_V1) + 4 + _header_len(blob)
    for offset in (start, start + (len(blob) - start) // 2, len(blob) - 1):
        with pytest.raises(IntegrityError):
            decode_wal_object(_flip(blob, offset), "k")


def test_a_version_1_object_with_a_wrong_recorded_digest_fails_its_checksum() -> None:
    blob = _with_header(_v1_object("none"), sha256=hashlib.sha256(b"other").hexdigest())
    with pytest.raises(IntegrityError, match="fails its checksum"):
        decode_wal_object(blob, "k")


def test_a_version_1_object_in_a_repository_is_read_beside_version_2(
    repo: Repository, mem: MemoryStorage
) -> None:
    mem.objects[wal_key(SEG)] = _v1_object("zstd" if "zstd" in CODECS else "gzip")
    mem.mtimes[wal_key(SEG)] = 0.0
    repo.put_wal("000000010000000000000003", SEG_DATA, CODECS[0])
    header = repo.wal_header(SEG)
    assert header is not None and header.version == 1
    assert repo.get_wal(SEG)[1] == SEG_DATA
    assert repo.get_wal("000000010000000000000003")[0].version == 2


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


def _record_texts(rng: random.Random) -> t.Iterator[bytes]:
    real = json.dumps(
        {**IDENT_A._asdict(), "format": 1, "created": "2026-11-25T10:00:00Z"}, indent=2
    )
    yield real.encode() + b"\n"
    yield b"{}"
    yield b'{"a": -0, "b": "x y", "c": 0}'
    for text in (
        '{"a": 01}',
        '{"a": 1.5}',
        '{"a": true}',
        '{"a": "x\\"y"}',
        '{"a": {"b": 1}}',
        '{"a": "1,2"}',
        '{"a:b": 1}',
        '{"a": 1,}',
        '{"a": 1 "b": 2}',
        '{"a": "tab\there"}',
        '{"a": 1}\x0c',
        '{"a": "\u00e9"}',
        "[1]",
        "",
    ):
        yield text.encode()
    alphabet = '{}[]",:-0123456789 \t\n\x0b\\abe.E+'
    for _round in range(400):
        chars = list(real)
        for _edit in range(rng.randrange(1, 4)):
            i = rng.randrange(len(chars))
            if rng.random() < 0.5:
                chars[i] = rng.choice(alphabet)
            else:
                chars.insert(i, rng.choice(alphabet))
        yield "".join(chars).encode()


def test_records_load_exactly_as_json_loads_them() -> None:
    fast = 0
    for raw in _record_texts(random.Random(25112026)):
        try:
            expected: t.Any = json.loads(raw)
        except ValueError as exc:
            expected = type(exc)
        try:
            got: t.Any = repo_mod.load_record(raw)
        except ValueError as exc:
            got = type(exc)
        assert got == expected, raw
        assert type(got) is type(expected), raw
        fast += repo_mod._flat_record(raw) is not None
    assert fast >= 3  # the real identity record takes the path without json


def test_identity_describe() -> None:
    assert IDENT_A.describe() == (
        f"system identifier {wal_samples.SYSID_A}, PostgreSQL 15, WAL segment size {16 * MiB}"
    )


def test_module_constants_match_the_documented_layout() -> None:
    assert (
        repo_mod.IDENTITY_KEY,
        repo_mod.WAL_PREFIX,
        repo_mod.ENVELOPE_MAGIC,
        repo_mod.ENVELOPE_MAGIC_V1,
    ) == ("pitr-repository.json", "wal", b"PITRWAL2", b"PITRWAL1")

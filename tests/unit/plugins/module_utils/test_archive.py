# Copyright: contributors to pitr.postgresql
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""push/fetch rules of archive_command and restore_command, on an in-memory repository.

Each test is one rule of PostgreSQL's archiving contract (docs: the postgres contract).
"""

from __future__ import annotations

import os
import typing as t
from pathlib import Path

import pytest

from ansible_collections.pitr.postgresql.plugins.module_utils import archive
from ansible_collections.pitr.postgresql.plugins.module_utils.errors import (
    ArchiveConflictError,
    IdentityMismatchError,
    IntegrityError,
    PitrError,
    RepositoryError,
    StorageError,
)
from ansible_collections.pitr.postgresql.plugins.module_utils.repository import (
    IDENTITY_KEY,
    Repository,
    RepositoryIdentity,
    encode_wal_object,
    wal_key,
)
from tests.support import wal_samples
from tests.support.memory_storage import MemoryStorage

MiB = 1024 * 1024
IDENT_A = RepositoryIdentity(wal_samples.SYSID_A, 15, 16 * MiB)
IDENT_B = RepositoryIdentity(wal_samples.SYSID_B, 15, MiB)
SEG2 = "000000010000000000000002"
SEG2_DATA = wal_samples.full_segment(wal_samples.TL1_SEG2_PAGE)


@pytest.fixture
def mem() -> MemoryStorage:
    return MemoryStorage()


@pytest.fixture
def repo(mem: MemoryStorage) -> Repository:
    return Repository(mem)


@pytest.fixture
def pg_wal(tmp_path: Path) -> Path:
    d = tmp_path / "pg_wal"
    d.mkdir()
    return d


def write(directory: Path, name: str, data: bytes) -> str:
    path = directory / name
    path.write_bytes(data)
    return str(path)


def altered(data: bytes, offset: int = 100_000) -> bytes:
    b = bytearray(data)
    b[offset] ^= 0xFF
    return bytes(b)


def stored_objects(mem: MemoryStorage) -> dict[str, bytes]:
    return {k: v for k, v in mem.objects.items() if k != IDENTITY_KEY}


# ---------------------------------------------------------------------------------------------
# push


def test_first_push_initialises_identity_from_the_segment_header(
    repo: Repository, mem: MemoryStorage, pg_wal: Path
) -> None:
    res = archive.push(repo, write(pg_wal, SEG2, SEG2_DATA), codec="none")
    assert (res.name, res.action, res.size, res.codec) == (SEG2, "archived", 16 * MiB, "none")
    assert repo.identity() == IDENT_A
    assert repo.get_wal(SEG2)[1] == SEG2_DATA
    assert res.stored_size == len(mem.objects[wal_key(SEG2)])


def test_push_with_1mib_segments(repo: Repository, pg_wal: Path) -> None:
    name = "00000001000000000000000A"
    data = wal_samples.full_segment(wal_samples.SEG1M_0A_PAGE, MiB)
    archive.push(repo, write(pg_wal, name, data), codec="none")
    assert repo.identity() == IDENT_B
    assert repo.get_wal(name)[1] == data


@pytest.mark.parametrize("codec", ["none", "gzip", "zstd", "lz4", "auto"])
def test_push_then_fetch_is_byte_identical(
    repo: Repository, pg_wal: Path, tmp_path: Path, codec: str
) -> None:
    from ansible_collections.pitr.postgresql.plugins.module_utils import compression

    if codec != "auto" and not compression.available(codec):
        pytest.skip(f"{codec} not on this host")
    res = archive.push(repo, write(pg_wal, SEG2, SEG2_DATA), codec=codec)
    assert res.codec == compression.resolve(codec)
    dest = tmp_path / "RECOVERYXLOG"
    got = archive.fetch(repo, SEG2, str(dest))
    assert dest.read_bytes() == SEG2_DATA
    assert (got.name, got.size, got.codec) == (SEG2, 16 * MiB, res.codec)


def test_identical_duplicate_is_success_and_writes_nothing(
    repo: Repository, mem: MemoryStorage, pg_wal: Path
) -> None:
    path = write(pg_wal, SEG2, SEG2_DATA)
    archive.push(repo, path, codec="none")
    before = dict(mem.objects), dict(mem.mtimes)
    puts = len(mem.writes())
    res = archive.push(repo, path, codec="gzip")  # another codec asked: still the same WAL
    assert res.action == "already archived"
    assert res.codec == "none"  # what is stored, not what was asked
    assert (dict(mem.objects), dict(mem.mtimes)) == before
    assert len(mem.writes()) == puts


def test_identical_duplicate_with_a_corrupt_archived_copy_is_not_success(
    repo: Repository, mem: MemoryStorage, pg_wal: Path
) -> None:
    # PostgreSQL recycles the segment on exit 0: the archived copy must be proven good first.
    path = write(pg_wal, SEG2, SEG2_DATA)
    archive.push(repo, path, codec="none")
    mem.corrupt(wal_key(SEG2), -1000)
    damaged = mem.objects[wal_key(SEG2)]
    with pytest.raises(IntegrityError, match="fails its checksum"):
        archive.push(repo, path, codec="none")
    assert mem.objects[wal_key(SEG2)] == damaged  # left for a human to look at


def test_differing_duplicate_fails_loudly_and_leaves_the_archive_alone(
    repo: Repository, mem: MemoryStorage, pg_wal: Path, tmp_path: Path
) -> None:
    archive.push(repo, write(pg_wal, SEG2, SEG2_DATA), codec="none")
    before = dict(mem.objects)
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(ArchiveConflictError) as exc:
        archive.push(repo, write(other, SEG2, altered(SEG2_DATA)), codec="none")
    msg = exc.value.msg
    assert f"{SEG2} is already archived" in msg
    assert "different content" in msg
    assert "left untouched" in msg
    assert exc.value.context["wal"] == SEG2
    assert mem.objects == before


def test_differing_duplicate_of_a_history_file(
    repo: Repository, mem: MemoryStorage, pg_wal: Path
) -> None:
    repo.ensure_identity(IDENT_A)
    name = wal_samples.HISTORY_NAME
    archive.push(repo, write(pg_wal, name, wal_samples.HISTORY_FILE))
    before = dict(mem.objects)
    with pytest.raises(ArchiveConflictError):
        archive.push(repo, write(pg_wal, name, wal_samples.HISTORY_FILE + b"2\t0/5000000\tx\n"))
    assert mem.objects == before


def test_race_lost_to_an_identical_push_is_success(
    repo: Repository, mem: MemoryStorage, pg_wal: Path
) -> None:
    repo.ensure_identity(IDENT_A)
    path = write(pg_wal, SEG2, SEG2_DATA)

    def the_other_archiver(key: str, data: bytes) -> None:
        # archive_mode = always: the standby stores the same segment first.
        Repository(mem).put_wal(SEG2, SEG2_DATA, "gzip")

    mem.before_put = the_other_archiver
    res = archive.push(repo, path, codec="none")
    assert res.action == "already archived"
    assert res.codec == "gzip"
    assert repo.get_wal(SEG2)[1] == SEG2_DATA


def test_race_lost_to_a_differing_push_is_a_conflict(
    repo: Repository, mem: MemoryStorage, pg_wal: Path
) -> None:
    repo.ensure_identity(IDENT_A)

    def the_other_archiver(key: str, data: bytes) -> None:
        Repository(mem).put_wal(SEG2, altered(SEG2_DATA), "none")

    mem.before_put = the_other_archiver
    with pytest.raises(ArchiveConflictError):
        archive.push(repo, write(pg_wal, SEG2, SEG2_DATA), codec="none")
    assert repo.get_wal(SEG2)[1] == altered(SEG2_DATA)


def test_segment_of_another_cluster_is_refused(
    repo: Repository, mem: MemoryStorage, pg_wal: Path
) -> None:
    archive.push(repo, write(pg_wal, SEG2, SEG2_DATA), codec="none")
    before = dict(mem.objects)
    foreign = wal_samples.full_segment(wal_samples.SEG1M_0A_PAGE, MiB)
    with pytest.raises(IdentityMismatchError, match="belongs to another cluster") as exc:
        archive.push(repo, write(pg_wal, "00000001000000000000000A", foreign), codec="none")
    assert str(wal_samples.SYSID_B) in exc.value.msg
    assert mem.objects == before
    assert mem.writes()[-1] != wal_key("00000001000000000000000A")


def test_segment_of_another_cluster_with_the_same_name_is_refused_not_a_conflict(
    repo: Repository, mem: MemoryStorage, pg_wal: Path
) -> None:
    # The identity check comes first: the message must say "another cluster".
    repo.ensure_identity(IDENT_B)
    before = dict(mem.objects)
    with pytest.raises(IdentityMismatchError):
        archive.push(repo, write(pg_wal, SEG2, SEG2_DATA), codec="none")
    assert mem.objects == before


def test_history_file_of_another_cluster_is_refused(
    repo: Repository, mem: MemoryStorage, pg_wal: Path
) -> None:
    repo.ensure_identity(IDENT_A)
    path = write(pg_wal, wal_samples.HISTORY_NAME, wal_samples.HISTORY_FILE)
    with pytest.raises(IdentityMismatchError):
        archive.push(repo, path, cluster=RepositoryIdentity(wal_samples.SYSID_B, 15, 0))
    assert stored_objects(mem) == {}


def test_history_file_of_this_cluster_is_archived_byte_exactly(
    repo: Repository, pg_wal: Path, tmp_path: Path
) -> None:
    repo.ensure_identity(IDENT_A)
    path = write(pg_wal, wal_samples.HISTORY_NAME, wal_samples.HISTORY_FILE)
    res = archive.push(repo, path, cluster=RepositoryIdentity(wal_samples.SYSID_A, 15, 0))
    assert res.size == 41
    archive.fetch(repo, wal_samples.HISTORY_NAME, str(tmp_path / "RECOVERYHISTORY"))
    assert (tmp_path / "RECOVERYHISTORY").read_bytes() == wal_samples.HISTORY_FILE


def test_backup_history_file_is_archived_byte_exactly(
    repo: Repository, pg_wal: Path, tmp_path: Path
) -> None:
    repo.ensure_identity(IDENT_A)
    archive.push(repo, write(pg_wal, wal_samples.BACKUP_NAME, wal_samples.BACKUP_FILE))
    archive.fetch(repo, wal_samples.BACKUP_NAME, str(tmp_path / "out"))
    assert (tmp_path / "out").read_bytes() == wal_samples.BACKUP_FILE


def test_file_without_header_cannot_initialise_a_repository(
    repo: Repository, mem: MemoryStorage, pg_wal: Path
) -> None:
    path = write(pg_wal, wal_samples.HISTORY_NAME, wal_samples.HISTORY_FILE)
    for cluster in (None, RepositoryIdentity(wal_samples.SYSID_A, 15, 0)):
        with pytest.raises(RepositoryError, match="has no identity yet") as exc:
            archive.push(repo, path, cluster=cluster)
        assert "pitr-wal init" in exc.value.msg
    assert mem.objects == {}


def test_partial_is_archived_beside_the_full_segment_never_over_it(
    repo: Repository, pg_wal: Path, tmp_path: Path
) -> None:
    full_name = "000000010000000000000003"
    full = wal_samples.full_segment(wal_samples.TL1_SEG3_PARTIAL_PAGE)
    partial = altered(full, 5_000_000)
    archive.push(repo, write(pg_wal, full_name, full), codec="none")
    res = archive.push(repo, write(pg_wal, full_name + ".partial", partial), codec="none")
    assert res.action == "archived"
    archive.fetch(repo, full_name, str(tmp_path / "seg"))
    archive.fetch(repo, full_name + ".partial", str(tmp_path / "partial"))
    assert (tmp_path / "seg").read_bytes() == full
    assert (tmp_path / "partial").read_bytes() == partial


def test_partial_first_then_full_segment(repo: Repository, pg_wal: Path, tmp_path: Path) -> None:
    full_name = "000000010000000000000003"
    full = wal_samples.full_segment(wal_samples.TL1_SEG3_PARTIAL_PAGE)
    partial = altered(full, 5_000_000)
    archive.push(repo, write(pg_wal, full_name + ".partial", partial), codec="none")
    assert archive.push(repo, write(pg_wal, full_name, full), codec="none").action == "archived"
    archive.fetch(repo, full_name, str(tmp_path / "seg"))
    assert (tmp_path / "seg").read_bytes() == full


def test_truncated_segment_is_refused(repo: Repository, mem: MemoryStorage, pg_wal: Path) -> None:
    with pytest.raises(PitrError, match="refusing to archive a truncated segment") as exc:
        archive.push(repo, write(pg_wal, SEG2, SEG2_DATA[: 4 * MiB]), codec="none")
    assert "4194304 bytes" in exc.value.msg
    assert mem.objects == {}


def test_segment_without_a_wal_header_is_refused(
    repo: Repository, mem: MemoryStorage, pg_wal: Path
) -> None:
    with pytest.raises(PitrError, match="does not start with a WAL page header"):
        archive.push(repo, write(pg_wal, SEG2, bytes(16 * MiB)), codec="none")
    assert mem.objects == {}


@pytest.mark.parametrize("name", ["RECOVERYXLOG", "000000010000000000000002.tmp", "xlogtemp.123"])
def test_push_of_a_non_wal_name_is_refused(
    repo: Repository, mem: MemoryStorage, pg_wal: Path, name: str
) -> None:
    with pytest.raises(PitrError, match="is not a WAL file name"):
        archive.push(repo, write(pg_wal, name, SEG2_DATA), codec="none")
    assert mem.objects == {}


def test_push_of_a_missing_file(repo: Repository, pg_wal: Path) -> None:
    with pytest.raises(PitrError, match=f"cannot read {pg_wal}/{SEG2}: No such file"):
        archive.push(repo, str(pg_wal / SEG2))


def test_push_to_an_unreachable_repository_is_an_error(
    repo: Repository, mem: MemoryStorage, pg_wal: Path
) -> None:
    mem.unmounted = True
    with pytest.raises(StorageError):
        archive.push(repo, write(pg_wal, SEG2, SEG2_DATA), codec="none")


def test_push_when_the_write_fails_is_an_error(
    repo: Repository, mem: MemoryStorage, pg_wal: Path
) -> None:
    repo.ensure_identity(IDENT_A)
    mem.fail_put = StorageError("cannot write: No space left on device (errno 28)")
    with pytest.raises(StorageError, match="No space left"):
        archive.push(repo, write(pg_wal, SEG2, SEG2_DATA), codec="none")
    assert stored_objects(mem) == {}


def test_major_version_from_the_header_beats_the_data_directory(
    repo: Repository, pg_wal: Path
) -> None:
    # The header's magic says PostgreSQL 15; PG_VERSION of the cwd is only a fallback.
    archive.push(
        repo,
        write(pg_wal, SEG2, SEG2_DATA),
        codec="none",
        cluster=RepositoryIdentity(wal_samples.SYSID_A, 16, 0),
    )
    assert repo.identity() == IDENT_A


def test_unknown_wal_magic_takes_the_major_from_the_data_directory(
    repo: Repository, pg_wal: Path
) -> None:
    page = bytearray(wal_samples.TL1_SEG2_PAGE)
    page[0:2] = (0xD1FE).to_bytes(2, "little")  # a future major's magic
    data = wal_samples.full_segment(bytes(page))
    cluster = RepositoryIdentity(wal_samples.SYSID_A, 19, 0)
    archive.push(repo, write(pg_wal, SEG2, data), codec="none", cluster=cluster)
    assert repo.identity() == RepositoryIdentity(wal_samples.SYSID_A, 19, 16 * MiB)


def test_unknown_wal_magic_without_data_directory_cannot_initialise(
    repo: Repository, mem: MemoryStorage, pg_wal: Path
) -> None:
    page = bytearray(wal_samples.TL1_SEG2_PAGE)
    page[0:2] = (0xD1FE).to_bytes(2, "little")
    with pytest.raises(RepositoryError, match="has no identity yet"):
        archive.push(repo, write(pg_wal, SEG2, wal_samples.full_segment(bytes(page))))
    assert mem.objects == {}


def test_new_timeline_segment_with_old_timeline_header_is_archived(
    repo: Repository, pg_wal: Path
) -> None:
    name = "000000020000000000000003"
    data = wal_samples.full_segment(wal_samples.TL2_SEG3_PAGE)
    assert archive.push(repo, write(pg_wal, name, data), codec="none").action == "archived"


# ---------------------------------------------------------------------------------------------
# fetch


@pytest.fixture
def filled(repo: Repository, pg_wal: Path) -> Repository:
    archive.push(repo, write(pg_wal, SEG2, SEG2_DATA), codec="zstd")
    return repo


@pytest.fixture
def out(tmp_path: Path) -> Path:
    """Where fetch writes (apart from the pg_wal the pushes read)."""
    d = tmp_path / "out"
    d.mkdir()
    return d


def files_in(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_fetch_writes_exactly_the_path_given(filled: Repository, out: Path) -> None:
    dest = out / "restore" / "pg_wal" / "RECOVERYXLOG"
    dest.parent.mkdir(parents=True)
    res = archive.fetch(filled, SEG2, str(dest))
    assert dest.read_bytes() == SEG2_DATA
    assert files_in(dest.parent) == ["RECOVERYXLOG"]
    assert (res.name, res.size, res.codec) == (SEG2, 16 * MiB, "zstd")


def test_fetch_replaces_an_existing_file(filled: Repository, out: Path) -> None:
    dest = out / "RECOVERYXLOG"
    dest.write_bytes(b"stale")
    archive.fetch(filled, SEG2, str(dest))
    assert dest.read_bytes() == SEG2_DATA


@pytest.mark.parametrize(
    "name", ["000000010000000000000099", "00000002.history", "000000010000000000000002.partial"]
)
def test_fetch_of_a_missing_file_is_not_archived_and_writes_nothing(
    filled: Repository, out: Path, name: str
) -> None:
    dest = out / "RECOVERYXLOG"
    with pytest.raises(archive.WalNotArchivedError, match=f"{name} is not in the archive"):
        archive.fetch(filled, name, str(dest))
    assert files_in(out) == []


def test_fetch_of_a_corrupt_file_is_a_real_error_and_writes_nothing(
    filled: Repository, mem: MemoryStorage, out: Path
) -> None:
    mem.corrupt(wal_key(SEG2), -10)
    dest = out / "RECOVERYXLOG"
    with pytest.raises(PitrError) as exc:
        archive.fetch(filled, SEG2, str(dest))
    assert isinstance(exc.value, IntegrityError)
    assert not isinstance(exc.value, archive.WalNotArchivedError)
    assert files_in(out) == []


def test_fetch_from_an_unreachable_repository_is_a_real_error(
    filled: Repository, mem: MemoryStorage, out: Path
) -> None:
    mem.unmounted = True
    with pytest.raises(StorageError) as exc:
        archive.fetch(filled, SEG2, str(out / "RECOVERYXLOG"))
    assert not isinstance(exc.value, archive.WalNotArchivedError)
    assert files_in(out) == []


def test_fetch_from_a_repository_without_identity_is_a_real_error(
    mem: MemoryStorage, out: Path
) -> None:
    # An empty directory where the repository should be (an unmounted mount point, a wrong
    # path): "not archived" here would end recovery early and promote.
    with pytest.raises(RepositoryError) as exc:
        archive.fetch(Repository(mem), SEG2, str(out / "RECOVERYXLOG"))
    assert not isinstance(exc.value, archive.WalNotArchivedError)
    assert "no identity" in exc.value.msg
    assert files_in(out) == []


def test_fetch_of_an_object_holding_another_name(
    filled: Repository, mem: MemoryStorage, out: Path
) -> None:
    mem.put(wal_key("000000010000000000000005"), encode_wal_object(SEG2, SEG2_DATA, "none"))
    with pytest.raises(IntegrityError, match=f"holds {SEG2}"):
        archive.fetch(filled, "000000010000000000000005", str(out / "RECOVERYXLOG"))
    assert files_in(out) == []


def test_fetch_of_an_invalid_name_is_a_real_error(filled: Repository, out: Path) -> None:
    with pytest.raises(PitrError, match="is not a WAL file name") as exc:
        archive.fetch(filled, "../../etc/passwd", str(out / "x"))
    assert not isinstance(exc.value, archive.WalNotArchivedError)


def test_fetch_into_an_unwritable_place_leaves_no_partial_file(
    filled: Repository, out: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_write = os.write
    calls = {"n": 0}

    def write_then_fail(fd: int, data: t.Any) -> int:
        calls["n"] += 1
        if calls["n"] > 1:
            raise OSError(28, "No space left on device")
        return real_write(fd, bytes(data[:65536]))

    monkeypatch.setattr(os, "write", write_then_fail)
    with pytest.raises(PitrError, match="No space left on device") as exc:
        archive.fetch(filled, SEG2, str(out / "RECOVERYXLOG"))
    assert not isinstance(exc.value, archive.WalNotArchivedError)
    assert files_in(out) == []


def test_fetch_into_a_missing_directory(filled: Repository, out: Path) -> None:
    with pytest.raises(PitrError, match="cannot write") as exc:
        archive.fetch(filled, SEG2, str(out / "missing" / "RECOVERYXLOG"))
    assert not isinstance(exc.value, archive.WalNotArchivedError)


# ---------------------------------------------------------------------------------------------
# identities of the pusher


def test_cluster_identity_from_a_data_directory(tmp_path: Path) -> None:
    (tmp_path / "global").mkdir()
    (tmp_path / "global" / "pg_control").write_bytes(wal_samples.PG_CONTROL_HEAD)
    (tmp_path / "PG_VERSION").write_text("15\n")
    assert archive.cluster_identity_from_datadir(str(tmp_path)) == RepositoryIdentity(
        wal_samples.SYSID_A, 15, 0
    )


@pytest.mark.parametrize(
    ("control", "version"),
    [
        (None, "15\n"),
        (wal_samples.PG_CONTROL_HEAD, None),
        (b"short", "15\n"),
        (wal_samples.PG_CONTROL_HEAD, "fifteen\n"),
    ],
)
def test_cluster_identity_of_something_else_is_none(
    tmp_path: Path, control: bytes | None, version: str | None
) -> None:
    (tmp_path / "global").mkdir()
    if control is not None:
        (tmp_path / "global" / "pg_control").write_bytes(control)
    if version is not None:
        (tmp_path / "PG_VERSION").write_text(version)
    assert archive.cluster_identity_from_datadir(str(tmp_path)) is None


def test_identity_of_segment() -> None:
    assert archive.identity_of_segment(SEG2_DATA, SEG2) == IDENT_A
    with pytest.raises(PitrError, match="refusing to archive it"):
        archive.identity_of_segment(b"\x00" * 100, SEG2)

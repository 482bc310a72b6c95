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
def fresh(mem: MemoryStorage) -> Repository:
    """A repository nobody initialised (or an unmounted one: it looks the same)."""
    return Repository(mem)


@pytest.fixture
def repo(fresh: Repository) -> Repository:
    """A repository initialised for cluster A, as `pitr-wal init --pgdata DATADIR` does."""
    identity, created = fresh.ensure_identity(IDENT_A)
    assert (identity, created) == (IDENT_A, True)
    return fresh


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
# push: only into an initialised repository


def unknown_magic_segment() -> bytes:
    """SEG2 as a future major would write it: a WAL magic no PostgreSQL release had yet."""
    page = bytearray(wal_samples.TL1_SEG2_PAGE)
    page[0:2] = (0xD1FE).to_bytes(2, "little")
    return wal_samples.full_segment(bytes(page))


CLUSTER_A_DATADIR = RepositoryIdentity(wal_samples.SYSID_A, 15, 0)

UNINITIALISED_CASES = {
    "segment": (SEG2, SEG2_DATA, None),
    "segment, data directory known": (SEG2, SEG2_DATA, CLUSTER_A_DATADIR),
    "1 MiB segment": (
        "00000001000000000000000A",
        wal_samples.full_segment(wal_samples.SEG1M_0A_PAGE, MiB),
        None,
    ),
    "partial": (
        "000000010000000000000003.partial",
        wal_samples.full_segment(wal_samples.TL1_SEG3_PARTIAL_PAGE),
        None,
    ),
    "history": (wal_samples.HISTORY_NAME, wal_samples.HISTORY_FILE, CLUSTER_A_DATADIR),
    "history, no data directory": (wal_samples.HISTORY_NAME, wal_samples.HISTORY_FILE, None),
    "backup history": (wal_samples.BACKUP_NAME, wal_samples.BACKUP_FILE, CLUSTER_A_DATADIR),
    "unknown WAL magic": (SEG2, unknown_magic_segment(), None),
}


@pytest.mark.parametrize("case", list(UNINITIALISED_CASES))
def test_push_into_an_uninitialised_repository_is_refused(
    fresh: Repository, mem: MemoryStorage, pg_wal: Path, case: str
) -> None:
    # An unmounted repository is an empty directory: initialising it on push would send WAL
    # to the mount point's own disk without anyone noticing. Even a segment whose header
    # carries the whole identity must not create it.
    name, data, cluster = UNINITIALISED_CASES[case]
    with pytest.raises(RepositoryError) as exc:
        archive.push(fresh, write(pg_wal, name, data), codec="none", cluster=cluster)
    assert not isinstance(exc.value, IdentityMismatchError)
    msg = exc.value.msg
    assert f"repository memory://test is not initialised (no {IDENTITY_KEY})" in msg
    assert "check that it is mounted" in msg
    assert "`pitr-wal --repo PATH init --pgdata DATADIR`" in msg
    assert exc.value.context["wal"] == name
    assert mem.objects == {}
    assert mem.writes() == []  # not even an attempt
    assert fresh.identity() is None


def test_push_refused_before_init_is_archived_after_it(
    fresh: Repository, mem: MemoryStorage, pg_wal: Path
) -> None:
    path = write(pg_wal, SEG2, SEG2_DATA)
    with pytest.raises(RepositoryError, match="is not initialised"):
        archive.push(fresh, path, codec="none")
    # what `pitr-wal init --pgdata DATADIR` does for cluster A
    assert fresh.ensure_identity(IDENT_A) == (IDENT_A, True)
    res = archive.push(fresh, path, codec="none")
    assert (res.name, res.action, res.size, res.codec) == (SEG2, "archived", 16 * MiB, "none")
    assert res.stored_size == len(mem.objects[wal_key(SEG2)])
    assert fresh.get_wal(SEG2)[1] == SEG2_DATA
    assert fresh.identity() == IDENT_A
    assert sorted(mem.objects) == [IDENTITY_KEY, wal_key(SEG2)]


def test_push_with_1mib_segments(fresh: Repository, pg_wal: Path) -> None:
    fresh.ensure_identity(IDENT_B)
    name = "00000001000000000000000A"
    data = wal_samples.full_segment(wal_samples.SEG1M_0A_PAGE, MiB)
    res = archive.push(fresh, write(pg_wal, name, data), codec="none")
    assert (res.action, res.size) == ("archived", MiB)
    assert fresh.identity() == IDENT_B
    assert fresh.get_wal(name)[1] == data


def test_segment_size_differing_from_the_recorded_one_is_refused(
    fresh: Repository, mem: MemoryStorage, pg_wal: Path
) -> None:
    # Same cluster and major as recorded, but 1 MiB segments where 16 MiB were recorded.
    fresh.ensure_identity(RepositoryIdentity(wal_samples.SYSID_B, 15, 16 * MiB))
    data = wal_samples.full_segment(wal_samples.SEG1M_0A_PAGE, MiB)
    with pytest.raises(IdentityMismatchError) as exc:
        archive.push(fresh, write(pg_wal, "00000001000000000000000A", data), codec="none")
    assert "WAL segment size 1048576 is not the repository's 16777216" in exc.value.msg
    assert "system identifier" not in exc.value.msg
    assert "PostgreSQL 15 is not" not in exc.value.msg
    assert stored_objects(mem) == {}


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
    name = wal_samples.HISTORY_NAME
    archive.push(repo, write(pg_wal, name, wal_samples.HISTORY_FILE))
    before = dict(mem.objects)
    with pytest.raises(ArchiveConflictError):
        archive.push(repo, write(pg_wal, name, wal_samples.HISTORY_FILE + b"2\t0/5000000\tx\n"))
    assert mem.objects == before


def test_race_lost_to_an_identical_push_is_success(
    repo: Repository, mem: MemoryStorage, pg_wal: Path
) -> None:
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
    assert (
        f"system identifier {wal_samples.SYSID_B} is not the repository's {wal_samples.SYSID_A}"
        in exc.value.msg
    )
    assert mem.objects == before
    assert wal_key("00000001000000000000000A") not in mem.writes()


def test_segment_of_another_cluster_with_the_same_name_is_refused_not_a_conflict(
    fresh: Repository, mem: MemoryStorage, pg_wal: Path
) -> None:
    # The identity check comes first: the message must say "another cluster".
    fresh.ensure_identity(IDENT_B)
    before = dict(mem.objects)
    with pytest.raises(IdentityMismatchError):
        archive.push(fresh, write(pg_wal, SEG2, SEG2_DATA), codec="none")
    assert mem.objects == before


def test_history_file_of_another_cluster_is_refused(
    repo: Repository, mem: MemoryStorage, pg_wal: Path
) -> None:
    path = write(pg_wal, wal_samples.HISTORY_NAME, wal_samples.HISTORY_FILE)
    with pytest.raises(IdentityMismatchError):
        archive.push(repo, path, cluster=RepositoryIdentity(wal_samples.SYSID_B, 15, 0))
    assert stored_objects(mem) == {}


def test_history_file_of_this_cluster_is_archived_byte_exactly(
    repo: Repository, pg_wal: Path, tmp_path: Path
) -> None:
    path = write(pg_wal, wal_samples.HISTORY_NAME, wal_samples.HISTORY_FILE)
    res = archive.push(repo, path, cluster=CLUSTER_A_DATADIR)
    assert res.size == 41
    archive.fetch(repo, wal_samples.HISTORY_NAME, str(tmp_path / "RECOVERYHISTORY"))
    assert (tmp_path / "RECOVERYHISTORY").read_bytes() == wal_samples.HISTORY_FILE


def test_backup_history_file_is_archived_byte_exactly(
    repo: Repository, pg_wal: Path, tmp_path: Path
) -> None:
    archive.push(repo, write(pg_wal, wal_samples.BACKUP_NAME, wal_samples.BACKUP_FILE))
    archive.fetch(repo, wal_samples.BACKUP_NAME, str(tmp_path / "out"))
    assert (tmp_path / "out").read_bytes() == wal_samples.BACKUP_FILE


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
    assert stored_objects(mem) == {}


def test_segment_without_a_wal_header_is_refused(
    repo: Repository, mem: MemoryStorage, pg_wal: Path
) -> None:
    with pytest.raises(PitrError, match="does not start with a WAL page header"):
        archive.push(repo, write(pg_wal, SEG2, bytes(16 * MiB)), codec="none")
    assert stored_objects(mem) == {}


@pytest.mark.parametrize("name", ["RECOVERYXLOG", "000000010000000000000002.tmp", "xlogtemp.123"])
def test_push_of_a_non_wal_name_is_refused(
    repo: Repository, mem: MemoryStorage, pg_wal: Path, name: str
) -> None:
    with pytest.raises(PitrError, match="is not a WAL file name"):
        archive.push(repo, write(pg_wal, name, SEG2_DATA), codec="none")
    assert stored_objects(mem) == {}


def test_push_of_a_missing_file(repo: Repository, pg_wal: Path) -> None:
    with pytest.raises(PitrError, match=f"cannot read {pg_wal}/{SEG2}: No such file"):
        archive.push(repo, str(pg_wal / SEG2))


def test_push_to_an_unreachable_repository_is_an_error(
    repo: Repository, mem: MemoryStorage, pg_wal: Path
) -> None:
    mem.unmounted = True
    with pytest.raises(StorageError, match="is not accessible"):
        archive.push(repo, write(pg_wal, SEG2, SEG2_DATA), codec="none")
    mem.unmounted = False
    assert stored_objects(mem) == {}


def test_push_when_the_write_fails_is_an_error(
    repo: Repository, mem: MemoryStorage, pg_wal: Path
) -> None:
    mem.fail_put = StorageError("cannot write: No space left on device (errno 28)")
    with pytest.raises(StorageError, match="No space left"):
        archive.push(repo, write(pg_wal, SEG2, SEG2_DATA), codec="none")
    assert stored_objects(mem) == {}


# ---------------------------------------------------------------------------------------------
# push checks the identity: header first, the data directory where the header cannot tell


def test_major_version_is_checked_from_the_header_not_the_data_directory(
    repo: Repository, mem: MemoryStorage, pg_wal: Path
) -> None:
    # The header's magic says PostgreSQL 15, as recorded; a data directory saying 16 is only
    # the fallback for headers that cannot tell, so it does not make the segment foreign.
    res = archive.push(
        repo,
        write(pg_wal, SEG2, SEG2_DATA),
        codec="none",
        cluster=RepositoryIdentity(wal_samples.SYSID_A, 16, 0),
    )
    assert res.action == "archived"
    assert repo.identity() == IDENT_A
    assert repo.get_wal(SEG2)[1] == SEG2_DATA


def test_segment_whose_header_disagrees_with_the_recorded_major_is_refused(
    fresh: Repository, mem: MemoryStorage, pg_wal: Path
) -> None:
    # Recorded for PostgreSQL 16; a PostgreSQL 15 segment is refused even when the data
    # directory (wrongly) agrees with the repository.
    fresh.ensure_identity(RepositoryIdentity(wal_samples.SYSID_A, 16, 16 * MiB))
    with pytest.raises(IdentityMismatchError) as exc:
        archive.push(
            fresh,
            write(pg_wal, SEG2, SEG2_DATA),
            codec="none",
            cluster=RepositoryIdentity(wal_samples.SYSID_A, 16, 0),
        )
    assert "PostgreSQL 15 is not the repository's 16" in exc.value.msg
    assert "system identifier" not in exc.value.msg
    assert stored_objects(mem) == {}


@pytest.mark.parametrize(("datadir_major", "accepted"), [(19, True), (18, False)])
def test_unknown_wal_magic_is_checked_against_the_data_directory_major(
    fresh: Repository, mem: MemoryStorage, pg_wal: Path, datadir_major: int, accepted: bool
) -> None:
    fresh.ensure_identity(RepositoryIdentity(wal_samples.SYSID_A, 19, 16 * MiB))
    path = write(pg_wal, SEG2, unknown_magic_segment())
    cluster = RepositoryIdentity(wal_samples.SYSID_A, datadir_major, 0)
    if accepted:
        assert archive.push(fresh, path, codec="none", cluster=cluster).action == "archived"
        assert fresh.get_wal(SEG2)[1] == unknown_magic_segment()
    else:
        with pytest.raises(IdentityMismatchError) as exc:
            archive.push(fresh, path, codec="none", cluster=cluster)
        assert "PostgreSQL 18 is not the repository's 19" in exc.value.msg
        assert stored_objects(mem) == {}
    assert fresh.identity() == RepositoryIdentity(wal_samples.SYSID_A, 19, 16 * MiB)


@pytest.mark.parametrize(("recorded_sysid", "accepted"), [("A", True), ("B", False)])
def test_unknown_wal_magic_without_data_directory_still_checks_the_system_identifier(
    fresh: Repository, mem: MemoryStorage, pg_wal: Path, recorded_sysid: str, accepted: bool
) -> None:
    sysid = {"A": wal_samples.SYSID_A, "B": wal_samples.SYSID_B}[recorded_sysid]
    fresh.ensure_identity(RepositoryIdentity(sysid, 19, 16 * MiB))
    path = write(pg_wal, SEG2, unknown_magic_segment())
    if accepted:  # the major cannot be told, the system identifier and segment size can
        assert archive.push(fresh, path, codec="none").action == "archived"
    else:
        with pytest.raises(IdentityMismatchError) as exc:
            archive.push(fresh, path, codec="none")
        assert (
            f"system identifier {wal_samples.SYSID_A} is not the repository's"
            f" {wal_samples.SYSID_B}" in exc.value.msg
        )
        assert "is not the repository's 19" not in exc.value.msg
        assert stored_objects(mem) == {}


def test_new_timeline_segment_with_old_timeline_header_is_archived(
    repo: Repository, pg_wal: Path
) -> None:
    name = "000000020000000000000003"
    data = wal_samples.full_segment(wal_samples.TL2_SEG3_PAGE)
    assert archive.push(repo, write(pg_wal, name, data), codec="none").action == "archived"
    assert repo.get_wal(name)[1] == data


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

# Copyright: contributors to pitr.postgresql
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Archive logic: what ``archive_command`` (push) and ``restore_command`` (fetch) mean.

The rules come from PostgreSQL's contract (see the collection's docs): success only when
durable; an identical duplicate is success, a differing one is a loud failure that leaves
the archived copy alone; a file from another cluster is refused; fetch writes a complete,
verified file or nothing. Pure except for the repository/storage calls, so every rule is
unit-testable with an in-memory storage. Standard library only.
"""

from __future__ import annotations

import hashlib
import mmap
import os

from ansible_collections.pitr.postgresql.plugins.module_utils import compression
from ansible_collections.pitr.postgresql.plugins.module_utils.errors import (
    ArchiveConflictError,
    IntegrityError,
    ObjectExistsError,
    ObjectNotFoundError,
    PitrError,
    RepositoryError,
)
from ansible_collections.pitr.postgresql.plugins.module_utils.lean_types import NamedTuple
from ansible_collections.pitr.postgresql.plugins.module_utils.repository import (
    IDENTITY_KEY,
    Repository,
    RepositoryIdentity,
    WalObjectHeader,
)
from ansible_collections.pitr.postgresql.plugins.module_utils.walfile import (
    LONG_HEADER_SIZE,
    PARTIAL,
    SEGMENT,
    WalFileName,
    WalNameError,
    parse_long_page_header,
    read_system_identifier_from_control,
)


class WalNotArchivedError(PitrError):
    """The requested file is truly not in the archive (the normal end of WAL)."""


class PushResult(NamedTuple):
    name: str
    action: str  # "archived" or "already archived"
    size: int
    stored_size: int
    codec: str


class FetchResult(NamedTuple):
    name: str
    size: int
    stored_size: int
    codec: str


def cluster_identity_from_datadir(
    datadir: str, with_segment_size: bool = False
) -> RepositoryIdentity | None:
    """System identifier and major version of the cluster whose data directory is given.

    ``archive_command`` runs with the data directory as working directory, so the host
    command can learn who is pushing even for files without a page header (.history).
    With ``with_segment_size`` the WAL segment size is read from a segment's page header in
    ``pg_wal`` (its offset in pg_control differs between majors); 0 when none is readable.
    Returns None when the directory is not readable as a data directory.
    """
    try:
        with open(os.path.join(datadir, "global", "pg_control"), "rb") as fh:
            sysid = read_system_identifier_from_control(fh.read(8))
        with open(os.path.join(datadir, "PG_VERSION"), encoding="ascii") as fh:
            major = int(fh.read().strip().split(".")[0])
    except (OSError, ValueError):
        return None
    return RepositoryIdentity(
        sysid, major, _segment_size_in(datadir, sysid) if with_segment_size else 0
    )


def _segment_size_in(datadir: str, sysid: int) -> int:
    wal_dir = os.path.join(datadir, "pg_wal")
    try:
        names = sorted(os.listdir(wal_dir), reverse=True)
    except OSError:
        return 0
    for name in names:
        if len(name) != 24:
            continue
        try:
            with open(os.path.join(wal_dir, name), "rb") as fh:
                header = parse_long_page_header(fh.read(LONG_HEADER_SIZE))
        except (OSError, ValueError):
            continue
        if header.system_identifier == sysid:
            return header.segment_size
    return 0


def identity_of_segment(data: bytes, name: str) -> RepositoryIdentity:
    """Identity carried by a segment's long page header."""
    try:
        header = parse_long_page_header(data)
    except ValueError as exc:
        raise PitrError(
            f"{name} does not start with a WAL page header ({exc}); refusing to archive it",
            wal=name,
        ) from exc
    return RepositoryIdentity(header.system_identifier, header.pg_major or 0, header.segment_size)


def push(
    repo: Repository,
    source_path: str,
    *,
    codec: str = compression.AUTO,
    level: int | None = None,
    cluster: RepositoryIdentity | None = None,
) -> PushResult:
    """Archive the file at ``source_path`` durably, or raise a PitrError saying why not."""
    name = os.path.basename(source_path)
    try:
        wal = WalFileName.parse(name)
    except WalNameError as exc:
        raise PitrError(str(exc), wal=name) from exc
    data = _read(source_path, name)
    try:
        return _push(repo, wal, name, data, codec, level, cluster)
    finally:
        if isinstance(data, mmap.mmap):
            data.close()


def _read(source_path: str, name: str) -> bytes:
    """The file's bytes: mapped, not copied (saves a 16 MiB copy per segment)."""
    try:
        with open(source_path, "rb") as fh:
            try:
                # An mmap serves as bytes for hashing, compression and header parsing.
                mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
                return mapped  # type: ignore[return-value]
            except ValueError:  # an empty file cannot be mapped
                return fh.read()
    except OSError as exc:
        raise PitrError(f"cannot read {source_path}: {exc.strerror}", wal=name) from exc


def _push(
    repo: Repository,
    wal: WalFileName,
    name: str,
    data: bytes,
    codec: str,
    level: int | None,
    cluster: RepositoryIdentity | None,
) -> PushResult:

    pushing = cluster
    if wal.kind in (SEGMENT, PARTIAL):
        from_header = identity_of_segment(data, name)
        if from_header.pg_major == 0 and cluster is not None:
            from_header = RepositoryIdentity(
                from_header.system_identifier, cluster.pg_major, from_header.wal_segment_size
            )
        pushing = from_header
        if wal.kind == SEGMENT and len(data) != from_header.wal_segment_size:
            raise PitrError(
                f"{name} is {len(data)} bytes but its header says segments are"
                f" {from_header.wal_segment_size} bytes; refusing to archive a truncated segment",
                wal=name,
            )
    identity = repo.identity()
    if identity is None:
        # Never initialise on push: an unmounted repository looks like an empty directory,
        # and WAL would silently go to the mount point's own disk.
        raise RepositoryError(
            f"repository {repo.describe()} is not initialised (no {IDENTITY_KEY}); if it"
            " lives on other storage, check that it is mounted; otherwise initialise it with"
            " `pitr-wal --repo PATH init --pgdata DATADIR` (the archiving role does this)",
            wal=name,
        )
    if pushing is not None:
        repo.check_identity(pushing, identity)

    # No SHA-256 of the whole segment here: the envelope (version 2) records the SHA-256 of
    # the stored bytes, and the codec's frame checksum covers the original ones.
    existing = repo.wal_header(name)
    if existing is not None:
        return _compare_existing(repo, name, data, existing)
    resolved = compression.resolve(codec)
    try:
        stored = repo.put_wal(name, data, resolved, level)
    except ObjectExistsError:
        # Another archiver stored the same name between our check and our link.
        existing = repo.wal_header(name)
        if existing is None:
            raise RepositoryError(
                f"{name} vanished from the repository while being archived"
            ) from None
        return _compare_existing(repo, name, data, existing)
    return PushResult(name, "archived", len(data), stored, resolved)


def _compare_existing(
    repo: Repository, name: str, data: bytes, existing: WalObjectHeader
) -> PushResult:
    """An archived copy exists: success only when it is intact and byte for byte ``data``.

    Reading and verifying it first also proves the stored copy readable and complete before
    PostgreSQL is told it may recycle the segment (IntegrityError when it is damaged).
    """
    theirs = ""
    if existing.size == len(data):
        header, stored = repo.get_wal(name)
        if memoryview(data) == stored:
            return PushResult(name, "already archived", len(data), header.stored_size, header.codec)
        theirs = f", sha256 {hashlib.sha256(stored).hexdigest()[:16]}..."
    elif existing.sha256:
        theirs = f", sha256 {existing.sha256[:16]}..."
    raise ArchiveConflictError(
        f"{name} is already archived in {repo.describe()} with different content (archived:"
        f" {existing.size} bytes{theirs}; this server: {len(data)} bytes, sha256"
        f" {hashlib.sha256(data).hexdigest()[:16]}...). The archived copy was left untouched."
        " Check whether two clusters archive into one repository, or whether this server's"
        " WAL or the archive is corrupt; fix that before archiving resumes.",
        wal=name,
    )


def fetch(repo: Repository, name: str, dest_path: str, *, dir_fd: int | None = None) -> FetchResult:
    """Write the verified archived file ``name`` to ``dest_path`` (complete or not at all).

    With ``dir_fd``, ``dest_path`` (and its temp file) are relative to that directory
    descriptor (the prefetcher's spool, which may be moved away while it works).

    Raises WalNotArchivedError only when the file is truly absent; any other failure is a
    PitrError that must not be mistaken for the end of the archive.
    """
    try:
        WalFileName.parse(name)
    except WalNameError as exc:
        raise PitrError(str(exc), wal=name) from exc
    try:
        header, data = repo.get_wal(name)
    except ObjectNotFoundError:
        if repo.identity() is None:
            # An empty directory where the repository should be (an unmounted mount point,
            # a wrong path): "not archived" would end recovery early and promote.
            raise RepositoryError(
                f"repository {repo.describe()} has no identity file ({IDENTITY_KEY}): it is"
                " not mounted, the path is wrong, or it was never initialised; refusing to"
                f" report {name} as not archived",
                wal=name,
                repository=repo.describe(),
            ) from None
        raise WalNotArchivedError(f"{name} is not in the archive", wal=name) from None
    if header.name != name:
        raise IntegrityError(
            f"the object stored as {name} holds {header.name}: the repository is damaged",
            wal=name,
        )
    tmp = f"{dest_path}.pitr-tmp.{os.getpid()}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600, dir_fd=dir_fd)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        os.replace(tmp, dest_path, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except OSError as exc:
        try:  # noqa: SIM105 - contextlib costs every start-up ~2 ms of imports
            os.unlink(tmp, dir_fd=dir_fd)
        except OSError:
            pass
        raise PitrError(f"cannot write {dest_path}: {exc.strerror}", wal=name) from exc
    except BaseException:  # a timeout alarm: leave nothing behind either
        try:  # noqa: SIM105
            os.unlink(tmp, dir_fd=dir_fd)
        except OSError:
            pass
        raise
    return FetchResult(name, header.size, header.stored_size, header.codec)

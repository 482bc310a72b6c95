# Copyright: contributors to pitr.postgresql
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The base backup catalog: one JSON record per backup at ``backups/<label>/backup.json``.

The record is what restore needs to choose a backup for a target (start/stop LSN and time,
timeline, system identifier, version) and what tells it whether it may (``status`` and
``verified``). It is written atomically (the storage's ``put``) and last: a backup directory
without a record is an unfinished backup and is never listed. Only ``usable(record)``
records (status ``ok`` and verified) may be offered for restore.

Record version 1 fields (stable interface; add fields only with a new ``record_version``):

======================  =====================================================================
record_version          1
label                   the backup's name, by default its UTC start ``20261125T141500Z``
status                  ``running``, ``ok``, ``failed`` or ``expiring`` (retention)
verified                True when every byte was read back and matched the manifest
verification            ``{"tool": ..., "ok": bool, "message": ...}``
start_lsn, stop_lsn     ``X/Y``; the backup is consistent once replay reaches ``stop_lsn``
start_wal, stop_wal     segment names holding start_lsn and the last byte before stop_lsn
start_time, stop_time   ISO 8601 UTC with offset; stop_time is taken when pg_basebackup
                        finished, so it is at or after the true end of the backup
timeline                the timeline the backup ended on
system_identifier       the cluster's system identifier
pg_version              server version, e.g. ``15.18``; ``pg_major`` e.g. 15
pg_basebackup_version   version of the pg_basebackup that took it
backup_format           ``tar`` or ``plain``
compression             pg_basebackup's --compress value, e.g. ``server-zstd:1``, or ``none``
wal_method              ``stream``: the WAL from start to stop is inside the backup
size_on_disk            bytes the backup occupies in the repository
cluster_size            bytes of the files backed up (sum of the manifest's sizes)
checksum_algorithm      the manifest's file checksum algorithm (``SHA256``, ``CRC32C``)
files                   file names inside ``backups/<label>/`` (the record excluded)
======================  =====================================================================
"""

from __future__ import annotations

import datetime as dt
import typing as t
from dataclasses import asdict, dataclass, field

from ansible_collections.pitr.postgresql.plugins.module_utils import records
from ansible_collections.pitr.postgresql.plugins.module_utils.errors import RepositoryError
from ansible_collections.pitr.postgresql.plugins.module_utils.repository import (
    BACKUP_PREFIX,
    Repository,
)

RECORD_VERSION = 1
RECORD_NAME = "backup.json"
STATUSES = ("running", "ok", "failed", "expiring")
FORMATS = ("tar", "plain")


def default_label(now: dt.datetime | None = None) -> str:
    """A label from the UTC time: ``20261125T141500Z``."""
    return records.utc_label(now)


def check_label(label: str) -> str:
    """Return ``label`` if it is a safe directory name, else raise RepositoryError."""
    return records.check_label(label, "backup label", RepositoryError)


@dataclass(frozen=True)
class BackupRecord(records.RecordBase):
    """The catalog record of one base backup (see the module docstring for the fields)."""

    label: str
    status: str
    verified: bool = False
    verification: dict[str, t.Any] = field(default_factory=dict)
    start_lsn: str = ""
    stop_lsn: str = ""
    start_wal: str = ""
    stop_wal: str = ""
    start_time: str = ""
    stop_time: str = ""
    timeline: int = 0
    system_identifier: int = 0
    pg_version: str = ""
    pg_major: int = 0
    pg_basebackup_version: str = ""
    backup_format: str = "tar"
    compression: str = "none"
    wal_method: str = "stream"
    size_on_disk: int = 0
    cluster_size: int = 0
    checksum_algorithm: str = ""
    files: list[str] = field(default_factory=list)
    record_version: int = RECORD_VERSION

    def to_dict(self) -> dict[str, t.Any]:
        """A JSON-ready dict (the exact content of ``backup.json``)."""
        d = asdict(self)
        d["files"] = list(self.files)
        d["verification"] = dict(self.verification)
        return d

    @classmethod
    def from_dict(cls, data: t.Mapping[str, t.Any]) -> BackupRecord:
        """Build a record from a dict; unknown keys are ignored, wrong types raise ValueError."""
        records.check_record_version(data, RECORD_VERSION)
        values = records.known_fields(cls, data)
        if "label" not in values or "status" not in values:
            raise ValueError("a backup record needs at least label and status")
        rec = cls(**values)
        if rec.status not in STATUSES:
            raise ValueError(f"status {rec.status!r} is not one of {', '.join(STATUSES)}")
        records.check_types(
            rec,
            integers=("timeline", "system_identifier", "pg_major", "size_on_disk", "cluster_size"),
            booleans=("verified",),
        )
        if not isinstance(rec.files, list) or not isinstance(rec.verification, dict):
            raise ValueError("files must be a list and verification an object")
        return rec


def usable(record: BackupRecord) -> bool:
    """May restore use this backup? Only when it completed (``ok``) and verified."""
    return record.usable


def _sort_key(record: BackupRecord) -> tuple[str, str]:
    return (record.start_time or record.stop_time or "", record.label)


_SHELF: records.RecordShelf[BackupRecord] = records.RecordShelf(
    prefix=BACKUP_PREFIX,
    record_name=RECORD_NAME,
    record_key=Repository.backup_record_key,
    parse=BackupRecord.from_dict,
    sort_key=_sort_key,
    noun="catalog record",
    item="backup",
)


def read_backup(repo: Repository, label: str) -> BackupRecord | None:
    """The record of ``label``, or None when there is none (no backup, or an unfinished one)."""
    return _SHELF.read(repo, label)


def write_backup(repo: Repository, record: BackupRecord, *, key: str | None = None) -> str:
    """Write (or replace) the record atomically; return its key.

    ``key`` lets the backup code write the record into its staging directory first, so that
    the record and the files appear in ``backups/`` together.
    """
    return _SHELF.write(repo, record, key=key)


def list_backups(repo: Repository) -> list[BackupRecord]:
    """Every catalogued backup, newest first (by start time, then label).

    Records that cannot be read are skipped here; ``read_backup`` reports them.
    """
    return _SHELF.newest_first(repo)


def usable_backups(repo: Repository) -> list[BackupRecord]:
    """The usable backups, newest first."""
    return [r for r in list_backups(repo) if usable(r)]

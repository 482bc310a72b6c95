# Copyright: contributors to pitr.postgresql
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Logical dumps: one ``pg_dump`` (or ``pg_dumpall --globals-only``) per catalogued dump.

Each dump lives in ``dumps/<label>/`` (``Repository.dump_prefix``) with its catalog record
``dump.json`` (``Repository.dump_record_key``). The record is written atomically and last: a
directory without a record is an unfinished dump and is never listed. Only ``usable(record)``
dumps (status ``ok`` and verified) may be restored.

Record version 1 fields (stable interface; add fields only with a new ``record_version``):

=====================  ======================================================================
record_version         1
kind                   ``dump`` (base backups have their own records in ``backups/``)
label                  the dump's name: ``<run>-<database>`` (see ``dump_label``)
run                    the label of the run that took it; every dump of one "all databases
                       plus globals" run shares it
scope                  ``database`` or ``globals``
database               the database dumped, or ``globals`` for the globals dump (``scope``
                       tells a database that happens to be named "globals" apart)
status                 ``running``, ``ok``, ``failed`` or ``expiring`` (retention)
verified               True when the whole dump was read back and held the expected objects
verification           ``{"tool", "ok", "message", "objects"}``; ``objects`` maps a kind
                       (``tables``, ``table_data``, ``sequences``, ``views``,
                       ``materialized_views``, ``large_objects``, ``roles``, ``tablespaces``)
                       to ``{"expected": n, "found": n}``
start_time, end_time   ISO 8601 UTC with offset (``2026-11-25T14:15:00.123456+00:00``);
                       the dump is a snapshot of the database as of ``start_time``
server_version         server version, e.g. ``15.18``
pg_dump_version        version of the pg_dump (or pg_dumpall) that wrote it
format                 ``custom`` or ``directory``; ``plain`` (SQL) for the globals dump
jobs                   parallel pg_dump jobs (directory format only)
compression            the ``pg_dump --compress`` value, empty for pg_dump's default
large_objects          whether large objects were included
size                   bytes of the dump's files in the repository (the record excluded)
checksum               SHA-256 (hex) of the dump file; for the directory format, of the
                       ``SHA256SUMS`` manifest (one ``<sha256>  <path>`` line per file)
files                  file names inside ``dumps/<label>/`` (the record excluded)
database_properties    encoding, lc_collate, lc_ctype, locale_provider, icu_locale of the
                       dumped database (restore creates the new database alike)
=====================  ======================================================================

Retention removes a dump with ``remove_dump``: the record is marked ``expiring`` first, then
the files go, then the record, so an interrupted removal never leaves a usable-looking dump
with missing files. Take the repository lock ``LOCK_NAME`` around it.

Standard library only; psycopg is reached through the connection helper (``postgres.py``).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
import typing as t
from dataclasses import asdict, dataclass, field, fields, replace

from ansible_collections.pitr.postgresql.plugins.module_utils.errors import (
    PitrError,
    RepositoryError,
)
from ansible_collections.pitr.postgresql.plugins.module_utils.repository import (
    DUMP_PREFIX,
    Repository,
)

RECORD_VERSION = 1
RECORD_NAME = "dump.json"
KIND = "dump"
STATUSES = ("running", "ok", "failed", "expiring")
FORMATS = ("custom", "directory")
GLOBALS_FORMAT = "plain"
SCOPES = ("database", "globals")
GLOBALS = "globals"
LOCK_NAME = "dump"
_LABEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_SAFE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,59}$")


class DumpError(PitrError):
    """A logical dump could not be planned, taken, verified or restored."""


# Labels -----------------------------------------------------------------------------------------


def default_run_label(now: dt.datetime | None = None) -> str:
    """A run label from the UTC time: ``20261125T141500Z``."""
    now = now or dt.datetime.now(dt.UTC)
    return now.astimezone(dt.UTC).strftime("%Y%m%dT%H%M%SZ")


def check_label(label: str, what: str = "dump label") -> str:
    """Return ``label`` if it is a safe directory name, else raise DumpError."""
    if not _LABEL_RE.match(label or ""):
        raise DumpError(
            f"{what} {label!r} is not allowed: use 1-100 letters, digits, '.', '_' or '-',"
            " starting with a letter or digit"
        )
    return label


def name_slug(database: str) -> str:
    """A directory-safe, unique stand-in for a database name.

    Safe names stay as they are; any other name (spaces, non-ASCII, very long) becomes its
    safe characters plus 8 hex digits of its SHA-256, so two names never share a slug. A
    database named ``globals`` gets the hash too, so it never takes the globals dump's label.
    """
    if _SAFE_NAME_RE.match(database) and database != GLOBALS:
        return database
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", database).strip("._-")[:40] or "db"
    return f"{cleaned}-{hashlib.sha256(database.encode()).hexdigest()[:8]}"


def dump_label(run: str, database: str, scope: str = "database") -> str:
    """The label of one dump of a run: ``<run>-<database slug>`` or ``<run>-globals``."""
    check_label(run, "run label")
    slug = GLOBALS if scope == GLOBALS else name_slug(database)
    return check_label(f"{run}-{slug}"[:100])


# The record ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DumpRecord:
    """The catalog record of one logical dump (see the module docstring for the fields)."""

    label: str
    database: str
    status: str
    verified: bool = False
    verification: dict[str, t.Any] = field(default_factory=dict)
    start_time: str = ""
    end_time: str = ""
    server_version: str = ""
    pg_dump_version: str = ""
    format: str = "custom"
    jobs: int = 1
    size: int = 0
    checksum: str = ""
    files: list[str] = field(default_factory=list)
    scope: str = "database"
    run: str = ""
    compression: str = ""
    large_objects: bool = True
    database_properties: dict[str, t.Any] = field(default_factory=dict)
    kind: str = KIND
    record_version: int = RECORD_VERSION

    def to_dict(self) -> dict[str, t.Any]:
        """A JSON-ready dict (the exact content of ``dump.json``)."""
        d = asdict(self)
        d["files"] = list(self.files)
        return d

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True).encode() + b"\n"

    @classmethod
    def from_dict(cls, data: t.Mapping[str, t.Any]) -> DumpRecord:
        """Build a record from a dict; unknown keys are ignored, wrong values raise ValueError."""
        version = int(data.get("record_version", RECORD_VERSION))
        if version > RECORD_VERSION:
            raise ValueError(
                f"record_version {version} is newer than this collection reads ({RECORD_VERSION});"
                " upgrade the collection"
            )
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in names}
        for required in ("label", "database", "status"):
            if not isinstance(values.get(required), str) or not values[required]:
                raise ValueError(f"a dump record needs {required} (a non-empty string)")
        rec = cls(**values)
        if rec.kind != KIND:
            raise ValueError(f"kind {rec.kind!r} is not {KIND!r}")
        if rec.status not in STATUSES:
            raise ValueError(f"status {rec.status!r} is not one of {', '.join(STATUSES)}")
        if rec.scope not in SCOPES:
            raise ValueError(f"scope {rec.scope!r} is not one of {', '.join(SCOPES)}")
        if rec.format not in (*FORMATS, GLOBALS_FORMAT):
            raise ValueError(f"format {rec.format!r} is not custom, directory or plain")
        for name in ("jobs", "size", "record_version"):
            value = getattr(rec, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        for name in ("verified", "large_objects"):
            if not isinstance(getattr(rec, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(rec, name)!r}")
        if not isinstance(rec.files, list):
            raise ValueError("files must be a list")
        if not isinstance(rec.verification, dict) or not isinstance(rec.database_properties, dict):
            raise ValueError("verification and database_properties must be objects")
        return rec

    def with_changes(self, **changes: t.Any) -> DumpRecord:
        return replace(self, **changes)

    @property
    def usable(self) -> bool:
        return usable(self)


def usable(record: DumpRecord) -> bool:
    """May restore use this dump? Only when it completed (``ok``) and verified."""
    return record.status == "ok" and record.verified is True


def series_key(record: DumpRecord) -> tuple[str, str]:
    """What retention counts per: (scope, database). Globals form a series of their own."""
    return (record.scope, record.database)


def _sort_key(record: DumpRecord) -> tuple[str, str]:
    return (record.start_time or record.end_time or "", record.label)


# Reading and writing records ---------------------------------------------------------------------


def read_dump(repo: Repository, label: str) -> DumpRecord | None:
    """The record of ``label``, or None when there is none (no dump, or an unfinished one)."""
    key = repo.dump_record_key(check_label(label))
    if repo.storage.stat(key) is None:
        return None
    raw = repo.storage.get(key)
    try:
        return DumpRecord.from_dict(json.loads(raw))
    except (ValueError, TypeError) as exc:
        raise RepositoryError(
            f"the dump record {key} in {repo.describe()} is unreadable ({exc}); the dump"
            " cannot be used until it is re-verified or removed",
            key=key,
        ) from exc


def write_dump(repo: Repository, record: DumpRecord, *, key: str | None = None) -> str:
    """Write (or replace) the record atomically; return its key.

    Call it last, after the dump's files are complete. ``key`` lets the dump code write the
    record into the staging directory, so that the files and their record appear in
    ``dumps/`` together, in one rename.
    """
    check_label(record.label)
    target = key or repo.dump_record_key(record.label)
    repo.storage.put(target, record.to_json(), overwrite=True)
    return target


def list_dumps(repo: Repository) -> list[DumpRecord]:
    """Every catalogued dump, newest first (by start time, then label).

    Records that cannot be read are skipped here; ``read_dump`` reports them.
    """
    records: list[DumpRecord] = []
    suffix = "/" + RECORD_NAME
    for info in repo.storage.list(DUMP_PREFIX):
        key = info.key
        if not key.endswith(suffix) or key.count("/") != 2:
            continue
        try:
            rec = read_dump(repo, key.split("/")[1])
        except (RepositoryError, DumpError):
            continue
        if rec is not None:
            records.append(rec)
    records.sort(key=_sort_key, reverse=True)
    return records


def usable_dumps(repo: Repository, database: str | None = None) -> list[DumpRecord]:
    """The usable dumps of ``database`` (every database's when None), newest first."""
    return [
        r
        for r in list_dumps(repo)
        if usable(r) and (database is None or (r.scope == "database" and r.database == database))
    ]


def remove_dump(repo: Repository, label: str) -> DumpRecord | None:
    """Remove a dump crash-safely: mark it ``expiring``, delete its files, then its record.

    Returns the record as it was, or None when there was none. Hold ``LOCK_NAME``. A removal
    that is interrupted leaves an ``expiring`` record (never usable) that a re-run finishes.
    """
    record = read_dump(repo, label)
    prefix = repo.dump_prefix(check_label(label))
    record_key = repo.dump_record_key(label)
    if record is not None and record.status != "expiring":
        write_dump(repo, record.with_changes(status="expiring"))
    for info in list(repo.storage.list(prefix)):
        if info.key != record_key:
            repo.storage.delete(info.key)
    repo.storage.delete(record_key)
    delete_tree = getattr(repo.storage, "delete_tree", None)
    if delete_tree is not None:  # POSIX: the emptied directories
        delete_tree(prefix)
    return record

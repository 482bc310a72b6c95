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

import contextlib
import datetime as dt
import hashlib
import os
import re
import shutil
import tempfile
import time
import typing as t
from dataclasses import asdict, dataclass, field

from ansible_collections.pitr.postgresql.plugins.module_utils import backup, records, runner
from ansible_collections.pitr.postgresql.plugins.module_utils.errors import (
    CommandError,
    IntegrityError,
    PitrError,
    RepositoryError,
    StorageError,
)
from ansible_collections.pitr.postgresql.plugins.module_utils.repository import (
    DUMP_PREFIX,
    Repository,
)
from ansible_collections.pitr.postgresql.plugins.module_utils.storage import PosixStorage

RECORD_VERSION = 1
RECORD_NAME = "dump.json"
KIND = "dump"
STATUSES = ("running", "ok", "failed", "expiring")
FORMATS = ("custom", "directory")
GLOBALS_FORMAT = "plain"
SCOPES = ("database", "globals")
GLOBALS = "globals"
LOCK_NAME = "dump"
_SAFE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,59}$")


class DumpError(PitrError):
    """A logical dump could not be planned, taken, verified or restored."""


# Labels -----------------------------------------------------------------------------------------


def default_run_label(now: dt.datetime | None = None) -> str:
    """A run label from the UTC time: ``20261125T141500Z``."""
    return records.utc_label(now)


def check_label(label: str, what: str = "dump label") -> str:
    """Return ``label`` if it is a safe directory name, else raise DumpError."""
    return records.check_label(label, what, DumpError)


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
class DumpRecord(records.RecordBase):
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

    @classmethod
    def from_dict(cls, data: t.Mapping[str, t.Any]) -> DumpRecord:
        """Build a record from a dict; unknown keys are ignored, wrong values raise ValueError."""
        records.check_record_version(data, RECORD_VERSION)
        values = records.known_fields(cls, data)
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
        records.check_types(
            rec,
            integers=("jobs", "size", "record_version"),
            booleans=("verified", "large_objects"),
        )
        if not isinstance(rec.files, list):
            raise ValueError("files must be a list")
        if not isinstance(rec.verification, dict) or not isinstance(rec.database_properties, dict):
            raise ValueError("verification and database_properties must be objects")
        return rec


def usable(record: DumpRecord) -> bool:
    """May restore use this dump? Only when it completed (``ok``) and verified."""
    return record.usable


def series_key(record: DumpRecord) -> tuple[str, str]:
    """What retention counts per: (scope, database). Globals form a series of their own."""
    return (record.scope, record.database)


def _sort_key(record: DumpRecord) -> tuple[str, str]:
    return (record.start_time or record.end_time or "", record.label)


# Reading and writing records ---------------------------------------------------------------------


_SHELF: records.RecordShelf[DumpRecord] = records.RecordShelf(
    prefix=DUMP_PREFIX,
    record_name=RECORD_NAME,
    record_key=Repository.dump_record_key,
    parse=DumpRecord.from_dict,
    sort_key=_sort_key,
    noun="dump record",
    item="dump",
    label_error=DumpError,
)


def read_dump(repo: Repository, label: str) -> DumpRecord | None:
    """The record of ``label``, or None when there is none (no dump, or an unfinished one)."""
    return _SHELF.read(repo, label)


def write_dump(repo: Repository, record: DumpRecord, *, key: str | None = None) -> str:
    """Write (or replace) the record atomically; return its key.

    Call it last, after the dump's files are complete. ``key`` lets the dump code write the
    record into the staging directory, so that the files and their record appear in
    ``dumps/`` together, in one rename.
    """
    return _SHELF.write(repo, record, key=key)


def list_dumps(repo: Repository) -> list[DumpRecord]:
    """Every catalogued dump, newest first (by start time, then label).

    Records that cannot be read are skipped here; ``read_dump`` reports them.
    """
    return _SHELF.newest_first(repo)


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


# Programs and argv -------------------------------------------------------------------------------

CUSTOM_FILE = "database.dump"
DIRECTORY_NAME = "database.dir"
GLOBALS_FILE = "globals.sql"
SUMS_FILE = "SHA256SUMS"
SNAPSHOT_PLACEHOLDER = "<exported at dump time>"
DEV_NULL = "/dev/null"
RESTORE_MODES = ("new", "existing")
_TOOL_VERSION_RE = re.compile(r"\(PostgreSQL\) (\d+)(?:\.(\d+))?")


@dataclass(frozen=True)
class DumpOptions:
    """What the user asked for (module options)."""

    format: str = "custom"
    jobs: int = 1
    compression: str = ""
    large_objects: bool = True
    no_role_passwords: bool = False
    timeout: float = 0.0

    def check(self) -> DumpOptions:
        if self.format not in FORMATS:
            raise DumpError(f"format {self.format!r} is not one of {', '.join(FORMATS)}")
        if self.jobs < 1:
            raise DumpError(f"jobs must be 1 or more, not {self.jobs}")
        if self.jobs > 1 and self.format != "directory":
            raise DumpError(
                "parallel dumps (jobs > 1) need format=directory: pg_dump writes one file per"
                " table in parallel only into a directory archive"
            )
        if self.compression and not re.fullmatch(r"[A-Za-z0-9:=,_-]+", self.compression):
            raise DumpError(f"compression {self.compression!r} is not a pg_dump --compress value")
        return self


@dataclass(frozen=True)
class Tool:
    """A PostgreSQL client program and its version."""

    path: str
    version: str
    major: int


def parse_tool_version(text: str) -> tuple[str, int]:
    """``pg_dump (PostgreSQL) 15.18 (Debian ...)`` -> (``15.18``, 15)."""
    m = _TOOL_VERSION_RE.search(text)
    if not m:
        raise DumpError(f"cannot read a PostgreSQL version from {text.strip()!r}")
    return (f"{m[1]}.{m[2]}" if m[2] is not None else m[1]), int(m[1])


def find_tool(program: str, pg_bindir: str | None = None) -> Tool:
    """``program`` from ``pg_bindir``, else from the newest installed PostgreSQL client."""
    dirs = [pg_bindir] if pg_bindir else backup.candidate_bindirs()
    for d in dirs:
        path = os.path.join(d, program)
        if os.path.isfile(path) and os.access(path, os.X_OK):
            res = runner.run([path, "--version"], timeout=30)
            version, major = parse_tool_version(res.stdout)
            return Tool(path, version, major)
    where = f"in pg_bindir {pg_bindir}" if pg_bindir else "on this host"
    raise DumpError(
        f"{program} is not installed {where}: install the PostgreSQL client programs (Debian:"
        " postgresql-client-<major>) or set pg_bindir",
        pg_bindir=pg_bindir,
    )


def dbname_arg(database: str) -> str:
    """The ``--dbname`` value for a database name.

    pg_dump and pg_restore read a ``--dbname`` containing ``=`` (or a URI) as a connection
    string, so such names are passed as ``dbname='...'`` with libpq's quoting.
    """
    if "=" in database or database.startswith(("postgresql://", "postgres://")):
        escaped = database.replace("\\", "\\\\").replace("'", "\\'")
        return f"dbname='{escaped}'"
    return database


def archive_name(fmt: str) -> str:
    """The file (or directory) name of a dump inside ``dumps/<label>/``."""
    return {"custom": CUSTOM_FILE, "directory": DIRECTORY_NAME, GLOBALS_FORMAT: GLOBALS_FILE}[fmt]


def pg_dump_argv(
    pg_dump: Tool,
    database: str,
    target: str,
    opts: DumpOptions,
    *,
    snapshot: str | None = None,
) -> list[str]:
    """The ``pg_dump`` argv for one database (pure). No password: that is in the environment.

    Large objects are named ``--large-objects`` from pg_dump 16 on, ``--blobs`` before.
    ``--snapshot`` makes pg_dump see exactly the snapshot the expected objects were counted
    in, so the check of the archive's contents is exact even while the database changes.
    """
    opts.check()
    argv = [
        pg_dump.path,
        f"--format={opts.format}",
        f"--file={target}",
        "--no-password",
    ]
    if opts.jobs > 1:
        argv.append(f"--jobs={opts.jobs}")
    if opts.compression:
        argv.append(f"--compress={opts.compression}")
    if pg_dump.major >= 16:
        argv.append("--large-objects" if opts.large_objects else "--no-large-objects")
    else:
        argv.append("--blobs" if opts.large_objects else "--no-blobs")
    if snapshot:
        argv.append(f"--snapshot={snapshot}")
    argv.append(f"--dbname={dbname_arg(database)}")
    return argv


def pg_dumpall_globals_argv(
    pg_dumpall: Tool, target: str, *, no_role_passwords: bool = False, login_db: str | None = None
) -> list[str]:
    """``pg_dumpall --globals-only``: roles, their settings and memberships, tablespaces."""
    argv = [pg_dumpall.path, "--globals-only", f"--file={target}", "--no-password"]
    if no_role_passwords:
        argv.append("--no-role-passwords")
    if login_db:
        argv.append(f"--database={login_db}")
    return argv


def restore_list_argv(pg_restore: Tool, archive: str, fmt: str, list_file: str) -> list[str]:
    """``pg_restore --list``: the archive's table of contents into ``list_file``."""
    return [pg_restore.path, "--list", f"--format={fmt}", f"--file={list_file}", archive]


def restore_read_argv(pg_restore: Tool, archive: str, fmt: str) -> list[str]:
    """``pg_restore`` into /dev/null: reads and decompresses every data block of the archive.

    ``--list`` alone reads only the table of contents: a custom-format file cut short in its
    data passes it (measured on PostgreSQL 15), so the verification needs this full read.
    """
    return [pg_restore.path, f"--format={fmt}", f"--file={DEV_NULL}", archive]


@dataclass(frozen=True)
class RestoreOptions:
    """How a dump is restored (module options)."""

    target_database: str
    mode: str = "new"
    jobs: int = 1
    single_transaction: bool | None = None
    no_owner: bool = False
    no_privileges: bool = False
    role: str = ""
    same_locale: bool = True
    owner: str = ""
    keep_failed: bool = False
    verify_checksum: bool = True
    timeout: float = 0.0

    @property
    def in_one_transaction(self) -> bool:
        """Default: one transaction into an existing database (all or nothing), unless jobs."""
        if self.single_transaction is not None:
            return self.single_transaction
        return self.mode == "existing" and self.jobs == 1

    def check(self) -> RestoreOptions:
        if self.mode not in RESTORE_MODES:
            raise DumpError(f"mode {self.mode!r} is not one of {', '.join(RESTORE_MODES)}")
        if not self.target_database:
            raise DumpError("target_database is required: the database to restore into")
        if self.jobs < 1:
            raise DumpError(f"jobs must be 1 or more, not {self.jobs}")
        if self.jobs > 1 and self.in_one_transaction:
            raise DumpError(
                "pg_restore cannot use parallel jobs in a single transaction: set jobs to 1 or"
                " single_transaction to false"
            )
        return self


def pg_restore_argv(pg_restore: Tool, archive: str, fmt: str, opts: RestoreOptions) -> list[str]:
    """The ``pg_restore`` argv into ``opts.target_database`` (pure).

    ``--exit-on-error``: the first error stops the restore and fails it (pg_restore's default
    is to go on and only count errors). Into an existing database: ``--clean --if-exists``
    drops each object of the dump before recreating it; objects that are not in the dump are
    left alone.
    """
    opts.check()
    argv = [
        pg_restore.path,
        f"--format={fmt}",
        f"--dbname={dbname_arg(opts.target_database)}",
        "--exit-on-error",
        "--no-password",
    ]
    if opts.mode == "existing":
        argv += ["--clean", "--if-exists"]
    if opts.in_one_transaction:
        argv.append("--single-transaction")
    if opts.jobs > 1:
        argv.append(f"--jobs={opts.jobs}")
    if opts.no_owner:
        argv.append("--no-owner")
    if opts.no_privileges:
        argv.append("--no-privileges")
    if opts.role:
        argv.append(f"--role={opts.role}")
    argv.append(archive)
    return argv


# The table of contents (pg_restore --list) ----------------------------------------------------

PG_CLASS = 1259
PG_LARGEOBJECT = 2613
_TOC_LINE_RE = re.compile(r"^(\d+);\s+(\d+)\s+(\d+)\s+(.*)$")
# Entry types whose name holds a space, so that "TABLE DATA" is not read as "TABLE".
_MULTIWORD = (
    "MATERIALIZED VIEW DATA",
    "PUBLICATION TABLES IN SCHEMA",
    "TEXT SEARCH CONFIGURATION",
    "TEXT SEARCH DICTIONARY",
    "TEXT SEARCH TEMPLATE",
    "TEXT SEARCH PARSER",
    "FOREIGN DATA WRAPPER",
    "PROCEDURAL LANGUAGE",
    "DATABASE PROPERTIES",
    "SUBSCRIPTION TABLE",
    "SEQUENCE OWNED BY",
    "PUBLICATION TABLE",
    "MATERIALIZED VIEW",
    "CHECK CONSTRAINT",
    "OPERATOR FAMILY",
    "OPERATOR CLASS",
    "FOREIGN SERVER",
    "SECURITY LABEL",
    "BLOB METADATA",
    "EVENT TRIGGER",
    "FOREIGN TABLE",
    "FK CONSTRAINT",
    "ACCESS METHOD",
    "LARGE OBJECTS",
    "INDEX ATTACH",
    "SEQUENCE SET",
    "TABLE ATTACH",
    "USER MAPPING",
    "ROW SECURITY",
    "DEFAULT ACL",
    "SHELL TYPE",
    "TABLE DATA",
)
# Descriptions of entries whose catalog is pg_class (a table in a schema named "DATA" stays
# a TABLE: the catalog OID decides).
_PG_CLASS_DESCS = ("MATERIALIZED VIEW", "FOREIGN TABLE", "SEQUENCE", "TABLE", "VIEW", "INDEX")
MAX_LARGE_OBJECTS_PER_ENTRY = 1000  # pg_dump 17 groups large objects into entries of <= 1000


@dataclass(frozen=True)
class TocEntry:
    """One line of ``pg_restore --list``: ``ID; CATALOG OID DESC SCHEMA NAME OWNER``."""

    dump_id: int
    catalog_oid: int
    oid: int
    desc: str
    rest: str


@dataclass(frozen=True)
class Toc:
    """A parsed ``pg_restore --list``: header fields and entries."""

    header: dict[str, str]
    entries: tuple[TocEntry, ...]

    @property
    def format(self) -> str:
        return self.header.get("Format", "")

    @property
    def dbname(self) -> str:
        return self.header.get("dbname", "")

    @property
    def declared_entries(self) -> int:
        try:
            return int(self.header.get("TOC Entries", "-1"))
        except ValueError:
            return -1

    def of(self, desc: str, catalog_oid: int | None = None) -> list[TocEntry]:
        return [
            e
            for e in self.entries
            if e.desc == desc and (catalog_oid is None or e.catalog_oid == catalog_oid)
        ]

    def oids(self, desc: str, catalog_oid: int | None = None) -> set[int]:
        return {e.oid for e in self.of(desc, catalog_oid)}


def _entry_desc(catalog_oid: int, text: str) -> tuple[str, str]:
    candidates = _PG_CLASS_DESCS if catalog_oid == PG_CLASS else _MULTIWORD
    for desc in candidates:
        if text == desc or text.startswith(desc + " "):
            return desc, text[len(desc) + 1 :]
    first, _sep, rest = text.partition(" ")
    return first, rest


def parse_toc(text: str) -> Toc:
    """Parse ``pg_restore --list`` output (comment lines start with ``;``)."""
    header: dict[str, str] = {}
    entries: list[TocEntry] = []
    for raw in text.splitlines():
        line = raw.rstrip("\n")
        if line.startswith(";"):
            body = line[1:].strip()
            if body.startswith("Archive created at "):
                header["Archive created at"] = body[len("Archive created at ") :]
            elif ": " in body:
                key, _sep, value = body.partition(": ")
                header.setdefault(key.strip(), value.strip())
            continue
        m = _TOC_LINE_RE.match(line)
        if not m:
            continue
        catalog_oid = int(m[2])
        desc, rest = _entry_desc(catalog_oid, m[4])
        entries.append(TocEntry(int(m[1]), catalog_oid, int(m[3]), desc, rest))
    return Toc(header, tuple(entries))


# What the database holds (counted in the dump's own snapshot) -----------------------------------

EXPECTED_KINDS = (
    "tables",
    "table_data",
    "sequences",
    "views",
    "materialized_views",
    "large_objects",
)


@dataclass(frozen=True)
class Inventory:
    """The objects a dump of a database must contain, by kind, with OIDs and names."""

    relations: dict[str, dict[int, str]] = field(default_factory=dict)
    large_objects: int = 0

    def counts(self) -> dict[str, int]:
        out = {kind: len(self.relations.get(kind, {})) for kind in EXPECTED_KINDS[:-1]}
        out["large_objects"] = self.large_objects
        return out


_RELKIND_KINDS = {
    "r": ("tables",),
    "p": ("tables",),
    "f": ("tables",),
    "S": ("sequences",),
    "v": ("views",),
    "m": ("materialized_views",),
}


def inventory_from_rows(
    rows: t.Iterable[t.Mapping[str, t.Any]], large_objects: int, *, in_recovery: bool = False
) -> Inventory:
    """Build the inventory from ``INVENTORY_SQL`` rows (oid, relkind, relpersistence, name).

    Data is dumped for ordinary tables, permanent and unlogged (pg_dump leaves unlogged data
    out on a standby); partitioned parents, foreign tables and views have none.
    """
    relations: dict[str, dict[int, str]] = {kind: {} for kind in EXPECTED_KINDS[:-1]}
    for row in rows:
        relkind = str(row["relkind"])
        oid = int(row["oid"])
        name = str(row["name"])
        for kind in _RELKIND_KINDS.get(relkind, ()):
            relations[kind][oid] = name
        if relkind == "r" and not (in_recovery and row.get("relpersistence") == "u"):
            relations["table_data"][oid] = name
    return Inventory(relations, int(large_objects))


INVENTORY_SQL = (
    "SELECT c.oid::bigint AS oid, c.relkind::text AS relkind,"
    " c.relpersistence::text AS relpersistence,"
    " pg_catalog.format('%I.%I', n.nspname, c.relname) AS name"
    " FROM pg_catalog.pg_class c"
    " JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace"
    " WHERE c.relkind IN ('r', 'p', 'f', 'S', 'v', 'm')"
    " AND c.relpersistence <> 't'"
    " AND n.nspname NOT IN ('pg_catalog', 'information_schema')"
    " AND n.nspname !~ '^pg_(toast|temp_|toast_temp_)'"
    # objects of extensions are recreated by CREATE EXTENSION, not dumped
    " AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_depend d"
    " WHERE d.classid = 'pg_catalog.pg_class'::pg_catalog.regclass AND d.objid = c.oid"
    " AND d.deptype = 'e')"
    " AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_depend d"
    " WHERE d.classid = 'pg_catalog.pg_namespace'::pg_catalog.regclass AND d.objid = n.oid"
    " AND d.deptype = 'e')"
)
LARGE_OBJECTS_SQL = "SELECT count(*) AS n FROM pg_catalog.pg_largeobject_metadata"
DATABASE_SQL = (
    "SELECT pg_catalog.to_jsonb(d) AS db, pg_catalog.pg_encoding_to_char(d.encoding) AS encoding,"
    " pg_catalog.pg_is_in_recovery() AS in_recovery"
    " FROM pg_catalog.pg_database d WHERE d.datname = pg_catalog.current_database()"
)
GLOBALS_SQL = (
    "SELECT (SELECT count(*) FROM pg_catalog.pg_roles WHERE rolname !~ '^pg_') AS roles,"
    " (SELECT count(*) FROM pg_catalog.pg_tablespace"
    " WHERE spcname NOT IN ('pg_default', 'pg_global')) AS tablespaces"
)


def database_properties(row: t.Mapping[str, t.Any]) -> dict[str, t.Any]:
    """Encoding and locale of a database from ``DATABASE_SQL`` (any PostgreSQL 13+)."""
    db = row.get("db") or {}
    provider = {"c": "libc", "i": "icu", "b": "builtin"}.get(str(db.get("datlocprovider", "c")))
    return {
        "encoding": row.get("encoding") or "",
        "lc_collate": db.get("datcollate") or "",
        "lc_ctype": db.get("datctype") or "",
        "locale_provider": provider or "libc",
        "icu_locale": db.get("daticulocale") or db.get("datlocale") or None,
    }


# Comparing the archive with what it must hold ---------------------------------------------------


def toc_objects(toc: Toc) -> dict[str, t.Any]:
    """Objects found in the archive, by kind (counts, and OIDs where the TOC gives them)."""
    found: dict[str, t.Any] = {
        "tables": toc.oids("TABLE", PG_CLASS) | toc.oids("FOREIGN TABLE", PG_CLASS),
        "table_data": {e.oid for e in toc.of("TABLE DATA") if e.oid},
        "sequences": toc.oids("SEQUENCE", PG_CLASS),
        "views": toc.oids("VIEW", PG_CLASS),
        "materialized_views": toc.oids("MATERIALIZED VIEW", PG_CLASS),
    }
    blobs = toc.of("BLOB", PG_LARGEOBJECT)
    groups = toc.of("BLOB METADATA")
    found["large_objects"] = len(blobs)
    found["large_object_groups"] = len(groups)
    found["large_object_data"] = len(toc.of("BLOBS")) + len(toc.of("LARGE OBJECTS"))
    return found


def compare_objects(
    expected: t.Mapping[str, int],
    toc: Toc,
    *,
    names: Inventory | None = None,
) -> tuple[dict[str, dict[str, t.Any]], list[str]]:
    """Check the archive's TOC against the expected counts; return (objects, problems).

    Missing objects are problems; more than expected is not (an extension's configuration
    table brings its TABLE DATA along). With ``names`` (the inventory taken at dump time),
    the missing objects are named.
    """
    found = toc_objects(toc)
    objects: dict[str, dict[str, t.Any]] = {}
    problems: list[str] = []
    for kind in EXPECTED_KINDS[:-1]:
        want = int(expected.get(kind, 0))
        have = found[kind]
        objects[kind] = {"expected": want, "found": len(have)}
        if len(have) < want or (names is not None and set(names.relations[kind]) - have):
            missing = ""
            if names is not None:
                gone = sorted(names.relations[kind][o] for o in set(names.relations[kind]) - have)
                missing = f" (missing: {', '.join(gone[:5])}{', ...' if len(gone) > 5 else ''})"
            problems.append(
                f"{kind.replace('_', ' ')}: {len(have)} in the archive, {want} in the"
                f" database{missing}"
            )
    want_lo = int(expected.get("large_objects", 0))
    if found["large_object_groups"]:
        # pg_dump 17+: one entry per group of up to 1000 large objects of one owner
        groups = found["large_object_groups"]
        objects["large_objects"] = {"expected": want_lo, "found": None, "groups": groups}
        if groups < -(-want_lo // MAX_LARGE_OBJECTS_PER_ENTRY) or groups > want_lo:
            problems.append(
                f"large objects: {groups} groups in the archive cannot hold the {want_lo}"
                " large objects of the database"
            )
    else:
        have_lo = found["large_objects"]
        objects["large_objects"] = {"expected": want_lo, "found": have_lo}
        if have_lo != want_lo:
            problems.append(f"large objects: {have_lo} in the archive, {want_lo} in the database")
    if want_lo and not found["large_object_data"]:
        problems.append("large objects: the archive has no large object data")
    return objects, problems


def parse_globals(text: str) -> dict[str, t.Any]:
    """What a ``pg_dumpall --globals-only`` file holds: roles, tablespaces, completeness."""
    roles = tablespaces = 0
    for line in text.splitlines():
        if line.startswith("CREATE ROLE "):
            roles += 1
        elif line.startswith("CREATE TABLESPACE "):
            tablespaces += 1
    complete = "-- PostgreSQL database cluster dump complete" in text[-4096:]
    return {"roles": roles, "tablespaces": tablespaces, "complete": complete}


def compare_globals(
    expected: t.Mapping[str, int], found: t.Mapping[str, t.Any]
) -> tuple[dict[str, dict[str, t.Any]], list[str]]:
    objects: dict[str, dict[str, t.Any]] = {}
    problems: list[str] = []
    if not found.get("complete"):
        problems.append("the file does not end with pg_dumpall's completion line (truncated?)")
    for kind in ("roles", "tablespaces"):
        want, have = int(expected.get(kind, 0)), int(found.get(kind, 0))
        objects[kind] = {"expected": want, "found": have}
        if have < want:
            problems.append(f"{kind}: {have} in the file, {want} in the cluster")
    return objects, problems


def expected_counts(record: DumpRecord) -> dict[str, int]:
    """The expected counts recorded at dump time (for re-verification without a server)."""
    objects = record.verification.get("objects") or {}
    out: dict[str, int] = {}
    for kind, value in objects.items():
        if isinstance(value, dict) and isinstance(value.get("expected"), int):
            out[kind] = int(value["expected"])
    return out


# Checksums ---------------------------------------------------------------------------------------


def sha256_file(path: str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            block = fh.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def list_files(root: str) -> tuple[list[str], int]:
    """Relative paths (sorted, ``/``-separated) and total size of the files under ``root``,
    the catalog record excluded."""
    files: list[str] = []
    size = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for fn in sorted(filenames):
            full = os.path.join(dirpath, fn)
            rel = os.path.relpath(full, root).replace(os.sep, "/")
            if rel == RECORD_NAME:
                continue
            files.append(rel)
            size += os.lstat(full).st_size
    return sorted(files), size


def checksum_manifest(root: str, fmt: str) -> tuple[str, str]:
    """(checksum, SHA256SUMS text) of the dump's files under ``root`` (``dumps/<label>/``).

    One ``<sha256>  <path>`` line per file of the archive, as ``sha256sum`` writes them, so
    ``sha256sum -c SHA256SUMS`` checks a dump by hand. The checksum is the file's own
    SHA-256 for a single-file dump, the manifest's for the directory format.
    """
    name = archive_name(fmt)
    if fmt == "directory":
        sub, _size = list_files(os.path.join(root, name))
        paths = [f"{name}/{p}" for p in sub]
    else:
        paths = [name]
    lines = [f"{sha256_file(os.path.join(root, *p.split('/')))}  {p}\n" for p in paths]
    text = "".join(lines)
    if fmt == "directory":
        return hashlib.sha256(text.encode()).hexdigest(), text
    return lines[0].split()[0], text


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="microseconds")


# Verification ----------------------------------------------------------------------------------


@dataclass
class Verification:
    """The outcome of reading a dump back: what the record's ``verification`` holds."""

    tool: str
    ok: bool = True
    problems: list[str] = field(default_factory=list)
    objects: dict[str, t.Any] = field(default_factory=dict)
    summary: str = ""
    toc_entries: int = 0
    seconds: float = 0.0

    def problem(self, text: str) -> None:
        self.ok = False
        self.problems.append(text)

    @property
    def message(self) -> str:
        if self.problems:
            return "; ".join(self.problems)
        return self.summary

    def to_dict(self) -> dict[str, t.Any]:
        return {
            "tool": self.tool,
            "ok": self.ok,
            "message": self.message,
            "objects": self.objects,
            "toc_entries": self.toc_entries,
            "seconds": round(self.seconds, 3),
        }


def _failure_text(res: runner.CommandResult) -> str:
    return runner.failure(res).msg


def verify_archive(
    root: str,
    fmt: str,
    database: str,
    expected: t.Mapping[str, int],
    *,
    pg_restore: Tool,
    names: Inventory | None = None,
) -> Verification:
    """Read a database dump under ``root`` back: its TOC must list the expected objects, and
    every data block must read and decompress (``pg_restore`` into /dev/null)."""
    started = time.monotonic()
    report = Verification(tool="pg_restore")
    archive = os.path.join(root, archive_name(fmt))
    tmp = tempfile.mkdtemp(prefix="pitr-dump-toc-")
    try:
        list_file = os.path.join(tmp, "toc.list")
        res = runner.run(restore_list_argv(pg_restore, archive, fmt, list_file), check=False)
        if res.rc != 0:
            report.problem(f"the table of contents cannot be read: {_failure_text(res)}")
            toc = Toc({}, ())
        else:
            with open(list_file, encoding="utf-8", errors="replace") as fh:
                toc = parse_toc(fh.read())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if report.ok:
        if toc.format.upper() != fmt.upper():
            report.problem(f"the archive's format is {toc.format or 'unknown'}, not {fmt}")
        if toc.dbname != database:
            report.problem(f"the archive is a dump of {toc.dbname!r}, not {database!r}")
        report.toc_entries = len(toc.entries)
        objects, problems = compare_objects(expected, toc, names=names)
        report.objects = objects
        for p in problems:
            report.problem(p)
    res = runner.run(restore_read_argv(pg_restore, archive, fmt), check=False)
    if res.rc != 0:
        report.problem(f"the archive does not read to its end: {_failure_text(res)}")
    report.seconds = time.monotonic() - started
    if report.ok:
        counts = ", ".join(
            f"{v['found'] if v.get('found') is not None else v.get('groups')} {k.replace('_', ' ')}"
            for k, v in report.objects.items()
        )
        report.summary = (
            f"{fmt} archive of {database}: {report.toc_entries} TOC entries with every expected"
            f" object ({counts}); every data block read back by pg_restore"
        )
    return report


def verify_globals_file(root: str, expected: t.Mapping[str, int]) -> Verification:
    """Check a ``pg_dumpall --globals-only`` file: complete, with every role and tablespace."""
    started = time.monotonic()
    report = Verification(tool="pitr.postgresql globals check")
    try:
        with open(os.path.join(root, GLOBALS_FILE), encoding="utf-8", errors="replace") as fh:
            found = parse_globals(fh.read())
    except OSError as exc:
        report.problem(f"{GLOBALS_FILE} cannot be read: {exc.strerror}")
        found = {}
    objects, problems = compare_globals(expected, found)
    report.objects = objects
    for p in problems:
        report.problem(p)
    report.seconds = time.monotonic() - started
    if report.ok:
        report.summary = (
            f"globals: {found['roles']} roles and {found['tablespaces']} tablespaces, complete"
        )
    return report


def check_checksum(root: str, record: DumpRecord) -> str:
    """Recompute the checksum of a stored dump; return it, or raise IntegrityError naming
    the files that differ from ``SHA256SUMS``."""
    try:
        checksum, text = checksum_manifest(root, record.format)
    except OSError as exc:
        raise IntegrityError(
            f"dump {record.label} cannot be read: {exc.strerror} ({exc.filename})",
            label=record.label,
        ) from exc
    if checksum == record.checksum:
        return checksum
    differing: list[str] = []
    with contextlib.suppress(OSError):
        with open(os.path.join(root, SUMS_FILE), encoding="utf-8") as fh:
            recorded = set(fh.read().splitlines())
        now = set(text.splitlines())
        differing = sorted({line.split("  ", 1)[-1] for line in recorded ^ now})
    raise IntegrityError(
        f"dump {record.label} fails its checksum (sha256 {checksum}, recorded"
        f" {record.checksum})"
        + (f"; files that differ: {', '.join(differing[:10])}" if differing else "")
        + ": the stored dump is damaged or incomplete",
        label=record.label,
        checksum=checksum,
        recorded_checksum=record.checksum,
    )


# Taking dumps ----------------------------------------------------------------------------------


def posix_storage(repo: Repository) -> PosixStorage:
    if not isinstance(repo.storage, PosixStorage):
        raise RepositoryError(
            "logical dumps need a POSIX repository (pg_dump writes into a local directory)"
        )
    return repo.storage


def clean_staging(repo: Repository) -> list[str]:
    """Remove what interrupted dumps left in ``staging/dumps/`` (hold ``LOCK_NAME``)."""
    storage = posix_storage(repo)
    parent_key = repo.dump_staging_prefix("x").rsplit("/", 1)[0]
    parent = storage.path(parent_key)
    removed: list[str] = []
    if not os.path.isdir(parent):
        return removed
    for name in sorted(os.listdir(parent)):
        storage.delete_tree(f"{parent_key}/{name}")
        removed.append(name)
    return removed


def _private(root: str) -> None:
    """Dumps hold data (globals: password hashes): owner-only, whatever the umask was."""
    for dirpath, _dirs, files in os.walk(root):
        os.chmod(dirpath, 0o700)
        for fn in files:
            os.chmod(os.path.join(dirpath, fn), 0o600)


@dataclass(frozen=True)
class DumpTarget:
    """One dump a run will take: a database, or the globals."""

    label: str
    database: str
    scope: str = "database"


@dataclass
class DumpOutcome:
    """What happened to one dump target, for the module result."""

    record: DumpRecord
    changed: bool
    cmd: list[str]
    dump_seconds: float = 0.0
    verify_seconds: float = 0.0
    message: str = ""
    stderr: str = ""

    def to_dict(self) -> dict[str, t.Any]:
        d = self.record.to_dict()
        d["usable"] = usable(self.record)
        return {
            "label": self.record.label,
            "database": self.record.database,
            "scope": self.record.scope,
            "changed": self.changed,
            "usable": usable(self.record),
            "cmd": self.cmd,
            "dump_seconds": round(self.dump_seconds, 3),
            "verify_seconds": round(self.verify_seconds, 3),
            "message": self.message,
            "record": d,
        }


def _sql(text: str) -> t.Any:
    # psycopg is imported by the connection helper only (postgres.py); static SQL here.
    from ansible_collections.pitr.postgresql.plugins.module_utils import postgres

    return postgres.sql.SQL(text)


@contextlib.contextmanager
def connect(params: t.Mapping[str, t.Any]) -> t.Iterator[t.Any]:
    """A connection through the connection helper that also honours ``passfile``.

    pg_dump gets the password file as ``PGPASSFILE`` in its environment; libpq reads the same
    variable when psycopg connects, so it is set for the duration of the connection attempt.
    """
    from ansible_collections.pitr.postgresql.plugins.module_utils import postgres

    passfile = params.get("passfile")
    saved = os.environ.get("PGPASSFILE")
    if passfile:
        os.environ["PGPASSFILE"] = str(passfile)
    try:
        conn = postgres.connect(params)
    finally:
        if passfile:
            if saved is None:
                os.environ.pop("PGPASSFILE", None)
            else:
                os.environ["PGPASSFILE"] = saved
    with conn:
        yield conn


def read_inventory(conn: t.Any) -> tuple[Inventory, dict[str, t.Any]]:
    """The objects a dump of the connected database must hold, and its properties."""
    from ansible_collections.pitr.postgresql.plugins.module_utils import postgres

    db = postgres.fetch_one(conn, _sql(DATABASE_SQL)) or {}
    rows = postgres.fetch_all(conn, _sql(INVENTORY_SQL))
    lo = postgres.fetch_one(conn, _sql(LARGE_OBJECTS_SQL)) or {"n": 0}
    inventory = inventory_from_rows(rows, int(lo["n"]), in_recovery=bool(db.get("in_recovery")))
    return inventory, database_properties(db)


def _failed_record(
    target: DumpTarget,
    run: str,
    message: str,
    *,
    tool: str,
    fmt: str,
    opts: DumpOptions,
    server_version: str,
    client: Tool,
    start_time: str,
) -> DumpRecord:
    return DumpRecord(
        label=target.label,
        database=target.database,
        status="failed",
        verified=False,
        verification={"tool": tool, "ok": False, "message": message, "objects": {}},
        start_time=start_time,
        end_time=now_iso(),
        server_version=server_version,
        pg_dump_version=client.version,
        format=fmt,
        jobs=opts.jobs if fmt == "directory" else 1,
        scope=target.scope,
        run=run,
        compression=opts.compression if target.scope == "database" else "",
        large_objects=opts.large_objects and target.scope == "database",
    )


def _run_program(
    argv: list[str], env: t.Mapping[str, str], timeout: float
) -> tuple[int, str, float]:
    started = time.monotonic()
    try:
        res = runner.run(argv, env=env, timeout=timeout or None, check=False)
        rc, stderr = res.rc, res.stderr
        msg = _failure_text(res) if rc != 0 else ""
    except CommandError as exc:  # timed out, or could not start
        rc, stderr, msg = -1, str(exc.context.get("stderr", "")), exc.msg
    return (
        rc,
        (msg if rc != 0 else "") + ("\n" + stderr if rc != 0 else ""),
        (time.monotonic() - started),
    )


def _finish(
    repo: Repository,
    staging_key: str,
    record: DumpRecord,
) -> None:
    """Record written into the staging directory last, then the whole dump renamed into
    ``dumps/<label>/``: files and record appear together."""
    storage = posix_storage(repo)
    write_dump(repo, record, key=f"{staging_key}/{RECORD_NAME}")
    storage.delete_tree(repo.dump_prefix(record.label))  # a failed earlier attempt
    storage.rename_tree(staging_key, repo.dump_prefix(record.label))


def _record_failure(repo: Repository, staging_key: str, record: DumpRecord) -> None:
    storage = posix_storage(repo)
    storage.delete_tree(staging_key)
    storage.delete_tree(repo.dump_prefix(record.label))
    write_dump(repo, record)


def take_database_dump(
    repo: Repository,
    target: DumpTarget,
    run: str,
    opts: DumpOptions,
    *,
    params: t.Mapping[str, t.Any],
    env: t.Mapping[str, str],
    pg_dump: Tool,
    pg_restore: Tool,
    server_version: str,
) -> DumpOutcome:
    """Dump one database into staging, verify it, catalogue it (hold ``LOCK_NAME``)."""
    from ansible_collections.pitr.postgresql.plugins.module_utils import postgres

    storage = posix_storage(repo)
    staging_key = repo.dump_staging_prefix(target.label)
    staging_dir = storage.path(staging_key)
    storage.delete_tree(staging_key)
    os.makedirs(staging_dir, mode=0o700)
    archive = os.path.join(staging_dir, archive_name(opts.format))
    start_time = now_iso()
    conn_params = {**params, "login_db": target.database}
    # The counting session exports its snapshot and stays open until pg_dump is done, so
    # that pg_dump dumps exactly what was counted.
    with connect(conn_params) as conn:
        postgres.execute(conn, _sql("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY"))
        snap = postgres.fetch_one(conn, _sql("SELECT pg_catalog.pg_export_snapshot() AS s"))
        inventory, properties = read_inventory(conn)
        snapshot = str(snap["s"]) if snap else None
        argv = pg_dump_argv(pg_dump, target.database, archive, opts, snapshot=snapshot)
        rc, failure_text, seconds = _run_program(argv, env, opts.timeout)
        with contextlib.suppress(PitrError):
            postgres.execute(conn, _sql("ROLLBACK"))
    end_time = now_iso()
    if rc != 0:
        first_line = failure_text.strip().splitlines()[0] if failure_text.strip() else ""
        record = _failed_record(
            target,
            run,
            first_line,
            tool="pg_dump",
            fmt=opts.format,
            opts=opts,
            server_version=server_version,
            client=pg_dump,
            start_time=start_time,
        )
        _record_failure(repo, staging_key, record)
        return DumpOutcome(
            record,
            True,
            argv,
            seconds,
            message=f"pg_dump failed: {first_line}",
            stderr=failure_text[-4000:],
        )
    _private(staging_dir)
    report = verify_archive(
        staging_dir,
        opts.format,
        target.database,
        inventory.counts(),
        pg_restore=pg_restore,
        names=inventory,
    )
    checksum, sums = checksum_manifest(staging_dir, opts.format)
    storage.put(f"{staging_key}/{SUMS_FILE}", sums.encode(), overwrite=True)
    files, size = list_files(staging_dir)
    record = DumpRecord(
        label=target.label,
        database=target.database,
        status="ok" if report.ok else "failed",
        verified=report.ok,
        verification=report.to_dict(),
        start_time=start_time,
        end_time=end_time,
        server_version=server_version,
        pg_dump_version=pg_dump.version,
        format=opts.format,
        jobs=opts.jobs,
        size=size,
        checksum=checksum,
        files=files,
        scope="database",
        run=run,
        compression=opts.compression,
        large_objects=opts.large_objects,
        database_properties=properties,
    )
    _finish(repo, staging_key, record)
    return DumpOutcome(record, True, argv, seconds, report.seconds, message=report.message)


def take_globals_dump(
    repo: Repository,
    target: DumpTarget,
    run: str,
    opts: DumpOptions,
    *,
    params: t.Mapping[str, t.Any],
    env: t.Mapping[str, str],
    pg_dumpall: Tool,
    server_version: str,
) -> DumpOutcome:
    """``pg_dumpall --globals-only`` into staging, checked, catalogued (hold ``LOCK_NAME``)."""
    from ansible_collections.pitr.postgresql.plugins.module_utils import postgres

    storage = posix_storage(repo)
    staging_key = repo.dump_staging_prefix(target.label)
    staging_dir = storage.path(staging_key)
    storage.delete_tree(staging_key)
    os.makedirs(staging_dir, mode=0o700)
    start_time = now_iso()
    with connect(params) as conn:
        counts = postgres.fetch_one(conn, _sql(GLOBALS_SQL)) or {}
    expected = {k: int(counts.get(k, 0)) for k in ("roles", "tablespaces")}
    argv = pg_dumpall_globals_argv(
        pg_dumpall,
        os.path.join(staging_dir, GLOBALS_FILE),
        no_role_passwords=opts.no_role_passwords,
        login_db=params.get("login_db"),
    )
    rc, failure_text, seconds = _run_program(argv, env, opts.timeout)
    end_time = now_iso()
    if rc != 0:
        first_line = failure_text.strip().splitlines()[0] if failure_text.strip() else ""
        record = _failed_record(
            target,
            run,
            first_line,
            tool="pg_dumpall",
            fmt=GLOBALS_FORMAT,
            opts=opts,
            server_version=server_version,
            client=pg_dumpall,
            start_time=start_time,
        )
        _record_failure(repo, staging_key, record)
        return DumpOutcome(
            record,
            True,
            argv,
            seconds,
            message=f"pg_dumpall failed: {first_line}",
            stderr=failure_text[-4000:],
        )
    _private(staging_dir)
    report = verify_globals_file(staging_dir, expected)
    checksum, sums = checksum_manifest(staging_dir, GLOBALS_FORMAT)
    storage.put(f"{staging_key}/{SUMS_FILE}", sums.encode(), overwrite=True)
    files, size = list_files(staging_dir)
    record = DumpRecord(
        label=target.label,
        database=GLOBALS,
        status="ok" if report.ok else "failed",
        verified=report.ok,
        verification=report.to_dict(),
        start_time=start_time,
        end_time=end_time,
        server_version=server_version,
        pg_dump_version=pg_dumpall.version,
        format=GLOBALS_FORMAT,
        jobs=1,
        size=size,
        checksum=checksum,
        files=files,
        scope=GLOBALS,
        run=run,
        compression="",
        large_objects=False,
    )
    _finish(repo, staging_key, record)
    return DumpOutcome(record, True, argv, seconds, report.seconds, message=report.message)


def reverify(
    repo: Repository, label: str, *, pg_restore: Tool, check_mode: bool = False
) -> DumpOutcome:
    """Read a stored dump back again (checksum, TOC against the recorded counts, full read)
    and update its record: a dump that no longer verifies becomes unusable."""
    record = read_dump(repo, label)
    if record is None:
        raise DumpError(f"there is no dump labelled {label} in {repo.describe()}", label=label)
    root = posix_storage(repo).path(repo.dump_prefix(label))
    if record.scope == GLOBALS:
        report = verify_globals_file(root, expected_counts(record))
    else:
        report = verify_archive(
            root, record.format, record.database, expected_counts(record), pg_restore=pg_restore
        )
    try:
        check_checksum(root, record)
    except IntegrityError as exc:
        report.problem(exc.msg)
    if not report.ok and record.status == "failed" and not record.checksum:
        # pg_dump itself failed: there is nothing to read back, the record stays as it is
        return DumpOutcome(record, False, [], verify_seconds=report.seconds, message=report.message)
    updated = record.with_changes(
        status="ok" if report.ok else "failed",
        verified=report.ok,
        verification={
            **report.to_dict(),
            "objects": report.objects or record.verification.get("objects", {}),
        },
    )
    changed = (updated.status, updated.verified) != (record.status, record.verified)
    if record.status == "expiring":
        updated = record  # retention is removing it: leave its record alone
        changed = False
    if changed and not check_mode:
        with posix_storage(repo).lock(LOCK_NAME, purpose=f"verify dump {label}"):
            write_dump(repo, updated)
    return DumpOutcome(updated, changed, [], verify_seconds=report.seconds, message=report.message)


# The logical_dump module -------------------------------------------------------------------------

LIST_DATABASES_SQL = (
    "SELECT datname FROM pg_catalog.pg_database"
    " WHERE datallowconn AND NOT datistemplate ORDER BY datname"
)


def options_from_params(params: t.Mapping[str, t.Any]) -> DumpOptions:
    return DumpOptions(
        format=params.get("format") or "custom",
        jobs=int(params.get("jobs") or 1),
        compression=str(params.get("compression") or ""),
        large_objects=bool(params.get("large_objects", True)),
        no_role_passwords=bool(params.get("no_role_passwords", False)),
        timeout=float(params.get("timeout") or 0),
    ).check()


def _check_repository(repo: Repository, conn: t.Any) -> list[str]:
    """Refuse an uninitialised repository (an unmounted one looks empty) or another cluster's."""
    from ansible_collections.pitr.postgresql.plugins.module_utils import postgres

    identity = repo.identity()
    if identity is None:
        raise DumpError(
            f"repository {repo.describe()} has no identity yet: set up archiving into it first"
            " (the pitr.postgresql.archiving role, or `pitr-wal --repo PATH init --pgdata"
            " DATADIR`), or check that its storage is mounted",
            repository=repo.describe(),
        )
    try:
        sysid = postgres.system_identifier(conn)
    except PitrError as exc:
        if postgres.is_insufficient_privilege(exc):
            return [
                "the role may not read the system identifier (pg_control_system()): the dump is"
                " written without checking that the repository belongs to this cluster"
            ]
        raise
    if sysid != identity.system_identifier:
        raise DumpError(
            f"repository {repo.describe()} belongs to the cluster with system identifier"
            f" {identity.system_identifier}, not to this server ({sysid}): dump into this"
            " cluster's own repository",
            repository=repo.describe(),
        )
    return []


def plan_targets(run: str, databases: t.Sequence[str], *, with_globals: bool) -> list[DumpTarget]:
    """The dumps of one run, in order: each database, then the globals."""
    targets = [DumpTarget(dump_label(run, db), db) for db in databases]
    if with_globals:
        targets.append(DumpTarget(dump_label(run, GLOBALS, GLOBALS), GLOBALS, GLOBALS))
    labels = [x.label for x in targets]
    if len(set(labels)) != len(labels):  # pragma: no cover - slugs are unique by construction
        raise DumpError(f"two dumps of run {run} would share a label: {labels}")
    return targets


def run_logical_dump(
    params: t.Mapping[str, t.Any], *, check_mode: bool = False
) -> dict[str, t.Any]:
    """Everything the ``logical_dump`` module does; returns its result (``failed`` included)."""
    from ansible_collections.pitr.postgresql.plugins.module_utils import postgres

    repo = Repository.open_posix(str(params["repository_path"]))
    storage = posix_storage(repo)
    storage.ensure_root()
    opts = options_from_params(params)
    state = params.get("state") or "present"
    pg_restore = find_tool("pg_restore", params.get("pg_bindir"))
    if state == "verified":
        if not params.get("label"):
            raise DumpError("state=verified needs the label of the dump to verify")
        out = reverify(repo, params["label"], pg_restore=pg_restore, check_mode=check_mode)
        return _dump_result([out], check_mode, run="", warnings=[])
    pg_dump = find_tool("pg_dump", params.get("pg_bindir"))
    run = check_label(params.get("label") or default_run_label(), "run label")
    requested = list(params.get("databases") or [])
    all_databases = bool(params.get("all_databases"))
    if all_databases and requested:
        raise DumpError("set either databases or all_databases, not both")
    with_globals = params.get("globals")
    with_globals = all_databases if with_globals is None else bool(with_globals)
    with connect(params) as conn:
        server_version = postgres.format_server_version(conn.info.server_version)
        server_major = postgres.server_major(conn)
        warnings = _check_repository(repo, conn)
        existing = [r["datname"] for r in postgres.fetch_all(conn, _sql(LIST_DATABASES_SQL))]
    if pg_dump.major < server_major:
        raise DumpError(
            f"pg_dump {pg_dump.version} is older than the server ({server_version}) and cannot"
            f" dump it: install the PostgreSQL {server_major} client programs or set pg_bindir",
            pg_dump_version=pg_dump.version,
            server_version=server_version,
        )
    if all_databases:
        databases = existing
    else:
        missing = [db for db in requested if db not in existing]
        if missing:
            raise DumpError(
                f"no database {', '.join(repr(m) for m in missing)} on the server (databases:"
                f" {', '.join(existing)}); templates and databases that refuse connections"
                " are not dumped",
                missing=missing,
            )
        databases = list(dict.fromkeys(requested))
    if not databases and not with_globals:
        raise DumpError("nothing to dump: name databases, or set all_databases or globals")
    targets = plan_targets(run, databases, with_globals=with_globals)
    # each program start costs ~50 ms: pg_dumpall's version is asked only when it runs
    pg_dumpall = find_tool("pg_dumpall", params.get("pg_bindir")) if with_globals else pg_dump
    outcomes: list[DumpOutcome] = []
    todo: list[DumpTarget] = []
    for target in targets:
        rec = read_dump(repo, target.label)
        if rec is not None and rec.status == "ok":
            outcomes.append(DumpOutcome(rec, False, [], message=f"dump {target.label} exists"))
        else:
            todo.append(target)
    if check_mode:
        outcomes += [_planned(repo, x, run, opts, pg_dump, pg_dumpall, params) for x in todo]
        return _dump_result(outcomes, check_mode, run=run, warnings=warnings)
    env = backup.libpq_env(params, params.get("passfile"))
    lock_wait = float(params.get("lock_wait") or 0)
    with storage.lock(LOCK_NAME, purpose=f"logical dump {run}", wait=lock_wait):
        clean_staging(repo)
        for target in todo:
            try:
                if target.scope == GLOBALS:
                    out = take_globals_dump(
                        repo,
                        target,
                        run,
                        opts,
                        params=params,
                        env=env,
                        pg_dumpall=pg_dumpall,
                        server_version=server_version,
                    )
                else:
                    out = take_database_dump(
                        repo,
                        target,
                        run,
                        opts,
                        params=params,
                        env=env,
                        pg_dump=pg_dump,
                        pg_restore=pg_restore,
                        server_version=server_version,
                    )
            except StorageError:
                raise
            except PitrError as exc:
                # this database could not be dumped (dropped meanwhile, no CONNECT...):
                # catalogue the failure and go on with the others
                out = _failed_outcome(repo, target, run, opts, exc, pg_dump, server_version)
            outcomes.append(out)
    return _dump_result(outcomes, check_mode, run=run, warnings=warnings)


def _failed_outcome(
    repo: Repository,
    target: DumpTarget,
    run: str,
    opts: DumpOptions,
    exc: PitrError,
    client: Tool,
    server_version: str,
) -> DumpOutcome:
    fmt = GLOBALS_FORMAT if target.scope == GLOBALS else opts.format
    record = _failed_record(
        target,
        run,
        exc.msg,
        tool="pitr.postgresql",
        fmt=fmt,
        opts=opts,
        server_version=server_version,
        client=client,
        start_time=now_iso(),
    )
    _record_failure(repo, repo.dump_staging_prefix(target.label), record)
    return DumpOutcome(record, True, [], message=exc.msg)


def _planned(
    repo: Repository,
    target: DumpTarget,
    run: str,
    opts: DumpOptions,
    pg_dump: Tool,
    pg_dumpall: Tool,
    params: t.Mapping[str, t.Any],
) -> DumpOutcome:
    """What check mode reports for a dump it would take: the argv, and the objects counted."""

    staging = posix_storage(repo).path(repo.dump_staging_prefix(target.label))
    if target.scope == GLOBALS:
        argv = pg_dumpall_globals_argv(
            pg_dumpall,
            os.path.join(staging, GLOBALS_FILE),
            no_role_passwords=opts.no_role_passwords,
            login_db=params.get("login_db"),
        )
        record = DumpRecord(
            label=target.label,
            database=GLOBALS,
            status="running",
            format=GLOBALS_FORMAT,
            scope=GLOBALS,
            run=run,
            large_objects=False,
        )
        return DumpOutcome(record, True, argv, message="check mode: globals not dumped")
    argv = pg_dump_argv(
        pg_dump,
        target.database,
        os.path.join(staging, archive_name(opts.format)),
        opts,
        snapshot=SNAPSHOT_PLACEHOLDER,
    )
    with connect({**params, "login_db": target.database}) as conn:
        inventory, properties = read_inventory(conn)
    record = DumpRecord(
        label=target.label,
        database=target.database,
        status="running",
        verification={
            "tool": "pg_restore",
            "ok": False,
            "message": "check mode: not dumped",
            "objects": {k: {"expected": v, "found": None} for k, v in inventory.counts().items()},
        },
        format=opts.format,
        jobs=opts.jobs,
        scope="database",
        run=run,
        compression=opts.compression,
        large_objects=opts.large_objects,
        database_properties=properties,
    )
    return DumpOutcome(record, True, argv, message="check mode: not dumped")


def _dump_result(
    outcomes: t.Sequence[DumpOutcome], check_mode: bool, *, run: str, warnings: list[str]
) -> dict[str, t.Any]:
    changed = any(o.changed for o in outcomes)
    failed = [o for o in outcomes if not check_mode and not usable(o.record)]
    result: dict[str, t.Any] = {
        "changed": changed,
        "run": run,
        "dumps": [o.to_dict() for o in outcomes],
        "labels": [o.record.label for o in outcomes],
        "cmds": [o.cmd for o in outcomes if o.cmd],
        "usable": not failed and bool(outcomes),
    }
    if warnings:
        result["warnings"] = warnings
    if failed:
        result["failed"] = True
        result["msg"] = "; ".join(
            f"dump {o.record.label} ({o.record.database}) is not usable: {o.message}"
            for o in failed
        )
        stderr = "\n".join(o.stderr for o in failed if o.stderr)
        if stderr:
            result["stderr"] = stderr[-4000:]
    else:
        done = [o for o in outcomes if o.changed]
        verb = "would take" if check_mode else "took and verified"
        result["msg"] = (
            f"{verb} {len(done)} dump(s)"
            + (f": {', '.join(o.record.label for o in done)}" if done else "")
            + (
                f"; {len(outcomes) - len(done)} existed already"
                if len(done) < len(outcomes)
                else ""
            )
        )
    return result


# The dump_restore module -------------------------------------------------------------------------

MARKER_PREFIX = "pitr.postgresql: restored from logical dump "


def restore_marker(record: DumpRecord) -> str:
    """The comment a database restored into a new database carries (makes re-runs no-ops)."""
    return f"{MARKER_PREFIX}{record.label} ({record.database} as of {record.start_time})"


def restore_options_from_params(params: t.Mapping[str, t.Any]) -> RestoreOptions:
    single = params.get("single_transaction")
    return RestoreOptions(
        target_database=str(params.get("target_database") or ""),
        mode=params.get("mode") or "new",
        jobs=int(params.get("jobs") or 1),
        single_transaction=None if single is None else bool(single),
        no_owner=bool(params.get("no_owner")),
        no_privileges=bool(params.get("no_privileges")),
        role=str(params.get("role") or ""),
        same_locale=bool(params.get("same_locale", True)),
        owner=str(params.get("owner") or ""),
        keep_failed=bool(params.get("keep_failed")),
        verify_checksum=bool(params.get("verify_checksum", True)),
        timeout=float(params.get("timeout") or 0),
    ).check()


def select_dump(repo: Repository, label: str | None, database: str | None) -> DumpRecord:
    """The dump to restore: by label, or the newest usable dump of ``database``."""
    if label:
        record = read_dump(repo, label)
        if record is None:
            raise DumpError(f"there is no dump labelled {label} in {repo.describe()}", label=label)
        return record
    if not database:
        raise DumpError("name the dump to restore: label, or database (its newest usable dump)")
    found = usable_dumps(repo, database)
    if not found:
        raise DumpError(
            f"there is no usable dump of database {database!r} in {repo.describe()}",
            database=database,
        )
    return found[0]


def refuse_unusable(record: DumpRecord) -> None:
    if record.scope == GLOBALS:
        raise DumpError(
            f"dump {record.label} holds the globals (roles, tablespaces): restore them with"
            f" psql -f {GLOBALS_FILE} as a superuser on the new cluster before restoring"
            " databases; dump_restore restores databases only",
            label=record.label,
        )
    if not usable(record):
        raise DumpError(
            f"dump {record.label} is not usable (status {record.status}, verified"
            f" {record.verified}): {record.verification.get('message', '')}. Restore another"
            " dump, or verify this one again (logical_dump state=verified)",
            label=record.label,
            status=record.status,
        )


def create_database_sql(name: str, record: DumpRecord, opts: RestoreOptions) -> t.Any:
    """``CREATE DATABASE`` for the new database: from template0, with the dumped database's
    encoding and locale unless ``same_locale`` is off."""
    from ansible_collections.pitr.postgresql.plugins.module_utils import postgres

    sql = postgres.sql
    parts = [sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(sql.Identifier(name))]
    if opts.owner:
        parts.append(sql.SQL("OWNER {}").format(sql.Identifier(opts.owner)))
    props = record.database_properties if opts.same_locale else {}
    if props.get("encoding"):
        parts.append(sql.SQL("ENCODING {}").format(sql.Literal(props["encoding"])))
    if props.get("lc_collate"):
        parts.append(sql.SQL("LC_COLLATE {}").format(sql.Literal(props["lc_collate"])))
    if props.get("lc_ctype"):
        parts.append(sql.SQL("LC_CTYPE {}").format(sql.Literal(props["lc_ctype"])))
    if props.get("locale_provider") == "icu" and props.get("icu_locale"):
        parts.append(
            sql.SQL("LOCALE_PROVIDER icu ICU_LOCALE {}").format(sql.Literal(props["icu_locale"]))
        )
    return sql.SQL(" ").join(parts)


TARGET_SQL = (
    "SELECT d.datname, pg_catalog.shobj_description(d.oid, 'pg_database') AS comment"
    " FROM pg_catalog.pg_database d WHERE d.datname = %s"
)


def compare_restored(
    record: DumpRecord, inventory: Inventory
) -> tuple[dict[str, t.Any], list[str]]:
    """The restored database against the dump's recorded objects: nothing may be missing."""
    expected = expected_counts(record)
    have = inventory.counts()
    objects: dict[str, t.Any] = {}
    problems: list[str] = []
    for kind in EXPECTED_KINDS:
        if kind == "table_data" or kind not in expected:
            continue
        objects[kind] = {"expected": expected[kind], "found": have[kind]}
        if have[kind] < expected[kind]:
            problems.append(
                f"{kind.replace('_', ' ')}: {have[kind]} in the restored database,"
                f" {expected[kind]} in the dump"
            )
    return objects, problems


def run_dump_restore(
    params: t.Mapping[str, t.Any], *, check_mode: bool = False
) -> dict[str, t.Any]:
    """Everything the ``dump_restore`` module does; returns its result (``failed`` included)."""
    from ansible_collections.pitr.postgresql.plugins.module_utils import postgres

    repo = Repository.open_posix(str(params["repository_path"]))
    storage = posix_storage(repo)
    storage.ensure_root()
    record = select_dump(repo, params.get("label"), params.get("database"))
    refuse_unusable(record)
    opts = restore_options_from_params(params)
    pg_restore = find_tool("pg_restore", params.get("pg_bindir"))
    root = storage.path(repo.dump_prefix(record.label))
    archive = os.path.join(root, archive_name(record.format))
    argv = pg_restore_argv(pg_restore, archive, record.format, opts)
    result: dict[str, t.Any] = {
        "changed": False,
        "label": record.label,
        "database": record.database,
        "target_database": opts.target_database,
        "mode": opts.mode,
        "dump": {**record.to_dict(), "usable": usable(record)},
        "cmd": argv,
        "queries": [],
        "restore_seconds": 0.0,
        "checksum_seconds": 0.0,
    }
    with connect(params) as conn:
        row = postgres.fetch_one(conn, _sql(TARGET_SQL), [opts.target_database])
        create = create_database_sql(opts.target_database, record, opts)
        if opts.mode == "new" and row is not None:
            if str(row.get("comment") or "").startswith(f"{MARKER_PREFIX}{record.label} "):
                result["msg"] = (
                    f"database {opts.target_database} was restored from dump {record.label} already"
                )
                return result
            raise DumpError(
                f"database {opts.target_database!r} exists and was not restored from dump"
                f" {record.label}: choose a new target_database, or mode=existing to restore"
                " into it (which drops and recreates the dump's objects in it)",
                target_database=opts.target_database,
            )
        if opts.mode == "existing" and row is None:
            raise DumpError(
                f"database {opts.target_database!r} does not exist: use mode=new to create it",
                target_database=opts.target_database,
            )
        if opts.mode == "new":
            result["queries"] = [postgres.query_text(conn, create)]
        result["changed"] = True
        if check_mode:
            result["msg"] = (
                f"check mode: would restore dump {record.label} into"
                f" {'a new' if opts.mode == 'new' else 'the existing'} database"
                f" {opts.target_database}"
            )
            return result
        if opts.verify_checksum:
            started = time.monotonic()
            check_checksum(root, record)
            result["checksum_seconds"] = round(time.monotonic() - started, 3)
        if opts.mode == "new":
            postgres.execute(conn, create)
        env = backup.libpq_env(params, params.get("passfile"))
        rc, failure_text, seconds = _run_program(argv, env, opts.timeout)
        result["restore_seconds"] = round(seconds, 3)
        if rc != 0:
            first = failure_text.strip().splitlines()[0] if failure_text.strip() else ""
            result["failed"] = True
            result["stderr"] = failure_text[-4000:]
            if opts.mode == "new" and not opts.keep_failed:
                drop = postgres.sql.SQL("DROP DATABASE IF EXISTS {}").format(
                    postgres.sql.Identifier(opts.target_database)
                )
                result["queries"].append(postgres.execute(conn, drop))
                result["msg"] = (
                    f"pg_restore failed: {first}. The new database {opts.target_database} was"
                    " dropped again (keep_failed keeps it for inspection)"
                )
            elif opts.mode == "new":
                result["msg"] = (
                    f"pg_restore failed: {first}. The new database {opts.target_database} is"
                    " left as it is (keep_failed); drop it before trying again"
                )
            else:
                result["msg"] = f"pg_restore failed: {first}." + (
                    " It ran in one transaction, so the database is unchanged."
                    if opts.in_one_transaction
                    else " The database may be partly restored: restore again or repair it."
                )
            return result
        if opts.mode == "new":
            comment = postgres.sql.SQL("COMMENT ON DATABASE {} IS {}").format(
                postgres.sql.Identifier(opts.target_database),
                postgres.sql.Literal(restore_marker(record)),
            )
            try:
                result["queries"].append(postgres.execute(conn, comment))
            except PitrError as exc:
                result.setdefault("warnings", []).append(
                    f"the restored database could not be marked ({exc.msg}): a re-run will not"
                    " recognise it as restored"
                )
    with connect({**params, "login_db": opts.target_database}) as conn:
        inventory, _props = read_inventory(conn)
    objects, problems = compare_restored(record, inventory)
    result["restored_objects"] = objects
    if problems:
        result["failed"] = True
        result["msg"] = (
            "pg_restore finished, but the restored database lacks objects of the dump: "
            + "; ".join(problems)
        )
        return result
    result["msg"] = (
        f"restored dump {record.label} ({record.database} as of {record.start_time}) into"
        f" {'the new' if opts.mode == 'new' else 'the existing'} database"
        f" {opts.target_database} in {result['restore_seconds']} s"
    )
    return result


# The dump_info module ---------------------------------------------------------------------------


def dump_info(params: t.Mapping[str, t.Any]) -> dict[str, t.Any]:
    """Everything the ``dump_info`` module returns (read-only)."""
    repo = Repository.open_posix(str(params["repository_path"]))
    posix_storage(repo).ensure_root()
    records = list_dumps(repo)
    if params.get("label"):
        records = [r for r in records if r.label == params["label"]]
    if params.get("database"):
        records = [r for r in records if r.database == params["database"]]
    latest: dict[str, str] = {}
    for r in records:
        if usable(r) and r.scope == "database":
            latest.setdefault(r.database, r.label)
    globals_usable = [r.label for r in records if usable(r) and r.scope == GLOBALS]
    storage = posix_storage(repo)
    staging_parent = storage.path(repo.dump_staging_prefix("x").rsplit("/", 1)[0])
    in_progress = sorted(os.listdir(staging_parent)) if os.path.isdir(staging_parent) else []
    return {
        "changed": False,
        "repository": repo.describe(),
        "dumps": [{**r.to_dict(), "usable": usable(r)} for r in records],
        "usable_count": sum(1 for r in records if usable(r)),
        "latest_usable": latest,
        "latest_globals": globals_usable[0] if globals_usable else None,
        "in_progress": in_progress,
    }

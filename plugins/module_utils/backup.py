# Copyright: contributors to pitr.postgresql
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Base backups: plan the ``pg_basebackup`` argv, take the backup, verify it, catalogue it.

The flow of ``take_backup`` (under the repository lock ``backup``, so two backups never run
at once on one repository and the second is told who holds it):

1. remove what an interrupted earlier run left in ``staging/backups/`` (nobody else can be
   writing there while we hold the lock, and ``pg_basebackup`` dies with the process that
   started it);
2. run ``pg_basebackup`` (argv through the runner, password in the environment) into
   ``staging/backups/<label>/`` with ``--progress``; progress lines go to
   ``staging/backups/<label>.progress.json`` for ``backup_info`` and the module result;
3. the exit code is the truth: on failure the partial files are removed and a record with
   ``status: failed`` is written, which restore never selects;
4. verify by reading every byte: ``pg_verifybackup`` for plain backups (and tar from
   PostgreSQL 18), the streaming tar verifier of ``manifest.py`` otherwise, plus a
   ``pg_waldump`` parse of the WAL the backup carries;
5. write ``backup.json`` into the staging directory, then rename the directory into
   ``backups/<label>/``: the files and their catalog record appear together, in one step.

Manifest checksums (``manifest_checksums: auto``): CRC32C where ``pg_verifybackup`` reads
the backup (plain format; tar from PostgreSQL 18), because its CRC32C is hardware-assisted
and costs the server almost nothing. Tar on PostgreSQL < 18 is verified here in Python: with
a C CRC-32C (Intel ISA-L from Debian libisal2, hardware-assisted like pg_verifybackup's,
10-14 GB/s measured; else python3-crc32c, software only, 0.7-2.2 GB/s) CRC32C again, else
SHA256 (hashlib, ~1.5 GB/s with SHA-NI, no extra package) rather than pure-Python CRC-32C (a
few MB/s). SHA-256 costs the server too: +0.5-0.8 s per 800 MB of pgbench data measured on
this 2-core machine (2.6 s -> 3.4 s with server-zstd:1).

Standard library only (plus the optional compression libraries), so that the same code runs
in the ``base_backup`` module and in the ``pitr-backup`` host command of the systemd timer.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import glob
import json
import os
import re
import shutil
import socket
import tempfile
import time
import typing as t
from dataclasses import dataclass, field

from ansible_collections.pitr.postgresql.plugins.module_utils import catalog, manifest, runner
from ansible_collections.pitr.postgresql.plugins.module_utils.catalog import BackupRecord
from ansible_collections.pitr.postgresql.plugins.module_utils.errors import (
    CommandError,
    LockHeldError,
    PitrError,
    RepositoryError,
)
from ansible_collections.pitr.postgresql.plugins.module_utils.pgcontrol import (
    ParseError,
    parse_backup_label,
)
from ansible_collections.pitr.postgresql.plugins.module_utils.repository import (
    Repository,
    RepositoryIdentity,
)
from ansible_collections.pitr.postgresql.plugins.module_utils.storage import PosixStorage
from ansible_collections.pitr.postgresql.plugins.module_utils.walfile import (
    DEFAULT_SEGMENT_SIZE,
    SEGMENT,
    WalFileName,
    format_lsn,
    parse_lsn,
    segment_for_lsn,
)

LOCK_NAME = "backup"
FORMATS = ("tar", "plain")
CHECKPOINTS = ("fast", "spread")
CHECKSUM_CHOICES = ("auto", "CRC32C", "SHA224", "SHA256", "SHA384", "SHA512")
DEFAULT_COMPRESSION = "server-zstd:1"
COMPRESSION_METHODS = ("gzip", "lz4", "zstd")
MIN_MAJOR = 13
PROGRESS_INTERVAL = 2.0
_PROGRESS_RE = re.compile(r"^\s*(\d+)/(\d+) kB \((\d+)%\)")
_VERSION_RE = re.compile(r"\(PostgreSQL\) (\d+)(?:\.(\d+))?")
_SERVER_VERSION_RE = re.compile(r"^(\d+)(?:\.(\d+))?")


class BackupError(PitrError):
    """A base backup could not be planned, taken or verified."""


# Versions and programs ------------------------------------------------------------------------


def parse_tool_version(text: str) -> tuple[str, int]:
    """``pg_basebackup (PostgreSQL) 15.18 (Debian ...)`` -> (``15.18``, 15)."""
    m = _VERSION_RE.search(text)
    if not m:
        raise BackupError(f"cannot read a PostgreSQL version from {text.strip()!r}")
    major = int(m[1])
    return (f"{m[1]}.{m[2]}" if m[2] is not None else m[1]), major


def parse_server_version(text: str) -> tuple[str, int]:
    """``15.18 (Debian 15.18-0+deb12u1)`` -> (``15.18``, 15); ``17beta1`` -> (``17``, 17)."""
    m = _SERVER_VERSION_RE.match(text.strip())
    if not m:
        raise BackupError(f"cannot read the server version from {text.strip()!r}")
    return (f"{m[1]}.{m[2]}" if m[2] is not None else m[1]), int(m[1])


def candidate_bindirs() -> list[str]:
    """PostgreSQL program directories on this host, newest major first."""
    found: list[tuple[int, str]] = []
    for pattern in ("/usr/lib/postgresql/*/bin", "/usr/pgsql-*/bin"):
        for d in glob.glob(pattern):
            m = re.search(
                r"(\d+)", d.replace("/usr/lib/postgresql/", "").replace("/usr/pgsql-", "")
            )
            if m and os.path.isfile(os.path.join(d, "pg_basebackup")):
                found.append((int(m[1]), d))
    found.sort(reverse=True)
    dirs = [d for _major, d in found]
    on_path = shutil.which("pg_basebackup")
    if on_path:
        d = os.path.dirname(os.path.realpath(on_path))
        if d not in dirs:
            dirs.append(d)
    return dirs


def find_bindir(explicit: str | None = None) -> str:
    """The directory of ``pg_basebackup`` & co.: ``explicit``, else the newest installed."""
    if explicit:
        if not os.path.isfile(os.path.join(explicit, "pg_basebackup")):
            raise BackupError(f"pg_bindir {explicit} has no pg_basebackup", pg_bindir=explicit)
        return explicit
    dirs = candidate_bindirs()
    if not dirs:
        raise BackupError(
            "pg_basebackup is not installed on this host: install the PostgreSQL client"
            " programs (Debian: postgresql-client-<major>) or set pg_bindir"
        )
    return dirs[0]


def tool_version(bindir: str, program: str = "pg_basebackup") -> tuple[str, int]:
    """Version string and major of a PostgreSQL program."""
    res = runner.run([os.path.join(bindir, program), "--version"], timeout=30)
    return parse_tool_version(res.stdout)


# Connection ------------------------------------------------------------------------------------


def libpq_env(params: t.Mapping[str, t.Any], passfile: str | None = None) -> dict[str, str]:
    """libpq environment variables for the collection's connection options.

    The password goes into ``PGPASSWORD`` (the environment of the child only, never argv or
    logs); ``passfile`` into ``PGPASSFILE``. ``login_db`` is not used: base backups use the
    replication protocol, which has no database.
    """
    host = params.get("login_host")
    sock = params.get("login_unix_socket")
    if sock and host in (None, "", "localhost"):
        host = sock
    mapping = {
        "PGHOST": host,
        "PGPORT": params.get("port"),
        "PGUSER": params.get("login_user"),
        "PGPASSWORD": params.get("login_password"),
        "PGSSLMODE": params.get("ssl_mode"),
        "PGSSLROOTCERT": params.get("ca_cert"),
        "PGCONNECT_TIMEOUT": params.get("connect_timeout"),
        "PGPASSFILE": passfile,
        "PGAPPNAME": "pitr.postgresql",
    }
    return {k: str(v) for k, v in mapping.items() if v not in (None, "")}


@dataclass(frozen=True)
class ServerInfo:
    """What the server says over a replication connection."""

    system_identifier: int
    timeline: int
    wal_lsn: str
    server_version: str  # "15.18"
    pg_major: int
    wal_segment_size: int


def _size_setting(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+)\s*(B|kB|MB|GB)?\s*", text)
    if not m:
        raise BackupError(f"cannot read the size {text!r}")
    return int(m[1]) * {"B": 1, None: 1, "kB": 1024, "MB": 1 << 20, "GB": 1 << 30}[m[2]]


def identify_argv(bindir: str) -> list[str]:
    """``psql`` over a physical replication connection: what pg_basebackup itself will see."""
    return [
        os.path.join(bindir, "psql"),
        "--no-psqlrc",
        "--no-password",
        "--no-align",
        "--tuples-only",
        "--field-separator=|",
        # dbname "replication", as pg_basebackup sets it: the password file is looked up by it
        "--dbname=dbname=replication replication=true",
        "--command=IDENTIFY_SYSTEM",
        "--command=SHOW server_version",
        "--command=SHOW wal_segment_size",
    ]


def parse_identify(text: str) -> ServerInfo:
    """Parse the output of ``identify_argv``."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if len(lines) < 3:
        raise BackupError(f"unexpected answer to IDENTIFY_SYSTEM: {text.strip()!r}")
    sysid, tli, lsn = lines[0].split("|")[:3]
    version, major = parse_server_version(lines[1])
    return ServerInfo(int(sysid), int(tli), lsn, version, major, _size_setting(lines[2]))


def identify_server(bindir: str, env: t.Mapping[str, str], timeout: float = 60) -> ServerInfo:
    """Ask the server who it is, over the same kind of connection pg_basebackup uses."""
    try:
        res = runner.run(identify_argv(bindir), env=env, timeout=timeout)
    except CommandError as exc:
        raise BackupError(
            "cannot open a replication connection to the server: "
            + exc.msg
            + ". "
            + connection_hint(exc.msg),
            **exc.context,
        ) from exc
    return parse_identify(res.stdout)


# libpq's words when nothing answers at the address (server down, wrong port, host or socket).
_NOBODY_THERE = ("Is the server running", "Connection refused", "No such file or directory",
                 "could not translate host name", "timeout expired")  # fmt: skip


def connection_hint(error: str) -> str:
    """The fix to suggest for a failed replication connection, from libpq's message."""
    if any(words in error for words in _NOBODY_THERE):
        return (
            "Nothing answered there: start PostgreSQL, or check the host, port and socket"
            " directory the backup connects to"
        )
    return (
        "The role needs the REPLICATION attribute (or superuser) and pg_hba.conf a"
        " 'replication' line for it"
    )


# Plan ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BackupOptions:
    """What the user asked for (module options / host command flags)."""

    label: str = ""
    backup_format: str = "tar"
    compression: str = DEFAULT_COMPRESSION
    checkpoint: str = "fast"
    manifest_checksums: str = "auto"
    max_rate: str = ""
    timeout: float = 0.0


def normalize_compression(value: str) -> str:
    """Validate a pg_basebackup ``--compress`` value (PostgreSQL 15 syntax); ``none`` allowed.

    Accepts ``[client-|server-]METHOD[:LEVEL|:DETAIL]``; a bare method means client-side as
    pg_basebackup itself reads it, so we spell the location out.
    """
    v = (value or "none").strip()
    if v.lower() in ("none", "no", "false", "0"):
        return "none"
    m = re.fullmatch(r"(?:(client|server)-)?(gzip|lz4|zstd)(?::([A-Za-z0-9_=,]+))?", v)
    if not m:
        raise BackupError(
            f"compression {value!r} is not understood: use none, or [client-|server-]METHOD[:LEVEL]"
            " with METHOD gzip, lz4 or zstd (e.g. server-zstd:1)"
        )
    where = m[1] or "client"
    return f"{where}-{m[2]}" + (f":{m[3]}" if m[3] else "")


def compression_method(compression: str) -> str:
    """``server-zstd:1`` -> ``zstd``; ``none`` -> ``none``."""
    if compression == "none":
        return "none"
    return compression.split("-", 1)[1].split(":", 1)[0]


def resolve_checksums(
    requested: str, backup_format: str, client_major: int, fast_crc32c: bool | None = None
) -> str:
    """The ``--manifest-checksums`` algorithm (see the module docstring for ``auto``).

    ``fast_crc32c``: whether a C CRC-32C library is importable here (None: look).
    """
    if requested and requested != "auto":
        algo = requested.upper()
        if algo not in CHECKSUM_CHOICES[1:]:
            raise BackupError(
                f"manifest_checksums {requested!r} is not one of {', '.join(CHECKSUM_CHOICES)}"
            )
        return algo
    if backup_format == "plain" or client_major >= 18:
        return "CRC32C"
    if fast_crc32c is None:
        fast_crc32c = manifest.fast_crc32c() is not None
    return "CRC32C" if fast_crc32c else "SHA256"


def verifier_for(backup_format: str, client_major: int) -> str:
    """``pg_verifybackup`` or ``tar`` (our streaming verifier)."""
    if backup_format == "plain" or client_major >= 18:
        return "pg_verifybackup"
    return "tar"


def check_versions(client_major: int, server_major: int) -> None:
    """Refuse a pg_basebackup older than the server, and servers older than 13."""
    if server_major < MIN_MAJOR:
        raise BackupError(f"PostgreSQL {server_major} is not supported (13 or later is)")
    if client_major < server_major:
        raise BackupError(
            f"pg_basebackup {client_major} is older than the server ({server_major}): a base"
            f" backup needs pg_basebackup {server_major} or newer. Install the PostgreSQL"
            f" {server_major} client programs or set pg_bindir",
            pg_basebackup_major=client_major,
            server_major=server_major,
        )


def basebackup_argv(
    bindir: str,
    target_dir: str,
    label: str,
    opts: BackupOptions,
    *,
    client_major: int,
    server_major: int,
    fast_crc32c: bool | None = None,
) -> list[str]:
    """The ``pg_basebackup`` argv for these options and versions (pure but for ``auto``
    checksums, which look for a CRC-32C library unless ``fast_crc32c`` says).

    PostgreSQL 15+ takes ``--compress=LOCATION-METHOD[:DETAIL]``; 13 and 14 only compress
    on the client with gzip (``--gzip --compress=LEVEL``) and have no server-side compression.
    ``--no-password`` makes a missing password an error instead of a prompt that hangs.
    """
    if opts.backup_format not in FORMATS:
        raise BackupError(f"format {opts.backup_format!r} is not one of {', '.join(FORMATS)}")
    if opts.checkpoint not in CHECKPOINTS:
        raise BackupError(f"checkpoint {opts.checkpoint!r} is not one of {', '.join(CHECKPOINTS)}")
    compression = normalize_compression(opts.compression)
    checksums = resolve_checksums(
        opts.manifest_checksums, opts.backup_format, client_major, fast_crc32c
    )
    argv = [
        os.path.join(bindir, "pg_basebackup"),
        f"--pgdata={target_dir}",
        f"--format={opts.backup_format}",
        "--wal-method=stream",
        f"--checkpoint={opts.checkpoint}",
        f"--manifest-checksums={checksums}",
        f"--label=pitr.postgresql {label}",
        "--progress",
        "--verbose",
        "--no-password",
    ]
    if opts.max_rate:
        argv.append(f"--max-rate={opts.max_rate}")
    if compression == "none":
        return argv
    where, rest = compression.split("-", 1)
    method, _sep, detail = rest.partition(":")
    if client_major >= 15:
        if where == "server" and server_major < 15:
            raise BackupError(
                f"server-side compression needs PostgreSQL 15 or later on the server (it runs"
                f" {server_major}): use client-{method} or none"
            )
        if opts.backup_format == "plain" and where == "client":
            raise BackupError(
                "client-side compression writes tar files: use format tar, or server-side"
                " compression (the client decompresses it into the plain directory)"
            )
        argv.append(f"--compress={compression}")
        return argv
    # PostgreSQL 13 and 14 clients
    if where != "client" or method != "gzip" or opts.backup_format != "tar":
        raise BackupError(
            f"pg_basebackup {client_major} only compresses tar backups with gzip on the client:"
            " set compression to none (or client-gzip with format tar)"
        )
    argv += ["--gzip"] + ([f"--compress={detail}"] if detail.isdigit() else [])
    return argv


# Progress --------------------------------------------------------------------------------------


@dataclass
class Progress:
    """Bytes done / total as pg_basebackup reports them (kB granularity)."""

    label: str
    phase: str = "starting"
    done_bytes: int = 0
    total_bytes: int = 0
    started: float = field(default_factory=time.time)
    updated: float = 0.0
    verify_bytes: int = 0

    @property
    def percent(self) -> float:
        return round(100.0 * self.done_bytes / self.total_bytes, 1) if self.total_bytes else 0.0

    def feed(self, line: str) -> bool:
        """Read one stderr line of ``pg_basebackup --progress``; True if it was progress."""
        m = _PROGRESS_RE.match(line)
        if not m:
            if "waiting for checkpoint" in line:
                self.phase = "checkpoint"
            elif "write-ahead log end point" in line or "waiting for background process" in line:
                self.phase = "finishing"
            return False
        self.phase = "copying"
        self.done_bytes = int(m[1]) * 1024
        self.total_bytes = max(int(m[2]) * 1024, self.done_bytes)
        return True

    def to_dict(self) -> dict[str, t.Any]:
        return {
            "label": self.label,
            "phase": self.phase,
            "done_bytes": self.done_bytes,
            "total_bytes": self.total_bytes,
            "percent": self.percent,
            "verify_bytes": self.verify_bytes,
            "started": _iso(self.started),
            "updated": _iso(self.updated or time.time()),
            "pid": os.getpid(),
            "host": socket.gethostname(),
        }


def _iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="seconds")


def now_iso() -> str:
    """Now in UTC with microseconds: a stop time must never read earlier than the stop."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="microseconds")


# Results ---------------------------------------------------------------------------------------


@dataclass
class BackupOutcome:
    """What ``take_backup`` / ``verify_backup`` did, for the module result."""

    record: BackupRecord
    changed: bool
    cmd: list[str]
    progress: dict[str, t.Any] = field(default_factory=dict)
    backup_seconds: float = 0.0
    verify_seconds: float = 0.0
    message: str = ""
    stderr: str = ""

    @property
    def failed(self) -> bool:
        return not catalog.usable(self.record)


def posix_storage(repo: Repository) -> PosixStorage:
    if not isinstance(repo.storage, PosixStorage):
        raise RepositoryError(
            "base backups need a POSIX repository (pg_basebackup writes into a local directory)"
        )
    return repo.storage


def _list_files(root: str) -> tuple[list[str], int]:
    files: list[str] = []
    size = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for fn in sorted(filenames):
            full = os.path.join(dirpath, fn)
            rel = os.path.relpath(full, root).replace(os.sep, "/")
            if rel == catalog.RECORD_NAME:
                continue
            files.append(rel)
            with contextlib.suppress(OSError):
                size += os.lstat(full).st_size
    return files, size


def clean_staging(repo: Repository) -> list[str]:
    """Remove leftovers of interrupted backups (call with the backup lock held)."""
    storage = posix_storage(repo)
    parent = os.path.dirname(storage.path(repo.backup_staging_prefix("x")))
    removed: list[str] = []
    if not os.path.isdir(parent):
        return removed
    for name in sorted(os.listdir(parent)):
        key = f"{os.path.relpath(parent, storage.root).replace(os.sep, '/')}/{name}"
        storage.delete_tree(key)
        removed.append(name)
    return removed


def in_progress(repo: Repository) -> list[dict[str, t.Any]]:
    """Progress records of backups being taken, each with ``alive`` (False: the process is
    gone, the backup was interrupted; its leftovers go with the next backup)."""
    storage = posix_storage(repo)
    parent = os.path.dirname(storage.path(repo.backup_progress_key("x")))
    out: list[dict[str, t.Any]] = []
    if not os.path.isdir(parent):
        return out
    for name in sorted(os.listdir(parent)):
        if not name.endswith(".progress.json"):
            continue
        try:
            with open(os.path.join(parent, name), encoding="utf-8") as fh:
                entry = json.load(fh)
        except (OSError, ValueError):
            continue
        entry["alive"] = _process_alive(entry)
        out.append(entry)
    return out


def _process_alive(entry: t.Mapping[str, t.Any]) -> bool | None:
    """Is the backup process of a progress record still running? None: another host."""
    if entry.get("host") != socket.gethostname():
        return None
    try:
        os.kill(int(entry.get("pid", 0)), 0)
    except (ValueError, TypeError, ProcessLookupError):
        return False
    except PermissionError:
        return True  # it exists, under another user
    return int(entry.get("pid", 0)) > 0


# WAL checks ------------------------------------------------------------------------------------


def waldump_checker(bindir: str, timeout: float = 600) -> manifest.WalChecker:
    """A WAL checker for ``manifest.verify_tar_backup``: pg_waldump parses each WAL-Range."""

    def check(wal_dir: str, ranges: t.Sequence[manifest.WalRange]) -> list[str]:
        problems = []
        for rng in ranges:
            argv = [
                os.path.join(bindir, "pg_waldump"),
                "--quiet",
                f"--path={wal_dir}",
                f"--timeline={rng.timeline}",
                f"--start={rng.start_lsn}",
                f"--end={rng.end_lsn}",
            ]
            res = runner.run(argv, timeout=timeout, check=False)
            if res.rc != 0:
                problems.append(
                    f"WAL from {rng.start_lsn} to {rng.end_lsn} on timeline {rng.timeline} does"
                    f" not parse: {res.stderr.strip()[-300:]}"
                )
        return problems

    return check


def verify_directory(
    backup_dir: str,
    backup_format: str,
    *,
    bindir: str,
    client_major: int,
    segment_size: int,
    progress: Progress | None = None,
) -> tuple[manifest.VerifyReport, dict[str, bytes]]:
    """Verify a backup directory; return the report and small captured files (backup_label)."""
    tool = verifier_for(backup_format, client_major)
    captured: dict[str, bytes] = {}
    if tool == "pg_verifybackup":
        started = time.monotonic()
        report = manifest.VerifyReport(tool="pg_verifybackup")
        # The catalog record lives beside the backup's files but is not in its manifest.
        argv = [os.path.join(bindir, "pg_verifybackup"), "--ignore=backup.json"]
        if backup_format == "tar":
            argv.append("--no-parse-wal")  # PostgreSQL 18 tar: WAL is checked below
        argv.append(backup_dir)
        res = runner.run(argv, check=False)
        if res.rc != 0:
            for line in (res.stderr or res.stdout).strip().splitlines()[:50]:
                report.problem(line.replace("pg_verifybackup: error: ", "").strip())
            if not report.problems:
                report.problem(f"pg_verifybackup exited {res.rc}")
        try:
            m = manifest.read_manifest(backup_dir)
            report.checksum_algorithm = m.checksum_algorithm
            report.files_checked = len(m.files)
            report.bytes_read = m.total_size
        except PitrError as exc:
            report.problem(exc.msg)
        if backup_format == "plain":
            for name in ("backup_label",):
                try:
                    with open(os.path.join(backup_dir, name), "rb") as fh:
                        captured[name] = fh.read()
                except OSError:
                    pass
        else:
            wal_report = manifest.verify_tar_backup(
                backup_dir,
                wal_checker=waldump_checker(bindir),
                segment_size=segment_size,
                files=False,
            )
            for p in wal_report.problems:
                report.problem(p)
            captured.update(wal_report.captured)
        report.seconds = time.monotonic() - started
        return report, captured

    def tick(n: int) -> None:
        if progress is not None:
            progress.verify_bytes += n

    report = manifest.verify_tar_backup(
        backup_dir,
        wal_checker=waldump_checker(bindir),
        segment_size=segment_size,
        progress=tick if progress is not None else None,
    )
    return report, dict(report.captured)


# Taking a backup -------------------------------------------------------------------------------


def failed_record(
    label: str,
    message: str,
    *,
    tool: str,
    opts: BackupOptions,
    server: ServerInfo | None,
    client_version: str,
    start_time: str,
) -> BackupRecord:
    return BackupRecord(
        label=label,
        status="failed",
        verified=False,
        verification={"tool": tool, "ok": False, "message": message},
        start_time=start_time,
        stop_time=now_iso(),
        timeline=server.timeline if server else 0,
        system_identifier=server.system_identifier if server else 0,
        pg_version=server.server_version if server else "",
        pg_major=server.pg_major if server else 0,
        pg_basebackup_version=client_version,
        backup_format=opts.backup_format,
        compression=normalize_compression(opts.compression),
        wal_method="stream",
    )


def build_record(
    label: str,
    *,
    opts: BackupOptions,
    server: ServerInfo,
    client_version: str,
    backup_dir: str,
    report: manifest.VerifyReport,
    captured: t.Mapping[str, bytes],
    start_time: str,
    stop_time: str,
) -> BackupRecord:
    """The catalog record of a backup pg_basebackup completed (verified or not)."""
    problems: list[str] = []
    m = manifest.read_manifest(backup_dir)
    seg = server.wal_segment_size or DEFAULT_SEGMENT_SIZE
    start_lsn, start_wal, start_iso = m.start_lsn, "", ""
    label_text = captured.get("backup_label")
    if label_text is not None:
        try:
            bl = parse_backup_label(label_text.decode("utf-8", "replace"))
            start_lsn, start_wal, start_iso = bl.start_lsn, bl.start_wal, bl.start_time
        except ParseError as exc:
            problems.append(f"backup_label: {exc}")
    else:
        problems.append("backup_label was not found in the backup")
    tl = m.end_timeline or server.timeline
    stop_lsn = format_lsn(parse_lsn(m.end_lsn)) if m.end_lsn else ""
    stop_wal = segment_for_lsn(tl, max(parse_lsn(stop_lsn) - 1, 0), seg) if stop_lsn else ""
    if not start_wal and start_lsn:
        start_wal = segment_for_lsn(m.wal_ranges[0].timeline, parse_lsn(start_lsn), seg)
    if m.system_identifier and m.system_identifier != server.system_identifier:
        problems.append(
            f"the manifest's system identifier {m.system_identifier} is not the server's"
            f" {server.system_identifier}"
        )
    files, size = _list_files(backup_dir)
    ok = report.ok and not problems
    verification = report.to_dict()
    if problems:
        verification["ok"] = False
        verification["message"] = "; ".join(problems + ([] if report.ok else [report.message]))
    return BackupRecord(
        label=label,
        status="ok" if ok else "failed",
        verified=ok,
        verification=verification,
        start_lsn=start_lsn,
        stop_lsn=stop_lsn,
        start_wal=start_wal,
        stop_wal=stop_wal,
        start_time=start_iso or start_time,
        stop_time=stop_time,
        timeline=tl,
        system_identifier=server.system_identifier,
        pg_version=server.server_version,
        pg_major=server.pg_major,
        pg_basebackup_version=client_version,
        backup_format=opts.backup_format,
        compression=normalize_compression(opts.compression),
        wal_method="stream",
        size_on_disk=size,
        cluster_size=m.total_size,
        checksum_algorithm=m.checksum_algorithm,
        files=files,
    )


class _ProgressWriter:
    def __init__(self, repo: Repository, progress: Progress) -> None:
        self.repo = repo
        self.progress = progress
        self.key = repo.backup_progress_key(progress.label)
        self.last = 0.0

    def write(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last < PROGRESS_INTERVAL:
            return
        self.last = now
        self.progress.updated = time.time()
        with contextlib.suppress(PitrError):  # progress is a courtesy; never fail a backup
            self.repo.storage.put(
                self.key, json.dumps(self.progress.to_dict()).encode(), overwrite=True
            )

    def line(self, text: str) -> None:
        if self.progress.feed(text):
            self.write()

    def remove(self) -> None:
        with contextlib.suppress(PitrError):
            self.repo.storage.delete(self.key)


def take_backup(
    repo: Repository,
    label: str,
    opts: BackupOptions,
    *,
    bindir: str,
    env: t.Mapping[str, str],
    server: ServerInfo,
    client_version: str,
    client_major: int,
    lock_wait: float = 0.0,
    on_progress: t.Callable[[Progress], None] | None = None,
) -> BackupOutcome:
    """Take, verify and catalogue one backup (see the module docstring). Holds the lock."""
    storage = posix_storage(repo)
    catalog.check_label(label)
    staging_key = repo.backup_staging_prefix(label)
    staging_dir = storage.path(staging_key)
    argv = basebackup_argv(
        bindir, staging_dir, label, opts, client_major=client_major, server_major=server.pg_major
    )
    with storage.lock(LOCK_NAME, purpose=f"base backup {label}", wait=lock_wait):
        existing = catalog.read_backup(repo, label)
        if existing is not None and existing.status == "ok":
            return BackupOutcome(existing, False, argv, message="a backup with this label exists")
        clean_staging(repo)
        os.makedirs(os.path.dirname(staging_dir), mode=0o700, exist_ok=True)
        progress = Progress(label)
        writer = _ProgressWriter(repo, progress)
        writer.write(force=True)
        start_time = now_iso()
        started = time.monotonic()

        def on_line(line: str) -> None:
            writer.line(line)
            if on_progress is not None:
                on_progress(progress)

        try:
            try:
                res = runner.run(
                    argv,
                    env=env,
                    timeout=opts.timeout or None,
                    check=False,
                    on_stderr_line=on_line,
                )
                rc, stderr = res.rc, res.stderr
            except CommandError as exc:  # timed out, or could not start
                rc, stderr = -1, exc.msg + "\n" + str(exc.context.get("stderr", ""))
            backup_seconds = time.monotonic() - started
            stop_time = now_iso()
            if rc != 0:
                msg = (
                    runner.failure(runner.CommandResult(argv, rc, "", stderr)).msg
                    if rc != -1
                    else stderr.strip()
                )
                storage.delete_tree(staging_key)
                record = failed_record(
                    label,
                    msg,
                    tool="pg_basebackup",
                    opts=opts,
                    server=server,
                    client_version=client_version,
                    start_time=start_time,
                )
                storage.delete_tree(repo.backup_prefix(label))
                catalog.write_backup(repo, record)
                return BackupOutcome(
                    record,
                    True,
                    argv,
                    progress.to_dict(),
                    backup_seconds,
                    message=f"pg_basebackup failed: {msg}",
                    stderr=stderr[-4000:],
                )
            progress.phase = "verifying"
            writer.write(force=True)
            report, captured = verify_directory(
                staging_dir,
                opts.backup_format,
                bindir=bindir,
                client_major=client_major,
                segment_size=server.wal_segment_size,
                progress=progress,
            )
            try:
                record = build_record(
                    label,
                    opts=opts,
                    server=server,
                    client_version=client_version,
                    backup_dir=staging_dir,
                    report=report,
                    captured=captured,
                    start_time=start_time,
                    stop_time=stop_time,
                )
            except PitrError as exc:
                record = failed_record(
                    label,
                    exc.msg,
                    tool=report.tool,
                    opts=opts,
                    server=server,
                    client_version=client_version,
                    start_time=start_time,
                )
            catalog.write_backup(repo, record, key=f"{staging_key}/{catalog.RECORD_NAME}")
            storage.delete_tree(repo.backup_prefix(label))
            storage.rename_tree(staging_key, repo.backup_prefix(label))
            progress.phase = "done" if catalog.usable(record) else "failed"
            return BackupOutcome(
                record,
                True,
                argv,
                progress.to_dict(),
                backup_seconds,
                report.seconds,
                message=record.verification.get("message", ""),
                stderr=stderr[-4000:],
            )
        finally:
            writer.remove()


def verify_backup(
    repo: Repository,
    label: str,
    *,
    bindir: str,
    client_major: int,
    check_mode: bool = False,
    lock_wait: float = 0.0,
) -> BackupOutcome:
    """Read an existing backup back; update its record's ``verified``/``status`` if that changed."""
    storage = posix_storage(repo)
    record = catalog.read_backup(repo, label)
    if record is None:
        raise BackupError(f"there is no backup {label!r} in {repo.describe()}", label=label)
    identity = repo.identity()
    seg = identity.wal_segment_size if identity else DEFAULT_SEGMENT_SIZE
    with storage.lock(LOCK_NAME, purpose=f"verify base backup {label}", wait=lock_wait):
        record = catalog.read_backup(repo, label) or record
        if not record.stop_lsn:
            # pg_basebackup itself failed: nothing to verify, nothing to change.
            return BackupOutcome(record, False, [], message=record.verification.get("message", ""))
        report, _captured = verify_directory(
            storage.path(repo.backup_prefix(label)),
            record.backup_format,
            bindir=bindir,
            client_major=max(client_major, record.pg_major),
            segment_size=seg,
        )
        ok = report.ok
        status = ("ok" if ok else "failed") if record.status in ("ok", "failed") else record.status
        new = record.with_changes(verified=ok, verification=report.to_dict(), status=status)
        changed = (new.verified, new.status) != (record.verified, record.status)
        if changed and not check_mode:
            catalog.write_backup(repo, new)
        return BackupOutcome(
            new, changed, [], verify_seconds=report.seconds, message=report.message
        )


# Newest commit in the archive ------------------------------------------------------------------


def waldump_commits_argv(bindir: str, wal_dir: str, first: str, last: str) -> list[str]:
    return [
        os.path.join(bindir, "pg_waldump"),
        f"--path={wal_dir}",
        "--rmgr=Transaction",
        first,
        last,
    ]


def newest_commit_times(
    repo: Repository,
    bindir: str,
    *,
    segment_size: int = DEFAULT_SEGMENT_SIZE,
    scan_segments: int = 4,
    max_scan_segments: int = 64,
    wal: t.Sequence[tuple[WalFileName, t.Any]] | None = None,
) -> dict[int, str]:
    """Timeline -> time of the newest COMMIT record in the archive (read with pg_waldump).

    Reads the newest ``scan_segments`` contiguous segments of each timeline, and further back
    (doubling, up to ``max_scan_segments``) while none of them holds a commit. Segments are
    fetched through the archive logic (verified, decompressed) into a temporary directory.
    """
    from ansible_collections.pitr.postgresql.plugins.module_utils import archive
    from ansible_collections.pitr.postgresql.plugins.module_utils.window import newest_commit

    listing = list(wal if wal is not None else repo.list_wal())
    by_tl: dict[int, list[WalFileName]] = {}
    for w, _info in listing:
        if w.kind == SEGMENT:
            by_tl.setdefault(w.timeline, []).append(w)
    result: dict[int, str] = {}
    for tl, names in by_tl.items():
        names.sort(key=lambda w: w.segment_number(segment_size))
        # the contiguous tail run
        run = [names[-1]]
        for w in reversed(names[:-1]):
            if w.segment_number(segment_size) == run[-1].segment_number(segment_size) - 1:
                run.append(w)
            else:
                break
        run.reverse()
        count = min(scan_segments, len(run))
        tmp = tempfile.mkdtemp(prefix="pitr-waldump-")
        try:
            fetched: set[str] = set()
            while True:
                chosen = run[-count:]
                for w in chosen:
                    if w.name not in fetched:
                        archive.fetch(repo, w.name, os.path.join(tmp, w.name))
                        fetched.add(w.name)
                res = runner.run(
                    waldump_commits_argv(bindir, tmp, chosen[0].name, chosen[-1].name),
                    check=False,
                    timeout=600,
                )
                found = newest_commit(res.stdout)
                if found:
                    result[tl] = found
                    break
                if count >= len(run) or count >= max_scan_segments:
                    break
                count = min(count * 2, len(run), max_scan_segments)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return result


def within_interval(record: BackupRecord, seconds: float, now: dt.datetime | None = None) -> bool:
    """True when ``record`` stopped less than ``seconds`` ago."""
    if seconds <= 0 or not record.stop_time:
        return False
    try:
        stop = dt.datetime.fromisoformat(record.stop_time)
    except ValueError:
        return False
    now = now or dt.datetime.now(dt.UTC)
    return (now - stop).total_seconds() < seconds


def parse_duration(text: str | int | float | None) -> float:
    """Seconds from ``90``, ``90s``, ``15min``, ``12h``, ``1d``, ``2w``; 0 for empty."""
    if text is None or text == "":
        return 0.0
    if isinstance(text, (int, float)):
        return float(text)
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(s|sec|m|min|h|d|w)?\s*", str(text))
    if not m:
        raise BackupError(
            f"{text!r} is not a duration: use seconds or a number with s, min, h, d or w"
        )
    factor = {None: 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "d": 86400, "w": 604800}[
        m[2]
    ]
    return float(m[1]) * factor


__all__ = [
    "BackupError",
    "BackupOptions",
    "BackupOutcome",
    "LockHeldError",
    "Progress",
    "ServerInfo",
    "basebackup_argv",
    "take_backup",
    "verify_backup",
]


# Entry points for the modules and the host command ---------------------------------------------


def options_from_params(params: t.Mapping[str, t.Any]) -> BackupOptions:
    """BackupOptions from module parameters (same names as the module options)."""
    return BackupOptions(
        label=params.get("label") or "",
        backup_format=params.get("format") or "tar",
        compression=params.get("compression") or DEFAULT_COMPRESSION,
        checkpoint=params.get("checkpoint") or "fast",
        manifest_checksums=params.get("manifest_checksums") or "auto",
        max_rate=params.get("max_rate") or "",
        timeout=float(params.get("timeout") or 0),
    )


def run_base_backup(
    params: t.Mapping[str, t.Any],
    *,
    check_mode: bool = False,
    on_progress: t.Callable[[Progress], None] | None = None,
) -> dict[str, t.Any]:
    """Everything the ``base_backup`` module does; returns its result (``failed`` included).

    Reads state (catalog, server, versions), plans the argv, and in check mode stops there.
    """
    repo = Repository.open_posix(str(params["repository_path"]))
    posix_storage(repo).ensure_root()
    opts = options_from_params(params)
    state = params.get("state") or "present"
    bindir = find_bindir(params.get("pg_bindir"))
    client_version, client_major = tool_version(bindir)
    if state == "verified":
        if not opts.label:
            raise BackupError("state=verified needs the label of the backup to verify")
        out = verify_backup(
            repo,
            opts.label,
            bindir=bindir,
            client_major=client_major,
            check_mode=check_mode,
            lock_wait=float(params.get("lock_wait") or 0),
        )
        return _result(out, check_mode)
    label = catalog.check_label(opts.label or catalog.default_label())
    existing = catalog.read_backup(repo, label) if opts.label else None
    if existing is not None and existing.status == "ok":
        out = BackupOutcome(existing, False, [], message=f"backup {label} exists")
        return _result(out, check_mode)
    interval = parse_duration(params.get("min_interval"))
    if interval > 0:
        recent = [r for r in catalog.usable_backups(repo) if within_interval(r, interval)]
        if recent:
            out = BackupOutcome(
                recent[0],
                False,
                [],
                message=f"usable backup {recent[0].label} is younger than min_interval",
            )
            result = _result(out, check_mode)
            result["skipped_reason"] = out.message
            return result
    env = libpq_env(params, params.get("passfile"))
    server = identify_server(bindir, env)
    check_versions(client_major, server.pg_major)
    identity = repo.identity()
    if identity is None:
        # Never initialise here: an unmounted repository looks empty, and a backup written
        # into the bare mount point would fill the wrong disk (pitr-wal push refuses too).
        raise BackupError(
            f"repository {repo.describe()} has no identity yet: set up archiving into it first"
            " (the pitr.postgresql.archiving role, or `pitr-wal --repo PATH init --pgdata"
            " DATADIR`), or check that its storage is mounted",
            repository=repo.describe(),
        )
    wanted = RepositoryIdentity(server.system_identifier, server.pg_major, server.wal_segment_size)
    repo.check_identity(wanted, identity)
    staging_dir = posix_storage(repo).path(repo.backup_staging_prefix(label))
    argv = basebackup_argv(
        bindir, staging_dir, label, opts, client_major=client_major, server_major=server.pg_major
    )
    if check_mode:
        planned = BackupRecord(
            label=label,
            status="running",
            backup_format=opts.backup_format,
            compression=normalize_compression(opts.compression),
        )
        out = BackupOutcome(planned, True, argv, message="check mode: no backup taken")
        return _result(out, check_mode)
    out = take_backup(
        repo,
        label,
        opts,
        bindir=bindir,
        env=env,
        server=server,
        client_version=client_version,
        client_major=client_major,
        lock_wait=float(params.get("lock_wait") or 0),
        on_progress=on_progress,
    )
    return _result(out, check_mode)


def _result(out: BackupOutcome, check_mode: bool) -> dict[str, t.Any]:
    rec = out.record
    result: dict[str, t.Any] = {
        "changed": out.changed,
        "label": rec.label,
        "backup": rec.to_dict(),
        "usable": catalog.usable(rec),
        "cmd": out.cmd,
        "progress": out.progress,
        "backup_seconds": round(out.backup_seconds, 3),
        "verify_seconds": round(out.verify_seconds, 3),
        "message": out.message,
    }
    if not check_mode and out.changed and not catalog.usable(rec):
        result["failed"] = True
        result["msg"] = (
            f"base backup {rec.label} is not usable ({rec.status}): {out.message}"
            if rec.status != "ok"
            else f"base backup {rec.label} did not verify: {out.message}"
        )
        if out.stderr:
            result["stderr"] = out.stderr
    elif not check_mode and not out.changed and rec.status != "ok" and rec.stop_lsn:
        result["failed"] = True
        result["msg"] = f"base backup {rec.label} does not verify: {out.message}"
    else:
        result["msg"] = out.message
    return result


def backup_info(params: t.Mapping[str, t.Any]) -> dict[str, t.Any]:
    """Everything the ``backup_info`` module returns (read-only)."""
    from ansible_collections.pitr.postgresql.plugins.module_utils import window

    repo = Repository.open_posix(str(params["repository_path"]))
    posix_storage(repo).ensure_root()
    identity = repo.identity()
    segment_size = identity.wal_segment_size if identity else DEFAULT_SEGMENT_SIZE
    records = catalog.list_backups(repo)
    if params.get("label"):
        records = [r for r in records if r.label == params["label"]]
    wal = repo.list_wal()
    warnings: list[str] = []
    commit_times: dict[int, str] = {}
    if params.get("read_commit_times", True) and wal:
        try:
            bindir = find_bindir(params.get("pg_bindir"))
            commit_times = newest_commit_times(
                repo,
                bindir,
                segment_size=segment_size,
                scan_segments=int(params.get("wal_scan_segments") or 4),
                wal=wal,
            )
        except PitrError as exc:
            warnings.append(f"the newest commit times could not be read: {exc.msg}")
    all_records = catalog.list_backups(repo)
    win = window.recoverable_window(all_records, wal, commit_times, segment_size)
    gaps = window.find_gaps(wal, segment_size)
    backups = []
    for r in records:
        d = r.to_dict()
        d["usable"] = catalog.usable(r)
        backups.append(d)
    usable_labels = [r.label for r in all_records if catalog.usable(r)]
    return {
        "changed": False,
        "repository": {
            "path": repo.describe(),
            "identity": (
                {
                    "system_identifier": identity.system_identifier,
                    "pg_major": identity.pg_major,
                    "wal_segment_size": identity.wal_segment_size,
                }
                if identity
                else None
            ),
        },
        "backups": backups,
        "usable_count": len(usable_labels),
        "latest_usable": usable_labels[0] if usable_labels else None,
        "window": [win[tl] for tl in sorted(win)],
        "newest_commit_time": {str(k): v for k, v in sorted(commit_times.items())},
        "wal_gaps": gaps,
        "in_progress": in_progress(repo),
        "warnings": warnings,
    }


# The pitr-backup host command (the systemd timer runs it) --------------------------------------

HOST_USAGE = """usage: pitr-backup --repo PATH [options]

Take, verify and catalogue one base backup (what the base_backup module does), for a systemd
timer or cron. Progress goes to stderr (the journal); the result is one JSON object on stdout.
Exit status: 0 when the backup is usable (or a recent one made it unnecessary), 1 otherwise.
"""


def progress_logger(
    say: t.Callable[[str], None],
    clock: t.Callable[[], float] = time.monotonic,
    every: float = 30.0,
) -> t.Callable[[Progress], None]:
    """A progress callback for logs: the first line, one every ``every`` seconds and one when
    all is sent; not pg_basebackup's start-up 0 of 0, nor its repeats of 100 %."""
    last: list[float | None] = [None]
    said_done = [False]

    def on_progress(p: Progress) -> None:
        if p.total_bytes <= 0 or said_done[0]:
            return
        done = p.percent >= 100.0
        now = clock()
        if done or last[0] is None or now - last[0] >= every:
            said_done[0] = done
            last[0] = now
            say(f"{p.label}: {p.done_bytes >> 20} of {p.total_bytes >> 20} MiB ({p.percent}%)")

    return on_progress


def host_main(argv: t.Sequence[str] | None = None) -> int:
    """``pitr-backup``: the base_backup module as a command on the database host."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="pitr-backup", usage=HOST_USAGE)
    parser.add_argument("--repo", required=True, dest="repository_path")
    parser.add_argument("--label", default="")
    parser.add_argument("--format", choices=FORMATS, default="tar")
    parser.add_argument("--compress", dest="compression", default=DEFAULT_COMPRESSION)
    parser.add_argument("--checkpoint", choices=CHECKPOINTS, default="fast")
    parser.add_argument("--manifest-checksums", choices=CHECKSUM_CHOICES, default="auto")
    parser.add_argument("--max-rate", default="")
    parser.add_argument("--min-interval", default="0")
    parser.add_argument("--pg-bindir", default=None)
    parser.add_argument("--host", dest="login_host", default=None)
    parser.add_argument("--socket-dir", dest="login_unix_socket", default=None)
    parser.add_argument("--port", type=int, default=None)
    parser.add_argument("--user", dest="login_user", default=None)
    parser.add_argument("--passfile", default=None)
    parser.add_argument("--timeout", type=int, default=0)
    parser.add_argument("--lock-wait", type=int, default=0)
    args = parser.parse_args(argv)
    params = vars(args)

    def say(text: str) -> None:
        sys.stderr.write(f"pitr-backup: {text}\n")
        sys.stderr.flush()

    on_progress = progress_logger(say)

    try:
        result = run_base_backup(params, on_progress=on_progress)
    except PitrError as exc:
        say(f"FAILED: {exc.msg}")
        sys.stdout.write(json.dumps({"failed": True, "msg": exc.msg}) + "\n")
        return 1
    rec = result["backup"]
    if result.get("failed"):
        say(f"FAILED: {result['msg']}")
    elif result["changed"]:
        say(
            f"backup {rec['label']} verified: {rec['cluster_size'] >> 20} MiB backed up,"
            f" {rec['size_on_disk'] >> 20} MiB stored, pg_basebackup {result['backup_seconds']} s,"
            f" verification {result['verify_seconds']} s"
        )
    else:
        say(f"nothing to do: {result['msg']}")
    sys.stdout.write(json.dumps(result, sort_keys=True) + "\n")
    return 1 if result.get("failed") else 0

# Copyright: contributors to pitr.postgresql
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The one connection helper: psycopg 3 connections and the few queries the modules need.

Every SQL statement is composed with ``psycopg.sql``; helpers return plain dicts (or lists of
them) so that planners stay free of database types. Failures raise PitrError with the query
and the server's SQLSTATE in the context; only modules call ``fail_json``.

psycopg is imported by this file only, inside a guard: a module checks
``PSYCOPG_IMPORT_ERROR`` and fails with ``missing_required_lib('psycopg')`` before connecting.
The planners (settings, health) and the host command never import psycopg.
"""

from __future__ import annotations

import time
import traceback
import typing as t

from ansible_collections.pitr.postgresql.plugins.module_utils.errors import PitrError

try:
    import psycopg
    from psycopg import sql
    from psycopg.rows import DictRow, dict_row
except ImportError:  # reported by the module through missing_required_lib
    PSYCOPG_IMPORT_ERROR: str | None = traceback.format_exc()
else:
    PSYCOPG_IMPORT_ERROR = None

if t.TYPE_CHECKING:
    Connection = psycopg.Connection[DictRow]
    Query = sql.SQL | sql.Composed

# The oldest PostgreSQL major version the collection supports.
MIN_SERVER_VERSION = 130000
APPLICATION_NAME = "pitr.postgresql"
SSL_MODES = ["allow", "disable", "prefer", "require", "verify-ca", "verify-full"]


def connection_argument_spec() -> dict[str, dict[str, t.Any]]:
    """The connection options of every module (doc fragment ``pitr.postgresql.connection``)."""
    return {
        "login_user": {"type": "str", "default": "postgres"},
        "login_password": {"type": "str", "no_log": True},
        "login_host": {"type": "str"},
        "login_unix_socket": {"type": "str"},
        "port": {"type": "int", "default": 5432, "aliases": ["login_port"]},
        "login_db": {"type": "str", "aliases": ["db"]},
        "ssl_mode": {"type": "str", "default": "prefer", "choices": SSL_MODES},
        "ca_cert": {"type": "str"},
        "connect_timeout": {"type": "int", "default": 10},
    }


def connection_kwargs(params: t.Mapping[str, t.Any]) -> dict[str, t.Any]:
    """libpq keywords for the module's connection options (unset options are left out).

    As in community.postgresql, ``login_unix_socket`` is used when ``login_host`` is empty or
    ``localhost``; with neither, libpq's defaults (``PGHOST``, the compiled-in socket) apply.
    """
    kwargs: dict[str, t.Any] = {"application_name": APPLICATION_NAME}
    host = params.get("login_host")
    socket_dir = params.get("login_unix_socket")
    if socket_dir and host in (None, "", "localhost"):
        host = socket_dir
    mapping = {
        "host": host,
        "port": params.get("port"),
        "user": params.get("login_user"),
        "password": params.get("login_password"),
        "dbname": params.get("login_db"),
        "sslmode": params.get("ssl_mode"),
        "sslrootcert": params.get("ca_cert"),
        "connect_timeout": params.get("connect_timeout"),
    }
    kwargs.update({k: v for k, v in mapping.items() if v not in (None, "")})
    return kwargs


def describe_target(kwargs: t.Mapping[str, t.Any]) -> str:
    """Where a connection goes, for messages (never the password)."""
    parts = [f"{k}={kwargs[k]}" for k in ("host", "port", "user", "dbname") if k in kwargs]
    return " ".join(parts) or "libpq defaults"


def connect(params: t.Mapping[str, t.Any]) -> Connection:
    """Open an autocommit connection with dict rows, refusing servers older than 13.

    Autocommit because ALTER SYSTEM cannot run inside a transaction block, and because the
    read queries want the server's current state, not a snapshot. Use it as a context manager
    so that it is closed.
    """
    if PSYCOPG_IMPORT_ERROR is not None:
        raise PitrError("the Python library psycopg (version 3) is not installed")
    kwargs = connection_kwargs(params)
    try:
        conn = psycopg.connect(autocommit=True, row_factory=dict_row, **kwargs)
    except psycopg.Error as exc:
        raise PitrError(
            f"cannot connect to PostgreSQL ({describe_target(kwargs)}): {_error_text(exc)}."
            " Check login_host or login_unix_socket, port, login_user and that the server runs",
            sqlstate=getattr(exc, "sqlstate", None),
        ) from exc
    try:
        check_server_version(conn.info.server_version)
    except PitrError:
        conn.close()
        raise
    return conn


def check_server_version(version_num: int) -> None:
    """Refuse PostgreSQL versions the collection does not support."""
    if version_num < MIN_SERVER_VERSION:
        raise PitrError(
            f"PostgreSQL {format_server_version(version_num)} is not supported: pitr.postgresql"
            f" needs PostgreSQL {MIN_SERVER_VERSION // 10000} or later",
            server_version_num=version_num,
        )


def format_server_version(version_num: int) -> str:
    """``150018`` -> ``15.18`` (PostgreSQL 10+ numbering)."""
    return f"{version_num // 10000}.{version_num % 10000}"


def server_major(conn: Connection) -> int:
    """The server's major version (15 for 15.18)."""
    return int(conn.info.server_version // 10000)


# generic execution --------------------------------------------------------------------------
def query_text(conn: Connection, query: Query) -> str:
    """The SQL text of a composed statement as the server would receive it."""
    return query.as_string(conn)


def fetch_all(
    conn: Connection, query: Query, params: t.Sequence[t.Any] | None = None
) -> list[dict[str, t.Any]]:
    """Run a query; return every row as a dict."""
    with conn.cursor() as cur:
        _execute(cur, query, params)
        return [dict(row) for row in cur.fetchall()] if cur.description else []


def fetch_one(
    conn: Connection, query: Query, params: t.Sequence[t.Any] | None = None
) -> dict[str, t.Any] | None:
    """Run a query; return the first row as a dict, or None without rows."""
    rows = fetch_all(conn, query, params)
    return rows[0] if rows else None


def execute(conn: Connection, query: Query, params: t.Sequence[t.Any] | None = None) -> str:
    """Run a statement without a result; return its text (for the module's ``queries``)."""
    with conn.cursor() as cur:
        _execute(cur, query, params)
    return query_text(conn, query)


def _execute(cur: psycopg.Cursor[DictRow], query: Query, params: t.Sequence[t.Any] | None) -> None:
    try:
        cur.execute(query, params)
    except psycopg.Error as exc:
        raise PitrError(
            f"PostgreSQL refused {query_text(cur.connection, query)!r}: {_error_text(exc)}",
            query=query_text(cur.connection, query),
            sqlstate=exc.sqlstate,
        ) from exc


def _error_text(exc: Exception) -> str:
    return " ".join(str(exc).split())


def is_insufficient_privilege(exc: PitrError) -> bool:
    """True when the server said the role lacks a privilege (SQLSTATE 42501)."""
    return exc.context.get("sqlstate") == "42501"


# settings -----------------------------------------------------------------------------------
PG_SETTINGS_COLUMNS = (
    "name",
    "setting",
    "unit",
    "context",
    "vartype",
    "source",
    "min_val",
    "max_val",
    "enumvals",
    "boot_val",
    "reset_val",
    "sourcefile",
    "pending_restart",
)


def pg_settings_rows(conn: Connection, names: t.Iterable[str]) -> list[dict[str, t.Any]]:
    """The ``pg_settings`` rows of the named parameters (absent names give no row)."""
    query = sql.SQL(
        "SELECT {} FROM pg_catalog.pg_settings WHERE name = ANY(%s) ORDER BY name"
    ).format(sql.SQL(", ").join(sql.Identifier(c) for c in PG_SETTINGS_COLUMNS))
    return fetch_all(conn, query, [list(names)])


def pg_file_settings_rows(
    conn: Connection, names: t.Iterable[str]
) -> list[dict[str, t.Any]] | None:
    """The configuration-file entries of the named parameters, in the order the server reads
    them (the last one wins), including values ALTER SYSTEM wrote that wait for a reload or a
    restart. None when the role may not read ``pg_file_settings`` (superuser only by default).
    """
    query = sql.SQL(
        "SELECT sourcefile, sourceline, seqno, name, setting, applied, error"
        " FROM pg_catalog.pg_file_settings WHERE name = ANY(%s) ORDER BY seqno"
    )
    try:
        return fetch_all(conn, query, [list(names)])
    except PitrError as exc:
        if is_insufficient_privilege(exc):
            return None
        raise


def alter_system_statement(name: str, value: str) -> sql.Composed:
    """``ALTER SYSTEM SET name = 'value'``."""
    return sql.SQL("ALTER SYSTEM SET {} = {}").format(sql.Identifier(name), sql.Literal(value))


RELOAD_STATEMENT = "SELECT pg_catalog.pg_reload_conf()"


def apply_settings(
    conn: Connection,
    assignments: t.Sequence[tuple[str, str]],
    *,
    reload: bool,
    check_mode: bool,
    reload_timeout: float = 10.0,
) -> list[str]:
    """Run ALTER SYSTEM for each (name, value), then reload when asked; return the SQL texts.

    In check mode nothing runs and the texts are what would run. After a reload, waits (up to
    ``reload_timeout`` seconds) until this session has re-read the configuration, so that the
    next connection (a second run of the module) sees the new values.
    """
    statements: list[Query] = [alter_system_statement(n, v) for n, v in assignments]
    if reload:
        statements.append(sql.SQL(RELOAD_STATEMENT))
    if check_mode:
        return [query_text(conn, s) for s in statements]
    loaded_before = conf_load_time(conn) if reload else None
    executed = [execute(conn, s) for s in statements]
    if reload:
        wait_for_reload(conn, loaded_before, reload_timeout)
    return executed


def conf_load_time(conn: Connection) -> t.Any:
    """When this session last read the configuration files (``pg_conf_load_time()``)."""
    row = fetch_one(conn, sql.SQL("SELECT pg_catalog.pg_conf_load_time() AS t"))
    return row["t"] if row else None


def wait_for_reload(conn: Connection, loaded_before: t.Any, timeout: float) -> bool:
    """Poll until the configuration load time moves past ``loaded_before``.

    pg_reload_conf() only signals the postmaster; it re-reads the files and then signals every
    backend, ours included. Once ours has reloaded, new connections see the new values too.
    """
    deadline = time.monotonic() + timeout
    while True:
        if conf_load_time(conn) != loaded_before:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


# facts --------------------------------------------------------------------------------------
def system_identifier(conn: Connection) -> int:
    """The cluster's system identifier (the archive's identity guard)."""
    row = fetch_one(conn, sql.SQL("SELECT system_identifier FROM pg_catalog.pg_control_system()"))
    if row is None:  # pragma: no cover - the function always returns one row
        raise PitrError("pg_control_system() returned no row")
    return int(row["system_identifier"])


def archiver_status(conn: Connection) -> dict[str, t.Any]:
    """``pg_stat_archiver`` plus the server's clock, start time, WAL position and segment size.

    ``current_wal_lsn`` is the write position and ``current_wal_file`` the segment that holds
    it (at a segment boundary, PostgreSQL names the segment before); both are None on a standby,
    which writes no WAL of its own.
    """
    query = sql.SQL(
        "SELECT a.archived_count, a.last_archived_wal, a.last_archived_time,"
        " a.failed_count, a.last_failed_wal, a.last_failed_time, a.stats_reset,"
        " now() AS now, pg_catalog.pg_postmaster_start_time() AS postmaster_start_time,"
        " pg_catalog.pg_is_in_recovery() AS in_recovery,"
        " CASE WHEN pg_catalog.pg_is_in_recovery() THEN NULL"
        " ELSE pg_catalog.pg_current_wal_lsn()::text END AS current_wal_lsn,"
        " CASE WHEN pg_catalog.pg_is_in_recovery() THEN NULL"
        " ELSE pg_catalog.pg_walfile_name(pg_catalog.pg_current_wal_lsn()) END"
        " AS current_wal_file,"
        " (SELECT setting::bigint FROM pg_catalog.pg_settings WHERE name = 'wal_segment_size')"
        " AS wal_segment_size"
        " FROM pg_catalog.pg_stat_archiver a"
    )
    row = fetch_one(conn, query)
    if row is None:  # pragma: no cover - the view always has one row
        raise PitrError("pg_stat_archiver returned no row")
    return row


def ready_count(conn: Connection) -> int | None:
    """How many WAL files wait for archiving (``.ready`` in pg_wal/archive_status).

    Read through ``pg_ls_archive_statusdir()`` so that it works over the network; needs
    superuser or pg_monitor. None when the role may not call it.
    """
    query = sql.SQL(
        "SELECT count(*) AS n FROM pg_catalog.pg_ls_archive_statusdir() WHERE name LIKE %s"
    )
    try:
        row = fetch_one(conn, query, ["%.ready"])
    except PitrError as exc:
        if is_insufficient_privilege(exc):
            return None
        raise
    return int(row["n"]) if row else 0

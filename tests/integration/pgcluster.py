# Copyright: contributors to pitr.postgresql
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Scratch PostgreSQL clusters for integration tests.

A ``PgCluster`` is a real server made with ``initdb --data-checksums`` in a private temporary
directory, listening on a free TCP port on 127.0.0.1 and on a Unix socket in its own directory.
Authentication is ``trust`` for the scratch cluster only.

When the tests run as root (the CI machine), every server-side command runs as the ``postgres``
OS user through ``runuser``, because initdb and postgres refuse to run as root; the directory is
owned by that user. As any other user, commands run as that user directly.

Typical use through the fixtures in ``conftest.py``::

    def test_something(pg_cluster):
        pg_cluster.sql("ALTER SYSTEM SET archive_timeout = '30s'")
        pg_cluster.reload()
        assert pg_cluster.show("archive_timeout") == "30s"

Or directly::

    with PgCluster.create() as cluster:
        cluster.start()
        print(cluster.sql("SELECT version()"))
"""

from __future__ import annotations

import os
import pwd
import random
import shutil
import socket
import subprocess
import tempfile
import time
import typing as t
from pathlib import Path

import psycopg

DEFAULT_BINDIR = os.environ.get("PITR_PG_BINDIR", "/usr/lib/postgresql/15/bin")
DEFAULT_OS_USER = "postgres"
SUPERUSER = "postgres"


_GIVEN_PORTS: set[int] = set()


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range", encoding="ascii") as fh:
            return int(fh.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now.

    Below the kernel's ephemeral range, so that no outgoing connection takes it before the
    server binds it (a port from bind(0) is in that range: a clone once failed with "could not
    create any TCP/IP sockets"), and never one this process handed out before (twelve clones
    of one run must not share one).
    """
    low = max(1025, min(_ephemeral_low(), 65536) - 12000)
    high = min(_ephemeral_low(), 65536)
    rng = random.Random()
    for _attempt in range(2000):
        port = rng.randrange(low, high)
        if port in _GIVEN_PORTS:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _GIVEN_PORTS.add(port)
        return port
    raise RuntimeError(f"no free TCP port on 127.0.0.1 between {low} and {high}")


class PgClusterError(RuntimeError):
    """A scratch-cluster command failed; the message carries its output and the server log."""


class PgCluster:
    """One scratch PostgreSQL cluster: data directory, port, socket directory, server log.

    Attributes:
        basedir: the private directory holding everything below (removed by ``destroy``).
        datadir: the data directory (``basedir/data``).
        sockdir: the Unix socket directory (``basedir/sock``), short enough for socket paths.
        logfile: the server log (``basedir/server.log``).
        port: the TCP port, also the socket's port number.
        bindir: the PostgreSQL binaries used (``initdb``, ``pg_ctl``, ``psql``...).
        os_user: the OS user the server runs as.
    """

    def __init__(
        self,
        basedir: Path,
        *,
        port: int | None = None,
        bindir: str = DEFAULT_BINDIR,
        os_user: str = DEFAULT_OS_USER,
    ) -> None:
        self.basedir = basedir
        self.datadir = basedir / "data"
        self.sockdir = basedir / "sock"
        self.logfile = basedir / "server.log"
        self.port = port or free_port()
        self.bindir = bindir
        self.os_user = os_user if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name

    # life cycle -----------------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        *,
        initdb_args: t.Sequence[str] = (),
        conf: dict[str, str] | None = None,
        bindir: str = DEFAULT_BINDIR,
        parent: str | None = None,
    ) -> PgCluster:
        """Make a private directory and run initdb in it (the server is not started).

        ``conf`` entries are appended to postgresql.conf (values are written as given, so quote
        strings yourself: ``{"archive_command": "'/bin/true'"}``).
        """
        basedir = Path(tempfile.mkdtemp(prefix="pitr-pg-", dir=parent))
        cluster = cls(basedir, bindir=bindir)
        try:
            cluster._chown(basedir)
            cluster.sockdir.mkdir()
            cluster._chown(cluster.sockdir)
            cluster.initdb(*initdb_args)
            base_conf = {
                "listen_addresses": "'127.0.0.1'",
                "port": str(cluster.port),
                "unix_socket_directories": f"'{cluster.sockdir}'",
                "fsync": "off",  # scratch clusters: speed over durability
                "logging_collector": "off",
            }
            base_conf.update(conf or {})
            cluster.append_conf(base_conf)
        except BaseException:
            cluster.destroy()
            raise
        return cluster

    def initdb(self, *extra: str) -> None:
        """Run ``initdb --data-checksums`` with trust authentication for the scratch cluster."""
        self._run_as_owner(
            [
                self.bin("initdb"),
                "-D",
                str(self.datadir),
                "--data-checksums",
                "-U",
                SUPERUSER,
                "--auth=trust",
                "--no-sync",
                "--encoding=UTF8",
                "--locale=C",
                *extra,
            ]
        )

    def start(self, timeout: int = 30) -> None:
        """Start the server and wait until it accepts connections."""
        self._pg_ctl("start", "-w", "-t", str(timeout), "-l", str(self.logfile))

    def stop(self, mode: str = "fast", timeout: int = 30) -> None:
        """Stop the server if it runs (``mode``: smart, fast or immediate)."""
        if self.is_running():
            self._pg_ctl("stop", "-w", "-t", str(timeout), "-m", mode)

    def restart(self, timeout: int = 30) -> None:
        """Restart the server (applies settings of context ``postmaster``)."""
        self._pg_ctl("restart", "-w", "-t", str(timeout), "-m", "fast", "-l", str(self.logfile))

    def reload(self) -> None:
        """Send SIGHUP through ``pg_ctl reload`` (applies settings of context ``sighup``)."""
        self._pg_ctl("reload")

    def is_running(self) -> bool:
        """True when ``pg_ctl status`` finds a server for the data directory."""
        if not self.datadir.exists():
            return False
        proc = subprocess.run(
            self._as_owner([self.bin("pg_ctl"), "status", "-D", str(self.datadir)]),
            capture_output=True,
            text=True,
            check=False,
        )
        return proc.returncode == 0

    def destroy(self) -> None:
        """Stop the server (immediately) and remove the whole directory."""
        try:
            if self.is_running():
                self._pg_ctl("stop", "-w", "-t", "30", "-m", "immediate")
        finally:
            shutil.rmtree(self.basedir, ignore_errors=True)

    def __enter__(self) -> PgCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()

    # configuration ----------------------------------------------------------------------------
    def append_conf(self, settings: dict[str, str]) -> None:
        """Append ``name = value`` lines to postgresql.conf (values written as given)."""
        lines = "".join(f"{name} = {value}\n" for name, value in settings.items())
        with open(self.datadir / "postgresql.conf", "a", encoding="utf-8") as conf:
            conf.write(lines)

    def auto_conf(self) -> str:
        """The text of postgresql.auto.conf (what ALTER SYSTEM wrote)."""
        return (self.datadir / "postgresql.auto.conf").read_text(encoding="utf-8")

    # SQL ----------------------------------------------------------------------------------------
    @property
    def conninfo(self) -> dict[str, t.Any]:
        """psycopg/libpq keyword arguments for the superuser over the Unix socket."""
        return {
            "host": str(self.sockdir),
            "port": self.port,
            "user": SUPERUSER,
            "dbname": "postgres",
        }

    @property
    def module_params(self) -> dict[str, t.Any]:
        """The collection's connection options that reach this cluster over its socket."""
        return {"login_unix_socket": str(self.sockdir), "port": self.port, "login_user": SUPERUSER}

    def connect(self, **kwargs: t.Any) -> psycopg.Connection[t.Any]:
        """A new autocommit connection as the superuser (close it yourself)."""
        return psycopg.connect(**self.conninfo, autocommit=True, **kwargs)

    def sql(self, query: str, params: t.Sequence[t.Any] | None = None) -> list[tuple[t.Any, ...]]:
        """Run one statement in autocommit mode; return its rows (empty for commands)."""
        with self.connect() as conn:
            cur = conn.execute(query.encode(), params)
            return list(cur.fetchall()) if cur.description is not None else []

    def scalar(self, query: str, params: t.Sequence[t.Any] | None = None) -> t.Any:
        """The first column of the first row of ``query``."""
        rows = self.sql(query, params)
        if not rows:
            raise PgClusterError(f"{query!r} returned no rows")
        return rows[0][0]

    def show(self, name: str) -> str:
        """``SHOW name`` as the server reports it (with units, e.g. ``60s``)."""
        return str(self.scalar(f"SHOW {name}"))

    def setting_row(self, name: str) -> dict[str, t.Any]:
        """The ``pg_settings`` row of one parameter as a dict."""
        with self.connect() as conn, conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
            cur.execute("SELECT * FROM pg_settings WHERE name = %s", (name,))
            row = cur.fetchone()
        if row is None:
            raise PgClusterError(f"no parameter {name!r} in pg_settings")
        return dict(row)

    def psql(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run ``psql -X`` against the cluster as the superuser with extra arguments."""
        argv = [
            self.bin("psql"),
            "-X",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            str(self.sockdir),
            "-p",
            str(self.port),
            "-U",
            SUPERUSER,
            "-d",
            "postgres",
            *args,
        ]
        proc = subprocess.run(argv, capture_output=True, text=True, check=False)
        if check and proc.returncode != 0:
            raise PgClusterError(f"psql {' '.join(args)} failed: {proc.stderr.strip()}")
        return proc

    def switch_wal(self) -> str:
        """Write a little WAL and switch to a new segment.

        Returns the name of the segment just completed, which now waits for archiving
        (``.ready``) when archive_mode is on.
        """
        with self.connect() as conn:
            conn.execute("CREATE TABLE IF NOT EXISTS pitr_test_switch (n int)")
            conn.execute("INSERT INTO pitr_test_switch VALUES (1)")
            row = conn.execute("SELECT pg_walfile_name(pg_switch_wal())").fetchone()
        assert row is not None
        return str(row[0])

    def ready_files(self) -> list[str]:
        """Names of the WAL files waiting for archiving (``.ready`` in pg_wal/archive_status)."""
        rows = self.sql(
            "SELECT name FROM pg_ls_archive_statusdir() WHERE name LIKE '%.ready' ORDER BY name"
        )
        return [str(r[0]).removesuffix(".ready") for r in rows]

    def wait_for(
        self, query: str, expected: t.Any, timeout: float = 30.0, interval: float = 0.2
    ) -> t.Any:
        """Poll ``query`` (first column of the first row) until it equals ``expected``.

        Returns the last value seen; raises PgClusterError after ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        value: t.Any = None
        while time.monotonic() < deadline:
            value = self.scalar(query)
            if value == expected:
                return value
            time.sleep(interval)
        raise PgClusterError(f"{query!r} returned {value!r}, not {expected!r}, after {timeout}s")

    # helpers ------------------------------------------------------------------------------------
    def bin(self, program: str) -> str:
        """Absolute path of a PostgreSQL program in ``bindir``."""
        return os.path.join(self.bindir, program)

    def log_text(self) -> str:
        """The server log so far (empty if none)."""
        try:
            return self.logfile.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def _pg_ctl(self, action: str, *args: str) -> None:
        argv = [self.bin("pg_ctl"), action, "-D", str(self.datadir), *args]
        if action in ("start", "restart"):
            argv += ["-o", f"-p {self.port} -k {self.sockdir}"]
        self._run_as_owner(argv)

    def _as_owner(self, argv: list[str]) -> list[str]:
        if os.geteuid() == 0:
            return ["runuser", "-u", self.os_user, "--", *argv]
        return argv

    def init_repository(self, program: str, repository: Path | str) -> None:
        """``pitr-wal --repo REPOSITORY init --pgdata DATADIR`` as the server's user, as the
        archiving role does: the repository's identity is this cluster's."""
        self._run_as_owner(
            ["/usr/bin/python3", "-I", "-S", str(program), "--repo", str(repository), "init",
             "--pgdata", str(self.datadir)]
        )  # fmt: skip

    def _run_as_owner(self, argv: list[str]) -> None:
        proc = subprocess.run(
            self._as_owner(argv), capture_output=True, text=True, check=False, cwd="/"
        )
        if proc.returncode != 0:
            raise PgClusterError(
                f"{' '.join(argv)} exited {proc.returncode}\nstdout: {proc.stdout.strip()}\n"
                f"stderr: {proc.stderr.strip()}\nserver log:\n{self.log_text()[-4000:]}"
            )

    def _chown(self, path: Path) -> None:
        give_to_server_user(path, self.os_user)


def give_to_server_user(path: Path, os_user: str = DEFAULT_OS_USER) -> None:
    """Make ``path`` owned by the server's OS user when running as root (a no-op otherwise).

    For directories the server writes to, such as an archive_command's destination.
    """
    if os.geteuid() == 0:
        pw = pwd.getpwnam(os_user)
        os.chown(path, pw.pw_uid, pw.pw_gid)

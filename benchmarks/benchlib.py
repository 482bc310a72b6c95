# Copyright: contributors to pitr.postgresql
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Shared pieces of the benchmark harness: statistics, bounded waits, a scratch PostgreSQL
cluster, a pgBackRest configuration for it, running commands as the ``postgres`` OS user the
way the archiver does, and reporting (log lines, Markdown tables, the results files, ``main``).

The harness runs as root (initdb and the server run as ``postgres``). Commands that are timed
run as ``postgres`` through ``subprocess``'s ``user=``/``group=`` (setuid in the child just
before exec), so no ``runuser``/PAM process sits between the timer and the command.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import time
import typing as t
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PG_BIN = Path("/usr/lib/postgresql/15/bin")
SYSTEM_PYTHON = "/usr/bin/python3"
PG_USER = "postgres"
# What the archiver's children see; no version-manager shims, no user site.
CHILD_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "LANG": "C.UTF-8",
    "HOME": "/var/lib/postgresql",
}


class BenchError(Exception):
    """A benchmark could not run as planned (missing tool, server failure, timeout)."""


# ---------------------------------------------------------------------------------------------
# Statistics


def percentile(values: t.Sequence[float], q: float) -> float:
    """Percentile ``q`` (0-100) with linear interpolation between closest ranks."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def summarize(values: t.Sequence[float]) -> dict[str, float]:
    """p50/p90/p99/mean/min/max of a sample (milliseconds in, milliseconds out)."""
    if not values:
        return {"n": 0}
    return {
        "n": len(values),
        "p50": percentile(values, 50),
        "p90": percentile(values, 90),
        "p99": percentile(values, 99),
        "mean": statistics.fmean(values),
        "min": min(values),
        "max": max(values),
    }


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0 or math.isnan(a) or math.isnan(b):
        return None
    return a / b


# ---------------------------------------------------------------------------------------------
# Processes


def as_postgres() -> dict[str, t.Any]:
    """``subprocess`` keyword arguments that run the child as the postgres OS user."""
    return {"user": PG_USER, "group": PG_USER, "extra_groups": [], "env": dict(CHILD_ENV)}


def chown_postgres(path: str | os.PathLike[str], recursive: bool = False) -> None:
    if recursive:
        for dirpath, _dirs, files in os.walk(path):
            shutil.chown(dirpath, PG_USER, PG_USER)
            for name in files:
                shutil.chown(os.path.join(dirpath, name), PG_USER, PG_USER)
    else:
        shutil.chown(path, PG_USER, PG_USER)


def run(
    argv: t.Sequence[str], *, postgres: bool = True, timeout: float = 300, **kwargs: t.Any
) -> subprocess.CompletedProcess[str]:
    """Run a helper command (not timed); raise BenchError with its output on failure."""
    extra = as_postgres() if postgres else {}
    extra.update(kwargs)
    proc = subprocess.run(
        list(argv), capture_output=True, text=True, timeout=timeout, check=False, **extra
    )
    if proc.returncode != 0:
        raise BenchError(
            f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr.strip() or proc.stdout}"
        )
    return proc


def timed_run(
    argv: t.Sequence[str], *, cwd: str | None = None, timeout: float = 120
) -> tuple[float, float]:
    """Run ``argv`` as postgres; return (wall ms, CPU ms of it and its waited-for children).

    CPU time is the steadier figure on a busy machine: waiting for a core does not count.
    """
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    proc = subprocess.run(
        list(argv),
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        timeout=timeout,
        check=False,
        **as_postgres(),
    )
    elapsed = (time.perf_counter() - started) * 1000
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise BenchError(
            f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr.decode(errors='replace')}"
        )
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return elapsed, cpu * 1000


def process_cpu_s(pid: int) -> float:
    """CPU seconds of a process plus its waited-for children (utime+stime+cutime+cstime)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def drop_page_cache_of(paths: t.Iterable[str]) -> None:
    """Read files once so that every tool finds them in the page cache (fair, warm start)."""
    for path in paths:
        with open(path, "rb") as fh:
            while fh.read(1 << 20):
                pass


def drop_caches() -> str | None:
    """``sync``, then drop the kernel's page cache (root only): the next read comes from disk.

    None when it was done, else why not (not root, a container without write access to
    ``/proc/sys``...).
    """
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w", encoding="ascii") as fh:
            fh.write("3\n")
    except OSError as exc:
        return f"cannot write /proc/sys/vm/drop_caches: {exc.strerror or exc}"
    return None


# ---------------------------------------------------------------------------------------------
# The host command, installed as the archiving role lays it out


def install_host_command(prefix: Path, *, precompile: bool) -> str:
    """Install ``pitr-wal`` under ``prefix`` with tests/support/hostcmd_install.py.

    The tree stays root-owned, as a role installing as root leaves it, so the postgres user
    cannot write ``__pycache__``: with ``precompile`` the ``.pyc`` files are made here, without
    it every run compiles the modules from source (what a role that does not precompile gets).
    """
    spec = importlib.util.spec_from_file_location(
        "pitr_bench_hostcmd_install", ROOT / "tests" / "support" / "hostcmd_install.py"
    )
    if spec is None or spec.loader is None:
        raise BenchError("tests/support/hostcmd_install.py is missing")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    program = str(module.install_host_command(prefix))
    for dirpath, dirs, _files in os.walk(prefix):
        for name in dirs:
            if name == "__pycache__":
                shutil.rmtree(os.path.join(dirpath, name))
    if precompile:
        compile_tree(prefix / "lib")
    os.chmod(prefix, 0o755)
    return program


def compile_tree(path: Path) -> None:
    """``.pyc`` files for every module below ``path``, made as root with the system Python."""
    run([SYSTEM_PYTHON, "-I", "-S", "-m", "compileall", "-q", str(path)], postgres=False)


def host_lib(prefix: Path) -> str:
    return str(prefix / "lib" / "current")


def init_repository(program: str, repo: Path, pgdata: Path) -> None:
    """``pitr-wal --repo REPO init --pgdata PGDATA`` as postgres (not timed)."""
    run(
        [SYSTEM_PYTHON, "-I", "-S", program, "--repo", str(repo), "init",
         "--pgdata", str(pgdata)]
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Bounded waiting


class Deadline:
    """A time bound for polling loops; ``expired`` once ``seconds`` have passed."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.end = time.monotonic() + seconds

    @property
    def expired(self) -> bool:
        return time.monotonic() >= self.end


# ---------------------------------------------------------------------------------------------
# A scratch PostgreSQL 15 cluster

ARCHIVED_RE = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}) \S+ \[\d+\] archiver DEBUG:  archived"
    r" (?:write-ahead log file )?\"([0-9A-F]{24})\""
)
FAILED_RE = re.compile(r"archive command failed|archive_command failed|could not archive")
WAL_NAME_RE = re.compile(r"^[0-9A-F]{24}$")


class ScratchCluster:
    """initdb'd PostgreSQL 15 in a private directory, Unix socket only, run as postgres.

    Archive settings live in an include file (``bench_archive.conf``) that the harness
    rewrites and reloads: ALTER SYSTEM refuses ``basic_archive.archive_directory`` before the
    library is loaded, and postgresql.auto.conf would override the include anyway.
    """

    def __init__(self, base: Path, port: int = 55439) -> None:
        self.base = base
        self.datadir = base / "data"
        self.socket_dir = base
        self.port = port
        self.logfile = base / "server.log"
        self.include = self.datadir / "bench_archive.conf"

    def bin(self, name: str) -> str:
        return str(PG_BIN / name)

    def create(self, extra_conf: dict[str, str]) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        chown_postgres(self.base)
        run([self.bin("initdb"), "-D", str(self.datadir), "-A", "trust", "--no-sync", "-k"])
        settings = {
            "port": str(self.port),
            "unix_socket_directories": f"'{self.socket_dir}'",
            "listen_addresses": "''",
            "wal_level": "replica",
            "archive_mode": "on",
            "log_line_prefix": "'%m [%p] %b '",
            "logging_collector": "off",
            "log_checkpoints": "off",
            **extra_conf,
        }
        lines = [f"{k} = {v}" for k, v in settings.items()]
        lines.append("include_if_exists 'bench_archive.conf'")
        with open(self.datadir / "postgresql.conf", "a", encoding="utf-8") as fh:
            fh.write("\n# pitr.postgresql benchmark\n" + "\n".join(lines) + "\n")
        self.write_archive_settings({"archive_command": "''"})

    def write_archive_settings(self, settings: dict[str, str]) -> None:
        text = "".join(f"{k} = {v}\n" for k, v in settings.items())
        tmp = self.include.with_suffix(".tmp")
        tmp.write_text(text, encoding="utf-8")
        chown_postgres(tmp)
        os.replace(tmp, self.include)

    def start(self) -> None:
        run(
            [
                self.bin("pg_ctl"),
                "-D",
                str(self.datadir),
                "-l",
                str(self.logfile),
                "-w",
                "-t",
                "60",
                "start",
            ],
            timeout=90,
        )

    def stop(self) -> None:
        if (self.datadir / "postmaster.pid").exists():
            run(
                [self.bin("pg_ctl"), "-D", str(self.datadir), "-m", "immediate", "-w", "stop"],
                timeout=90,
            )

    def postmaster_pid(self) -> int:
        return int((self.datadir / "postmaster.pid").read_text().split()[0])

    def sighup(self) -> None:
        os.kill(self.postmaster_pid(), signal.SIGHUP)

    def psql(self, sql: str) -> str:
        proc = run(
            [
                self.bin("psql"),
                "-X",
                "-Atq",
                "-h",
                str(self.socket_dir),
                "-p",
                str(self.port),
                "-d",
                "postgres",
                "-v",
                "ON_ERROR_STOP=1",
                "-c",
                sql,
            ],
            timeout=600,
        )
        return proc.stdout.strip()

    def pgbench_argv(self, *args: str) -> list[str]:
        return [
            self.bin("pgbench"),
            "-h",
            str(self.socket_dir),
            "-p",
            str(self.port),
            *args,
            "postgres",
        ]

    def current_lsn(self) -> int:
        hi, lo = self.psql("SELECT pg_current_wal_lsn()").split("/")
        return (int(hi, 16) << 32) + int(lo, 16)

    def archive_status(self) -> Path:
        return self.datadir / "pg_wal" / "archive_status"

    def ready(self) -> list[str]:
        return sorted(
            n[: -len(".ready")] for n in os.listdir(self.archive_status()) if n.endswith(".ready")
        )

    def ready_count(self) -> int:
        return sum(1 for n in os.listdir(self.archive_status()) if n.endswith(".ready"))

    def archiver_pid(self) -> int | None:
        pid = self.psql("SELECT pid FROM pg_stat_activity WHERE backend_type = 'archiver'")
        return int(pid) if pid else None

    def failed_count(self) -> int:
        return int(self.psql("SELECT failed_count FROM pg_stat_archiver"))

    def log_size(self) -> int:
        return self.logfile.stat().st_size

    def log_since(self, offset: int) -> str:
        with open(self.logfile, "rb") as fh:
            fh.seek(offset)
            return fh.read().decode("utf-8", errors="replace")


# ---------------------------------------------------------------------------------------------
# pgBackRest, the baseline


def write_pgbackrest_conf(
    base: Path, stanza: str, cluster: ScratchCluster, options: t.Sequence[str]
) -> Path:
    """``base/pgbackrest.conf`` for ``cluster`` with its repository, lock, log and spool
    directories below ``base`` (all owned by postgres); ``options`` go into ``[global]``.
    """
    for sub in ("repo", "lock", "log", "spool"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    lines = [
        "[global]",
        f"repo1-path={base / 'repo'}",
        f"lock-path={base / 'lock'}",
        f"log-path={base / 'log'}",
        f"spool-path={base / 'spool'}",
        "log-level-console=warn",
        "log-level-file=off",
        *options,
        f"[{stanza}]",
        f"pg1-path={cluster.datadir}",
        f"pg1-port={cluster.port}",
        f"pg1-socket-path={cluster.socket_dir}",
    ]
    conf = base / "pgbackrest.conf"
    conf.write_text("\n".join(lines) + "\n", encoding="utf-8")
    chown_postgres(base, recursive=True)
    return conf


# ---------------------------------------------------------------------------------------------
# Reporting and the command line


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def median_or_none(values: t.Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def fmt(value: float | None, digits: int = 2, unit: str = "") -> str:
    return "-" if value is None else f"{value:.{digits}f}{unit}"


def md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table, then an empty line."""
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _column in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return [*out, ""]


def ratio_medians(per_round: dict[str, list[float]]) -> dict[str, dict[str, t.Any]]:
    """Per-round ratios by name -> ``{"median": ..., "rounds": [...]}`` (both runs of a ratio
    saw the same load; the median of the rounds is the figure reported)."""
    return {k: {"median": statistics.median(v), "rounds": v} for k, v in per_round.items()}


def args_record(args: argparse.Namespace) -> dict[str, t.Any]:
    """The options of a run as JSON-ready values (paths as text), for the results file."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}


def merge_args(defaults: argparse.Namespace, args: argparse.Namespace) -> argparse.Namespace:
    """``defaults`` (a benchmark's own parsed defaults) with the values ``args`` has for the
    same options; ``workdir`` and ``out`` are never taken from ``args``.

    How a benchmark's ``run(args)`` takes benchmarks/run.py's namespace.
    """
    for key, value in vars(args).items():
        if hasattr(defaults, key) and key not in ("workdir", "out"):
            setattr(defaults, key, value)
    return defaults


def _terminate(signum: int, frame: t.Any) -> None:
    # Unwind through the finally blocks: stop pgbench and the scratch servers, remove files.
    raise SystemExit(f"stopped by signal {signum}")


def write_report(out: Path, stem: str, results: dict[str, t.Any], text: str) -> None:
    """``out/<stem>.json`` (every raw sample) and ``out/<stem>.md`` (``text``); print ``text``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    (out / f"{stem}.md").write_text(text)
    print(text)


def bench_main(
    run_bench: t.Callable[[], dict[str, t.Any]],
    render: t.Callable[[dict[str, t.Any]], str],
    out: Path,
    stem: str,
) -> int:
    """A benchmark's ``main``: SIGTERM/SIGINT unwind through the clean-up, ``run_bench()``,
    then :func:`write_report` of its results; 1 (and the reason on stderr) on BenchError.
    """
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, _terminate)
    try:
        results = run_bench()
    except BenchError as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 1
    write_report(out, stem, results, render(results))
    return 0

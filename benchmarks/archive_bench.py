# Copyright: contributors to pitr.postgresql
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Archiving benchmarks: push latency, archiver drain, interpreter start, compression.

Every figure is measured next to its baselines in the same invocation, on the same real WAL
segments (taken from a PG15 cluster under pgbench), and kept raw. See
/work/shared/reference/performance-targets.md for what is compared with what.

Tools are archive_command strings (with %p and %f) or archive_library settings; the latency
benchmark runs the very same command string through ``/bin/sh -c`` as the postgres user with
the data directory as working directory, as the archiver does.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
import typing as t
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from benchlib import (
    ARCHIVED_RE,
    FAILED_RE,
    PG_BIN,
    SYSTEM_PYTHON,
    WAL_NAME_RE,
    BenchError,
    Deadline,
    ScratchCluster,
    as_postgres,
    chown_postgres,
    compile_tree,
    drop_page_cache_of,
    host_lib,
    init_repository,
    install_host_command,
    log,
    percentile,
    process_cpu_s,
    run,
    summarize,
    timed_run,
    write_pgbackrest_conf,
)

SEGMENT_BYTES = 16 * 1024 * 1024
STANZA = "bench"
PGBENCH_ARGS = ("-n", "-M", "prepared", "-c", "4", "-j", "2")
# The backlog workload: pgbench's tables, but each transaction updates 100 neighbouring
# accounts and logs one history row, so the server writes WAL (heap updates, full-page images)
# without a client round trip per row. On a shared 2-core machine the built-in TPC-B script is
# bound by client and context-switch overhead and may produce only a few MB/s of WAL.
BATCH_SCRIPT = """\\set aid random(1, :rows - 100)
\\set delta random(-5000, 5000)
BEGIN;
UPDATE pgbench_accounts SET abalance = abalance + :delta WHERE aid BETWEEN :aid AND :aid + 99;
INSERT INTO pgbench_history (tid, bid, aid, delta, mtime)
  VALUES (1, 1, :aid, :delta, CURRENT_TIMESTAMP);
END;
"""
HOSTSIDE = Path(__file__).resolve().with_name("hostside.py")

# Optimisation experiments: benchmark-local monkeypatches (hostside.py) of the installed code.
SAFE_COMBINED = "nofork,single-sha,writev,lean-imports,mmap"
VARIANT_TOOLS = {
    "variant:control": "control",
    "variant:nofork": "nofork",
    "variant:single-sha": "single-sha",
    "variant:writev": "writev",
    "variant:lazy-imports": "lazy-imports",
    "variant:lean-imports": "lean-imports",
    "variant:mmap": "mmap",
    "variant:combined": SAFE_COMBINED,
    "variant:zstd-direct": "zstd-direct",
    "variant:combined+zstd-direct": SAFE_COMBINED + ",zstd-direct",
    "variant:zstd-mt": "zstd-mt",
    "variant:zstd-cli": "zstd-cli",
    "variant:nofsync": "nofsync",
}
TOOL_LABELS = {
    "pitr-wal-zstd": "pitr-wal push, zstd-1 (default)",
    "pitr-wal-lz4": "pitr-wal push, lz4-1",
    "pitr-wal-none": "pitr-wal push, none",
    "pitr-wal-zstd-nopyc": "pitr-wal push, zstd-1, no .pyc (root-owned, not precompiled)",
    "pitr-wal-base-zstd": "pitr-wal push, zstd-1, at --base-ref (before)",
    "cp-sync": "cp + sync file + mv + sync dir (sh)",
    "basic_archive": "basic_archive (archive_library)",
    "pgbackrest-zst": "pgbackrest archive-push zst-1",
    "pgbackrest-lz4": "pgbackrest archive-push lz4-1",
    "pgbackrest-gz": "pgbackrest archive-push gz-6",
    "pgbackrest-zst-async": "pgbackrest archive-push zst-1, archive-async, process-max 2",
    "variant:control": "variant: control (wrapper, no change)",
    "variant:nofork": "variant: no fork (timeout by SIGALRM in-process)",
    "variant:single-sha": "variant: one sha256 pass instead of two",
    "variant:writev": "variant: writev header+payload (no envelope copy)",
    "variant:lazy-imports": "variant: lazy shlex/subprocess/shutil/socket imports",
    "variant:lean-imports": "variant: lazy imports above + plain classes, no dataclasses",
    "variant:mmap": "variant: mmap the source instead of read() into bytes",
    "variant:combined": "variant: nofork + single-sha + writev + lean-imports + mmap",
    "variant:zstd-direct": "variant: load zstandard's C backend directly (no platform import)",
    "variant:combined+zstd-direct": "variant: combined above + zstd-direct",
    "variant:zstd-mt": "variant: zstd with 2 worker threads",
    "variant:zstd-cli": "variant: zstd via the zstd program (fallback path)",
    "variant:nofsync": "attribution only: no fsync at all (unsafe)",
}
DEFAULT_LATENCY_TOOLS = (
    "cp-sync",
    "pgbackrest-zst",
    "pgbackrest-lz4",
    "pgbackrest-gz",
    "pitr-wal-zstd",
    "pitr-wal-lz4",
    "pitr-wal-none",
    "pitr-wal-zstd-nopyc",
    # single-sha is left out by default: the tree already hashes once per push;
    # combined+zstd-direct measured no gain over combined (zstd-direct alone: -3 ms CPU).
    *(v for v in VARIANT_TOOLS if v not in ("variant:single-sha", "variant:combined+zstd-direct")),
)
DEFAULT_DRAIN_TOOLS = ("basic_archive", "pgbackrest-zst", "pitr-wal-zstd", "cp-sync")
EXTRA_DRAIN_TOOLS = (
    "pgbackrest-lz4",
    "pgbackrest-gz",
    "pgbackrest-zst-async",
    "pitr-wal-lz4",
    "variant:combined",
)


# ---------------------------------------------------------------------------------------------
# The bench environment: one cluster, the installed host command, a corpus of real segments


@dataclass
class BenchEnv:
    workdir: Path
    cluster: ScratchCluster
    prefix: Path
    prefix_nopyc: Path
    program: str
    program_nopyc: str
    hostside: str
    corpus: list[Path] = field(default_factory=list)
    prefix_base: Path | None = None  # --base-ref: module_utils of another commit
    base_ref: str = ""
    pgbench_wal_mb_s: list[float] = field(default_factory=list)
    workload: list[str] = field(default_factory=list)  # pgbench arguments of the backlogs
    tpcb: dict[str, t.Any] = field(default_factory=dict)

    @property
    def lib(self) -> str:
        return host_lib(self.prefix)


def setup_env(workdir: Path, base_ref: str | None = None) -> BenchEnv:
    """Install the host command twice (precompiled, and not) and start a scratch cluster.

    With ``base_ref`` a third copy gets that commit's module_utils (tool pitr-wal-base-zstd).
    """
    if os.geteuid() != 0:
        raise BenchError("run the benchmarks as root: the servers and commands run as postgres")
    for tool in ("pgbackrest", "zstd", "lz4", "gzip"):
        if shutil.which(tool) is None:
            raise BenchError(f"{tool} is missing: apt-get install -y {tool}")
    if (
        not (PG_BIN / "postgres").exists()
        or not Path("/usr/lib/postgresql/15/lib/basic_archive.so").exists()
    ):
        raise BenchError(
            "PostgreSQL 15 (with basic_archive) is missing: apt-get install postgresql-15"
        )
    workdir.mkdir(parents=True, exist_ok=True)
    chown_postgres(workdir)
    prefix = workdir / "prefix"
    prefix_nopyc = workdir / "prefix-nopyc"
    program = install_host_command(prefix, precompile=True)
    program_nopyc = install_host_command(prefix_nopyc, precompile=False)
    hostside = install_hostside(prefix)
    cluster = ScratchCluster(workdir / "cluster")
    cluster.create(
        {
            "max_wal_size": "'8GB'",
            "min_wal_size": "'2GB'",
            "checkpoint_timeout": "'1h'",
            "synchronous_commit": "off",
            "shared_buffers": "'256MB'",
        }
    )
    cluster.start()
    env = BenchEnv(workdir, cluster, prefix, prefix_nopyc, program, program_nopyc, hostside)
    if base_ref:
        env.prefix_base = install_base_ref(workdir / "prefix-base", base_ref)
        env.base_ref = base_ref
    return env


def install_base_ref(prefix: Path, ref: str) -> Path:
    """The host command with plugins/module_utils and the launcher as of git commit ``ref``."""
    install_host_command(prefix, precompile=False)
    pkg = Path(host_lib(prefix), "ansible_collections", "pitr", "postgresql", "plugins")
    root = Path(__file__).resolve().parents[1]
    listing = subprocess.run(
        ["git", "-C", str(root), "ls-tree", "--name-only", ref, "plugins/module_utils/"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    for old in (pkg / "module_utils").glob("*.py"):
        old.unlink()
    for path in [*listing, "roles/archiving/files/pitr-wal"]:
        text = subprocess.run(
            ["git", "-C", str(root), "show", f"{ref}:{path}"], check=True, capture_output=True
        ).stdout
        target = prefix / "bin" / "pitr-wal" if path.startswith("roles/") else pkg.parent / path
        if path.endswith(".py") or path.startswith("roles/"):
            target.write_bytes(text)
    (pkg / "module_utils" / "__init__.py").touch()
    compile_tree(prefix / "lib")
    os.chmod(prefix, 0o755)
    return prefix


def install_hostside(prefix: Path) -> str:
    """hostside.py as a precompiled module plus a launcher as small as bin/pitr-wal.

    Run as a script it would be compiled from source on every call (about 10 ms of CPU),
    which the variants' control would carry but pitr-wal does not.
    """
    lib = prefix / "lib" / "bench"
    lib.mkdir(parents=True, exist_ok=True)
    shutil.copy2(HOSTSIDE, lib / "hostside.py")
    compile_tree(lib)
    launcher = prefix / "bin" / "pitr-bench-hostside"
    launcher.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(lib)!r})\n"
        "from hostside import main\n"
        "sys.exit(main(sys.argv[1:]))\n",
        encoding="utf-8",
    )
    for path in (lib, lib / "hostside.py", launcher):
        os.chmod(path, 0o755 if path.is_dir() else 0o644)
    return str(launcher)


def run_hostside(env: BenchEnv, command: str, args: list[str], timeout: float) -> t.Any:
    """``hostside.py COMMAND LIB ARGS...`` as root (not timed here); its JSON output."""
    proc = subprocess.run(
        [SYSTEM_PYTHON, "-I", "-S", env.hostside, command, env.lib, *args],
        capture_output=True,
        text=True,
        check=True,
        timeout=timeout,
    )
    return json.loads(proc.stdout)


def load_data(env: BenchEnv, scale: int, workload: str, tpcb_seconds: float) -> None:
    """pgbench tables; the WAL rate of built-in TPC-B; all that WAL archived into nothing."""
    log(f"cluster up in {env.cluster.base}; pgbench -i -s {scale}")
    run(env.cluster.pgbench_argv("-i", "-q", "-s", str(scale)), timeout=600)
    # Flush the freshly loaded tables now, or the first backlog crawls behind their writeback.
    env.cluster.psql("CHECKPOINT")
    os.sync()
    if workload == "batch":
        script = env.workdir / "batch.sql"
        script.write_text(BATCH_SCRIPT, encoding="utf-8")
        chown_postgres(script)
        env.workload = [*PGBENCH_ARGS, "-f", str(script), "-D", f"rows={100000 * scale}"]
    else:
        env.workload = list(PGBENCH_ARGS)
    if tpcb_seconds > 0:
        env.tpcb = measure_tpcb(env, tpcb_seconds)
        log(f"pgbench TPC-B: {env.tpcb['tps']:.0f} tps, {env.tpcb['wal_mb_s']:.1f} MB/s of WAL")
    discard_backlog(env)


def measure_tpcb(env: BenchEnv, seconds: float) -> dict[str, t.Any]:
    """WAL rate of the built-in TPC-B pgbench (synchronous_commit=off): the load to outrun."""
    cluster = env.cluster
    cluster.psql("CHECKPOINT")
    lsn0 = cluster.current_lsn()
    started = time.perf_counter()
    proc = run(cluster.pgbench_argv(*PGBENCH_ARGS, "-T", str(int(seconds))), timeout=seconds + 120)
    elapsed = time.perf_counter() - started
    wal = cluster.current_lsn() - lsn0
    m = re.search(r"tps = ([0-9.]+)", proc.stdout)
    return {
        "seconds": elapsed,
        "wal_bytes": wal,
        "wal_mb_s": wal / 1e6 / elapsed,
        "tps": float(m.group(1)) if m else float("nan"),
        "argv": [*PGBENCH_ARGS, "-T", str(int(seconds))],
    }


def teardown_env(env: BenchEnv, keep: bool) -> None:
    try:
        env.cluster.stop()
    finally:
        if not keep:
            shutil.rmtree(env.workdir, ignore_errors=True)


def pause_archiving(cluster: ScratchCluster, restarts: bool = False) -> None:
    """archive_command = '': PostgreSQL keeps WAL and lets .ready files accumulate.

    ``restarts``: an archive_library was set, so the archiver exits and must come back.
    """
    old = cluster.archiver_pid() if restarts else None
    cluster.write_archive_settings({"archive_command": "''"})
    cluster.sighup()
    time.sleep(0.2)
    wait_archiver(cluster, old)


def wait_archiver(cluster: ScratchCluster, not_pid: int | None = None, seconds: float = 90) -> None:
    """Wait until an archiver process (other than ``not_pid``) runs.

    An archiver that exits because archive_library changed is restarted by the postmaster
    only on its next loop, which may be a minute away; each connection made here wakes it.
    In production the library is set at server start, so that delay is not the tool's cost.
    """
    deadline = Deadline(seconds)
    while not deadline.expired:
        pid = cluster.archiver_pid()
        if pid is not None and pid != not_pid:
            return
        time.sleep(0.05)
    raise BenchError(f"no new archiver process after {seconds:.0f} s")


def wait_ready_zero(cluster: ScratchCluster, seconds: float) -> bool:
    deadline = Deadline(seconds)
    while not deadline.expired:
        if cluster.ready_count() == 0:
            return True
        time.sleep(0.005)
    return cluster.ready_count() == 0


def discard_backlog(env: BenchEnv) -> None:
    """Archive whatever is pending into nothing (/bin/true), then pause again."""
    env.cluster.write_archive_settings({"archive_command": "'/bin/true'"})
    env.cluster.sighup()
    if not wait_ready_zero(env.cluster, 120):
        raise BenchError("the archiver did not drain with archive_command=/bin/true in 120 s")
    pause_archiving(env.cluster)


def generate_backlog(env: BenchEnv, segments: int, max_seconds: float) -> dict[str, t.Any]:
    """Run pgbench until ``segments`` complete segments wait in pg_wal (bounded in time)."""
    cluster = env.cluster
    lsn0 = cluster.current_lsn()
    started = time.perf_counter()
    proc = subprocess.Popen(
        cluster.pgbench_argv(*env.workload, "-T", str(int(max_seconds) + 5)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        **as_postgres(),
    )
    deadline = Deadline(max_seconds)
    try:
        while cluster.ready_count() < segments and proc.poll() is None and not deadline.expired:
            time.sleep(0.1)
        lsn1 = cluster.current_lsn()
        elapsed = time.perf_counter() - started
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    ready = cluster.ready_count()
    rate = (lsn1 - lsn0) / 1e6 / elapsed
    env.pgbench_wal_mb_s.append(rate)
    log(f"backlog: {ready} segments after {elapsed:.1f} s of pgbench ({rate:.1f} MB/s of WAL)")
    if ready < min(segments, 8):
        raise BenchError(f"pgbench made only {ready} segments in {max_seconds:.0f} s")
    return {"segments": ready, "pgbench_s": elapsed, "wal_mb_s": rate}


def make_corpus(env: BenchEnv, segments: int, max_seconds: float) -> dict[str, t.Any]:
    """Copy ``segments`` real, complete segments out of pg_wal (the backlog stays)."""
    if env.cluster.ready_count() < segments:
        generate_backlog(env, segments, max_seconds)
    corpus_dir = env.workdir / "corpus"
    corpus_dir.mkdir(exist_ok=True)
    chown_postgres(corpus_dir)
    env.corpus = []
    for name in env.cluster.ready()[:segments]:
        dest = corpus_dir / name
        shutil.copyfile(env.cluster.datadir / "pg_wal" / name, dest)
        chown_postgres(dest)
        env.corpus.append(dest)
    os.sync()
    return {"segments": len(env.corpus), "first": env.corpus[0].name, "last": env.corpus[-1].name}


# ---------------------------------------------------------------------------------------------
# Tools


@dataclass
class Tool:
    key: str
    dest: Path
    command: str = ""  # archive_command with %p/%f; empty for a library
    library: dict[str, str] = field(default_factory=dict)

    def settings(self) -> dict[str, str]:
        if self.library:
            return dict(self.library)
        return {"archive_command": "'" + self.command.replace("'", "''") + "'"}

    def command_for(self, path: Path) -> str:
        return self.command.replace("%p", str(path)).replace("%f", path.name)

    def count_archived(self) -> int:
        count = 0
        for _dirpath, _dirs, files in os.walk(self.dest):
            count += sum(
                1
                for name in files
                if WAL_NAME_RE.match(name[:24]) and len(name) >= 24 and not name.startswith(".")
            )
        return count


def _pgbackrest_tool(env: BenchEnv, key: str, dest: Path) -> Tool:
    codec = {
        "pgbackrest-zst": ("zst", 1),
        "pgbackrest-lz4": ("lz4", 1),
        "pgbackrest-gz": ("gz", 6),
        "pgbackrest-zst-async": ("zst", 1),
    }[key]
    repo = dest / "repo"
    options = [f"compress-type={codec[0]}", f"compress-level={codec[1]}"]
    if key.endswith("-async"):
        options += ["archive-async=y", "process-max=2"]
    conf = write_pgbackrest_conf(dest, STANZA, env.cluster, options)
    run(["pgbackrest", f"--config={conf}", f"--stanza={STANZA}", "stanza-create"], timeout=120)
    tool = Tool(
        key, repo / "archive", f"pgbackrest --config={conf} --stanza={STANZA} archive-push %p"
    )
    return tool


def prepare_tool(env: BenchEnv, key: str, dest: Path) -> Tool:
    """Fresh destination for one tool; returns how to invoke it."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    chown_postgres(dest)
    if key.startswith("pgbackrest-"):
        return _pgbackrest_tool(env, key, dest)
    if key == "cp-sync":
        d = str(dest)
        return Tool(
            key, dest, f"cp %p {d}/.tmp.%f && sync {d}/.tmp.%f && mv {d}/.tmp.%f {d}/%f && sync {d}"
        )
    if key == "basic_archive":
        return Tool(
            key,
            dest,
            library={
                "archive_library": "'basic_archive'",
                "basic_archive.archive_directory": f"'{dest}'",
            },
        )
    if key.startswith("pitr-wal-") or key.startswith("variant:"):
        sys.path.insert(0, env.lib)
        from ansible_collections.pitr.postgresql.plugins.module_utils.hostcmd import (
            archive_command_for,
        )

        nopyc = key.endswith("-nopyc")
        program = env.program_nopyc if nopyc else env.program
        if key.startswith("pitr-wal-base-"):
            if env.prefix_base is None:
                raise BenchError(f"{key} needs --base-ref COMMIT")
            program = str(env.prefix_base / "bin" / "pitr-wal")
        init_repository(program, dest, env.cluster.datadir)
        if key.startswith("variant:"):
            variants = VARIANT_TOOLS[key]
            command = (
                f"{SYSTEM_PYTHON} -I -S {env.hostside} push-variant {env.lib} {variants}"
                f" --repo {dest} --compress zstd push %p"
            )
        else:
            codec = key.split("-")[-1]
            command = archive_command_for(program=program, repo=str(dest), compress=codec)
        return Tool(key, dest, command)
    raise BenchError(f"unknown tool {key!r}")


# ---------------------------------------------------------------------------------------------
# 1. Push latency per segment


def bench_latency(
    env: BenchEnv, tools: t.Sequence[str], repeat: int, experiment_segments: int
) -> dict[str, t.Any]:
    """Push every corpus segment with every tool, interleaved (rotating order per segment).

    The optimisation experiments (``variant:*``) push only the first ``experiment_segments``:
    their CPU deltas settle with fewer samples, and they are half the tools.
    """

    def wanted(key: str) -> int:
        if key.startswith("variant:"):
            return min(experiment_segments, len(env.corpus))
        return len(env.corpus)

    # One trial push per tool (also a warm-up): a tool or variant that no longer fits the code
    # in the tree is reported and left out instead of failing the whole run.
    skipped: dict[str, str] = {}
    usable: list[str] = []
    for key in tools:
        try:
            trial = prepare_tool(env, key, env.workdir / "lat-trial" / key.replace(":", "-"))
            timed_run(
                ["/bin/sh", "-c", trial.command_for(env.corpus[0])], cwd=str(env.cluster.datadir)
            )
            if trial.count_archived() != 1:
                raise BenchError(f"the trial push left {trial.count_archived()} files")
            usable.append(key)
        except BenchError as exc:
            skipped[key] = str(exc)
            log(f"latency: leaving out {key}: {exc}")
    shutil.rmtree(env.workdir / "lat-trial", ignore_errors=True)
    tools = usable
    samples: dict[str, list[float]] = {key: [] for key in tools}
    cpu: dict[str, list[float]] = {key: [] for key in tools}
    archived: dict[str, list[int]] = {key: [] for key in tools}
    for rnd in range(repeat):
        prepared = {
            key: prepare_tool(env, key, env.workdir / f"lat-{rnd}" / key.replace(":", "-"))
            for key in tools
        }
        env.cluster.psql("CHECKPOINT")
        os.sync()
        drop_page_cache_of(str(p) for p in env.corpus)
        log(f"latency round {rnd + 1}/{repeat}: {len(tools)} tools x {len(env.corpus)} segments")
        for i, seg in enumerate(env.corpus):
            shift = i % len(tools)
            for key in list(tools[shift:]) + list(tools[:shift]):
                if i >= wanted(key):
                    continue
                ms, cpu_ms = timed_run(
                    ["/bin/sh", "-c", prepared[key].command_for(seg)], cwd=str(env.cluster.datadir)
                )
                samples[key].append(ms)
                cpu[key].append(cpu_ms)
        for key, tool in prepared.items():
            archived[key].append(tool.count_archived())
        shutil.rmtree(env.workdir / f"lat-{rnd}")
    out: dict[str, t.Any] = {}
    if skipped:
        out["skipped"] = skipped
    for key in tools:
        if any(n != wanted(key) for n in archived[key]):
            raise BenchError(f"{key}: archived {archived[key]} of {wanted(key)} segments")
        out[key] = {
            "label": TOOL_LABELS.get(key, key),
            "command": prepared[key].command,
            "ms": samples[key],
            **summarize(samples[key]),
            "cpu_ms": cpu[key],
            "cpu": summarize(cpu[key]),
        }
    return out


# ---------------------------------------------------------------------------------------------
# 2. Archiver drain


def _log_times(text: str, names: set[str]) -> list[float]:
    times = []
    for line in text.splitlines():
        m = ARCHIVED_RE.match(line)
        if m and m.group(2) in names:
            times.append(datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S.%f").timestamp())
    return sorted(times)


def drain_once(
    env: BenchEnv, key: str, dest: Path, backlog: int, max_gen_s: float
) -> dict[str, t.Any]:
    cluster = env.cluster
    tool = prepare_tool(env, key, dest)
    gen = None
    if cluster.ready_count() < backlog:
        gen = generate_backlog(env, backlog, max_gen_s)
    cluster.psql("CHECKPOINT")
    os.sync()
    names = cluster.ready()
    offset = cluster.log_size()
    failed_before = cluster.failed_count()
    old_archiver = cluster.archiver_pid()
    cpu_before = process_cpu_s(old_archiver) if old_archiver else 0.0
    cluster.write_archive_settings({**tool.settings(), "log_min_messages": "debug1"})
    wall_start = time.time()
    started = time.perf_counter()
    cluster.sighup()
    if tool.library:
        wait_archiver(cluster, old_archiver)
    deadline = Deadline(max(120.0, len(names) * 3.0))
    wakeups = 0
    left = last_left = len(names)
    last_progress = time.monotonic()
    while left and not deadline.expired:
        time.sleep(0.005)
        left = cluster.ready_count()
        if left != last_left:
            last_left, last_progress = left, time.monotonic()
        elif time.monotonic() - last_progress > 2.0:
            # No archiver yet (see wait_archiver): a connection wakes the postmaster.
            cluster.psql("SELECT 1")
            wakeups += 1
            last_progress = time.monotonic()
    drained = left == 0
    elapsed = time.perf_counter() - started
    # The archiver's CPU plus that of the archive_command children it waited for (a library
    # switch starts a new archiver: then all of the new one's time is the drain's).
    archiver = cluster.archiver_pid()
    cpu_s = None
    if archiver:
        cpu_s = process_cpu_s(archiver) - (cpu_before if archiver == old_archiver else 0.0)
    pause_archiving(cluster, restarts=bool(tool.library))
    text = cluster.log_since(offset)
    stamps = _log_times(text, set(names))
    intervals = [(b - a) * 1000 for a, b in itertools.pairwise(stamps)]
    result: dict[str, t.Any] = {
        "label": TOOL_LABELS.get(key, key),
        "settings": tool.settings(),
        "segments": len(names),
        "drained": drained,
        "elapsed_s": elapsed,
        "ms_per_segment": elapsed * 1000 / len(names),
        "mb_s": len(names) * SEGMENT_BYTES / 1e6 / elapsed,
        "first_archived_after_ms": (stamps[0] - wall_start) * 1000 if stamps else None,
        "steady_ms_per_segment": (stamps[-1] - stamps[0]) * 1000 / (len(stamps) - 1)
        if len(stamps) > 1
        else None,
        "archiver_cpu_ms_per_segment": None if cpu_s is None else cpu_s * 1000 / len(names),
        "log_interval_ms": intervals,
        "log_interval": summarize(intervals),
        "failed_count_delta": cluster.failed_count() - failed_before,
        "failure_lines": sum(1 for line in text.splitlines() if FAILED_RE.search(line)),
        "archived_files": tool.count_archived(),
        "postmaster_wakeups": wakeups,
        "backlog_generation": gen,
    }
    if not drained:
        discard_backlog(env)
    return result


def bench_drain(
    env: BenchEnv, tools: t.Sequence[str], backlog: int, rounds: int, max_gen_s: float
) -> dict[str, t.Any]:
    """Pause, build a backlog, switch on one tool, time until no .ready is left; per tool."""
    runs: dict[str, list[dict[str, t.Any]]] = {key: [] for key in tools}
    for rnd in range(rounds):
        order = list(tools[rnd % len(tools) :]) + list(tools[: rnd % len(tools)])
        for key in order:
            dest = env.workdir / f"drain-{rnd}" / key.replace(":", "-")
            res = drain_once(env, key, dest, backlog, max_gen_s)
            log(
                f"drain {key}: {res['segments']} segments in {res['elapsed_s']:.2f} s"
                f" ({res['ms_per_segment']:.1f} ms/segment, failed +{res['failed_count_delta']})"
            )
            runs[key].append(res)
            shutil.rmtree(dest, ignore_errors=True)
    out: dict[str, t.Any] = {}
    for key, results in runs.items():
        steady = [r["steady_ms_per_segment"] or r["ms_per_segment"] for r in results]
        out[key] = {
            "label": TOOL_LABELS.get(key, key),
            "runs": results,
            "wall_ms_per_segment": percentile([r["ms_per_segment"] for r in results], 50),
            "ms_per_segment": percentile(steady, 50),
            "mb_s": SEGMENT_BYTES / 1e3 / percentile(steady, 50),
            "log_interval_p50": percentile([x for r in results for x in r["log_interval_ms"]], 50),
            "log_interval_p99": percentile([x for r in results for x in r["log_interval_ms"]], 99),
            "all_drained": all(r["drained"] for r in results),
            "cpu_ms_per_segment": percentile(
                [
                    r["archiver_cpu_ms_per_segment"]
                    for r in results
                    if r["archiver_cpu_ms_per_segment"] is not None
                ],
                50,
            ),
            "failed_count_delta": sum(r["failed_count_delta"] for r in results),
        }
    return out


# ---------------------------------------------------------------------------------------------
# 3. Interpreter start of the archive command

PUSH_IMPORTS = (
    "import sys; sys.path.insert(0, {lib!r});"
    " from ansible_collections.pitr.postgresql.plugins.module_utils import"
    " hostcmd, archive, errors, repository, compression; compression._load('zstd')"
)
# What a push cannot avoid importing: the lower bound for a lean host command.
FLOOR_IMPORTS = (
    "import sys; sys.path.append('/usr/lib/python3/dist-packages');"
    " import os, hashlib, json, struct, fcntl, zstandard"
)
STUB_IMPORTS = "import sys; [sys.modules.setdefault(n, type(sys)(n)) for n in {mods!r}]; "
# The floor of the push as it is built now: the modules it needs, zstandard's C backend loaded
# without its package (compression.py does that), and no json, re or platform.
ZSTD_BACKEND = (
    "import _imp, os; from importlib.machinery import ExtensionFileLoader, ModuleSpec;"
    " d = '/usr/lib/python3/dist-packages/zstandard/';"
    " p = d + [n for n in os.listdir(d) if n.startswith('backend_c.')][0];"
    " s = ModuleSpec('zstandard.backend_c', ExtensionFileLoader('zstandard.backend_c', p),"
    " origin=p); m = _imp.create_dynamic(s); _imp.exec_dynamic(m)"
)
LEAN_FLOOR_IMPORTS = (
    "import os, hashlib, mmap, struct, fcntl, errno, time, _signal; " + ZSTD_BACKEND
)
# The same plus typing (and with it re, collections, functools, contextlib, enum): errors.py and
# every module_utils file import it at run time, for NamedTuple, Protocol and annotations.
TYPING_FLOOR_IMPORTS = "import typing; " + LEAN_FLOOR_IMPORTS


def bench_startup(env: BenchEnv, runs: int) -> dict[str, t.Any]:
    lib = env.lib
    py = [SYSTEM_PYTHON, "-I", "-S"]
    imports = PUSH_IMPORTS.format(lib=lib)
    lazy = STUB_IMPORTS.format(mods=("shlex", "subprocess", "shutil", "socket")) + imports
    commands: dict[str, list[str]] = {
        "sh -c true": ["/bin/sh", "-c", "true"],
        "python3 -I -S -c pass": [*py, "-c", "pass"],
        "pitr-wal version": [*py, env.program, "version"],
        "pitr-wal push imports (incl. zstandard), no I/O": [*py, "-c", imports],
        "push imports, lazy shlex/subprocess/shutil/socket": [*py, "-c", lazy],
        "floor: only os, hashlib, json, struct, fcntl, zstandard": [*py, "-c", FLOOR_IMPORTS],
        "lean floor: os, hashlib, mmap, struct, fcntl, _signal, zstd C backend": [
            *py,
            "-c",
            LEAN_FLOOR_IMPORTS,
        ],
        "lean floor + typing (re, collections, functools, contextlib, enum)": [
            *py,
            "-c",
            TYPING_FLOOR_IMPORTS,
        ],
        "pitr-wal version, no .pyc": [*py, env.program_nopyc, "version"],
        "push imports, no .pyc": [*py, "-c", PUSH_IMPORTS.format(lib=host_lib(env.prefix_nopyc))],
    }
    # A whole push of a small file (.history): fixed cost including fork and three fsyncs.
    hist_dir = env.workdir / "history"
    repo = env.workdir / "history-repo"
    for d in (hist_dir, repo):
        if d.exists():
            shutil.rmtree(d)
        d.mkdir()
        chown_postgres(d)
    init_repository(env.program, repo, env.cluster.datadir)
    histories = []
    for tli in range(2, runs + 2):
        path = hist_dir / f"{tli:08X}.history"
        path.write_text(f"{tli - 1}\t0/3000000\tno recovery target specified\n")
        chown_postgres(path)
        histories.append(path)
    history = "pitr-wal push of a .history file (fork + 3 fsyncs)"
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in [*commands, history]}
    cwd = str(env.cluster.datadir)
    names = list(commands)
    for i in range(runs):
        shift = i % len(names)
        for name in names[shift:] + names[:shift]:
            samples[name].append(timed_run(commands[name], cwd=cwd))
        samples[history].append(
            timed_run([*py, env.program, "--repo", str(repo), "push", str(histories[i])], cwd=cwd)
        )
    out: dict[str, t.Any] = {"runs": runs, "commands": {}}
    for name, pairs in samples.items():
        wall = [pair[0] for pair in pairs]
        cpu = [pair[1] for pair in pairs]
        out["commands"][name] = {
            "ms": wall,
            "cpu_ms": cpu,
            **summarize(wall),
            "cpu": summarize(cpu),
        }
    out["importtime"] = _importtime(imports, 5)
    out["module_cpu"] = _module_import_cpu(max(10, runs // 3))
    return out


# The standard-library modules the push path imports, one by one in a fresh interpreter.
# They share dependencies (collections, re, enum...), so the figures overlap: each says what
# removing that import alone could save at most.
PUSH_PATH_MODULES = (
    "typing",
    "dataclasses",
    "contextlib",
    "shlex",
    "re",
    "subprocess",
    "shutil",
    "socket",
    "json",
    "hashlib",
    "struct",
    "signal",
    "fcntl",
)


def _module_import_cpu(runs: int) -> dict[str, t.Any]:
    """Median CPU ms of ``python3 -I -S -c 'import M'`` minus that of ``-c pass``, per module."""
    py = [SYSTEM_PYTHON, "-I", "-S", "-c"]
    codes = {"pass": "pass", **{m: f"import {m}" for m in PUSH_PATH_MODULES}}
    codes["zstandard"] = (
        "import sys; sys.path.append('/usr/lib/python3/dist-packages'); import zstandard"
    )
    cpu: dict[str, list[float]] = {name: [] for name in codes}
    names = list(codes)
    for i in range(runs):
        shift = i % len(names)
        for name in names[shift:] + names[:shift]:
            cpu[name].append(timed_run([*py, codes[name]])[1])
    bare = percentile(cpu["pass"], 50)
    return {
        "runs": runs,
        "bare_cpu_ms": bare,
        "modules": {
            name: {"cpu_ms": values, "extra_cpu_ms_p50": percentile(values, 50) - bare}
            for name, values in cpu.items()
            if name != "pass"
        },
    }


_IMPORTTIME_RE = re.compile(r"^import time:\s+(\d+) \|\s+(\d+) \|(\s*)(\S+)")


def _importtime(code: str, runs: int) -> dict[str, t.Any]:
    """``-X importtime`` of the push imports: median self and cumulative time per module."""
    per: dict[str, list[tuple[int, int, int]]] = {}
    for _round in range(runs):
        proc = subprocess.run(
            [SYSTEM_PYTHON, "-I", "-S", "-X", "importtime", "-c", code],
            capture_output=True,
            text=True,
            check=True,
            **as_postgres(),
        )
        for line in proc.stderr.splitlines():
            m = _IMPORTTIME_RE.match(line)
            if m:
                depth = len(m.group(3)) // 2
                per.setdefault(m.group(4), []).append((int(m.group(1)), int(m.group(2)), depth))
    rows: list[dict[str, t.Any]] = []
    for name, vals in per.items():
        rows.append(
            {
                "module": name,
                "self_us": percentile([v[0] for v in vals], 50),
                "cumulative_us": percentile([v[1] for v in vals], 50),
                "depth": vals[0][2],
            }
        )
    top = sorted((r for r in rows if r["depth"] == 0), key=lambda r: -r["cumulative_us"])
    return {
        "top_level": top[:15],
        "by_self": sorted(rows, key=lambda r: -r["self_us"])[:15],
        "total_us": sum(r["cumulative_us"] for r in rows if r["depth"] == 0),
    }


# ---------------------------------------------------------------------------------------------
# 4. Compression throughput per core


def bench_compression(env: BenchEnv, segments: int, repeat: int) -> dict[str, t.Any]:
    corpus = env.corpus[:segments]
    joined = env.workdir / "compression-corpus"
    with open(joined, "wb") as out:
        for seg in corpus:
            out.write(seg.read_bytes())
    total = joined.stat().st_size
    drop_page_cache_of([str(joined)])
    cli: dict[str, t.Any] = {}
    plans = {
        "zstd-1": (["zstd", "-1", "-T1", "-q", "-c"], ["zstd", "-d", "-q", "-c"]),
        "lz4-1": (["lz4", "-1", "-q", "-c"], ["lz4", "-d", "-q", "-c"]),
        "gzip-6": (["gzip", "-6", "-c"], ["gzip", "-d", "-c"]),
    }
    packed = env.workdir / "compression-out"
    for label, (comp_argv, decomp_argv) in plans.items():
        comp = _cli_measure([*comp_argv, str(joined)], packed, repeat)
        stored = packed.stat().st_size
        decomp = _cli_measure([*decomp_argv, str(packed)], Path(os.devnull), repeat)
        cli[label] = {
            "argv": comp_argv,
            "compress_wall_s": comp["wall_s"],
            "compress_cpu_s": comp["cpu_s"],
            "compress_mb_s_wall": total / 1e6 / comp["wall_s"],
            "compress_mb_s_per_core": total / 1e6 / comp["cpu_s"],
            "decompress_mb_s_wall": total / 1e6 / decomp["wall_s"],
            "stored_bytes": stored,
            "ratio": stored / total,
        }
    joined.unlink()
    packed.unlink()
    ours = run_hostside(env, "codecs", [str(repeat), *(str(p) for p in corpus)], timeout=900)
    return {"input_bytes": total, "segments": len(corpus), "cli": cli, "ours": ours}


def _cli_measure(argv: list[str], out_path: Path, repeat: int) -> dict[str, float]:
    walls, cpus = [], []
    for _round in range(repeat):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        with open(out_path, "wb") as out:
            subprocess.run(argv, stdout=out, check=True, timeout=600)
        walls.append(time.perf_counter() - started)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
    return {"wall_s": percentile(walls, 50), "cpu_s": percentile(cpus, 50)}


# ---------------------------------------------------------------------------------------------
# 5. Where a push spends its time (in-process, real archive.push with timing wrappers)


def bench_stages(env: BenchEnv, segments: int) -> dict[str, t.Any]:
    base = env.workdir / "stages"
    if base.exists():
        shutil.rmtree(base)
    base.mkdir()
    env.cluster.psql("CHECKPOINT")
    os.sync()
    raw = run_hostside(
        env, "stages", [str(base), *(str(p) for p in env.corpus[:segments])], timeout=600
    )
    shutil.rmtree(base)
    return {
        "segments": segments,
        "total": summarize(raw["total_ms"]),
        "cpu": summarize(raw["cpu_ms"]),
        "stages": {name: summarize(v) for name, v in raw["stages_ms"].items()},
        "raw": raw,
    }

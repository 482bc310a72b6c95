# Copyright: contributors to pitr.postgresql
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Base backup throughput and verification speed against baselines in the same run.

    sudo .venv/bin/python benchmarks/backup_bench.py --out DIR [--scale 150] [--rounds 3]
        [--cache cold|warm]

One scratch cluster loaded with ``pgbench -i -s SCALE`` (scale 150: a 2.4 GB data
directory, the size of the reference figures; about 5-8 minutes in all here) and archiving
through ``pgbackrest archive-push`` (pgBackRest needs it for its backups). Before every timed
run a ``CHECKPOINT``, then, with ``--cache cold`` (the default, as root), ``sync`` and
``echo 3 > /proc/sys/vm/drop_caches``, so that every tool reads the data directory from disk
and no tool's writes are still being flushed while the next one runs; the report says
whether the kernel allowed it. Per round, in a rotated order:

* ``module``: the base_backup module's defaults (tar, the default compression, fast
  checkpoint, manifest checksums ``auto``, then our verification), run through
  ``pitr-backup``, the base_backup role's host command, which calls
  ``backup.run_base_backup`` (the function the module calls) with the module's default
  parameters; its JSON result splits the time into pg_basebackup and verification.
* ``module-zstd`` / ``module-lz4``: the same with the other server-side compression, to
  choose the default by measurement.
* ``module-argv``: the exact ``pg_basebackup`` argv the module ran (``--progress``,
  ``--verbose``, label, manifest checksums), by hand into a fresh directory: what the module
  adds around the same command.
* ``tar``: ``tar cf`` of the data directory into a file.
* ``plain``: ``pg_basebackup -D DIR -Fp -c fast``, then ``pg_verifybackup`` on it (timed apart).
* ``tar-zstd``, ``tar-lz4``: ``pg_basebackup -Ft -c fast --compress=server-zstd:1 / server-lz4:1``.
* ``pgbackrest``: ``pgbackrest backup --type=full`` with compress-type=zst level 1, start-fast.
* ``tar-gzip`` (``client-gzip``, first round only: slow).

Our verifier handles tar backups only on PostgreSQL 15 (plain ones go to pg_verifybackup), so
the verification ratio compares ours on the module's tar backup with pg_verifybackup on the
plain backup of the same cluster in the same round. Both verify files their backup has just
written (in the page cache, as after any backup). With ``--cache warm`` (or when the kernel
refuses to drop caches) the data directory is read once before the first round and every
tool finds it in the page cache, which favours ``tar``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import typing as t
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import contextlib
import re

from benchlib import (
    PG_BIN,
    RESULTS,
    ROOT,
    SYSTEM_PYTHON,
    BenchError,
    ScratchCluster,
    args_record,
    as_postgres,
    bench_main,
    chown_postgres,
    drop_caches,
    drop_page_cache_of,
    fmt,
    init_repository,
    install_host_command,
    log,
    md_table,
    median_or_none,
    merge_args,
    ratio,
    ratio_medians,
    timed_run,
    write_pgbackrest_conf,
)
from benchlib import (
    run as run_cmd,
)

STANZA = "bench"
TOOLS = (
    "module",
    "module-alt",
    "module-argv",
    "tar",
    "plain",
    "tar-zstd",
    "tar-lz4",
    "pgbackrest",
)
ONCE = ("tar-gzip",)


def default_compression() -> str:
    """The module's default ``compression`` (``DEFAULT_COMPRESSION`` in backup.py)."""
    text = (ROOT / "plugins" / "module_utils" / "backup.py").read_text(encoding="utf-8")
    m = re.search(r'^DEFAULT_COMPRESSION = "([^"]+)"', text, re.M)
    if m is None:
        raise BenchError("DEFAULT_COMPRESSION not found in plugins/module_utils/backup.py")
    return m[1]


def alternative_compression(default: str) -> str:
    """The other server-side codec: the default is chosen between these two by measurement."""
    return "server-zstd:1" if "lz4" in default else "server-lz4:1"


def parse_args(argv: t.Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, default=None, help="directory for results.md/json")
    p.add_argument(
        "--scale", type=int, default=150, help="pgbench scale factor [150: 2.4 GB of data]"
    )
    p.add_argument(
        "--cache",
        choices=("cold", "warm"),
        default="cold",
        help="cold: sync and drop the page cache before every timed run [cold]",
    )
    p.add_argument("--rounds", type=int, default=3, help="rounds of every tool [3]")
    p.add_argument("--no-gzip", action="store_true", help="skip the client-gzip run")
    p.add_argument("--workdir", type=Path, default=None, help="scratch directory")
    p.add_argument("--keep", action="store_true", help="keep the scratch directory")
    return p.parse_args(argv)


def _dir_size(path: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


def _data_files(path: Path) -> list[str]:
    out = []
    for dirpath, _dirs, files in os.walk(path):
        out += [os.path.join(dirpath, n) for n in files]
    return [p for p in out if os.path.isfile(p) and not os.path.islink(p)]


def _fresh(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    chown_postgres(path)
    return path


class Setup:
    """The cluster, the installed host commands, the pgBackRest stanza, scratch directories."""

    def __init__(self, workdir: Path, scale: int, cache: str = "cold") -> None:
        if os.geteuid() != 0:
            raise BenchError("run as root: the server and every timed command run as postgres")
        if shutil.which("pgbackrest") is None:
            raise BenchError("pgbackrest is missing: apt-get install -y pgbackrest")
        self.workdir = workdir
        self.compression = default_compression()
        self.alt_compression = alternative_compression(self.compression)
        self.module_argv: list[str] = []
        # Cold cache when asked and permitted: found out once, before anything is timed.
        self.cold_refused = drop_caches() if cache == "cold" else "warm cache asked for"
        workdir.mkdir(parents=True, exist_ok=True)
        chown_postgres(workdir)
        self.prefix = workdir / "prefix"
        self.pitr_wal = install_host_command(self.prefix, precompile=True)
        self.pitr_backup = str(self.prefix / "bin" / "pitr-backup")
        shutil.copy2(ROOT / "roles" / "base_backup" / "files" / "pitr-backup", self.pitr_backup)
        os.chmod(self.pitr_backup, 0o644)
        self.repo = _fresh(workdir / "repo")
        self.out = _fresh(workdir / "out")
        self.cluster = ScratchCluster(workdir / "cluster", port=55441)
        self.cluster.create(
            {
                "checkpoint_timeout": "'1h'",
                "shared_buffers": "'128MB'",
                "max_wal_senders": "10",
            }
        )
        self.pgbr = workdir / "pgbackrest"
        self.pgbr_conf = write_pgbackrest_conf(
            self.pgbr,
            STANZA,
            self.cluster,
            ["compress-type=zst", "compress-level=1", "start-fast=y", "repo1-retention-full=9999"],
        )
        self.cluster.write_archive_settings(
            {"archive_command": f"'{self.pgbackrest_argv('archive-push')[0]} %p'"}
        )
        self.cluster.start()
        init_repository(self.pitr_wal, self.repo, self.cluster.datadir)
        log(f"cluster in {self.cluster.base}; pgbench -i -s {scale}")
        run_cmd(self.cluster.pgbench_argv("-i", "-q", "-s", str(scale)), timeout=1200)
        self.cluster.psql("CHECKPOINT")
        os.sync()
        run_cmd(self.pgbackrest_argv("stanza-create"), timeout=120)
        run_cmd(self.pgbackrest_argv("check"), timeout=180)
        self.cluster_bytes = _dir_size(self.cluster.datadir)

    def pgbackrest_argv(self, command: str) -> list[str]:
        if command == "archive-push":
            return [f"pgbackrest --config={self.pgbr_conf} --stanza={STANZA} archive-push"]
        return ["pgbackrest", f"--config={self.pgbr_conf}", f"--stanza={STANZA}", command]

    def conn(self) -> list[str]:
        return ["-h", str(self.cluster.socket_dir), "-p", str(self.cluster.port), "-U", "postgres"]

    def teardown(self, keep: bool) -> None:
        try:
            self.cluster.stop()
        finally:
            if not keep:
                shutil.rmtree(self.workdir, ignore_errors=True)


def _module_run(s: Setup, label: str, compression: str | None = None) -> dict[str, t.Any]:
    argv = [
        SYSTEM_PYTHON, "-I", s.pitr_backup, "--repo", str(s.repo), "--label", label,
        "--socket-dir", str(s.cluster.socket_dir), "--port", str(s.cluster.port),
        "--user", "postgres",
    ]  # fmt: skip
    if compression is not None:
        argv += ["--compress", compression]
    started = time.perf_counter()
    proc = subprocess.run(
        argv, capture_output=True, text=True, timeout=1800, check=False, cwd="/", **as_postgres()
    )
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise BenchError(f"pitr-backup exited {proc.returncode}: {proc.stderr[-2000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    backup_dir = s.repo / "backups" / label
    size = _dir_size(backup_dir)
    shutil.rmtree(backup_dir, ignore_errors=True)
    if compression is None and result.get("cmd"):
        s.module_argv = list(result["cmd"])
    return {
        "wall_s": wall,
        "basebackup_s": float(result["backup_seconds"]),
        "verify_s": float(result["verify_seconds"]),
        "verify_tool": result["backup"].get("verification", {}).get("tool"),
        "cmd": result.get("cmd"),
        "stored_bytes": size,
    }


def _pgbackrest_size(s: Setup) -> int:
    return _dir_size(s.pgbr / "repo" / "backup")


def run_tool(s: Setup, tool: str, rnd: int) -> dict[str, t.Any]:
    """One timed run of ``tool``; the result has ``wall_s`` (and more for some tools)."""
    s.cluster.psql("CHECKPOINT")
    dest = _fresh(s.out / tool)
    base = [str(PG_BIN / "pg_basebackup"), *s.conn(), "-c", "fast", "--no-password"]
    if s.cold_refused is None:
        refused = drop_caches()
        if refused is not None:
            raise BenchError(f"dropping caches worked at the start, then not: {refused}")
    res: dict[str, t.Any]
    if tool == "module":
        res = _module_run(s, f"bench-r{rnd}")
    elif tool == "module-alt":
        res = _module_run(s, f"bench-alt-r{rnd}", s.alt_compression)
    elif tool == "module-argv":
        if not s.module_argv:
            raise BenchError("module-argv runs after the first module run")
        argv = [f"--pgdata={dest / 'b'}" if a.startswith("--pgdata=") else a for a in s.module_argv]
        wall, cpu = timed_run([*argv, *s.conn()], cwd="/", timeout=3600)
        res = {"wall_s": wall / 1000, "cpu_s": cpu / 1000}
    elif tool == "tar":
        wall, cpu = timed_run(
            ["tar", "cf", str(dest / "data.tar"), "-C", str(s.cluster.datadir), "."],
            cwd="/",
            timeout=1800,
        )
        res = {"wall_s": wall / 1000, "cpu_s": cpu / 1000}
        # pg_basebackup fsyncs what it wrote before it exits; tar does not. Timed apart.
        synced = time.perf_counter()
        fd = os.open(dest / "data.tar", os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        res["fsync_s"] = time.perf_counter() - synced
    elif tool == "plain":
        wall, cpu = timed_run([*base, "-D", str(dest / "b"), "-Fp"], cwd="/", timeout=1800)
        vwall, vcpu = timed_run(
            [str(PG_BIN / "pg_verifybackup"), str(dest / "b")], cwd="/", timeout=1800
        )
        res = {"wall_s": wall / 1000, "cpu_s": cpu / 1000, "verify_s": vwall / 1000}
        res["verify_cpu_s"] = vcpu / 1000
    elif tool == "pgbackrest":
        before = _pgbackrest_size(s)
        wall, cpu = timed_run([*s.pgbackrest_argv("backup"), "--type=full"], cwd="/", timeout=1800)
        res = {"wall_s": wall / 1000, "cpu_s": cpu / 1000}
        res["stored_bytes"] = _pgbackrest_size(s) - before
        # expire what this round added so the repository does not grow without bound
    else:
        compress = {
            "tar-zstd": "server-zstd:1",
            "tar-lz4": "server-lz4:1",
            "tar-gzip": "client-gzip",
        }[tool]
        wall, cpu = timed_run(
            [*base, "-D", str(dest / "b"), "-Ft", f"--compress={compress}"], cwd="/", timeout=3600
        )
        res = {"wall_s": wall / 1000, "cpu_s": cpu / 1000}
    if "stored_bytes" not in res:
        res["stored_bytes"] = _dir_size(dest)
    shutil.rmtree(dest, ignore_errors=True)
    res["tool"] = tool
    res["round"] = rnd
    res["loadavg"] = os.getloadavg()[0]
    return res


def run_bench(args: argparse.Namespace) -> dict[str, t.Any]:
    """Run the benchmark (root); the results (raw runs, medians, per-round ratios)."""
    started = time.time()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="pitr-bbench-", dir="/var/tmp"))
    s = Setup(workdir, args.scale, getattr(args, "cache", "cold"))
    raw: list[dict[str, t.Any]] = []
    try:
        if s.cold_refused is not None:
            log(f"warm page cache: {s.cold_refused}")
            drop_page_cache_of(_data_files(s.cluster.datadir))
        rounds = max(1, int(args.rounds))
        for rnd in range(rounds):
            order = list(TOOLS[rnd % len(TOOLS) :] + TOOLS[: rnd % len(TOOLS)])
            if rnd % 2 == 1:
                order.reverse()
            if rnd == 0 and not getattr(args, "no_gzip", False):
                order += list(ONCE)
            log(f"round {rnd + 1}/{rounds}: {', '.join(order)}")
            for tool in order:
                res = run_tool(s, tool, rnd)
                log(f"  {tool}: {res['wall_s']:.2f} s")
                raw.append(res)
    finally:
        s.teardown(getattr(args, "keep", False))
    results = summarize(raw, s.cluster_bytes, args, time.time() - started)
    results["compression"] = {"default": s.compression, "alternative": s.alt_compression}
    results["cache"] = (
        "cold: sync and drop_caches before every timed run"
        if s.cold_refused is None
        else f"warm ({s.cold_refused}): data directory read once before the first round"
    )
    return results


def summarize(
    raw: list[dict[str, t.Any]], cluster_bytes: int, args: argparse.Namespace, took: float
) -> dict[str, t.Any]:
    tools = sorted({r["tool"] for r in raw})
    med: dict[str, dict[str, float | None]] = {}
    for tool in tools:
        rs = [r for r in raw if r["tool"] == tool]
        med[tool] = {
            key: median_or_none([float(r[key]) for r in rs if key in r])
            for key in ("wall_s", "cpu_s", "basebackup_s", "verify_s", "stored_bytes")
        }
        med[tool]["n"] = len(rs)
    # Per-round ratios, then their median: both runs of a ratio saw the same load.
    per_round: dict[str, list[float]] = {}
    rounds = sorted({r["round"] for r in raw})
    for rnd in rounds:
        by = {r["tool"]: r for r in raw if r["round"] == rnd}

        def add(name: str, num: float | None, den: float | None) -> None:
            value = ratio(num, den)
            if value is not None:
                per_round.setdefault(name, []).append(value)

        mod = by.get("module")
        if mod is None:
            continue
        add("module_other_s_abs", mod["wall_s"] - mod["basebackup_s"] - mod["verify_s"], 1.0)
        for base in ("tar", "pgbackrest", "plain", "tar-zstd", "tar-lz4", "module-argv"):
            if base in by:
                # speed ratio: baseline time / our time (>1 means we are faster)
                add(f"module_total_vs_{base}", by[base]["wall_s"], mod["wall_s"])
                add(f"module_basebackup_vs_{base}", by[base]["wall_s"], mod["basebackup_s"])
        if "tar" in by and "fsync_s" in by["tar"]:
            tar_durable = by["tar"]["wall_s"] + by["tar"]["fsync_s"]
            add("module_total_vs_tar_fsync", tar_durable, mod["wall_s"])
            add("module_basebackup_vs_tar_fsync", tar_durable, mod["basebackup_s"])
        alt = by.get("module-alt")
        if alt is not None:
            for base in ("tar", "pgbackrest"):
                if base in by:
                    add(f"module-alt_total_vs_{base}", by[base]["wall_s"], alt["wall_s"])
                    add(f"module-alt_basebackup_vs_{base}", by[base]["wall_s"], alt["basebackup_s"])
            if "plain" in by:
                add("alt_verify_vs_pg_verifybackup", by["plain"]["verify_s"], alt["verify_s"])
        for other in ("tar-zstd", "tar-lz4", "tar-gzip"):
            if other in by and "tar" in by:
                add(f"{other}_vs_tar", by["tar"]["wall_s"], by[other]["wall_s"])
        if "pgbackrest" in by and "tar" in by:
            add("pgbackrest_vs_tar", by["tar"]["wall_s"], by["pgbackrest"]["wall_s"])
        if "plain" in by and "tar" in by:
            add("plain_vs_tar", by["tar"]["wall_s"], by["plain"]["wall_s"])
        if "plain" in by:
            add("verify_vs_pg_verifybackup", by["plain"]["verify_s"], mod["verify_s"])
    ratios = ratio_medians(per_round)
    return {
        "benchmark": "backup",
        "args": args_record(args),
        "cluster_bytes": cluster_bytes,
        "loadavg_end": os.getloadavg(),
        "duration_s": took,
        "entry_point": "pitr-backup host command -> backup.run_base_backup (module defaults)",
        "raw": raw,
        "medians": med,
        "ratios": ratios,
    }


def run(args: argparse.Namespace) -> dict[str, t.Any]:
    """The registration API for benchmarks/run.py: run and return the results (``args`` may
    be run.py's namespace, see :func:`benchlib.merge_args`)."""
    return run_bench(merge_args(parse_args([]), args))


LABELS = {
    "module": "module defaults (tar, {default}, + our verify)",
    "module-alt": "module with {alternative} (+ our verify)",
    "module-argv": "the module's own `pg_basebackup` argv, by hand",
    "tar": "`tar cf` of the data directory",
    "plain": "`pg_basebackup -Fp`",
    "tar-zstd": "`pg_basebackup -Ft` server-zstd:1",
    "tar-lz4": "`pg_basebackup -Ft` server-lz4:1",
    "tar-gzip": "`pg_basebackup -Ft` client-gzip (1 round)",
    "pgbackrest": "`pgbackrest backup --type=full` zst-1",
}
ORDER = (
    "module",
    "module-alt",
    "module-argv",
    "tar",
    "plain",
    "tar-zstd",
    "tar-lz4",
    "tar-gzip",
    "pgbackrest",
)


def render(results: dict[str, t.Any]) -> str:
    med = results["medians"]
    comp = results.get("compression") or {"default": "server-zstd:1", "alternative": "-"}
    # What a copy of the data directory holds at backup time (after the CHECKPOINT recycled
    # WAL): the tar file's size. The size at setup counts WAL that checkpoints later removed.
    tar_bytes = (med.get("tar") or {}).get("stored_bytes")
    mb = (tar_bytes or results["cluster_bytes"]) / 1e6
    rat = results["ratios"]
    lines = [
        "## Base backup",
        "",
        f"Data directory {mb:.0f} MB as tar (pgbench scale {results['args'].get('scale')};"
        " MB/s below is this size / wall time),"
        f" page cache {results.get('cache', 'warm')},"
        f" CHECKPOINT before each run, {results['args'].get('rounds')} rounds in rotated order;"
        f" took {results['duration_s']:.0f} s, load average at end"
        f" {results['loadavg_end'][0]:.1f}. Module measured through {results['entry_point']}.",
        "",
    ]
    rows = []
    for tool in ORDER:
        m = med.get(tool)
        if not m:
            continue
        wall = m["wall_s"]
        rows.append(
            [
                LABELS[tool].format(**comp),
                str(int(m["n"] or 0)),
                fmt(wall),
                fmt(m.get("basebackup_s")),
                fmt(m.get("verify_s")),
                fmt(mb / wall if wall else None, 0),
                fmt((m.get("stored_bytes") or 0) / 1e6, 0),
            ]
        )
    lines += md_table(
        ["what", "n", "wall s (median)", "pg_basebackup s", "verify s", "MB/s", "stored MB"], rows
    )

    def r(key: str) -> float | None:
        return rat.get(key, {}).get("median")

    def ok(value: float | None, target: float) -> str:
        return "-" if value is None else ("yes" if value >= target else "**no**")

    def row(text: str, key: str, target: float | None = None, unit: str = "x") -> list[str]:
        value = r(key)
        if target is None:
            return [text, fmt(value, 2, unit), "-", "-"]
        return [text, fmt(value, 2, unit), f">= {target:.1f}x", ok(value, target)]

    d, a = comp["default"], comp["alternative"]
    tr = [
        row(f"module backup phase (pg_basebackup, {d}) vs tar", "module_basebackup_vs_tar", 1.0),
        row(f"module total (backup + verify, {d}) vs tar", "module_total_vs_tar", 1.0),
        row("module total vs pgbackrest zst-1", "module_total_vs_pgbackrest", 2.0),
        row("module backup phase vs pgbackrest zst-1", "module_basebackup_vs_pgbackrest", 2.0),
        row(f"our verify (tar, {d}) vs pg_verifybackup (plain)", "verify_vs_pg_verifybackup", 0.9),
        row("module backup phase vs tar + fsync of the tar file", "module_basebackup_vs_tar_fsync"),
        row("module total vs tar + fsync of the tar file", "module_total_vs_tar_fsync"),
        row(f"module with {a}: backup phase vs tar", "module-alt_basebackup_vs_tar"),
        row(f"module with {a}: total vs tar", "module-alt_total_vs_tar"),
        row(f"module with {a}: verify vs pg_verifybackup", "alt_verify_vs_pg_verifybackup"),
        row(
            "module backup phase vs its own argv by hand (same command)",
            "module_basebackup_vs_module-argv",
        ),
        row(
            "module backup phase vs `pg_basebackup -Ft` server-zstd:1 by hand",
            "module_basebackup_vs_tar-zstd",
        ),
        row(
            "module backup phase vs `pg_basebackup -Ft` server-lz4:1 by hand",
            "module_basebackup_vs_tar-lz4",
        ),
        row("module rest (start-up, catalog; s, not a ratio)", "module_other_s_abs", None, " s"),
    ]
    for key in ("plain_vs_tar", "tar-zstd_vs_tar", "tar-lz4_vs_tar", "tar-gzip_vs_tar"):
        tr.append(row(key.replace("_vs_", " vs ").replace("_", " "), key))
    tr.append(row("pgbackrest vs tar", "pgbackrest_vs_tar"))
    lines += [
        "Speed ratios (baseline time / our time, so > 1 is faster), median of per-round ratios:",
        "",
    ]
    lines += md_table(["ratio", "value", "target", "met"], tr)
    lines.append(
        "Our verifier handles tar only on PostgreSQL 15, so it is timed on the module's"
        " tar backup and compared with pg_verifybackup on the plain backup of the"
        " same cluster in the same round; both read what their backup has just written."
    )
    return "\n".join(lines) + "\n"


def main(argv: t.Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    out = args.out or RESULTS / time.strftime("backup-%Y%m%dT%H%M%S")
    return bench_main(lambda: run_bench(args), render, out, "backup")


if __name__ == "__main__":
    sys.exit(main())

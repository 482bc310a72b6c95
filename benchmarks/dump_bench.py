# Copyright: contributors to pitr.postgresql
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Logical dump benchmark: the collection's dump and restore against plain pg_dump/pg_restore.

    sudo .venv/bin/python benchmarks/dump_bench.py                 # about 3-5 minutes
    sudo .venv/bin/python benchmarks/dump_bench.py --scale 5 --rounds 1

One scratch PostgreSQL 15 cluster, one database (pgbench tables, a table of random-looking
text that does not compress away, large objects), CHECKPOINT before every timed step, rounds
interleaved (baseline, ours, baseline, ours...). Timed in the same run on the same database:

- dump: ``pg_dump -Fc -f FILE`` vs ``dumps.run_logical_dump`` with the module's defaults
  (counting in the dump's snapshot, pg_dump, pg_restore --list, the full read, SHA-256,
  catalog record, rename);
- restore: ``createdb -T template0`` + ``pg_restore -d`` vs ``dumps.run_dump_restore``
  (checksum, CREATE DATABASE, pg_restore --exit-on-error, marker, object count);
- the same pair for the directory format with 2 jobs (``pg_dump -Fd -j 2``, ``pg_restore -j 2``).

The collection's side runs in-process (what the module does after Ansible has started it);
Ansible's own fixed cost per task is not included. Writes results.json (every sample) and
results.md to benchmarks/results/<timestamp>-dumps/. Tests never assert on time.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import typing as t
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import PG_BIN, RESULTS, ROOT, BenchError, ScratchCluster, ratio, write_report

sys.path.insert(0, str(ROOT / "build" / "collections"))

from ansible_collections.pitr.postgresql.plugins.module_utils import dumps
from ansible_collections.pitr.postgresql.plugins.module_utils.repository import (
    Repository,
    RepositoryIdentity,
)

DATABASE = "benchdb"


def parse_args(argv: t.Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--scale", type=int, default=10, help="pgbench scale factor [10]")
    p.add_argument(
        "--text-rows", type=int, default=400_000, help="rows of random-looking text [400000]"
    )
    p.add_argument("--large-objects", type=int, default=200, help="large objects of 64 kB [200]")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds per pair [3]")
    p.add_argument("--port", type=int, default=55441, help="port of the scratch cluster")
    p.add_argument("--output-dir", type=Path, default=None)
    p.add_argument("--keep", action="store_true", help="keep the scratch directory")
    return p.parse_args(argv)


def log(text: str) -> None:
    print(f"[dump_bench {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


class Bench:
    def __init__(self, workdir: Path, port: int) -> None:
        self.workdir = workdir
        self.cluster = ScratchCluster(workdir / "pg", port=port)
        self.repo_path = workdir / "repo"
        self.plain_dir = workdir / "plain"
        self.connection = {
            "login_unix_socket": str(self.cluster.socket_dir),
            "port": port,
            "login_user": "postgres",
            "login_db": "postgres",
            "ssl_mode": "prefer",
            "connect_timeout": 10,
        }

    def libpq(self) -> list[str]:
        return ["-h", str(self.cluster.socket_dir), "-p", str(self.cluster.port), "-U", "postgres"]

    def setup(self, args: argparse.Namespace) -> dict[str, t.Any]:
        self.cluster.create({"fsync": "off", "archive_mode": "off", "max_wal_size": "'4GB'"})
        self.cluster.start()
        self.cluster.psql(f"CREATE DATABASE {DATABASE}")
        log(f"pgbench -i -s {args.scale}, {args.text_rows} text rows, {args.large_objects} LOs")
        subprocess.run(
            [str(PG_BIN / "pgbench"), *self.libpq(), "-i", "-q", "-s", str(args.scale), DATABASE],
            check=True,
            capture_output=True,
        )
        self.sql(
            "CREATE TABLE notes (id int PRIMARY KEY, body text);"
            " INSERT INTO notes SELECT g,"
            " md5(g::text) || md5((g * 31)::text) || md5(random()::text)"
            f" FROM generate_series(1, {args.text_rows}) g;"
            " CREATE TABLE docs (id serial PRIMARY KEY, doc oid);"
            " INSERT INTO docs (doc) SELECT"
            " lo_from_bytea(0, convert_to(string_agg(md5((g * k)::text), ''), 'UTF8'))"
            f" FROM generate_series(1, {args.large_objects}) g,"
            " generate_series(1, 2000) k GROUP BY g"
        )
        self.sql("VACUUM ANALYZE")
        self.repo_path.mkdir()
        self.plain_dir.mkdir()
        sysid = int(self.cluster.psql("SELECT system_identifier FROM pg_control_system()"))
        Repository.open_posix(str(self.repo_path)).ensure_identity(
            RepositoryIdentity(sysid, 15, 16 * 1024 * 1024)
        )
        size = int(self.cluster.psql(f"SELECT pg_database_size('{DATABASE}')"))
        return {"database_bytes": size}

    def sql(self, text: str, database: str = DATABASE) -> str:
        proc = subprocess.run(
            [
                str(PG_BIN / "psql"),
                "-X",
                "-Atq",
                *self.libpq(),
                "-d",
                database,
                "-v",
                "ON_ERROR_STOP=1",
                "-c",
                text,
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            raise BenchError(f"psql failed: {proc.stderr}")
        return proc.stdout.strip()

    def checkpoint(self) -> None:
        self.cluster.psql("CHECKPOINT")

    def drop(self, name: str) -> None:
        self.cluster.psql(f"DROP DATABASE IF EXISTS {name}")

    # the four contenders ------------------------------------------------------------------
    def plain_dump(self, fmt: str, jobs: int, n: int) -> tuple[float, str]:
        target = self.plain_dir / f"d{n}.{fmt}"
        argv = [str(PG_BIN / "pg_dump"), *self.libpq(), f"--format={fmt}", f"--file={target}"]
        if jobs > 1:
            argv.append(f"--jobs={jobs}")
        argv.append(DATABASE)
        started = time.perf_counter()
        subprocess.run(argv, check=True, capture_output=True)
        return time.perf_counter() - started, str(target)

    def plain_restore(self, archive: str, jobs: int, target: str) -> float:
        started = time.perf_counter()
        subprocess.run(
            [str(PG_BIN / "createdb"), *self.libpq(), "-T", "template0", target],
            check=True,
            capture_output=True,
        )
        argv = [str(PG_BIN / "pg_restore"), *self.libpq(), "-d", target]
        if jobs > 1:
            argv.append(f"--jobs={jobs}")
        subprocess.run([*argv, archive], check=True, capture_output=True)
        return time.perf_counter() - started

    def our_dump(self, fmt: str, jobs: int, n: int) -> tuple[float, dict[str, t.Any]]:
        params = {
            **self.connection,
            "repository_path": str(self.repo_path),
            "databases": [DATABASE],
            "globals": False,
            "label": f"b{n}-{fmt}",
            "format": fmt,
            "jobs": jobs,
            "large_objects": True,
        }
        started = time.perf_counter()
        result = dumps.run_logical_dump(params)
        elapsed = time.perf_counter() - started
        if result.get("failed"):
            raise BenchError(f"logical dump failed: {result['msg']}")
        return elapsed, result["dumps"][0]

    def our_restore(self, label: str, jobs: int, target: str) -> tuple[float, dict[str, t.Any]]:
        params = {
            **self.connection,
            "repository_path": str(self.repo_path),
            "label": label,
            "target_database": target,
            "mode": "new",
            "jobs": jobs,
            "same_locale": True,
            "verify_checksum": True,
        }
        started = time.perf_counter()
        result = dumps.run_dump_restore(params)
        elapsed = time.perf_counter() - started
        if result.get("failed"):
            raise BenchError(f"dump restore failed: {result['msg']}")
        return elapsed, result

    def size_of(self, path: str) -> int:
        p = Path(path)
        if p.is_dir():
            return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
        return p.stat().st_size


def run_pair(bench: Bench, fmt: str, jobs: int, rounds: int) -> dict[str, t.Any]:
    samples: dict[str, list[float]] = {
        "plain_dump": [],
        "our_dump": [],
        "our_pg_dump": [],
        "our_verify": [],
        "plain_restore": [],
        "our_restore": [],
        "our_pg_restore": [],
        "our_checksum": [],
    }
    sizes: dict[str, int] = {}
    for n in range(rounds):
        tag = f"{fmt}{jobs}_{n}"
        log(f"{fmt} jobs={jobs} round {n + 1}/{rounds}")
        bench.checkpoint()
        elapsed, archive = bench.plain_dump(fmt, jobs, n)
        samples["plain_dump"].append(elapsed)
        sizes["plain"] = bench.size_of(archive)
        bench.checkpoint()
        elapsed, entry = bench.our_dump(fmt, jobs, n)
        samples["our_dump"].append(elapsed)
        samples["our_pg_dump"].append(entry["dump_seconds"])
        samples["our_verify"].append(entry["verify_seconds"])
        sizes["ours"] = int(entry["record"]["size"])
        bench.checkpoint()
        samples["plain_restore"].append(bench.plain_restore(archive, jobs, f"plain_{tag}"))
        bench.checkpoint()
        elapsed, result = bench.our_restore(entry["label"], jobs, f"ours_{tag}")
        samples["our_restore"].append(elapsed)
        samples["our_pg_restore"].append(result["restore_seconds"])
        samples["our_checksum"].append(result["checksum_seconds"])
        bench.drop(f"plain_{tag}")
        bench.drop(f"ours_{tag}")
        shutil.rmtree(archive, ignore_errors=True) if os.path.isdir(archive) else os.unlink(archive)
    medians = {k: statistics.median(v) for k, v in samples.items()}
    return {
        "format": fmt,
        "jobs": jobs,
        "samples_s": samples,
        "median_s": medians,
        "bytes": sizes,
        "dump_ratio": ratio(medians["our_dump"], medians["plain_dump"]),
        "restore_ratio": ratio(medians["our_restore"], medians["plain_restore"]),
    }


def render(results: dict[str, t.Any]) -> str:
    meta = results["meta"]
    lines = [
        "# pitr.postgresql logical dump benchmark",
        "",
        f"{meta['cores']} cores, {meta['postgres']}; database {meta['database_bytes'] / 1e6:.0f} MB"
        f" (pgbench scale {meta['scale']}, {meta['text_rows']} text rows, {meta['large_objects']}"
        f" large objects); {meta['rounds']} interleaved rounds, medians; the run took"
        f" {meta['duration_s']:.0f} s. Ratios are ours / plain (lower is faster).",
        "",
        "| format | plain pg_dump s | ours s | of which pg_dump s | verify s | dump ratio |"
        " plain restore s | ours s | of which pg_restore s | checksum s | restore ratio |"
        " archive MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for pair in results["pairs"]:
        m = pair["median_s"]
        lines.append(
            f"| {pair['format']} j{pair['jobs']} | {m['plain_dump']:.2f} | {m['our_dump']:.2f} |"
            f" {m['our_pg_dump']:.2f} | {m['our_verify']:.2f} | {pair['dump_ratio']:.2f}x |"
            f" {m['plain_restore']:.2f} | {m['our_restore']:.2f} | {m['our_pg_restore']:.2f} |"
            f" {m['our_checksum']:.2f} | {pair['restore_ratio']:.2f}x |"
            f" {pair['bytes']['ours'] / 1e6:.1f} |"
        )
    lines += [
        "",
        "Ours = the module's work in-process: dump = count objects in the dump's snapshot +"
        " pg_dump + pg_restore --list + full read into /dev/null + SHA-256 + record + rename;"
        " restore = SHA-256 check + CREATE DATABASE + pg_restore --exit-on-error + marker +"
        " object count. Ansible's fixed cost per task is not included.",
        "",
    ]
    return "\n".join(lines)


def main(argv: t.Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("run as root: the scratch cluster runs as postgres", file=sys.stderr)
        return 2
    started = time.time()
    workdir = Path(tempfile.mkdtemp(prefix="pitr-dumpbench-", dir="/var/tmp"))
    os.chmod(workdir, 0o755)  # the cluster below it runs as postgres
    bench = Bench(workdir, args.port)
    results: dict[str, t.Any] = {"pairs": []}
    try:
        meta = bench.setup(args)
        meta.update(
            scale=args.scale,
            text_rows=args.text_rows,
            large_objects=args.large_objects,
            rounds=args.rounds,
            cores=os.cpu_count(),
            postgres=subprocess.run(
                [str(PG_BIN / "postgres"), "--version"], capture_output=True, text=True, check=False
            ).stdout.strip(),
        )
        results["meta"] = meta
        results["pairs"].append(run_pair(bench, "custom", 1, args.rounds))
        results["pairs"].append(run_pair(bench, "directory", 2, args.rounds))
    except (BenchError, subprocess.CalledProcessError) as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 1
    finally:
        bench.cluster.stop()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    results["meta"]["duration_s"] = time.time() - started
    out = args.output_dir or RESULTS / (time.strftime("%Y%m%dT%H%M%S") + "-dumps")
    write_report(out, "results", results, render(results))
    print(f"results in {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

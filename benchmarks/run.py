# Copyright: contributors to pitr.postgresql
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Run the archiving benchmarks and write ``results.md`` and ``results.json``.

    python benchmarks/run.py                       # everything, about 8-10 minutes
    python benchmarks/run.py --benchmarks startup,compression --segments 16

Needs root (a scratch PostgreSQL 15 cluster runs as postgres), pgbackrest, zstd, lz4 and the
python3-zstandard / python3-lz4 packages. Results go to benchmarks/results/<timestamp>/
(ignored by git). Every figure is reported as a ratio against baselines measured in the same
run on the same WAL; the JSON keeps every raw sample.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import typing as t
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import archive_bench as ab
from benchlib import RESULTS, ROOT, SYSTEM_PYTHON, args_record, bench_main, md_table, ratio

BENCHMARKS = ("drain", "latency", "startup", "compression", "stages")


def parse_args(argv: t.Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--benchmarks",
        default=",".join(BENCHMARKS),
        help=f"comma-separated subset of {', '.join(BENCHMARKS)} [all]",
    )
    p.add_argument(
        "--segments",
        type=int,
        default=64,
        help="real WAL segments in the corpus (latency benchmark) [64]",
    )
    p.add_argument(
        "--latency-repeat",
        type=int,
        default=1,
        help="push the corpus this many times per tool, fresh repositories [1]",
    )
    p.add_argument(
        "--latency-tools",
        default=",".join(ab.DEFAULT_LATENCY_TOOLS),
        help="tools for the latency benchmark",
    )
    p.add_argument(
        "--experiment-segments",
        type=int,
        default=32,
        help="segments each optimisation experiment (variant:*) pushes [32]",
    )
    p.add_argument("--backlog", type=int, default=64, help="segments per drain backlog [64]")
    p.add_argument(
        "--drain-tools",
        default=",".join(ab.DEFAULT_DRAIN_TOOLS),
        help="tools for the drain benchmark; more: " + ", ".join(ab.EXTRA_DRAIN_TOOLS),
    )
    p.add_argument("--drain-rounds", type=int, default=1, help="drains per tool [1]")
    p.add_argument(
        "--max-backlog-seconds",
        type=float,
        default=240,
        help="give up building a backlog after this long [240]",
    )
    p.add_argument("--startup-runs", type=int, default=50, help="runs per start-up command [50]")
    p.add_argument(
        "--compress-segments", type=int, default=8, help="segments in the compression corpus [8]"
    )
    p.add_argument("--compress-repeat", type=int, default=3, help="runs per codec (median) [3]")
    p.add_argument(
        "--stage-segments",
        type=int,
        default=16,
        help="segments for the in-process stage breakdown [16]",
    )
    p.add_argument("--scale", type=int, default=20, help="pgbench scale factor [20]")
    p.add_argument(
        "--workload",
        choices=("batch", "tpcb"),
        default="batch",
        help="pgbench script that writes the corpus and the backlogs: batch (100-row updates"
        " per transaction, fast WAL) or tpcb (built-in) [batch]",
    )
    p.add_argument(
        "--tpcb-seconds",
        type=float,
        default=15,
        help="seconds of built-in TPC-B pgbench to measure the WAL rate to outrun (0: skip) [15]",
    )
    p.add_argument(
        "--output-dir",
        type=Path,
        default=None,
        help="where results go [benchmarks/results/<timestamp>]",
    )
    p.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="scratch directory (cluster, repositories) [a new one under $TMPDIR]",
    )
    p.add_argument(
        "--base-ref",
        default=None,
        help="also install plugins/module_utils of this git commit as the latency tool"
        " `pitr-wal-base-zstd` (before/after comparisons in one interleaved run)",
    )
    p.add_argument("--keep", action="store_true", help="keep the scratch directory")
    args = p.parse_args(argv)
    args.selected = [b for b in args.benchmarks.split(",") if b]
    unknown = set(args.selected) - set(BENCHMARKS)
    if unknown:
        p.error(f"unknown benchmarks: {', '.join(sorted(unknown))}")
    args.latency_tool_list = [x for x in args.latency_tools.split(",") if x]
    args.drain_tool_list = [x for x in args.drain_tools.split(",") if x]
    if args.segments < 2 or args.backlog < 2:
        p.error("--segments and --backlog must be at least 2")
    return args


def _cmd_output(argv: list[str]) -> str:
    try:
        return subprocess.run(
            argv, capture_output=True, text=True, check=False, timeout=30
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def machine_info() -> dict[str, t.Any]:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    libs = _cmd_output(
        [
            SYSTEM_PYTHON,
            "-c",
            "import zstandard, lz4; print(zstandard.__version__, lz4.__version__)",
        ]
    )
    return {
        "host": platform.node(),
        "kernel": platform.release(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "loadavg_start": os.getloadavg(),
        "postgres": _cmd_output([str(ab.PG_BIN / "postgres"), "--version"]),
        "pgbackrest": _cmd_output(["pgbackrest", "version"]),
        "python_host": _cmd_output([SYSTEM_PYTHON, "--version"]),
        "zstandard_lz4_modules": libs,
        "zstd_cli": _cmd_output(["zstd", "--version"]),
        "git_commit": _cmd_output(["git", "-C", str(ROOT), "rev-parse", "HEAD"]),
        "git_dirty_plugins": bool(
            _cmd_output(
                [
                    "git",
                    "-C",
                    str(ROOT),
                    "status",
                    "--porcelain",
                    "plugins",
                    "roles/archiving/files",
                ]
            )
        ),
    }


def run_all(args: argparse.Namespace) -> dict[str, t.Any]:
    started = time.time()
    results: dict[str, t.Any] = {
        "meta": machine_info(),
        "args": args_record(args),
    }
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="pitr-bench-", dir="/var/tmp"))
    env = ab.setup_env(workdir, base_ref=args.base_ref)
    try:
        ab.load_data(env, args.scale, args.workload, args.tpcb_seconds)
        corpus_size = max(args.segments, args.compress_segments, args.stage_segments)
        results["corpus"] = ab.make_corpus(env, corpus_size, args.max_backlog_seconds)
        if "drain" in args.selected:
            ab.log("drain benchmark")
            results["drain"] = ab.bench_drain(
                env, args.drain_tool_list, args.backlog, args.drain_rounds, args.max_backlog_seconds
            )
        else:
            ab.discard_backlog(env)
        if "latency" in args.selected:
            ab.log("latency benchmark")
            saved = env.corpus
            env.corpus = saved[: args.segments]
            results["latency"] = ab.bench_latency(
                env, args.latency_tool_list, args.latency_repeat, args.experiment_segments
            )
            env.corpus = saved
        if "startup" in args.selected:
            ab.log("start-up benchmark")
            results["startup"] = ab.bench_startup(env, args.startup_runs)
        if "compression" in args.selected:
            ab.log("compression benchmark")
            results["compression"] = ab.bench_compression(
                env, args.compress_segments, args.compress_repeat
            )
        if "stages" in args.selected:
            ab.log("push stage breakdown")
            results["stages"] = ab.bench_stages(env, args.stage_segments)
    finally:
        ab.teardown_env(env, args.keep)
    results["pgbench_wal_mb_s"] = env.pgbench_wal_mb_s
    results["pgbench_tpcb"] = env.tpcb
    results["workload"] = env.workload
    results["meta"]["loadavg_end"] = os.getloadavg()
    results["meta"]["duration_s"] = time.time() - started
    return results


# ---------------------------------------------------------------------------------------------
# Markdown


def _f(value: t.Any, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def render(results: dict[str, t.Any]) -> str:
    meta = results["meta"]
    lines = [
        "# pitr.postgresql archiving benchmark",
        "",
        f"{meta['cpu']}, {meta['cores']} cores, kernel {meta['kernel']}; {meta['postgres']};"
        f" {meta['pgbackrest']}; {meta['python_host']} (zstandard, lz4:"
        f" {meta['zstandard_lz4_modules']}); commit {meta['git_commit'][:12]}"
        f"{' + uncommitted plugin changes' if meta['git_dirty_plugins'] else ''}.",
        f"Load average at start {_f(meta['loadavg_start'][0], 2)}, at end"
        f" {_f(meta['loadavg_end'][0], 2)}; the run took {meta['duration_s']:.0f} s."
        " Shared, noisy machine: compare ratios within this run, not absolute numbers"
        " across runs.",
        "",
    ]
    lines += _targets(results)
    if "latency" in results:
        lines += _latency(results)
    if "drain" in results:
        lines += _drain(results)
    if "startup" in results:
        lines += _startup(results["startup"])
    if "compression" in results:
        lines += _compression(results["compression"])
    if "stages" in results:
        lines += _stages(results["stages"])
    return "\n".join(lines) + "\n"


def _targets(results: dict[str, t.Any]) -> list[str]:
    rows: list[list[str]] = []

    def add(
        metric: str, value: float | None, target: str, ok: bool | None, unit: str = "x"
    ) -> None:
        shown = (
            "-" if value is None else (f"{value:.2f}x" if unit == "x" else f"{value:.1f} {unit}")
        )
        rows.append([metric, shown, target, "-" if ok is None else ("yes" if ok else "**no**")])

    lat = {k: v for k, v in results.get("latency", {}).items() if k != "skipped"}
    drain = results.get("drain", {})
    if "pitr-wal-zstd" in lat and "pgbackrest-zst" in lat:
        r = ratio(lat["pitr-wal-zstd"]["p50"], lat["pgbackrest-zst"]["p50"])
        add(
            "push latency p50, pitr-wal zstd-1 / pgbackrest zst-1",
            r,
            "<= 1.00x",
            None if r is None else r <= 1.0,
        )
        r = ratio(lat["pitr-wal-zstd"]["p99"], lat["pgbackrest-zst"]["p99"])
        add(
            "push latency p99, pitr-wal zstd-1 / pgbackrest zst-1",
            r,
            "<= 1.00x",
            None if r is None else r <= 1.0,
        )
    if "pitr-wal-zstd" in drain and "basic_archive" in drain:
        r = ratio(
            drain["pitr-wal-zstd"]["log_interval_p50"], drain["basic_archive"]["log_interval_p50"]
        )
        add(
            "per-segment archiver cycle p50, pitr-wal / basic_archive (server log)",
            r,
            "<= 1.25x",
            None if r is None else r <= 1.25,
        )
        r = ratio(
            drain["basic_archive"]["ms_per_segment"], drain["pitr-wal-zstd"]["ms_per_segment"]
        )
        add(
            "drain throughput (steady), pitr-wal / basic_archive",
            r,
            ">= 0.80x",
            None if r is None else r >= 0.8,
        )
        r = ratio(
            drain["basic_archive"]["wall_ms_per_segment"],
            drain["pitr-wal-zstd"]["wall_ms_per_segment"],
        )
        add(
            "drain throughput (wall), pitr-wal / basic_archive",
            r,
            ">= 0.80x",
            None if r is None else r >= 0.8,
        )
    if "pitr-wal-zstd" in drain and "pgbackrest-zst" in drain:
        r = ratio(
            drain["pgbackrest-zst"]["ms_per_segment"], drain["pitr-wal-zstd"]["ms_per_segment"]
        )
        add(
            "drain throughput (steady), pitr-wal / pgbackrest zst-1",
            r,
            ">= 1.00x",
            None if r is None else r >= 1.0,
        )
        r = ratio(
            drain["pgbackrest-zst"]["wall_ms_per_segment"],
            drain["pitr-wal-zstd"]["wall_ms_per_segment"],
        )
        add(
            "drain throughput (wall), pitr-wal / pgbackrest zst-1",
            r,
            ">= 1.00x",
            None if r is None else r >= 1.0,
        )
    peak = _pgbench_rate(results)[0]
    if "pitr-wal-zstd" in drain and peak:
        r = ratio(drain["pitr-wal-zstd"]["mb_s"], peak)
        add(
            f"drain MB/s / pgbench TPC-B WAL rate ({peak:.1f} MB/s)",
            r,
            ">= 3.00x",
            None if r is None else r >= 3.0,
        )
    start = results.get("startup", {}).get("commands", {})
    key = "pitr-wal push imports (incl. zstandard), no I/O"
    if key in start:
        v = start[key]["p50"]
        add("python3 -I -S start + push imports, median wall", v, "<= 15 ms", v <= 15, "ms")
        c = _cpu(start[key])
        if c is not None:
            add("python3 -I -S start + push imports, median CPU", c, "<= 15 ms", c <= 15, "ms")
    comp = results.get("compression", {}).get("ours", {}).get("codecs", {})
    if "zstd-1 (library)" in comp:
        v = comp["zstd-1 (library)"]["compress_mb_s_per_core"]
        add(
            "default codec (zstd-1) compress MB/s per core",
            v,
            ">= 500 MB/s",
            None if v is None else v >= 500,
            "MB/s",
        )
    if not rows:
        return []
    return ["## Targets", "", *md_table(["metric", "measured", "target", "met"], rows)]


def _latency(results: dict[str, t.Any]) -> list[str]:
    lat = dict(results["latency"])
    skipped = lat.pop("skipped", {})
    cp = lat.get("cp-sync", {}).get("p50")
    pgbr = lat.get("pgbackrest-zst", {})
    rows = []
    for key, r in lat.items():
        if key.startswith("variant:"):
            continue
        rows.append(
            [
                r["label"],
                str(r["n"]),
                _f(r["p50"]),
                _f(r["p99"]),
                _f(r["mean"]),
                _x(ratio(r["p50"], cp)),
                _x(ratio(r["p50"], pgbr.get("p50"))),
                _x(ratio(r["p99"], pgbr.get("p99"))),
                _f(_cpu(r)),
                _x(ratio(_cpu(r), _cpu(pgbr))),
            ]
        )
    out = [
        "## 1. Push latency per 16 MiB segment",
        "",
        "Each tool's archive_command run by `/bin/sh -c` as postgres in the data directory,"
        " on the same real segments, interleaved (rotating order per segment), fresh"
        " destinations, after CHECKPOINT + sync, corpus in page cache. Wall ms from spawn to"
        " exit; CPU ms = user+sys of the command and the children it waited for (steadier"
        " than wall on a busy machine).",
        "",
    ]
    out += md_table(
        [
            "tool",
            "n",
            "p50 ms",
            "p99 ms",
            "mean ms",
            "p50 / cp+sync",
            "p50 / pgbackrest zst-1",
            "p99 / pgbackrest zst-1",
            "CPU p50 ms",
            "CPU p50 / pgbackrest zst-1",
        ],
        rows,
    )
    for key, why in skipped.items():
        out += [f"Left out: `{key}`: {why}", ""]
    drain = results.get("drain", {})
    if drain:
        base = drain.get("basic_archive", {})
        pz = drain.get("pgbackrest-zst", {})
        rows = [
            [
                d["label"],
                _f(d["log_interval_p50"]),
                _f(d["log_interval_p99"]),
                _x(ratio(d["log_interval_p50"], base.get("log_interval_p50"))),
                _x(ratio(d["log_interval_p50"], pz.get("log_interval_p50"))),
            ]
            for d in drain.values()
        ]
        out += [
            "Per-segment cycle inside the archiver during the drain (intervals between"
            " successive `archived ...` DEBUG1 lines in the server log, ms resolution):"
            " the only way to time basic_archive per segment, since it runs in the server.",
            "",
        ]
        out += md_table(
            ["tool", "p50 ms", "p99 ms", "p50 / basic_archive", "p50 / pgbackrest zst-1"], rows
        )
    control = lat.get("variant:control")
    if control:
        rows = []
        for key, r in lat.items():
            if not key.startswith("variant:"):
                continue
            d50 = r["p50"] - control["p50"]
            rows.append(
                [
                    r["label"],
                    _f(r["p50"]),
                    _f(r["p99"]),
                    f"{d50:+.1f}",
                    f"{100 * d50 / control['p50']:+.0f} %",
                    f"{r['mean'] - control['mean']:+.1f}",
                    _delta(_cpu(r), _cpu(control)),
                ]
            )
        if "pitr-wal-zstd" in lat:
            a = lat["pitr-wal-zstd"]
            rows.append(
                [
                    "check: pitr-wal itself (its own launcher) vs control",
                    _f(a["p50"]),
                    _f(a["p99"]),
                    f"{a['p50'] - control['p50']:+.1f}",
                    f"{100 * (a['p50'] - control['p50']) / control['p50']:+.0f} %",
                    f"{a['mean'] - control['mean']:+.1f}",
                    _delta(_cpu(a), _cpu(control)),
                ]
            )
        if "pitr-wal-zstd-nopyc" in lat and "pitr-wal-zstd" in lat:
            a, b = lat["pitr-wal-zstd-nopyc"], lat["pitr-wal-zstd"]
            rows.append(
                [
                    "no .pyc vs precompiled (pitr-wal itself, not the wrapper)",
                    _f(a["p50"]),
                    _f(a["p99"]),
                    f"{a['p50'] - b['p50']:+.1f}",
                    f"{100 * (a['p50'] - b['p50']) / b['p50']:+.0f} %",
                    f"{a['mean'] - b['mean']:+.1f}",
                    _delta(_cpu(a), _cpu(b)),
                ]
            )
        out += [
            "### Optimisation experiments (benchmark-local monkeypatches, zstd-1)",
            "",
            "Same interleaved run; deltas against `variant: control`, which runs the"
            " installed code unchanged through the same wrapper.",
            "",
        ]
        out += md_table(
            [
                "variant",
                "p50 ms",
                "p99 ms",
                "delta p50 ms",
                "delta p50",
                "delta mean ms",
                "delta CPU p50 ms",
            ],
            rows,
        )
    return out


def _cpu(r: dict[str, t.Any]) -> float | None:
    value = r.get("cpu", {}).get("p50")
    return None if value is None else float(value)


def _delta(a: float | None, b: float | None) -> str:
    return "-" if a is None or b is None else f"{a - b:+.1f}"


def _pgbench_rate(results: dict[str, t.Any]) -> tuple[float | None, str]:
    """The WAL rate the archiver must outrun, and a sentence saying how it was measured."""
    backlog = results.get("pgbench_wal_mb_s") or []
    workload = " ".join(results.get("workload") or [])
    said = (
        f"Backlogs were written by `pgbench {workload}` at up to {max(backlog):.1f} MB/s of WAL."
        if backlog
        else ""
    )
    tpcb = results.get("pgbench_tpcb") or {}
    if tpcb:
        return tpcb["wal_mb_s"], (
            f"Built-in TPC-B `pgbench {' '.join(tpcb['argv'])}` (synchronous_commit=off) wrote"
            f" {tpcb['wal_mb_s']:.1f} MB/s of WAL at {tpcb['tps']:.0f} tps: the rate to outrun"
            f" (x pgbench column). {said}"
        )
    return (max(backlog) if backlog else None), said


def _drain(results: dict[str, t.Any]) -> list[str]:
    drain = results["drain"]
    base = drain.get("basic_archive", {}).get("ms_per_segment")
    pz = drain.get("pgbackrest-zst", {}).get("ms_per_segment")
    peak, described = _pgbench_rate(results)
    rows = []
    for d in drain.values():
        r0 = d["runs"][0]
        rows.append(
            [
                d["label"],
                str(r0["segments"]),
                _f(r0["elapsed_s"], 2),
                _f(d["wall_ms_per_segment"]),
                _f(d["ms_per_segment"]),
                _f(d["mb_s"]),
                _x(ratio(base, d["ms_per_segment"])),
                _x(ratio(pz, d["ms_per_segment"])),
                _x(ratio(d["mb_s"], peak)),
                _f(d.get("cpu_ms_per_segment")),
                "yes" if d["all_drained"] else "**no**",
                str(d["failed_count_delta"]),
            ]
        )
    out = [
        "## 2. Archiver drain throughput",
        "",
        "Archiving paused (`archive_command = ''`), a backlog built with pgbench, CHECKPOINT,"
        " then the tool switched on by reload. Wall: from SIGHUP until no `.ready` is left"
        " (for basic_archive including the archiver restart a library change forces, which"
        " a server configured at start does not pay). Steady: first to last `archived`"
        " line in the server log / (segments - 1); the ratios use steady."
        f" {described}",
        "",
    ]
    out += md_table(
        [
            "tool",
            "segments",
            "wall s",
            "wall ms / segment",
            "steady ms / segment",
            "MB/s (steady)",
            "throughput / basic_archive",
            "throughput / pgbackrest zst-1",
            "x pgbench WAL rate",
            "archiver CPU ms / segment",
            "drained",
            "failed",
        ],
        rows,
    )
    return out


def _startup(st: dict[str, t.Any]) -> list[str]:
    cmds = st["commands"]
    sh = cmds["sh -c true"]["p50"]
    sh_cpu = _cpu(cmds["sh -c true"])
    rows = [
        [
            name,
            _f(c["p50"]),
            _f(c["p90"]),
            f"{c['p50'] - sh:+.1f}",
            _f(_cpu(c)),
            _delta(_cpu(c), sh_cpu),
        ]
        for name, c in cmds.items()
    ]
    out = [f"## 3. Interpreter start ({st['runs']} runs each, interleaved, as postgres)", ""]
    out += md_table(
        [
            "command",
            "median ms",
            "p90 ms",
            "median - sh -c true",
            "CPU median ms",
            "CPU - sh -c true",
        ],
        rows,
    )
    mod = st.get("module_cpu")
    if mod:
        out += [
            f"CPU of importing one module in a fresh `python3 -I -S` ({mod['runs']} runs,"
            f" median, minus `-c pass` at {mod['bare_cpu_ms']:.1f} ms). Modules share"
            " dependencies, so the figures overlap; each is what dropping that import alone"
            " could save at most:",
            "",
        ]
        out += md_table(
            ["module", "extra CPU ms"],
            [
                [f"`{name}`", _f(m["extra_cpu_ms_p50"])]
                for name, m in sorted(
                    mod["modules"].items(), key=lambda kv: -kv[1]["extra_cpu_ms_p50"]
                )
            ],
        )
    imp = st["importtime"]
    out += [
        "`-X importtime` of the push imports (median of 5 runs; top-level imports by"
        " cumulative time, including the interpreter's own start-up modules):",
        "",
    ]
    out += md_table(
        ["module", "cumulative ms", "self ms"],
        [
            [r["module"], _f(r["cumulative_us"] / 1000, 2), _f(r["self_us"] / 1000, 2)]
            for r in imp["top_level"]
        ],
    )
    out += md_table(
        ["module (any depth), by self time", "self ms", "cumulative ms"],
        [
            [r["module"], _f(r["self_us"] / 1000, 2), _f(r["cumulative_us"] / 1000, 2)]
            for r in imp["by_self"][:10]
        ],
    )
    return out


def _compression(comp: dict[str, t.Any]) -> list[str]:
    mb = comp["input_bytes"] / 1e6
    out = [f"## 4. Compression, one core ({comp['segments']} real segments, {mb:.0f} MB)", ""]
    rows = []
    for c in comp["cli"].values():
        rows.append(
            [
                f"`{' '.join(c['argv'])}` (CLI)",
                _f(c["compress_mb_s_per_core"]),
                _f(c["compress_mb_s_wall"]),
                _f(c["decompress_mb_s_wall"]),
                _f(c["ratio"], 3),
                "1.00x",
            ]
        )
    cli_of = {"zstd": "zstd-1", "lz4": "lz4-1", "gzip": "gzip-6"}
    for label, c in comp["ours"]["codecs"].items():
        if "error" in c:
            rows.append([f"ours {label}", c["error"], "", "", "", ""])
            continue
        base = comp["cli"].get(cli_of.get(label.split("-")[0], ""), {})
        rows.append(
            [
                f"ours {label}",
                _f(c["compress_mb_s_per_core"]),
                _f(c["compress_mb_s_wall"]),
                _f(c["decompress_mb_s_wall"]),
                _f(c["ratio"], 3),
                _x(ratio(c["compress_mb_s_per_core"], base.get("compress_mb_s_per_core"))),
            ]
        )
    out += md_table(
        [
            "codec",
            "compress MB/s per CPU-s",
            "compress MB/s wall",
            "decompress MB/s wall",
            "stored / original",
            "per core vs CLI",
        ],
        rows,
    )
    out += [f"sha256 (hashlib) over the same data: {comp['ours']['sha256']['mb_s']:.0f} MB/s.", ""]
    return out


def _stages(st: dict[str, t.Any]) -> list[str]:
    total = st["total"]["p50"]
    rows = [
        [name, _f(s["p50"], 2), _f(s["p90"], 2), f"{100 * s['p50'] / total:.0f} %"]
        for name, s in sorted(st["stages"].items(), key=lambda kv: -kv[1]["p50"])
    ]
    out = [
        "## 5. Inside one push",
        "",
        f"The real archive.push in-process (zstd-1, {st['segments']} segments, timing wrappers"
        f" around the functions it calls): total p50 {total:.1f} ms, p90"
        f" {st['total']['p90']:.1f} ms wall; CPU p50 {st['cpu']['p50']:.1f} ms. That is what a"
        " push costs once the process runs: the per-segment floor of a mode that pushes"
        " several segments per process.",
        "",
    ]
    return out + md_table(["stage", "p50 ms", "p90 ms", "share of p50 total"], rows)


def main(argv: t.Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    out_dir = args.output_dir or RESULTS / time.strftime("%Y%m%dT%H%M%S")
    status = bench_main(lambda: run_all(args), render, out_dir, "results")
    if status == 0:
        print(f"results in {out_dir}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())

# Copyright: contributors to pitr.postgresql
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Restore time (RTO) and PITR exactness against baselines in the same run.

    sudo .venv/bin/python benchmarks/restore_bench.py --out DIR [--segments 16] [--targets 20]

One scratch cluster archives through ``pitr-wal`` (and, for the pgBackRest baseline, also
through ``pgbackrest archive-push``: ``archive_command = pitr-wal push %p && pgbackrest ...``).
A base backup is taken with the ``pitr.postgresql.base_backup`` module (through
ansible-playbook, as the integration tests do) and a pgBackRest full backup right after it;
then pgbench writes ``--segments`` segments of WAL while a marker table gets one committed row
per second (commit times from ``track_commit_timestamp``). Every restore is a clone into a new
data directory and port, to one recovery target time; rotated order per round:

* ``role``: ``ansible-playbook playbooks/pitr_restore.yml -e target_time=...`` (clone, pg_ctl
  service manager, as tests/integration/test_pitr_restore.py runs it), from the start of
  ansible-playbook until a write on the clone commits.
* ``cp``: by hand: extract the same backup (``base.tar.zst``, ``pg_wal.tar``),
  ``restore_command = 'cp ARCHIVE/%f %p'`` from a plain directory filled beforehand (not
  timed) with ``pitr-wal fetch`` of every archived segment, recovery_target_time,
  recovery_target_action=promote, ``pg_ctl start``, wait until a write commits.
* ``pgbackrest``: ``pgbackrest restore --type=time --target-action=promote`` into a new data
  directory, start, wait until a write commits.
* ``noop``: Ansible's fixed cost: a play on the same inventory with one ``ansible.builtin.ping``.
* ``floor``: the least a playbook that restores as this role does can take: a play that calls
  each of the role's three modules once (plan, stage, follow), each failing at once on its
  missing arguments: built, sent to the host, started and imported, but doing no work. Against
  ``cp`` it shows how much of the 1.15x Ansible takes before any restore work.

Before each timed restore the page cache is written back (``sync``, not timed), so that no
method pays for the dirty pages of the one before it or of the set-up. With ``--cold`` the page
cache is also dropped before each restore and no-op play, as the 300 MB reference point of
``performance-targets.md`` was measured: backup, WAL and programs come from disk.

Exactness: ``--targets`` random times between markers committed after the backup, restored by
the role (clones, ``--batch`` hosts per ansible-playbook run); each clone must hold exactly the
markers committed at or before its target.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import typing as t
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))

import archive_bench as ab
from benchlib import (
    PG_BIN,
    RESULTS,
    ROOT,
    SYSTEM_PYTHON,
    BenchError,
    Deadline,
    ScratchCluster,
    args_record,
    as_postgres,
    bench_main,
    chown_postgres,
    fmt,
    init_repository,
    install_host_command,
    log,
    md_table,
    median_or_none,
    merge_args,
    ratio,
    ratio_medians,
    write_pgbackrest_conf,
)
from benchlib import run as run_cmd


def ansible_env(extra: dict[str, str]) -> dict[str, str]:
    """The environment tests/integration/ansible_runner.py gives ansible-playbook (collection
    path to this checkout, the JSON stdout callback), plus ``extra``."""
    spec = importlib.util.spec_from_file_location(
        "pitr_bench_ansible_runner", ROOT / "tests" / "integration" / "ansible_runner.py"
    )
    if spec is None or spec.loader is None:
        raise BenchError("tests/integration/ansible_runner.py is missing")
    module = sys.modules.get(spec.name)
    if module is None:
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    return dict(module._environment(extra))


STANZA = "bench"
METHODS = ("role", "cp", "pgbackrest")
SEG = 16 * 1024 * 1024


def parse_args(argv: t.Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, default=None, help="directory for results.md/json")
    p.add_argument("--scale", type=int, default=5, help="pgbench scale factor [5]")
    p.add_argument(
        "--segments", type=int, default=16, help="WAL segments of pgbench after the backup [16]"
    )
    p.add_argument("--rounds", type=int, default=3, help="RTO rounds (role, cp, pgbackrest) [3]")
    p.add_argument("--targets", type=int, default=20, help="exactness targets [20]")
    p.add_argument("--batch", type=int, default=4, help="clones per ansible-playbook run [4]")
    p.add_argument(
        "--progress-interval",
        type=int,
        default=10,
        help="pitr_restore_progress_interval: the role waits up to this long per round of"
        " following recovery (role default 10; the integration tests use 2) [10]",
    )
    p.add_argument(
        "--cold",
        action="store_true",
        help="drop the page cache (/proc/sys/vm/drop_caches) before each timed restore and"
        " no-op play, as the 300 MB reference point of performance-targets.md was measured",
    )
    p.add_argument("--seed", type=int, default=1, help="random seed for targets [1]")
    p.add_argument("--no-pgbackrest", action="store_true", help="skip the pgBackRest baseline")
    p.add_argument("--workdir", type=Path, default=None, help="scratch directory")
    p.add_argument("--keep", action="store_true", help="keep the scratch directory")
    return p.parse_args(argv)


def utc_text(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f+00")


def connect(sockdir: Path, port: int) -> psycopg.Connection[t.Any]:
    return psycopg.connect(
        host=str(sockdir), port=port, user="postgres", dbname="postgres", autocommit=True
    )


@dataclass(frozen=True)
class Marker:
    id: int
    commit_time: datetime


class MarkerWriter(threading.Thread):
    """One committed marker row per second until ``stop`` is set."""

    def __init__(self, sockdir: Path, port: int) -> None:
        super().__init__(daemon=True)
        self.sockdir = sockdir
        self.port = port
        self.markers: list[Marker] = []
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with connect(self.sockdir, self.port) as conn:
                n = 0
                while not self.stop.is_set() and n < 36000:
                    n += 1
                    started = time.monotonic()
                    row = conn.execute(
                        "INSERT INTO marker (id) VALUES (%s) RETURNING xmin::text", (n,)
                    ).fetchone()
                    when = conn.execute(
                        "SELECT pg_xact_commit_timestamp(%s::xid)", (row[0] if row else "0",)
                    ).fetchone()
                    if when is None or when[0] is None:
                        raise BenchError("no commit timestamp (track_commit_timestamp off?)")
                    self.markers.append(Marker(n, when[0].astimezone(UTC)))
                    self.stop.wait(max(0.0, 1.0 - (time.monotonic() - started)))
        except BaseException as exc:  # reported by the caller
            self.error = exc


class Setup:
    """Source cluster, repository, backups, archived WAL, markers, the cp archive copy."""

    def __init__(self, workdir: Path, args: argparse.Namespace) -> None:
        if os.geteuid() != 0:
            raise BenchError("run as root: the servers and the restores run as postgres")
        self.workdir = workdir
        self.with_pgbackrest = not args.no_pgbackrest and shutil.which("pgbackrest") is not None
        workdir.mkdir(parents=True, exist_ok=True)
        chown_postgres(workdir)
        self.prefix = workdir / "prefix"
        self.program = install_host_command(self.prefix, precompile=True)
        self.repo = self._dir("repo")
        self.cp_archive = self._dir("cp-archive")
        self.clones = self._dir("clones")
        self.cluster = ScratchCluster(workdir / "cluster", port=55443)
        self.cluster.create(
            {
                "max_wal_senders": "10",
                "track_commit_timestamp": "on",
                "synchronous_commit": "off",
                "max_wal_size": "'1GB'",
                "shared_buffers": "'128MB'",
            }
        )
        push = f"{SYSTEM_PYTHON} -I -S {self.program} --repo {self.repo} push %p"
        self.pgbr = workdir / "pgbackrest"
        self.pgbr_conf = self.pgbr / "pgbackrest.conf"
        if self.with_pgbackrest:
            write_pgbackrest_conf(
                self.pgbr,
                STANZA,
                self.cluster,
                ["compress-type=zst", "compress-level=1", "start-fast=y"],
            )
            push += f" && pgbackrest --config={self.pgbr_conf} --stanza={STANZA} archive-push %p"
        self.cluster.write_archive_settings({"archive_command": "'" + push + "'"})
        init_repository(self.program, self.repo, self.cluster.datadir)
        self.cluster.start()
        self.sock = self.cluster.socket_dir
        self.port = self.cluster.port
        self.scale = int(args.scale)
        self.progress_interval = int(args.progress_interval)
        log(f"cluster in {self.cluster.base}; pgbench -i -s {args.scale}")
        run_cmd(self.cluster.pgbench_argv("-i", "-q", "-s", str(args.scale)), timeout=1200)
        self.cluster.psql("CREATE TABLE marker (id int PRIMARY KEY)")
        if self.with_pgbackrest:
            run_cmd(self.pgbackrest_argv("stanza-create"), timeout=120)
            run_cmd(self.pgbackrest_argv("check"), timeout=180)
        self.switch_and_archive()
        self.writer = MarkerWriter(self.sock, self.port)
        self.writer.start()
        log("base backup with the base_backup module (ansible-playbook)")
        self.backup = self.module_backup()
        if self.with_pgbackrest:
            log("pgBackRest full backup")
            run_cmd([*self.pgbackrest_argv("backup"), "--type=full"], timeout=1800)
        self.make_wal(args.segments)
        self.writer.stop.set()
        self.writer.join(timeout=30)
        if self.writer.error is not None:
            raise BenchError(f"marker writer failed: {self.writer.error}")
        self.last_segment = self.switch_and_archive()
        self.markers = self.writer.markers
        self.backup_stop = datetime.fromisoformat(self.backup["stop_time"])
        self.after = [m for m in self.markers if m.commit_time > self.backup_stop]
        if len(self.after) < 3:
            raise BenchError(f"only {len(self.after)} markers after the backup")
        self.fill_cp_archive()

    def _dir(self, name: str) -> Path:
        path = self.workdir / name
        path.mkdir(parents=True, exist_ok=True)
        chown_postgres(path)
        return path

    def pgbackrest_argv(self, command: str) -> list[str]:
        return ["pgbackrest", f"--config={self.pgbr_conf}", f"--stanza={STANZA}", command]

    def switch_and_archive(self, timeout: float = 120) -> str:
        with connect(self.sock, self.port) as conn:
            conn.execute("SELECT pg_logical_emit_message(false, 'bench', 'switch')")
            row = conn.execute("SELECT pg_walfile_name(pg_switch_wal())").fetchone()
            segment = str(row[0]) if row else ""
            deadline = Deadline(timeout)
            while not deadline.expired:
                got = conn.execute(
                    "SELECT coalesce(last_archived_wal, '') FROM pg_stat_archiver"
                ).fetchone()
                if got and str(got[0]) >= segment:
                    return segment
                time.sleep(0.2)
        raise BenchError(f"{segment} was not archived within {timeout}s")

    def module_backup(self) -> dict[str, t.Any]:
        play = [
            {
                "name": "base backup",
                "hosts": "localhost",
                "gather_facts": False,
                "tasks": [
                    {
                        "name": "take the base backup",
                        "pitr.postgresql.base_backup": {
                            "login_unix_socket": str(self.sock),
                            "port": self.port,
                            "login_user": "postgres",
                            "repository_path": str(self.repo),
                            "label": "bench",
                        },
                        "become": True,
                        "become_user": "postgres",
                        "register": "bb",
                    }
                ],
            }
        ]
        report = self.playbook(play, {"localhost": {}})[1]
        result = _task_results(report, "localhost")[-1]
        if result.get("failed"):
            raise BenchError(f"base_backup failed: {result.get('msg')}")
        return dict(result["backup"])

    def make_wal(self, segments: int) -> None:
        """pgbench until ``segments`` segments past the backup are archived (bounded)."""
        start_lsn = self.cluster.current_lsn()
        log(f"pgbench (archive_bench's 100-row batch script) until {segments} segments of WAL")
        script = self.workdir / "batch.sql"
        script.write_text(ab.BATCH_SCRIPT, encoding="utf-8")
        chown_postgres(script)
        bench = subprocess.Popen(
            self.cluster.pgbench_argv(
                *ab.PGBENCH_ARGS,
                "-f",
                str(script),
                "-D",
                f"rows={100000 * self.scale}",
                "-T",
                "900",
            ),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd="/",
            start_new_session=True,
            **as_postgres(),
        )
        try:
            deadline = Deadline(900)
            while not deadline.expired and bench.poll() is None:
                if self.cluster.current_lsn() - start_lsn >= segments * SEG:
                    break
                time.sleep(0.5)
        finally:
            if bench.poll() is None:
                os.killpg(bench.pid, signal.SIGINT)
            bench.wait(timeout=60)
        # a few more markers after pgbench, so that late targets have a later commit
        time.sleep(3)
        self.wal_bytes = self.cluster.current_lsn() - start_lsn

    def fill_cp_archive(self) -> None:
        """Fetch every archived segment with pitr-wal into a plain directory (not timed)."""
        names = sorted(p.name for p in (self.repo).rglob("*") if p.is_file())
        wanted = sorted(
            {n.split(".")[0] for n in names if len(n.split(".")[0]) == 24}
            | {n.split(".")[0] + ".history" for n in names if n.endswith(".history")}
        )
        count = 0
        for name in wanted:
            if name.endswith(".history.history"):
                continue
            proc = subprocess.run(
                [SYSTEM_PYTHON, "-I", "-S", self.program, "--repo", str(self.repo), "fetch",
                 name, str(self.cp_archive / name)],
                capture_output=True, text=True, check=False, cwd="/", **as_postgres(),
            )  # fmt: skip
            count += proc.returncode == 0
        self.cp_segments = count
        log(f"{count} archived segments copied into the cp archive")

    def playbook(
        self,
        play: list[dict[str, t.Any]] | str,
        hosts: dict[str, dict[str, t.Any]],
        extra_vars: dict[str, t.Any] | None = None,
    ) -> tuple[float, dict[str, t.Any]]:
        """Run ansible-playbook on ``hosts`` (all local); (wall seconds, JSON report)."""
        workdir = Path(tempfile.mkdtemp(prefix="play-", dir=self.workdir))
        inventory = {
            "postgresql": {
                "hosts": {
                    name: {
                        "ansible_connection": "local",
                        "ansible_python_interpreter": sys.executable,
                        **host_vars,
                    }
                    for name, host_vars in hosts.items()
                }
            }
        }
        (workdir / "inventory.json").write_text(json.dumps(inventory), encoding="utf-8")
        if isinstance(play, str):
            playbook = play
        else:
            playbook = str(workdir / "playbook.json")
            Path(playbook).write_text(json.dumps(play), encoding="utf-8")
        argv = [
            str(Path(sys.executable).parent / "ansible-playbook"),
            "-i",
            str(workdir / "inventory.json"),
            playbook,
        ]
        if extra_vars:
            argv += ["-e", json.dumps(extra_vars)]
        env = ansible_env({"ANSIBLE_FORKS": str(max(1, len(hosts))), "ANSIBLE_PIPELINING": "1"})
        started = time.perf_counter()
        proc = subprocess.run(
            argv, cwd=workdir, env=env, capture_output=True, text=True, timeout=1800, check=False
        )
        wall = time.perf_counter() - started
        shutil.rmtree(workdir, ignore_errors=True)
        try:
            report = json.loads(proc.stdout)
        except json.JSONDecodeError as exc:
            raise BenchError(
                f"ansible-playbook exited {proc.returncode} without a JSON report\n"
                f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
            ) from exc
        return wall, report

    def clone_vars(self, name: str, port: int) -> dict[str, t.Any]:
        return {
            "pitr_repository_path": str(self.repo),
            "pitr_install_prefix": str(self.prefix),
            "pitr_restore_pg_bindir": str(PG_BIN),
            "pitr_restore_service_manager": "pg_ctl",
            "pitr_restore_login_unix_socket": str(self.sock),
            "pitr_restore_progress_interval": self.progress_interval,
            "pitr_restore_recovery_timeout": 900,
            "pitr_restore_clone": True,
            "pitr_restore_clone_port": port,
            "pitr_restore_data_dir": str(self.clones / name),
        }

    def teardown(self, keep: bool) -> None:
        for path in [*self.clones.iterdir(), self.cluster.datadir]:
            stop_server(path)
        if not keep:
            shutil.rmtree(self.workdir, ignore_errors=True)


def _task_results(report: dict[str, t.Any], host: str) -> list[dict[str, t.Any]]:
    out = []
    for play in report.get("plays", []):
        for task in play.get("tasks", []):
            res = task.get("hosts", {}).get(host)
            if res is not None:
                out.append(dict(res, task_name=task["task"]["name"]))
    return out


def task_durations(report: dict[str, t.Any]) -> list[tuple[str, float]]:
    """(task name, seconds) of every task in the report, from the JSON callback's durations."""
    out: list[tuple[str, float]] = []
    for play in report.get("plays", []):
        for task in play.get("tasks", []):
            dur = task.get("task", {}).get("duration", {})
            try:
                start = datetime.fromisoformat(str(dur["start"]).replace("Z", "+00:00"))
                end = datetime.fromisoformat(str(dur["end"]).replace("Z", "+00:00"))
            except (KeyError, ValueError):
                continue
            name = str(task["task"].get("name", "")).split(" : ", 1)[-1]
            out.append((name, (end - start).total_seconds()))
    return out


def _host_failed(report: dict[str, t.Any], host: str) -> str | None:
    stats = report.get("stats", {}).get(host, {})
    if stats.get("failures") or stats.get("unreachable") or not stats:
        failed = [r for r in _task_results(report, host) if r.get("failed")]
        return str(failed[-1].get("msg", "failed")) if failed else "failed (no stats)"
    return None


def stop_server(datadir: Path) -> None:
    if (datadir / "postmaster.pid").exists():
        subprocess.run(
            [str(PG_BIN / "pg_ctl"), "-D", str(datadir), "-m", "immediate", "-w", "stop"],
            capture_output=True,
            check=False,
            cwd="/",
            timeout=120,
            **as_postgres(),
        )


def wait_writable(sockdir: Path, port: int, seconds: float = 900) -> None:
    """Until a write commits on the server at ``port`` (bounded)."""
    deadline = Deadline(seconds)
    last = ""
    while not deadline.expired:
        try:
            with connect(sockdir, port) as conn:
                conn.execute("CREATE TABLE IF NOT EXISTS bench_writable (x int)")
                conn.execute("INSERT INTO bench_writable VALUES (1)")
                return
        except psycopg.Error as exc:
            last = str(exc).strip()
        time.sleep(0.05)
    raise BenchError(f"the server on port {port} did not become writable: {last}")


def marker_ids(sockdir: Path, port: int) -> list[int]:
    with connect(sockdir, port) as conn:
        return [int(r[0]) for r in conn.execute("SELECT id FROM marker ORDER BY id").fetchall()]


def _free_port(used: set[int]) -> int:
    port = 56000
    while port in used:
        port += 1
    used.add(port)
    return port


def _auto_conf(datadir: Path, settings: dict[str, str]) -> None:
    with open(datadir / "postgresql.auto.conf", "a", encoding="utf-8") as fh:
        fh.write("".join(f"{k} = {v}\n" for k, v in settings.items()))


def _pg_ctl_start(datadir: Path) -> None:
    logfile = str(datadir.parent / f"{datadir.name}.log")
    run_cmd(
        [str(PG_BIN / "pg_ctl"), "-D", str(datadir), "-l", logfile, "-w", "-t", "900", "start"],
        timeout=960,
        cwd="/",
    )


def restore_role(s: Setup, target: datetime, name: str, port: int) -> dict[str, t.Any]:
    wall_start = time.perf_counter()
    play_s, report = s.playbook(
        str(ROOT / "playbooks" / "pitr_restore.yml"),
        {name: s.clone_vars(name, port)},
        {"target_time": utc_text(target)},
    )
    error = _host_failed(report, name)
    if error:
        raise BenchError(f"role restore {name} failed: {error}")
    wait_writable(s.sock, port)
    tasks = task_durations(report)
    return {
        "wall_s": time.perf_counter() - wall_start,
        "playbook_s": play_s,
        "tasks_s": sum(d for n, d in tasks),
        "tasks": len(tasks),
        "slowest_tasks": sorted(tasks, key=lambda item: -item[1])[:8],
    }


def restore_cp(s: Setup, target: datetime, name: str, port: int) -> dict[str, t.Any]:
    datadir = s.clones / name
    bdir = s.repo / "backups" / s.backup["label"]
    base = sorted(bdir.glob("base.tar*"))
    wal = sorted(bdir.glob("pg_wal.tar*"))
    if not base or not wal:
        raise BenchError(f"no base.tar*/pg_wal.tar* in {bdir}: {sorted(os.listdir(bdir))}")
    started = time.perf_counter()
    datadir.mkdir(mode=0o700)
    chown_postgres(datadir)
    (datadir / "pg_wal").mkdir(mode=0o700)
    chown_postgres(datadir / "pg_wal")
    for tarball, dest in ((base[0], datadir), (wal[0], datadir / "pg_wal")):
        flag = {".zst": ["--zstd"], ".lz4": ["-I", "lz4"], ".gz": ["-z"]}.get(tarball.suffix, [])
        run_cmd(["tar", *flag, "-xf", str(tarball), "-C", str(dest)], timeout=900, cwd="/")
    _auto_conf(
        datadir,
        {
            "port": str(port),
            "archive_mode": "off",
            "restore_command": f"'cp {s.cp_archive}/%f %p'",
            "recovery_target_time": f"'{utc_text(target)}'",
            "recovery_target_action": "'promote'",
        },
    )
    (datadir / "recovery.signal").touch()
    chown_postgres(datadir / "recovery.signal")
    _pg_ctl_start(datadir)
    wait_writable(s.sock, port)
    return {"wall_s": time.perf_counter() - started}


def restore_pgbackrest(s: Setup, target: datetime, name: str, port: int) -> dict[str, t.Any]:
    datadir = s.clones / name
    started = time.perf_counter()
    run_cmd(
        [*s.pgbackrest_argv("restore")[:3], f"--pg1-path={datadir}", "restore", "--type=time",
         f"--target={utc_text(target)}", "--target-action=promote"],
        timeout=1800, cwd="/",
    )  # fmt: skip
    _auto_conf(datadir, {"port": str(port), "archive_mode": "off"})
    _pg_ctl_start(datadir)
    wait_writable(s.sock, port)
    return {"wall_s": time.perf_counter() - started}


RESTORERS: dict[str, t.Callable[[Setup, datetime, str, int], dict[str, t.Any]]] = {
    "role": restore_role,
    "cp": restore_cp,
    "pgbackrest": restore_pgbackrest,
}


def _drop(s: Setup, name: str) -> None:
    path = s.clones / name
    stop_server(path)
    shutil.rmtree(path, ignore_errors=True)
    for extra in s.clones.glob(name + ".*"):
        if extra.is_dir():
            shutil.rmtree(extra, ignore_errors=True)
        else:
            extra.unlink(missing_ok=True)


def noop_play(s: Setup) -> float:
    play = [
        {
            "name": "no-op",
            "hosts": "postgresql",
            "become": True,
            "gather_facts": False,
            "tasks": [{"name": "ping", "ansible.builtin.ping": {}}],
        }
    ]
    wall, report = s.playbook(play, {"noop": {}})
    if _host_failed(report, "noop"):
        raise BenchError(f"no-op play failed: {_host_failed(report, 'noop')}")
    return wall


def settle_cache(cold: bool) -> None:
    """Write the page cache back (not timed), and with ``cold`` also drop it: each restore then
    reads its backup, WAL and programs from disk, as a restore on a host that did not just
    take the backup does."""
    os.sync()
    if cold:
        try:
            Path("/proc/sys/vm/drop_caches").write_text("3\n", encoding="ascii")
        except OSError as exc:
            raise BenchError(
                f"--cold: cannot drop the page cache ({exc}); run the benchmark as root on a"
                " host (not a container) that allows it, or leave --cold out"
            ) from exc


ROLE_MODULES = ("restore_plan", "restore_stage", "restore_recovery")


def floor_play(s: Setup) -> float:
    """The least any playbook that works as this role does can take here: the no-op play's
    start-up plus one call of each module the role calls, each failing on its (missing)
    arguments at once: built, sent, started and imported, doing no work."""
    play = [
        {
            "name": "floor",
            "hosts": "postgresql",
            "become": True,
            "gather_facts": False,
            "tasks": [
                {"name": m, f"pitr.postgresql.{m}": {}, "ignore_errors": True} for m in ROLE_MODULES
            ],
        }
    ]
    wall, report = s.playbook(play, {"floor": {}})
    results = _task_results(report, "floor")
    missing = [r for r in results if "missing required arguments" not in str(r.get("msg", ""))]
    if len(results) != len(ROLE_MODULES) or missing:
        raise BenchError(f"the floor play did not fail on arguments only: {results}")
    return wall


def bench_rto(s: Setup, rounds: int, used: set[int], cold: bool) -> dict[str, t.Any]:
    # a late target: between the last two markers after the backup, so nearly all WAL replays
    last, before = s.after[-1], s.after[-2]
    target = before.commit_time + (last.commit_time - before.commit_time) / 2
    expected = [m.id for m in s.markers if m.commit_time <= target]
    methods = [m for m in METHODS if m != "pgbackrest" or s.with_pgbackrest]
    raw: list[dict[str, t.Any]] = []
    for rnd in range(rounds):
        order = methods[rnd % len(methods) :] + methods[: rnd % len(methods)]
        if rnd % 2:
            order.reverse()
        log(f"RTO round {rnd + 1}/{rounds}: noop, floor, {', '.join(order)}")
        settle_cache(cold)
        raw.append({"method": "noop", "round": rnd, "wall_s": noop_play(s)})
        settle_cache(cold)
        raw.append({"method": "floor", "round": rnd, "wall_s": floor_play(s)})
        for method in order:
            name = f"rto-{method}-{rnd}"
            port = _free_port(used)
            # Nothing another method (or the set-up) left dirty is written back on this one's
            # time: each restore starts from a clean page cache (a cold one with --cold).
            settle_cache(cold)
            res = RESTORERS[method](s, target, name, port)
            ids = marker_ids(s.sock, port)
            res.update(method=method, round=rnd, exact=ids == expected, markers=len(ids))
            res["loadavg"] = os.getloadavg()[0]
            log(f"  {method}: {res['wall_s']:.2f} s, exact={res['exact']}")
            raw.append(res)
            _drop(s, name)
    return {"target": utc_text(target), "expected_markers": len(expected), "raw": raw}


def bench_exactness(s: Setup, count: int, batch: int, seed: int) -> dict[str, t.Any]:
    rng = random.Random(seed)
    gaps = list(zip(s.after[:-1], s.after[1:], strict=True))
    targets = []
    for _n in range(count):
        lo, hi = rng.choice(gaps)
        span = (hi.commit_time - lo.commit_time).total_seconds()
        targets.append(lo.commit_time + timedelta(seconds=rng.uniform(0.0, span)))
    checks: list[dict[str, t.Any]] = []
    started = time.perf_counter()
    used: set[int] = set()
    for first in range(0, len(targets), max(1, batch)):
        chunk = list(enumerate(targets))[first : first + max(1, batch)]
        hosts: dict[str, dict[str, t.Any]] = {}
        for i, target in chunk:
            name = f"exact-{i:02d}"
            port = 57000 + i
            used.add(port)
            hosts[name] = {**s.clone_vars(name, port), "pitr_restore_target_time": utc_text(target)}
        play = [
            {
                "name": "restore",
                "hosts": "postgresql",
                "gather_facts": False,
                "roles": [{"role": "pitr.postgresql.pitr_restore"}],
            }
        ]
        wall, report = s.playbook(play, hosts)
        log(f"exactness: {len(hosts)} clone restores in {wall:.1f} s")
        for i, target in chunk:
            name = f"exact-{i:02d}"
            error = _host_failed(report, name)
            port = 57000 + i
            want = [m.id for m in s.markers if m.commit_time <= target]
            got: list[int] = []
            if error is None:
                wait_writable(s.sock, port, 120)
                got = marker_ids(s.sock, port)
            checks.append(
                {
                    "target": utc_text(target),
                    "error": error,
                    "exact": error is None and got == want,
                    "want_last": want[-1] if want else None,
                    "got_last": got[-1] if got else None,
                    "got_count": len(got),
                    "want_count": len(want),
                    "batch_wall_s": wall,
                }
            )
            _drop(s, name)
    return {
        "checks": checks,
        "exact": sum(1 for c in checks if c["exact"]),
        "total": len(checks),
        "seconds": time.perf_counter() - started,
        "batch": batch,
    }


def _minus(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def run_bench(args: argparse.Namespace) -> dict[str, t.Any]:
    started = time.time()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="pitr-rbench-", dir="/var/tmp"))
    setup: Setup | None = None
    try:
        setup = Setup(workdir, args)
        s = setup
        used = {s.port}
        rto = bench_rto(s, max(1, int(args.rounds)), used, bool(getattr(args, "cold", False)))
        exact = bench_exactness(s, int(args.targets), int(args.batch), int(args.seed))
        info = {
            "backup": {k: s.backup.get(k) for k in ("label", "stop_time", "size_on_disk")},
            "cluster_scale": args.scale,
            "wal_bytes_after_backup": s.wal_bytes,
            "cp_archive_segments": s.cp_segments,
            "markers": len(s.markers),
            "markers_after_backup": len(s.after),
            "pgbackrest": s.with_pgbackrest,
            "page_cache": "dropped before each restore" if getattr(args, "cold", False) else "warm",
        }
    finally:
        if setup is not None:
            setup.teardown(getattr(args, "keep", False))
        else:
            stop_server(workdir / "cluster" / "data")
            if not getattr(args, "keep", False):
                shutil.rmtree(workdir, ignore_errors=True)
    raw = rto["raw"]
    med = {
        m: {
            "wall_s": median_or_none([r["wall_s"] for r in raw if r["method"] == m]),
            "n": sum(1 for r in raw if r["method"] == m),
        }
        for m in ("noop", "floor", *METHODS)
    }
    ratios: dict[str, list[float]] = {}
    for rnd in sorted({r["round"] for r in raw}):
        by = {r["method"]: r["wall_s"] for r in raw if r["round"] == rnd}
        for name, num, den in (
            ("role_vs_cp", by.get("role"), by.get("cp")),
            ("role_vs_pgbackrest", by.get("role"), by.get("pgbackrest")),
            ("pgbackrest_vs_cp", by.get("pgbackrest"), by.get("cp")),
            (
                "role_minus_noop_vs_cp",
                None if by.get("role") is None else by["role"] - by.get("noop", 0.0),
                by.get("cp"),
            ),
            ("floor_vs_cp", by.get("floor"), by.get("cp")),
            ("role_minus_floor_vs_cp", _minus(by.get("role"), by.get("floor")), by.get("cp")),
            (
                "role_minus_floor_vs_pgbackrest",
                _minus(by.get("role"), by.get("floor")),
                by.get("pgbackrest"),
            ),
        ):
            value = ratio(num, den)
            if value is not None:
                ratios.setdefault(name, []).append(value)
    return {
        "benchmark": "restore",
        "args": args_record(args),
        "info": info,
        "loadavg_end": os.getloadavg(),
        "duration_s": time.time() - started,
        "rto": rto,
        "medians": med,
        "ratios": ratio_medians(ratios),
        "exactness": exact,
    }


def run(args: argparse.Namespace) -> dict[str, t.Any]:
    """The registration API for benchmarks/run.py: run and return the results (``args`` may
    be run.py's namespace, see :func:`benchlib.merge_args`)."""
    return run_bench(merge_args(parse_args([]), args))


def render(results: dict[str, t.Any]) -> str:
    info = results["info"]
    med = results["medians"]
    rat = results["ratios"]
    ex = results["exactness"]
    lines = [
        "## Restore (RTO) and PITR exactness",
        "",
        f"pgbench scale {info['cluster_scale']}; backup {info['backup']['label']} taken with the"
        f" module ({(info['backup'].get('size_on_disk') or 0) / 1e6:.0f} MB stored), then"
        f" {info['wal_bytes_after_backup'] / 1e6:.0f} MB of WAL"
        f" ({info['cp_archive_segments']} files in the cp archive),"
        f" {info['markers_after_backup']} markers after the backup. Target:"
        f" {results['rto']['target']} ({results['rto']['expected_markers']} markers)."
        f" Page cache: {info.get('page_cache', 'warm')}."
        f" Took {results['duration_s']:.0f} s; load average at end"
        f" {results['loadavg_end'][0]:.1f}.",
        "",
    ]
    labels = {
        "noop": "Ansible fixed overhead (no-op play, one ping)",
        "floor": "floor: no-op play's start + one call of each of the role's 3 modules, no work",
        "role": "`ansible-playbook pitr_restore.yml` (clone) to writable",
        "cp": "by hand: extract + `cp` restore_command to writable",
        "pgbackrest": "`pgbackrest restore --type=time` + start to writable",
    }
    rows = []
    for m in ("noop", "floor", *METHODS):
        if med.get(m, {}).get("n"):
            exact = [r["exact"] for r in results["rto"]["raw"] if r["method"] == m and "exact" in r]
            shown = f"{sum(exact)}/{len(exact)}" if exact else "-"
            rows.append([labels[m], str(med[m]["n"]), fmt(med[m]["wall_s"]), shown])
    lines += md_table(["what", "n", "wall s (median)", "exact"], rows)

    def r(key: str) -> float | None:
        return rat.get(key, {}).get("median")

    def ok(value: float | None, limit: float) -> str:
        return "-" if value is None else ("yes" if value <= limit else "**no**")

    lines += ["Time ratios (ours / baseline, < 1 is faster), median of per-round ratios:", ""]
    lines += md_table(
        ["ratio", "value", "target", "met"],
        [
            ["role / cp restore", fmt(r("role_vs_cp"), 2, "x"), "<= 1.15x",
             ok(r("role_vs_cp"), 1.15)],
            ["(role - no-op play) / cp restore", fmt(r("role_minus_noop_vs_cp"), 2, "x"),
             "-", "-"],
            ["role / pgbackrest restore", fmt(r("role_vs_pgbackrest"), 2, "x"), "<= 1.0x",
             ok(r("role_vs_pgbackrest"), 1.0)],
            ["pgbackrest / cp restore", fmt(r("pgbackrest_vs_cp"), 2, "x"), "-", "-"],
            ["floor / cp restore (what Ansible alone takes of the 1.15x)",
             fmt(r("floor_vs_cp"), 2, "x"), "-", "-"],
            ["(role - floor) / cp restore: the role's own work",
             fmt(r("role_minus_floor_vs_cp"), 2, "x"), "-", "-"],
            ["(role - floor) / pgbackrest restore",
             fmt(r("role_minus_floor_vs_pgbackrest"), 2, "x"), "-", "-"],
        ],
    )  # fmt: skip
    role_runs = [x for x in results["rto"]["raw"] if x["method"] == "role" and "tasks" in x]
    if role_runs:
        first = role_runs[0]
        lines.append(
            f"Role run 1: {first['tasks']} tasks, {first['tasks_s']:.1f} s inside tasks of"
            f" {first['playbook_s']:.1f} s of ansible-playbook; slowest tasks: "
            + "; ".join(f"{n} {d:.1f} s" for n, d in first["slowest_tasks"][:5])
            + "."
        )
        lines.append("")
    lines.append(
        f"PITR exactness: {ex['exact']} of {ex['total']} random targets exact (role, clone"
        f" restores, {ex['batch']} per ansible-playbook run), {ex['seconds']:.0f} s in all."
    )
    bad = [c for c in ex["checks"] if not c["exact"]]
    for c in bad[:10]:
        lines.append(
            f"- {c['target']}: want {c['want_count']} (last {c['want_last']}), got"
            f" {c['got_count']} (last {c['got_last']}) {c['error'] or ''}"
        )
    return "\n".join(lines) + "\n"


def main(argv: t.Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    out = args.out or RESULTS / time.strftime("restore-%Y%m%dT%H%M%S")
    return bench_main(lambda: run_bench(args), render, out, "restore")


if __name__ == "__main__":
    sys.exit(main())

# Copyright: contributors to pitr.postgresql
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Interrupting a restore at a chosen step, as an operator's Ctrl-C or a lost SSH session does.

``run_and_kill`` starts ``ansible-playbook`` in a session of its own and polls a condition on
observable state (files in and beside the data directory, the server's pid file, what the
server answers), never on task names or on time. The moment the condition holds, the
playbook's whole process group gets SIGKILL. Commands the playbook ran through ``become``
(sudo with ``use_pty``) live in a pty session of their own; they get SIGHUP when sudo dies,
as they would when an SSH connection drops, and ``run_and_kill`` waits until every process
the playbook had started is gone before it returns.

Windows that would otherwise be too short to hit are held open by gates the test controls:

- ``FetchGate``: a ``pitr-wal`` in front of the real one (the role's ``pitr_install_prefix``)
  that, for a data directory with a gate file, holds every WAL segment fetch after a given
  segment until the gate is removed. Recovery then runs, consistent and readable, but cannot
  reach the target.
- ``ShutdownHold``: a backend running ``COPY ... FROM PROGRAM`` with a program that ignores
  SIGTERM: a fast shutdown waits for it, so the server stays in ``stopping`` (its
  postmaster.pid says so) until the hold is released.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import typing as t
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
from ansible_runner import _environment
from psycopg import sql

Condition = t.Callable[[], "dict[str, t.Any] | None"]


def process_tree(root: int) -> set[int]:
    """``root`` and every process descending from it (through /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8", errors="replace") as fh:
                stat = fh.read()
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may hold spaces and parentheses
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found, todo = set(), [root]
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo.extend(children.get(pid, ()))
    return found


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@dataclass
class Interruption:
    """What ``run_and_kill`` saw: the state that triggered the kill (None: never reached)."""

    seen: dict[str, t.Any] | None
    returncode: int | None
    stdout: str
    stderr: str
    stragglers: list[int] = field(default_factory=list)

    def explain(self) -> str:
        return f"rc={self.returncode}; stdout: {self.stdout[-3000:]}\nstderr: {self.stderr[-3000:]}"


def run_and_kill(
    hosts: dict[str, dict[str, t.Any]],
    condition: Condition,
    *,
    playbook: str = "pitr.postgresql.pitr_restore",
    extra_vars: dict[str, t.Any] | None = None,
    timeout: float = 300,
    poll: float = 0.002,
    kill_tree: bool = False,
    grace: float = 10,
    freeze_until: Condition | None = None,
    on_freeze: t.Callable[[], None] | None = None,
) -> Interruption:
    """Run ``playbook`` for ``hosts`` and SIGKILL its process group once ``condition()`` holds.

    ``condition`` returns None while the state is not there yet, or a dict describing what it
    saw. When the playbook ends by itself first, ``seen`` is None (the kill point was missed).
    With ``kill_tree`` every process the playbook started dies at the same moment too (the
    module doing the work, in its sudo session, included), instead of getting SIGHUP from its
    lost pty. Processes still alive ``grace`` seconds after the kill are returned as
    ``stragglers`` (still running: see ``wait_gone``).

    With ``freeze_until``, the playbook and everything it started are stopped (SIGSTOP) when
    ``condition()`` holds, ``on_freeze()`` runs, and the kill comes once ``freeze_until()``
    holds: a state the server reaches by itself (paused at the target) is then met by a
    playbook that has not moved since, whatever its own polling interval.
    """
    workdir = Path(tempfile.mkdtemp(prefix="pitr-kill-play-"))
    try:
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
        argv = [
            str(Path(sys.executable).parent / "ansible-playbook"),
            "-i",
            str(workdir / "inventory.json"),
            playbook,
        ]
        if extra_vars:
            argv += ["-e", json.dumps(extra_vars)]
        env = _environment({"ANSIBLE_FORKS": str(len(hosts)), "ANSIBLE_PIPELINING": "1"})
        out_path, err_path = workdir / "stdout", workdir / "stderr"
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen(
                argv, cwd=workdir, env=env, stdout=out, stderr=err, start_new_session=True
            )
        seen: dict[str, t.Any] | None = None
        tree: set[int] = set()
        frozen = False
        deadline = time.monotonic() + timeout
        try:
            while proc.poll() is None:
                seen = condition()
                if seen is not None and freeze_until is not None:
                    frozen = True
                    tree = process_tree(proc.pid)
                    os.killpg(proc.pid, signal.SIGSTOP)
                    signal_all(tree, signal.SIGSTOP)
                    tree |= process_tree(proc.pid)
                    signal_all(tree, signal.SIGSTOP)
                    if on_freeze is not None:
                        on_freeze()
                    settled = None
                    while settled is None:
                        if time.monotonic() > deadline:
                            raise AssertionError(f"no {freeze_until} within {timeout}s")
                        time.sleep(poll)
                        settled = freeze_until()
                    seen = {**seen, **settled}
                if seen is not None:
                    tree |= process_tree(proc.pid)
                    os.killpg(proc.pid, signal.SIGKILL)
                    if kill_tree or frozen:
                        kill_all(tree)
                        tree |= process_tree(proc.pid)  # children forked meanwhile
                        kill_all(tree)
                    break
                if time.monotonic() > deadline:
                    raise AssertionError(f"the playbook ran for more than {timeout}s")
                time.sleep(poll)
        finally:
            if proc.poll() is None:
                tree |= process_tree(proc.pid)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                if frozen:
                    kill_all(tree)
            proc.wait(timeout=60)
            stragglers = wait_gone(tree - {proc.pid}, grace, kill=False)
        return Interruption(
            seen,
            proc.returncode,
            out_path.read_text(errors="replace"),
            err_path.read_text(errors="replace"),
            stragglers,
        )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def signal_all(pids: t.Iterable[int], signum: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


def kill_all(pids: t.Iterable[int]) -> None:
    signal_all(pids, signal.SIGKILL)


def wait_gone(pids: t.Iterable[int], timeout: float = 60, kill: bool = True) -> list[int]:
    """Wait until ``pids`` (processes the playbook started) have exited.

    Returns those still alive after ``timeout`` seconds; with ``kill`` they get SIGKILL first.
    """
    pids = set(pids)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(alive(p) for p in pids):
            return []
        time.sleep(0.05)
    left = [p for p in pids if alive(p)]
    if kill:
        kill_all(left)
    return left


# --------------------------------------------------------------------------------------------
# Observable state


def pm_status(data_dir: Path) -> str | None:
    """The postmaster's status line in postmaster.pid (starting, stopping, ready, standby)."""
    try:
        lines = (data_dir / "postmaster.pid").read_text().splitlines()
    except OSError:
        return None
    return lines[7].strip() if len(lines) > 7 else ""


def read_state(directory: Path) -> dict[str, t.Any] | None:
    """The role's state file (pitr_restore.json) in ``directory``, if it is whole."""
    try:
        data = json.loads((directory / "pitr_restore.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


class ServerProbe:
    """Asks a server over its socket; None while it does not answer."""

    def __init__(self, sockdir: Path, port: int) -> None:
        self.sockdir, self.port = sockdir, port
        self.conn: psycopg.Connection[t.Any] | None = None

    def query(self, query: str) -> tuple[t.Any, ...] | None:
        try:
            if self.conn is None or self.conn.closed:
                self.conn = psycopg.connect(
                    host=str(self.sockdir),
                    port=self.port,
                    user="postgres",
                    dbname="postgres",
                    autocommit=True,
                    connect_timeout=2,
                )
            row = self.conn.execute(query).fetchone()
            return tuple(row) if row is not None else None
        except psycopg.Error:
            self.close()
            return None

    def close(self) -> None:
        if self.conn is not None:
            with contextlib.suppress(psycopg.Error):
                self.conn.close()
            self.conn = None


def postgres_setting(bindir: str, data_dir: Path, name: str) -> str:
    """What the server at ``data_dir`` would use for ``name`` (``postgres -C``, all includes)."""
    argv = [f"{bindir}/postgres", "-D", str(data_dir), "-C", name]
    if os.geteuid() == 0:
        argv = ["runuser", "-u", "postgres", "--", *argv]
    out = subprocess.run(argv, capture_output=True, text=True, check=True, cwd="/")
    return out.stdout.strip()


# --------------------------------------------------------------------------------------------
# Gates


WRAPPER = """\
import os
import sys
import time

GATES = {gates!r}
REAL = {real!r}
args = sys.argv[1:]
if "fetch" in args:
    name = args[args.index("fetch") + 1]
    gate = os.path.join(GATES, os.path.basename(os.getcwd()))
    try:
        with open(gate, encoding="utf-8") as fh:
            after = fh.read().strip()
    except OSError:
        after = ""
    if after and len(name) == 24 and name > after:
        with open(gate + ".log", "a", encoding="utf-8") as fh:
            fh.write("held " + name + "\\n")
        while os.path.exists(gate):
            time.sleep(0.05)
os.execv(sys.executable, [sys.executable, "-I", "-S", REAL, *args])
"""


class FetchGate:
    """A pitr-wal wrapper install (``prefix``) whose fetches can be held per data directory."""

    def __init__(self, prefix: Path, real_program: str, gates: Path) -> None:
        self.prefix, self.gates = prefix, gates
        (prefix / "bin").mkdir(parents=True, exist_ok=True)
        gates.mkdir(parents=True, exist_ok=True)
        program = prefix / "bin" / "pitr-wal"
        program.write_text(WRAPPER.format(gates=str(gates), real=real_program), encoding="utf-8")
        program.chmod(0o755)
        if os.geteuid() == 0:
            subprocess.run(["chown", "-R", "postgres:postgres", str(gates)], check=True)

    def close(self, data_dir: Path, after_segment: str) -> None:
        """Hold every fetch of a segment after ``after_segment`` for ``data_dir``."""
        gate = self.gates / data_dir.name
        gate.write_text(after_segment + "\n", encoding="utf-8")

    def held(self, data_dir: Path) -> list[str]:
        try:
            text = (self.gates / (data_dir.name + ".log")).read_text(encoding="utf-8")
        except OSError:
            return []
        return [line.split()[1] for line in text.splitlines() if line.startswith("held ")]

    def open(self, data_dir: Path) -> None:
        (self.gates / data_dir.name).unlink(missing_ok=True)


class ShutdownHold:
    """Keeps a server in ``stopping`` after a fast shutdown request until ``release()``."""

    def __init__(self, sockdir: Path, port: int, gate: Path) -> None:
        self.gate = gate
        gate.write_text("hold\n", encoding="utf-8")
        self.started = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._hold, args=(sockdir, port), daemon=True)
        self.thread.start()
        if not self.started.wait(30):
            raise AssertionError("the shutdown hold did not start")

    def _hold(self, sockdir: Path, port: int) -> None:
        program = f"trap '' TERM INT; while [ -e {self.gate} ]; do sleep 0.05; done"
        try:
            with psycopg.connect(
                host=str(sockdir), port=port, user="postgres", dbname="postgres", autocommit=True
            ) as conn:
                conn.execute("CREATE TEMP TABLE hold (x text)")
                self.started.set()
                conn.execute(sql.SQL("COPY hold FROM PROGRAM {}").format(sql.Literal(program)))
        except psycopg.Error:
            pass  # the server ends the session once released
        except BaseException as exc:
            self.error = exc
        finally:
            self.started.set()

    def release(self) -> None:
        self.gate.unlink(missing_ok=True)
        self.thread.join(timeout=60)

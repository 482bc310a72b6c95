# Copyright: contributors to pitr.postgresql
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The one command runner of the collection: argv lists in, rc/stdout/stderr out.

Never a shell: every command is an argv list, so nothing is ever re-parsed or expanded.
Secrets travel in ``env`` (``PGPASSWORD``, ``PGPASSFILE``), never in argv, and ``env`` is never
copied into results or errors. A failed command raises ``CommandError`` whose context carries
``cmd`` (the argv), ``rc`` and ``stderr``; ``check=False`` returns the result instead.

Long commands can report progress: ``on_stderr_line`` is called for every line (split on
``\\n`` and ``\\r``) as it arrives. A timeout kills the whole process group. With
``die_with_parent`` (the default) the child is killed when this process dies, so an
interrupted module never leaves a ``pg_basebackup`` writing into the repository behind the
back of the next run. Standard library only; never imports Ansible.
"""

from __future__ import annotations

import contextlib
import io
import os
import select
import signal
import subprocess
import sys
import threading
import time
import typing as t
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field

from ansible_collections.pitr.postgresql.plugins.module_utils.errors import CommandError

# Deterministic output for the parsers: C messages and UTC times (pg_controldata, pg_waldump).
STABLE_ENV = {"LC_ALL": "C", "LANG": "C", "TZ": "UTC"}
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class CommandResult:
    """What a finished command did."""

    cmd: list[str]
    rc: int
    stdout: str
    stderr: str
    duration: float = 0.0
    timed_out: bool = field(default=False)

    def to_dict(self) -> dict[str, t.Any]:
        return {"cmd": self.cmd, "rc": self.rc, "stdout": self.stdout, "stderr": self.stderr}


def _set_pdeathsig() -> None:  # runs in the child between fork and exec
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except Exception:  # not Linux, or no libc: the child simply does not die with us
        pass


def _preexec(die_with_parent: bool) -> t.Callable[[], None]:
    def prepare() -> None:
        os.setpgrp()
        if die_with_parent:
            _set_pdeathsig()

    return prepare


def command_env(env: t.Mapping[str, str] | None, *, stable: bool = True) -> dict[str, str]:
    """The child's environment: ours, plus C locale and UTC, plus ``env`` (which wins)."""
    merged = dict(os.environ)
    if stable:
        merged.update(STABLE_ENV)
    if env:
        merged.update(env)
    return merged


def as_user(user: str | None, cmd: list[str]) -> tuple[dict[str, t.Any], dict[str, str]]:
    """Popen's identity arguments and the environment for running ``cmd`` as ``user``."""
    if user is None:
        return {}, {}
    import pwd

    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        raise CommandError(f"cannot run {cmd[0]} as {user}: no such user", cmd=cmd) from None
    if os.geteuid() == pw.pw_uid:
        return {}, {}
    if os.geteuid() != 0:
        raise CommandError(
            f"cannot run {cmd[0]} as {user}: this runs as uid {os.geteuid()}; run it as root or"
            f" as {user}",
            cmd=cmd,
        )
    identity = {
        "user": pw.pw_uid,
        "group": pw.pw_gid,
        "extra_groups": os.getgrouplist(pw.pw_name, pw.pw_gid),
    }
    return identity, {"HOME": pw.pw_dir, "USER": pw.pw_name, "LOGNAME": pw.pw_name}


def _split_lines(buffer: str) -> tuple[list[str], str]:
    """Complete lines (ended by \\n or \\r) and the unfinished rest."""
    lines: list[str] = []
    start = 0
    for i, ch in enumerate(buffer):
        if ch in "\r\n":
            if i > start:
                lines.append(buffer[start:i])
            start = i + 1
    return lines, buffer[start:]


def _wait(proc: subprocess.Popen[bytes], timeout: float | None) -> int:
    """``proc.wait(timeout)``, woken by the exit itself (a pidfd) instead of polling, which is
    up to 50 ms late on every command."""
    try:
        fd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):  # not Linux 5.3+: the polling wait
        return proc.wait(timeout=timeout)
    try:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        if not poller.poll(None if timeout is None else max(0, int(timeout * 1000))):
            raise subprocess.TimeoutExpired(proc.args, timeout or 0)
    finally:
        os.close(fd)
    return proc.wait()


def run(
    argv: t.Sequence[str],
    *,
    env: t.Mapping[str, str] | None = None,
    timeout: float | None = None,
    check: bool = True,
    cwd: str | None = None,
    input_data: bytes | None = None,
    on_stderr_line: t.Callable[[str], None] | None = None,
    die_with_parent: bool = True,
    stable_env: bool = True,
    user: str | None = None,
) -> CommandResult:
    """Run ``argv`` and wait for it.

    ``user``: run it as that user (with its groups, ``HOME``, ``USER`` and ``LOGNAME``); needs
    root, unless this process already runs as that user.

    Raises CommandError when the program cannot be started, when it runs longer than
    ``timeout`` seconds (the process group is killed), or, with ``check``, when it exits
    non-zero or dies by a signal (``rc`` is then negative: -9 for SIGKILL).
    """
    cmd = [str(a) for a in argv]
    if not cmd:
        raise CommandError("no command given", cmd=cmd)
    identity, user_env = as_user(user, cmd)
    started = time.monotonic()
    try:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE if input_data is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=command_env({**user_env, **(env or {})}, stable=stable_env),
            cwd=cwd,
            preexec_fn=_preexec(die_with_parent),
            **identity,
        )
    except OSError as exc:
        raise CommandError(
            f"cannot run {cmd[0]}: {exc.strerror or exc}; is it installed and executable?",
            cmd=cmd,
            rc=None,
            stderr="",
        ) from exc

    out_chunks: list[bytes] = []
    err_text: list[str] = []

    def pump_stdout() -> None:
        stream = t.cast(io.BufferedReader, proc.stdout)
        for chunk in iter(lambda: stream.read(65536), b""):
            out_chunks.append(chunk)

    def pump_stderr() -> None:
        stream = t.cast(io.BufferedReader, proc.stderr)
        pending = ""
        while True:
            chunk = stream.read1(65536)
            if not chunk:
                break
            text = chunk.decode("utf-8", errors="replace")
            err_text.append(text)
            if on_stderr_line is not None:
                lines, pending = _split_lines(pending + text)
                for line in lines:
                    # a progress callback must never break the command
                    with contextlib.suppress(Exception):
                        on_stderr_line(line)
        if on_stderr_line is not None and pending.strip():
            with suppress(Exception):
                on_stderr_line(pending)

    threads = [threading.Thread(target=pump_stdout, daemon=True)]
    threads.append(threading.Thread(target=pump_stderr, daemon=True))
    for th in threads:
        th.start()
    if input_data is not None:
        stdin = t.cast(io.BufferedWriter, proc.stdin)
        try:
            stdin.write(input_data)
        except BrokenPipeError:
            pass
        finally:
            stdin.close()
    timed_out = False
    try:
        _wait(proc, timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        _kill_group(proc)
        proc.wait()
    except BaseException:
        # Interrupted ourselves (KeyboardInterrupt, SystemExit): never leave the child behind.
        _kill_group(proc)
        proc.wait()
        raise
    # Whatever a failed program left running in its process group (pg_basebackup's WAL
    # streaming child, when pg_basebackup itself was killed) would keep our pipes open and keep
    # writing: the command is over, so its helpers go too. (A program that succeeded has
    # waited for its helpers.)
    if proc.returncode != 0:
        _kill_group(proc, leader_exited=True)
    for th in threads:
        th.join()
    result = CommandResult(
        cmd,
        proc.returncode,
        b"".join(out_chunks).decode("utf-8", errors="replace"),
        "".join(err_text),
        time.monotonic() - started,
        timed_out,
    )
    if timed_out:
        raise CommandError(
            f"{os.path.basename(cmd[0])} did not finish within {timeout:g} seconds and was killed",
            cmd=cmd,
            rc=result.rc,
            stdout=result.stdout[-4000:],
            stderr=result.stderr[-4000:],
        )
    if check and result.rc != 0:
        raise failure(result)
    return result


def failure(result: CommandResult, what: str = "") -> CommandError:
    """The CommandError for a finished command that failed."""
    name = what or os.path.basename(result.cmd[0])
    if result.rc < 0:
        try:
            sig = signal.Signals(-result.rc).name
        except ValueError:
            sig = f"signal {-result.rc}"
        how = f"was killed by {sig}"
    else:
        how = f"exited {result.rc}"
    last = _last_lines(result.stderr)
    return CommandError(
        f"{name} {how}" + (f": {last}" if last else ""),
        cmd=result.cmd,
        rc=result.rc,
        stdout=result.stdout[-4000:],
        stderr=result.stderr[-4000:],
    )


def _last_lines(text: str, count: int = 3) -> str:
    lines = [ln.strip() for ln in text.replace("\r", "\n").splitlines() if ln.strip()]
    return " / ".join(lines[-count:])


def _kill_group(proc: subprocess.Popen[bytes], leader_exited: bool = False) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        if leader_exited:
            return
        with suppress(ProcessLookupError):
            proc.kill()


@contextmanager
def stream_stdout(
    argv: t.Sequence[str],
    *,
    env: t.Mapping[str, str] | None = None,
    stdin_path: str | None = None,
) -> t.Iterator[t.BinaryIO]:
    """Run ``argv`` and yield its stdout as a binary stream (a decompressor in a pipeline).

    Raises CommandError on leaving the block when the program failed, so a truncated stream
    is never mistaken for a complete one.
    """
    cmd = [str(a) for a in argv]
    stdin: t.Any = subprocess.DEVNULL
    if stdin_path is not None:
        stdin = open(stdin_path, "rb")  # noqa: SIM115 - closed below
    try:
        proc = subprocess.Popen(
            cmd,
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=command_env(env),
            preexec_fn=_preexec(True),
        )
    except OSError as exc:
        raise CommandError(f"cannot run {cmd[0]}: {exc.strerror or exc}", cmd=cmd) from exc
    finally:
        if stdin_path is not None:
            stdin.close()
    err: list[bytes] = []
    th = threading.Thread(target=lambda: err.append(proc.stderr.read()), daemon=True)  # type: ignore[union-attr]
    th.start()
    if proc.stdout is None:  # pragma: no cover - stdout=PIPE always gives one
        raise CommandError(f"no output pipe for {cmd[0]}", cmd=cmd)
    completed = False
    try:
        yield t.cast(t.BinaryIO, proc.stdout)
        completed = True
    finally:
        if not completed:
            _kill_group(proc)
        proc.stdout.close()
        rc = proc.wait()
        th.join()
    if rc != 0:
        raise failure(CommandResult(cmd, rc, "", b"".join(err).decode("utf-8", "replace")))


def python_interpreter() -> str:
    """The interpreter running this code (for re-invoking our own helpers)."""
    return sys.executable or "/usr/bin/python3"

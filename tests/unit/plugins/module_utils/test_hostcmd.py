# Copyright: contributors to pitr.postgresql
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The pitr-wal host command: argument parsing, exit codes, time bounds, command quoting."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
import typing as t
from pathlib import Path

import pytest

from ansible_collections.pitr.postgresql.plugins.module_utils import hostcmd
from ansible_collections.pitr.postgresql.plugins.module_utils.hostcmd import (
    FETCH_FATAL,
    FETCH_NOT_FOUND,
    PUSH_FAILED,
    USAGE_FAILED,
    UsageError,
    parse_args,
)
from ansible_collections.pitr.postgresql.plugins.module_utils.repository import wal_key
from ansible_collections.pitr.postgresql.plugins.module_utils.version import VERSION
from tests.support import wal_samples
from tests.support.hostcmd_install import install_host_command

MiB = 1024 * 1024
SEG2 = "000000010000000000000002"
SEG2_DATA = wal_samples.full_segment(wal_samples.TL1_SEG2_PAGE)


# ---------------------------------------------------------------------------------------------
# parse_args

PARSED = [
    (
        ["--repo", "/srv/pitr", "push", "pg_wal/000000010000000000000001"],
        dict(
            repo="/srv/pitr",
            action="push",
            args=["pg_wal/000000010000000000000001"],
            compress="auto",
            level=None,
            timeout=60.0,
            retries=3,
            retry_delay=1.0,
        ),
    ),
    (
        ["--repo=/srv/pitr", "fetch", "00000002.history", "pg_wal/RECOVERYHISTORY"],
        dict(repo="/srv/pitr", action="fetch", args=["00000002.history", "pg_wal/RECOVERYHISTORY"]),
    ),
    (
        ["push", "pg_wal/x", "--repo", "/r", "--compress", "lz4", "--level", "9"],
        dict(repo="/r", action="push", args=["pg_wal/x"], compress="lz4", level=9),
    ),
    (
        [
            "--repo",
            "/r",
            "--timeout",
            "2.5",
            "--retries",
            "5",
            "--retry-delay=0",
            "fetch",
            "a",
            "b",
        ],
        dict(timeout=2.5, retries=5, retry_delay=0.0, args=["a", "b"]),
    ),
    (
        ["--repo", "/r", "--timeout", "0", "push", "p"],
        dict(timeout=0.0),
    ),
    (
        ["--repo", "/repo with space/it's 100%", "push", "pg_wal/p"],
        dict(repo="/repo with space/it's 100%"),
    ),
    (
        ["--repo", "/r", "init", "--pgdata", "/var/lib/postgresql/15/main"],
        dict(action="init", args=[], pgdata="/var/lib/postgresql/15/main"),
    ),
    (
        [
            "--repo",
            "/r",
            "init",
            "--system-identifier",
            "7712112317818168995",
            "--pg-major",
            "15",
            "--segment-size",
            "1048576",
        ],
        dict(system_identifier=7712112317818168995, pg_major=15, segment_size=1048576),
    ),
    (["version"], dict(action="version", repo="")),
    (["--repo", "/r", "push", "/data=x/pg_wal/p"], dict(args=["/data=x/pg_wal/p"])),
    (["--repo", "/r", "fetch", "a", "b"], dict(prefetch=0, spool="")),
    (
        ["--repo", "/r", "--prefetch", "8", "--spool=/s p", "fetch", "a", "b"],
        dict(prefetch=8, spool="/s p", args=["a", "b"]),
    ),
    (["--repo", "/r", "fetch", "a", "b", "--prefetch=64"], dict(prefetch=64)),
]


@pytest.mark.parametrize(("argv", "expected"), PARSED)
def test_parse_args(argv: list[str], expected: dict[str, t.Any]) -> None:
    opts = parse_args(argv)
    assert {k: getattr(opts, k) for k in expected} == expected


BAD_ARGS = [
    ([], "no action given"),
    (["--repo", "/r"], "no action given"),
    (["--repo", "/r", "archive", "x"], "unknown action 'archive'"),
    (["--repo", "/r", "push"], r"push takes 1 argument\(s\)"),
    (["--repo", "/r", "push", "a", "b"], r"push takes 1 argument\(s\)"),
    (["--repo", "/r", "fetch", "a"], r"fetch takes 2 argument\(s\)"),
    (["--repo", "/r", "fetch", "a", "b", "c"], r"fetch takes 2 argument\(s\)"),
    (["push", "x"], "--repo is required"),
    (["--repo", "", "push", "x"], "--repo is required"),
    (["--repo"], "--repo needs a value"),
    (["--repo", "/r", "push", "x", "--timeout"], "--timeout needs a value"),
    (["--repo", "/r", "--timeout", "soon", "push", "x"], "--timeout: 'soon' is not a valid value"),
    (["--repo", "/r", "--level", "1.5", "push", "x"], "--level: '1.5' is not a valid value"),
    (["--repo", "/r", "--timeout", "-1", "push", "x"], "must be >= 0"),
    (["--repo", "/r", "--retries", "0", "fetch", "a", "b"], "--retries >= 1"),
    (["--repo", "/r", "--retry-delay", "-0.5", "fetch", "a", "b"], "must be >= 0"),
    (["--repo", "/r", "--verbose", "push", "x"], "unknown option --verbose"),
    (["--repo", "/r", "--prefetch", "-1", "fetch", "a", "b"], "--prefetch must be between 0"),
    (["--repo", "/r", "--prefetch", "65", "fetch", "a", "b"], "--prefetch must be between 0"),
    (["--repo", "/r", "--prefetch", "many", "fetch", "a", "b"], "--prefetch: 'many' is not"),
    (["--repo", "/r", "--spool", "fetch", "a", "b"], "unknown action 'a'"),
    (["--repo", "/r", "--help"], ""),
    (["-h"], ""),
]


@pytest.mark.parametrize(("argv", "message"), BAD_ARGS)
def test_parse_args_errors(argv: list[str], message: str) -> None:
    with pytest.raises(UsageError) as exc:
        parse_args(argv)
    if message:
        assert re.search(message, str(exc.value)), str(exc.value)
    else:
        assert str(exc.value) == ""


# ---------------------------------------------------------------------------------------------
# command_for: what PostgreSQL and /bin/sh make of the string


def pg15_expand(command: str, path: str, fname: str) -> str:
    """archive_command/restore_command expansion as PostgreSQL 15 does it (shell_archive.c):
    %p, %f, %% are replaced; any other % is copied as it is."""
    out, i = [], 0
    while i < len(command):
        c = command[i]
        nxt = command[i + 1] if i + 1 < len(command) else ""
        if c == "%" and nxt in ("p", "f", "%"):
            out.append({"p": path, "f": fname, "%": "%"}[nxt])
            i += 2
            continue
        out.append(c)
        i += 1
    return "".join(out)


def pg16_expand(command: str, path: str, fname: str) -> str:
    """PostgreSQL 16+ (percentrepl.c): an unknown %x is an error."""
    for m in re.finditer(r"%(.?)", command.replace("%%", "")):
        if m.group(1) not in ("p", "f"):
            raise ValueError(f"invalid value for parameter: %{m.group(1)}")
    return pg15_expand(command, path, fname)


WEIRD = "dir with space, 'single' \"double\" 100% $HOME `id` \\back;semi|pipe*glob"

ECHO_ARGV = """#!/usr/bin/python3
import json, sys
print(json.dumps(sys.argv))
"""


@pytest.fixture
def weird_program(tmp_path: Path) -> str:
    d = tmp_path / WEIRD / "bin"
    d.mkdir(parents=True)
    program = d / "pitr-wal"
    program.write_text(ECHO_ARGV)
    program.chmod(0o755)
    return str(program)


@pytest.mark.parametrize("expand", [pg15_expand, pg16_expand])
def test_archive_command_survives_postgresql_and_the_shell(
    weird_program: str, tmp_path: Path, expand: t.Callable[[str, str, str], str]
) -> None:
    repo = str(tmp_path / WEIRD / "repo %p %f %%")
    cmd = hostcmd.archive_command_for(program=weird_program, repo=repo, compress="zstd", timeout=30)
    expanded = expand(cmd, "pg_wal/000000010000000000000001", "000000010000000000000001")
    out = subprocess.run(["/bin/sh", "-c", expanded], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == [
        weird_program,
        "--repo",
        repo,
        "--compress",
        "zstd",
        "--timeout",
        "30",
        "push",
        "pg_wal/000000010000000000000001",
    ]


@pytest.mark.parametrize("expand", [pg15_expand, pg16_expand])
def test_restore_command_survives_postgresql_and_the_shell(
    weird_program: str, tmp_path: Path, expand: t.Callable[[str, str, str], str]
) -> None:
    repo = str(tmp_path / WEIRD / "repo")
    cmd = hostcmd.restore_command_for(
        program=weird_program, repo=repo, compress="zstd", timeout=2.5
    )
    expanded = expand(cmd, "pg_wal/RECOVERYXLOG", "000000010000000000000001")
    out = subprocess.run(["/bin/sh", "-c", expanded], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == [
        weird_program,
        "--repo",
        repo,
        "--timeout",
        "2.5",
        "fetch",
        "000000010000000000000001",
        "pg_wal/RECOVERYXLOG",
    ]


def test_command_for_plain_paths_is_readable() -> None:
    assert hostcmd.archive_command_for(
        program="/usr/local/lib/pitr/bin/pitr-wal", repo="/srv/pitr"
    ) == ("/usr/bin/python3 -I -S /usr/local/lib/pitr/bin/pitr-wal --repo /srv/pitr push %p")
    assert hostcmd.restore_command_for(program="/opt/p/pitr-wal", repo="/srv/pitr", timeout=60) == (
        "/usr/bin/python3 -I -S /opt/p/pitr-wal --repo /srv/pitr --timeout 60 fetch %f %p"
    )


def test_command_for_prefetch() -> None:
    base = "/usr/bin/python3 -I -S /opt/p/pitr-wal --repo /srv/pitr"
    fetch = hostcmd.restore_command_for(program="/opt/p/pitr-wal", repo="/srv/pitr", prefetch=4)
    assert fetch == f"{base} --prefetch 4 fetch %f %p"
    both = hostcmd.restore_command_for(
        program="/opt/p/pitr-wal", repo="/srv/pitr", timeout=60, prefetch=8
    )
    assert both == f"{base} --timeout 60 --prefetch 8 fetch %f %p"
    for off in (None, 0):  # off: today's command, exactly
        assert hostcmd.restore_command_for(
            program="/opt/p/pitr-wal", repo="/srv/pitr", prefetch=off
        ) == (f"{base} fetch %f %p")
    # push has nothing to prefetch
    push = hostcmd.archive_command_for(program="/opt/p/pitr-wal", repo="/srv/pitr", prefetch=4)
    assert push == f"{base} push %p"
    with pytest.raises(ValueError, match="prefetch must be between 0"):
        hostcmd.restore_command_for(program="/opt/p/pitr-wal", repo="/srv/pitr", prefetch=65)


def test_restore_command_with_prefetch_survives_postgresql_and_the_shell(
    weird_program: str, tmp_path: Path
) -> None:
    command = hostcmd.restore_command_for(program=weird_program, repo="/r 100%", prefetch=3)
    expanded = pg15_expand(command, "pg_wal/RECOVERYXLOG", "000000010000000000000002")
    argv = json.loads(
        subprocess.run(["/bin/sh", "-c", expanded], capture_output=True, text=True, check=True)
        .stdout.strip()
        .splitlines()[-1]
    )
    assert argv[-6:] == [
        "/r 100%",
        "--prefetch",
        "3",
        "fetch",
        "000000010000000000000002",
        "pg_wal/RECOVERYXLOG",
    ]


def test_command_for_uses_the_given_interpreter() -> None:
    cmd = hostcmd.archive_command_for(
        program="/p/pitr-wal", repo="/r", python="/opt/py 3/bin/python3"
    )
    assert cmd.startswith("'/opt/py 3/bin/python3' -I -S ")


@pytest.mark.parametrize(
    ("python", "program"), [("python3", "/p/pitr-wal"), ("/usr/bin/python3", "bin/pitr-wal")]
)
def test_command_for_demands_absolute_paths(python: str, program: str) -> None:
    # A version-manager shim found through PATH costs ~80 ms per segment (and may vanish).
    with pytest.raises(ValueError, match="absolute paths"):
        hostcmd.archive_command_for(program=program, repo="/r", python=python)


# ---------------------------------------------------------------------------------------------
# run_bounded


def test_run_bounded_passes_the_exit_code() -> None:
    assert hostcmd.run_bounded(lambda: 7, 5.0, 99, "x") == 7
    assert hostcmd.run_bounded(lambda: 0, 5.0, 99, "x") == 0


def test_run_bounded_without_timeout_runs_inline() -> None:
    pid = os.getpid()
    assert hostcmd.run_bounded(lambda: 0 if os.getpid() == pid else 9, 0, 99, "x") == 0


def test_run_bounded_gives_up_on_a_hung_action(capfd: pytest.CaptureFixture[str]) -> None:
    started = time.monotonic()
    code = hostcmd.run_bounded(lambda: time.sleep(30) or 0, 0.5, 42, "push X")
    elapsed = time.monotonic() - started
    assert code == 42
    assert 0.4 < elapsed < 3.0
    assert "push X FAILED: no answer from the repository within 0.5 s" in capfd.readouterr().err
    _reap()


def test_run_bounded_child_exception_is_the_fail_code(capfd: pytest.CaptureFixture[str]) -> None:
    def boom() -> int:
        raise RuntimeError("kaboom")

    assert hostcmd.run_bounded(boom, 5.0, 42, "push X") == 42
    assert "push X FAILED: unexpected RuntimeError: kaboom" in capfd.readouterr().err


def test_run_bounded_child_killed_by_a_signal_is_the_fail_code() -> None:
    # PostgreSQL must see an exit status, never "died by signal" (that aborts the archiver).
    def die() -> int:
        os.kill(os.getpid(), signal.SIGKILL)
        return 0

    assert hostcmd.run_bounded(die, 5.0, 42, "push X") == 42


def test_run_bounded_restores_the_alarm_handler() -> None:
    before = signal.getsignal(signal.SIGALRM)
    hostcmd.run_bounded(lambda: 0, 5.0, 1, "x")
    assert signal.getsignal(signal.SIGALRM) is before
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


def test_run_bounded_in_process_gives_up_on_a_hung_action(
    capfd: pytest.CaptureFixture[str],
) -> None:
    pid = os.getpid()
    ran_here: list[bool] = []

    def hang() -> int:
        ran_here.append(os.getpid() == pid)
        time.sleep(30)
        return 0

    started = time.monotonic()
    code = hostcmd.run_bounded(hang, 0.5, 42, "fetch X", isolate=False)
    elapsed = time.monotonic() - started
    assert code == 42 and ran_here == [True]
    assert 0.4 < elapsed < 3.0
    assert "fetch X FAILED: no answer from the repository within 0.5 s" in capfd.readouterr().err
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


def test_run_bounded_in_process_timeout_is_not_swallowed_by_except_exception() -> None:
    # The alarm must end the action even when the code under it catches Exception broadly.
    def hang_catching_everything() -> int:
        try:
            time.sleep(30)
        except Exception:
            return 0
        return 0

    assert hostcmd.run_bounded(hang_catching_everything, 0.3, 42, "x", isolate=False) == 42


def test_run_bounded_in_process_exception_is_the_fail_code(
    capfd: pytest.CaptureFixture[str],
) -> None:
    def boom() -> int:
        raise RuntimeError("kaboom")

    assert hostcmd.run_bounded(boom, 5.0, 42, "push X", isolate=False) == 42
    assert "push X FAILED: unexpected RuntimeError: kaboom" in capfd.readouterr().err


MOUNTS = """\
/dev/vda / ext4 rw,relatime 0 0
tmpfs /tmp tmpfs rw 0 0
server:/export /srv/pitr nfs4 rw,hard 0 0
sshfs#host: /mnt/fuse fuse.sshfs rw 0 0
/dev/vdb /srv/pitr/local ext4 rw 0 0
/dev/vdc /mnt/with\\040space xfs rw 0 0
"""


@pytest.mark.parametrize(
    ("path", "hangs"),
    [
        ("/var/lib/pitr", False),  # ext4 root
        ("/tmp/repo", False),
        ("/srv/pitr", True),  # the NFS mount itself
        ("/srv/pitr/repo", True),
        ("/srv/pitr/local/repo", False),  # a local disk mounted below the NFS mount
        ("/srv/pitrx", False),  # a sibling name is not inside /srv/pitr
        ("/mnt/fuse/repo", True),
        ("/mnt/with space/repo", False),
    ],
)
def test_may_hang_by_file_system_type(path: str, hangs: bool) -> None:
    assert hostcmd.may_hang(path, MOUNTS) is hangs


def test_may_hang_when_nothing_is_known() -> None:
    assert hostcmd.may_hang("/srv/repo", "") is True  # no mount table: isolate, to be safe


def _reap() -> None:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            pid, _unused = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            time.sleep(0.05)


# ---------------------------------------------------------------------------------------------
# main(): the exit codes PostgreSQL sees


@pytest.fixture
def bare_env(tmp_path: Path) -> dict[str, str]:
    """An empty repository directory (never initialised, or an unmounted mount point), a
    data directory of cluster A with a real segment in its pg_wal."""
    repo = tmp_path / "repo"
    repo.mkdir()
    pgdata = tmp_path / "data"
    (pgdata / "global").mkdir(parents=True)
    (pgdata / "global" / "pg_control").write_bytes(wal_samples.PG_CONTROL_HEAD)
    (pgdata / "PG_VERSION").write_text("15\n")
    (pgdata / "pg_wal").mkdir()
    seg = pgdata / "pg_wal" / SEG2
    seg.write_bytes(SEG2_DATA)
    return {"repo": str(repo), "pgdata": str(pgdata), "seg": str(seg), "tmp": str(tmp_path)}


@pytest.fixture
def env(bare_env: dict[str, str], capfd: pytest.CaptureFixture[str]) -> dict[str, str]:
    """``bare_env`` with the repository initialised as the archiving role does it."""
    assert hostcmd.main(["--repo", bare_env["repo"], "init", "--pgdata", bare_env["pgdata"]]) == 0
    assert "init: repository initialised" in capfd.readouterr().err
    assert os.listdir(bare_env["repo"]) == ["pitr-repository.json"]
    return bare_env


def run_main(env: dict[str, str], *args: str, timeout: str = "0") -> int:
    return hostcmd.main(
        ["--repo", env["repo"], "--timeout", timeout, "--pgdata", env["pgdata"], *args]
    )


def test_push_then_fetch(env: dict[str, str], capfd: pytest.CaptureFixture[str]) -> None:
    assert run_main(env, "push", env["seg"]) == 0
    err = capfd.readouterr().err
    assert re.search(rf"pitr-wal: push {SEG2}: archived, 16.0 MiB stored as \w+ .* in \d+ ms", err)
    dest = os.path.join(env["tmp"], "RECOVERYXLOG")
    assert run_main(env, "fetch", SEG2, dest) == 0
    assert Path(dest).read_bytes() == SEG2_DATA
    assert f"fetch {SEG2}: restored 16.0 MiB" in capfd.readouterr().err


@pytest.mark.parametrize("timeout", ["0", "30"])  # in the process itself, in a forked child
@pytest.mark.parametrize("what", [SEG2, wal_samples.HISTORY_NAME])
def test_push_into_an_uninitialised_repository_exits_1_and_stores_nothing(
    bare_env: dict[str, str],
    capfd: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    what: str,
    timeout: str,
) -> None:
    # An unmounted repository is an empty directory: push must not make it a repository.
    path = Path(bare_env["pgdata"], "pg_wal", what)
    if what == wal_samples.HISTORY_NAME:
        path.write_bytes(wal_samples.HISTORY_FILE)
    monkeypatch.chdir(bare_env["pgdata"])  # as archive_command runs
    code = run_main(bare_env, "push", f"pg_wal/{what}", timeout=timeout)
    assert code == PUSH_FAILED
    assert 1 <= code <= 125
    err = capfd.readouterr().err
    assert f"pitr-wal: push {what} FAILED: repository {bare_env['repo']} is not initialised" in err
    assert "check that it is mounted" in err
    assert "`pitr-wal --repo PATH init --pgdata DATADIR`" in err
    assert os.listdir(bare_env["repo"]) == []


def test_push_through_the_forked_child(env: dict[str, str]) -> None:
    assert run_main(env, "push", env["seg"], timeout="30") == 0
    assert os.path.isfile(os.path.join(env["repo"], *wal_key(SEG2).split("/")))


def test_push_identical_duplicate_exits_0(
    env: dict[str, str], capfd: pytest.CaptureFixture[str]
) -> None:
    assert run_main(env, "push", env["seg"]) == 0
    assert run_main(env, "push", env["seg"]) == 0
    assert f"push {SEG2}: already archived" in capfd.readouterr().err


def _push_failure_cases(env: dict[str, str]) -> dict[str, tuple[list[str], str]]:
    other = Path(env["tmp"]) / "other"
    other.mkdir()
    (other / SEG2).write_bytes(SEG2_DATA[:-1] + b"\x01")
    (other / "RECOVERYXLOG").write_bytes(SEG2_DATA)
    foreign = other / "00000001000000000000000A"
    foreign.write_bytes(wal_samples.full_segment(wal_samples.SEG1M_0A_PAGE, MiB))
    return {
        "differing duplicate": (["push", str(other / SEG2)], "different content"),
        "foreign cluster": (["push", str(foreign)], "belongs to another cluster"),
        "not a WAL name": (["push", str(other / "RECOVERYXLOG")], "is not a WAL file name"),
        "missing file": (["push", str(other / "000000010000000000000009")], "cannot read"),
        "unknown codec": (["--compress", "brotli", "push", env["seg"]], "unknown compression"),
    }


@pytest.mark.parametrize(
    "case",
    ["differing duplicate", "foreign cluster", "not a WAL name", "missing file", "unknown codec"],
)
def test_push_failures_exit_between_1_and_125(
    env: dict[str, str], capfd: pytest.CaptureFixture[str], case: str
) -> None:
    if case != "unknown codec":  # (that one needs a segment not archived yet)
        assert run_main(env, "push", env["seg"]) == 0
    argv, message = _push_failure_cases(env)[case]
    capfd.readouterr()
    code = run_main(env, *argv)
    assert code == PUSH_FAILED
    assert 1 <= code <= 125
    err = capfd.readouterr().err
    assert "FAILED" in err and message in err, err


def test_push_to_a_missing_repository_exits_1(env: dict[str, str]) -> None:
    env = dict(env, repo=os.path.join(env["tmp"], "not-mounted"))
    assert run_main(env, "push", env["seg"]) == PUSH_FAILED
    assert not os.path.exists(env["repo"])


def test_push_hung_past_timeout_exits_1(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    from ansible_collections.pitr.postgresql.plugins.module_utils import archive

    monkeypatch.setattr(archive, "push", lambda *a, **k: time.sleep(30))
    started = time.monotonic()
    assert run_main(env, "push", env["seg"], timeout="0.5") == PUSH_FAILED
    assert time.monotonic() - started < 3
    assert "no answer from the repository within 0.5 s" in capfd.readouterr().err
    _reap()


def test_fetch_missing_exits_1_and_writes_nothing(env: dict[str, str]) -> None:
    assert run_main(env, "push", env["seg"]) == 0
    dest = Path(env["tmp"]) / "out" / "RECOVERYXLOG"
    dest.parent.mkdir()
    assert run_main(env, "fetch", "000000010000000000000003", str(dest)) == FETCH_NOT_FOUND
    assert run_main(env, "fetch", "00000002.history", str(dest)) == FETCH_NOT_FOUND
    assert list(dest.parent.iterdir()) == []


def test_fetch_corrupt_exits_255_after_retries_and_writes_nothing(
    env: dict[str, str], capfd: pytest.CaptureFixture[str]
) -> None:
    assert run_main(env, "push", env["seg"]) == 0
    stored = Path(env["repo"], *wal_key(SEG2).split("/"))
    blob = bytearray(stored.read_bytes())
    blob[-100] ^= 0xFF
    stored.write_bytes(bytes(blob))
    dest = Path(env["tmp"]) / "out" / "RECOVERYXLOG"
    dest.parent.mkdir()
    capfd.readouterr()
    code = run_main(env, "--retries", "3", "--retry-delay", "0", "fetch", SEG2, str(dest))
    assert code == FETCH_FATAL
    assert code > 125
    err = capfd.readouterr().err
    assert err.count("retrying") == 2
    assert f"fetch {SEG2}: attempt 1 of 3 failed; retrying" in err
    assert f"fetch {SEG2}: attempt 2 of 3 failed; retrying" in err
    assert err.count(f"fetch {SEG2}: {wal_key(SEG2)}: ") == 3  # the reason, each attempt
    assert f"fetch {SEG2} FAILED after 3 attempt(s)" in err
    assert list(dest.parent.iterdir()) == []


@pytest.mark.parametrize("where", ["missing root", "empty root (unmounted mount point)"])
def test_fetch_from_an_unreachable_repository_exits_255(env: dict[str, str], where: str) -> None:
    root = Path(env["tmp"]) / "mnt"
    if where.startswith("empty"):
        root.mkdir()
    env = dict(env, repo=str(root))
    dest = Path(env["tmp"]) / "out" / "RECOVERYXLOG"
    dest.parent.mkdir()
    assert run_main(env, "--retry-delay", "0", "fetch", SEG2, str(dest)) == FETCH_FATAL
    assert list(dest.parent.iterdir()) == []


def test_fetch_hung_past_timeout_exits_255(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from ansible_collections.pitr.postgresql.plugins.module_utils import archive

    monkeypatch.setattr(archive, "fetch", lambda *a, **k: time.sleep(30))
    started = time.monotonic()
    code = run_main(
        env, "--retries", "1", "--retry-delay", "0", "fetch", SEG2, "/nonexistent", timeout="0.5"
    )
    assert code == FETCH_FATAL
    assert time.monotonic() - started < 3
    _reap()


def test_fetch_bounds_each_attempt_by_the_timeout(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    # --timeout bounds one attempt, not all of them: every hung attempt is given up after
    # 0.5 s and the next one gets its own 0.5 s.
    from ansible_collections.pitr.postgresql.plugins.module_utils import archive

    monkeypatch.setattr(archive, "fetch", lambda *a, **k: time.sleep(30))
    dest = Path(env["tmp"], "RECOVERYXLOG")
    started = time.monotonic()
    code = run_main(
        env, "--retries", "3", "--retry-delay", "0.2", "fetch", SEG2, str(dest), timeout="0.5"
    )
    elapsed = time.monotonic() - started
    assert code == FETCH_FATAL
    err = capfd.readouterr().err
    assert err.count(f"fetch {SEG2} FAILED: no answer from the repository within 0.5 s") == 3
    assert err.count("retrying") == 2
    assert f"fetch {SEG2} FAILED after 3 attempt(s)" in err
    # three attempts of 0.5 s and two pauses of 0.2 s; at most retries x (timeout + delay)
    assert 3 * 0.5 + 2 * 0.2 - 0.05 <= elapsed <= 3 * (0.5 + 0.2) + 1.5, elapsed
    assert not dest.exists()
    _reap()


def test_fetch_attempt_after_a_hung_one_can_succeed(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    from ansible_collections.pitr.postgresql.plugins.module_utils import archive

    assert run_main(env, "push", env["seg"]) == 0
    real_fetch = archive.fetch
    hung_once = Path(env["tmp"], "hung-once")

    def hang_the_first_time(*args: t.Any, **kwargs: t.Any) -> t.Any:
        if not hung_once.exists():  # each attempt is its own child: remember it on disk
            hung_once.touch()
            time.sleep(30)
        return real_fetch(*args, **kwargs)

    monkeypatch.setattr(archive, "fetch", hang_the_first_time)
    dest = Path(env["tmp"], "RECOVERYXLOG")
    capfd.readouterr()
    started = time.monotonic()
    code = run_main(
        env, "--retries", "3", "--retry-delay", "0.1", "fetch", SEG2, str(dest), timeout="0.5"
    )
    elapsed = time.monotonic() - started
    assert code == 0
    assert dest.read_bytes() == SEG2_DATA
    err = capfd.readouterr().err
    assert err.count("no answer from the repository within 0.5 s") == 1
    assert f"fetch {SEG2}: attempt 1 of 3 failed; retrying" in err
    assert f"fetch {SEG2}: restored 16.0 MiB" in err
    assert "attempt 2 of 3" not in err
    assert 0.5 <= elapsed < 0.5 + 0.1 + 3, elapsed
    _reap()


@pytest.mark.parametrize(
    ("argv", "code"),
    [
        (["push"], USAGE_FAILED),
        (["--repo", "/r", "push", "a", "b"], USAGE_FAILED),
        (["--repo", "/r", "--bogus", "push", "a"], USAGE_FAILED),
        (["--repo", "/r", "fetch", "a"], FETCH_FATAL),  # a broken restore_command is not "absent"
        (["fetch", "a", "b"], FETCH_FATAL),
        (["--repo", "/r", "--timeout", "x", "fetch", "a", "b"], FETCH_FATAL),
    ],
)
def test_usage_errors(argv: list[str], code: int, capfd: pytest.CaptureFixture[str]) -> None:
    assert hostcmd.main(argv) == code
    assert "usage: pitr-wal --repo PATH" in capfd.readouterr().err


def test_version(capfd: pytest.CaptureFixture[str]) -> None:
    assert hostcmd.main(["version"]) == 0
    assert capfd.readouterr().out.strip() == VERSION


def test_init_from_a_data_directory(
    bare_env: dict[str, str], capfd: pytest.CaptureFixture[str]
) -> None:
    env = bare_env
    assert hostcmd.main(["--repo", env["repo"], "init", "--pgdata", env["pgdata"]]) == 0
    assert (
        f"initialised system identifier {wal_samples.SYSID_A}, PostgreSQL 15"
        in capfd.readouterr().err
    )
    assert hostcmd.main(["--repo", env["repo"], "init", "--pgdata", env["pgdata"]]) == 0
    assert "already belongs to" in capfd.readouterr().err
    ident = json.loads(Path(env["repo"], "pitr-repository.json").read_text())
    assert (ident["system_identifier"], ident["pg_major"], ident["wal_segment_size"]) == (
        wal_samples.SYSID_A,
        15,
        16 * MiB,
    )


def test_init_of_another_cluster_fails(
    env: dict[str, str], capfd: pytest.CaptureFixture[str]
) -> None:
    assert hostcmd.main(["--repo", env["repo"], "init", "--pgdata", env["pgdata"]]) == 0
    code = hostcmd.main(
        [
            "--repo",
            env["repo"],
            "init",
            "--system-identifier",
            str(wal_samples.SYSID_B),
            "--pg-major",
            "15",
        ]
    )
    assert code == PUSH_FAILED
    assert "belongs to another cluster" in capfd.readouterr().err


def test_init_needs_an_identity(bare_env: dict[str, str]) -> None:
    env = bare_env
    assert hostcmd.main(["--repo", env["repo"], "init"]) == USAGE_FAILED
    assert hostcmd.main(["--repo", env["repo"], "init", "--pgdata", env["tmp"]]) == PUSH_FAILED
    assert not Path(env["repo"], "pitr-repository.json").exists()


def test_push_of_a_history_file_takes_identity_from_cwd(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # archive_command runs in the data directory: without --pgdata, cwd says who pushes.
    hist = Path(env["pgdata"], "pg_wal", wal_samples.HISTORY_NAME)
    hist.write_bytes(wal_samples.HISTORY_FILE)
    monkeypatch.chdir(env["pgdata"])
    assert (
        hostcmd.main(["--repo", env["repo"], "--timeout", "0", "push", f"pg_wal/{hist.name}"]) == 0
    )
    (Path(env["pgdata"]) / "global" / "pg_control").write_bytes(
        wal_samples.SYSID_B.to_bytes(8, "little") + bytes(8)
    )
    other = Path(env["pgdata"], "pg_wal", "00000003.history")
    other.write_bytes(b"1\t0/3000000\tno recovery target specified\n")
    code = hostcmd.main(["--repo", env["repo"], "--timeout", "0", "push", f"pg_wal/{other.name}"])
    assert code == PUSH_FAILED
    assert not Path(env["repo"], *wal_key(other.name).split("/")).exists()


# ---------------------------------------------------------------------------------------------
# the installed program, as PostgreSQL runs it


@pytest.fixture(scope="module")
def program(tmp_path_factory: pytest.TempPathFactory) -> str:
    return install_host_command(tmp_path_factory.mktemp("prefix"))


def run_program(
    program: str, *args: str, cwd: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["/usr/bin/python3", "-I", "-S", program, *args],
        capture_output=True,
        text=True,
        check=False,
        cwd=cwd,
        timeout=60,
    )


def test_installed_program_version(program: str) -> None:
    out = run_program(program, "version")
    assert (out.returncode, out.stdout.strip()) == (0, VERSION)


def test_installed_program_push_and_fetch(program: str, bare_env: dict[str, str]) -> None:
    env = bare_env
    out = run_program(program, "--repo", env["repo"], "push", f"pg_wal/{SEG2}", cwd=env["pgdata"])
    assert out.returncode == PUSH_FAILED, out.stderr
    assert "is not initialised" in out.stderr
    assert os.listdir(env["repo"]) == []
    out = run_program(program, "--repo", env["repo"], "init", "--pgdata", env["pgdata"])
    assert out.returncode == 0, out.stderr
    assert f"init: repository initialised system identifier {wal_samples.SYSID_A}" in out.stderr
    out = run_program(program, "--repo", env["repo"], "push", f"pg_wal/{SEG2}", cwd=env["pgdata"])
    assert out.returncode == 0, out.stderr
    assert re.search(r"stored as (zstd|lz4|none)", out.stderr)
    dest = os.path.join(env["tmp"], "RECOVERYXLOG")
    out = run_program(program, "--repo", env["repo"], "fetch", SEG2, dest)
    assert out.returncode == 0, out.stderr
    assert Path(dest).read_bytes() == SEG2_DATA
    out = run_program(
        program, "--repo", env["repo"], "fetch", "000000010000000000000003", dest + "2"
    )
    assert out.returncode == FETCH_NOT_FOUND
    assert not os.path.exists(dest + "2")


def test_installed_program_imports_little(program: str) -> None:
    # One interpreter per segment: the program must not pull in Ansible or heavy modules.
    probe = (
        "import sys, runpy; sys.argv = [sys.argv[1], 'version'];"
        "\ntry:\n runpy.run_path(sys.argv[0], run_name='__main__')\nexcept SystemExit: pass\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in"
        " ('ansible', 'json', 'subprocess', 'argparse', 'hashlib')))"
    )
    out = subprocess.run(
        ["/usr/bin/python3", "-I", "-S", "-c", probe, program],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout
    assert "ansible." not in out.stdout


# typing, what it pulls in (none of that is on the push path either), and importlib.machinery
# with warnings (compression loads zstandard's C backend without them).
HEAVY_FOR_A_PUSH = (
    "typing",
    "re",
    "enum",
    "collections",
    "functools",
    "contextlib",
    "importlib.machinery",
    "warnings",
)


def test_installed_program_pushes_without_typing(program: str, env: dict[str, str]) -> None:
    # A whole push through the installed launcher, as PostgreSQL runs it (/usr/bin/python3
    # -I -S, in the data directory): typing and what it imports cost each segment more CPU
    # than the rest of the start-up, so the push path's modules must not import them.
    probe = (
        # exec, not runpy: runpy itself imports contextlib and functools.
        "import sys; sys.argv = sys.argv[1:]; path = sys.argv[0]\n"
        "with open(path) as fh: launcher = compile(fh.read(), path, 'exec')\n"
        "try:\n exec(launcher, {'__name__': '__main__', '__file__': path})\n"
        "except SystemExit as exc: code = exc.code\n"
        f"print(code, sorted(m for m in {HEAVY_FOR_A_PUSH!r} if m in sys.modules))"
    )
    argv = [program, "--repo", env["repo"], "--timeout", "0", "push", f"pg_wal/{SEG2}"]
    out = subprocess.run(
        ["/usr/bin/python3", "-I", "-S", "-c", probe, *argv],
        capture_output=True,
        text=True,
        check=True,
        cwd=env["pgdata"],
        timeout=60,
    )
    assert out.stdout.strip().splitlines()[-1] == "0 []", out.stdout + out.stderr
    assert "archived, 16.0 MiB" in out.stderr
    assert Path(env["repo"], *wal_key(SEG2).split("/")).is_file()


def test_push_path_modules_import_without_typing(program: str) -> None:
    # Every module the push imports, imported from the installed copy on the launcher's path
    # (this does not depend on how far a push gets before it imports them).
    lib = os.path.join(os.path.dirname(os.path.dirname(program)), "lib", "current")
    names = ("hostcmd", "archive", "repository", "storage", "compression", "walfile", "errors")
    code = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        + "".join(
            f"import ansible_collections.pitr.postgresql.plugins.module_utils.{n}\n" for n in names
        )
        + f"print(sorted(m for m in {HEAVY_FOR_A_PUSH!r} if m in sys.modules))"
    )
    out = subprocess.run(
        ["/usr/bin/python3", "-I", "-S", "-c", code, lib],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


@pytest.mark.parametrize(("action", "code"), [("push", PUSH_FAILED), ("fetch", FETCH_FATAL)])
def test_unexpected_error_without_timeout_keeps_the_exit_code_contract(
    env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
    action: str,
    code: int,
) -> None:
    # With --timeout 0 the action runs in the process itself. A bug (any exception that is
    # not a PitrError) must still end as the action's failure code: a traceback exits 1,
    # which for fetch means "not archived" and ends recovery early.
    from ansible_collections.pitr.postgresql.plugins.module_utils import archive

    def bug(*args: t.Any, **kwargs: t.Any) -> t.Any:
        raise KeyError("a bug")

    monkeypatch.setattr(archive, action, bug)
    argv = ["push", env["seg"]] if action == "push" else ["fetch", SEG2, env["tmp"] + "/X"]
    assert run_main(env, *argv, timeout="0") == code
    assert "FAILED: unexpected KeyError" in capfd.readouterr().err

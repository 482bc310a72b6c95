# Copyright: contributors to pitr.postgresql
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""pg_basebackup argv per PostgreSQL major, version checks, parsers of tool output, runner."""

from __future__ import annotations

import datetime as dt
import sys
import time
from pathlib import Path

import pytest

from ansible_collections.pitr.postgresql.plugins.module_utils import backup as b
from ansible_collections.pitr.postgresql.plugins.module_utils import runner
from ansible_collections.pitr.postgresql.plugins.module_utils.catalog import BackupRecord
from ansible_collections.pitr.postgresql.plugins.module_utils.errors import CommandError

BIN = "/usr/lib/postgresql/{}/bin"
TARGET = "/srv/pitr/staging/backups/L1"


def argv(major: int, server: int | None = None, **opts: object) -> list[str]:
    opts.setdefault("fast_crc32c", False)
    fast = bool(opts.pop("fast_crc32c"))
    return b.basebackup_argv(
        BIN.format(major),
        TARGET,
        "L1",
        b.BackupOptions(**opts),  # type: ignore[arg-type]
        client_major=major,
        server_major=server or major,
        fast_crc32c=fast,
    )


def expected(
    major: int, checksums: str, fmt: str = "tar", compress: str | None = "server-zstd:1"
) -> list[str]:
    out = [
        f"/usr/lib/postgresql/{major}/bin/pg_basebackup",
        f"--pgdata={TARGET}",
        f"--format={fmt}",
        "--wal-method=stream",
        "--checkpoint=fast",
        f"--manifest-checksums={checksums}",
        "--label=pitr.postgresql L1",
        "--progress",
        "--verbose",
        "--no-password",
    ]
    return out + ([f"--compress={compress}"] if compress else [])


@pytest.mark.parametrize("major", [15, 16, 17])
def test_default_argv_per_major(major: int) -> None:
    # Tar before PostgreSQL 18: SHA256 manifests, verified by the collection in Python.
    assert argv(major) == expected(major, "SHA256")


@pytest.mark.parametrize("major", [15, 16, 17])
def test_default_argv_with_crc32c_library(major: int) -> None:
    # A C CRC-32C library on the host: PostgreSQL's cheap default checksum, verified by it.
    assert argv(major, fast_crc32c=True) == expected(major, "CRC32C")


def test_default_argv_pg18_uses_crc32c_for_tar() -> None:
    assert argv(18) == expected(18, "CRC32C")


@pytest.mark.parametrize("major", [15, 16, 17])
def test_plain_argv_per_major(major: int) -> None:
    assert argv(major, backup_format="plain") == expected(major, "CRC32C", "plain")
    assert argv(major, backup_format="plain", compression="none") == expected(
        major, "CRC32C", "plain", None
    )


@pytest.mark.parametrize(
    ("given", "normalized"),
    [
        ("server-zstd:1", "server-zstd:1"),
        ("server-lz4", "server-lz4"),
        ("zstd:3", "client-zstd:3"),
        ("client-gzip:6", "client-gzip:6"),
        ("server-zstd:level=1,workers=2", "server-zstd:level=1,workers=2"),
        ("none", "none"),
        ("", "none"),
    ],
)
def test_compression_values(given: str, normalized: str) -> None:
    assert b.normalize_compression(given) == normalized


@pytest.mark.parametrize("bad", ["bzip2", "server-zstd 1", "server-", "fast"])
def test_compression_rejected(bad: str) -> None:
    with pytest.raises(b.BackupError):
        b.normalize_compression(bad)


def test_options_spelled_out() -> None:
    got = argv(
        16,
        checkpoint="spread",
        manifest_checksums="sha512",
        max_rate="100M",
        compression="client-lz4:1",
    )
    assert "--checkpoint=spread" in got
    assert "--manifest-checksums=SHA512" in got
    assert "--max-rate=100M" in got
    assert got[-1] == "--compress=client-lz4:1"


def test_server_compression_needs_server_15() -> None:
    with pytest.raises(b.BackupError, match="PostgreSQL 15 or later on the server"):
        argv(15, server=14)
    assert argv(15, server=14, compression="client-zstd:1")[-1] == "--compress=client-zstd:1"


def test_plain_with_client_compression_refused() -> None:
    with pytest.raises(b.BackupError, match="client-side compression writes tar"):
        argv(15, backup_format="plain", compression="client-zstd")


@pytest.mark.parametrize("major", [13, 14])
def test_old_clients(major: int) -> None:
    assert argv(major, compression="none") == expected(major, "SHA256", compress=None)
    assert argv(major, compression="client-gzip:5")[-2:] == ["--gzip", "--compress=5"]
    with pytest.raises(b.BackupError, match="only compresses tar backups with gzip"):
        argv(major)


def test_format_and_checkpoint_validated() -> None:
    with pytest.raises(b.BackupError):
        argv(15, backup_format="directory")
    with pytest.raises(b.BackupError):
        argv(15, checkpoint="slow")


@pytest.mark.parametrize(
    ("client", "server", "ok"),
    [
        (15, 15, True),
        (16, 15, True),
        (17, 15, True),
        (15, 16, False),
        (15, 17, False),
        (15, 12, False),
    ],
)
def test_check_versions(client: int, server: int, ok: bool) -> None:
    if ok:
        b.check_versions(client, server)
    else:
        with pytest.raises(b.BackupError):
            b.check_versions(client, server)


def test_older_pg_basebackup_message_names_both_versions() -> None:
    with pytest.raises(b.BackupError, match="pg_basebackup 15 is older than the server \\(16\\)"):
        b.check_versions(15, 16)


@pytest.mark.parametrize(
    ("fmt", "major", "algo", "tool"),
    [
        ("tar", 15, "SHA256", "tar"),
        ("tar", 17, "SHA256", "tar"),
        ("tar", 18, "CRC32C", "pg_verifybackup"),
        ("plain", 15, "CRC32C", "pg_verifybackup"),
    ],
)
def test_checksums_and_verifier(fmt: str, major: int, algo: str, tool: str) -> None:
    assert b.resolve_checksums("auto", fmt, major, fast_crc32c=False) == algo
    assert b.resolve_checksums("auto", fmt, major, fast_crc32c=True) == "CRC32C"
    assert b.verifier_for(fmt, major) == tool
    assert b.resolve_checksums("crc32c", fmt, major) == "CRC32C"


def test_parse_versions() -> None:
    assert b.parse_tool_version("pg_basebackup (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)\n") == (
        "15.18",
        15,
    )
    assert b.parse_tool_version("pg_basebackup (PostgreSQL) 17beta2") == ("17", 17)
    assert b.parse_server_version("15.18 (Debian 15.18-0+deb12u1)") == ("15.18", 15)
    with pytest.raises(b.BackupError):
        b.parse_tool_version("command not found")


def test_identify_argv_and_parse() -> None:
    args = b.identify_argv("/usr/lib/postgresql/15/bin")
    assert args[0] == "/usr/lib/postgresql/15/bin/psql"
    assert "--dbname=dbname=replication replication=true" in args
    assert "--command=IDENTIFY_SYSTEM" in args
    # recorded: psql -At against PostgreSQL 15.18
    out = "7712112821732407675|1|0/63000000|\n15.18 (Debian 15.18-0+deb12u1)\n16MB\n"
    info = b.parse_identify(out)
    assert info == b.ServerInfo(7712112821732407675, 1, "0/63000000", "15.18", 15, 16 * 1024 * 1024)


def test_libpq_env_keeps_password_out_of_argv() -> None:
    env = b.libpq_env(
        {
            "login_user": "pitr_backup",
            "login_password": "s3cret",
            "login_unix_socket": "/run/pg",
            "port": 5433,
            "ssl_mode": "prefer",
            "login_host": None,
            "connect_timeout": 10,
        },
        passfile="/etc/pitr/pgpass",
    )
    assert env == {
        "PGHOST": "/run/pg",
        "PGPORT": "5433",
        "PGUSER": "pitr_backup",
        "PGPASSWORD": "s3cret",
        "PGSSLMODE": "prefer",
        "PGCONNECT_TIMEOUT": "10",
        "PGPASSFILE": "/etc/pitr/pgpass",
        "PGAPPNAME": "pitr.postgresql",
    }
    assert not any("s3cret" in a for a in argv(15))
    assert b.libpq_env({"login_host": "db1", "login_unix_socket": "/run/pg"})["PGHOST"] == "db1"


def test_progress_lines_recorded_from_pg15() -> None:
    # pg_basebackup --progress --verbose stderr (not a terminal: one line per update)
    lines = [
        "pg_basebackup: initiating base backup, waiting for checkpoint to complete",
        "pg_basebackup: checkpoint completed",
        "555556/788845 kB (70%), 0/1 tablespace (/tmp/bb/out/p1/base.tar.zst        )",
        "788856/788856 kB (100%), 0/1 tablespace (/tmp/bb/out/p1/base.tar.zst        )",
        "788856/788856 kB (100%), 1/1 tablespace                                         ",
        "pg_basebackup: write-ahead log end point: 0/62000100",
    ]
    p = b.Progress("L1")
    p.feed(lines[0])
    assert p.phase == "checkpoint"
    assert p.feed(lines[2]) and p.done_bytes == 555556 * 1024 and p.total_bytes == 788845 * 1024
    assert p.percent == 70.4
    for line in lines[3:]:
        p.feed(line)
    assert (p.done_bytes, p.total_bytes, p.percent, p.phase) == (
        788856 * 1024,
        788856 * 1024,
        100.0,
        "finishing",
    )
    assert set(p.to_dict()) >= {"done_bytes", "total_bytes", "percent", "phase", "pid", "host"}


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("0", 0),
        ("", 0),
        ("90", 90),
        ("90s", 90),
        ("15min", 900),
        ("12h", 43200),
        ("1d", 86400),
        ("2w", 1209600),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert b.parse_duration(text) == seconds


def test_within_interval() -> None:
    now = dt.datetime(2026, 11, 25, 15, 0, tzinfo=dt.UTC)
    rec = BackupRecord(label="x", status="ok", verified=True, stop_time="2026-11-25T14:30:00+00:00")
    assert b.within_interval(rec, 3600, now)
    assert not b.within_interval(rec, 1200, now)
    assert not b.within_interval(rec, 0, now)


# runner ----------------------------------------------------------------------------------------


def test_runner_result_and_env() -> None:
    res = runner.run(
        [
            sys.executable,
            "-c",
            "import os,sys; print(os.environ['X']); print(os.environ['TZ'], file=sys.stderr)",
        ],
        env={"X": "1"},
    )
    assert (res.rc, res.stdout, res.stderr) == (0, "1\n", "UTC\n")


def test_runner_failure_carries_cmd_rc_stderr() -> None:
    cmd = [sys.executable, "-c", "import sys; sys.stderr.write('boom\\n'); sys.exit(3)"]
    with pytest.raises(CommandError) as err:
        runner.run(cmd)
    assert err.value.context["cmd"] == cmd
    assert err.value.context["rc"] == 3
    assert err.value.context["stderr"] == "boom\n"
    assert "exited 3: boom" in err.value.msg
    assert runner.run(cmd, check=False).rc == 3


def test_runner_as_another_user(monkeypatch: pytest.MonkeyPatch) -> None:
    import os
    import pwd

    code = "import os; print(os.getuid(), os.getgid(), os.environ['HOME'], os.environ['USER'])"
    nobody = pwd.getpwnam("nobody")
    if os.geteuid() == 0:
        res = runner.run([sys.executable, "-c", code], user="nobody", cwd="/")
        assert res.stdout.split() == [
            str(nobody.pw_uid),
            str(nobody.pw_gid),
            nobody.pw_dir,
            "nobody",
        ]
    # as that user already: nothing to switch; as anyone else but root: refused, clearly
    me = pwd.getpwuid(os.geteuid()).pw_name
    assert runner.as_user(me, ["x"]) == ({}, {})
    assert runner.as_user(None, ["x"]) == ({}, {})
    monkeypatch.setattr(os, "geteuid", lambda: nobody.pw_uid + 1)
    with pytest.raises(CommandError, match=r"cannot run pg_ctl as nobody: .*run it as root or as"):
        runner.run(["pg_ctl"], user="nobody")
    with pytest.raises(CommandError, match="cannot run pg_ctl as no-such-user: no such user"):
        runner.run(["pg_ctl"], user="no-such-user")


def test_runner_timeout_kills() -> None:
    with pytest.raises(CommandError, match=r"did not finish within 0\.5 seconds"):
        runner.run([sys.executable, "-c", "import time; time.sleep(30)"], timeout=0.5)


def test_runner_signal_death_is_negative_rc() -> None:
    res = runner.run(
        [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"],
        check=False,
    )
    assert res.rc == -9
    assert "killed by SIGKILL" in runner.failure(res).msg


def test_runner_does_not_wait_for_leftover_children() -> None:
    # A program that exits while a child it started still holds our pipes (pg_basebackup
    # killed while its WAL streamer runs): run() returns, and the child is gone.
    code = (
        "import subprocess, sys; p = subprocess.Popen(['sleep', '60']); print(p.pid); sys.exit(4)"
    )
    started = time.monotonic()
    res = runner.run([sys.executable, "-c", code], check=False)
    assert res.rc == 4
    assert time.monotonic() - started < 20
    child = int(res.stdout)
    time.sleep(0.2)
    stat_file = Path(f"/proc/{child}/stat")
    assert not stat_file.exists() or stat_file.read_text().split()[2] == "Z"


def test_runner_stderr_lines_split_on_cr() -> None:
    seen: list[str] = []
    runner.run(
        [sys.executable, "-c", "import sys; sys.stderr.write('1/10 kB\\r5/10 kB\\rdone\\n')"],
        on_stderr_line=seen.append,
    )
    assert seen == ["1/10 kB", "5/10 kB", "done"]


def test_runner_missing_program() -> None:
    with pytest.raises(CommandError, match="cannot run /nonexistent"):
        runner.run(["/nonexistent/pg_basebackup", "--version"])


def test_runner_stream_stdout() -> None:
    with runner.stream_stdout([sys.executable, "-c", "print('x' * 100000)"]) as out:
        assert len(out.read()) == 100001
    with (
        pytest.raises(CommandError),
        runner.stream_stdout([sys.executable, "-c", "import sys; sys.exit(2)"]) as out,
    ):
        out.read()

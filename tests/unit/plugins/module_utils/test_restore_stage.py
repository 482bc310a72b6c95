# Copyright: contributors to pitr.postgresql
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Staging and swapping a restored data directory; what a server that cannot start says."""

from __future__ import annotations

import errno
import os
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

from ansible_collections.pitr.postgresql.plugins.module_utils import recovery, restore_stage

TAR = {
    "label": "b1",
    "path": "/repo/backups/b1",
    "layout": {
        "format": "tar",
        "base": "base.tar.zst",
        "wal": "pg_wal.tar",
        "decompress": "zstd",
        "wal_decompress": None,
    },
}


def test_unpack_commands_tar_with_compression_and_wal() -> None:
    base, wal = restore_stage.unpack_commands(TAR, "/d.pitr-staging")
    assert base[:7] == [
        "tar",
        "--extract",
        "--no-same-owner",
        "--blocking-factor=256",
        "--read-full-records",
        "--file",
        "/repo/backups/b1/base.tar.zst",
    ]
    assert "--use-compress-program=zstd" in base
    assert base[base.index("--exclude") + 1] == restore_stage.STATE_FILE
    assert wal[wal.index("--directory") + 1] == "/d.pitr-staging/pg_wal"
    assert not any(a.startswith("--use-compress-program") for a in wal)


@pytest.mark.parametrize("compressed", [False, True])
def test_unpack_commands_read_archives_of_any_record_padding(
    tmp_path: Path, compressed: bool
) -> None:
    # pg_basebackup's tar ends after its two zero blocks, not at a 10 KiB (or 128 KiB) record
    # boundary; tar's larger records, through a pipe from the decompressor or not, must still
    # read every member and exit 0.
    src = tmp_path / "src"
    (src / "base" / "1").mkdir(parents=True)
    files = {
        "PG_VERSION": b"15\n",
        "backup_label": b"START WAL LOCATION: 0/2000028\n",
        "base/1/16384": bytes(range(256)) * 4099,  # 1 MB and a bit: several records
    }
    for name, data in files.items():
        (src / name).write_bytes(data)
    tar = tmp_path / "base.tar"
    with tarfile.open(tar, "w", format=tarfile.GNU_FORMAT) as archive:
        for name in files:
            archive.add(src / name, arcname=name)
    raw = tar.read_bytes().rstrip(b"\0")
    end = -(-len(raw) // 512) * 512 + 1024  # the last member, then exactly two zero blocks
    tar.write_bytes(raw.ljust(end, b"\0"))
    assert tar.stat().st_size % 10240 != 0
    layout = {"format": "tar", "base": "base.tar", "decompress": None}
    if compressed:
        subprocess.run(["zstd", "-q", "--rm", str(tar)], check=True)
        layout = {"format": "tar", "base": "base.tar.zst", "decompress": "zstd -d"}
    staging = tmp_path / "staging"
    staging.mkdir()
    backup = {"label": "b", "path": str(tmp_path), "layout": layout}
    (argv,) = restore_stage.unpack_commands(backup, str(staging))
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    assert (proc.returncode, proc.stderr) == (0, "")
    for name, data in files.items():
        assert (staging / name).read_bytes() == data


def test_unpack_commands_plain_and_unknown() -> None:
    plain = {"label": "p", "path": "/r/p", "layout": {"format": "plain"}}
    assert restore_stage.unpack_commands(plain, "/s") == [
        ["cp", "--recursive", "--preserve=mode,timestamps", "/r/p/.", "/s/"]
    ]
    with pytest.raises(restore_stage.StageError, match="no layout"):
        restore_stage.unpack_commands({"label": "x", "path": "/r", "layout": {}}, "/s")


def test_flusher_writes_out_while_the_unpack_runs(tmp_path: Path) -> None:
    with restore_stage.Flusher(str(tmp_path), interval=0.01) as flusher:
        (tmp_path / "f").write_bytes(b"x" * 65536)
        deadline = time.monotonic() + 60
        while flusher.flushes < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert flusher.flushes >= 2  # real syncfs calls, one after another
    assert not flusher.thread.is_alive()
    done = flusher.flushes
    time.sleep(0.05)
    assert flusher.flushes == done  # stopped with the unpack


def test_flusher_stops_quietly_and_durable_reports_a_failed_writeback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def eio(fd: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(restore_stage, "_syncfs", eio)
    with restore_stage.Flusher(str(tmp_path), interval=0.01) as flusher:
        flusher.thread.join(timeout=60)  # it ends by itself on the first error
        assert not flusher.thread.is_alive()
    with pytest.raises(restore_stage.StageError, match=r"to disk: Input/output error\. The data"):
        restore_stage.durable(str(tmp_path))


def test_durable_fsyncs_every_file_and_directory_without_syncfs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fsynced: list[str]
) -> None:
    (tmp_path / "base" / "1").mkdir(parents=True)
    for name in ("PG_VERSION", "base/1/16384", "base/1/16385"):
        (tmp_path / name).write_bytes(b"x")

    def nosys(fd: int) -> None:
        raise OSError(errno.ENOSYS, "syncfs is not available")

    monkeypatch.setattr(restore_stage, "_syncfs", nosys)
    restore_stage.durable(str(tmp_path))
    want = {str(tmp_path / n) for n in ("PG_VERSION", "base/1/16384", "base/1/16385")}
    want |= {str(tmp_path), str(tmp_path / "base"), str(tmp_path / "base" / "1")}
    assert set(fsynced) == want


def test_plan_swap_moves_aside_then_puts_in_place(tmp_path: Path) -> None:
    data = tmp_path / "main"
    (data / "global").mkdir(parents=True)
    (tmp_path / "main.pitr-staging").mkdir()
    old = str(tmp_path / "main.pitr-old-20261125T1000Z")
    plan = restore_stage.plan_swap(str(data), old, full=True)
    assert plan.move_aside == (str(data), old)
    assert plan.put_in_place == (str(tmp_path / "main.pitr-staging"), str(data))
    restore_stage.swap(plan)
    assert (Path(old) / "global").is_dir()  # moved, not deleted
    assert data.is_dir() and not (tmp_path / "main.pitr-staging").exists()
    again = restore_stage.plan_swap(str(data), old, full=True)
    assert not again.changed


def test_plan_swap_resumes_between_the_two_renames(tmp_path: Path) -> None:
    old = tmp_path / "main.pitr-old-x"
    old.mkdir()
    (tmp_path / "main.pitr-staging").mkdir()
    plan = restore_stage.plan_swap(str(tmp_path / "main"), str(old), full=False)
    assert plan.move_aside is None and plan.remove_empty is None
    assert plan.put_in_place is not None


def test_swap_refuses_to_remove_a_directory_that_is_not_empty(tmp_path: Path) -> None:
    data = tmp_path / "main"
    data.mkdir()
    (data / "keep").write_text("x")
    (tmp_path / "main.pitr-staging").mkdir()
    plan = restore_stage.plan_swap(str(data), None, full=True)
    with pytest.raises(restore_stage.StageError, match="Nothing was deleted"):
        restore_stage.swap(plan)
    assert (data / "keep").read_text() == "x"


def test_a_server_that_cannot_start_is_a_failure_in_its_own_words() -> None:
    text = (
        'postgres: could not access the server configuration file "/x/postgresql.conf":'
        " No such file or directory\n"
    )
    log = recovery.parse_recovery_log(text)
    assert log.failures == (text.strip(),)
    assert log.tail == (text.strip(),)
    phase = recovery.recovery_phase(
        running=False, connected=False, in_recovery=None, pause_state=None, log=log
    )
    assert phase == "failed"
    quiet = recovery.parse_recovery_log("2026-11-25 10:00:00 UTC [1] LOG:  starting\n")
    assert quiet.failures == ()
    assert quiet.tail == ("2026-11-25 10:00:00 UTC [1] LOG:  starting",)


def test_swap_falls_back_to_mv_where_rename_says_cross_device(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # overlayfs (containers) refuses to rename a directory from a lower layer with EXDEV.
    def refuse(src: str, dst: str) -> None:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    data = tmp_path / "main"
    data.mkdir()
    (data / "PG_VERSION").write_text("15\n")
    (tmp_path / "main.pitr-staging").mkdir()
    old = str(tmp_path / "main.pitr-old-x")
    plan = restore_stage.plan_swap(str(data), old, full=True)
    monkeypatch.setattr(restore_stage.os, "rename", refuse)
    restore_stage.swap(plan)
    assert (Path(old) / "PG_VERSION").read_text() == "15\n"
    assert data.is_dir() and not (data / "PG_VERSION").exists()

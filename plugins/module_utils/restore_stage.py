# Copyright: contributors to pitr.postgresql
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Laying a base backup down beside the data directory, then swapping it into place.

The restore never writes into the server's data directory. It builds ``<data_dir>.pitr-staging``
(state file ``phase: staging`` first, then the backup, then the recovery settings and
``recovery.signal``, then ``phase: prepared``) and only then renames it into place, after the
old data directory went aside under a dated name (never deleted). Interrupted at any moment,
the server's path holds either the old directory, nothing, or a directory that starts in
recovery to the target: never one that starts as if nothing happened.

``stage`` and ``swap`` are the two effectful steps; ``plan_stage`` and ``plan_swap`` say what
they would do (check mode) from the same inputs.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pwd
import shutil
import threading
import time
import typing as t
from dataclasses import dataclass, field
from datetime import UTC, datetime

from ansible_collections.pitr.postgresql.plugins.module_utils import pgctl, recovery_conf, runner
from ansible_collections.pitr.postgresql.plugins.module_utils.errors import PitrError

STAGING_SUFFIX = ".pitr-staging"
STATE_FILE = "pitr_restore.json"
# What must not start with the restore: the repository's files, signal files of the source (a
# backup of a standby carries standby.signal) and a stale pid file.
REMOVE_AFTER_UNPACK = (
    "backup.json",
    "backup_manifest",
    "standby.signal",
    "recovery.signal",
    "postmaster.pid",
    "postmaster.opts",
)
# A clone restored from a cluster whose configuration lives outside its data directory
# (Debian: /etc/postgresql/MAJOR/main) gets these, so that `pg_ctl start` finds a
# configuration of its own; they never refer to the source's files.
STANDALONE_CONF = (
    "# Written by pitr.postgresql's pitr_restore for a copy of a cluster whose configuration\n"
    "# lives outside its data directory (Debian keeps it in /etc/postgresql). Defaults apply;\n"
    "# the restore's own settings (port, archiving, recovery) are in postgresql.auto.conf.\n"
    "# Copy settings from the source's postgresql.conf here as needed.\n"
)
STANDALONE_HBA = (
    "# Written by pitr.postgresql's pitr_restore for a copy of a cluster whose pg_hba.conf lives\n"
    "# outside its data directory: local connections by operating-system user name only.\n"
    "local   all   all   peer\n"
)
STANDALONE_IDENT = "# Written by pitr.postgresql's pitr_restore (no user name maps).\n"
STANDALONE_FILES = (
    ("postgresql.conf", STANDALONE_CONF),
    ("pg_hba.conf", STANDALONE_HBA),
    ("pg_ident.conf", STANDALONE_IDENT),
)


class StageError(PitrError):
    """Laying the backup down or swapping it into place failed; nothing was deleted."""


@dataclass(frozen=True)
class StageRequest:
    """What to lay down where (from restore_plan's result)."""

    data_dir: str
    backup: t.Mapping[str, t.Any]
    state: t.Mapping[str, t.Any]
    settings: t.Mapping[str, str]
    clone_settings: t.Mapping[str, str] = field(default_factory=dict)
    owner: str = "postgres"
    mode: int = 0o700
    remove_stale_staging: bool = False
    standalone_config: bool = False

    @property
    def staging(self) -> str:
        return os.path.normpath(self.data_dir) + STAGING_SUFFIX


def staging_dir(data_dir: str) -> str:
    return os.path.normpath(data_dir) + STAGING_SUFFIX


# 128 KiB records instead of tar's 10 KiB: GNU tar copies file data record by record, and with
# the default it, not the decompressor, is what limits the unpack (1.5 GB: 2.3 s against 1.75 s
# for zstd -d alone). --read-full-records: a pipe from the decompressor (and the end of an
# archive not padded to a whole record) gives short reads.
TAR_EXTRACT = (
    "tar",
    "--extract",
    "--no-same-owner",
    "--blocking-factor=256",
    "--read-full-records",
)


def unpack_commands(backup: t.Mapping[str, t.Any], staging: str) -> list[list[str]]:
    """The argv lists that lay the backup down in ``staging`` (tar or plain)."""
    layout = backup.get("layout") or {}
    path = str(backup["path"])
    if layout.get("format") == "plain":
        return [["cp", "--recursive", "--preserve=mode,timestamps", f"{path}/.", f"{staging}/"]]
    if layout.get("format") != "tar" or not layout.get("base"):
        raise StageError(
            f"backup {backup.get('label')} has no layout the restore knows ({layout!r});"
            " choose another backup (pitr_restore_backup_label)",
            backup=backup.get("label"),
        )
    argv = [
        *TAR_EXTRACT,
        "--file",
        os.path.join(path, layout["base"]),
        "--directory",
        staging,
        "--exclude",
        STATE_FILE,
    ]
    if layout.get("decompress"):
        argv.append(f"--use-compress-program={layout['decompress']}")
    commands = [argv]
    if layout.get("wal"):
        wal = [
            *TAR_EXTRACT,
            "--file",
            os.path.join(path, layout["wal"]),
            "--directory",
            os.path.join(staging, "pg_wal"),
        ]
        if layout.get("wal_decompress"):
            wal.append(f"--use-compress-program={layout['wal_decompress']}")
        commands.append(wal)
    return commands


def plan_stage(request: StageRequest) -> list[str]:
    """What ``stage`` does, one line per step (check mode shows it)."""
    staging = request.staging
    steps: list[str] = []
    if request.remove_stale_staging:
        steps.append(f"remove the unfinished staging directory {staging} of an interrupted run")
    steps.append(f"create {staging} (owner {request.owner}, mode {request.mode:04o})")
    steps.append(f"record phase staging in {os.path.join(staging, STATE_FILE)}")
    steps += [" ".join(argv) for argv in unpack_commands(request.backup, staging)]
    steps.append(f"remove {', '.join(REMOVE_AFTER_UNPACK)} and check backup_label")
    if request.standalone_config:
        steps.append("write postgresql.conf, pg_hba.conf and pg_ident.conf where missing")
    if request.clone_settings:
        steps.append(f"write the clone settings {dict(request.clone_settings)}")
    steps.append(f"write the recovery settings {dict(request.settings)} and recovery.signal")
    steps.append(f"write everything in {staging} out to disk (syncfs)")
    steps.append("record phase prepared")
    return steps


def write_state(
    directory: str, state: t.Mapping[str, t.Any], phase: str, owner: tuple[int, int]
) -> dict[str, t.Any]:
    """Write the restore's state file with ``phase`` (atomically); return what was written."""
    record = dict(state)
    record["phase"] = phase
    record["updated"] = datetime.now(UTC).isoformat(timespec="seconds")
    text = json.dumps(record, indent=4, sort_keys=True) + "\n"
    recovery_conf.write_atomic(os.path.join(directory, STATE_FILE), text, mode=0o600, owner=owner)
    return record


def begin_recovery(
    data_dir: str,
    state: t.Mapping[str, t.Any],
    log_file: str | None,
    pg_ctl: tuple[str, str] | None,
    owner: str | None = None,
) -> tuple[dict[str, t.Any], dict[str, t.Any]]:
    """Record phase ``recovering``, then, with ``pg_ctl`` (bin directory, options), start the
    server with ``pg_ctl start --no-wait``: it replays while the caller moves on to following
    it. ``owner``: the server's user, for a caller that runs as root (pg_ctl runs as it, the
    state file is its); None: this process is the server's user. The state file says
    ``recovering`` before the server can start, so an interruption in between is resumed by
    the follow step, which starts it. Returns the record and ``{log_offset, cmd, started}``."""
    offset = pgctl.log_size(log_file)
    ids = _owner_ids(owner) if owner else recovery_conf.data_dir_owner(data_dir)
    record = write_state(data_dir, state, "recovering", ids)
    cmd: list[str] = []
    if pg_ctl is not None:
        if not log_file:
            raise StageError("pg_ctl start needs the server log file", data_dir=data_dir)
        cmd = pgctl.start_no_wait(pg_ctl[0], data_dir, log_file, pg_ctl[1], user=owner)
    return record, {"log_offset": offset, "cmd": cmd, "started": time.time()}


def _owner_ids(user: str) -> tuple[int, int]:
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        raise StageError(
            f"user {user} does not exist on this host; set pitr_postgres_user to the user that"
            " runs PostgreSQL",
            user=user,
        ) from None
    return pw.pw_uid, pw.pw_gid


def _chown_tree(path: str, owner: tuple[int, int]) -> None:
    """Give everything under ``path`` to the server's user (tar and cp ran as root)."""
    if os.geteuid() != 0:
        return
    uid, gid = owner
    os.lchown(path, uid, gid)
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            os.lchown(os.path.join(root, name), uid, gid)


def _mkdir(path: str, mode: int, owner: tuple[int, int]) -> None:
    os.makedirs(path, mode=mode, exist_ok=True)
    os.chmod(path, mode)
    if os.geteuid() == 0:
        os.chown(path, *owner)


FLUSH_INTERVAL = 0.05


def _syncfs(fd: int) -> None:
    """syncfs(2): write out the file system that holds ``fd`` and wait for it. OSError when it
    fails (Linux 5.8+ reports writeback errors) or is not there (ENOSYS)."""
    import ctypes

    try:
        call = ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):
        raise OSError(errno.ENOSYS, "syncfs is not available") from None
    if call(fd) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


class Flusher:
    """While the backup is unpacked, write what tar wrote out to disk every ``interval``
    seconds (syncfs of the staging directory's file system, in a thread): the writeback runs
    alongside the decompression instead of after it, where ``durable`` (and PostgreSQL's own
    fsync of the data directory at start) would wait for all of it. Best effort: a failure
    here only ends the flushing; ``durable`` reports errors."""

    def __init__(self, path: str, interval: float = FLUSH_INTERVAL) -> None:
        self.path, self.interval = path, interval
        self.done = threading.Event()
        self.flushes = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            return
        try:
            while not self.done.wait(self.interval):
                _syncfs(fd)
                self.flushes += 1
        except OSError:
            return
        finally:
            os.close(fd)

    def __enter__(self) -> Flusher:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.thread.join()


def durable(path: str) -> None:
    """Make everything under ``path`` durable before the state file says ``prepared``: the
    data directory is renamed into place next, and a crash after that must not leave files
    there whose contents never reached the disk (a re-run would resume recovery on them).
    syncfs of its file system; where there is none, fsync of every file and directory."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            _syncfs(fd)
            return
        except OSError as exc:
            if exc.errno != errno.ENOSYS:
                raise
        finally:
            os.close(fd)
        for root, _dirs, files in os.walk(path):
            for name in files:
                fd = os.open(os.path.join(root, name), os.O_RDONLY | os.O_NOFOLLOW)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            _fsync_dir(root)
    except OSError as exc:
        raise StageError(
            f"cannot write the laid-down backup in {path} to disk: {exc.strerror or exc}. The"
            " data directory was not touched; the next run removes the unfinished staging"
            " directory and starts over.",
            path=path,
        ) from exc


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def stage(request: StageRequest) -> dict[str, t.Any]:
    """Lay the backup down in the staging directory, ready to start in recovery.

    Returns the state record written last (``phase: prepared``). Raises StageError with the
    command and its output when a step fails; the staging directory then stays as it is (its
    state file says ``staging``), and the next run removes it and starts over.
    """
    staging = request.staging
    owner = _owner_ids(request.owner)
    if request.remove_stale_staging and os.path.lexists(staging):
        shutil.rmtree(staging)
    _mkdir(staging, request.mode, owner)
    write_state(staging, request.state, "staging", owner)
    layout = request.backup.get("layout") or {}
    commands = unpack_commands(request.backup, staging)
    if layout.get("format") == "tar":
        os.makedirs(os.path.join(staging, "pg_wal"), mode=0o700, exist_ok=True)
    # The base and pg_wal archives unpack into different directories: at the same time.
    results: list[runner.CommandResult | PitrError | None] = [None] * len(commands)

    def unpack(i: int) -> None:
        try:
            results[i] = runner.run(commands[i], check=False, cwd="/", timeout=None)
        except PitrError as exc:  # the program cannot be started
            results[i] = exc

    helpers = [threading.Thread(target=unpack, args=(i,)) for i in range(1, len(commands))]
    with Flusher(staging):
        for helper in helpers:
            helper.start()
        try:
            unpack(0)
        finally:
            for helper in helpers:
                helper.join()
    for argv, result in zip(commands, results, strict=True):
        if isinstance(result, PitrError):
            raise result
        if result is None:
            raise StageError(
                f"laying down backup {request.backup.get('label')}: {argv[0]} did not run"
            )
        if result.rc != 0:
            raise StageError(
                f"laying down backup {request.backup.get('label')} failed: {argv[0]} exited"
                f" {result.rc}: {result.stderr.strip()[-1000:]}. The data directory was not"
                f" touched; the unfinished {staging} is removed by the next run.",
                cmd=result.cmd,
                rc=result.rc,
                stderr=result.stderr,
            )
    for name in REMOVE_AFTER_UNPACK:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(staging, name))
    os.makedirs(os.path.join(staging, "pg_wal", "archive_status"), mode=0o700, exist_ok=True)
    _chown_tree(staging, owner)
    if not os.path.isfile(os.path.join(staging, "backup_label")):
        raise StageError(
            f"{staging}/backup_label is missing after laying down backup"
            f" {request.backup.get('label')}: without it PostgreSQL would start from the wrong"
            " checkpoint. The backup is unusable; choose another one (pitr_restore_backup_label).",
            backup=request.backup.get("label"),
        )
    written_config = []
    if request.standalone_config:
        for name, text in STANDALONE_FILES:
            path = os.path.join(staging, name)
            if not os.path.exists(path):
                recovery_conf.write_atomic(path, text, mode=0o600, owner=owner)
                written_config.append(name)
    if request.clone_settings:
        recovery_conf.apply(
            staging, recovery_conf.plan_present(staging, "clone", request.clone_settings, None)
        )
    recovery_conf.apply(
        staging, recovery_conf.plan_present(staging, "recovery", request.settings, "recovery")
    )
    durable(staging)
    record = write_state(staging, request.state, "prepared", owner)
    record["written_config"] = written_config
    return record


@dataclass(frozen=True)
class SwapPlan:
    """The renames that put the prepared directory in place (each only when still needed)."""

    move_aside: tuple[str, str] | None  # data_dir -> old_data_dir
    remove_empty: str | None  # an empty data_dir (rmdir refuses anything else)
    put_in_place: tuple[str, str] | None  # staging -> data_dir

    @property
    def changed(self) -> bool:
        return bool(self.move_aside or self.remove_empty or self.put_in_place)

    def steps(self) -> list[str]:
        out = []
        if self.move_aside:
            out.append(f"move {self.move_aside[0]} aside to {self.move_aside[1]}")
        if self.remove_empty:
            out.append(f"remove the empty directory {self.remove_empty}")
        if self.put_in_place:
            out.append(f"rename {self.put_in_place[0]} to {self.put_in_place[1]}")
        return out


def plan_swap(data_dir: str, old_data_dir: str | None, full: bool) -> SwapPlan:
    """Which of the two renames are still to do (a re-run after an interruption skips done ones)."""
    data_dir = os.path.normpath(data_dir)
    staging = staging_dir(data_dir)
    move_aside = remove_empty = None
    if full and old_data_dir and not os.path.lexists(old_data_dir) and os.path.lexists(data_dir):
        move_aside = (data_dir, old_data_dir)
    if full and not old_data_dir and os.path.isdir(data_dir) and not os.path.islink(data_dir):
        remove_empty = data_dir
    in_place = None
    data_dir_free = (
        move_aside is not None or remove_empty is not None or not os.path.lexists(data_dir)
    )
    if data_dir_free and os.path.isdir(staging):
        in_place = (staging, data_dir)
    return SwapPlan(move_aside, remove_empty, in_place)


def _move(source: str, destination: str) -> None:
    """Rename a directory; where the file system cannot (EXDEV: a directory from a lower
    overlayfs layer, as in containers), ``mv`` copies it and removes the source only once the
    copy is complete."""
    try:
        os.rename(source, destination)
        return
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
    result = runner.run(
        ["mv", "--no-target-directory", source, destination], check=False, cwd="/", timeout=None
    )
    if result.rc != 0:
        raise OSError(errno.EXDEV, f"mv {source} {destination}: {result.stderr.strip()}")


def swap(plan: SwapPlan) -> None:
    """Carry out ``plan``: two renames in one parent directory, then fsync the parent."""
    touched: set[str] = set()
    try:
        if plan.move_aside:
            _move(*plan.move_aside)
            touched.add(os.path.dirname(plan.move_aside[0]) or ".")
        if plan.remove_empty:
            os.rmdir(plan.remove_empty)
            touched.add(os.path.dirname(plan.remove_empty) or ".")
        if plan.put_in_place:
            _move(*plan.put_in_place)
            touched.add(os.path.dirname(plan.put_in_place[1]) or ".")
    except OSError as exc:
        raise StageError(
            f"cannot put the restored data directory in place: {exc}. Nothing was deleted;"
            " the old data directory, if any, is where the state file says.",
            steps=plan.steps(),
        ) from exc
    for parent in touched:
        _fsync_dir(parent)

# Copyright: contributors to pitr.postgresql
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Following a restored server through recovery, and finishing the restore. Effects, kept small.

``observe`` is one look at the server: its pid file, one query when it accepts connections,
and the server log since the restore started it; ``recovery.recovery_phase`` and
``recovery.confirm_stop`` (pure) judge what it sees. ``follow`` looks again every
``POLL_SECONDS`` until the server stops moving on by itself (paused at the target, promoted,
stopped, failed) or the wait is over, and keeps a sample of each look for the progress report.
``finish`` confirms the stop point and promotes (or leaves it paused, or shuts it down),
removes the recovery settings and records the outcome in the restore's state file.
"""

from __future__ import annotations

import os
import time
import typing as t

from ansible_collections.pitr.postgresql.plugins.module_utils import (
    recovery,
    recovery_conf,
    restore_stage,
)
from ansible_collections.pitr.postgresql.plugins.module_utils.errors import PitrError
from ansible_collections.pitr.postgresql.plugins.module_utils.walfile import parse_lsn

MAX_LOG_READ = 4 * 1024 * 1024
POLL_SECONDS = 0.1


class RecoveryRunError(PitrError):
    """Starting, following or finishing the recovery failed; nothing was promoted."""


def read_log(path: str | None, offset: int) -> tuple[str, int]:
    """The log text after ``offset`` (from the start when the file is shorter: rotated)."""
    if not path:
        return "", 0
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            start = offset if 0 <= offset <= size else 0
            start = max(start, size - MAX_LOG_READ)
            fh.seek(start)
            return fh.read().decode("utf-8", errors="replace"), size
    except OSError:
        return "", 0


def server_state(params: t.Mapping[str, t.Any]) -> dict[str, t.Any] | None:
    """Recovery facts from the server, or None when it does not accept connections."""
    from psycopg import sql

    from ansible_collections.pitr.postgresql.plugins.module_utils.postgres import (
        connect,
        fetch_one,
    )

    try:
        with connect(params) as conn:
            version = conn.info.server_version
            pause = (
                "pg_catalog.pg_get_wal_replay_pause_state()"
                if version >= 140000
                else "CASE WHEN pg_catalog.pg_is_wal_replay_paused() THEN 'paused'"
                " ELSE 'not paused' END"
            )
            row = fetch_one(
                conn,
                sql.SQL(
                    "SELECT pg_catalog.pg_is_in_recovery() AS in_recovery,"
                    " CASE WHEN pg_catalog.pg_is_in_recovery() THEN {} END AS pause_state,"
                    " pg_catalog.pg_last_wal_replay_lsn()::text AS replay_lsn,"
                    " pg_catalog.pg_last_xact_replay_timestamp() AS replay_time,"
                    " CASE WHEN pg_catalog.pg_is_in_recovery()"
                    " THEN (SELECT timeline_id FROM pg_catalog.pg_control_checkpoint())::text"
                    " ELSE pg_catalog.pg_walfile_name(pg_catalog.pg_current_wal_lsn()) END"
                    " AS timeline_source"
                ).format(sql.SQL(pause)),
            )
    except PitrError:
        return None
    if row is None:
        return None
    source = str(row["timeline_source"])
    row["timeline"] = int(source[:8], 16) if len(source) == 24 else int(source)
    return row


def observe(p: t.Mapping[str, t.Any]) -> dict[str, t.Any]:
    """One look at the server (``p``: data_dir, log_file, log_offset, target, connection)."""
    pid = recovery.postmaster_pid(p["data_dir"])
    # Connect only once the postmaster says it accepts connections: every refused attempt
    # costs the server log two lines ("not yet accepting connections"), ten times a second.
    # A pid file without its status line yet is a postmaster still starting (PostgreSQL 10+
    # writes the line; the restore's settings turn hot_standby on, so "standby" comes).
    status = recovery.postmaster_status(p["data_dir"]) if pid is not None else None
    accepting = status in ("ready", "standby")
    server = server_state(p) if pid is not None and accepting else None
    text, size = read_log(p.get("log_file"), int(p.get("log_offset") or 0))
    log = recovery.parse_recovery_log(text)
    phase = recovery.recovery_phase(
        running=pid is not None,
        connected=server is not None,
        in_recovery=None if server is None else bool(server["in_recovery"]),
        pause_state=None if server is None else server["pause_state"],
        log=log,
    )
    replay_time = server["replay_time"] if server else None
    facts: dict[str, t.Any] = {
        "phase": phase,
        "running": pid is not None,
        "pid": pid,
        "in_recovery": None if server is None else bool(server["in_recovery"]),
        "pause_state": None if server is None else server["pause_state"],
        "replay_lsn": None if server is None else server["replay_lsn"],
        "replay_time": recovery.format_target_time(replay_time) if replay_time else None,
        "timeline": None if server is None else server["timeline"],
        "stop_line": log.stop_line,
        "paused_at_target": log.paused_at_target,
        "new_timeline": log.new_timeline,
        "ended_before_target": log.ended_before_target,
        "log_failures": list(log.failures),
        "log_lines": list(log.lines),
        "log_tail": list(log.tail),
        "log_size": size,
    }
    target = p.get("target")
    if target and phase in ("paused", "promoted"):
        reached, where = recovery.confirm_stop(
            target,
            log,
            parse_lsn(server["replay_lsn"]) if server and server["replay_lsn"] else None,
            replay_time,
        )
        facts.update(target_reached=reached, stop_point=where)
    return facts


def resume_to_promote(params: t.Mapping[str, t.Any]) -> None:
    """End a recovery that paused at its target (``recovery_target_action = pause``).

    ``pg_wal_replay_resume()`` wakes the startup process at once and recovery ends; a promote
    request is only seen when its pause loop next wakes by itself (up to a second later).
    """
    from psycopg import sql

    from ansible_collections.pitr.postgresql.plugins.module_utils.postgres import (
        connect,
        execute,
    )

    with connect(params) as conn:
        execute(conn, sql.SQL("SELECT pg_catalog.pg_wal_replay_resume()"))


def progress_line(facts: t.Mapping[str, t.Any], p: t.Mapping[str, t.Any]) -> str:
    parts = [str(facts["phase"])]
    if facts["replay_lsn"]:
        end = f" of {p['wal_end_lsn']}" if p.get("wal_end_lsn") else ""
        parts.append(f"replayed to {facts['replay_lsn']}{end}")
    if facts["replay_time"]:
        parts.append(f"last commit replayed {facts['replay_time']}")
    target = p.get("target")
    if target:
        parts.append(f"target {target.get('description') or target.get('value')}")
    if facts.get("stop_point"):
        parts.append(str(facts["stop_point"]))
    if facts["phase"] == "failed" and facts["log_failures"]:
        parts.append(facts["log_failures"][-1])
    return ", ".join(parts)


def follow(
    p: t.Mapping[str, t.Any],
    wait_seconds: float,
    *,
    until: t.Collection[str] = recovery.TERMINAL_PHASES,
    started: float | None = None,
    grace_seconds: float = 0.0,
    grace_from: float | None = None,
    poll_seconds: float = POLL_SECONDS,
) -> tuple[dict[str, t.Any], list[dict[str, t.Any]]]:
    """Look until the phase is one of ``until`` or ``wait_seconds`` passed; facts and samples.

    ``grace_seconds``: right after a start the pid file may not exist yet, which looks like
    ``stopped``; that is not believed until this long after ``started`` (a server that cannot
    start at all writes its reason to the log and is then ``failed`` at once). It counts from
    ``grace_from`` (monotonic) when given: the moment the server was started.
    """
    begin = time.monotonic()
    started = begin if started is None else started
    grace_start = started if grace_from is None else grace_from
    deadline = begin + max(0.0, wait_seconds)
    samples: list[dict[str, t.Any]] = []
    last_sample = -1.0
    while True:
        facts = observe(p)
        now = time.monotonic()
        if now - last_sample >= 1.0 or facts["phase"] in until:
            samples.append(
                {
                    "seconds": round(now - started, 1),
                    "phase": facts["phase"],
                    "replay_lsn": facts["replay_lsn"],
                    "replay_time": facts["replay_time"],
                }
            )
            last_sample = now
        settled = facts["phase"] in until and not (
            facts["phase"] == "stopped" and now - grace_start < grace_seconds
        )
        if settled or now >= deadline:
            facts["progress"] = progress_line(facts, p)
            return facts, samples
        time.sleep(min(poll_seconds, max(0.0, deadline - now)))


# --------------------------------------------------------------------------------------------
# The restore's state file


def record_state(
    data_dir: str, state: t.Mapping[str, t.Any], phase: str, **extra: t.Any
) -> dict[str, t.Any]:
    """Write ``pitr_restore.json`` in ``data_dir`` with ``phase`` (atomically), owned as the
    data directory is."""
    return restore_stage.write_state(
        data_dir, {**state, **extra}, phase, recovery_conf.data_dir_owner(data_dir)
    )

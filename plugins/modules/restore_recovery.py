#!/usr/bin/python
# Copyright: contributors to pitr.postgresql
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: restore_recovery
short_description: Start a restored PostgreSQL server, follow its recovery and finish the restore
version_added: 0.1.0
description:
  - With O(step=start), records phase C(recovering) in the restore's state file
    (C(pitr_restore.json)) and, with O(service_manager=pg_ctl), starts the server
    (C(pg_ctl start --no-wait)). Returns the size the server log had before, for O(log_offset).
  - With O(step=follow) and O(start=true), first does what O(step=start) does (one call instead of
    two), and returns C(log_offset) for the calls that follow.
  - With O(step=follow), watches the server (every 0.1 s) for up to O(wait_seconds), and returns
    its progress with a sample a second. Once it stops moving on by itself, finishes the
    restore - confirms that replay stopped at the target, promotes (or leaves it paused, or shuts
    it down with O(service_manager=pg_ctl)), waits until it runs on its new timeline, removes
    the recovery settings the restore wrote, waits until the new timeline's history file is in
    the repository (not for clones), and records the outcome. A recovery that failed, ended
    before the target, or did not get there within O(timeout) seconds of O(following_since) is
    recorded as C(failed) and reported with the server's own log lines and the recoverable
    window; nothing is promoted then.
  - Run it as the server's operating-system user (C(become_user=postgres)).
options:
  step:
    description: V(start) or V(follow) (see above).
    type: str
    choices: [start, follow]
    required: true
  start:
    description: With O(step=follow), start first (see above).
    type: bool
    default: false
  data_dir:
    description: The restored data directory.
    type: path
    required: true
  state:
    description: The restore's state record (M(pitr.postgresql.restore_plan)'s C(state)).
    type: dict
    default: {}
  service_manager:
    description:
      - V(pg_ctl) - this module starts and shuts the server down; V(systemd) - the role does.
    type: str
    choices: [systemd, pg_ctl]
    default: systemd
  pg_bindir:
    description: Directory of C(pg_ctl).
    type: path
    required: true
  pg_ctl_options:
    description: Options for the server started with C(pg_ctl) (C(pg_ctl --options)).
    type: str
    default: ""
  log_file:
    description: The server log (C(pg_ctl -l), or the distribution's log file).
    type: path
  log_offset:
    description: The size the log had before this restore started the server.
    type: int
    default: 0
  target:
    description: The target, as M(pitr.postgresql.restore_plan) returns it.
    type: dict
  target_action:
    description: What to do at the target.
    type: str
    choices: [promote, pause, shutdown]
    default: promote
  wal_end_lsn:
    description: The end of the WAL to replay (from the plan), for the progress line.
    type: str
  wait_seconds:
    description: How long one call follows the server before it returns to show progress.
    type: int
    default: 10
  timeout:
    description: Give up following after this many seconds since O(following_since).
    type: int
    default: 3600
  following_since:
    description: When following started (seconds since the epoch); default now.
    type: float
  restore_started:
    description: When the restore started (seconds since the epoch), for C(duration_seconds).
    type: float
  window:
    description: The recoverable window from the plan, named in failure messages.
    type: dict
    default: {}
  repository_path:
    description:
      - The repository. When given (not for clones), the module waits up to
        O(archive_wait_seconds) for the new timeline's history file to reach it.
    type: path
  archive_wait_seconds:
    description: See O(repository_path).
    type: int
    default: 60
extends_documentation_fragment:
  - pitr.postgresql.connection
  - pitr.postgresql.connection.action_group
attributes:
  check_mode:
    description: Can run in check_mode and return changed status prediction without modifying
      target.
    support: none
    details: The pitr_restore role stops after the plan in check mode.
  diff_mode:
    description: Will return details on what has changed, when in diff mode.
    support: none
  idempotent:
    description: When run twice in a row outside check mode, with the same arguments, the second
      invocation indicates no change.
    support: partial
    details: A finished restore is recognised by M(pitr.postgresql.restore_plan), which the role
      runs first.
notes:
  - Connecting during recovery needs C(hot_standby=on), which the restore's settings include.
  - Supports PostgreSQL 13 and later; tested with PostgreSQL 15.
seealso:
  - module: pitr.postgresql.restore_plan
  - module: pitr.postgresql.restore_stage
  - module: pitr.postgresql.recovery_info
author:
  - pitr.postgresql developers (@pitr-postgresql)
"""

EXAMPLES = r"""
- name: Record that recovery starts, and start the server
  pitr.postgresql.restore_recovery:
    step: start
    data_dir: /srv/drill/data
    state: "{{ plan.state }}"
    service_manager: pg_ctl
    pg_bindir: /usr/lib/postgresql/15/bin
    log_file: /srv/drill/data.pitr-restore.log
  become: true
  become_user: postgres
  register: started

- name: Follow recovery to the target and promote
  pitr.postgresql.restore_recovery:
    step: follow
    data_dir: /srv/drill/data
    state: "{{ plan.state }}"
    service_manager: pg_ctl
    pg_bindir: /usr/lib/postgresql/15/bin
    log_file: /srv/drill/data.pitr-restore.log
    log_offset: "{{ started.log_offset }}"
    target: "{{ plan.target }}"
    wait_seconds: 600
    port: 5499
  become: true
  become_user: postgres
  register: recovered

- name: Say where replay stopped
  ansible.builtin.debug:
    msg: "{{ recovered.outcome.stop_point }}"
"""

RETURN = r"""
log_offset:
  description: The size of the server log before the start.
  returned: when O(step=start), or O(start=true)
  type: int
  sample: 18211
done:
  description: Whether the restore is finished (the server stopped moving on by itself).
  returned: when O(step=follow)
  type: bool
  sample: true
phase:
  description: V(stopped), V(starting), V(recovering), V(paused), V(promoted) or V(failed).
  returned: when O(step=follow)
  type: str
  sample: paused
progress:
  description: One line for humans.
  returned: when O(step=follow)
  type: str
  sample: recovering, replayed to 0/6A01230 of 0/A000000
samples:
  description: The server's progress during this call, about one sample a second.
  returned: when O(step=follow)
  type: list
  elements: dict
  sample: [{seconds: 1.0, phase: recovering, replay_lsn: 0/6A01230, replay_time: null}]
recovery:
  description: What the server and its log said when it stopped moving on (see
    M(pitr.postgresql.recovery_info)'s results).
  returned: when O(step=follow)
  type: dict
  sample: {phase: paused, stop_point: "stopped before commit of transaction 1234"}
outcome:
  description: The restore's result (also recorded in the state file), when done.
  returned: when O(step=follow) and done
  type: dict
  sample: {phase: completed, timeline: 2, stop_point: "...", old_data_dir: null}
"""

import time
import typing as t
from datetime import UTC, datetime

from ansible.module_utils.basic import AnsibleModule, missing_required_lib

from ansible_collections.pitr.postgresql.plugins.module_utils import (
    pgctl,
    prefetch,
    recovery_conf,
    recovery_run,
    restore_lease,
    restore_stage,
)
from ansible_collections.pitr.postgresql.plugins.module_utils.errors import PitrError
from ansible_collections.pitr.postgresql.plugins.module_utils.postgres import (
    PSYCOPG_IMPORT_ERROR,
    connection_argument_spec,
)
from ansible_collections.pitr.postgresql.plugins.module_utils.repository import Repository
from ansible_collections.pitr.postgresql.plugins.module_utils.walfile import history_name

ARGUMENT_SPEC: dict[str, dict[str, t.Any]] = {
    "step": {"type": "str", "choices": ["start", "follow"], "required": True},
    "start": {"type": "bool", "default": False},
    "data_dir": {"type": "path", "required": True},
    "state": {"type": "dict", "default": {}},
    "service_manager": {"type": "str", "choices": ["systemd", "pg_ctl"], "default": "systemd"},
    "pg_bindir": {"type": "path", "required": True},
    "pg_ctl_options": {"type": "str", "default": ""},
    "log_file": {"type": "path"},
    "log_offset": {"type": "int", "default": 0},
    "target": {"type": "dict"},
    "target_action": {
        "type": "str",
        "choices": ["promote", "pause", "shutdown"],
        "default": "promote",
    },
    "wal_end_lsn": {"type": "str"},
    "wait_seconds": {"type": "int", "default": 10},
    "timeout": {"type": "int", "default": 3600},
    "following_since": {"type": "float"},
    "restore_started": {"type": "float"},
    "window": {"type": "dict", "default": {}},
    "repository_path": {"type": "path"},
    "archive_wait_seconds": {"type": "int", "default": 60},
}
# Right after a start the pid file may not be there yet: not "stopped" before this.
START_GRACE_SECONDS = 5.0


def failure_message(p: t.Mapping[str, t.Any], r: t.Mapping[str, t.Any]) -> str:
    """Why the restore stops without promoting, with the server's words and the window."""
    target = (p["target"] or {}).get("description") or "the target"
    log = p["log_file"] or "the server log"
    if r["ended_before_target"]:
        why = (
            f"Recovery ended before reaching the target ({target}): the archived WAL ends earlier."
        )
    elif r["phase"] == "failed":
        why = f"Recovery failed: {' / '.join(r['log_failures'][-3:])}."
    elif r["phase"] == "stopped" and r["log_tail"]:
        why = (
            f"The server stopped during recovery; the last lines of {log}:"
            f" {' / '.join(r['log_tail'][-6:])}."
        )
    elif r["phase"] == "stopped":
        why = f"The server stopped during recovery without saying why in {log}."
    else:
        why = (
            f"Recovery did not reach the target within {p['timeout']} s and is still running"
            f" ({r['progress']}). Re-run with the same arguments to keep following it."
        )
    window = p["window"] or {}
    old = (p["state"] or {}).get("old_data_dir") or "(there was none)"
    return (
        f"{why} Nothing was promoted. The old data directory is untouched at {old}; the"
        f" restored one at {p['data_dir']} still holds recovery.signal, so it cannot start as"
        f" if nothing happened. Recoverable window: after {window.get('earliest_time') or '?'}"
        f" up to {window.get('latest_commit_time') or window.get('last_segment') or '?'}."
        f" Server log: {' | '.join(r['log_lines'][-12:])}"
    )


def finish(
    module: AnsibleModule, p: t.Mapping[str, t.Any], r: dict[str, t.Any]
) -> dict[str, t.Any]:
    """Confirm, promote or pause or shut down, clean up, record: the restore's outcome."""
    data_dir, state = p["data_dir"], p["state"] or {}
    if r["phase"] not in ("paused", "promoted"):
        recovery_run.record_state(
            data_dir,
            state,
            "failed",
            failure={"phase": r["phase"], "log_failures": r["log_failures"]},
        )
        lease_done(module, state, "drop")  # this attempt is over; a re-run takes a new one
        discard_prefetch(module, data_dir)
        module.fail_json(msg=failure_message(p, r), recovery=r)
    target = (p["target"] or {}).get("description") or "the target"
    if r.get("target_reached") is False:
        module.fail_json(
            msg=f"Replay paused, but not where asked ({target}): {r.get('stop_point')}. Nothing"
            f" was promoted; the server at {data_dir} is paused for inspection and the old data"
            f" directory is at {state.get('old_data_dir') or '(there was none)'}.",
            recovery=r,
        )
    promote = p["target_action"] == "promote"
    if r["phase"] == "paused" and promote and r.get("target_reached") is None:
        module.fail_json(
            msg=f"Replay paused, but the stop point cannot be confirmed ({r.get('stop_point')})."
            " Point pitr_restore_log_file at the server log, or check it yourself and promote"
            f" with pg_ctl promote. The server at {data_dir} stays paused.",
            recovery=r,
        )
    timeline = r["timeline"]
    history_archived = None
    if promote:
        if r["phase"] == "paused" and r.get("paused_at_target"):
            # The server log says recovery paused at its end (the target): resuming ends it.
            recovery_run.resume_to_promote(p)
        elif r["phase"] == "paused":
            pgctl.pg_ctl(p["pg_bindir"], "promote", data_dir, "--wait", "--timeout=300")
        promoted, _samples = recovery_run.follow(
            p, 60, until=("promoted", "failed", "stopped"), poll_seconds=0.05
        )
        if promoted["phase"] != "promoted":
            module.fail_json(
                msg=f"The server at {data_dir} did not come out of recovery when promoted"
                f" ({promoted['progress']}). Server log: {' | '.join(promoted['log_lines'][-12:])}",
                recovery=promoted,
            )
        timeline = promoted["timeline"]
        lease_done(module, state, "drop")  # promoted: the restore reads no more WAL
        discard_prefetch(module, data_dir)
        change = recovery_conf.plan_absent(data_dir, "recovery")
        if change.changed:
            recovery_conf.apply(data_dir, change)
        if p["repository_path"] and timeline:
            name = history_name(int(timeline))
            repo = Repository.open_posix(p["repository_path"])
            deadline = time.monotonic() + max(0, p["archive_wait_seconds"])
            history_archived = repo.wal_stat(name) is not None
            while not history_archived and time.monotonic() < deadline:
                time.sleep(0.5)
                history_archived = repo.wal_stat(name) is not None
            if not history_archived:
                module.fail_json(
                    msg=f"The server was promoted to timeline {timeline}, but its history file"
                    f" {name} did not reach the repository within {p['archive_wait_seconds']} s:"
                    " check archiving (pitr.postgresql.archive_info).",
                    recovery=promoted,
                )
    elif p["target_action"] == "shutdown" and p["service_manager"] == "pg_ctl":
        pgctl.pg_ctl(p["pg_bindir"], "stop", data_dir, "--mode=fast", "--wait", "--timeout=300")
    if not promote:  # paused or shut down at the target: it fetches nothing until told
        discard_prefetch(module, data_dir)
    phase = {"promote": "completed", "pause": "paused", "shutdown": "shutdown"}[p["target_action"]]
    started = p["restore_started"]
    outcome = {
        "phase": phase,
        "backup": (state.get("backup") or {}).get("label"),
        "target": (p["target"] or {}).get("description"),
        "stop_point": r.get("stop_point"),
        "stop_line": r["stop_line"],
        "replay_lsn": r["replay_lsn"],
        "last_replayed_commit": r["replay_time"],
        "timeline": timeline,
        "history_archived": history_archived,
        "old_data_dir": state.get("old_data_dir"),
        "data_dir": data_dir,
        "duration_seconds": round(time.time() - started, 1) if started else None,
    }
    # An earlier attempt's failure is history now.
    recovery_run.record_state(data_dir, state, phase, result=outcome, failure=None)
    return outcome


def discard_prefetch(module: AnsibleModule, data_dir: str) -> None:
    """Stop the WAL prefetcher of ``pitr-wal fetch --prefetch`` and remove its spool."""
    spool = prefetch.default_spool(data_dir)
    try:
        if not prefetch.discard(spool):
            module.warn(f"the WAL prefetcher of {spool} did not stop within 10 s")
    except OSError as exc:
        module.warn(f"cannot remove the WAL prefetch spool {spool}: {exc.strerror}")


def lease_done(module: AnsibleModule, state: t.Mapping[str, t.Any], action: str) -> None:
    """Renew (when half its lifetime is gone) or drop the restore's lease, if it has one; a
    repository this host cannot write only gets a warning."""
    lease = state.get("lease") or {}
    if not lease.get("id") or not lease.get("repository"):
        return
    try:
        repo = Repository.open_posix(lease["repository"])
        if action == "drop":
            restore_lease.drop(repo, lease["id"])
            return
        current = restore_lease.get(repo, lease["id"])
        if current is None:
            module.warn(
                f"the restore lease {lease['id']} is gone (expired and removed by a retention"
                " prune?): the backup and WAL this restore reads are no longer protected from it"
            )
        elif (current.expires - datetime.now(UTC)).total_seconds() < current.ttl_seconds / 2:
            restore_lease.renew(repo, lease["id"])
    except PitrError as exc:
        done = "dropped" if action == "drop" else "renewed"
        module.warn(f"the restore lease {lease['id']} could not be {done}: {exc.msg}")


def start(p: t.Mapping[str, t.Any]) -> dict[str, t.Any]:
    """Record phase ``recovering``, then start the server when this module manages it."""
    manage = p["service_manager"] == "pg_ctl"
    _record, started = restore_stage.begin_recovery(
        p["data_dir"],
        p["state"],
        p["log_file"],
        (p["pg_bindir"], p["pg_ctl_options"]) if manage else None,
    )
    return started


def main() -> None:
    argument_spec = connection_argument_spec()
    argument_spec.update(ARGUMENT_SPEC)
    module = AnsibleModule(argument_spec=argument_spec, supports_check_mode=False)
    if PSYCOPG_IMPORT_ERROR is not None:
        module.fail_json(msg=missing_required_lib("psycopg"), exception=PSYCOPG_IMPORT_ERROR)
    p = module.params
    try:
        started: dict[str, t.Any] = {}
        if p["step"] == "start" or p["start"]:
            started = start(p)
            if p["step"] == "start":
                module.exit_json(changed=True, **started)
            p = {**p, "log_offset": started["log_offset"]}
        since = p["following_since"] or time.time()
        # monotonic start of this follow, shifted back by the time already spent following
        begun = time.monotonic() - max(0.0, time.time() - since)
        r, samples = recovery_run.follow(
            p,
            p["wait_seconds"],
            started=begun,
            grace_seconds=START_GRACE_SECONDS,
            # a start in this call: the grace counts from it, not from the role's clock
            grace_from=time.monotonic() if started else None,
        )
        timed_out = time.time() - since >= p["timeout"]
        if r["phase"] in ("starting", "recovering") and not timed_out:
            lease_done(module, p["state"] or {}, "renew")
            module.exit_json(
                changed=bool(started),
                **started,
                done=False,
                phase=r["phase"],
                progress=r["progress"],
                samples=samples,
                recovery=r,
            )
        outcome = finish(module, p, r)
    except PitrError as exc:
        module.fail_json(**exc.to_result())
    module.exit_json(
        changed=True,
        **started,
        done=True,
        phase=r["phase"],
        progress=r["progress"],
        samples=samples,
        recovery=r,
        outcome=outcome,
    )


if __name__ == "__main__":
    main()

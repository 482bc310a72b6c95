#!/usr/bin/python
# Copyright: contributors to pitr.postgresql
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: restore_stage
short_description: Lay a base backup down beside a data directory, then swap it into place
version_added: 0.1.0
description:
  - With O(step=stage), builds C(<data_dir>.pitr-staging) in one call - the restore's state
    file (C(pitr_restore.json), phase C(staging)), the base backup (tar, compressed or not, with
    its own WAL in C(pg_wal), or a plain copy), without the repository's files, signal files
    and pid files of the source, C(pg_wal/archive_status), a check that C(backup_label) came
    with it, the clone settings and the recovery settings with C(recovery.signal) (as
    M(pitr.postgresql.recovery_settings) writes them), and finally phase C(prepared).
  - With O(step=swap), moves the data directory aside to O(old_data_dir) (never deletes it; an
    empty one is removed with C(rmdir)) and renames the prepared staging directory into place.
    Each rename is done only when still needed, so a run interrupted between them resumes.
  - Never stops PostgreSQL (the pitr.postgresql.pitr_restore role stops it before); starts it
    only with O(start), once the restored directory is in place.
options:
  step:
    description:
      - V(stage) lays the backup down in the staging directory; V(swap) puts it in place.
    type: str
    choices: [stage, swap]
    required: true
  data_dir:
    description:
      - The data directory being restored. The staging directory is this path plus
        C(.pitr-staging), in the same parent directory.
    type: path
    required: true
  backup:
    description:
      - The backup to lay down, as M(pitr.postgresql.restore_plan) returns it (C(label),
        C(path), C(layout)). Required with O(step=stage).
    type: dict
  state:
    description:
      - The restore's state record (M(pitr.postgresql.restore_plan)'s C(state)), written to
        C(pitr_restore.json) with the phase.
    type: dict
    default: {}
  settings:
    description:
      - The recovery settings (M(pitr.postgresql.restore_plan)'s C(settings)). Required with
        O(step=stage).
    type: dict
  clone_settings:
    description:
      - Settings of a copy (another port, no archiving into the production repository),
        written as the block V(clone).
    type: dict
    default: {}
  owner:
    description:
      - The user that runs PostgreSQL; it owns everything laid down.
    type: str
    default: postgres
  mode:
    description:
      - Mode of the staging (then data) directory.
    type: str
    default: "0700"
  remove_stale_staging:
    description:
      - Remove an unfinished staging directory of an interrupted run first (the plan says when).
    type: bool
    default: false
  standalone_config:
    description:
      - Write a minimal C(postgresql.conf), C(pg_hba.conf) (local peer) and C(pg_ident.conf)
        when the backup has none, as for a copy of a Debian cluster whose configuration lives in
        C(/etc/postgresql), so that C(pg_ctl start) works on the copy.
    type: bool
    default: false
  swap_if_free:
    description:
      - With O(step=stage), when nothing is at O(data_dir) (a copy into a new directory), put
        the prepared directory in place in the same call (one rename, as O(step=swap) would);
        returns C(swapped). Where a data directory exists, O(step=swap) moves it aside later.
    type: bool
    default: false
  start:
    description:
      - With O(step=stage), when this call put the prepared directory in place
        (O(swap_if_free)), record phase C(recovering) and start PostgreSQL with
        C(pg_ctl start --no-wait) as O(owner), so that the server replays while the next
        tasks run; returns RV(started). Otherwise nothing is started (RV(started) is not
        returned) and M(pitr.postgresql.restore_recovery) starts it.
    type: dict
    suboptions:
      pg_bindir:
        description: The directory of the server's C(pg_ctl).
        type: path
        required: true
      log_file:
        description: The server log C(pg_ctl -l) writes to.
        type: path
        required: true
      pg_ctl_options:
        description: Options for the server (C(pg_ctl -o)).
        type: str
        default: ""
  record_start:
    description:
      - With O(step=swap), or with O(step=stage) when that call put the prepared directory in
        place (O(swap_if_free)) and O(start) is not given - once the restored directory is in
        place, record phase C(recovering) in its state file (owned by O(owner)) and return
        RV(recorded) with the server log's size, so that the start that comes next (systemd)
        needs no call of M(pitr.postgresql.restore_recovery) to record it. Nothing is started.
        Not in check mode.
    type: dict
    suboptions:
      log_file:
        description: The server log, whose size is where this start's lines begin.
        type: path
  lease:
    description:
      - With O(step=stage), take a restore lease in the repository first, so that a retention
        prune keeps the backup and the WAL this restore reads (see M(pitr.postgresql.retention)).
        Its id is recorded in the restore's state file as C(lease); the restore drops it once
        promoted. A repository this host cannot write gets no lease, with a warning.
    type: dict
    suboptions:
      repository_path:
        description: The repository.
        type: path
        required: true
      first_segment:
        description: The first WAL segment the restore reads (from the plan).
        type: str
      ttl_seconds:
        description: The lease's lifetime; the restore renews it while it follows recovery.
        type: int
        default: 86400
  old_data_dir:
    description:
      - Where the current data directory goes with O(step=swap). Empty - there is none, or an
        empty one that is removed.
    type: str
  full:
    description:
      - With O(step=swap), V(true) when this run laid the backup down (move the old directory
        aside); V(false) when it only resumes (put a prepared staging directory in place).
    type: bool
    default: true
attributes:
  check_mode:
    description: Can run in check_mode and return changed status prediction without modifying
      target.
    support: full
  diff_mode:
    description: Will return details on what has changed (or possibly needs changing in
      check_mode), when in diff mode.
    support: none
  idempotent:
    description: When run twice in a row outside check mode, with the same arguments, the second
      invocation indicates no change.
    support: partial
    details: O(step=swap) changes nothing once done (but writes the state file again with
      O(record_start)); O(step=stage) lays the backup down again.
notes:
  - Supports PostgreSQL 13 and later; tested with PostgreSQL 15.
  - Run it as root (it gives the files to O(owner)) or as O(owner) with write access to the
    parent directory.
seealso:
  - module: pitr.postgresql.restore_plan
  - module: pitr.postgresql.recovery_settings
  - module: pitr.postgresql.recovery_info
author:
  - pitr.postgresql developers (@pitr-postgresql)
"""

EXAMPLES = r"""
- name: Plan the restore
  pitr.postgresql.restore_plan:
    repository_path: /srv/pitr/repo
    target_time: "2026-11-25 10:30:00+00"
  register: plan

- name: Lay the backup down beside the data directory
  pitr.postgresql.restore_stage:
    step: stage
    data_dir: "{{ plan.data_dir.path }}"
    backup: "{{ plan.backup }}"
    state: "{{ plan.state }}"
    settings: "{{ plan.settings }}"
    remove_stale_staging: "{{ plan.data_dir.remove_stale_staging }}"
  register: staged

- name: Put it in place, keeping the old data directory
  pitr.postgresql.restore_stage:
    step: swap
    data_dir: "{{ plan.data_dir.path }}"
    old_data_dir: "{{ plan.data_dir.old_data_dir }}"
  register: swapped

- name: Say where the old data directory is
  ansible.builtin.debug:
    msg: "{{ swapped.steps | join('; ') }}"
"""

RETURN = r"""
staging_dir:
  description: The staging directory.
  returned: always
  type: str
  sample: /var/lib/postgresql/15/main.pitr-staging
swapped:
  description: Whether O(swap_if_free) put the prepared directory in place.
  returned: with O(step=stage)
  type: bool
  sample: true
steps:
  description: What was done (or would be, in check mode), one line per step.
  returned: always
  type: list
  elements: str
  sample:
    - move /var/lib/postgresql/15/main aside to /var/lib/postgresql/15/main.pitr-old-20261125T1030Z
state:
  description: The state record written last, with O(step=stage) outside check mode.
  returned: when O(step=stage), or O(step=swap) with O(record_start)
  type: dict
  sample: {phase: prepared, backup: {label: 20261125T101500Z}}
started:
  description:
    - The start of the server by O(start) - the server log's size before it (where this
      start's lines begin), the pg_ctl command, and when (seconds since the epoch).
  returned: when O(start) started the server
  type: dict
  sample: {log_offset: 0, cmd: [/usr/lib/postgresql/15/bin/pg_ctl, start], started: 1795646024.0}
recorded:
  description:
    - What O(record_start) recorded for the start that comes next - the server log's size
      (where that start's lines begin), no command, and when (seconds since the epoch).
  returned: when O(record_start) recorded phase C(recovering)
  type: dict
  sample: {log_offset: 18211, cmd: [], started: 1795646024.0}
written_config:
  description: The configuration files written because the backup had none (O(standalone_config)).
  returned: when O(step=stage)
  type: list
  elements: str
  sample: [postgresql.conf, pg_hba.conf, pg_ident.conf]
"""

import dataclasses
import os
import typing as t

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.pitr.postgresql.plugins.module_utils import restore_lease, restore_stage
from ansible_collections.pitr.postgresql.plugins.module_utils.errors import PitrError
from ansible_collections.pitr.postgresql.plugins.module_utils.repository import Repository


def as_setting(value: t.Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


ARGUMENT_SPEC: dict[str, dict[str, t.Any]] = {
    "step": {"type": "str", "choices": ["stage", "swap"], "required": True},
    "data_dir": {"type": "path", "required": True},
    "backup": {"type": "dict"},
    "state": {"type": "dict", "default": {}},
    "settings": {"type": "dict"},
    "clone_settings": {"type": "dict", "default": {}},
    "owner": {"type": "str", "default": "postgres"},
    "mode": {"type": "str", "default": "0700"},
    "remove_stale_staging": {"type": "bool", "default": False},
    "standalone_config": {"type": "bool", "default": False},
    "old_data_dir": {"type": "str"},
    "full": {"type": "bool", "default": True},
    "swap_if_free": {"type": "bool", "default": False},
    "start": {
        "type": "dict",
        "options": {
            "pg_bindir": {"type": "path", "required": True},
            "log_file": {"type": "path", "required": True},
            "pg_ctl_options": {"type": "str", "default": ""},
        },
    },
    "record_start": {"type": "dict", "options": {"log_file": {"type": "path"}}},
    "lease": {
        "type": "dict",
        "options": {
            "repository_path": {"type": "path", "required": True},
            "first_segment": {"type": "str"},
            "ttl_seconds": {"type": "int", "default": 86400},
        },
    },
}


def take_lease(
    module: AnsibleModule, p: t.Mapping[str, t.Any]
) -> tuple[Repository, dict[str, t.Any]] | None:
    """A restore lease on the backup (None, with a warning, when it cannot be written)."""
    state = p["state"] or {}
    repo = Repository.open_posix(p["lease"]["repository_path"])
    timeline = (state.get("timeline") or {}).get("resolved")
    lease, reason = restore_lease.take(
        repo,
        backup_label=str(p["backup"].get("label")),
        data_dir=p["data_dir"],
        target=str((state.get("target") or {}).get("description") or ""),
        first_segment=p["lease"]["first_segment"],
        timeline=int(timeline) if timeline else None,
        ttl_seconds=p["lease"]["ttl_seconds"],
    )
    if lease is None:
        module.warn(str(reason))
        return None
    return repo, {"id": lease.lease_id, "repository": p["lease"]["repository_path"]}


def main() -> None:
    module = AnsibleModule(
        argument_spec=ARGUMENT_SPEC,
        required_if=[("step", "stage", ("backup", "settings"))],
        supports_check_mode=True,
    )
    p = module.params
    result: dict[str, t.Any] = {"staging_dir": restore_stage.staging_dir(p["data_dir"])}
    try:
        if p["step"] == "swap":
            swap = restore_stage.plan_swap(p["data_dir"], p["old_data_dir"] or None, p["full"])
            if swap.changed and not module.check_mode:
                restore_stage.swap(swap)
            steps = swap.steps()
            if p["record_start"] and not module.check_mode:
                result["state"], result["recorded"] = restore_stage.begin_recovery(
                    p["data_dir"], p["state"], p["record_start"]["log_file"], None, p["owner"]
                )
                steps.append(f"record phase recovering in {p['data_dir']}/pitr_restore.json")
            module.exit_json(changed=swap.changed or "recorded" in result, steps=steps, **result)
        request = restore_stage.StageRequest(
            data_dir=p["data_dir"],
            backup=p["backup"],
            state=p["state"],
            settings={str(k): as_setting(v) for k, v in p["settings"].items()},
            clone_settings={str(k): as_setting(v) for k, v in p["clone_settings"].items()},
            owner=p["owner"],
            mode=int(p["mode"], 8),
            remove_stale_staging=p["remove_stale_staging"],
            standalone_config=p["standalone_config"],
        )
        steps = restore_stage.plan_stage(request)
        if module.check_mode:
            module.exit_json(
                changed=True, steps=steps, state=dict(p["state"]), written_config=[], **result
            )
        taken = take_lease(module, p) if p["lease"] else None
        if taken is not None:
            request = dataclasses.replace(request, state={**request.state, "lease": taken[1]})
        try:
            record = restore_stage.stage(request)
        except BaseException:
            if taken is not None:  # this attempt is over; the next one takes its own lease
                restore_lease.drop(taken[0], taken[1]["id"])
            raise
    except (PitrError, ValueError) as exc:
        if isinstance(exc, PitrError):
            module.fail_json(**exc.to_result())
        module.fail_json(msg=f"mode {p['mode']!r} is not an octal file mode such as 0700")
    written = record.pop("written_config", [])
    swapped = False
    if p["swap_if_free"] and not os.path.lexists(p["data_dir"]):
        swap = restore_stage.plan_swap(p["data_dir"], None, True)
        try:
            restore_stage.swap(swap)
            swapped = swap.changed
            steps += swap.steps()
            if swapped and p["start"]:
                start = p["start"]
                record, result["started"] = restore_stage.begin_recovery(
                    p["data_dir"],
                    record,
                    start["log_file"],
                    (start["pg_bindir"], start["pg_ctl_options"]),
                    owner=p["owner"],
                )
                steps.append(f"start PostgreSQL on {p['data_dir']} (pg_ctl start --no-wait)")
            elif swapped and p["record_start"]:
                record, result["recorded"] = restore_stage.begin_recovery(
                    p["data_dir"], record, p["record_start"]["log_file"], None, p["owner"]
                )
                steps.append(f"record phase recovering in {p['data_dir']}/pitr_restore.json")
        except PitrError as exc:
            module.fail_json(**exc.to_result())
    module.exit_json(
        changed=True,
        steps=steps,
        state=record,
        written_config=written,
        swapped=swapped,
        **result,
    )


if __name__ == "__main__":
    main()

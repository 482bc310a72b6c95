#!/usr/bin/python
# Copyright: contributors to pitr.postgresql
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: restore_plan
short_description: Plan a point-in-time restore of PostgreSQL, or refuse it before anything changes
version_added: 0.1.0
description:
  - Reads the repository (catalog of base backups, archived WAL, timeline history files) and
    the data directory, and decides what a point-in-time restore to the given target would do.
    It changes nothing, in check mode or not.
  - Validates the target. Exactly one of O(target_time), O(target_lsn), O(target_xid),
    O(target_name) or O(target). A time must name its zone unambiguously, with a UTC offset
    (V(2026-11-25 10:30:00+00)) or a full time zone name (V(2026-11-25 11:30:00 Europe/Berlin));
    times without a zone, abbreviations such as C(CET) or C(EST), and local times made
    ambiguous or impossible by a daylight-saving change are refused.
  - Chooses the newest usable (finished and verified) backup whose stop point lies before the
    target on the timeline path PostgreSQL will follow. For O(target_time) the backup must have
    ended before the target time; for O(target_lsn) its stop LSN must not be after the target.
    For O(target_xid) and O(target_name) the WAL position of the target is unknown until replay
    reaches it, so the newest usable backup is chosen (pick an older one with O(backup_label)
    when the transaction or restore point is older than the newest backup).
  - Checks that every WAL segment from the backup's start to the segment where replay will
    stop is archived, following timeline history files. For a time target the stop segment is
    found by reading commit times in the archived WAL with C(pg_waldump), in a binary search
    (a few segments are read, not all). A target after the last archived commit, before the
    oldest backup, or behind a gap in the archive fails with the recoverable window and the
    nearest targets that would work.
  - Reports the plan as structured data; the role P(pitr.postgresql.pitr_restore#role) carries
    it out, and in check mode shows only this plan.
options:
  repository_path:
    description:
      - The repository directory (local or a mounted network file system).
    type: path
    required: true
  data_dir:
    description:
      - The data directory to restore into. With O(clone=false), the cluster's own data
        directory; it is moved aside, never deleted.
      - Default C(/var/lib/postgresql/MAJOR/main) (Debian's layout) with the major version
        recorded in the repository.
    type: path
  target_time:
    description:
      - Restore to this time. Transactions that committed at or before it are recovered
        (or strictly before it with O(target_inclusive=false)).
      - Needs an explicit UTC offset or a full time zone name, for example
        V(2026-11-25 10:30:00+00) or V(2026-11-25 11:30:00 Europe/Berlin).
    type: str
  target_lsn:
    description:
      - Restore to this WAL position (as PostgreSQL prints it, V(0/3000148)).
    type: str
  target_xid:
    description:
      - Restore up to (and including, unless O(target_inclusive=false)) the commit of this
        transaction.
    type: str
  target_name:
    description:
      - Restore to the restore point of this name (made with C(pg_create_restore_point())).
    type: str
  target:
    description:
      - V(immediate) stops as soon as the base backup is consistent; V(latest) replays all
        archived WAL and then ends recovery.
    type: str
    choices: [immediate, latest]
  target_inclusive:
    description:
      - Whether the target itself is recovered (V(true), PostgreSQL's default) or recovery stops
        just before it. Applies to O(target_time), O(target_lsn) and O(target_xid).
    type: bool
  target_timeline:
    description:
      - The timeline to recover along. V(latest) (PostgreSQL's default) follows the newest
        timeline whose history file is archived; V(current) stays on the backup's timeline; a
        number names one (use it to reach a point on the original timeline after an earlier
        restore created a new one).
      - The plan writes the resolved timeline number into the settings.
    type: str
    default: latest
  target_action:
    description:
      - What the role does once replay stopped at the target and the stop point was confirmed.
        V(promote) ends recovery; V(pause) leaves the server paused, read-only, for inspection;
        V(shutdown) stops it (starting it again replays to the same target).
      - The settings written always use C(recovery_target_action=pause), so that the role can
        confirm the stop point first.
      - V(target=latest) needs V(promote).
    type: str
    choices: [promote, pause, shutdown]
    default: promote
  backup_label:
    description:
      - Use this backup instead of letting the planner choose. It must be usable and reach the
        target.
    type: str
  clone:
    description:
      - Restore a copy (for checks or a restore drill) rather than the cluster itself. The
        settings then also turn C(archive_mode) off, so that the copy never writes into the
        production archive, and set O(clone_port).
    type: bool
    default: false
  clone_port:
    description:
      - The port a clone listens on (written into its C(postgresql.auto.conf)).
    type: int
  force:
    description:
      - Plan a new restore even when the data directory records a finished restore to the same
        target (which otherwise plans nothing).
    type: bool
    default: false
  pitr_wal:
    description:
      - Absolute path of the C(pitr-wal) command on the host that will run the restored server;
        it becomes the C(restore_command). The module fails when it is missing, before it
        reads the repository.
    type: path
    default: /usr/local/lib/pitr-postgresql/bin/pitr-wal
  wal_prefetch:
    description:
      - WAL segments the C(restore_command) fetches ahead, in parallel, into
        C(pg_wal/pitr-prefetch) of the restored data directory (C(pitr-wal fetch --prefetch N)),
        while the server replays the one before. V(0) fetches one segment at a time.
    type: int
    default: 0
  python:
    description:
      - Absolute path of the interpreter that runs C(pitr-wal).
    type: path
    default: /usr/bin/python3
  pg_bindir:
    description:
      - Directory of the PostgreSQL programs (C(pg_waldump), C(pg_ctl)).
      - Default C(/usr/lib/postgresql/MAJOR/bin) with the repository's major version.
    type: path
  validate_only:
    description:
      - Only validate the request and read the data directory (what runs there, what a
        previous restore recorded); choose no backup and read no WAL. The role uses it before it
        forces a WAL switch on a running server.
    type: bool
    default: false
attributes:
  check_mode:
    description: Can run in check_mode and return changed status prediction without modifying
      target. This module only reads, so check mode returns the same full plan.
    support: full
  diff_mode:
    description: Will return details on what has changed, when in diff mode.
    support: N/A
    details: This module changes nothing.
  idempotent:
    description: When run twice in a row outside check mode, with the same arguments, the second
      invocation indicates no change.
    support: full
notes:
  - Runs on the host that will run the restored server, which must read the repository (only
    repositories on a local or mounted file system are supported).
  - Supports PostgreSQL 13 and later; tested with PostgreSQL 15.
  - Time targets are written in UTC, so the server's C(timezone) setting does not matter.
  - Tablespaces are not supported yet; backups holding them are refused.
seealso:
  - module: pitr.postgresql.recovery_settings
  - module: pitr.postgresql.recovery_info
  - name: Recovery target settings
    description: The PostgreSQL documentation of recovery_target_* settings.
    link: https://www.postgresql.org/docs/current/runtime-config-wal.html#RUNTIME-CONFIG-WAL-RECOVERY-TARGET
author:
  - pitr.postgresql developers (@pitr-postgresql)
"""

EXAMPLES = r"""
- name: Plan a restore to half past ten UTC
  pitr.postgresql.restore_plan:
    repository_path: /srv/pitr/main
    target_time: "2026-11-25 10:30:00+00"
  register: restore

- name: Show what the restore would do
  ansible.builtin.debug:
    msg: >-
      Backup {{ restore.backup.label }}, WAL {{ restore.wal.first }} .. {{ restore.wal.last }}
      ({{ restore.wal.segments }} segments); steps: {{ restore.steps | join('; ') }}

- name: Plan a drill restoring the state before a transaction into a scratch directory
  pitr.postgresql.restore_plan:
    repository_path: /srv/pitr/main
    data_dir: /srv/drill/data
    target_xid: "74211"
    target_inclusive: false
    target_action: pause
    clone: true
    clone_port: 5499
  register: drill

- name: Find the recoverable window when a target is refused
  pitr.postgresql.restore_plan:
    repository_path: /srv/pitr/main
    target_time: "2026-11-25 11:30:00 Europe/Berlin"
  register: attempt
  failed_when: false

- name: Show the window and the nearest targets that would work
  ansible.builtin.debug:
    msg: "{{ attempt.window | default({}) }} / {{ attempt.nearest_targets | default([]) }}"
  when: attempt.failed | default(false) or attempt.msg is defined
"""

RETURN = r"""
decision:
  description:
    - V(restore) (a full restore), V(resume) (a restore to this target was interrupted and can
      continue) or V(none) (the data directory records a finished restore to this target).
  returned: success
  type: str
  sample: restore
reason:
  description: Why this action.
  returned: success
  type: str
  sample: restoring
target:
  description: The validated target and the value written for PostgreSQL (times in UTC).
  returned: success
  type: dict
  sample: {kind: time, value: "2026-11-25 10:30:00+00", inclusive: true, timeline: latest,
           action: promote, description: "time 2026-11-25 10:30:00+00 inclusive"}
fingerprint:
  description: Identifies the same restore across runs (target, timeline, backup, paths).
  returned: success
  type: str
  sample: 4f0c3b8a6a1d4c1e9f7e2b3a5c6d7e8f
backup:
  description: The backup chosen (catalog fields, its path and how to lay it down).
  returned: when decision is restore
  type: dict
  sample:
    label: 20261125T090000Z
    stop_time: "2026-11-25T09:01:12+00:00"
    stop_lsn: 0/5000138
    timeline: 1
    backup_format: tar
    compression: server-zstd:1
    path: /srv/pitr/main/backups/20261125T090000Z
    layout: {format: tar, base: base.tar.zst, wal: pg_wal.tar.zst, decompress: zstd,
             wal_decompress: zstd}
timeline:
  description: The timeline requested, the number it resolved to and the path of timelines.
  returned: when decision is restore
  type: dict
  sample: {requested: latest, resolved: 1, backup_timeline: 1,
           path: [{timeline: 1, begin_lsn: 0/0, end_lsn: null}]}
wal:
  description:
    - The WAL to replay. C(last) is the segment where replay stops (exact for time, LSN and
      immediate targets; for xid, name and latest the end of the unbroken archived WAL).
  returned: when decision is restore
  type: dict
  sample: {first: "000000010000000000000005", last: "000000010000000000000009", segments: 5,
           stored_bytes: 9437184, bytes: 83886080, last_is_exact: true, end_lsn: 0/A000000,
           archive_last: "00000001000000000000000C"}
window:
  description:
    - The recoverable window along the timeline path (earliest after the oldest usable
      backup's end, latest commit in the unbroken archived WAL, gaps), and
      C(timelines), the per-timeline view of the repository.
  returned: success, and in the failure result when the target is out of range
  type: dict
  sample: {earliest_time: "2026-11-25T09:01:12+00:00", latest_commit_time: "2026-11-25 11:59:58+00",
           last_segment: "00000001000000000000000C", gap: [], timelines: []}
nearest_targets:
  description: In the failure result, targets nearest the window's edges that would be accepted.
  returned: failure because of the target
  type: list
  elements: dict
  sample: [{edge: latest, target_time: "2026-11-25 11:59:58+00", inclusive: false}]
data_dir:
  description:
    - The data directory, whether it exists and a server runs on it, where it will be moved
      (C(old_data_dir), never deleted) and the staging directory the backup is laid down in.
  returned: success
  type: dict
  sample: {path: /var/lib/postgresql/15/main, exists: true, running: true, pid: 812,
           old_data_dir: /var/lib/postgresql/15/main.pitr-old-20261125T113000Z,
           staging_dir: /var/lib/postgresql/15/main.pitr-staging}
space:
  description: The space the restore needs beside the data directory and what is free.
  returned: when decision is restore
  type: dict
  sample: {needed_bytes: 3221225472, available_bytes: 53687091200, ok: true}
settings:
  description: The recovery settings to write into C(postgresql.auto.conf).
  returned: success
  type: dict
  sample:
    restore_command: >-
      /usr/bin/python3 -I -S /usr/local/lib/pitr-postgresql/bin/pitr-wal
      --repo /srv/pitr/main fetch %f %p
    recovery_target_time: "2026-11-25 10:30:00+00"
    recovery_target_inclusive: "on"
    recovery_target_action: pause
    recovery_target_timeline: "1"
    hot_standby: "on"
clone_settings:
  description: Settings kept after recovery in a clone (C(archive_mode) off, the port).
  returned: success
  type: dict
  sample: {archive_mode: "off", port: "5499"}
state:
  description:
    - The restore's state record, written by the role into the data directory as
      C(pitr_restore.json) (for V(resume) and V(none), the one found there).
  returned: success
  type: dict
  sample: {format: 1, fingerprint: 4f0c3b8a6a1d4c1e9f7e2b3a5c6d7e8f, phase: staging}
steps:
  description: What the restore will do, in order, as sentences.
  returned: success
  type: list
  elements: str
  sample: ["stop PostgreSQL (running with PID 812)", "lay down backup 20261125T090000Z ..."]
repository:
  description: The repository's identity.
  returned: success
  type: dict
  sample: {path: /srv/pitr/main, system_identifier: 7321456789012345678, pg_major: 15,
           wal_segment_size: 16777216}
pg_bindir:
  description: The directory of the PostgreSQL programs used.
  returned: success
  type: str
  sample: /usr/lib/postgresql/15/bin
programs:
  description: The programs the restore runs (all present, or the module fails).
  returned: when decision is restore
  type: list
  elements: str
  sample: [/usr/lib/postgresql/15/bin/pg_ctl, tar, zstd]
waldump_calls:
  description: How many times C(pg_waldump) read an archived segment for this plan.
  returned: when decision is restore
  type: int
  sample: 7
"""

import os
import shutil
import typing as t
from datetime import UTC, datetime

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.pitr.postgresql.plugins.module_utils import recovery
from ansible_collections.pitr.postgresql.plugins.module_utils.catalog import list_backups
from ansible_collections.pitr.postgresql.plugins.module_utils.errors import PitrError
from ansible_collections.pitr.postgresql.plugins.module_utils.hostcmd import (
    MAX_PREFETCH,
    restore_command_for,
)
from ansible_collections.pitr.postgresql.plugins.module_utils.repository import (
    Repository,
    RepositoryIdentity,
)
from ansible_collections.pitr.postgresql.plugins.module_utils.storage import PosixStorage
from ansible_collections.pitr.postgresql.plugins.module_utils.walfile import HISTORY

TARGET_OPTIONS = ("target_time", "target_lsn", "target_xid", "target_name", "target")


def read_histories(repo: Repository, wal: t.Sequence[t.Any]) -> dict[int, str]:
    """Timeline -> text of its archived history file (checksum-verified)."""
    found = {}
    for w, _info in wal:
        if w.kind == HISTORY:
            data = repo.get_wal(w.name)[1]
            found[w.timeline] = data.decode("utf-8", errors="replace")
    return found


def check_programs(programs: t.Sequence[str], pitr_wal: str, python: str) -> None:
    missing = [
        p
        for p in programs
        if not (os.path.isabs(p) and os.access(p, os.X_OK))
        and not (not os.path.isabs(p) and shutil.which(p))
    ]
    missing += [p for p in (pitr_wal, python) if not os.path.isfile(p)]
    if missing:
        raise PitrError(
            f"the restore needs {', '.join(missing)} on this host; install them (the archiving"
            " role installs pitr-wal; Debian packages zstd and lz4 provide the decompressors)",
            missing=missing,
        )


def check_pitr_wal(pitr_wal: str) -> None:
    """The restored server fetches WAL with pitr-wal: refuse before anything when it is missing."""
    if not os.path.isfile(pitr_wal):
        raise PitrError(
            f"{pitr_wal} is missing: the restored server fetches WAL with it. Install it with the"
            " pitr.postgresql.archiving role, or on a host that only restores (a clone or a drill"
            " host) with the playbook pitr.postgresql.install_host_command"
            " (playbooks/install_host_command.yml), or set pitr_install_prefix to where it is",
            missing=[pitr_wal],
        )


def check_prefetch(pitr_wal: str, python: str, prefetch: int) -> None:
    """An older pitr-wal refuses ``--prefetch`` (exit 255 for every fetch): refuse first."""
    from ansible_collections.pitr.postgresql.plugins.module_utils import runner

    if not prefetch:
        return
    argv = [python, "-I", "-S", pitr_wal, "--repo", "/", "--prefetch", "1", "version"]
    result = runner.run(argv, check=False, cwd="/", timeout=60)
    if result.rc != 0:
        raise PitrError(
            f"{pitr_wal} does not know --prefetch ({result.stderr.strip().splitlines()[:1]}):"
            " it is older than this collection. Update it with the playbook"
            " pitr.postgresql.install_host_command (playbooks/install_host_command.yml) or the"
            " archiving role, or restore without it (pitr_restore_wal_prefetch=0)",
            cmd=result.cmd,
            rc=result.rc,
        )


def check_backup_files(backup: t.Mapping[str, t.Any]) -> None:
    layout = backup["layout"]
    if layout["format"] == "tar":
        wanted = [layout["base"]] + ([layout["wal"]] if layout["wal"] else [])
    else:
        wanted = ["PG_VERSION", "backup_label", os.path.join("global", "pg_control")]
    missing = [f for f in wanted if not os.path.isfile(os.path.join(backup["path"], f))]
    if missing:
        raise PitrError(
            f"backup {backup['label']} is incomplete in the repository: {', '.join(missing)}"
            f" missing from {backup['path']}; choose another backup (backup_label)",
            missing=missing,
        )


ARGUMENT_SPEC: dict[str, dict[str, t.Any]] = {
    "repository_path": {"type": "path", "required": True},
    "data_dir": {"type": "path"},
    "target_time": {"type": "str"},
    "target_lsn": {"type": "str"},
    "target_xid": {"type": "str"},
    "target_name": {"type": "str"},
    "target": {"type": "str", "choices": ["immediate", "latest"]},
    "target_inclusive": {"type": "bool"},
    "target_timeline": {"type": "str", "default": "latest"},
    "target_action": {"type": "str", "choices": list(recovery.ACTIONS), "default": "promote"},
    "backup_label": {"type": "str"},
    "clone": {"type": "bool", "default": False},
    "clone_port": {"type": "int"},
    "force": {"type": "bool", "default": False},
    "pitr_wal": {"type": "path", "default": "/usr/local/lib/pitr-postgresql/bin/pitr-wal"},
    "wal_prefetch": {"type": "int", "default": 0},
    "python": {"type": "path", "default": "/usr/bin/python3"},
    "pg_bindir": {"type": "path"},
    "validate_only": {"type": "bool", "default": False},
}


def open_repository(path: str) -> tuple[Repository, RepositoryIdentity]:
    storage = PosixStorage(path)
    storage.ensure_root()
    repo = Repository(storage)
    identity = repo.identity()
    if identity is None:
        raise PitrError(f"{path} is not an initialised repository")
    return repo, identity


def parse_target(p: t.Mapping[str, t.Any]) -> recovery.RecoveryTarget:
    return recovery.parse_target(
        **{k: p[k] for k in TARGET_OPTIONS},
        inclusive=p["target_inclusive"],
        timeline=p["target_timeline"],
        action=p["target_action"],
    )


def build_request(
    p: t.Mapping[str, t.Any], target: recovery.RecoveryTarget, data_dir: str
) -> recovery.RestoreRequest:
    return recovery.RestoreRequest(
        target=target,
        repository=p["repository_path"],
        data_dir=data_dir,
        restore_command=restore_command_for(
            program=p["pitr_wal"],
            repo=p["repository_path"],
            python=p["python"],
            prefetch=p["wal_prefetch"] or None,
        ),
        backup_label=p["backup_label"],
        clone=p["clone"],
        port=p["clone_port"],
        force=p["force"],
    )


def validation(request: recovery.RestoreRequest, state: recovery.DataDirState) -> dict[str, t.Any]:
    """What validate_only returns: the target, and what a restore would start from."""
    fingerprint = recovery.request_fingerprint(request)
    decision, reason = recovery.decide_action(request, fingerprint, state)
    return {
        "decision": decision,
        "reason": reason,
        "target": request.target.to_dict(),
        "fingerprint": fingerprint,
        "state": state.restore_state,
        "data_dir": {
            "path": state.path,
            "exists": state.exists,
            "running": state.running,
            "pid": state.pid,
        },
    }


def plan(
    repo: Repository,
    identity: RepositoryIdentity,
    request: recovery.RestoreRequest,
    state: recovery.DataDirState,
    bindir: str,
) -> tuple[recovery.RecoveryPlan, int]:
    """The full plan, and how many segments pg_waldump read for it."""
    wal = repo.list_wal()
    pg_waldump = os.path.join(bindir, "pg_waldump")
    with recovery.WaldumpInspector(repo, pg_waldump, identity.wal_segment_size) as inspector:
        result = recovery.plan_recovery(
            request,
            backups=list_backups(repo),
            wal=wal,
            histories=read_histories(repo, wal),
            data_dir=state,
            inspector=inspector,
            now=datetime.now(UTC),
            system_identifier=identity.system_identifier,
            segment_size=identity.wal_segment_size,
        )
        return result, inspector.calls


def main() -> None:
    module = AnsibleModule(argument_spec=ARGUMENT_SPEC, supports_check_mode=True)
    p = module.params
    try:
        target = parse_target(p)  # the user's input first, before reading anything
        check_pitr_wal(p["pitr_wal"])
        if not 0 <= p["wal_prefetch"] <= MAX_PREFETCH:
            raise PitrError(
                f"wal_prefetch (pitr_restore_wal_prefetch) is {p['wal_prefetch']}: give 0 (fetch"
                f" one segment at a time) up to {MAX_PREFETCH} segments",
                wal_prefetch=p["wal_prefetch"],
            )
        check_prefetch(p["pitr_wal"], p["python"], p["wal_prefetch"])
        repo, identity = open_repository(p["repository_path"])
        data_dir = p["data_dir"] or f"/var/lib/postgresql/{identity.pg_major}/main"
        bindir = p["pg_bindir"] or f"/usr/lib/postgresql/{identity.pg_major}/bin"
        request = build_request(p, target, data_dir)
        state = recovery.read_data_dir_state(data_dir)
        result: dict[str, t.Any] = {
            "changed": False,
            "repository": {"path": p["repository_path"], **identity._asdict()},
            "pg_bindir": bindir,
        }
        if p["validate_only"]:
            module.exit_json(**result, **validation(request, state))
        restore, result["waldump_calls"] = plan(repo, identity, request, state, bindir)
        if restore.decision == "restore":
            result["programs"] = recovery.required_programs(restore.backup["layout"], bindir)
            check_programs(result["programs"], p["pitr_wal"], p["python"])
            check_backup_files(restore.backup)
    except PitrError as exc:
        module.fail_json(**exc.to_result())
    for warning in restore.warnings:
        module.warn(warning)
    result.update(restore.to_dict())
    result.pop("warnings", None)
    module.exit_json(**result)


if __name__ == "__main__":
    main()

#!/usr/bin/python
# Copyright: contributors to pitr.postgresql
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: retention
short_description: Prune old base backups, logical dumps and archived WAL by a retention policy
version_added: 0.1.0
description:
  - Applies a retention policy to a pitr.postgresql repository, never removing a file that a
    kept base backup needs to restore to any point after it.
  - Base backups are kept by redundancy (O(redundancy), the newest usable ones) and/or by a
    recovery window (O(recovery_window), every backup needed to restore to any point in that
    window, including the newest one that ended before it starts). A backup either rule keeps
    stays. O(min_backups) is never undercut; pinned backups (O(pin)) and backups being taken
    are never removed; backups that are not usable go once a newer usable backup is kept.
  - A restore in progress protects what it reads with a restore lease, a record under
    C(leases/restore/) in the repository naming the backup, the first WAL segment it needs,
    the host, the data directory, the target and an expiry (24 hours by default, renewed
    while the restore runs). A backup an active lease names is kept like a pinned one (reason
    V(leased); RV(backups[].leases) says which host and data directory read it), and with it
    the WAL it needs; the WAL from the lease's first segment on stays too. Expired leases
    protect nothing and a prune removes them (RV(leases_removed); check mode lists them).
  - A lease record that cannot be read keeps every base backup (it might name any of them);
    the prune warns, naming the file, and removes only WAL no backup needs. Remove that file
    once no restore is running (or fix it) to prune backups again.
  - A restore that takes a lease on a backup while the prune plans makes the prune fail before
    it removes anything (every record as it was); run it again.
  - After an in-place restore the newest backups may lie on the abandoned timeline. Both
    rules and O(min_backups) also count the backups from which the newest timeline can be
    reached, so that production always keeps its own.
  - Archived WAL goes per timeline, following the timeline history files, below the oldest
    segment any kept backup can read. A timeline no kept backup can reach goes entirely;
    C(.history) files always stay; a C(.backup) file goes with its backup.
  - Logical dumps (M(pitr.postgresql.logical_dump)) are kept per database (and the globals)
    by O(dump_redundancy) and O(dump_max_age), at least O(min_backups) of each.
  - Check mode is the preview. It returns exactly what would go (RV(backups_removed),
    RV(dumps_removed), RV(wal_removed) as ranges), the bytes freed (RV(bytes_freed)) and the
    earliest point that stays recoverable (RV(earliest_recoverable)), and changes nothing.
  - The removal is crash-safe. Each backup or dump to remove is first marked C(expiring) in
    the catalog, so restore never selects it again; WAL goes oldest first on each timeline;
    a backup's files go before its record. An interrupted prune leaves every kept backup
    restorable, and running it again finishes the job.
  - The prune holds the repository locks of base backups and dumps, so no backup starts or
    finishes meanwhile. It removes only the files it planned, by name; WAL archived while it
    runs is never touched.
  - Refuses to run when the repository belongs to another cluster than the one it connects
    to (or O(pgdata)), or is not initialised, and when the policy would remove every usable
    backup.
  - After a real prune the module walks the archive again (as
    M(pitr.postgresql.archive_continuity_info) does) and returns the result in
    RV(continuity); in check mode, RV(continuity) describes the repository as the prune would
    leave it.
options:
  redundancy:
    description:
      - Keep the newest this many usable base backups.
    type: int
  recovery_window:
    description:
      - Keep every base backup needed to restore to any point in this last period, for example
        V(14d), V(36h) or a number of seconds.
    type: str
  min_backups:
    description:
      - Never keep fewer usable base backups than this (and never fewer logical dumps per
        database). At least 1.
    type: int
    default: 1
  dump_redundancy:
    description:
      - Keep the newest this many usable logical dumps of each database. Default
        O(redundancy).
    type: int
  dump_max_age:
    description:
      - Keep every logical dump younger than this (V(30d)). Default O(recovery_window).
    type: str
  pin:
    description:
      - Labels of base backups (or logical dumps) to pin before pruning. A pinned backup is
        never removed, and neither is the WAL it needs.
      - The pin is stored in the repository (C(pins/<kind>/<label>.json)), not in the backup.
    type: list
    elements: str
    default: []
  unpin:
    description:
      - Labels to unpin before pruning.
    type: list
    elements: str
    default: []
  pgdata:
    description:
      - Read the cluster's identity from this data directory instead of connecting to the
        server (the module must then run as the user PostgreSQL runs as).
      - Without it, the module connects with the connection options and reads the system
        identifier, major version and WAL segment size from the server.
    type: path
  lock_wait:
    description:
      - Seconds to wait for a base backup or a dump that holds the repository lock.
    type: int
    default: 0
extends_documentation_fragment:
  - pitr.postgresql.repository
  - pitr.postgresql.connection
  - pitr.postgresql.connection.action_group
attributes:
  check_mode:
    description: Can run in check_mode and return changed status prediction without modifying
      target. Check mode returns the full plan.
    support: full
  diff_mode:
    description: Will return details on what has changed (or possibly needs changing in
      check_mode), when in diff mode.
    support: full
  idempotent:
    description: When run twice in a row outside check mode, with the same arguments, the second
      invocation indicates no change.
    support: partial
    details: A O(recovery_window) moves with the clock, so a later run may remove more.
notes:
  - Supports repositories of PostgreSQL 13 and later; tested with PostgreSQL 15.
  - The newest timeline is the highest-numbered one in the repository, the one
    C(recovery_target_timeline=latest) follows.
  - A timeline above 1 whose history file is missing cannot be followed by PostgreSQL; its WAL
    is kept and a warning says so. When a kept backup lies on such a timeline, no WAL is
    removed at all.
seealso:
  - module: pitr.postgresql.archive_continuity_info
  - module: pitr.postgresql.backup_info
  - module: pitr.postgresql.base_backup
author:
  - pitr.postgresql developers (@pitr-postgresql)
"""

EXAMPLES = r"""
- name: Preview what a 14-day recovery window would remove
  pitr.postgresql.retention:
    repository_path: /srv/pitr/main
    recovery_window: 14d
    min_backups: 2
  become: true
  become_user: postgres
  check_mode: true
  register: preview

- name: Show the preview
  ansible.builtin.debug:
    msg: >-
      Would remove {{ preview.backups_removed | length }} backups and
      {{ preview.wal_removed_files }} WAL files ({{ preview.bytes_freed | human_readable }});
      earliest recoverable point afterwards {{ preview.earliest_recoverable.time }}

- name: Keep the newest two backups and everything needed for the last 14 days
  pitr.postgresql.retention:
    repository_path: /srv/pitr/main
    redundancy: 2
    recovery_window: 14d
  become: true
  become_user: postgres
  register: pruned

- name: Fail when the archive left behind has a gap
  ansible.builtin.assert:
    that: pruned.continuity.continuous
    fail_msg: "{{ pruned.continuity.reason }}"

- name: Pin the backup taken before the upgrade, on a host where the server is down
  pitr.postgresql.retention:
    repository_path: /srv/pitr/main
    pin: [before-upgrade]
    pgdata: /var/lib/postgresql/15/main
  become: true
  become_user: postgres
"""

RETURN = r"""
backups:
  description: Every catalogued base backup, newest first, with the decision.
  returned: always
  type: list
  elements: dict
  contains:
    label:
      description: The backup's label.
      type: str
      returned: always
      sample: 20261125T141500Z
    keep:
      description: True when the backup stays.
      type: bool
      returned: always
      sample: true
    reasons:
      description:
        - Why it stays (V(pinned), V(leased), V(lease_unreadable), V(running), V(redundancy),
          V(window), V(window_base), V(minimum), V(newest_unusable), V(no_policy)) or goes
          (V(expired), V(unusable), V(expiring)).
        - V(leased) means a restore in progress reads it (see C(leases)); V(lease_unreadable)
          that a restore lease cannot be read, so every backup stays.
      type: list
      elements: str
      returned: always
      sample: [redundancy, window]
    status:
      description: The catalog status.
      type: str
      returned: always
      sample: ok
    usable:
      description: Completed and verified.
      type: bool
      returned: always
      sample: true
    stop_time:
      description: When the backup ended.
      type: str
      returned: always
      sample: "2026-11-25T14:15:07.120000+00:00"
    timeline:
      description: The timeline it ended on.
      type: int
      returned: always
      sample: 1
    bytes:
      description: Bytes it occupies in the repository.
      type: int
      returned: always
      sample: 824055419
    leases:
      description: The active restore leases on this backup (as in RV(leases)).
      type: list
      elements: dict
      returned: always
      sample: []
backups_kept:
  description: Labels of the base backups that stay, newest first.
  returned: always
  type: list
  elements: str
  sample: [20261125T141500Z, 20261124T141500Z]
backups_removed:
  description: Labels of the base backups removed (check mode, that would be removed).
  returned: always
  type: list
  elements: str
  sample: [20261110T141500Z]
dumps:
  description: Every logical dump with its decision (C(label), C(keep), C(reasons),
    C(status), C(usable), C(end_time), C(database), C(bytes)).
  returned: always
  type: list
  elements: dict
  sample: []
dumps_removed:
  description: Labels of the logical dumps removed (check mode, that would be removed).
  returned: always
  type: list
  elements: str
  sample: [20261101T010000Z-shop]
wal_removed:
  description:
    - Archived WAL removed, as continuous ranges per timeline.
    - C(whole_timeline) is true when nothing of that timeline stays (its history file stays).
  returned: always
  type: list
  elements: dict
  sample:
    - {"timeline": 1, "from_wal": "000000010000000000000001",
       "to_wal": "00000001000000000000003C", "segments": 60, "partial": 0,
       "backup_files": 2, "bytes": 251658240, "whole_timeline": false}
wal_removed_files:
  description: Number of WAL files removed (segments, .partial and .backup files).
  returned: always
  type: int
  sample: 62
wal_kept_from:
  description: Per timeline (as a string), the oldest segment or .partial file that stays, or
    null when none does.
  returned: always
  type: dict
  sample: {"1": "00000001000000000000003D", "2": null}
bytes_freed:
  description: Bytes the removal frees (check mode, would free).
  returned: always
  type: int
  sample: 1075713659
earliest_recoverable:
  description: The earliest point a restore can reach once the prune is done, the stop
    point of the oldest usable backup that stays (C(time), C(lsn), C(timeline), C(backup));
    null without usable backups.
  returned: always
  type: dict
  sample: {"time": "2026-11-24T14:15:07.120000+00:00", "lsn": "0/3D000138",
           "timeline": 1, "backup": "20261124T141500Z"}
earliest_recoverable_before:
  description: The same before the prune.
  returned: always
  type: dict
  sample: {"time": "2026-11-10T14:15:07.120000+00:00", "lsn": "0/1000138",
           "timeline": 1, "backup": "20261110T141500Z"}
policy:
  description: The policy applied (durations in seconds), with C(window_start) and C(now).
  returned: always
  type: dict
  sample: {"redundancy": 2, "recovery_window": 1209600.0, "min_backups": 1,
           "dump_redundancy": 2, "dump_max_age": 1209600.0,
           "window_start": "2026-11-11T14:20:00+00:00", "now": "2026-11-25T14:20:00+00:00"}
continuity:
  description:
    - The archive walked per timeline from the oldest usable backup's start, after the prune
      (check mode, as the prune would leave it); see
      M(pitr.postgresql.archive_continuity_info) for the keys.
  returned: always
  type: dict
  sample: {"continuous": true, "gaps": [], "missing_history": [], "oldest_backup":
           "20261124T141500Z", "reason": ""}
leases:
  description:
    - The active restore leases (not expired), oldest first. Each names the lease
      (C(lease_id)), the C(backup) a restore reads, the C(host) and C(data_dir) it restores
      into, its C(target), the C(timeline) and C(first_segment) it needs, and when it
      C(expires).
  returned: always
  type: list
  elements: dict
  sample:
    - {"lease_id": "drill1-3f2a9c01de-20261125T141500123456Z-a1b2c3",
       "backup": "20261110T141500Z", "host": drill1, "data_dir": /srv/drill/15,
       "target": "time 2026-11-11 09:00:00+00", "timeline": 1,
       "first_segment": "000000010000000000000012",
       "expires": "2026-11-26T14:15:00+00:00"}
leases_expired:
  description: Ids of the expired restore leases found (they protect nothing).
  returned: always
  type: list
  elements: str
  sample: []
leases_removed:
  description: Ids of the expired restore leases removed (check mode, that would be removed).
  returned: always
  type: list
  elements: str
  sample: []
leases_unreadable:
  description:
    - Restore lease records that cannot be read (C(key), C(path), C(why)). While there is one,
      every base backup stays.
  returned: always
  type: list
  elements: dict
  sample: []
pins:
  description: Pinned labels per kind (C(backups), C(dumps)) after the run.
  returned: always
  type: dict
  sample: {"backups": [before-upgrade], "dumps": []}
pins_changed:
  description: Labels pinned and unpinned by this run (C(pinned), C(unpinned)).
  returned: always
  type: dict
  sample: {"pinned": [before-upgrade], "unpinned": []}
cluster:
  description: The identity the repository was checked against, and the data directory
    when known.
  returned: always
  type: dict
  sample: {"system_identifier": 7441120211222063101, "pg_major": 15,
           "wal_segment_size": 16777216, "data_directory": /var/lib/postgresql/15/main}
repository:
  description: The repository path.
  returned: always
  type: str
  sample: /srv/pitr/main
msg:
  description: One line saying what went (or would go), the bytes and the new earliest point.
  returned: always
  type: str
  sample: "retention removed 1 base backup(s), 62 WAL file(s), freeing 1.0 GiB; earliest
    recoverable point: 2026-11-24T14:15:07.120000+00:00 (timeline 1, backup 20261124T141500Z)"
"""

from ansible.module_utils.basic import AnsibleModule, missing_required_lib

from ansible_collections.pitr.postgresql.plugins.module_utils.errors import PitrError
from ansible_collections.pitr.postgresql.plugins.module_utils.postgres import (
    PSYCOPG_IMPORT_ERROR,
    connection_argument_spec,
)
from ansible_collections.pitr.postgresql.plugins.module_utils.retention import (
    run_module_params,
)


def argument_spec() -> dict[str, dict[str, object]]:
    spec: dict[str, dict[str, object]] = connection_argument_spec()
    spec.update(
        repository_path={"type": "path", "required": True},
        redundancy={"type": "int"},
        recovery_window={"type": "str"},
        min_backups={"type": "int", "default": 1},
        dump_redundancy={"type": "int"},
        dump_max_age={"type": "str"},
        pin={"type": "list", "elements": "str", "default": []},
        unpin={"type": "list", "elements": "str", "default": []},
        pgdata={"type": "path"},
        lock_wait={"type": "int", "default": 0},
    )
    return spec


def main() -> None:
    module = AnsibleModule(argument_spec=argument_spec(), supports_check_mode=True)
    if not module.params["pgdata"] and PSYCOPG_IMPORT_ERROR is not None:
        module.fail_json(msg=missing_required_lib("psycopg"), exception=PSYCOPG_IMPORT_ERROR)
    try:
        result = run_module_params(module.params, check_mode=module.check_mode)
    except PitrError as exc:
        module.fail_json(**exc.to_result())
    for warning in result.pop("warnings", []):
        module.warn(warning)
    if module._diff:
        result["diff"] = {
            "before": {
                "backups": [b["label"] for b in result["backups"]],
                "dumps": [d["label"] for d in result["dumps"]],
            },
            "after": {
                "backups": result["backups_kept"],
                "dumps": [d["label"] for d in result["dumps"] if d["keep"]],
            },
        }
    module.exit_json(**result)


if __name__ == "__main__":
    main()

#!/usr/bin/python
# Copyright: contributors to pitr.postgresql
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: archive_info
short_description: Tell whether PostgreSQL WAL archiving is healthy, and why not
version_added: 0.1.0
description:
  - Reads C(pg_stat_archiver), the number of WAL files waiting for archiving (C(.ready) files in
    C(pg_wal/archive_status)), the WAL position and the archiving settings, and returns a
    verdict RV(healthy) with the RV(reasons).
  - Works over the network (no file access on the database host) except for the optional
    repository report, which reads O(repository_path) on the host where the module runs.
  - "Reasons: V(archiving_off) (archive_mode off or wal_level minimal); V(command_not_ours)
    (archive_command does not run C(pitr-wal), or archive_library is set); V(failing) (the last
    attempt failed); V(backlog) (more than O(max_ready) files wait); V(stale) (files wait and
    nothing was archived for longer than O(max_age)); V(repository_unreadable) (O(repository_path)
    is missing, not mounted or not readable, so archiving into it cannot work);
    V(identity_mismatch) (the repository belongs to another cluster)."
  - An idle server writes no WAL and so archives nothing; that alone is not stale.
options:
  max_ready:
    description:
      - Report a V(backlog) when more WAL files than this wait for archiving.
    type: int
    default: 10
  max_age:
    description:
      - Report V(stale) when WAL files wait and nothing was archived for longer than this.
      - Seconds, or a number with a unit (V(90s), V(15min), V(1h)).
    type: str
    default: 15min
  repository_path:
    description:
      - Path of a POSIX repository (a local directory or a mounted network file system) on the
        host where the module runs.
      - When set, the module reports the repository's identity and WAL summary, and checks that
        the repository belongs to this server (system identifier, major version, segment size).
      - When it cannot be read (missing, not mounted, no permission for the user the module
        runs as), archiving into it cannot work, so the verdict is unhealthy with the reason
        V(repository_unreadable), whose message names the path and the fix, and
        RV(repository.error) says why. The module never creates or changes it.
      - Run the module as the PostgreSQL user (C(become_user)), the user that archives.
    type: path
extends_documentation_fragment:
  - pitr.postgresql.connection
  - pitr.postgresql.connection.info_attributes
  - pitr.postgresql.connection.action_group
notes:
  - Supports PostgreSQL 13 and later.
  - Counting C(.ready) files calls C(pg_ls_archive_statusdir()), which needs a superuser or a
    member of C(pg_monitor). Without it RV(ready_count) is V(null) and the backlog is estimated
    from the WAL position.
seealso:
  - module: pitr.postgresql.wal_archiving
  - name: pg_stat_archiver
    description: The PostgreSQL documentation of the archiver statistics.
    link: https://www.postgresql.org/docs/current/monitoring-stats.html#MONITORING-PG-STAT-ARCHIVER-VIEW
author:
  - pitr.postgresql developers (@pitr-postgresql)
"""

EXAMPLES = r"""
- name: Check WAL archiving
  pitr.postgresql.archive_info:
    repository_path: /srv/pitr/main
  become: true
  become_user: postgres
  register: archiving

- name: Fail with the reasons when archiving is unhealthy
  ansible.builtin.assert:
    that: archiving.healthy
    fail_msg: "{{ archiving.messages | join('; ') }}"

- name: Warn about a growing backlog only
  ansible.builtin.debug:
    msg: "{{ archiving.ready_count }} WAL files wait for archiving"
  when: "'backlog' in archiving.reasons"

- name: Check a remote server with a monitoring role and tighter limits
  pitr.postgresql.archive_info:
    login_host: db1.example.com
    login_user: monitor
    login_password: "{{ vault_monitor_password }}"
    login_db: postgres
    max_ready: 4
    max_age: 5min
  register: remote_archiving
"""

RETURN = r"""
healthy:
  description: True when no reason below applies.
  returned: always
  type: bool
  sample: false
reasons:
  description:
    - Stable codes of what is wrong, in a fixed order; empty when healthy.
    - One of V(archiving_off), V(command_not_ours), V(failing), V(backlog), V(stale),
      V(repository_unreadable), V(identity_mismatch).
  returned: always
  type: list
  elements: str
  sample: [failing, backlog]
messages:
  description: One sentence per reason, in the same order, saying what is wrong.
  returned: always
  type: list
  elements: str
  sample:
    - "archiving is failing: the last attempt (000000010000000000000003 at
      2026-11-25T13:00:00+00:00) failed and nothing was archived since; ..."
pg_stat_archiver:
  description: The server's archiver statistics (times in ISO 8601 with offset).
  returned: always
  type: dict
  contains:
    archived_count:
      description: WAL files archived successfully.
      type: int
      returned: always
      sample: 12
    last_archived_wal:
      description: Name of the last file archived.
      type: str
      returned: always
      sample: "000000010000000000000007"
    last_archived_time:
      description: When it was archived.
      type: str
      returned: always
      sample: "2026-11-25T13:00:00.123456+00:00"
    failed_count:
      description: Failed attempts.
      type: int
      returned: always
      sample: 0
    last_failed_wal:
      description: Name of the file of the last failed attempt.
      type: str
      returned: always
      sample: null
    last_failed_time:
      description: When the last attempt failed.
      type: str
      returned: always
      sample: null
    stats_reset:
      description: When these statistics were last reset.
      type: str
      returned: always
      sample: "2026-11-20T09:00:00+00:00"
ready_count:
  description:
    - WAL files waiting for archiving (C(.ready) files). V(null) when the role may not list them.
  returned: always
  type: int
  sample: 0
pending_segments:
  description:
    - Completed segments between the last archived one and the one being written, from the
      WAL position. V(null) on a standby, before the first archived segment, or when the last
      archived file is a history or backup file.
  returned: always
  type: int
  sample: 0
last_archived_age_seconds:
  description: Seconds since the last file was archived, by the server's clock (V(null) if never).
  returned: always
  type: float
  sample: 42.5
current_wal_lsn:
  description: The WAL write position (V(null) on a standby).
  returned: always
  type: str
  sample: 0/8000060
current_wal_file:
  description:
    - The WAL segment that holds the write position (V(null) on a standby). At a segment
      boundary PostgreSQL names the segment before.
  returned: always
  type: str
  sample: "000000010000000000000008"
in_recovery:
  description: True on a standby or a server in recovery.
  returned: always
  type: bool
  sample: false
system_identifier:
  description: The server's system identifier.
  returned: always
  type: int
  sample: 7441120211222063101
server_version:
  description: The server's version number (C(server_version_num)).
  returned: always
  type: int
  sample: 150018
settings:
  description: The archiving settings the server runs with.
  returned: always
  type: dict
  sample:
    wal_level: replica
    archive_mode: 'on'
    archive_command: /usr/bin/python3 -I -S /usr/local/lib/pitr-wal --repo /srv/pitr push %p
    archive_timeout: 60s
    archive_library: ''
repository:
  description: The repository report, when O(repository_path) is set.
  returned: when O(repository_path) is set
  type: dict
  contains:
    path:
      description: The path read.
      type: str
      returned: always
      sample: /srv/pitr/main
    identity:
      description: The cluster the repository belongs to (V(null) before the first archived file).
      type: dict
      returned: when readable
      sample: {system_identifier: 7441120211222063101, pg_major: 15, wal_segment_size: 16777216}
    wal_summary:
      description: Archived WAL per timeline (segments, bytes, oldest, newest) and totals.
      type: dict
      returned: when readable
      sample: {files: 3, bytes: 4123, timelines: {}, history_files: []}
    error:
      description: Why the repository could not be read.
      type: str
      returned: when not readable
      sample: repository /srv/pitr/main is not accessible
"""

import datetime as dt
import os
import pwd
import typing as t

from ansible.module_utils.basic import AnsibleModule, missing_required_lib

from ansible_collections.pitr.postgresql.plugins.module_utils.errors import PitrError
from ansible_collections.pitr.postgresql.plugins.module_utils.health import (
    ArchivingFacts,
    assess_archiving,
    inspect_repository,
    unreadable_repository_message,
)
from ansible_collections.pitr.postgresql.plugins.module_utils.postgres import (
    PSYCOPG_IMPORT_ERROR,
    archiver_status,
    connect,
    connection_argument_spec,
    pg_settings_rows,
    ready_count,
    server_major,
    system_identifier,
)
from ansible_collections.pitr.postgresql.plugins.module_utils.settings import (
    ARCHIVING_READ_SETTINGS,
    ServerSetting,
    display,
    normalise,
    parse_duration,
)

ARCHIVER_FIELDS = (
    "archived_count",
    "last_archived_wal",
    "last_archived_time",
    "failed_count",
    "last_failed_wal",
    "last_failed_time",
    "stats_reset",
)


def _json(value: t.Any) -> t.Any:
    return value.isoformat() if isinstance(value, dt.datetime) else value


def main() -> None:
    argument_spec = connection_argument_spec()
    argument_spec.update(
        max_ready={"type": "int", "default": 10},
        max_age={"type": "str", "default": "15min"},
        repository_path={"type": "path"},
    )
    module = AnsibleModule(argument_spec=argument_spec, supports_check_mode=True)
    if PSYCOPG_IMPORT_ERROR is not None:
        module.fail_json(msg=missing_required_lib("psycopg"), exception=PSYCOPG_IMPORT_ERROR)
    p = module.params
    try:
        max_age = parse_duration(p["max_age"])
    except ValueError as exc:
        module.fail_json(msg=f"max_age: {exc}; give seconds or a number with a unit (15min)")
    try:
        with connect(p) as conn:
            status = archiver_status(conn)
            rows = [
                ServerSetting.from_row(r) for r in pg_settings_rows(conn, ARCHIVING_READ_SETTINGS)
            ]
            ready = ready_count(conn)
            sysid = system_identifier(conn)
            major, version = server_major(conn), conn.info.server_version
    except PitrError as exc:
        module.fail_json(**exc.to_result())
    settings = {s.name: display(s, normalise(s, s.running_text)) for s in rows}
    facts = ArchivingFacts.from_status(status, settings, ready)
    result: dict[str, t.Any] = {"changed": False}
    problem = unreadable = None
    if p["repository_path"]:
        try:
            result["repository"], problem = inspect_repository(
                p["repository_path"],
                system_identifier=sysid,
                pg_major=major,
                wal_segment_size=facts.wal_segment_size,
            )
        except PitrError as exc:
            result["repository"] = {"path": p["repository_path"], "error": exc.msg}
            user = pwd.getpwuid(os.geteuid()).pw_name
            unreadable = unreadable_repository_message(p["repository_path"], exc.msg, user)
    if ready is None:
        module.warn("ready_count unknown: pg_ls_archive_statusdir() needs pg_monitor")
    verdict = assess_archiving(
        facts,
        max_ready=p["max_ready"],
        max_age=max_age,
        repository_problem=problem,
        repository_unreadable=unreadable,
    )
    result.update(verdict.as_dict())
    result.update(
        pg_stat_archiver={k: _json(status[k]) for k in ARCHIVER_FIELDS},
        ready_count=ready,
        current_wal_lsn=status["current_wal_lsn"],
        current_wal_file=status["current_wal_file"],
        in_recovery=facts.in_recovery,
        system_identifier=sysid,
        server_version=version,
        settings=settings,
    )
    module.exit_json(**result)


if __name__ == "__main__":
    main()

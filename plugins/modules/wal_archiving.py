#!/usr/bin/python
# Copyright: contributors to pitr.postgresql
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: wal_archiving
short_description: Configure PostgreSQL WAL archiving (wal_level, archive_mode, archive_command)
version_added: 0.1.0
description:
  - Sets C(wal_level), C(archive_mode), C(archive_command) and C(archive_timeout) with
    C(ALTER SYSTEM), and reloads the server when a setting that takes effect on reload changed.
  - Never restarts the server. When C(archive_mode) or C(wal_level) must change, the module
    returns RV(restart_required=true); restart the server (for instance from a handler) for
    archiving to start.
  - Idempotent across the restart gap. A value already written with C(ALTER SYSTEM) that waits
    for a restart counts as done; a second run reports C(changed=false) and still
    RV(restart_required=true).
  - C(wal_level) is never lowered. With O(wal_level=replica) on a server that runs with
    C(logical), C(logical) is kept.
  - Fails, changing nothing, when C(archive_library) is set (PostgreSQL 15 and later), because
    it takes the place of C(archive_command). Clear it with C(ALTER SYSTEM RESET archive_library)
    and a reload first.
options:
  wal_level:
    description:
      - The least WAL level wanted. C(minimal) cannot archive, so it is not offered.
      - A higher level the server already uses or is configured with is kept.
    type: str
    choices: [replica, logical]
    default: replica
  archive_mode:
    description:
      - V(on) archives on a primary; V(always) also archives on a standby (each server needs
        its own archive, or the archive command must accept identical duplicates).
      - Changing it needs a restart.
    type: str
    choices: ['on', always]
    default: 'on'
  archive_command:
    description:
      - The shell command that archives one WAL file (C(%p) is its path, C(%f) its name).
      - Usually the collection's C(pitr-wal) host command, as installed by the archiving role.
      - Replaced when different; the value it replaces is returned in
        RV(previous_archive_command).
    type: str
    required: true
  archive_timeout:
    description:
      - Switch to a new WAL segment after this time when WAL was written, so that an idle
        server still archives its last changes. Bounds how much committed work the archive
        can lack.
      - A number of seconds or a number with a unit (V(60s), V(1min), V(5min)). V(0) turns it off.
    type: str
    default: 60s
extends_documentation_fragment:
  - pitr.postgresql.connection
  - pitr.postgresql.connection.attributes
  - pitr.postgresql.connection.action_group
notes:
  - Supports PostgreSQL 13 and later. C(archive_library) exists from PostgreSQL 15.
  - Needs a superuser. On PostgreSQL 15 and later another role will do with
    C(GRANT ALTER SYSTEM ON PARAMETER) for the four parameters and C(EXECUTE) on
    C(pg_reload_conf()); to recognise values that wait for a restart it also needs C(SELECT) on
    C(pg_file_settings) and C(EXECUTE) on C(pg_show_all_file_settings()).
  - A reload also applies any other configuration change that waits for one.
seealso:
  - module: pitr.postgresql.archive_info
  - name: Continuous archiving and point-in-time recovery
    description: The PostgreSQL documentation on WAL archiving.
    link: https://www.postgresql.org/docs/current/continuous-archiving.html
author:
  - pitr.postgresql developers (@pitr-postgresql)
"""

EXAMPLES = r"""
- name: Configure WAL archiving with the collection's host command
  pitr.postgresql.wal_archiving:
    archive_command: >-
      /usr/bin/python3 -I -S /usr/local/lib/pitr-postgresql/bin/pitr-wal
      --repo /srv/pitr/main push %p
    archive_timeout: 5min
  become: true
  become_user: postgres
  register: archiving

- name: Restart PostgreSQL when the new settings need it
  ansible.builtin.service:
    name: postgresql@15-main
    state: restarted
  when: archiving.restart_required

- name: Show what archived WAL before
  ansible.builtin.debug:
    msg: "archive_command was {{ archiving.previous_archive_command | default('(unset)', true) }}"
  when: archiving.changed

- name: Predict the change on a remote server without changing it
  pitr.postgresql.wal_archiving:
    login_host: db1.example.com
    login_user: admin
    login_password: "{{ vault_admin_password }}"
    ssl_mode: verify-full
    wal_level: logical
    archive_mode: always
    archive_command: /usr/local/bin/archive-wal %p
  check_mode: true
  diff: true
  register: prediction

- name: Show the SQL it would run
  ansible.builtin.debug:
    var: prediction.queries
"""

RETURN = r"""
queries:
  description:
    - The SQL statements run, or in check mode the statements that would run.
  returned: always
  type: list
  elements: str
  sample:
    - ALTER SYSTEM SET "archive_mode" = 'on'
    - ALTER SYSTEM SET "archive_command" = '/usr/local/bin/archive-wal %p'
    - SELECT pg_catalog.pg_reload_conf()
restart_required:
  description:
    - True when the server must be restarted for C(archive_mode) or C(wal_level) to take the
      wanted value, including when an earlier run already wrote them.
  returned: always
  type: bool
  sample: true
pending_restart:
  description: The settings that wait for a restart.
  returned: always
  type: list
  elements: str
  sample: [archive_mode]
reload_required:
  description:
    - True when a setting that takes effect on reload (C(archive_command), C(archive_timeout))
      had to change. The module reloaded the server, or in check mode would reload it.
  returned: always
  type: bool
  sample: true
previous_archive_command:
  description: The archive_command the server used before this run (empty when unset).
  returned: always
  type: str
  sample: cp %p /mnt/archive/%f
settings:
  description:
    - The four settings after the run (in check mode, as they would be), as configured. For
      C(archive_mode) and C(wal_level) that may be a value waiting for a restart.
  returned: always
  type: dict
  sample:
    wal_level: replica
    archive_mode: 'on'
    archive_command: /usr/local/bin/archive-wal %p
    archive_timeout: 60s
diff:
  description: The four settings before and after, when run with C(--diff).
  returned: when diff mode is on
  type: dict
  contains:
    before:
      description: The settings before the run.
      type: dict
      returned: success
      sample: {wal_level: replica, archive_mode: 'off', archive_command: '', archive_timeout: 0s}
    after:
      description: The settings after the run.
      type: dict
      returned: success
      sample: {wal_level: replica, archive_mode: 'on', archive_command: 'x %p',
               archive_timeout: 60s}
"""

import typing as t

from ansible.module_utils.basic import AnsibleModule, missing_required_lib

from ansible_collections.pitr.postgresql.plugins.module_utils.errors import PitrError
from ansible_collections.pitr.postgresql.plugins.module_utils.postgres import (
    PSYCOPG_IMPORT_ERROR,
    apply_settings,
    connect,
    connection_argument_spec,
    pg_file_settings_rows,
    pg_settings_rows,
)
from ansible_collections.pitr.postgresql.plugins.module_utils.settings import (
    ARCHIVING_READ_SETTINGS,
    plan_wal_archiving,
)


def main() -> None:
    argument_spec = connection_argument_spec()
    argument_spec.update(
        wal_level={"type": "str", "choices": ["replica", "logical"], "default": "replica"},
        archive_mode={"type": "str", "choices": ["on", "always"], "default": "on"},
        archive_command={"type": "str", "required": True},
        archive_timeout={"type": "str", "default": "60s"},
    )
    module = AnsibleModule(argument_spec=argument_spec, supports_check_mode=True)
    if PSYCOPG_IMPORT_ERROR is not None:
        module.fail_json(msg=missing_required_lib("psycopg"), exception=PSYCOPG_IMPORT_ERROR)
    p = module.params
    try:
        with connect(p) as conn:
            rows = pg_settings_rows(conn, ARCHIVING_READ_SETTINGS)
            file_rows = pg_file_settings_rows(conn, ARCHIVING_READ_SETTINGS)
            plan = plan_wal_archiving(
                rows,
                file_rows,
                wal_level=p["wal_level"],
                archive_mode=p["archive_mode"],
                archive_command=p["archive_command"],
                archive_timeout=p["archive_timeout"],
            )
            queries = apply_settings(
                conn, plan.assignments, reload=plan.reload_required, check_mode=module.check_mode
            )
    except PitrError as exc:
        module.fail_json(**exc.to_result())
    for warning in plan.warnings:
        module.warn(warning)
    result: dict[str, t.Any] = {
        "changed": plan.changed,
        "queries": queries,
        "restart_required": plan.restart_required,
        "pending_restart": list(plan.pending_restart),
        "reload_required": plan.reload_required,
        "previous_archive_command": plan.running["archive_command"],
        "settings": plan.after,
    }
    if module._diff:
        result["diff"] = {"before": plan.before, "after": plan.after}
    module.exit_json(**result)


if __name__ == "__main__":
    main()

#!/usr/bin/python
# Copyright: contributors to pitr.postgresql
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: recovery_settings
short_description: Write or remove PostgreSQL recovery settings in a data directory, atomically
version_added: 0.1.0
description:
  - Writes settings (C(restore_command), C(recovery_target_*), and any others) into the data
    directory's C(postgresql.auto.conf), between marker comments, in the form C(ALTER SYSTEM)
    writes, and records them in C(pitr_settings.json) beside it. With O(state=absent) it removes
    exactly those lines again, even after an C(ALTER SYSTEM) rewrote the file and dropped the
    markers; lines that were there before are never touched, so their values come back.
  - C(postgresql.auto.conf) is read last, so these settings win over C(postgresql.conf) and its
    includes. The server reads them when it starts; the module never starts, stops or reloads it.
  - With O(state=present) it also creates the empty signal file O(signal) (C(recovery.signal) by
    default) that makes PostgreSQL start in targeted recovery. The module never removes signal
    files; PostgreSQL removes C(recovery.signal) itself when recovery ends, and removing it
    from a cluster still in recovery would make its next start skip recovery.
  - Every file is replaced atomically (temporary file, fsync, rename, directory fsync) and gets
    the data directory's owner and mode C(0600).
options:
  data_dir:
    description:
      - The PostgreSQL data directory.
    type: path
    required: true
  state:
    description:
      - V(present) writes the block O(block) with O(settings) (replacing an earlier version of
        it); V(absent) removes it.
    type: str
    choices: [present, absent]
    default: present
  settings:
    description:
      - Parameter names and values. Values are written as strings; V(true)/V(false) become
        C(on)/C(off).
      - Required with O(state=present).
    type: dict
  block:
    description:
      - The name of the block, so that several sets can live side by side (the restore role uses
        V(recovery), removed after promotion, and V(clone), kept in a clone).
    type: str
    default: recovery
  signal:
    description:
      - With O(state=present), the signal file to create. V(recovery) makes a targeted
        recovery, V(standby) a standby, V(none) creates none.
    type: str
    choices: [recovery, standby, none]
    default: recovery
attributes:
  check_mode:
    description: Can run in check_mode and return changed status prediction without modifying
      target.
    support: full
  diff_mode:
    description: Will return details on what has changed (or possibly needs changing in
      check_mode), when in diff mode.
    support: full
  idempotent:
    description: When run twice in a row outside check mode, with the same arguments, the second
      invocation indicates no change.
    support: full
notes:
  - Supports PostgreSQL 12 and later (C(recovery.signal)); tested with PostgreSQL 15.
  - Run it as root or as the data directory's owner.
seealso:
  - module: pitr.postgresql.restore_plan
  - module: pitr.postgresql.recovery_info
author:
  - pitr.postgresql developers (@pitr-postgresql)
"""

EXAMPLES = r"""
- name: Write the recovery settings of a plan and recovery.signal
  pitr.postgresql.recovery_settings:
    data_dir: /var/lib/postgresql/15/main
    settings: "{{ plan.settings }}"
  register: written

- name: Say what was written
  ansible.builtin.debug:
    msg: "{{ written.settings | length }} settings in {{ written.path }}"

- name: Keep a restored copy from archiving into the production repository
  pitr.postgresql.recovery_settings:
    data_dir: /srv/drill/data
    block: clone
    settings:
      archive_mode: "off"
      port: 5499
    signal: none

- name: Remove the recovery settings after promotion
  pitr.postgresql.recovery_settings:
    data_dir: /var/lib/postgresql/15/main
    state: absent
  register: removed

- name: Show the lines removed
  ansible.builtin.debug:
    var: removed.removed
"""

RETURN = r"""
path:
  description: The file written (C(postgresql.auto.conf) in O(data_dir)).
  returned: always
  type: str
  sample: /var/lib/postgresql/15/main/postgresql.auto.conf
settings:
  description: The settings of the block after the run (empty after O(state=absent)).
  returned: always
  type: dict
  sample: {restore_command: "/usr/bin/python3 -I -S /opt/pitr-wal --repo /srv/pitr fetch %f %p",
           recovery_target_time: "2026-11-25 10:30:00+00", recovery_target_action: pause}
removed:
  description: The lines removed, with O(state=absent).
  returned: always
  type: list
  elements: str
  sample: ["recovery_target_time = '2026-11-25 10:30:00+00'"]
signal_file:
  description: The signal file created (or that would be), if any.
  returned: always
  type: str
  sample: /var/lib/postgresql/15/main/recovery.signal
diff:
  description: C(postgresql.auto.conf) before and after, with C(--diff).
  returned: when diff mode is on
  type: dict
  sample: {before: "archive_mode = 'on'\n", after: "archive_mode = 'on'\n# BEGIN ...\n"}
"""

import os
import typing as t

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.pitr.postgresql.plugins.module_utils import recovery_conf
from ansible_collections.pitr.postgresql.plugins.module_utils.errors import PitrError


def as_setting(value: t.Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "data_dir": {"type": "path", "required": True},
            "state": {"type": "str", "choices": ["present", "absent"], "default": "present"},
            "settings": {"type": "dict"},
            "block": {"type": "str", "default": "recovery"},
            "signal": {
                "type": "str",
                "choices": ["recovery", "standby", "none"],
                "default": "recovery",
            },
        },
        required_if=[("state", "present", ("settings",))],
        supports_check_mode=True,
    )
    p = module.params
    data_dir = p["data_dir"]
    try:
        recovery_conf.check_data_dir(data_dir)
        if p["state"] == "present":
            settings = {str(k): as_setting(v) for k, v in p["settings"].items()}
            signal = None if p["signal"] == "none" else p["signal"]
            change = recovery_conf.plan_present(data_dir, p["block"], settings, signal)
        else:
            settings = {}
            change = recovery_conf.plan_absent(data_dir, p["block"])
        if change.changed and not module.check_mode:
            recovery_conf.apply(data_dir, change)
    except PitrError as exc:
        module.fail_json(**exc.to_result())
    path = os.path.join(data_dir, recovery_conf.AUTO_CONF)
    signal_file = change.signal_file
    result: dict[str, t.Any] = {
        "changed": change.changed,
        "path": path,
        "settings": settings,
        "removed": change.removed_lines or [],
        "signal_file": os.path.join(data_dir, signal_file) if signal_file else "",
    }
    if module._diff:
        result["diff"] = {
            "before": change.auto_conf_before,
            "after": change.auto_conf_after,
            "before_header": path,
            "after_header": path,
        }
    module.exit_json(**result)


if __name__ == "__main__":
    main()

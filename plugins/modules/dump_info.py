#!/usr/bin/python
# Copyright: contributors to pitr.postgresql
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: dump_info
short_description: List the logical dumps catalogued in a pitr.postgresql repository
version_added: 0.1.0
description:
  - Reads the catalog records C(dumps/<label>/dump.json) written by
    M(pitr.postgresql.logical_dump) and returns them newest first, each with whether it may be
    restored (C(usable)), and the newest usable dump of each database.
  - Reads only the repository; connects to no server.
options:
  label:
    description:
      - Return only the dump with this label.
    type: str
  database:
    description:
      - Return only the dumps of this database (V(globals) for the globals dumps).
    type: str
extends_documentation_fragment:
  - pitr.postgresql.repository
  - pitr.postgresql.connection.info_attributes
notes:
  - Dumps being written (in C(staging/dumps/)) are listed by label in RV(in_progress); a dump
    appears in RV(dumps) only once it is complete and has its record.
seealso:
  - module: pitr.postgresql.logical_dump
  - module: pitr.postgresql.dump_restore
author:
  - pitr.postgresql developers (@pitr-postgresql)
"""

EXAMPLES = r"""
- name: List the dumps
  pitr.postgresql.dump_info:
    repository_path: /srv/pitr/main
  register: dumps

- name: Name the newest usable dump of shop
  ansible.builtin.debug:
    msg: "{{ dumps.latest_usable['shop'] | default('no usable dump of shop') }}"
"""

RETURN = r"""
repository:
  description: The repository path.
  returned: always
  type: str
  sample: /srv/pitr/main
dumps:
  description: The catalog records (see M(pitr.postgresql.logical_dump)), newest first, each
    with C(usable).
  returned: always
  type: list
  elements: dict
  sample: [{"label": "20261125T141500Z-shop", "database": "shop", "scope": "database",
            "status": "ok", "verified": true, "usable": true, "size": 9979,
            "start_time": "2026-11-25T14:15:00.123456+00:00"}]
usable_count:
  description: How many of the returned dumps are usable.
  returned: always
  type: int
  sample: 3
latest_usable:
  description: Database name -> label of its newest usable dump.
  returned: always
  type: dict
  sample: {"shop": "20261125T141500Z-shop"}
latest_globals:
  description: Label of the newest usable globals dump, or null.
  returned: always
  type: str
  sample: 20261125T141500Z-globals
in_progress:
  description: Labels of dumps being written now (or left by an interrupted run, removed by
    the next one).
  returned: always
  type: list
  elements: str
  sample: []
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.pitr.postgresql.plugins.module_utils.dumps import dump_info
from ansible_collections.pitr.postgresql.plugins.module_utils.errors import PitrError


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "repository_path": {"type": "path", "required": True},
            "label": {"type": "str"},
            "database": {"type": "str"},
        },
        supports_check_mode=True,
    )
    try:
        result = dump_info(module.params)
    except PitrError as exc:
        module.fail_json(**exc.to_result())
    module.exit_json(**result)


if __name__ == "__main__":
    main()

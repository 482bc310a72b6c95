#!/usr/bin/python
# Copyright: contributors to pitr.postgresql
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: backup_progress_info
short_description: Report the progress of the base backups being taken in a PITR repository
version_added: 0.1.0
description:
  - >-
    Reads the progress records that M(pitr.postgresql.base_backup) (and the C(pitr-backup)
    command of the timer) rewrite every two seconds while a backup runs
    (C(staging/backups/<label>.progress.json)): phase, bytes done and in total as
    C(pg_basebackup --progress) reports them.
  - Reads nothing else (no catalog, no WAL), so it is cheap enough to call every few seconds;
    the action M(pitr.postgresql.backup_wait) calls it to print a backup's progress while the
    role waits. M(pitr.postgresql.backup_info) reports the same records beside the catalog.
  - Reads only.
options:
  label:
    description:
      - Only report the backup with this label.
    type: str
extends_documentation_fragment:
  - pitr.postgresql.repository
  - pitr.postgresql.connection.info_attributes
notes:
  - Supports repositories of PostgreSQL 13 and later; tested with PostgreSQL 15.
  - A record stays until its backup ends; one whose process is gone (RV(in_progress[].alive)
    false) belongs to an interrupted backup, and the next backup removes it.
seealso:
  - module: pitr.postgresql.base_backup
  - module: pitr.postgresql.backup_info
  - module: pitr.postgresql.backup_wait
author:
  - pitr.postgresql developers (@pitr-postgresql)
"""

EXAMPLES = r"""
- name: Read the progress of the backup being taken
  pitr.postgresql.backup_progress_info:
    repository_path: /srv/pitr/main
  become: true
  become_user: postgres
  register: progress

- name: Show it
  ansible.builtin.debug:
    msg: >-
      {{ item.label }} ({{ item.phase }}): {{ item.done_bytes | human_readable }} of
      {{ item.total_bytes | human_readable }} ({{ item.percent }}%)
  loop: "{{ progress.in_progress | selectattr('alive', 'ne', false) }}"
  loop_control:
    label: "{{ item.label }}"
"""

RETURN = r"""
in_progress:
  description: Progress records of the backups being taken, in label order.
  returned: always
  type: list
  elements: dict
  contains:
    label:
      description: The backup's label.
      type: str
      returned: always
      sample: 20261125T171500Z
    phase:
      description: V(starting), V(checkpoint) (waiting for the checkpoint), V(copying),
        V(finishing) (pg_basebackup waits for the end of the WAL), V(verifying).
      type: str
      returned: always
      sample: copying
    done_bytes:
      description: Bytes pg_basebackup reported done (kB granularity).
      type: int
      returned: always
      sample: 1288490188
    total_bytes:
      description: Bytes pg_basebackup expects in total (its estimate of the cluster's size).
      type: int
      returned: always
      sample: 2576980377
    percent:
      description: done_bytes of total_bytes, in percent (one decimal).
      type: float
      returned: always
      sample: 50.0
    verify_bytes:
      description: Bytes read back by the verification so far (written when its phase starts).
      type: int
      returned: always
      sample: 0
    started:
      description: When the backup process started (ISO 8601, UTC, seconds).
      type: str
      returned: always
      sample: "2026-11-25T17:15:00+00:00"
    updated:
      description: When the record was last written (ISO 8601, UTC, seconds).
      type: str
      returned: always
      sample: "2026-11-25T17:19:02+00:00"
    pid:
      description: Process id of the backup process.
      type: int
      returned: always
      sample: 81234
    host:
      description: Host name the backup runs on.
      type: str
      returned: always
      sample: db1
    alive:
      description: True while that process runs, false when it is gone (the backup was
        interrupted), null when it runs on another host.
      type: bool
      returned: always
      sample: true
now:
  description: The host's current time (ISO 8601, UTC), to compare with RV(in_progress[].updated).
  returned: always
  type: str
  sample: "2026-11-25T17:19:03+00:00"
"""

import datetime as dt

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.pitr.postgresql.plugins.module_utils.backup import (
    in_progress,
    posix_storage,
)
from ansible_collections.pitr.postgresql.plugins.module_utils.errors import PitrError
from ansible_collections.pitr.postgresql.plugins.module_utils.repository import Repository


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "repository_path": {"type": "path", "required": True},
            "label": {"type": "str"},
        },
        supports_check_mode=True,
    )
    label = module.params["label"]
    try:
        repo = Repository.open_posix(str(module.params["repository_path"]))
        posix_storage(repo).ensure_root()
        records = in_progress(repo)
    except PitrError as exc:
        module.fail_json(**exc.to_result())
    if label:
        records = [r for r in records if r.get("label") == label]
    module.exit_json(
        changed=False,
        in_progress=records,
        now=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    )


if __name__ == "__main__":
    main()

#!/usr/bin/python
# Copyright: contributors to pitr.postgresql
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)

# The documentation of the backup_wait action (plugins/action/backup_wait.py), which runs on
# the controller; this file has no code of its own.

from __future__ import annotations

DOCUMENTATION = r"""
module: backup_wait
short_description: Wait for an asynchronous base backup, printing its progress
version_added: 0.1.0
description:
  - >-
    Waits for a M(pitr.postgresql.base_backup) task started with C(async) and C(poll: 0), and
    prints the backup's progress from the controller every O(interval) seconds while it runs,
    for example [db1] backup 20261125T171500Z: 1.20 GB of 2.40 GB (50.0%), 310.00 MB/s.
  - Each poll asks M(ansible.builtin.async_status) whether the job finished and reads the
    backup's progress record with M(pitr.postgresql.backup_progress_info) (read-only).
  - When the job finishes, returns the job's result, which is the result of
    M(pitr.postgresql.base_backup) (C(label), C(backup), C(progress), ...), and fails
    exactly when that module failed, with its message. The job's status file is removed.
  - A progress record that cannot be read is reported once and never fails the wait.
options:
  jid:
    description:
      - The C(ansible_job_id) of the registered result of the asynchronous
        M(pitr.postgresql.base_backup) task.
    type: str
    required: true
  repository_path:
    description:
      - Path of the repository on the host, as given to the backup task
        (O(pitr.postgresql.base_backup#module:repository_path)), where the backup's progress
        record is. Without it, no progress is printed.
    type: str
  label:
    description:
      - The backup's label, when the backup task was given one. Without it, the progress of
        the newest backup running on this host into the repository is printed (one backup
        runs at a time per repository).
    type: str
    default: ""
  interval:
    description:
      - Seconds between two polls, so between two progress lines; at least 1. The backup
        rewrites its progress record every two seconds.
    type: float
    default: 10
  timeout:
    description:
      - Seconds to wait at most; use the C(async) value of the backup task (the job stops
        itself then and reports C(Timeout exceeded)).
    type: int
    default: 86400
extends_documentation_fragment:
  - action_common_attributes
  - action_common_attributes.conn
  - action_common_attributes.flow
attributes:
  action:
    support: full
  async:
    support: none
  become:
    support: full
    details: Run it with the C(become_user) of the backup task; the job's status file is that
      user's.
  bypass_host_loop:
    support: none
  check_mode:
    support: full
    details: Waits for the check-mode job and returns its prediction.
  connection:
    support: full
  delegation:
    support: none
  diff_mode:
    support: none
  platform:
    platforms: posix
notes:
  - Runs on the controller (an action); the modules it calls run on the host.
seealso:
  - module: pitr.postgresql.base_backup
  - module: pitr.postgresql.backup_progress_info
  - module: ansible.builtin.async_status
author:
  - pitr.postgresql developers (@pitr-postgresql)
"""

EXAMPLES = r"""
- name: Start the base backup
  pitr.postgresql.base_backup:
    repository_path: /srv/pitr/main
  become: true
  become_user: postgres
  async: 86400
  poll: 0
  register: job
  changed_when: false

- name: Wait for it, printing its progress every 10 seconds
  pitr.postgresql.backup_wait:
    jid: "{{ job.ansible_job_id }}"
    repository_path: /srv/pitr/main
    interval: 10
    timeout: 86400
  become: true
  become_user: postgres
  register: backup

- name: Show what was taken
  ansible.builtin.debug:
    msg: "{{ backup.label }}: {{ backup.backup.size_on_disk | human_readable }} stored"
"""

RETURN = r"""
label:
  description: The backup's label (the result of M(pitr.postgresql.base_backup)).
  returned: when the job finished
  type: str
  sample: 20261125T171500Z
progress:
  description: Bytes copied and in total, as M(pitr.postgresql.base_backup) returns them.
  returned: when the job finished
  type: dict
  sample: {"phase": "done", "done_bytes": 807797760, "total_bytes": 807797760,
           "percent": 100.0, "verify_bytes": 824055419}
msg:
  description: The module's message, or why the wait failed.
  returned: always
  type: str
  sample: 979 files and 824055419 bytes match the manifest (SHA256)
async_result:
  description: The last answer of async_status, when the job did not finish in time.
  returned: on timeout
  type: dict
  sample: {"started": true, "finished": false}
"""

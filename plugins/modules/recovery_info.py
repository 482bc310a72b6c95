#!/usr/bin/python
# Copyright: contributors to pitr.postgresql
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: recovery_info
short_description: Follow a PostgreSQL server in targeted recovery and confirm where replay stopped
version_added: 0.1.0
description:
  - Reports the phase of a restored server, one of V(stopped), V(starting) (not yet accepting
    connections), V(recovering), V(paused) (at the recovery target), V(promoted) or V(failed)
    (the server stopped and its log shows why).
  - Reports the replay position (C(pg_last_wal_replay_lsn())), the last replayed commit time
    (C(pg_last_xact_replay_timestamp())), the timeline, and the lines of the server log since
    O(log_offset) that tell how recovery went, among them
    the FATAL line C(recovery ended before configured recovery target was reached) and the
    C(pitr-wal) fetch failures.
  - With O(target), confirms that replay stopped where asked, from the line PostgreSQL logs
    when it stops (C(recovery stopping before commit of transaction ...)) and from the replay
    position and time.
  - With O(wait_seconds), waits up to that long for the server to reach a phase where it does
    not move on by itself (stopped, paused, promoted, failed) before it reports, so that a loop
    of short calls shows progress.
options:
  data_dir:
    description:
      - The data directory of the restored server (its C(postmaster.pid) tells whether it runs).
    type: path
    required: true
  log_file:
    description:
      - The server log (what C(pg_ctl -l) writes, or Debian's
        C(/var/log/postgresql/postgresql-15-main.log)). Without it failures are reported without
        the reason, and only the replay position and time confirm the stop point.
    type: path
  log_offset:
    description:
      - The size the log had before the server was started for this restore; only what follows
        is read.
    type: int
    default: 0
  target:
    description:
      - The target to confirm, as returned by M(pitr.postgresql.restore_plan) (C(kind), C(value),
        C(inclusive)).
    type: dict
  wal_end_lsn:
    description:
      - The end of the WAL the restore will replay (from the plan), shown in the progress line.
    type: str
  wait_seconds:
    description:
      - Wait up to this many seconds for the phase to become V(stopped), V(paused),
        V(promoted) or V(failed).
    type: int
    default: 0
  repository_path:
    description:
      - The repository; when given and the server was promoted, the module reports whether the
        new timeline's history file reached it.
    type: path
extends_documentation_fragment:
  - pitr.postgresql.connection
  - pitr.postgresql.connection.info_attributes
  - pitr.postgresql.connection.action_group
notes:
  - Connecting during recovery needs C(hot_standby=on), which the restore's settings include.
  - Supports PostgreSQL 13 and later; tested with PostgreSQL 15.
seealso:
  - module: pitr.postgresql.restore_plan
  - module: pitr.postgresql.recovery_settings
author:
  - pitr.postgresql developers (@pitr-postgresql)
"""

EXAMPLES = r"""
- name: Wait (up to 10 seconds) for recovery to reach its target
  pitr.postgresql.recovery_info:
    data_dir: /var/lib/postgresql/15/main
    log_file: /var/log/postgresql/postgresql-15-main.log
    log_offset: "{{ log_before.stat.size }}"
    target: "{{ plan.target }}"
    wait_seconds: 10
    login_unix_socket: /var/run/postgresql
  become: true
  become_user: postgres
  register: recovery

- name: Show the progress
  ansible.builtin.debug:
    msg: "{{ recovery.progress }}"

- name: Refuse to promote unless replay stopped at the target
  ansible.builtin.assert:
    that: recovery.phase == 'paused' and recovery.target_reached
    fail_msg: "{{ recovery.stop_point }}: {{ recovery.log_failures | join(' / ') }}"
"""

RETURN = r"""
phase:
  description: V(stopped), V(starting), V(recovering), V(paused), V(promoted) or V(failed).
  returned: always
  type: str
  sample: paused
running:
  description: Whether a postmaster runs on O(data_dir).
  returned: always
  type: bool
  sample: true
pid:
  description: The postmaster's PID.
  returned: always
  type: int
  sample: 51234
in_recovery:
  description: C(pg_is_in_recovery()), when connected.
  returned: always
  type: bool
  sample: true
pause_state:
  description: C(not paused), C(pause requested) or C(paused), when in recovery.
  returned: always
  type: str
  sample: paused
replay_lsn:
  description: The end of the last replayed WAL record.
  returned: always
  type: str
  sample: 0/7000A28
replay_time:
  description: The commit time of the last replayed transaction (UTC).
  returned: always
  type: str
  sample: "2026-11-25 10:29:59.871223+00"
timeline:
  description: The server's timeline (after promotion, the new one).
  returned: always
  type: int
  sample: 2
target_reached:
  description:
    - Whether replay stopped where O(target) says (null when it cannot be told, for instance
      without the server log).
  returned: when the phase is paused or promoted and a target is given
  type: bool
  sample: true
stop_point:
  description: Where replay stopped, in words.
  returned: when the phase is paused or promoted and a target is given
  type: str
  sample: stopped before the commit of transaction 1022 at 2026-11-25 10:30:00.004118+00
stop_line:
  description: The line PostgreSQL logged when it stopped at the target.
  returned: always
  type: str
  sample: 'LOG:  recovery stopping before commit of transaction 1022, time 2026-11-25 ...'
new_timeline:
  description: The timeline PostgreSQL selected when it ended recovery, from the log.
  returned: always
  type: int
  sample: 2
ended_before_target:
  description: The log says C(recovery ended before configured recovery target was reached).
  returned: always
  type: bool
  sample: false
log_failures:
  description: FATAL and PANIC lines about the server (not about refused connections).
  returned: always
  type: list
  elements: str
  sample: ['FATAL:  recovery ended before configured recovery target was reached']
log_lines:
  description: The log lines that tell how recovery went (stop point, pause, timeline, fetch
    failures, FATAL lines).
  returned: always
  type: list
  elements: str
  sample: ['LOG:  consistent recovery state reached at 0/5000138']
log_tail:
  description: The last lines of the log since O(log_offset), whatever they say (a server that
    could not start says why there, often without a severity prefix).
  returned: always
  type: list
  elements: str
  sample: ['postgres: could not access the server configuration file "/srv/copy/postgresql.conf"']
log_size:
  description: The size of the log now (an offset for the next call).
  returned: always
  type: int
  sample: 18211
history_file:
  description: The history file of the server's timeline (after promotion).
  returned: when promoted and O(repository_path) is given
  type: str
  sample: 00000002.history
history_archived:
  description: Whether that history file is in the repository.
  returned: when promoted and O(repository_path) is given
  type: bool
  sample: true
progress:
  description: One line for humans.
  returned: always
  type: str
  sample: >-
    recovering, replayed to 0/6A01230 of 0/A000000,
    last commit replayed 2026-11-25 10:12:01+00
"""

import time

from ansible.module_utils.basic import AnsibleModule, missing_required_lib

from ansible_collections.pitr.postgresql.plugins.module_utils import recovery
from ansible_collections.pitr.postgresql.plugins.module_utils.errors import PitrError
from ansible_collections.pitr.postgresql.plugins.module_utils.postgres import (
    PSYCOPG_IMPORT_ERROR,
    connection_argument_spec,
)
from ansible_collections.pitr.postgresql.plugins.module_utils.recovery_run import (
    POLL_SECONDS,
    observe,
    progress_line,
)
from ansible_collections.pitr.postgresql.plugins.module_utils.repository import Repository
from ansible_collections.pitr.postgresql.plugins.module_utils.walfile import history_name


def main() -> None:
    argument_spec = connection_argument_spec()
    argument_spec.update(
        data_dir={"type": "path", "required": True},
        log_file={"type": "path"},
        log_offset={"type": "int", "default": 0},
        target={"type": "dict"},
        wal_end_lsn={"type": "str"},
        wait_seconds={"type": "int", "default": 0},
        repository_path={"type": "path"},
    )
    module = AnsibleModule(argument_spec=argument_spec, supports_check_mode=True)
    if PSYCOPG_IMPORT_ERROR is not None:
        module.fail_json(msg=missing_required_lib("psycopg"), exception=PSYCOPG_IMPORT_ERROR)
    p = module.params
    deadline = time.monotonic() + max(0, p["wait_seconds"])
    try:
        facts = observe(p)
        while facts["phase"] not in recovery.TERMINAL_PHASES and time.monotonic() < deadline:
            # A short poll: the role waits for this call, and the server often gets there
            # a fraction of a second after the last look.
            time.sleep(min(POLL_SECONDS, max(0.0, deadline - time.monotonic())))
            facts = observe(p)
        if p["repository_path"] and facts["phase"] == "promoted" and facts["timeline"]:
            name = history_name(int(facts["timeline"]))
            repo = Repository.open_posix(p["repository_path"])
            facts.update(history_file=name, history_archived=repo.wal_stat(name) is not None)
    except PitrError as exc:
        module.fail_json(**exc.to_result())
    facts["progress"] = progress_line(facts, p)
    module.exit_json(changed=False, **facts)


if __name__ == "__main__":
    main()

#!/usr/bin/python
# Copyright: contributors to pitr.postgresql
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: backup_info
short_description: List base backups and the recoverable window of a PITR repository
version_added: 0.1.0
description:
  - Lists the base backups of the repository from their catalog records, newest first, and
    says which are usable (completed and verified).
  - Computes the recoverable window per timeline, from the stop time of the oldest usable
    backup to the newest commit found in the WAL archive, and the gaps in the WAL chain that
    cut it.
  - The newest commit time is read from the WAL itself (C(pg_waldump) over the newest
    archived segments, fetched and verified through the archive logic into a temporary
    directory), not from file modification times.
  - Reads only; reports backups being taken (RV(in_progress)) with their progress.
options:
  label:
    description:
      - Only report this backup in RV(backups) (the window always considers all backups).
    type: str
  read_commit_times:
    description:
      - Read the newest commit time of each timeline with C(pg_waldump). Without it, the
        window ends at the newest usable backup's stop time and RV(window[].end_exact) is
        false.
    type: bool
    default: true
  wal_scan_segments:
    description:
      - How many of the newest archived segments of each timeline to read for the newest
        commit; the module reads further back (doubling, up to 64) while it finds none.
    type: int
    default: 4
  pg_bindir:
    description:
      - Directory of C(pg_waldump). Default the newest installed PostgreSQL.
    type: path
extends_documentation_fragment:
  - pitr.postgresql.repository
  - pitr.postgresql.connection.info_attributes
notes:
  - Supports repositories of PostgreSQL 13 and later; tested with PostgreSQL 15.
  - Timelines are reported separately. A backup taken on an earlier timeline can also reach a
    later one through its history file; restore planning follows history files, this summary
    does not.
seealso:
  - module: pitr.postgresql.base_backup
author:
  - pitr.postgresql developers (@pitr-postgresql)
"""

EXAMPLES = r"""
- name: Read the backup catalog and the recoverable window
  pitr.postgresql.backup_info:
    repository_path: /srv/pitr/main
  become: true
  become_user: postgres
  register: info

- name: Fail when no usable backup exists
  ansible.builtin.assert:
    that: info.usable_count > 0
    fail_msg: No usable base backup in /srv/pitr/main

- name: Show what can be restored on the current timeline
  ansible.builtin.debug:
    msg: >-
      Timeline {{ item.timeline }}: {{ item.start_time }} .. {{ item.end_time }}
      ({{ item.gaps | length }} gaps)
  loop: "{{ info.window }}"
  loop_control:
    label: "{{ item.timeline }}"
"""

RETURN = r"""
backups:
  description:
    - Catalog records (see the C(backup) result of M(pitr.postgresql.base_backup)), newest
      first, each with C(usable).
  returned: always
  type: list
  elements: dict
  sample:
    - {"label": "20261125T141500Z", "status": "ok", "verified": true, "usable": true,
       "stop_lsn": "0/64000138", "stop_time": "2026-11-25T14:15:07.120000+00:00",
       "timeline": 1, "backup_format": "tar", "compression": "server-zstd:1"}
usable_count:
  description: Number of usable backups.
  returned: always
  type: int
  sample: 2
latest_usable:
  description: Label of the newest usable backup, or null.
  returned: always
  type: str
  sample: 20261125T141500Z
window:
  description: The recoverable window of each timeline, ordered by timeline.
  returned: always
  type: list
  elements: dict
  contains:
    timeline:
      description: The timeline.
      type: int
      returned: always
      sample: 1
    recoverable:
      description: True when a usable backup exists on this timeline.
      type: bool
      returned: always
      sample: true
    start_time:
      description: Stop time of the oldest usable backup (the earliest recoverable point).
      type: str
      returned: always
      sample: "2026-11-25T14:15:07.120000+00:00"
    start_lsn:
      description: Stop LSN of that backup.
      type: str
      returned: always
      sample: 0/5000100
    start_wal:
      description: Its stop segment.
      type: str
      returned: always
      sample: "000000010000000000000005"
    end_time:
      description: The newest recoverable time (newest commit in the archive when the WAL is
        continuous to the newest segment).
      type: str
      returned: always
      sample: "2026-11-25T16:02:11.123456+00:00"
    end_lsn:
      description: End of the last continuous segment (an upper bound).
      type: str
      returned: always
      sample: 0/9000000
    end_wal:
      description: Last segment of the continuous run.
      type: str
      returned: always
      sample: "000000010000000000000008"
    end_exact:
      description: True when RV(window[].end_time) is the newest commit read from the WAL.
      type: bool
      returned: always
      sample: true
    gaps:
      description: Missing segments after the oldest usable backup (C(from_wal), C(to_wal),
        C(segments), C(from_lsn), C(to_lsn)).
      type: list
      elements: dict
      returned: always
      sample: []
    backups:
      description: Labels of the usable backups on this timeline, newest first.
      type: list
      elements: str
      returned: always
      sample: [20261125T141500Z]
    ranges:
      description: Continuous recoverable ranges, oldest first (a gap splits the window).
      type: list
      elements: dict
      returned: always
      sample: []
    newest_wal:
      description: Newest archived segment of the timeline.
      type: str
      returned: always
      sample: "000000010000000000000008"
    reason:
      description: Why the window is empty or ends early; empty otherwise.
      type: str
      returned: always
      sample: ""
newest_commit_time:
  description: Timeline (as a string) -> time of the newest commit read from the archive.
  returned: always
  type: dict
  sample: {"1": "2026-11-25T16:02:11.123456+00:00"}
wal_gaps:
  description: Every gap between the oldest and newest archived segment of each timeline.
  returned: always
  type: list
  elements: dict
  sample: [{"timeline": 1, "from_wal": "000000010000000000000006",
            "to_wal": "000000010000000000000006", "segments": 1,
            "from_lsn": "0/6000000", "to_lsn": "0/7000000"}]
in_progress:
  description: Progress records of backups being taken (label, phase, done_bytes,
    total_bytes, percent, pid, host, started, updated, and alive - false when that process is
    gone, that is the backup was interrupted; null when it ran on another host).
  returned: always
  type: list
  elements: dict
  sample: []
repository:
  description: Path and identity of the repository (identity null when not initialised).
  returned: always
  type: dict
  sample: {"path": "/srv/pitr/main", "identity": {"system_identifier": 7712112821732407675,
           "pg_major": 15, "wal_segment_size": 16777216}}
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.pitr.postgresql.plugins.module_utils.backup import backup_info
from ansible_collections.pitr.postgresql.plugins.module_utils.errors import PitrError


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "repository_path": {"type": "path", "required": True},
            "label": {"type": "str"},
            "read_commit_times": {"type": "bool", "default": True},
            "wal_scan_segments": {"type": "int", "default": 4},
            "pg_bindir": {"type": "path"},
        },
        supports_check_mode=True,
    )
    try:
        result = backup_info(module.params)
    except PitrError as exc:
        module.fail_json(**exc.to_result())
    for warning in result.pop("warnings", []):
        module.warn(warning)
    module.exit_json(**result)


if __name__ == "__main__":
    main()

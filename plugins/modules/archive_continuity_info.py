#!/usr/bin/python
# Copyright: contributors to pitr.postgresql
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: archive_continuity_info
short_description: Check that the WAL archive is continuous from the oldest usable base backup
version_added: 0.1.0
description:
  - Walks the archived WAL of a pitr.postgresql repository per timeline, from the start
    segment of the oldest usable base backup to the newest archived segment, and reports every
    missing segment (a gap cuts every restore that needs to read past it).
  - Follows the timeline history files as PostgreSQL does. A timeline is checked from the
    oldest segment a restore from a usable backup may read on it; when a path leaves it for a
    newer timeline, up to the segment before the switch, even if the newest archived segment
    of that timeline is older (a missing tail before a switch is a gap too).
  - Timelines that no usable backup can reach are listed with C(reachable=false) and not
    checked. Without any usable backup, each timeline is checked from its oldest to its newest
    archived segment.
  - A timeline above 1 without its history file cannot be followed by PostgreSQL; it is listed
    in RV(missing_history) and makes RV(continuous) false.
  - Reads only the repository listing and the history files; needs no database connection.
    Run it after M(pitr.postgresql.retention) or before a restore.
extends_documentation_fragment:
  - pitr.postgresql.repository
  - pitr.postgresql.connection.info_attributes
notes:
  - Supports repositories of PostgreSQL 13 and later; tested with PostgreSQL 15.
  - A C(.partial) file never fills a gap (PostgreSQL does not read it during recovery).
seealso:
  - module: pitr.postgresql.retention
  - module: pitr.postgresql.backup_info
author:
  - pitr.postgresql developers (@pitr-postgresql)
"""

EXAMPLES = r"""
- name: Walk the archive from the oldest usable backup
  pitr.postgresql.archive_continuity_info:
    repository_path: /srv/pitr/main
  become: true
  become_user: postgres
  register: continuity

- name: Fail on a gap, naming the first missing segment
  ansible.builtin.assert:
    that: continuity.continuous
    fail_msg: "{{ continuity.reason }}"

- name: List every gap
  ansible.builtin.debug:
    msg: >-
      Timeline {{ item.timeline }}: {{ item.segments }} segment(s) missing from
      {{ item.from_wal }} to {{ item.to_wal }}
  loop: "{{ continuity.gaps }}"
  loop_control:
    label: "{{ item.from_wal }}"
"""

RETURN = r"""
continuous:
  description: True when no reachable timeline has a gap and no timeline lacks its history
    file.
  returned: always
  type: bool
  sample: false
gaps:
  description: Every gap, ordered by timeline and position (C(timeline), C(from_wal),
    C(to_wal), C(segments), C(from_lsn), C(to_lsn)).
  returned: always
  type: list
  elements: dict
  sample:
    - {"timeline": 2, "from_wal": "000000020000000000000010",
       "to_wal": "000000020000000000000011", "segments": 2, "from_lsn": "0/10000000",
       "to_lsn": "0/12000000"}
reason:
  description: Why the archive is not continuous (the first gap, or a missing history file);
    or that there is no usable backup to start from; empty otherwise.
  returned: always
  type: str
  sample: "WAL segment 000000020000000000000010 is missing: restores that need it stop there
    (1 gap); take a new base backup"
oldest_backup:
  description: Label of the oldest usable base backup, or null.
  returned: always
  type: str
  sample: 20261124T141500Z
anchors:
  description: The usable backups the walk starts from (C(backup), C(timeline),
    C(start_wal)).
  returned: always
  type: list
  elements: dict
  sample: [{"backup": "20261124T141500Z", "timeline": 1,
            "start_wal": "00000001000000000000003D"}]
missing_history:
  description: Timelines above 1 with archived WAL or backups but no history file.
  returned: always
  type: list
  elements: int
  sample: []
timelines:
  description: One entry per timeline the repository mentions.
  returned: always
  type: list
  elements: dict
  contains:
    timeline:
      description: The timeline.
      type: int
      returned: always
      sample: 1
    reachable:
      description: Some usable backup can restore onto this timeline.
      type: bool
      returned: always
      sample: true
    history_file:
      description: Its history file is archived (always true for timeline 1).
      type: bool
      returned: always
      sample: true
    from_wal:
      description: First segment checked, or null when nothing was checked.
      type: str
      returned: always
      sample: "00000001000000000000003D"
    to_wal:
      description: Last segment checked, or null.
      type: str
      returned: always
      sample: "000000010000000000000050"
    oldest_wal:
      description: Oldest archived segment of the timeline, or null.
      type: str
      returned: always
      sample: "00000001000000000000003D"
    newest_wal:
      description: Newest archived segment of the timeline, or null.
      type: str
      returned: always
      sample: "000000010000000000000050"
    segments_checked:
      description: Segments in the checked range.
      type: int
      returned: always
      sample: 20
    segments_missing:
      description: Of those, how many are not archived.
      type: int
      returned: always
      sample: 0
    gaps:
      description: The gaps of this timeline.
      type: list
      elements: dict
      returned: always
      sample: []
repository:
  description: The repository path.
  returned: always
  type: str
  sample: /srv/pitr/main
wal_segment_size:
  description: The repository's WAL segment size in bytes.
  returned: always
  type: int
  sample: 16777216
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.pitr.postgresql.plugins.module_utils.continuity import continuity_info
from ansible_collections.pitr.postgresql.plugins.module_utils.errors import PitrError
from ansible_collections.pitr.postgresql.plugins.module_utils.repository import Repository


def main() -> None:
    module = AnsibleModule(
        argument_spec={"repository_path": {"type": "path", "required": True}},
        supports_check_mode=True,
    )
    try:
        result = continuity_info(Repository.open_posix(module.params["repository_path"]))
    except PitrError as exc:
        module.fail_json(**exc.to_result())
    module.exit_json(**result)


if __name__ == "__main__":
    main()

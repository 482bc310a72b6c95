#!/usr/bin/python
# Copyright: contributors to pitr.postgresql
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: logical_dump
short_description: Take, verify and catalogue logical dumps of PostgreSQL databases with pg_dump
version_added: 0.1.0
description:
  - Runs C(pg_dump) for each database named in O(databases) (or every database with
    O(all_databases)), and C(pg_dumpall --globals-only) for the roles and tablespaces with
    O(globals), into the repository (C(dumps/<label>/)), and writes a catalog record
    C(dump.json) next to each dump.
  - A dump is a consistent snapshot of one database as of the moment it started. It restores
    that database on any PostgreSQL of the same or a newer major version, but not to any other
    point in time; point-in-time recovery needs the base backups and the WAL archive.
  - Each dump is written into C(staging/dumps/<label>/) and renamed into place, with its record,
    when it is complete. The record is written last, so a dump without a record is never
    listed.
  - Each dump is verified before it is marked usable. The module counts the tables, sequences,
    views, materialized views and large objects in the very snapshot C(pg_dump) dumps
    (C(pg_dump --snapshot)); C(pg_restore --list) must list every one of them, and
    C(pg_restore) must read and decompress every data block of the archive. C(--list) alone
    reads only the table of contents and does not notice a file cut short. The globals file
    must be complete and hold every role and tablespace.
  - A dump whose C(pg_dump) failed or that does not verify gets a record with
    C(status=failed) in its record (RV(dumps[].record)), is never restored, and the task fails.
  - The SHA-256 of the dump (of a C(SHA256SUMS) manifest for the directory format) is recorded;
    M(pitr.postgresql.dump_restore) checks it before it restores.
  - The password is passed to C(pg_dump) in the environment (E(PGPASSWORD)) or a password file
    (O(passfile)), never on its command line.
options:
  repository_path:
    description:
      - Path of the POSIX repository (a local directory or a mounted network file system) on
        the host where the module runs, the same repository as the WAL archive and the base
        backups. It must already belong to this cluster (set up archiving into it first).
      - The user the module runs as must be able to write to it.
    type: path
    required: true
  databases:
    description:
      - The databases to dump, one dump each.
    type: list
    elements: str
    default: []
    aliases: [database]
  all_databases:
    description:
      - Dump every database that accepts connections, templates excepted.
      - Cannot be combined with a non-empty O(databases).
    type: bool
    default: false
  globals:
    description:
      - Also dump the roles (with their password hashes, settings and memberships) and the
        tablespaces with C(pg_dumpall --globals-only), as one more dump labelled
        C(<label>-globals).
      - Defaults to V(true) with O(all_databases), else V(false).
    type: bool
  label:
    description:
      - Name of the run. Each dump is labelled C(<label>-<database>) (a database name that is
        not a safe directory name gets a hash suffix) and C(<label>-globals).
      - Defaults to the UTC start time, for example V(20261125T141500Z), so every run takes new
        dumps. With a fixed label, dumps that exist and succeeded are not taken again
        (V(changed=false)); failed ones are replaced.
      - With O(state=verified), the label of the one dump to verify.
    type: str
  state:
    description:
      - V(present) takes the dumps unless they exist.
      - V(verified) reads the existing dump O(label) back again (checksum, table of contents
        against the objects counted at dump time, every data block) and updates its record; a
        dump that no longer verifies becomes unusable, and the task fails.
    type: str
    choices: [present, verified]
    default: present
  format:
    description:
      - V(custom) (C(pg_dump -Fc)) writes one compressed file; C(pg_restore) can restore it in
        parallel and select objects from it.
      - V(directory) (C(pg_dump -Fd)) writes one file per table and can be written in parallel
        with O(jobs).
    type: str
    choices: [custom, directory]
    default: custom
  jobs:
    description:
      - Parallel C(pg_dump) jobs (one connection each); more than 1 needs O(format=directory).
    type: int
    default: 1
  compression:
    description:
      - The C(pg_dump --compress) value, for example V(0) (none) to V(9), or V(zstd:1) with
        pg_dump 16 or later. Empty for pg_dump's default (gzip at its default level).
    type: str
  large_objects:
    description:
      - Include the large objects (C(--blobs), C(--large-objects) from pg_dump 16).
    type: bool
    default: true
  no_role_passwords:
    description:
      - Leave the role passwords out of the globals dump (C(pg_dumpall --no-role-passwords)),
        which lets a role without superuser dump the globals.
    type: bool
    default: false
  pg_bindir:
    description:
      - Directory of C(pg_dump), C(pg_dumpall) and C(pg_restore).
      - Default the newest installed (C(/usr/lib/postgresql/<major>/bin),
        C(/usr/pgsql-<major>/bin), then E(PATH)). A C(pg_dump) older than the server is
        refused.
    type: path
  passfile:
    description:
      - A libpq password file (E(PGPASSFILE)) instead of O(login_password).
    type: path
  timeout:
    description:
      - Kill C(pg_dump) after this many seconds (the dump is then recorded as failed). V(0)
        waits for ever.
    type: int
    default: 0
  lock_wait:
    description:
      - Seconds to wait for another dump run on the same repository to finish before failing.
    type: int
    default: 0
extends_documentation_fragment:
  - pitr.postgresql.connection
  - pitr.postgresql.connection.action_group
attributes:
  check_mode:
    description: Can run in check_mode and return changed status prediction without modifying
      target. In check mode the module connects, counts the objects each dump must hold and
      returns the C(pg_dump) argv it would run in RV(cmds) (the snapshot is exported at dump
      time).
    support: full
  diff_mode:
    description: Will return details on what has changed, when in diff mode.
    support: none
  idempotent:
    description: When run twice in a row outside check mode, with the same arguments, the second
      invocation indicates no change.
    support: partial
    details: Idempotent with a fixed O(label); the default label is the current time, so every
      run takes new dumps.
notes:
  - Supports PostgreSQL 13 and later; tested with PostgreSQL 15.
  - The connecting role needs to read every object of the database (a superuser, or a role
    with C(pg_read_all_data) and the right to read the large objects). C(pg_dumpall
    --globals-only) reads C(pg_authid) and needs a superuser unless O(no_role_passwords) is set.
  - O(login_db) is the database used to list databases and count roles; each dump connects to
    its own database.
  - Dumps are taken one after another under the repository lock C(dump); a second run on the
    same repository waits O(lock_wait) seconds, then fails naming the holder.
seealso:
  - module: pitr.postgresql.dump_restore
  - module: pitr.postgresql.dump_info
  - module: pitr.postgresql.base_backup
  - name: pg_dump
    description: The PostgreSQL documentation of pg_dump.
    link: https://www.postgresql.org/docs/current/app-pgdump.html
author:
  - pitr.postgresql developers (@pitr-postgresql)
"""

EXAMPLES = r"""
- name: Dump the shop database (custom format, verified, catalogued)
  pitr.postgresql.logical_dump:
    repository_path: /srv/pitr/main
    databases: [shop]
  become: true
  become_user: postgres
  register: dump

- name: Show what was dumped
  ansible.builtin.debug:
    msg: >-
      {{ item.label }}: {{ item.record.size | human_readable }},
      {{ item.record.verification.message }}
  loop: "{{ dump.dumps }}"

- name: Dump every database and the roles, in parallel directory format
  pitr.postgresql.logical_dump:
    repository_path: /srv/pitr/main
    all_databases: true
    format: directory
    jobs: 4
    label: before-upgrade
  become: true
  become_user: postgres

- name: Read a stored dump back again
  pitr.postgresql.logical_dump:
    repository_path: /srv/pitr/main
    label: before-upgrade-shop
    state: verified
  become: true
  become_user: postgres
"""

RETURN = r"""
run:
  description: The run label (each dump's label starts with it); empty with O(state=verified).
  returned: always
  type: str
  sample: 20261125T141500Z
labels:
  description: The labels of the dumps of this run (taken, existing or planned).
  returned: always
  type: list
  elements: str
  sample: [20261125T141500Z-shop, 20261125T141500Z-globals]
usable:
  description: True when every dump of the run is usable (completed and verified).
  returned: always
  type: bool
  sample: true
cmds:
  description: The argv of every C(pg_dump) and C(pg_dumpall) run (or, in check mode, that
    would run).
  returned: always
  type: list
  elements: list
  sample:
    - - /usr/lib/postgresql/15/bin/pg_dump
      - --format=custom
      - --file=/srv/pitr/main/staging/dumps/20261125T141500Z-shop/database.dump
      - --no-password
      - --blobs
      - --snapshot=00000003-00000002-1
      - --dbname=shop
dumps:
  description: One entry per dump of the run.
  returned: always
  type: list
  elements: dict
  contains:
    label:
      description: The dump's label (directory C(dumps/<label>/)).
      type: str
      returned: always
      sample: 20261125T141500Z-shop
    database:
      description: The database dumped, or V(globals).
      type: str
      returned: always
      sample: shop
    scope:
      description: V(database) or V(globals).
      type: str
      returned: always
      sample: database
    changed:
      description: True when this dump was taken (or verified with a different result) now.
      type: bool
      returned: always
      sample: true
    usable:
      description: True when the dump completed and verified, so it may be restored.
      type: bool
      returned: always
      sample: true
    cmd:
      description: The argv run for this dump; empty when none ran.
      type: list
      elements: str
      returned: always
      sample: [/usr/lib/postgresql/15/bin/pg_dump, --format=custom, "..."]
    dump_seconds:
      description: Wall time of C(pg_dump).
      type: float
      returned: always
      sample: 3.2
    verify_seconds:
      description: Wall time of the verification.
      type: float
      returned: always
      sample: 0.4
    message:
      description: The verification message, or why nothing was done.
      type: str
      returned: always
      sample: "custom archive of shop: 40 TOC entries with every expected object (...)"
    record:
      description:
        - The catalog record C(dumps/<label>/dump.json) (fields described in
          C(plugins/module_utils/dumps.py)), plus RV(dumps[].usable).
        - In check mode, the planned record with status V(running) and the expected object
          counts.
      type: dict
      returned: always
      sample:
        record_version: 1
        kind: dump
        label: 20261125T141500Z-shop
        run: 20261125T141500Z
        scope: database
        database: shop
        status: ok
        verified: true
        verification:
          tool: pg_restore
          ok: true
          message: "custom archive of shop: 40 TOC entries with every expected object"
          objects: {tables: {expected: 7, found: 7}, large_objects: {expected: 3, found: 3}}
        start_time: "2026-11-25T14:15:00.123456+00:00"
        end_time: "2026-11-25T14:15:03.654321+00:00"
        server_version: "15.18"
        pg_dump_version: "15.18"
        format: custom
        jobs: 1
        compression: ""
        large_objects: true
        size: 9979
        checksum: 4d92089327e163fbd6ea327acd78b7d13485b4402b5b139f6be1440ca7347a0e
        files: [SHA256SUMS, database.dump]
        database_properties: {encoding: UTF8, lc_collate: C.UTF-8, lc_ctype: C.UTF-8}
stderr:
  description: The end of the failed programs' output.
  returned: when a dump failed
  type: str
  sample: 'pg_dump: error: query failed: ERROR:  permission denied for table secrets'
"""

from ansible.module_utils.basic import AnsibleModule, missing_required_lib

from ansible_collections.pitr.postgresql.plugins.module_utils.dumps import (
    FORMATS,
    run_logical_dump,
)
from ansible_collections.pitr.postgresql.plugins.module_utils.errors import PitrError
from ansible_collections.pitr.postgresql.plugins.module_utils.postgres import (
    PSYCOPG_IMPORT_ERROR,
    connection_argument_spec,
)


def argument_spec() -> dict[str, dict[str, object]]:
    spec: dict[str, dict[str, object]] = connection_argument_spec()
    spec.update(
        repository_path={"type": "path", "required": True},
        databases={"type": "list", "elements": "str", "default": [], "aliases": ["database"]},
        all_databases={"type": "bool", "default": False},
        globals={"type": "bool"},
        label={"type": "str"},
        state={"type": "str", "choices": ["present", "verified"], "default": "present"},
        format={"type": "str", "choices": list(FORMATS), "default": "custom"},
        jobs={"type": "int", "default": 1},
        compression={"type": "str"},
        large_objects={"type": "bool", "default": True},
        no_role_passwords={"type": "bool", "default": False},
        pg_bindir={"type": "path"},
        passfile={"type": "path"},
        timeout={"type": "int", "default": 0},
        lock_wait={"type": "int", "default": 0},
    )
    return spec


def main() -> None:
    module = AnsibleModule(argument_spec=argument_spec(), supports_check_mode=True)
    if PSYCOPG_IMPORT_ERROR is not None and module.params["state"] == "present":
        module.fail_json(msg=missing_required_lib("psycopg"), exception=PSYCOPG_IMPORT_ERROR)
    try:
        result = run_logical_dump(module.params, check_mode=module.check_mode)
    except PitrError as exc:
        module.fail_json(**exc.to_result())
    if result.get("failed"):
        module.fail_json(**result)
    module.exit_json(**result)


if __name__ == "__main__":
    main()

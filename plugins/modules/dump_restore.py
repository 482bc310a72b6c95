#!/usr/bin/python
# Copyright: contributors to pitr.postgresql
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: dump_restore
short_description: Restore a catalogued logical dump into a new (or an existing) PostgreSQL database
version_added: 0.1.0
description:
  - Restores one usable dump taken by M(pitr.postgresql.logical_dump) with C(pg_restore), chosen
    by O(label), or the newest usable dump of O(database).
  - The data comes back as it was when that dump started. A dump is a snapshot at its own
    time, not point-in-time recovery; to reach another moment, restore a base backup and
    replay WAL (M(pitr.postgresql.restore_plan)).
  - Refuses a dump that is not usable (its C(pg_dump) failed, or it did not verify), and, with
    O(verify_checksum), a dump whose files no longer match the recorded SHA-256.
  - B(Into a new database) (O(mode=new), the default) - creates O(target_database) from
    C(template0) with the dumped database's encoding and locale (C(CREATE DATABASE), as
    C(createdb) does), then runs C(pg_restore --exit-on-error). When C(pg_restore) fails, the
    new database is dropped again (unless O(keep_failed)). On success the database gets a
    comment naming the dump (RV(queries)); a second run finds it and changes nothing. An
    existing database of that name without this comment is never touched.
  - B(Into an existing database) (O(mode=existing)), only when asked - runs C(pg_restore
    --clean --if-exists --exit-on-error). For every object in the dump, C(pg_restore) first
    drops the object of the same name in the target if there is one (C(DROP ... IF EXISTS)),
    then creates it from the dump and loads its data, so those tables end up with exactly the
    dump's rows. Objects of the target that are not in the dump are left alone; a dropped
    table takes the views, foreign keys and other objects that depend on it with it only if
    they are in the dump too, otherwise the drop fails and so does the restore. By default
    this runs in one transaction (C(--single-transaction)), so either all of it happens or,
    after an error, nothing.
  - After the restore, the module counts the tables, sequences, views, materialized views and
    large objects of the target; fewer than the dump recorded fails the task.
options:
  repository_path:
    description:
      - Path of the POSIX repository holding the dumps.
    type: path
    required: true
  label:
    description:
      - Label of the dump to restore (see M(pitr.postgresql.dump_info)).
      - One of O(label) and O(database) is required.
    type: str
  database:
    description:
      - Restore the newest usable dump of this database.
    type: str
  target_database:
    description:
      - The database to restore into.
    type: str
    required: true
  mode:
    description:
      - V(new) creates O(target_database), which must not exist.
      - V(existing) restores into the existing O(target_database) with C(--clean --if-exists)
        (see the description for what that drops).
    type: str
    choices: [new, existing]
    default: new
  jobs:
    description:
      - Parallel C(pg_restore) jobs (one connection each). Not in one transaction.
    type: int
    default: 1
  single_transaction:
    description:
      - Restore in one transaction (C(--single-transaction)), all or nothing.
      - Default V(true) with O(mode=existing) and O(jobs=1), else V(false).
    type: bool
  no_owner:
    description:
      - Do not set the objects' owners to those of the dump (C(--no-owner)); everything is then
        owned by the restoring role. Needed when the dump's roles do not exist here.
    type: bool
    default: false
  no_privileges:
    description:
      - Do not restore the access privileges (C(--no-privileges)).
    type: bool
    default: false
  role:
    description:
      - Role name to restore as (C(pg_restore --role)).
    type: str
  owner:
    description:
      - Owner of the new database (O(mode=new)); default the connecting role.
    type: str
  same_locale:
    description:
      - Create the new database with the dumped database's encoding, C(LC_COLLATE), C(LC_CTYPE)
        and ICU locale, as recorded at dump time. V(false) takes the server's defaults.
    type: bool
    default: true
  keep_failed:
    description:
      - Keep the new database when C(pg_restore) fails (for inspection) instead of dropping it.
    type: bool
    default: false
  verify_checksum:
    description:
      - Check the dump's files against the recorded SHA-256 before restoring.
    type: bool
    default: true
  pg_bindir:
    description:
      - Directory of C(pg_restore); default the newest installed.
    type: path
  passfile:
    description:
      - A libpq password file (E(PGPASSFILE)) instead of O(login_password).
    type: path
  timeout:
    description:
      - Kill C(pg_restore) after this many seconds. V(0) waits for ever.
    type: int
    default: 0
extends_documentation_fragment:
  - pitr.postgresql.connection
  - pitr.postgresql.connection.action_group
attributes:
  check_mode:
    description: Can run in check_mode and return changed status prediction without modifying
      target. In check mode the module returns the C(pg_restore) argv in RV(cmd) and the
      C(CREATE DATABASE) statement in RV(queries), and changes nothing.
    support: full
  diff_mode:
    description: Will return details on what has changed, when in diff mode.
    support: none
  idempotent:
    description: When run twice in a row outside check mode, with the same arguments, the second
      invocation indicates no change.
    support: partial
    details: With O(mode=new) a second run finds the database it restored and changes nothing;
      O(mode=existing) restores again on every run.
notes:
  - Supports PostgreSQL 13 and later; tested with PostgreSQL 15. C(pg_restore) must be of the
    dump's major version or newer.
  - O(login_db) is the database the module connects to for C(CREATE DATABASE) (default libpq's);
    C(pg_restore) connects to O(target_database).
  - The globals dump (roles, tablespaces) is not restored by this module; apply its
    C(globals.sql) with C(psql -f) as a superuser before restoring databases on a new cluster.
  - The restore does not run C(ANALYZE); run C(vacuumdb --analyze-only) on the new database.
seealso:
  - module: pitr.postgresql.logical_dump
  - module: pitr.postgresql.dump_info
  - name: pg_restore
    description: The PostgreSQL documentation of pg_restore.
    link: https://www.postgresql.org/docs/current/app-pgrestore.html
author:
  - pitr.postgresql developers (@pitr-postgresql)
"""

EXAMPLES = r"""
- name: Restore the newest usable dump of shop into a new database
  pitr.postgresql.dump_restore:
    repository_path: /srv/pitr/main
    database: shop
    target_database: shop_restored
  become: true
  become_user: postgres
  register: restored

- name: Show what was restored
  ansible.builtin.debug:
    msg: "{{ restored.msg }} ({{ restored.restored_objects.tables.found }} tables)"

- name: Replace the contents of shop_staging with one dump (drops and recreates its objects)
  pitr.postgresql.dump_restore:
    repository_path: /srv/pitr/main
    label: before-upgrade-shop
    target_database: shop_staging
    mode: existing
    no_owner: true
  become: true
  become_user: postgres
"""

RETURN = r"""
label:
  description: The label of the dump restored.
  returned: always
  type: str
  sample: 20261125T141500Z-shop
database:
  description: The database that was dumped.
  returned: always
  type: str
  sample: shop
target_database:
  description: The database restored into.
  returned: always
  type: str
  sample: shop_restored
mode:
  description: V(new) or V(existing).
  returned: always
  type: str
  sample: new
dump:
  description: The dump's catalog record (see M(pitr.postgresql.logical_dump)), plus C(usable).
  returned: always
  type: dict
  sample: {"label": "20261125T141500Z-shop", "database": "shop", "status": "ok",
           "verified": true, "format": "custom", "start_time": "2026-11-25T14:15:00+00:00"}
cmd:
  description: The C(pg_restore) argv run (or, in check mode, that would run).
  returned: always
  type: list
  elements: str
  sample:
    - /usr/lib/postgresql/15/bin/pg_restore
    - --format=custom
    - --dbname=shop_restored
    - --exit-on-error
    - --no-password
    - /srv/pitr/main/dumps/20261125T141500Z-shop/database.dump
queries:
  description: SQL run (or, in check mode, that would run) - C(CREATE DATABASE), the marker
    C(COMMENT ON DATABASE), and C(DROP DATABASE) after a failed restore.
  returned: always
  type: list
  elements: str
  sample: ['CREATE DATABASE "shop_restored" TEMPLATE template0 ENCODING ''UTF8''']
restore_seconds:
  description: Wall time of C(pg_restore).
  returned: always
  type: float
  sample: 2.7
checksum_seconds:
  description: Wall time of the checksum check.
  returned: always
  type: float
  sample: 0.1
restored_objects:
  description: Objects counted in the target after the restore against those in the dump.
  returned: after a restore that ran
  type: dict
  sample: {"tables": {"expected": 7, "found": 7}, "large_objects": {"expected": 3, "found": 3}}
stderr:
  description: The end of C(pg_restore)'s output, when it failed.
  returned: on failure
  type: str
  sample: 'pg_restore: error: could not execute query: ERROR:  role "app" does not exist'
"""

from ansible.module_utils.basic import AnsibleModule, missing_required_lib

from ansible_collections.pitr.postgresql.plugins.module_utils.dumps import (
    RESTORE_MODES,
    run_dump_restore,
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
        label={"type": "str"},
        database={"type": "str"},
        target_database={"type": "str", "required": True},
        mode={"type": "str", "choices": list(RESTORE_MODES), "default": "new"},
        jobs={"type": "int", "default": 1},
        single_transaction={"type": "bool"},
        no_owner={"type": "bool", "default": False},
        no_privileges={"type": "bool", "default": False},
        role={"type": "str"},
        owner={"type": "str"},
        same_locale={"type": "bool", "default": True},
        keep_failed={"type": "bool", "default": False},
        verify_checksum={"type": "bool", "default": True},
        pg_bindir={"type": "path"},
        passfile={"type": "path"},
        timeout={"type": "int", "default": 0},
    )
    return spec


def main() -> None:
    module = AnsibleModule(
        argument_spec=argument_spec(),
        required_one_of=[("label", "database")],
        mutually_exclusive=[("label", "database")],
        supports_check_mode=True,
    )
    if PSYCOPG_IMPORT_ERROR is not None:
        module.fail_json(msg=missing_required_lib("psycopg"), exception=PSYCOPG_IMPORT_ERROR)
    try:
        result = run_dump_restore(module.params, check_mode=module.check_mode)
    except PitrError as exc:
        module.fail_json(**exc.to_result())
    if result.get("failed"):
        module.fail_json(**result)
    module.exit_json(**result)


if __name__ == "__main__":
    main()

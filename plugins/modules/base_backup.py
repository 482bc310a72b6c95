#!/usr/bin/python
# Copyright: contributors to pitr.postgresql
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: base_backup
short_description: Take, verify and catalogue a PostgreSQL base backup with pg_basebackup
version_added: 0.1.0
description:
  - Runs C(pg_basebackup) into the repository (C(backups/<label>/)), reads every byte of the
    result back against its C(backup_manifest), and writes the catalog record C(backup.json)
    that restore uses to choose a backup.
  - The backup is written into C(staging/backups/<label>/) and renamed into place, with its
    record, only when C(pg_basebackup) exited 0. A failed or interrupted C(pg_basebackup)
    leaves a record with RV(backup.status=failed), which restore never selects, and the task
    fails.
  - WAL from the start to the end of the backup is streamed into the backup (C(-X stream)),
    so each backup is consistent on its own.
  - Verification uses C(pg_verifybackup) for plain backups (and tar from PostgreSQL 18); for
    tar backups on older versions the module checks every tar member's size and checksum
    against the manifest while streaming through the (compressed) tar files, without
    unpacking them, and parses the included WAL with C(pg_waldump).
  - A repository lock makes a second backup on the same repository fail at once, naming the
    holder, instead of running two backups at the same time.
  - Connects over the replication protocol. The default (O(login_user=postgres), no host)
    is a peer connection on the local socket, for a task with C(become_user=postgres). A
    dedicated role with the REPLICATION attribute works as well (the role
    C(pitr.postgresql.base_backup) can set one up); its password is passed to
    C(pg_basebackup) in the environment, never on its command line.
options:
  repository_path:
    description:
      - Path of the POSIX repository (a local directory or a mounted network file system) on
        the host where the module runs. The same repository as the WAL archive.
      - The user the module runs as must be able to write to it.
    type: path
    required: true
  label:
    description:
      - Name of the backup (directory C(backups/<label>/)).
      - Defaults to the UTC start time, for example V(20261125T141500Z), so every run takes a
        new backup.
      - When a backup with this label exists and succeeded, nothing is done (V(changed=false)).
        A failed backup with this label is replaced.
    type: str
  state:
    description:
      - V(present) takes the backup unless it exists.
      - V(verified) reads an existing backup (O(label) required) back against its manifest
        again and updates its record; a backup that no longer verifies becomes unusable, and
        the task fails.
    type: str
    choices: [present, verified]
    default: present
  format:
    description:
      - V(tar) writes C(base.tar[.zst]) and C(pg_wal.tar) (compact, one file per tablespace).
      - V(plain) writes a copy of the data directory (restores by copying, verified with
        C(pg_verifybackup)).
    type: str
    choices: [tar, plain]
    default: tar
  compression:
    description:
      - C(pg_basebackup --compress) value, C([client-|server-]METHOD[:LEVEL]) with METHOD
        V(zstd), V(lz4) or V(gzip), or V(none).
      - The default V(server-zstd:1) compresses on the server and was measured fastest and
        smallest here (PostgreSQL 15, pgbench data) against server-lz4 and client-side
        compression. Never gzip by default (5-7 times slower).
      - With O(format=plain), server-side compression only reduces the bytes sent; the client
        decompresses into the directory.
      - PostgreSQL 13 and 14 support only V(none) and V(client-gzip) with O(format=tar).
    type: str
    default: server-zstd:1
  checkpoint:
    description:
      - V(fast) requests an immediate checkpoint so the backup starts at once; V(spread) waits
        for the next scheduled checkpoint (gentler on I/O, can take C(checkpoint_timeout)).
    type: str
    choices: [fast, spread]
    default: fast
  manifest_checksums:
    description:
      - Checksum algorithm of the C(backup_manifest).
      - V(auto) is V(CRC32C) (PostgreSQL's default, cheap for the server) where it can be
        verified at C speed - by C(pg_verifybackup) (plain; tar from PostgreSQL 18), or for
        tar before PostgreSQL 18 by the module with the C(crc32c) Python library (Debian
        C(python3-crc32c)) - and otherwise V(SHA256), which the module verifies through
        OpenSSL (a pure-Python CRC-32C would be far too slow).
    type: str
    choices: [auto, CRC32C, SHA224, SHA256, SHA384, SHA512]
    default: auto
  max_rate:
    description:
      - Limit the transfer rate (C(pg_basebackup --max-rate)), for example V(100M).
    type: str
  min_interval:
    description:
      - Do not take a backup when a usable one finished less than this long ago; return that
        one with V(changed=false). Seconds, or a number with a unit (V(30min), V(12h), V(1d)).
      - V(0) (the default) always takes a backup.
    type: str
    default: "0"
  pg_bindir:
    description:
      - Directory of C(pg_basebackup), C(psql), C(pg_verifybackup) and C(pg_waldump).
      - Default the newest installed (C(/usr/lib/postgresql/<major>/bin),
        C(/usr/pgsql-<major>/bin), then E(PATH)). A C(pg_basebackup) older than the server is
        refused.
    type: path
  passfile:
    description:
      - A libpq password file (E(PGPASSFILE)) for the replication role, instead of
        O(login_password).
    type: path
  timeout:
    description:
      - Kill C(pg_basebackup) after this many seconds (the backup is then recorded as failed).
        V(0) waits for ever.
    type: int
    default: 0
  lock_wait:
    description:
      - Seconds to wait for a backup that holds the repository lock before failing.
    type: int
    default: 0
extends_documentation_fragment:
  - pitr.postgresql.connection
  - pitr.postgresql.connection.action_group
attributes:
  check_mode:
    description: Can run in check_mode and return changed status prediction without modifying
      target. In check mode the module connects to read the server's version and returns the
      C(pg_basebackup) argv it would run in RV(cmd).
    support: full
  diff_mode:
    description: Will return details on what has changed, when in diff mode.
    support: none
  idempotent:
    description: When run twice in a row outside check mode, with the same arguments, the second
      invocation indicates no change.
    support: partial
    details: Idempotent with a fixed O(label) or with O(min_interval); the default label is the
      current time, so every run takes a new backup.
notes:
  - Supports PostgreSQL 13 and later; tested with PostgreSQL 15. Server-side compression needs
    PostgreSQL 15.
  - The connecting role needs the REPLICATION attribute (or superuser) and a C(replication)
    line in C(pg_hba.conf); O(login_db) is not used (the replication protocol has no database).
  - The module does not use psycopg; it runs C(psql) and C(pg_basebackup) with libpq.
  - Progress (bytes done and total) is written to C(staging/backups/<label>.progress.json)
    while the backup runs, which M(pitr.postgresql.backup_info) reports; the final figures are
    in RV(progress).
seealso:
  - module: pitr.postgresql.backup_info
  - name: pg_basebackup
    description: The PostgreSQL documentation of pg_basebackup.
    link: https://www.postgresql.org/docs/current/app-pgbasebackup.html
author:
  - pitr.postgresql developers (@pitr-postgresql)
"""

EXAMPLES = r"""
- name: Take a verified base backup into the repository
  pitr.postgresql.base_backup:
    repository_path: /srv/pitr/main
  become: true
  become_user: postgres
  register: backup

- name: Show what was taken
  ansible.builtin.debug:
    msg: >-
      {{ backup.label }}: {{ backup.progress.done_bytes | human_readable }} read,
      {{ backup.backup.size_on_disk | human_readable }} stored, verified {{ backup.usable }}

- name: Take at most one backup a day (idempotent)
  pitr.postgresql.base_backup:
    repository_path: /srv/pitr/main
    min_interval: 1d
  become: true
  become_user: postgres

- name: Plain-format backup as a dedicated replication role
  pitr.postgresql.base_backup:
    repository_path: /srv/pitr/main
    label: before-upgrade
    format: plain
    login_user: pitr_backup
    login_unix_socket: /var/run/postgresql
    passfile: /etc/pitr-postgresql/base_backup.pgpass
  become: true
  become_user: postgres

- name: Re-read an existing backup against its manifest
  pitr.postgresql.base_backup:
    repository_path: /srv/pitr/main
    label: before-upgrade
    state: verified
  become: true
  become_user: postgres
"""

RETURN = r"""
label:
  description: The backup's label.
  returned: always
  type: str
  sample: 20261125T141500Z
usable:
  description: True when the backup completed and verified, so restore may use it.
  returned: always
  type: bool
  sample: true
backup:
  description:
    - The catalog record (C(backups/<label>/backup.json)). In check mode only the label,
      format, compression and V(running) status of the backup that would be taken.
  returned: always
  type: dict
  contains:
    record_version:
      description: Version of the record format.
      type: int
      returned: always
      sample: 1
    label:
      description: The backup's label.
      type: str
      returned: always
      sample: 20261125T141500Z
    status:
      description: V(ok), V(failed), V(running) or V(expiring).
      type: str
      returned: always
      sample: ok
    verified:
      description: True when every byte was read back and matched the manifest.
      type: bool
      returned: always
      sample: true
    verification:
      description: Tool, result and message of the verification.
      type: dict
      returned: always
      sample: {"tool": "pitr.postgresql tar verifier", "ok": true,
               "message": "979 files and 824055419 bytes match the manifest (SHA256)"}
    start_lsn:
      description: WAL location where the backup started.
      type: str
      returned: always
      sample: 0/64000028
    stop_lsn:
      description: WAL location where the backup ended; recovery is consistent from here.
      type: str
      returned: always
      sample: 0/64000138
    start_wal:
      description: WAL segment holding the start LSN.
      type: str
      returned: always
      sample: "000000010000000000000064"
    stop_wal:
      description: WAL segment holding the end of the backup.
      type: str
      returned: always
      sample: "000000010000000000000064"
    start_time:
      description: When the backup started (ISO 8601, UTC).
      type: str
      returned: always
      sample: "2026-11-25T14:25:51+00:00"
    stop_time:
      description: When pg_basebackup finished (at or after the true end of the backup).
      type: str
      returned: always
      sample: "2026-11-25T14:25:55.123456+00:00"
    timeline:
      description: Timeline the backup ended on.
      type: int
      returned: always
      sample: 1
    system_identifier:
      description: The cluster's system identifier.
      type: int
      returned: always
      sample: 7712112821732407675
    pg_version:
      description: Server version.
      type: str
      returned: always
      sample: "15.18"
    pg_major:
      description: Server major version.
      type: int
      returned: always
      sample: 15
    pg_basebackup_version:
      description: Version of the pg_basebackup that took the backup.
      type: str
      returned: always
      sample: "15.18"
    backup_format:
      description: V(tar) or V(plain).
      type: str
      returned: always
      sample: tar
    compression:
      description: The C(--compress) value used, or V(none).
      type: str
      returned: always
      sample: server-zstd:1
    wal_method:
      description: Always V(stream).
      type: str
      returned: always
      sample: stream
    size_on_disk:
      description: Bytes the backup occupies in the repository.
      type: int
      returned: always
      sample: 53421680
    cluster_size:
      description: Bytes of the files backed up (sum of the manifest's sizes).
      type: int
      returned: always
      sample: 807278203
    checksum_algorithm:
      description: The manifest's file checksum algorithm.
      type: str
      returned: always
      sample: SHA256
    files:
      description: Files inside C(backups/<label>/), the record excluded.
      type: list
      elements: str
      returned: always
      sample: [backup_manifest, base.tar.zst, pg_wal.tar]
cmd:
  description: The pg_basebackup argv run (or, in check mode, that would run); empty when no
    backup was taken.
  returned: always
  type: list
  elements: str
  sample:
    - /usr/lib/postgresql/15/bin/pg_basebackup
    - --pgdata=/srv/pitr/main/staging/backups/20261125T141500Z
    - --format=tar
    - --wal-method=stream
    - --checkpoint=fast
    - --manifest-checksums=SHA256
    - --label=pitr.postgresql 20261125T141500Z
    - --progress
    - --verbose
    - --no-password
    - --compress=server-zstd:1
progress:
  description: Bytes pg_basebackup reported done and in total, and bytes read back by the
    verification. Empty when no backup was taken.
  returned: always
  type: dict
  sample: {"phase": "done", "done_bytes": 807797760, "total_bytes": 807797760,
           "percent": 100.0, "verify_bytes": 824055419}
backup_seconds:
  description: Wall time of pg_basebackup.
  returned: always
  type: float
  sample: 4.45
verify_seconds:
  description: Wall time of the verification.
  returned: always
  type: float
  sample: 2.42
message:
  description: What happened, in one sentence (the verification message, or why nothing was
    done).
  returned: always
  type: str
  sample: 979 files and 824055419 bytes match the manifest (SHA256); WAL present and parseable
skipped_reason:
  description: Why no backup was taken because of O(min_interval).
  returned: when a recent usable backup made the run a no-op
  type: str
  sample: usable backup 20261125T141500Z is younger than min_interval
stderr:
  description: The end of pg_basebackup's output, when the backup failed.
  returned: on failure
  type: str
  sample: "pg_basebackup: error: could not connect to server"
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.pitr.postgresql.plugins.module_utils.backup import (
    CHECKSUM_CHOICES,
    DEFAULT_COMPRESSION,
    run_base_backup,
)
from ansible_collections.pitr.postgresql.plugins.module_utils.errors import PitrError
from ansible_collections.pitr.postgresql.plugins.module_utils.postgres import (
    connection_argument_spec,
)


def argument_spec() -> dict[str, dict[str, object]]:
    spec: dict[str, dict[str, object]] = connection_argument_spec()
    spec.update(
        repository_path={"type": "path", "required": True},
        label={"type": "str"},
        state={"type": "str", "choices": ["present", "verified"], "default": "present"},
        format={"type": "str", "choices": ["tar", "plain"], "default": "tar"},
        compression={"type": "str", "default": DEFAULT_COMPRESSION},
        checkpoint={"type": "str", "choices": ["fast", "spread"], "default": "fast"},
        manifest_checksums={"type": "str", "choices": list(CHECKSUM_CHOICES), "default": "auto"},
        max_rate={"type": "str"},
        min_interval={"type": "str", "default": "0"},
        pg_bindir={"type": "path"},
        passfile={"type": "path"},
        timeout={"type": "int", "default": 0},
        lock_wait={"type": "int", "default": 0},
    )
    return spec


def main() -> None:
    module = AnsibleModule(argument_spec=argument_spec(), supports_check_mode=True)
    try:
        result = run_base_backup(module.params, check_mode=module.check_mode)
    except PitrError as exc:
        module.fail_json(**exc.to_result())
    if result.get("failed"):
        module.fail_json(**result)
    module.exit_json(**result)


if __name__ == "__main__":
    main()

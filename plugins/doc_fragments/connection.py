# Copyright: contributors to pitr.postgresql
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Shared documentation: PostgreSQL connection options and module attributes.

Fragments: ``pitr.postgresql.connection`` (options), ``.attributes`` (a module that changes
things), ``.info_attributes`` (a read-only module), ``.action_group`` (a member of the
``pitr.postgresql.postgresql`` action group in meta/runtime.yml).

The option names are community.postgresql's, so that one ``module_defaults`` entry can serve
both collections. The argument spec is ``postgres.connection_argument_spec()``; keep the two
in step.
"""

from __future__ import annotations


class ModuleDocFragment:
    # Connection options (pitr.postgresql.connection).
    DOCUMENTATION = r"""
options:
  login_user:
    description:
      - The role the module connects as.
    type: str
    default: postgres
  login_password:
    description:
      - The password of O(login_user).
      - Passed to libpq in the connection parameters, never on a command line. Leave it unset
        to use peer authentication, a C(.pgpass) file or the E(PGPASSWORD) environment variable.
    type: str
  login_host:
    description:
      - Host name or IP address of the server.
      - When unset (or V(localhost)) and O(login_unix_socket) is set, the Unix socket is used.
      - With neither, libpq's defaults apply (E(PGHOST), then the default socket directory).
    type: str
  login_unix_socket:
    description:
      - Directory of the server's Unix domain socket, for local connections.
    type: str
  port:
    description:
      - Database port to connect to (also the number in the Unix socket's name).
    type: int
    default: 5432
    aliases: [login_port]
  login_db:
    description:
      - Database to connect to.
      - When unset, libpq's default applies (a database named like O(login_user)).
    type: str
    aliases: [db]
  ssl_mode:
    description:
      - Whether and how strictly a TLS connection is negotiated with the server.
      - See U(https://www.postgresql.org/docs/current/libpq-ssl.html) for the modes.
      - The default V(prefer) is libpq's default.
    type: str
    default: prefer
    choices: [allow, disable, prefer, require, verify-ca, verify-full]
  ca_cert:
    description:
      - File with the certificate authorities that sign the server's certificate.
      - Used with O(ssl_mode=verify-ca) or O(ssl_mode=verify-full).
    type: str
  connect_timeout:
    description:
      - Seconds to wait for the connection before failing.
    type: int
    default: 10
notes:
  - The modules use psycopg 3 on the host they run on (the database host or a host that
    reaches it). Install it with the distribution package C(python3-psycopg) or with
    C(pip install psycopg[binary]).
  - The default O(login_user=postgres) with no password suits running on the database host
    with C(become_user=postgres) and peer authentication on the Unix socket.
  - PostgreSQL 13 or later is required; older servers are refused with a clear message.
requirements:
  - psycopg >= 3.1
"""

    # Attributes of a module that changes server settings (pitr.postgresql.connection.attributes).
    ATTRIBUTES = r"""
attributes:
  check_mode:
    description: Can run in check_mode and return changed status prediction without modifying
      target. In check mode the module returns the SQL it would run.
    support: full
  diff_mode:
    description: Will return details on what has changed (or possibly needs changing in
      check_mode), when in diff mode.
    support: full
  idempotent:
    description: When run twice in a row outside check mode, with the same arguments, the second
      invocation indicates no change.
    support: full
"""

    # Attributes of a read-only (_info) module (pitr.postgresql.connection.info_attributes).
    INFO_ATTRIBUTES = r"""
attributes:
  check_mode:
    description: Can run in check_mode and return changed status prediction without modifying
      target. This module only reads, so check mode changes nothing.
    support: full
  diff_mode:
    description: Will return details on what has changed, when in diff mode.
    support: N/A
    details: This module changes nothing.
  idempotent:
    description: When run twice in a row outside check mode, with the same arguments, the second
      invocation indicates no change.
    support: full
"""

    # Membership of the collection's action group (pitr.postgresql.connection.action_group).
    ACTION_GROUP = r"""
attributes:
  action_group:
    description: Use C(group/pitr.postgresql.postgresql) in C(module_defaults) to set defaults
      for this module.
    support: full
    membership:
      - pitr.postgresql.postgresql
"""

# Copyright: contributors to pitr.postgresql
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Shared documentation: the repository a module reads on the host where it runs.

Fragment: ``pitr.postgresql.repository``, the required ``repository_path`` option of the
modules that work on a POSIX repository by path (a plain ``type='path', required=True``
entry in their argument spec). Modules whose ``repository_path`` is optional or means more
(archive_info checks it against the server, recovery_info looks for a history file in it)
document their own.
"""

from __future__ import annotations


class ModuleDocFragment:
    # The required repository path (pitr.postgresql.repository).
    DOCUMENTATION = r"""
options:
  repository_path:
    description:
      - Path of the POSIX repository on the host where the module runs.
    type: path
    required: true
"""

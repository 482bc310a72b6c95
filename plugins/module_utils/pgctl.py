# Copyright: contributors to pitr.postgresql
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""pg_ctl for the restore modules: start (without waiting), promote, stop.

pg_ctl refuses to run as root; a module that runs as root (the staging step) names the server's
user and runner switches to it. Standard library only.
"""

from __future__ import annotations

import os

from ansible_collections.pitr.postgresql.plugins.module_utils import runner
from ansible_collections.pitr.postgresql.plugins.module_utils.errors import PitrError


class PgCtlError(PitrError):
    """pg_ctl failed; its own message is in ``stderr``."""


def pg_ctl(
    bindir: str, action: str, data_dir: str, *args: str, user: str | None = None
) -> runner.CommandResult:
    """Run ``pg_ctl ACTION --pgdata=DATA_DIR ARGS`` (as ``user``, else as this process)."""
    argv = [os.path.join(bindir, "pg_ctl"), action, f"--pgdata={data_dir}", *args]
    result = runner.run(argv, check=False, cwd="/", timeout=600, user=user)
    if result.rc != 0:
        raise PgCtlError(
            f"pg_ctl {action} failed (exit {result.rc}): {result.stderr.strip()[-1000:]}",
            cmd=result.cmd,
            rc=result.rc,
            stderr=result.stderr,
        )
    return result


def start_no_wait(
    bindir: str, data_dir: str, log_file: str, options: str, user: str | None = None
) -> list[str]:
    """``pg_ctl start --no-wait``: the server accepts connections only once consistent, which
    can take long; the follow step watches it from here. ``-l``: its output must not hold our
    pipe. Returns the command run."""
    args = [f"--log={log_file}", "--no-wait"]
    if options:
        args.append(f"--options={options}")
    return pg_ctl(bindir, "start", data_dir, *args, user=user).cmd


def log_size(path: str | None) -> int:
    """The size of the server log (0 when there is none yet): where this start's lines begin."""
    try:
        return os.stat(path).st_size if path else 0
    except OSError:
        return 0

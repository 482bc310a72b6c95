# Copyright: contributors to pitr.postgresql
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Filters ``archive_command`` and ``restore_command``: the server settings that run ``pitr-wal``.

One implementation of their quoting, ``hostcmd.command_for`` (each argument shell-quoted, every
``%`` doubled because PostgreSQL expands ``%p``, ``%f`` and ``%%``), for the roles' templates
as for the modules. Documentation: ``archive_command.yml`` and ``restore_command.yml`` beside
this file.
"""

from __future__ import annotations

import typing as t

from ansible.errors import AnsibleFilterError

from ansible_collections.pitr.postgresql.plugins.module_utils.hostcmd import command_for


def _command(
    action: str,
    program: str,
    repo: str,
    python: str = "/usr/bin/python3",
    compress: str | None = None,
    timeout: float | None = None,
    prefetch: int | None = None,
) -> str:
    try:
        return command_for(
            action,
            program=str(program),
            repo=str(repo),
            python=str(python),
            compress=str(compress) if compress else None,
            timeout=None if timeout is None else float(timeout),
            prefetch=int(prefetch) if prefetch else None,
        )
    except (TypeError, ValueError) as exc:
        raise AnsibleFilterError(f"pitr.postgresql.{action}_command: {exc}") from exc


def archive_command(program: str, repo: str, **kwargs: t.Any) -> str:
    """``PYTHON -I -S PROGRAM --repo REPO [--compress C] [--timeout S] push %p``."""
    return _command("push", program, repo, **kwargs)


def restore_command(program: str, repo: str, **kwargs: t.Any) -> str:
    """``PYTHON -I -S PROGRAM --repo REPO [--timeout S] [--prefetch N] fetch %f %p``."""
    return _command("fetch", program, repo, **kwargs)


class FilterModule:
    """The pitr-wal command filters."""

    def filters(self) -> dict[str, t.Callable[..., str]]:
        return {"archive_command": archive_command, "restore_command": restore_command}

# Copyright: contributors to pitr.postgresql
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The one family of exceptions raised by the collection's module_utils.

Modules turn a PitrError into ``fail_json(msg=..., **context)``; the host command turns it
into a log line and an exit code. Nothing below the module layer calls fail_json.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    import typing as t


class PitrError(Exception):
    """A failure with a message that names the problem and the fix, plus context."""

    def __init__(self, msg: str, **context: t.Any) -> None:
        super().__init__(msg)
        self.msg = msg
        self.context = context

    def to_result(self) -> dict[str, t.Any]:
        """Keyword arguments for ``AnsibleModule.fail_json``."""
        result: dict[str, t.Any] = {"msg": self.msg}
        result.update(self.context)
        return result


class StorageError(PitrError):
    """The storage backend could not do what was asked (I/O error, permission, timeout)."""


class ObjectExistsError(StorageError):
    """An object with that name is already stored; nothing was overwritten."""


class ObjectNotFoundError(StorageError):
    """No object with that name is stored."""


class LockHeldError(StorageError):
    """Another process holds the repository lock."""


class RepositoryError(PitrError):
    """The repository's layout or identity does not fit the request."""


class IdentityMismatchError(RepositoryError):
    """A file or cluster does not belong to the repository's cluster."""


class ArchiveConflictError(PitrError):
    """An archived file of the same name has different content."""


class IntegrityError(PitrError):
    """Stored content does not match its recorded checksum or size."""


class SettingsError(PitrError):
    """Requested server settings cannot be applied as asked."""


class CommandError(PitrError):
    """An external command failed (context carries cmd, rc, stdout, stderr)."""

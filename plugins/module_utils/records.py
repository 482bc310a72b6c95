# Copyright: contributors to pitr.postgresql
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Catalog records: one JSON object per catalogued item at ``<prefix>/<label>/<record name>``.

Base backups (``catalog.py``, ``backups/<label>/backup.json``) and logical dumps
(``dumps.py``, ``dumps/<label>/dump.json``) keep their records the same way, and this module
is that way, once:

- labels are safe directory names (``check_label``), by default the UTC time
  (``utc_label``);
- a record is written whole with the storage's atomic ``put`` (never visible half-written),
  as indented JSON with sorted keys (``record_json``);
- reading validates: a record that is not JSON or does not fit its class is reported as
  unreadable (``RepositoryError`` naming the key and what to do), never half-trusted;
- listing finds ``<prefix>/<label>/<record name>`` exactly one level down, skips what cannot
  be read (reading it reports why) and returns the records newest first.

What a record holds, and what makes one usable, stays with its kind (``catalog.py``,
``dumps.py``). Standard library only.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import typing as t
from dataclasses import dataclass, fields, replace

from ansible_collections.pitr.postgresql.plugins.module_utils.errors import (
    PitrError,
    RepositoryError,
)

if t.TYPE_CHECKING:
    from ansible_collections.pitr.postgresql.plugins.module_utils.repository import Repository

_LABEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


class Record(t.Protocol):
    """What every catalog record offers."""

    @property
    def label(self) -> str: ...

    def to_json(self) -> bytes: ...


R = t.TypeVar("R", bound=Record)
S = t.TypeVar("S", bound="RecordBase")


class RecordBase:
    """What backup and dump records share, mixed into their frozen dataclasses."""

    # Declared for type checkers; the dataclasses define them as fields.
    status: str
    verified: bool

    def to_dict(self) -> dict[str, t.Any]:
        raise NotImplementedError

    def to_json(self) -> bytes:
        """The exact bytes of the record file."""
        return record_json(self.to_dict())

    def with_changes(self: S, **changes: t.Any) -> S:
        """A copy with some fields changed (records are frozen)."""
        return t.cast(S, replace(t.cast(t.Any, self), **changes))

    @property
    def usable(self) -> bool:
        """May restore use it? Only when it completed (``ok``) and was verified."""
        return self.status == "ok" and self.verified is True


def utc_label(now: dt.datetime | None = None) -> str:
    """A label from the UTC time: ``20261125T141500Z``."""
    now = now or dt.datetime.now(dt.UTC)
    return now.astimezone(dt.UTC).strftime("%Y%m%dT%H%M%SZ")


def check_label(label: str, what: str, error: type[PitrError]) -> str:
    """Return ``label`` if it is a safe directory name, else raise ``error`` saying so."""
    if not _LABEL_RE.match(label or ""):
        raise error(
            f"{what} {label!r} is not allowed: use 1-100 letters, digits, '.', '_' or '-',"
            " starting with a letter or digit"
        )
    return label


def record_json(data: t.Mapping[str, t.Any]) -> bytes:
    """The bytes of a record file: indented JSON, sorted keys, a final newline."""
    return json.dumps(data, indent=2, sort_keys=True).encode() + b"\n"


def check_record_version(data: t.Mapping[str, t.Any], current: int) -> None:
    """ValueError when ``data`` was written by a newer collection than this one."""
    version = int(data.get("record_version", current))
    if version > current:
        raise ValueError(
            f"record_version {version} is newer than this collection reads ({current});"
            " upgrade pitr.postgresql"
        )


def known_fields(cls: type[t.Any], data: t.Mapping[str, t.Any]) -> dict[str, t.Any]:
    """The items of ``data`` that are fields of the dataclass ``cls`` (later fields ignored)."""
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in data.items() if k in names}


def check_types(
    record: object, *, integers: t.Iterable[str] = (), booleans: t.Iterable[str] = ()
) -> None:
    """ValueError unless the named attributes are ints (not bools) and bools respectively."""
    for name in integers:
        value = getattr(record, name)
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"{name} must be an integer, got {value!r}")
    for name in booleans:
        value = getattr(record, name)
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be true or false, got {value!r}")


@dataclass(frozen=True)
class RecordShelf(t.Generic[R]):
    """Where and how one kind of record is kept in a repository.

    ``prefix`` and ``record_name`` must agree with ``record_key`` (the repository owns the
    layout); ``noun`` names the record and ``item`` what it describes, in error messages;
    ``label_error`` is what an unsafe label raises.
    """

    prefix: str
    record_name: str
    record_key: t.Callable[[str], str]
    parse: t.Callable[[t.Mapping[str, t.Any]], R]
    sort_key: t.Callable[[R], t.Any]
    noun: str
    item: str
    label_error: type[PitrError] = RepositoryError

    def check_label(self, label: str) -> str:
        """``label`` if it is a safe directory name, else ``label_error``."""
        return check_label(label, f"{self.item} label", self.label_error)

    def read(self, repo: Repository, label: str) -> R | None:
        """The record of ``label``, or None when there is none (nothing, or unfinished)."""
        key = self.record_key(self.check_label(label))
        if repo.storage.stat(key) is None:
            return None
        raw = repo.storage.get(key)
        try:
            data = json.loads(raw)
            if not isinstance(data, dict):
                raise ValueError(f"it holds a JSON {type(data).__name__}, not an object")
            return self.parse(data)
        except (ValueError, TypeError) as exc:
            raise RepositoryError(
                f"the {self.noun} {key} in {repo.describe()} is unreadable ({exc}); the"
                f" {self.item} cannot be used until it is re-verified or removed",
                key=key,
            ) from exc

    def write(self, repo: Repository, record: R, *, key: str | None = None) -> str:
        """Write (or replace) the record atomically; return its key.

        ``key`` lets the caller write the record into a staging directory first, so that the
        files and their record appear under ``prefix`` together.
        """
        self.check_label(record.label)
        target = key or self.record_key(record.label)
        repo.storage.put(target, record.to_json(), overwrite=True)
        return target

    def newest_first(self, repo: Repository) -> list[R]:
        """Every record, newest first by ``sort_key``; unreadable ones are skipped."""
        records: list[R] = []
        suffix = "/" + self.record_name
        for info in repo.storage.list(self.prefix):
            key = info.key
            if not key.endswith(suffix) or key.count("/") != 2:
                continue
            try:
                rec = self.read(repo, key.split("/")[1])
            except (RepositoryError, self.label_error):  # unreadable, or an unsafe name
                continue  # (a storage failure is not skipped: it would hide a record)
            if rec is not None:
                records.append(rec)
        records.sort(key=self.sort_key, reverse=True)
        return records

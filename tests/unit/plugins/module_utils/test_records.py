# Copyright: contributors to pitr.postgresql
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The shared catalog-record helper: labels, validation helpers, read/write/list on a shelf.

Backup and dump records have their own tests (test_catalog.py, test_dumps.py); these pin the
shared rules with a record kind of their own, so that neither kind is needed to test them.
"""

from __future__ import annotations

import datetime as dt
import json
import typing as t
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pytest

from ansible_collections.pitr.postgresql.plugins.module_utils import records
from ansible_collections.pitr.postgresql.plugins.module_utils.errors import (
    PitrError,
    RepositoryError,
    StorageError,
)
from ansible_collections.pitr.postgresql.plugins.module_utils.repository import Repository
from tests.support.memory_storage import MemoryStorage


class NoteError(PitrError):
    """A label error of its own, as dumps.DumpError is."""


@dataclass(frozen=True)
class Note(records.RecordBase):
    label: str
    status: str
    verified: bool = False
    when: str = ""
    size: int = 0
    tags: list[str] = field(default_factory=list)
    record_version: int = 1

    def to_dict(self) -> dict[str, t.Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: t.Mapping[str, t.Any]) -> Note:
        records.check_record_version(data, 1)
        rec = cls(**records.known_fields(cls, data))
        records.check_types(rec, integers=("size",), booleans=("verified",))
        return rec


def note_key(label: str) -> str:
    return f"notes/{label}/note.json"


SHELF: records.RecordShelf[Note] = records.RecordShelf(
    prefix="notes",
    record_name="note.json",
    record_key=note_key,
    parse=Note.from_dict,
    sort_key=lambda n: (n.when, n.label),
    noun="note record",
    item="note",
    label_error=NoteError,
)


@pytest.fixture(params=["memory", "posix"])
def repo(request: pytest.FixtureRequest, tmp_path: Path) -> Repository:
    if request.param == "memory":
        return Repository(MemoryStorage())
    return Repository.open_posix(str(tmp_path))


def test_utc_label() -> None:
    when = dt.datetime(2026, 11, 25, 15, 15, 0, tzinfo=dt.timezone(dt.timedelta(hours=1)))
    assert records.utc_label(when) == "20261125T141500Z"
    assert len(records.utc_label()) == 16


@pytest.mark.parametrize("label", ["", "../x", "a/b", ".hidden", "-x", "a b", "x" * 101])
def test_check_label_raises_the_given_error_naming_the_label(label: str) -> None:
    with pytest.raises(NoteError, match=r"note label .* is not allowed: use 1-100 letters"):
        records.check_label(label, "note label", NoteError)


@pytest.mark.parametrize("label", ["a", "20261125T141500Z-shop", "A.b_c-d", "x" * 100])
def test_check_label_returns_safe_labels(label: str) -> None:
    assert records.check_label(label, "note label", NoteError) == label


def test_record_json_is_indented_sorted_and_ends_with_a_newline() -> None:
    assert records.record_json({"b": 1, "a": [2]}) == b'{\n  "a": [\n    2\n  ],\n  "b": 1\n}\n'


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"label": "x", "status": "ok", "record_version": 2}, "newer than this collection"),
        ({"label": "x", "status": "ok", "size": "1"}, "size must be an integer"),
        ({"label": "x", "status": "ok", "size": True}, "size must be an integer"),
        ({"label": "x", "status": "ok", "verified": 1}, "verified must be true or false"),
    ],
)
def test_validation_helpers_refuse(data: dict[str, t.Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Note.from_dict(data)


def test_known_fields_ignores_later_fields() -> None:
    assert Note.from_dict({"label": "x", "status": "ok", "later": 1}) == Note("x", "ok")


def test_record_base_json_copy_and_usable() -> None:
    rec = Note("x", "ok", verified=True, tags=["a"])
    assert json.loads(rec.to_json()) == rec.to_dict()
    assert rec.usable
    failed = rec.with_changes(status="failed")
    assert isinstance(failed, Note) and failed.status == "failed" and not failed.usable
    assert rec.status == "ok"
    assert not rec.with_changes(verified=False).usable


def test_write_read_round_trip_and_missing(repo: Repository) -> None:
    rec = Note("n1", "ok", when="2026-11-25T10:00:00+00:00", size=3)
    assert SHELF.write(repo, rec) == "notes/n1/note.json"
    assert repo.storage.get("notes/n1/note.json") == rec.to_json()
    assert SHELF.read(repo, "n1") == rec
    assert SHELF.read(repo, "n2") is None


def test_write_replaces_and_can_go_to_a_staging_key(repo: Repository) -> None:
    SHELF.write(repo, Note("n1", "running"))
    SHELF.write(repo, Note("n1", "ok", verified=True))
    assert SHELF.read(repo, "n1") == Note("n1", "ok", verified=True)
    assert SHELF.write(repo, Note("n2", "ok"), key="staging/notes/n2/note.json") == (
        "staging/notes/n2/note.json"
    )
    assert SHELF.read(repo, "n2") is None


def test_write_and_read_refuse_unsafe_labels(repo: Repository) -> None:
    with pytest.raises(NoteError):
        SHELF.write(repo, Note("../x", "ok"))
    with pytest.raises(NoteError):
        SHELF.read(repo, "a b")
    assert repo.storage.stat("notes") is None


@pytest.mark.parametrize("content", [b"{not json", b'{"label": "bad"}', b'["a"]'])
def test_unreadable_record_names_key_and_fix(repo: Repository, content: bytes) -> None:
    repo.storage.put("notes/bad/note.json", content)
    with pytest.raises(
        RepositoryError, match=r"the note record notes/bad/note\.json in .* is unreadable"
    ) as e:
        SHELF.read(repo, "bad")
    assert "the note cannot be used until it is re-verified or removed" in e.value.msg
    assert e.value.context == {"key": "notes/bad/note.json"}


def test_list_newest_first_skipping_unfinished_unreadable_and_too_deep(repo: Repository) -> None:
    SHELF.write(repo, Note("b", "ok", when="2026-11-25T12:00:00+00:00"))
    SHELF.write(repo, Note("a", "ok", when="2026-11-25T14:00:00+00:00"))
    SHELF.write(repo, Note("c", "ok", when="2026-11-25T12:00:00+00:00"))
    repo.storage.put("notes/d/data.bin", b"no record yet: unfinished")
    repo.storage.put("notes/e/note.json", b"{not json")
    repo.storage.put("notes/f/sub/note.json", SHELF.parse({"label": "f", "status": "ok"}).to_json())
    assert [n.label for n in SHELF.newest_first(repo)] == ["a", "c", "b"]


def test_list_skips_a_directory_with_an_unsafe_name() -> None:
    storage = MemoryStorage()
    storage.objects["notes/-x/note.json"] = Note("-x", "ok").to_json()
    storage.mtimes["notes/-x/note.json"] = 1.0
    storage.objects["notes/y/note.json"] = Note("y", "ok").to_json()
    storage.mtimes["notes/y/note.json"] = 1.0
    assert [n.label for n in SHELF.newest_first(Repository(storage))] == ["y"]


class FailingGetStorage(MemoryStorage):
    def get(self, key: str) -> bytes:
        if key == "notes/b/note.json":
            raise StorageError(f"cannot read {key}: Input/output error")
        return super().get(key)


def test_list_does_not_hide_a_storage_failure() -> None:
    repo = Repository(FailingGetStorage())
    SHELF.write(repo, Note("a", "ok"))
    SHELF.write(repo, Note("b", "ok"))
    with pytest.raises(StorageError, match="Input/output error"):
        SHELF.newest_first(repo)

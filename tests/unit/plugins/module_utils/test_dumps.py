# Copyright: contributors to pitr.postgresql
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Logical dumps: records, labels, argv building, TOC and globals parsing, verification rules.

The TOC listings and the globals file are real output of PostgreSQL 15.18 (``pg_restore
--list`` of ``pg_dump -Fc`` / ``-Fd`` archives, ``pg_dumpall --globals-only``), recorded
into ``fixtures/``.
"""

from __future__ import annotations

import json
import typing as t
from pathlib import Path

import pytest

from ansible_collections.pitr.postgresql.plugins.module_utils import dumps
from ansible_collections.pitr.postgresql.plugins.module_utils.dumps import DumpError, DumpRecord
from ansible_collections.pitr.postgresql.plugins.module_utils.errors import RepositoryError
from ansible_collections.pitr.postgresql.plugins.module_utils.repository import Repository
from tests.support.memory_storage import MemoryStorage

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def make_record(**changes: t.Any) -> DumpRecord:
    base = DumpRecord(
        label="20261125T141500Z-shop",
        database="shop",
        status="ok",
        verified=True,
        verification={
            "tool": "pg_restore",
            "ok": True,
            "message": "fine",
            "objects": {"tables": {"expected": 7, "found": 7}},
        },
        start_time="2026-11-25T14:15:00.000001+00:00",
        end_time="2026-11-25T14:15:03.5+00:00",
        server_version="15.18",
        pg_dump_version="15.18",
        format="custom",
        jobs=1,
        size=9839,
        checksum="4d92089327e163fbd6ea327acd78b7d13485b4402b5b139f6be1440ca7347a0e",
        files=["SHA256SUMS", "database.dump"],
        run="20261125T141500Z",
        database_properties={"encoding": "UTF8", "lc_collate": "C", "lc_ctype": "C"},
    )
    return base.with_changes(**changes)


# Records -----------------------------------------------------------------------------------


def test_record_round_trip_through_json() -> None:
    rec = make_record()
    again = DumpRecord.from_dict(json.loads(rec.to_json()))
    assert again == rec
    assert again.kind == "dump" and again.record_version == 1
    assert rec.to_dict()["files"] == ["SHA256SUMS", "database.dump"]


def test_record_ignores_unknown_keys_and_refuses_newer_versions() -> None:
    data = make_record().to_dict()
    data["added_later"] = 1
    assert DumpRecord.from_dict(data) == make_record()
    data["record_version"] = 2
    with pytest.raises(ValueError, match="newer"):
        DumpRecord.from_dict(data)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"status": "done"}, "status"),
        ({"kind": "backup"}, "kind"),
        ({"scope": "cluster"}, "scope"),
        ({"format": "tar"}, "format"),
        ({"size": "12"}, "size"),
        ({"jobs": True}, "jobs"),
        ({"verified": "yes"}, "verified"),
        ({"files": "a"}, "files"),
        ({"verification": []}, "verification"),
        ({"label": ""}, "label"),
        ({"database": None}, "database"),
    ],
)
def test_record_refuses_wrong_values(change: dict[str, t.Any], message: str) -> None:
    data = make_record().to_dict()
    data.update(change)
    with pytest.raises(ValueError, match=message):
        DumpRecord.from_dict(data)


@pytest.mark.parametrize(
    ("status", "verified", "expected"),
    [
        ("ok", True, True),
        ("ok", False, False),
        ("failed", False, False),
        ("failed", True, False),
        ("running", True, False),
        ("expiring", True, False),
    ],
)
def test_usable_needs_ok_and_verified(status: str, verified: bool, expected: bool) -> None:
    rec = make_record(status=status, verified=verified)
    assert dumps.usable(rec) is expected
    assert rec.usable is expected


def test_series_key_tells_globals_from_a_database_named_globals() -> None:
    glob = make_record(scope="globals", database="globals", format="plain")
    named = make_record(database="globals")
    assert dumps.series_key(glob) != dumps.series_key(named)


# Labels ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("database", "scope", "expected"),
    [
        ("shop", "database", "R-shop"),
        ("my_db.v2", "database", "R-my_db.v2"),
        ("globals", "globals", "R-globals"),
    ],
)
def test_dump_label_keeps_safe_names(database: str, scope: str, expected: str) -> None:
    assert dumps.dump_label("R", database, scope) == expected


@pytest.mark.parametrize("database", ["globals", "odd name", "Ünïcode", "-dash", "a/b", "x" * 80])
def test_dump_label_of_unsafe_names_is_safe_and_distinct(database: str) -> None:
    label = dumps.dump_label("20261125T141500Z", database)
    assert dumps.check_label(label) == label
    assert label != "20261125T141500Z-globals"
    assert label != dumps.dump_label("20261125T141500Z", database + "x")


@pytest.mark.parametrize("label", ["", "-x", "a/b", "a b", "..", "x" * 101])
def test_check_label_refuses_unsafe_labels(label: str) -> None:
    with pytest.raises(DumpError):
        dumps.check_label(label)


# Catalog on a repository -----------------------------------------------------------------------


def repo() -> Repository:
    return Repository(MemoryStorage())


def test_write_read_list_newest_first() -> None:
    r = repo()
    old = make_record(label="A-shop", start_time="2026-11-24T10:00:00+00:00")
    new = make_record(label="B-shop", start_time="2026-11-25T10:00:00+00:00")
    failed = make_record(
        label="C-crm", database="crm", status="failed", verified=False, start_time="2026-11-25T11"
    )
    for rec in (old, new, failed):
        assert dumps.write_dump(r, rec) == f"dumps/{rec.label}/dump.json"
    assert dumps.read_dump(r, "B-shop") == new
    assert dumps.read_dump(r, "Z-none") is None
    assert [x.label for x in dumps.list_dumps(r)] == ["C-crm", "B-shop", "A-shop"]
    assert [x.label for x in dumps.usable_dumps(r)] == ["B-shop", "A-shop"]
    assert [x.label for x in dumps.usable_dumps(r, "crm")] == []


def test_a_directory_without_record_is_not_listed_and_a_bad_record_is_reported() -> None:
    r = repo()
    r.storage.put("dumps/X-shop/database.dump", b"partial")
    r.storage.put("dumps/Y-shop/dump.json", b"{not json")
    r.storage.put("dumps/Z-shop/database.dir/dump.json", b"{}")  # not a record: too deep
    assert dumps.list_dumps(r) == []
    with pytest.raises(RepositoryError, match="unreadable"):
        dumps.read_dump(r, "Y-shop")


def test_remove_dump_marks_expiring_before_deleting_and_deletes_the_record_last() -> None:
    storage = MemoryStorage()
    r = Repository(storage)
    rec = make_record(label="A-shop")
    storage.put("dumps/A-shop/database.dump", b"data")
    storage.put("dumps/A-shop/SHA256SUMS", b"sums")
    dumps.write_dump(r, rec)
    storage.calls.clear()
    assert dumps.remove_dump(r, "A-shop") == rec
    writes = [(m, k) for m, k in storage.calls if m in ("put", "delete")]
    assert writes[0] == ("put", "dumps/A-shop/dump.json")
    assert writes[-1] == ("delete", "dumps/A-shop/dump.json")
    assert {k for m, k in writes[1:-1]} == {"dumps/A-shop/database.dump", "dumps/A-shop/SHA256SUMS"}
    assert list(storage.list("dumps")) == []


def test_an_interrupted_removal_leaves_an_expiring_record_that_is_never_usable() -> None:
    storage = MemoryStorage()
    r = Repository(storage)
    dumps.write_dump(r, make_record(label="A-shop"))
    storage.put("dumps/A-shop/database.dump", b"data")
    original_delete = storage.delete

    def crash(key: str) -> None:
        raise OSError("power cut")

    storage.delete = crash  # type: ignore[method-assign]
    with pytest.raises(OSError):
        dumps.remove_dump(r, "A-shop")
    left = dumps.read_dump(r, "A-shop")
    assert left is not None and left.status == "expiring" and not dumps.usable(left)
    storage.delete = original_delete  # type: ignore[method-assign]
    dumps.remove_dump(r, "A-shop")
    assert dumps.read_dump(r, "A-shop") is None

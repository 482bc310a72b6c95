# Copyright: contributors to pitr.postgresql
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Logical dumps: records, labels, argv building, TOC and globals parsing, verification rules.

The TOC listings and the globals file are real output of PostgreSQL 15.18 (``pg_restore
--list`` of ``pg_dump -Fc`` / ``-Fd`` archives, ``pg_dumpall --globals-only``), recorded
into ``fixtures/``.
"""

from __future__ import annotations

import hashlib
import json
import os
import typing as t
from pathlib import Path

import pytest

from ansible_collections.pitr.postgresql.plugins.module_utils import dumps
from ansible_collections.pitr.postgresql.plugins.module_utils.dumps import DumpError, DumpRecord
from ansible_collections.pitr.postgresql.plugins.module_utils.errors import (
    IntegrityError,
    RepositoryError,
)
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


# argv ------------------------------------------------------------------------------------------

PG_DUMP_15 = dumps.Tool("/pg/bin/pg_dump", "15.18", 15)
PG_DUMP_17 = dumps.Tool("/pg/bin/pg_dump", "17.2", 17)
PG_DUMPALL = dumps.Tool("/pg/bin/pg_dumpall", "15.18", 15)
PG_RESTORE = dumps.Tool("/pg/bin/pg_restore", "15.18", 15)


def test_pg_dump_argv_defaults_custom_format_with_large_objects() -> None:
    argv = dumps.pg_dump_argv(PG_DUMP_15, "shop", "/r/x/database.dump", dumps.DumpOptions())
    assert argv == [
        "/pg/bin/pg_dump",
        "--format=custom",
        "--file=/r/x/database.dump",
        "--no-password",
        "--blobs",
        "--dbname=shop",
    ]


def test_pg_dump_argv_directory_jobs_compression_snapshot_and_newer_option_names() -> None:
    opts = dumps.DumpOptions(format="directory", jobs=4, compression="zstd:1", large_objects=False)
    argv = dumps.pg_dump_argv(PG_DUMP_17, "shop", "/r/x/database.dir", opts, snapshot="3-2-1")
    assert argv[1:] == [
        "--format=directory",
        "--file=/r/x/database.dir",
        "--no-password",
        "--jobs=4",
        "--compress=zstd:1",
        "--no-large-objects",
        "--snapshot=3-2-1",
        "--dbname=shop",
    ]
    assert "--no-blobs" in dumps.pg_dump_argv(
        PG_DUMP_15, "shop", "/f", dumps.DumpOptions(large_objects=False)
    )


@pytest.mark.parametrize(
    ("opts", "message"),
    [
        (dumps.DumpOptions(jobs=2), "directory"),
        (dumps.DumpOptions(jobs=0), "jobs"),
        (dumps.DumpOptions(format="tar"), "format"),
        (dumps.DumpOptions(compression="9; rm -rf /"), "compress"),
    ],
)
def test_dump_options_refuse_what_pg_dump_cannot_do(opts: dumps.DumpOptions, message: str) -> None:
    with pytest.raises(DumpError, match=message):
        dumps.pg_dump_argv(PG_DUMP_15, "shop", "/f", opts)


@pytest.mark.parametrize(
    ("name", "arg"),
    [
        ("shop", "shop"),
        ("odd name", "odd name"),
        ("a=b", "dbname='a=b'"),
        ("it's=x\\y", "dbname='it\\'s=x\\\\y'"),
        ("postgresql://evil", "dbname='postgresql://evil'"),
    ],
)
def test_dbname_arg_never_lets_a_name_be_read_as_a_connection_string(name: str, arg: str) -> None:
    assert dumps.dbname_arg(name) == arg


def test_no_password_ever_reaches_argv() -> None:
    argv = dumps.pg_dump_argv(PG_DUMP_15, "shop", "/f", dumps.DumpOptions())
    argv += dumps.pg_dumpall_globals_argv(PG_DUMPALL, "/g", login_db="postgres")
    argv += dumps.pg_restore_argv(PG_RESTORE, "/f", "custom", dumps.RestoreOptions("x"))
    assert "--no-password" in argv
    assert not [a for a in argv if "password=" in a.lower() or a.startswith("-W")]


def test_globals_argv() -> None:
    assert dumps.pg_dumpall_globals_argv(
        PG_DUMPALL, "/s/globals.sql", no_role_passwords=True, login_db="admin"
    ) == [
        "/pg/bin/pg_dumpall",
        "--globals-only",
        "--file=/s/globals.sql",
        "--no-password",
        "--no-role-passwords",
        "--database=admin",
    ]


def test_verification_reads_the_whole_archive_not_only_its_list() -> None:
    assert dumps.restore_list_argv(PG_RESTORE, "/a", "custom", "/t/l") == [
        "/pg/bin/pg_restore",
        "--list",
        "--format=custom",
        "--file=/t/l",
        "/a",
    ]
    assert dumps.restore_read_argv(PG_RESTORE, "/a", "directory") == [
        "/pg/bin/pg_restore",
        "--format=directory",
        "--file=/dev/null",
        "/a",
    ]


def test_restore_into_a_new_database_by_default() -> None:
    argv = dumps.pg_restore_argv(PG_RESTORE, "/d/x.dump", "custom", dumps.RestoreOptions("new_db"))
    assert argv == [
        "/pg/bin/pg_restore",
        "--format=custom",
        "--dbname=new_db",
        "--exit-on-error",
        "--no-password",
        "/d/x.dump",
    ]


def test_restore_into_an_existing_database_cleans_in_one_transaction() -> None:
    opts = dumps.RestoreOptions("shop", mode="existing", no_owner=True, role="app")
    argv = dumps.pg_restore_argv(PG_RESTORE, "/d/x.dump", "custom", opts)
    assert argv[4:] == [
        "--no-password",
        "--clean",
        "--if-exists",
        "--single-transaction",
        "--no-owner",
        "--role=app",
        "/d/x.dump",
    ]
    parallel = dumps.RestoreOptions("shop", mode="existing", jobs=3)
    assert "--single-transaction" not in dumps.pg_restore_argv(PG_RESTORE, "/d", "custom", parallel)
    with pytest.raises(DumpError, match="single transaction"):
        dumps.RestoreOptions("shop", jobs=2, single_transaction=True).check()
    with pytest.raises(DumpError, match="target_database"):
        dumps.RestoreOptions("").check()


def test_parse_tool_version() -> None:
    assert dumps.parse_tool_version("pg_dump (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)\n") == (
        "15.18",
        15,
    )
    assert dumps.parse_tool_version("pg_restore (PostgreSQL) 17beta1") == ("17", 17)
    with pytest.raises(DumpError):
        dumps.parse_tool_version("bash: pg_dump: not found")


# TOC parsing (recorded pg_restore --list of PostgreSQL 15) ------------------------------------


def fixture_text(name: str) -> str:
    return (FIXTURES / name).read_text(encoding="utf-8")


def test_parse_toc_header_and_entries_of_a_custom_archive() -> None:
    toc = dumps.parse_toc(fixture_text("pg15_restore_list_custom.txt"))
    assert toc.format == "CUSTOM"
    assert toc.dbname == "shop"
    assert toc.declared_entries == 40
    assert toc.header["Dumped by pg_dump version"].startswith("15.18")
    assert len(toc.entries) == 36
    first = toc.entries[0]
    assert (first.dump_id, first.catalog_oid, first.oid, first.desc) == (8, 2615, 16419, "SCHEMA")
    assert first.rest == "- odd schema postgres"
    descs = {e.desc for e in toc.entries}
    assert {"TABLE", "TABLE DATA", "TABLE ATTACH", "SEQUENCE OWNED BY", "SEQUENCE SET"} <= descs
    assert {
        "MATERIALIZED VIEW",
        "MATERIALIZED VIEW DATA",
        "FK CONSTRAINT",
        "BLOB",
        "BLOBS",
    } <= descs
    # a schema with a space in its name does not confuse the entry type
    odd = [e for e in toc.entries if e.oid == 16420]
    assert [e.desc for e in odd] == ["TABLE", "TABLE DATA"]


def test_parse_toc_of_a_directory_archive_matches_the_custom_one() -> None:
    custom = dumps.parse_toc(fixture_text("pg15_restore_list_custom.txt"))
    directory = dumps.parse_toc(fixture_text("pg15_restore_list_directory.txt"))
    assert directory.format == "DIRECTORY"
    assert [(e.desc, e.oid) for e in directory.entries] == [(e.desc, e.oid) for e in custom.entries]


def test_toc_objects_of_the_recorded_archive() -> None:
    found = dumps.toc_objects(dumps.parse_toc(fixture_text("pg15_restore_list_custom.txt")))
    assert found["tables"] == {16420, 16406, 16434, 16411, 16414, 16387, 16396}
    assert found["table_data"] == {16420, 16406, 16434, 16414, 16387, 16396}
    assert found["sequences"] == {16386, 16433, 16395}
    assert found["views"] == {16423}
    assert found["materialized_views"] == {16427}
    assert found["large_objects"] == 3
    assert found["large_object_data"] == 1
    assert found["large_object_groups"] == 0


def test_a_table_in_a_schema_named_data_is_still_a_table() -> None:
    toc = dumps.parse_toc(
        "5; 1259 16500 TABLE DATA t postgres\n6; 0 16500 TABLE DATA DATA t postgres\n"
    )
    assert [(e.desc, e.rest) for e in toc.entries] == [
        ("TABLE", "DATA t postgres"),
        ("TABLE DATA", "DATA t postgres"),
    ]


def recorded_inventory() -> dumps.Inventory:
    data = json.loads(fixture_text("pg15_dump_inventory.json"))
    return dumps.inventory_from_rows(data["inventory_rows"], data["large_objects"])


def test_inventory_of_the_recorded_database() -> None:
    inv = recorded_inventory()
    assert inv.counts() == {
        "tables": 7,  # partitioned parent and partition, unlogged, empty, odd names
        "table_data": 6,  # no data entry for the partitioned parent
        "sequences": 3,  # serial and identity included
        "views": 1,
        "materialized_views": 1,
        "large_objects": 3,
    }
    standby = dumps.inventory_from_rows(
        json.loads(fixture_text("pg15_dump_inventory.json"))["inventory_rows"], 3, in_recovery=True
    )
    assert standby.counts()["table_data"] == 5  # pg_dump skips unlogged data on a standby


def test_compare_objects_accepts_the_recorded_archive() -> None:
    toc = dumps.parse_toc(fixture_text("pg15_restore_list_custom.txt"))
    inv = recorded_inventory()
    objects, problems = dumps.compare_objects(inv.counts(), toc, names=inv)
    assert problems == []
    assert objects["tables"] == {"expected": 7, "found": 7}
    assert objects["large_objects"] == {"expected": 3, "found": 3}


def drop_lines(text: str, *needles: str) -> str:
    return "\n".join(ln for ln in text.splitlines() if not any(n in ln for n in needles))


def test_compare_objects_names_what_is_missing() -> None:
    text = drop_lines(
        fixture_text("pg15_restore_list_custom.txt"),
        "TABLE DATA public items",
        "BLOB - 16438",
        "VIEW public v_items",
    )
    inv = recorded_inventory()
    objects, problems = dumps.compare_objects(inv.counts(), dumps.parse_toc(text), names=inv)
    assert objects["table_data"] == {"expected": 6, "found": 5}
    assert any("table data" in p and "public.items" in p for p in problems)
    assert any(p.startswith("views: 0 in the archive, 1") for p in problems)
    assert any(p.startswith("large objects: 2 in the archive, 3") for p in problems)


def test_compare_objects_without_large_object_data_fails() -> None:
    text = drop_lines(fixture_text("pg15_restore_list_custom.txt"), "BLOBS - BLOBS")
    _objects, problems = dumps.compare_objects(recorded_inventory().counts(), dumps.parse_toc(text))
    assert problems == ["large objects: the archive has no large object data"]


def test_compare_objects_counts_only_when_no_names_are_known() -> None:
    toc = dumps.parse_toc(fixture_text("pg15_restore_list_pgbench.txt"))
    expected = {"tables": 4, "table_data": 4, "large_objects": 0}
    assert dumps.compare_objects(expected, toc)[1] == []
    _objects, problems = dumps.compare_objects({**expected, "tables": 5}, toc)
    assert problems == ["tables: 4 in the archive, 5 in the database"]


def test_compare_objects_extra_objects_are_not_problems() -> None:
    toc = dumps.parse_toc(fixture_text("pg15_restore_list_pgbench.txt"))
    assert dumps.compare_objects({"tables": 2, "table_data": 1}, toc)[1] == []


def test_pg17_large_object_groups_are_checked_by_their_bounds() -> None:
    # pg_dump 17 lists large objects in groups of up to 1000 (one BLOB METADATA entry each)
    lines = []
    for i in range(3):
        first = 20000 + i * 1000
        lines.append(f"{10 + i}; 2613 {first} BLOB METADATA - {first}..{first + 999} postgres")
    lines.append("99; 0 0 BLOBS - 20000..22999 postgres")
    toc = dumps.parse_toc("\n".join(lines))
    objects, problems = dumps.compare_objects({"large_objects": 2500}, toc)
    assert problems == []
    assert objects["large_objects"] == {"expected": 2500, "found": None, "groups": 3}
    _objects, problems = dumps.compare_objects({"large_objects": 3500}, toc)
    assert problems and "cannot hold" in problems[0]


# Globals -----------------------------------------------------------------------------------------


def test_parse_globals_of_the_recorded_file() -> None:
    found = dumps.parse_globals(fixture_text("pg15_dumpall_globals.sql"))
    assert found == {"roles": 2, "tablespaces": 0, "complete": True}
    objects, problems = dumps.compare_globals({"roles": 2, "tablespaces": 0}, found)
    assert problems == []
    assert objects["roles"] == {"expected": 2, "found": 2}


def test_a_truncated_globals_file_or_a_missing_role_is_a_problem() -> None:
    text = fixture_text("pg15_dumpall_globals.sql")
    cut = dumps.parse_globals(text[: text.index("CREATE ROLE postgres")])
    _objects, problems = dumps.compare_globals({"roles": 2, "tablespaces": 0}, cut)
    assert any("completion" in p for p in problems)
    assert "roles: 1 in the file, 2 in the cluster" in problems


# Checksums and record expectations ----------------------------------------------------------------


def test_checksum_of_a_custom_dump_is_the_files_own_sha256(tmp_path: Path) -> None:
    (tmp_path / "database.dump").write_bytes(b"PGDMP-data")
    checksum, sums = dumps.checksum_manifest(str(tmp_path), "custom")
    assert checksum == hashlib.sha256(b"PGDMP-data").hexdigest()
    assert sums == f"{checksum}  database.dump\n"


def test_checksum_of_a_directory_dump_covers_every_file(tmp_path: Path) -> None:
    d = tmp_path / "database.dir"
    d.mkdir()
    (d / "toc.dat").write_bytes(b"toc")
    (d / "3422.dat.gz").write_bytes(b"data")
    checksum, sums = dumps.checksum_manifest(str(tmp_path), "directory")
    assert [ln.split("  ")[1] for ln in sums.splitlines()] == [
        "database.dir/3422.dat.gz",
        "database.dir/toc.dat",
    ]
    (d / "3422.dat.gz").write_bytes(b"dat")  # one file changed
    assert dumps.checksum_manifest(str(tmp_path), "directory")[0] != checksum


def test_check_checksum_names_the_damaged_file(tmp_path: Path) -> None:
    d = tmp_path / "database.dir"
    d.mkdir()
    (d / "toc.dat").write_bytes(b"toc")
    (d / "1.dat.gz").write_bytes(b"data")
    checksum, sums = dumps.checksum_manifest(str(tmp_path), "directory")
    (tmp_path / "SHA256SUMS").write_text(sums)
    rec = make_record(format="directory", checksum=checksum)
    assert dumps.check_checksum(str(tmp_path), rec) == checksum
    (d / "1.dat.gz").write_bytes(b"dat")
    with pytest.raises(IntegrityError, match=r"files that differ: database.dir/1.dat.gz"):
        dumps.check_checksum(str(tmp_path), rec)
    (d / "1.dat.gz").unlink()
    with pytest.raises(IntegrityError):
        dumps.check_checksum(str(tmp_path), rec)


def test_expected_counts_come_from_the_recorded_verification() -> None:
    rec = make_record(
        verification={
            "objects": {
                "tables": {"expected": 7, "found": 7},
                "large_objects": {"expected": 3, "found": None, "groups": 1},
                "junk": 5,
            }
        }
    )
    assert dumps.expected_counts(rec) == {"tables": 7, "large_objects": 3}


def test_database_properties_from_the_recorded_row() -> None:
    row = json.loads(fixture_text("pg15_dump_inventory.json"))["database_row"]
    assert dumps.database_properties(row) == {
        "encoding": "UTF8",
        "lc_collate": "C",
        "lc_ctype": "C",
        "locale_provider": "libc",
        "icu_locale": None,
    }


def test_plan_targets_puts_globals_last() -> None:
    targets = dumps.plan_targets("R", ["shop", "globals"], with_globals=True)
    assert [(x.label, x.database, x.scope) for x in targets] == [
        ("R-shop", "shop", "database"),
        (dumps.dump_label("R", "globals"), "globals", "database"),
        ("R-globals", "globals", "globals"),
    ]


def test_restore_marker_starts_with_the_label() -> None:
    marker = dumps.restore_marker(make_record())
    assert marker.startswith(f"{dumps.MARKER_PREFIX}20261125T141500Z-shop ")


@pytest.mark.parametrize(
    ("record", "message"),
    [
        (make_record(status="failed", verified=False), "not usable"),
        (make_record(verified=False), "not usable"),
        (make_record(scope="globals", database="globals", format="plain"), "psql -f"),
    ],
)
def test_restore_refuses_unusable_dumps_and_globals(record: DumpRecord, message: str) -> None:
    with pytest.raises(DumpError, match=message):
        dumps.refuse_unusable(record)


def test_select_dump_by_label_or_newest_usable_of_a_database() -> None:
    r = repo()
    dumps.write_dump(r, make_record(label="A-shop", start_time="2026-11-24"))
    dumps.write_dump(r, make_record(label="B-shop", start_time="2026-11-25"))
    dumps.write_dump(
        r, make_record(label="C-shop", start_time="2026-11-26", status="failed", verified=False)
    )
    assert dumps.select_dump(r, None, "shop").label == "B-shop"
    assert dumps.select_dump(r, "C-shop", None).label == "C-shop"
    with pytest.raises(DumpError, match="no usable dump"):
        dumps.select_dump(r, None, "crm")
    with pytest.raises(DumpError, match="no dump labelled"):
        dumps.select_dump(r, "Z-x", None)


class FakeConnection:
    def __enter__(self) -> FakeConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def test_connect_hands_the_password_file_to_libpq_and_restores_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from ansible_collections.pitr.postgresql.plugins.module_utils import postgres

    seen: list[str | None] = []

    def fake_connect(params: t.Mapping[str, t.Any]) -> FakeConnection:
        seen.append(os.environ.get("PGPASSFILE"))
        return FakeConnection()

    monkeypatch.setattr(postgres, "connect", fake_connect)
    monkeypatch.setenv("PGPASSFILE", "/home/someone/.pgpass")
    with dumps.connect({"passfile": "/etc/pitr/dump.pgpass"}):
        pass
    with dumps.connect({}):
        pass
    assert seen == ["/etc/pitr/dump.pgpass", "/home/someone/.pgpass"]
    assert os.environ["PGPASSFILE"] == "/home/someone/.pgpass"

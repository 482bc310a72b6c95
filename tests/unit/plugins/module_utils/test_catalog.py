# Copyright: contributors to pitr.postgresql
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The backup catalog: records, atomic writes, listing newest first, usable()."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest

from ansible_collections.pitr.postgresql.plugins.module_utils import catalog
from ansible_collections.pitr.postgresql.plugins.module_utils.catalog import BackupRecord
from ansible_collections.pitr.postgresql.plugins.module_utils.errors import RepositoryError
from ansible_collections.pitr.postgresql.plugins.module_utils.repository import Repository
from tests.support.memory_storage import MemoryStorage

FIELDS = {
    "record_version",
    "label",
    "status",
    "verified",
    "verification",
    "start_lsn",
    "stop_lsn",
    "start_wal",
    "stop_wal",
    "start_time",
    "stop_time",
    "timeline",
    "system_identifier",
    "pg_version",
    "pg_major",
    "pg_basebackup_version",
    "backup_format",
    "compression",
    "wal_method",
    "size_on_disk",
    "cluster_size",
    "checksum_algorithm",
    "files",
}


def record(label: str, start: str, status: str = "ok", verified: bool = True) -> BackupRecord:
    return BackupRecord(
        label=label,
        status=status,
        verified=verified,
        verification={"tool": "pg_verifybackup", "ok": verified, "message": "fine"},
        start_lsn="0/64000028",
        stop_lsn="0/64000138",
        start_wal="000000010000000000000064",
        stop_wal="000000010000000000000064",
        start_time=start,
        stop_time=start.replace(":00+", ":09+"),
        timeline=1,
        system_identifier=7712112821732407675,
        pg_version="15.18",
        pg_major=15,
        pg_basebackup_version="15.18",
        backup_format="tar",
        compression="server-zstd:1",
        size_on_disk=53421680,
        cluster_size=807278203,
        checksum_algorithm="SHA256",
        files=["backup_manifest", "base.tar.zst", "pg_wal.tar"],
    )


@pytest.fixture(params=["memory", "posix"])
def repo(request: pytest.FixtureRequest, tmp_path: Path) -> Repository:
    if request.param == "memory":
        return Repository(MemoryStorage())
    return Repository.open_posix(str(tmp_path))


def test_record_has_exactly_the_interface_fields() -> None:
    d = record("a", "2026-11-25T14:15:00+00:00").to_dict()
    assert set(d) == FIELDS
    assert d["record_version"] == 1
    assert json.loads(json.dumps(d)) == d


def test_round_trip(repo: Repository) -> None:
    rec = record("20261125T141500Z", "2026-11-25T14:15:00+00:00")
    key = catalog.write_backup(repo, rec)
    assert key == "backups/20261125T141500Z/backup.json"
    assert catalog.read_backup(repo, "20261125T141500Z") == rec
    assert BackupRecord.from_dict(rec.to_dict()) == rec


def test_read_missing_is_none(repo: Repository) -> None:
    assert catalog.read_backup(repo, "nothing") is None


def test_list_newest_first_and_usable(repo: Repository) -> None:
    catalog.write_backup(repo, record("b", "2026-11-25T12:00:00+00:00"))
    catalog.write_backup(
        repo, record("a", "2026-11-25T14:00:00+00:00", status="failed", verified=False)
    )
    catalog.write_backup(repo, record("c", "2026-11-24T09:00:00+00:00", verified=False))
    catalog.write_backup(repo, record("d", "2026-11-25T13:00:00+00:00", status="expiring"))
    repo.storage.put("backups/e/base.tar.zst", b"no record yet: unfinished")
    assert [r.label for r in catalog.list_backups(repo)] == ["a", "d", "b", "c"]
    assert [r.label for r in catalog.usable_backups(repo)] == ["b"]


@pytest.mark.parametrize(
    ("status", "verified", "usable"),
    [
        ("ok", True, True),
        ("ok", False, False),
        ("failed", False, False),
        ("failed", True, False),
        ("running", True, False),
        ("expiring", True, False),
    ],
)
def test_usable(status: str, verified: bool, usable: bool) -> None:
    rec = record("x", "2026-11-25T14:15:00+00:00", status=status, verified=verified)
    assert catalog.usable(rec) is usable
    assert rec.usable is usable


def test_rewrite_replaces_record(repo: Repository) -> None:
    rec = record("x", "2026-11-25T14:15:00+00:00")
    catalog.write_backup(repo, rec)
    catalog.write_backup(repo, rec.with_changes(status="failed", verified=False))
    got = catalog.read_backup(repo, "x")
    assert got is not None and got.status == "failed" and not catalog.usable(got)


def test_unreadable_record_is_reported_and_skipped(repo: Repository) -> None:
    catalog.write_backup(repo, record("good", "2026-11-25T14:15:00+00:00"))
    repo.storage.put("backups/bad/backup.json", b"{not json")
    with pytest.raises(RepositoryError, match="unreadable"):
        catalog.read_backup(repo, "bad")
    assert [r.label for r in catalog.list_backups(repo)] == ["good"]


@pytest.mark.parametrize(
    "bad",
    [
        {"label": "x"},
        {"label": "x", "status": "done"},
        {"label": "x", "status": "ok", "timeline": "1"},
        {"label": "x", "status": "ok", "verified": "yes"},
        {"label": "x", "status": "ok", "record_version": 2},
        {"label": "x", "status": "ok", "files": "base.tar"},
    ],
)
def test_from_dict_rejects(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        BackupRecord.from_dict(bad)


def test_from_dict_ignores_unknown_keys() -> None:
    rec = BackupRecord.from_dict({"label": "x", "status": "ok", "future_field": 1})
    assert rec.label == "x" and rec.verified is False


def test_default_label() -> None:
    when = dt.datetime(2026, 11, 25, 15, 15, 0, tzinfo=dt.timezone(dt.timedelta(hours=1)))
    assert catalog.default_label(when) == "20261125T141500Z"
    assert len(catalog.default_label()) == 16


@pytest.mark.parametrize("label", ["", "../x", "a/b", ".hidden", "a b", "x" * 101])
def test_bad_labels(label: str, repo: Repository) -> None:
    with pytest.raises(RepositoryError):
        catalog.check_label(label)


def test_write_to_staging_key(repo: Repository) -> None:
    rec = record("x", "2026-11-25T14:15:00+00:00")
    key = catalog.write_backup(repo, rec, key="staging/backups/x/backup.json")
    assert key == "staging/backups/x/backup.json"
    assert catalog.read_backup(repo, "x") is None
    assert json.loads(repo.storage.get(key)) == rec.to_dict()

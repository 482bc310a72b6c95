# Copyright: contributors to pitr.postgresql
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Restore leases: take (and a repository that cannot be written), renew, drop, active,
unreadable records, expiry and the removal of expired leases."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest

from ansible_collections.pitr.postgresql.plugins.module_utils import catalog, restore_lease
from ansible_collections.pitr.postgresql.plugins.module_utils.catalog import BackupRecord
from ansible_collections.pitr.postgresql.plugins.module_utils.errors import StorageError
from ansible_collections.pitr.postgresql.plugins.module_utils.repository import Repository
from ansible_collections.pitr.postgresql.plugins.module_utils.restore_lease import (
    Lease,
    LeaseError,
)
from tests.support.memory_storage import MemoryStorage

NOW = dt.datetime(2026, 11, 25, 12, 0, tzinfo=dt.UTC)
HOUR = 3600.0


def backup(label: str, status: str = "ok") -> BackupRecord:
    return BackupRecord(
        label=label,
        status=status,
        verified=True,
        timeline=1,
        start_lsn="0/2000028",
        stop_lsn="0/2000138",
        start_wal="000000010000000000000002",
        stop_wal="000000010000000000000002",
        start_time="2026-11-24T11:55:00+00:00",
        stop_time="2026-11-24T12:00:00+00:00",
        system_identifier=7441120211222063101,
        pg_major=15,
        size_on_disk=1000,
    )


def repo_with(*records: BackupRecord) -> tuple[Repository, MemoryStorage]:
    storage = MemoryStorage()
    repo = Repository(storage)
    for rec in records:
        catalog.write_backup(repo, rec)
    return repo, storage


def take(repo: Repository, label: str = "b1", **kw: object) -> Lease:
    args: dict[str, object] = {
        "backup_label": label,
        "data_dir": "/srv/drill",
        "target": "time 2026-11-24 13:00:00+00",
        "first_segment": "000000010000000000000002",
        "timeline": 1,
        "host": "db1.example.org",
        "now": NOW,
        **kw,
    }
    taken = restore_lease.take(repo, **args)  # type: ignore[arg-type]
    assert taken.reason is None and taken.lease is not None, taken
    return taken.lease


def test_take_writes_a_record_that_active_returns() -> None:
    repo, storage = repo_with(backup("b1"))
    lease = take(repo)
    assert lease.key == f"leases/restore/{lease.lease_id}.json"
    data = json.loads(storage.objects[lease.key])
    assert data == {
        "record_version": 1,
        "lease_id": lease.lease_id,
        "backup_label": "b1",
        "host": "db1.example.org",
        "data_dir": "/srv/drill",
        "target": "time 2026-11-24 13:00:00+00",
        "first_segment": "000000010000000000000002",
        "timeline": 1,
        "created": "2026-11-25T12:00:00+00:00",
        "renewed": "2026-11-25T12:00:00+00:00",
        "expires": "2026-11-26T12:00:00+00:00",  # the default TTL: 24 h
        "ttl_seconds": 86400.0,
    }
    assert restore_lease.active(repo, NOW) == [lease]
    assert restore_lease.active(repo, NOW + dt.timedelta(hours=23)) == [lease]


def test_lease_ids_are_unique_per_restore() -> None:
    repo, _storage = repo_with(backup("b1"))
    one, two = take(repo), take(repo)
    other_dir = take(repo, data_dir="/srv/other")
    assert len({one.lease_id, two.lease_id, other_dir.lease_id}) == 3
    assert one.lease_id.startswith("db1.example.org-")
    # The data directory's hash is part of the id.
    assert one.lease_id.split("-")[1] == two.lease_id.split("-")[1]
    assert one.lease_id.split("-")[1] != other_dir.lease_id.split("-")[1]
    odd = take(repo, host="weird host/../name")
    assert "/" not in odd.lease_id and " " not in odd.lease_id
    assert len(restore_lease.active(repo, NOW)) == 4


def test_a_repository_that_cannot_be_written_gives_no_lease_and_a_reason() -> None:
    repo, storage = repo_with(backup("b1"))
    storage.fail_put = StorageError(
        "cannot write 'leases/restore/x.json' in repository /repo: Read-only file system (errno 30)"
    )
    taken = restore_lease.take(
        repo,
        backup_label="b1",
        data_dir="/srv/drill",
        target="latest",
        first_segment=None,
        timeline=None,
    )
    assert taken.lease is None
    assert taken.reason is not None
    assert "Read-only file system" in taken.reason and "backup b1" in taken.reason
    lease, reason = taken  # unpacks as a tuple
    assert lease is None and reason == taken.reason
    assert not [k for k in storage.objects if k.startswith("leases/")]


@pytest.mark.parametrize(("records", "message"), [
    ((backup("b1", status="expiring"),), "being removed by a retention prune"),
    ((), "is not in the repository"),
])  # fmt: skip
def test_a_backup_being_removed_or_gone_is_refused_and_no_lease_stays(
    records: tuple[BackupRecord, ...], message: str
) -> None:
    repo, storage = repo_with(*records)
    with pytest.raises(LeaseError, match=message):
        restore_lease.take(
            repo,
            backup_label="b1",
            data_dir="/srv/drill",
            target="latest",
            first_segment=None,
            timeline=None,
        )
    assert not [k for k in storage.objects if k.startswith("leases/")]


def test_renew_pushes_the_expiry_and_drop_removes_idempotently() -> None:
    repo, storage = repo_with(backup("b1"))
    lease = take(repo, ttl_seconds=HOUR)
    later = NOW + dt.timedelta(minutes=50)
    restore_lease.renew(repo, lease.lease_id, now=later)
    (renewed,) = restore_lease.active(repo, NOW + dt.timedelta(minutes=90))
    assert renewed.expires == later + dt.timedelta(hours=1)
    assert renewed.renewed == later and renewed.created == NOW
    restore_lease.renew(repo, lease.lease_id, ttl_seconds=4 * HOUR, now=later)
    (renewed,) = restore_lease.active(repo, later)
    assert renewed.expires == later + dt.timedelta(hours=4) and renewed.ttl_seconds == 4 * HOUR
    restore_lease.drop(repo, lease.lease_id)
    assert lease.key not in storage.objects
    restore_lease.drop(repo, lease.lease_id)  # already gone: fine
    with pytest.raises(LeaseError, match="is gone"):
        restore_lease.renew(repo, lease.lease_id, now=later)
    assert lease.key not in storage.objects  # renew never resurrects a dropped lease


def test_expired_leases_are_not_active_and_remove_expired_spares_a_renewed_one() -> None:
    repo, storage = repo_with(backup("b1"))
    short = take(repo, ttl_seconds=HOUR)
    renewed_meanwhile = take(repo, ttl_seconds=HOUR)
    long = take(repo)
    at = NOW + dt.timedelta(hours=1)  # exactly at the expiry: expired
    assert restore_lease.active(repo, at) == [long]
    leases, bad = restore_lease.scan(repo)
    assert bad == [] and len(leases) == 3
    restore_lease.renew(repo, renewed_meanwhile.lease_id, now=at)
    removed = restore_lease.remove_expired(repo, leases, at)
    assert removed == [short.lease_id]
    assert short.key not in storage.objects
    assert renewed_meanwhile.key in storage.objects and long.key in storage.objects


@pytest.mark.parametrize(("content", "why"), [
    (b"{not json", "Expecting property name"),
    (b"[1, 2]", "JSON list, not an object"),
    (b'{"lease_id": "x", "ttl_seconds": 60}', "backup_label must be a non-empty string"),
    (None, "record_version 99 is newer"),
    (None, "not its own file name"),
    (None, "timeline must be an integer"),
])  # fmt: skip
def test_an_unreadable_lease_is_reported_with_its_path(
    tmp_path: Path, content: bytes | None, why: str
) -> None:
    repo = Repository.open_posix(str(tmp_path))
    catalog.write_backup(repo, backup("b1"))
    good = take(repo)
    key = "leases/restore/broken.json"
    if content is None:
        data = good.to_dict() | {"lease_id": "broken"}
        if "newer" in why:
            data["record_version"] = 99
        elif "own file name" in why:
            data["lease_id"] = "someone-else"
        else:
            data["timeline"] = "one"
        content = json.dumps(data).encode()
    repo.storage.put(key, content)
    leases, bad = restore_lease.scan(repo)
    assert leases == [good]
    assert len(bad) == 1 and bad[0].key == key
    assert bad[0].path == str(tmp_path / "leases" / "restore" / "broken.json")
    assert why in bad[0].why and bad[0].path not in bad[0].why
    assert restore_lease.active(repo, NOW) == [good]  # active leaves unreadable ones out


@pytest.mark.parametrize("lease_id", ["../backups/b1/backup", "", "a/b", ".hidden"])
def test_lease_ids_that_are_not_safe_names_are_refused(lease_id: str) -> None:
    repo, storage = repo_with(backup("b1"))
    before = dict(storage.objects)
    with pytest.raises(LeaseError, match="is not allowed"):
        restore_lease.drop(repo, lease_id)
    with pytest.raises(LeaseError, match="is not allowed"):
        restore_lease.renew(repo, lease_id)
    assert storage.objects == before


def test_a_ttl_must_be_positive() -> None:
    repo, _storage = repo_with(backup("b1"))
    for bad in (0, -1, float("nan"), float("inf")):
        with pytest.raises(LeaseError, match="ttl_seconds must be a positive number"):
            take(repo, ttl_seconds=bad)
    lease = take(repo)
    with pytest.raises(LeaseError, match="ttl_seconds must be a positive number"):
        restore_lease.renew(repo, lease.lease_id, ttl_seconds=-1)
    assert [x.lease_id for x in restore_lease.active(repo, NOW)] == [lease.lease_id]

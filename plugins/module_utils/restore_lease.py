# Copyright: contributors to pitr.postgresql
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Restore leases: a restore in progress tells retention which backup and WAL it is reading.

A lease is one small JSON record in the repository, ``leases/restore/<lease id>.json``,
written whole with the storage's atomic ``put`` (like the catalog records and pins). It names
the backup being restored, the timeline and first WAL segment the restore needs, the host and
data directory of the restore, a description of its target, when it was taken and last
renewed, and when it expires (``ttl_seconds`` after the last renewal, 24 h by default).

While a lease is active (not expired), a retention prune keeps its backup as if it were pinned,
and with it the WAL that backup needs (``retention.py``). An expired lease protects nothing and
the next prune (not in check mode) removes it; a restore that runs longer than its TTL renews
it. A lease record that cannot be read is reported by ``scan`` (``Unreadable``): retention then
keeps every base backup until it is fixed or removed.

The API, for the restore modules::

    taken = take(repo, backup_label=..., data_dir=..., target=..., first_segment=...,
                 timeline=...)            # TakeResult(lease, reason); lease None: not written
    renew(repo, lease_id)                 # LeaseError when the lease is gone
    drop(repo, lease_id)                  # idempotent
    active(repo, now)                     # the leases not expired at ``now``

A restore host that can only read the repository gets ``TakeResult(None, reason)`` from
``take``: the restore can go on, and should warn that a prune may remove what it reads.

Standard library only (``pitr-prune`` reads leases on database hosts).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import os
import re
import socket
import typing as t
from dataclasses import dataclass, replace

from ansible_collections.pitr.postgresql.plugins.module_utils.errors import (
    ObjectNotFoundError,
    PitrError,
    StorageError,
)

if t.TYPE_CHECKING:
    from ansible_collections.pitr.postgresql.plugins.module_utils.repository import Repository

LEASE_PREFIX = "leases/restore"
RECORD_VERSION = 1
DEFAULT_TTL = 86400.0
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
_HOST_UNSAFE = re.compile(r"[^A-Za-z0-9.-]+")


class LeaseError(PitrError):
    """A lease cannot be taken, renewed or read as asked."""


@dataclass(frozen=True)
class Lease:
    """One restore's claim on a backup and its WAL, until ``expires``."""

    lease_id: str
    backup_label: str
    host: str
    data_dir: str
    target: str
    first_segment: str | None
    timeline: int | None
    created: dt.datetime
    renewed: dt.datetime
    expires: dt.datetime
    ttl_seconds: float

    def is_active(self, now: dt.datetime) -> bool:
        return now < self.expires

    @property
    def key(self) -> str:
        return lease_key(self.lease_id)

    @property
    def holder(self) -> str:
        """``host:data_dir``, for messages."""
        return f"{self.host}:{self.data_dir}"

    def to_dict(self) -> dict[str, t.Any]:
        return {
            "record_version": RECORD_VERSION,
            "lease_id": self.lease_id,
            "backup_label": self.backup_label,
            "host": self.host,
            "data_dir": self.data_dir,
            "target": self.target,
            "first_segment": self.first_segment,
            "timeline": self.timeline,
            "created": _iso(self.created),
            "renewed": _iso(self.renewed),
            "expires": _iso(self.expires),
            "ttl_seconds": self.ttl_seconds,
        }

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True).encode() + b"\n"

    @classmethod
    def from_dict(cls, data: t.Mapping[str, t.Any]) -> Lease:
        """ValueError/TypeError when ``data`` is not a lease this collection reads."""
        version = data.get("record_version", RECORD_VERSION)
        if not isinstance(version, int) or version > RECORD_VERSION:
            raise ValueError(
                f"record_version {version!r} is newer than this collection reads"
                f" ({RECORD_VERSION}); upgrade pitr.postgresql"
            )

        def text(name: str, optional: bool = False) -> t.Any:
            value = data.get(name)
            if value is None and optional:
                return None
            if not isinstance(value, str) or not value:
                raise ValueError(f"{name} must be a non-empty string, got {value!r}")
            return value

        timeline = data.get("timeline")
        if timeline is not None and (not isinstance(timeline, int) or isinstance(timeline, bool)):
            raise ValueError(f"timeline must be an integer or null, got {timeline!r}")
        ttl = data.get("ttl_seconds")
        if not isinstance(ttl, (int, float)) or isinstance(ttl, bool):
            raise ValueError(f"ttl_seconds must be a number, got {ttl!r}")
        return cls(
            lease_id=check_id(text("lease_id")),
            backup_label=text("backup_label"),
            host=text("host"),
            data_dir=text("data_dir"),
            target=str(data.get("target") or ""),
            first_segment=text("first_segment", optional=True),
            timeline=timeline,
            created=_parse_time(text("created"), "created"),
            renewed=_parse_time(text("renewed"), "renewed"),
            expires=_parse_time(text("expires"), "expires"),
            ttl_seconds=float(ttl),
        )


class TakeResult(t.NamedTuple):
    """What ``take`` did: the lease written, or None and why not (for the caller's warning)."""

    lease: Lease | None
    reason: str | None = None


class Unreadable(t.NamedTuple):
    """A lease record that exists but cannot be read: what it is, where, and why."""

    key: str
    path: str
    why: str


def _iso(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).isoformat()


def _parse_time(text: str, name: str) -> dt.datetime:
    moment = dt.datetime.fromisoformat(text)
    if moment.tzinfo is None:
        raise ValueError(f"{name} {text!r} has no time zone")
    return moment


def _check_ttl(ttl: float) -> None:
    if not isinstance(ttl, (int, float)) or not math.isfinite(ttl) or ttl <= 0:
        raise LeaseError(f"ttl_seconds must be a positive number of seconds (got {ttl})")


def _now(now: dt.datetime | None) -> dt.datetime:
    return now or dt.datetime.now(dt.UTC)


def check_id(lease_id: str) -> str:
    """``lease_id`` if it is a safe object name, else LeaseError."""
    if not isinstance(lease_id, str) or not _ID_RE.match(lease_id):
        raise LeaseError(
            f"lease id {lease_id!r} is not allowed: use 1-200 letters, digits, '.', '_' or '-',"
            " starting with a letter or digit (take returns the id to use)"
        )
    return lease_id


def lease_key(lease_id: str) -> str:
    """Where the lease ``lease_id`` is stored in the repository."""
    return f"{LEASE_PREFIX}/{check_id(lease_id)}.json"


def new_id(host: str, data_dir: str, now: dt.datetime) -> str:
    """Unique per restore: host, a hash of the data directory, the time, and random bits."""
    safe_host = _HOST_UNSAFE.sub("_", host).strip("._-")[:60] or "host"
    digest = hashlib.sha256(data_dir.encode("utf-8", "surrogateescape")).hexdigest()[:10]
    stamp = now.astimezone(dt.UTC).strftime("%Y%m%dT%H%M%S%fZ")
    return f"{safe_host}-{digest}-{stamp}-{os.urandom(3).hex()}"


def _where(repo: Repository, key: str) -> str:
    path = getattr(repo.storage, "path", None)
    return str(path(key)) if path is not None else f"{key} in {repo.describe()}"


def _read(repo: Repository, key: str) -> Lease:
    """The lease at ``key``: ObjectNotFoundError if gone, LeaseError if unreadable."""
    raw = repo.storage.get(key)
    try:
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise ValueError(f"it holds a JSON {type(data).__name__}, not an object")
        lease = Lease.from_dict(data)
    except (ValueError, TypeError) as exc:
        raise LeaseError(
            f"restore lease {_where(repo, key)} is unreadable ({exc})", key=key, why=str(exc)
        ) from exc
    if lease.key != key:
        why = f"it names lease {lease.lease_id!r}, not its own file name"
        raise LeaseError(
            f"restore lease {_where(repo, key)} is unreadable ({why})", key=key, why=why
        )
    return lease


def scan(repo: Repository) -> tuple[list[Lease], list[Unreadable]]:
    """Every lease record (expired ones too), oldest first, and those that cannot be read.

    One listing of ``leases/restore/`` and one read per lease: cheap, there are only as many
    leases as restores running (and expired ones a prune has not removed yet). A listing
    failure raises (StorageError): a lease that cannot be seen must not look like none.
    """
    leases: list[Lease] = []
    bad: list[Unreadable] = []
    for info in repo.storage.list(LEASE_PREFIX):
        key = info.key
        if not key.endswith(".json") or key.count("/") != 2:
            continue
        try:
            leases.append(_read(repo, key))
        except ObjectNotFoundError:
            continue  # dropped between the listing and the read
        except (LeaseError, StorageError) as exc:
            bad.append(Unreadable(key, _where(repo, key), str(exc.context.get("why", exc.msg))))
    leases.sort(key=lambda lease: (lease.created, lease.lease_id))
    return leases, bad


def active(repo: Repository, now: dt.datetime | None = None) -> list[Lease]:
    """The leases not expired at ``now`` (unreadable records are left out: see ``scan``)."""
    moment = _now(now)
    return [lease for lease in scan(repo)[0] if lease.is_active(moment)]


def take(
    repo: Repository,
    *,
    backup_label: str,
    data_dir: str,
    target: str,
    first_segment: str | None,
    timeline: int | None,
    ttl_seconds: float = DEFAULT_TTL,
    host: str | None = None,
    now: dt.datetime | None = None,
) -> TakeResult:
    """Write a new lease on ``backup_label`` for the restore into ``data_dir``.

    Returns ``TakeResult(lease, None)``, or ``TakeResult(None, reason)`` when the repository
    cannot be written (a read-only mount, permissions, a full disk): the restore may go on, and
    the caller warns with ``reason``. Raises LeaseError for a TTL that is not positive, and when
    the backup is already being removed by a prune (status ``expiring``) or is gone: the lease
    is dropped again, and the restore must choose another backup.
    """
    from ansible_collections.pitr.postgresql.plugins.module_utils import catalog

    _check_ttl(ttl_seconds)
    moment = _now(now)
    host = host or socket.gethostname()
    lease = Lease(
        lease_id=new_id(host, data_dir, moment),
        backup_label=backup_label,
        host=host,
        data_dir=data_dir,
        target=target,
        first_segment=first_segment,
        timeline=timeline,
        created=moment,
        renewed=moment,
        expires=moment + dt.timedelta(seconds=ttl_seconds),
        ttl_seconds=float(ttl_seconds),
    )
    try:
        repo.storage.put(lease.key, lease.to_json(), overwrite=False)
        try:
            _hand_over(repo, lease.key)
        except StorageError:
            drop(repo, lease.lease_id)  # a lease the prune cannot read must not stay behind
            raise
    except StorageError as exc:
        return TakeResult(
            None,
            f"no restore lease was written ({exc.msg}): a retention prune running during this"
            f" restore may remove backup {backup_label} or the WAL it needs",
        )
    # A prune marks what it removes ``expiring`` before removing anything, and reads the
    # leases again after marking: either it sees this lease, or this check sees its mark.
    try:
        record = catalog.read_backup(repo, backup_label)
    except PitrError:
        return TakeResult(lease)  # an unreadable record is restore_plan's to report
    if record is None or record.status == "expiring":
        drop(repo, lease.lease_id)
        state = (
            "is not in the repository"
            if record is None
            else "is being removed by a retention prune (status expiring)"
        )
        raise LeaseError(
            f"backup {backup_label} {state}: choose another backup to restore",
            backup=backup_label,
        )
    return TakeResult(lease)


def _hand_over(repo: Repository, key: str) -> None:
    """Written by root (the restore's staging runs as root): give the lease and the directories
    above it to the repository's owner, as everything else in it belongs to, so that the
    restore's later steps (as the server's user) and a prune (as the same user) can renew,
    drop and remove it."""
    path_of = getattr(repo.storage, "path", None)
    root = getattr(repo.storage, "root", None)
    if os.geteuid() != 0 or path_of is None or root is None:
        return
    try:
        owner = os.stat(root)
        parts = key.split("/")
        for depth in range(1, len(parts) + 1):
            path = path_of("/".join(parts[:depth]))
            if os.lstat(path).st_uid == 0 and owner.st_uid != 0:
                os.lchown(path, owner.st_uid, owner.st_gid)
    except OSError as exc:
        raise StorageError(
            f"cannot give {path_of(key)} to the repository's owner: {exc.strerror}", key=key
        ) from exc


def get(repo: Repository, lease_id: str) -> Lease | None:
    """The lease ``lease_id``, or None when it is gone; LeaseError when unreadable."""
    try:
        return _read(repo, lease_key(lease_id))
    except ObjectNotFoundError:
        return None


def renew(
    repo: Repository,
    lease_id: str,
    *,
    ttl_seconds: float | None = None,
    now: dt.datetime | None = None,
) -> None:
    """Push the lease's expiry to ``now`` + its TTL (or ``ttl_seconds``).

    LeaseError when the lease is gone (dropped, or expired and removed by a prune): the
    backup is no longer protected, so the caller must know; take a new lease then.
    """
    key = lease_key(lease_id)
    try:
        lease = _read(repo, key)
    except ObjectNotFoundError:
        raise LeaseError(
            f"restore lease {lease_id} is gone (dropped, or expired and removed by a retention"
            " prune): its backup is no longer protected; take a new lease",
            key=key,
        ) from None
    ttl = lease.ttl_seconds if ttl_seconds is None else float(ttl_seconds)
    _check_ttl(ttl)
    moment = _now(now)
    renewed = replace(
        lease, renewed=moment, expires=moment + dt.timedelta(seconds=ttl), ttl_seconds=ttl
    )
    repo.storage.put(key, renewed.to_json(), overwrite=True)


def drop(repo: Repository, lease_id: str) -> None:
    """Remove the lease; a lease that is already gone is fine."""
    repo.storage.delete(lease_key(lease_id))


def remove_expired(repo: Repository, leases: t.Iterable[Lease], now: dt.datetime) -> list[str]:
    """Remove those of ``leases`` that are expired at ``now``; return their ids.

    Each record is read again first: one renewed since ``leases`` was read stays.
    """
    removed = []
    for lease in leases:
        if lease.is_active(now):
            continue
        try:
            current = _read(repo, lease.key)
        except ObjectNotFoundError:
            continue
        except LeaseError:
            continue  # rewritten meanwhile into something unreadable: not ours to remove
        if current.is_active(now):
            continue
        repo.storage.delete(lease.key)
        removed.append(lease.lease_id)
    return removed

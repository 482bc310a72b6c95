# Copyright: contributors to pitr.postgresql
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Fixtures for integration tests: scratch PostgreSQL clusters.

- ``pg_cluster``: a started PostgreSQL cluster for one test (``PgCluster``), removed after it.
- ``make_pg_cluster``: a factory for more clusters, or clusters with settings or initdb options;
  every cluster it made is stopped and removed after the test::

      def test_two(make_pg_cluster):
          primary = make_pg_cluster(conf={"archive_mode": "on"})
          other = make_pg_cluster(start=False)

- ``scratch_dir``: a temporary directory the ``postgres`` OS user can write to (for archive
  directories used by archive_command), removed after the test.

Every test here is marked ``integration``. The PostgreSQL binaries come from
``PITR_PG_BINDIR`` (default /usr/lib/postgresql/15/bin).
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import typing as t
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from pgcluster import DEFAULT_BINDIR, PgCluster, give_to_server_user

MakePgCluster = t.Callable[..., PgCluster]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).resolve().parent
    for item in items:
        if Path(str(item.fspath)).resolve().is_relative_to(here):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def pg_bindir() -> str:
    """The PostgreSQL binaries; the session fails loudly when they are missing."""
    if not Path(DEFAULT_BINDIR, "initdb").exists():
        pytest.fail(
            f"no initdb in {DEFAULT_BINDIR}: install PostgreSQL 15 (make bootstrap) or set"
            " PITR_PG_BINDIR"
        )
    return DEFAULT_BINDIR


@pytest.fixture
def make_pg_cluster(pg_bindir: str) -> t.Iterator[MakePgCluster]:
    """Factory: ``make_pg_cluster(conf=None, initdb_args=(), start=True) -> PgCluster``."""
    made: list[PgCluster] = []

    def make(
        conf: dict[str, str] | None = None,
        initdb_args: t.Sequence[str] = (),
        start: bool = True,
    ) -> PgCluster:
        cluster = PgCluster.create(initdb_args=initdb_args, conf=conf, bindir=pg_bindir)
        made.append(cluster)
        if start:
            cluster.start()
        return cluster

    yield make
    for cluster in reversed(made):
        cluster.destroy()


@pytest.fixture
def pg_cluster(make_pg_cluster: MakePgCluster) -> PgCluster:
    """A started scratch cluster with default settings."""
    return make_pg_cluster()


@pytest.fixture
def scratch_dir() -> t.Iterator[Path]:
    """A fresh directory owned by the server's OS user (for archive_command targets)."""
    path = Path(tempfile.mkdtemp(prefix="pitr-scratch-"))
    give_to_server_user(path)
    yield path
    shutil.rmtree(path, ignore_errors=True)

# Copyright: contributors to pitr.postgresql
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The connection helper's pure parts: option mapping, version check, SQL composition.

Connections themselves are exercised by the integration tests against real servers.
"""

from __future__ import annotations

import typing as t

import pytest
from psycopg import sql

from ansible_collections.pitr.postgresql.plugins.module_utils.errors import PitrError
from ansible_collections.pitr.postgresql.plugins.module_utils.postgres import (
    APPLICATION_NAME,
    PSYCOPG_IMPORT_ERROR,
    alter_system_statement,
    check_server_version,
    connection_argument_spec,
    connection_kwargs,
    describe_target,
)


def test_psycopg_is_importable_here() -> None:
    assert PSYCOPG_IMPORT_ERROR is None


def test_argument_spec_uses_community_postgresql_names() -> None:
    spec = connection_argument_spec()
    assert set(spec) == {
        "login_user", "login_password", "login_host", "login_unix_socket", "port", "login_db",
        "ssl_mode", "ca_cert", "connect_timeout",
    }  # fmt: skip
    assert spec["login_password"]["no_log"] is True
    assert spec["port"]["aliases"] == ["login_port"]
    assert spec["login_db"]["aliases"] == ["db"]
    assert spec["login_user"]["default"] == "postgres"
    assert spec["ssl_mode"]["default"] == "prefer"


DEFAULTS = {k: v.get("default") for k, v in connection_argument_spec().items()}


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        pytest.param(
            {},
            {"port": 5432, "user": "postgres", "sslmode": "prefer", "connect_timeout": 10},
            id="defaults-leave-host-to-libpq",
        ),
        pytest.param(
            {"login_unix_socket": "/run/postgresql"},
            {"host": "/run/postgresql"},
            id="socket-without-host",
        ),
        pytest.param(
            {"login_unix_socket": "/run/postgresql", "login_host": "localhost"},
            {"host": "/run/postgresql"},
            id="socket-wins-over-localhost",
        ),
        pytest.param(
            {"login_unix_socket": "/run/postgresql", "login_host": "db1"},
            {"host": "db1"},
            id="a-real-host-wins-over-socket",
        ),
        pytest.param(
            {"login_password": "pw", "login_db": "app", "ca_cert": "/ca.pem", "port": 6432},
            {"password": "pw", "dbname": "app", "sslrootcert": "/ca.pem", "port": 6432},
            id="the-rest-maps-to-libpq-names",
        ),
        pytest.param({"login_password": ""}, {}, id="empty-password-is-left-out"),
    ],
)
def test_connection_kwargs(params: dict[str, t.Any], expected: dict[str, t.Any]) -> None:
    kwargs = connection_kwargs({**DEFAULTS, **params})
    assert kwargs["application_name"] == APPLICATION_NAME
    for key, value in expected.items():
        assert kwargs[key] == value
    if "host" not in expected:
        assert "host" not in kwargs
    if not params.get("login_password"):
        assert "password" not in kwargs


def test_describe_target_never_shows_the_password() -> None:
    kwargs = connection_kwargs({**DEFAULTS, "login_host": "db1", "login_password": "s3cret"})
    text = describe_target(kwargs)
    assert text == "host=db1 port=5432 user=postgres"
    assert "s3cret" not in text


@pytest.mark.parametrize("version", [130000, 130022, 150018, 170004])
def test_supported_versions(version: int) -> None:
    check_server_version(version)


@pytest.mark.parametrize(("version", "shown"), [(120022, "12.22"), (110000, "11.0")])
def test_old_versions_are_refused(version: int, shown: str) -> None:
    with pytest.raises(PitrError) as err:
        check_server_version(version)
    assert err.value.msg == (
        f"PostgreSQL {shown} is not supported: pitr.postgresql needs PostgreSQL 13 or later"
    )


def test_alter_system_quotes_name_and_value() -> None:
    statement = alter_system_statement("archive_command", "cp %p '/a b/%f'")
    assert isinstance(statement, sql.Composed)
    assert statement.as_string(None) == (
        "ALTER SYSTEM SET \"archive_command\" = 'cp %p ''/a b/%f'''"
    )

# Copyright: contributors to pitr.postgresql
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The archive_command / restore_command filters build exactly what hostcmd builds."""

from __future__ import annotations

import shlex

import pytest
from ansible.errors import AnsibleFilterError

from ansible_collections.pitr.postgresql.plugins.filter import commands
from ansible_collections.pitr.postgresql.plugins.module_utils import hostcmd

ODD = '/srv/it\'s 50% "odd"'


def test_the_filters_are_registered() -> None:
    assert set(commands.FilterModule().filters()) == {"archive_command", "restore_command"}


@pytest.mark.parametrize("compress", [None, "", "auto", "zstd"])
@pytest.mark.parametrize("timeout", [None, 0, 60, 2.5])
def test_archive_command_is_hostcmds(compress: str | None, timeout: float | None) -> None:
    got = commands.archive_command(
        "/opt/pitr wal/pitr-wal", ODD, python="/usr/bin/python3", compress=compress, timeout=timeout
    )
    assert got == hostcmd.archive_command_for(
        program="/opt/pitr wal/pitr-wal", repo=ODD, compress=compress or None, timeout=timeout
    )
    # What the shell that runs it sees, once PostgreSQL turned %% back into %.
    argv = shlex.split(got.replace("%%", "%"))
    assert argv[3:6] == ["/opt/pitr wal/pitr-wal", "--repo", ODD]
    assert argv[-2:] == ["push", "%p"]


@pytest.mark.parametrize("prefetch", [None, 0, 8])
def test_restore_command_is_hostcmds(prefetch: int | None) -> None:
    got = commands.restore_command("/x/pitr-wal", ODD, prefetch=prefetch)
    assert got == hostcmd.restore_command_for(program="/x/pitr-wal", repo=ODD, prefetch=prefetch)
    assert got.endswith("fetch %f %p")
    assert ("--prefetch 8" in got) == (prefetch == 8)


def test_a_relative_program_is_a_filter_error() -> None:
    with pytest.raises(AnsibleFilterError, match="absolute paths"):
        commands.archive_command("pitr-wal", "/srv/pitr")

# Copyright: contributors to pitr.postgresql
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""What pitr-backup (the timer's command) writes to the journal: progress lines and hints."""

from __future__ import annotations

from ansible_collections.pitr.postgresql.plugins.module_utils import backup as b

MiB = 1 << 20


def feed(samples: list[tuple[float, int, int]], every: float = 30.0) -> list[str]:
    said: list[str] = []
    now = [0.0]
    log = b.progress_logger(said.append, clock=lambda: now[0], every=every)
    for when, done, total in samples:
        now[0] = when
        log(b.Progress(label="L", done_bytes=done, total_bytes=total))
    return said


def test_the_start_up_zero_of_zero_is_not_logged() -> None:
    assert feed([(0, 0, 0), (1, 0, 0)]) == []


def test_first_line_then_one_per_interval_then_the_end_once() -> None:
    said = feed(
        [
            (0, 0, 0),
            (1, 10 * MiB, 100 * MiB),
            (5, 20 * MiB, 100 * MiB),  # within 30 s of the first line: quiet
            (31, 50 * MiB, 100 * MiB),
            (40, 100 * MiB, 100 * MiB),
            (41, 100 * MiB, 100 * MiB),  # pg_basebackup repeats its last line: quiet
            (90, 100 * MiB, 100 * MiB),
        ]
    )
    assert said == [
        "L: 10 of 100 MiB (10.0%)",
        "L: 50 of 100 MiB (50.0%)",
        "L: 100 of 100 MiB (100.0%)",
    ]


def test_a_refused_connection_suggests_starting_the_server() -> None:
    msg = (
        'connection to server on socket "/run/postgresql/.s.PGSQL.5432" failed: No such file or'
        " directory\n\tIs the server running locally and accepting connections on that socket?"
    )
    hint = b.connection_hint(msg)
    assert "start PostgreSQL" in hint and "REPLICATION" not in hint


def test_a_rejected_login_suggests_the_replication_attribute_and_pg_hba() -> None:
    msg = 'FATAL:  no pg_hba.conf entry for replication connection from host "[local]", user "x"'
    hint = b.connection_hint(msg)
    assert "REPLICATION" in hint and "pg_hba.conf" in hint

# Copyright: contributors to pitr.postgresql
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The backup_wait action: choosing the progress record, the progress lines, the job's result,
and the wait loop over recorded async_status answers."""

from __future__ import annotations

import typing as t

import pytest

from ansible_collections.pitr.postgresql.plugins.action import backup_wait as bw
from ansible_collections.pitr.postgresql.plugins.module_utils.backup import Progress


def record(
    label: str = "20261125T171500Z",
    phase: str = "copying",
    done: int = 0,
    total: int = 0,
    *,
    started: str = "2026-11-25T17:15:00+00:00",
    updated: str = "2026-11-25T17:15:10+00:00",
    alive: bool | None = True,
    verify: int = 0,
) -> dict[str, t.Any]:
    return {
        "label": label,
        "phase": phase,
        "done_bytes": done,
        "total_bytes": total,
        "percent": round(100.0 * done / total, 1) if total else 0.0,
        "verify_bytes": verify,
        "started": started,
        "updated": updated,
        "pid": 4242,
        "host": "db1",
        "alive": alive,
    }


MB = 1 << 20
GB = 1 << 30


# parse_time ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-11-25T17:15:00+00:00", 1795626900.0),
        ("2026-11-25T18:15:00+01:00", 1795626900.0),
        ("2026-11-25T17:15:00", 1795626900.0),  # no offset: UTC, as the records are written
        ("2026-11-25T17:15:00.500000+00:00", 1795626900.5),
        ("", None),
        ("yesterday", None),
        (None, None),
        (1795626900, None),
    ],
)
def test_parse_time(text: object, expected: float | None) -> None:
    assert bw.parse_time(text) == expected


# pick_record ----------------------------------------------------------------------------------


def test_pick_record_by_label() -> None:
    a, b = record("a"), record("b")
    assert bw.pick_record([a, b], "b") is b
    assert bw.pick_record([a, b], "c") is None


def test_pick_record_with_label_prefers_the_live_record() -> None:
    dead = record("a", started="2026-11-25T17:00:00+00:00", alive=False)
    elsewhere = record("a", started="2026-11-25T16:30:00+00:00", alive=None)
    live = record("a", started="2026-11-25T16:00:00+00:00")
    assert bw.pick_record([dead, elsewhere, live], "a") is live
    assert bw.pick_record([dead, elsewhere], "a") is elsewhere
    assert bw.pick_record([dead], "a") is dead


def test_pick_record_without_label_takes_the_newest_live_one_of_this_host() -> None:
    old = record("20261125T160000Z", started="2026-11-25T16:00:00+00:00")
    new = record("20261125T170000Z", started="2026-11-25T17:00:00+00:00")
    # another host backing up into a shared repository: not ours
    other_host = record("20261125T175000Z", started="2026-11-25T17:50:00+00:00", alive=None)
    dead = record("20261125T180000Z", started="2026-11-25T18:00:00+00:00", alive=False)
    assert bw.pick_record([old, dead, new, other_host]) is new
    assert bw.pick_record([old, other_host]) is old
    assert bw.pick_record([other_host]) is None
    assert bw.pick_record([dead]) is None  # an interrupted backup is not ours
    assert bw.pick_record([]) is None
    assert bw.pick_record(["junk", None, 3]) is None


# transfer_rate --------------------------------------------------------------------------------


def test_rate_between_two_records() -> None:
    before = record(done=100 * MB, updated="2026-11-25T17:15:10+00:00")
    now = record(done=400 * MB, updated="2026-11-25T17:15:20+00:00")
    assert bw.transfer_rate(now, before) == 30 * MB


def test_rate_since_the_start_without_a_usable_previous_record() -> None:
    now = record(done=400 * MB, updated="2026-11-25T17:15:20+00:00")
    assert bw.transfer_rate(now) == 20 * MB  # 400 MB in the 20 s since it started
    same_time = record(done=300 * MB, updated="2026-11-25T17:15:20+00:00")
    assert bw.transfer_rate(now, same_time) == 20 * MB
    other = record("other", done=100 * MB, updated="2026-11-25T17:15:10+00:00")
    assert bw.transfer_rate(now, other) == 20 * MB
    went_back = record(done=500 * MB, updated="2026-11-25T17:15:10+00:00")
    assert bw.transfer_rate(now, went_back) == 20 * MB


def test_no_rate_without_bytes_or_times() -> None:
    assert bw.transfer_rate(record(done=0)) is None
    assert bw.transfer_rate(record(done=MB, updated="")) is None
    assert bw.transfer_rate(record(done=MB, updated="2026-11-25T17:15:00+00:00")) is None


# progress_line --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rec", "previous", "expected"),
    [
        (record(phase="starting"), None, "[db1] backup 20261125T171500Z: starting"),
        (
            record(phase="checkpoint"),
            None,
            "[db1] backup 20261125T171500Z: waiting for the checkpoint",
        ),
        (
            record(done=int(1.2 * GB), total=int(2.4 * GB)),
            record(done=int(1.2 * GB) - 620 * MB, updated="2026-11-25T17:15:08+00:00"),
            "[db1] backup 20261125T171500Z: 1.20 GB of 2.40 GB (50.0%), 310.00 MB/s",
        ),
        (
            record(phase="finishing", done=2 * GB, total=2 * GB),
            None,
            "[db1] backup 20261125T171500Z: 2.00 GB of 2.00 GB (100.0%), 204.80 MB/s,"
            " waiting for the end of its WAL",
        ),
        (
            record(phase="verifying", done=2 * GB, total=2 * GB, verify=GB),
            None,
            "[db1] backup 20261125T171500Z: 2.00 GB of 2.00 GB (100.0%) copied, reading it"
            " back against the manifest (1.00 GB read)",
        ),
        (
            record(phase="verifying", done=2 * GB, total=2 * GB),
            None,
            "[db1] backup 20261125T171500Z: 2.00 GB of 2.00 GB (100.0%) copied, reading it"
            " back against the manifest",
        ),
        (
            record(done=3 * MB, total=10 * MB, alive=False),
            None,
            "[db1] backup 20261125T171500Z: 3.00 MB of 10.00 MB (30.0%), 307.20 KB/s"
            " (its process is gone: interrupted)",
        ),
        # done beyond pg_basebackup's estimate: the total grows with it, never above 100 %
        (
            record(done=11 * MB, total=10 * MB, updated="2026-11-25T17:15:00+00:00"),
            None,
            "[db1] backup 20261125T171500Z: 11.00 MB of 11.00 MB (100.0%)",
        ),
        (record(phase="somethingnew"), None, "[db1] backup 20261125T171500Z: somethingnew"),
    ],
)
def test_progress_line(
    rec: dict[str, t.Any], previous: dict[str, t.Any] | None, expected: str
) -> None:
    assert bw.progress_line(rec, previous, "db1") == expected


def test_progress_line_from_real_pg_basebackup_output() -> None:
    # pg_basebackup 15 --progress --verbose, stderr not a terminal (one line per report)
    progress = Progress("20261125T171500Z")
    for line in [
        "pg_basebackup: initiating base backup, waiting for checkpoint to complete",
        "pg_basebackup: checkpoint completed",
        "pg_basebackup: write-ahead log start point: 0/2000028 on timeline 1",
        "    0/42718 kB (0%), 0/1 tablespace",
        " 8200/42718 kB (19%), 0/1 tablespace",
    ]:
        progress.feed(line)
    rec = progress.to_dict()
    assert bw.progress_line(rec).startswith("backup 20261125T171500Z: 8.01 MB of 41.72 MB (19.2%)")
    progress.feed("42719/42719 kB (100%), 1/1 tablespace")
    progress.feed("pg_basebackup: write-ahead log end point: 0/2000100")
    assert bw.progress_line(progress.to_dict()).startswith(
        "backup 20261125T171500Z: 41.72 MB of 41.72 MB (100.0%)"
    )
    assert bw.progress_line(progress.to_dict()).endswith(", waiting for the end of its WAL")


# ProgressLines --------------------------------------------------------------------------------


def test_progress_lines_measure_the_rate_between_distinct_records() -> None:
    lines = bw.ProgressLines("db1")
    assert lines.line(None) is None  # right after the start: nothing yet
    assert lines.line(None) == "[db1] backup: started, no progress yet"
    first = record(done=20 * MB, total=100 * MB, updated="2026-11-25T17:15:10+00:00")
    assert lines.line(first) == (
        "[db1] backup 20261125T171500Z: 20.00 MB of 100.00 MB (20.0%), 2.00 MB/s"
    )
    second = record(done=60 * MB, total=100 * MB, updated="2026-11-25T17:15:20+00:00")
    expected = "[db1] backup 20261125T171500Z: 60.00 MB of 100.00 MB (60.0%), 4.00 MB/s"
    assert lines.line(second) == expected
    # read again unchanged: the same line, not a rate over a shorter span
    assert lines.line(dict(second)) == expected
    third = record(done=65 * MB, total=100 * MB, updated="2026-11-25T17:15:21+00:00")
    assert lines.line(third) == (
        "[db1] backup 20261125T171500Z: 65.00 MB of 100.00 MB (65.0%), 5.00 MB/s"
    )


# final_line, job_done, job_result -------------------------------------------------------------

DONE = {
    "changed": True,
    "label": "20261125T171500Z",
    "usable": True,
    "backup_seconds": 10.527,
    "progress": {"phase": "done", "done_bytes": 41 * MB, "total_bytes": 41 * MB},
}


def test_final_line() -> None:
    assert bw.final_line(DONE, "db1") == (
        "[db1] backup 20261125T171500Z: 41.00 MB of 41.00 MB (100.0%) in 10.5 s, verified"
    )
    failed = {**DONE, "usable": False, "failed": True}
    assert bw.final_line(failed) == (
        "backup 20261125T171500Z: 41.00 MB of 41.00 MB (100.0%) in 10.5 s, NOT usable"
    )
    assert bw.final_line({**DONE, "changed": False}) is None  # min_interval: nothing taken
    assert bw.final_line({**DONE, "progress": {}}) is None  # check mode, or an existing label
    assert bw.final_line({"failed": True, "msg": "boom"}) is None


RUNNING = {"started": 1, "finished": 0, "ansible_job_id": "j1", "_ansible_parsed": True}
FINISHED = {
    **DONE,
    "started": 1,
    "finished": 1,
    "ansible_job_id": "j1",
    "results_file": "/var/lib/postgresql/.ansible_async/j1",
    "msg": "968 files match",
    "_ansible_parsed": True,
}
MODULE_FAILED = {
    "started": 1,
    "finished": 1,
    "ansible_job_id": "j1",
    "failed": 1,
    "changed": True,
    "msg": "base backup x is not usable (failed): pg_basebackup failed: ...",
    "stderr": 'pg_basebackup: error: transfer rate "1" is out of range\n',
    "_ansible_parsed": True,
}
NO_SUCH_JOB = {"failed": True, "msg": "could not find job", "_ansible_parsed": True}


@pytest.mark.parametrize(
    ("status", "done"),
    [
        (RUNNING, False),
        (FINISHED, True),
        (MODULE_FAILED, True),
        (NO_SUCH_JOB, True),
        # a half-written status file is read again, as ansible's own async poll does
        ({"failed": True, "msg": "unparsable", "_ansible_parsed": False}, False),
    ],
)
def test_job_done(status: dict[str, t.Any], done: bool) -> None:
    assert bw.job_done(status) is done


def test_job_result_is_the_module_result() -> None:
    result = bw.job_result(FINISHED)
    assert result == {**DONE, "msg": "968 files match", "_ansible_parsed": True}
    failed = bw.job_result(MODULE_FAILED)
    assert failed["failed"] is True and failed["msg"] == MODULE_FAILED["msg"]
    assert failed["stderr"] == MODULE_FAILED["stderr"]
    assert "finished" not in failed and "results_file" not in failed


# The wait loop, over recorded answers ---------------------------------------------------------


class FakeWait(bw.ActionModule):
    """The action's loop with async_status and backup_progress_info answers from lists."""

    def __init__(self, statuses: list[dict[str, t.Any]], progress: list[list[object]]) -> None:
        self.statuses = statuses
        self.progress = progress
        self.calls: list[str] = []

    def _async_status(self, jid: str, mode: str, task_vars: dict[str, t.Any]) -> dict[str, t.Any]:
        self.calls.append(f"{mode} {jid}")
        return dict(self.statuses.pop(0)) if mode == "status" else {"erased": jid}

    def _read_progress(
        self, args: t.Mapping[str, t.Any], task_vars: dict[str, t.Any]
    ) -> tuple[list[object], str]:
        self.calls.append("progress")
        return self.progress.pop(0), ""


@pytest.fixture
def shown(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    out: list[str] = []
    clock = [1000.0]

    def sleep(seconds: float) -> None:
        clock[0] += seconds

    monkeypatch.setattr(bw.time, "sleep", sleep)
    monkeypatch.setattr(bw.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(bw.display, "display", lambda msg, *a, **k: out.append(msg))
    return out


ARGS = {"jid": "j1", "repository_path": "/srv/pitr/main", "label": "", "timeout": 3600}


def test_wait_prints_progress_until_the_job_finishes(shown: list[str]) -> None:
    a = record(done=10 * MB, total=40 * MB, updated="2026-11-25T17:15:05+00:00")
    b = record(done=30 * MB, total=40 * MB, updated="2026-11-25T17:15:10+00:00")
    action = FakeWait([RUNNING, RUNNING, RUNNING, RUNNING, FINISHED], [[], [a], [b]])
    status = action._wait(ARGS, "db1", 2.0, 10_000.0, {})
    assert status is not None and status["finished"] == 1
    # status after 1 s, then 2 s (the interval); progress at once (nothing yet), then once
    # per interval
    assert action.calls == [
        "status j1",
        "progress",
        "status j1",
        "status j1",
        "progress",
        "status j1",
        "progress",
        "status j1",
    ]
    assert shown == [
        "[db1] backup 20261125T171500Z: 10.00 MB of 40.00 MB (25.0%), 2.00 MB/s",
        "[db1] backup 20261125T171500Z: 30.00 MB of 40.00 MB (75.0%), 4.00 MB/s",
    ]


def test_wait_returns_at_once_for_a_short_job(shown: list[str]) -> None:
    action = FakeWait([FINISHED], [])
    assert action._wait(ARGS, "db1", 10.0, 10_000.0, {})["finished"] == 1
    assert action.calls == ["status j1"] and shown == []


def test_wait_gives_up_at_the_deadline(shown: list[str]) -> None:
    action = FakeWait([RUNNING] * 100, [[]] * 100)
    status = action._wait(ARGS, "db1", 1.0, 1010.0, {})
    assert not bw.job_done(status)
    assert len(action.calls) < 40


def test_wait_without_repository_prints_nothing(shown: list[str]) -> None:
    action = FakeWait([RUNNING, RUNNING, MODULE_FAILED], [])
    status = action._wait({**ARGS, "repository_path": None}, "db1", 5.0, 10_000.0, {})
    assert bw.job_result(status)["msg"] == MODULE_FAILED["msg"]
    assert action.calls == ["status j1"] * 3 and shown == []


@pytest.mark.parametrize(
    ("callback", "expected"),
    [
        ("default", False),
        ("ansible.builtin.default", False),
        ("ansible.builtin.minimal", False),
        ("community.general.yaml", False),
        ("ansible.posix.json", True),
        ("ansible.posix.jsonl", True),
        ("json", True),
        (None, False),
    ],
)
def test_machine_readable_stdout_callbacks(callback: object, expected: bool) -> None:
    assert bw.machine_readable(callback) is expected


def test_lines_go_to_stderr_under_a_json_callback(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, bool]] = []
    monkeypatch.setattr(
        bw.display, "display", lambda msg, stderr=False, **k: calls.append((msg, stderr))
    )
    callback = ["ansible.posix.json"]
    monkeypatch.setattr(bw.C.config, "get_config_value", lambda name, *a, **k: callback[0])
    bw.say("one")
    callback[0] = "ansible.builtin.default"
    bw.say("two")
    assert calls == [("one", True), ("two", False)]

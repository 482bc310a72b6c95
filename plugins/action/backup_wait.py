# Copyright: contributors to pitr.postgresql
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Wait for an asynchronous base backup and print its progress from the controller.

The role starts ``pitr.postgresql.base_backup`` with ``async`` and ``poll: 0``; this action
then, every ``interval`` seconds, asks ``async_status`` whether the job finished and reads the
backup's progress record through the read-only ``backup_progress_info`` module, printing one
line per poll::

    [db1] backup 20261125T171500Z: 1.20 GB of 2.40 GB (50.0%), 310.00 MB/s

When the job finishes it returns the job's result: the module's own result, its failure
included (``failed`` and ``msg`` as the module set them), and removes the job's status file.
The progress lines are a courtesy: a progress record that cannot be read never fails the wait.

The formatting functions at the top are pure, for unit tests.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import time
import typing as t

from ansible import constants as C
from ansible.errors import AnsibleError
from ansible.module_utils.common.text.formatters import bytes_to_human
from ansible.plugins.action import ActionBase
from ansible.utils.display import Display

display = Display()

Record = t.Mapping[str, t.Any]

# Keys async_status adds to the job's result; the module's own keys are kept as they are.
ASYNC_KEYS = ("started", "finished", "results_file", "ansible_job_id", "erased")
# Consecutive errors reaching the host (network bounce) tolerated before giving up.
MAX_POLL_ERRORS = 5


def parse_time(text: object) -> float | None:
    """Seconds since the epoch of an ISO 8601 time with offset, or None."""
    if not isinstance(text, str) or not text:
        return None
    try:
        value = dt.datetime.fromisoformat(text)
    except ValueError:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    return value.timestamp()


def _int(value: object) -> int:
    if isinstance(value, bool):
        return 0
    if isinstance(value, int):
        return value
    if isinstance(value, (str, float)):
        try:
            return int(float(value))
        except ValueError:
            return 0
    return 0


def pick_record(records: t.Iterable[object], label: str = "") -> Record | None:
    """The progress record of the backup being waited for.

    With a label, that backup's record (a live one first). Without one (the module names the
    backup after its start time) the newest record of a backup process running on this host
    (``alive`` true): a repository lock lets one backup run at a time, so that is the running
    backup; a record of another host sharing the repository (``alive`` null) is not ours.
    """
    found = [r for r in records if isinstance(r, t.Mapping)]
    if label:
        found = [r for r in found if r.get("label") == label]
        candidates = (
            [r for r in found if r.get("alive") is True]
            or [r for r in found if r.get("alive") is not False]
            or found
        )
    else:
        candidates = [r for r in found if r.get("alive") is True]
    if not candidates:
        return None
    return max(candidates, key=lambda r: (str(r.get("started", "")), str(r.get("label", ""))))


def transfer_rate(record: Record, previous: Record | None = None) -> float | None:
    """Bytes per second: since the previous record of the same backup when its time differs
    (the records' times have one-second resolution), else since the backup started."""
    done = _int(record.get("done_bytes"))
    now = parse_time(record.get("updated"))
    if now is None or done <= 0:
        return None
    if previous is not None and previous.get("label") == record.get("label"):
        before = parse_time(previous.get("updated"))
        before_done = _int(previous.get("done_bytes"))
        if before is not None and now - before >= 1 and done >= before_done > 0:
            return (done - before_done) / (now - before)
    started = parse_time(record.get("started"))
    if started is not None and now - started >= 1:
        return done / (now - started)
    return None


def human(size: float) -> str:
    """Bytes as the role's other messages show them (Ansible's human_readable filter)."""
    return str(bytes_to_human(max(0.0, float(size))))


def percent(done: int, total: int) -> float:
    return round(100.0 * done / total, 1) if total > 0 else 0.0


def copied(done: int, total: int) -> str:
    return f"{human(done)} of {human(total)} ({percent(done, total)}%)"


def progress_line(record: Record, previous: Record | None = None, host: str = "") -> str:
    """One line saying how far the backup of ``record`` is."""
    label = str(record.get("label") or "?")
    phase = str(record.get("phase") or "")
    done = _int(record.get("done_bytes"))
    total = max(_int(record.get("total_bytes")), done)
    if phase == "starting":
        text = "starting"
    elif phase == "checkpoint":
        text = "waiting for the checkpoint"
    elif phase in ("copying", "finishing"):
        text = copied(done, total)
        rate = transfer_rate(record, previous)
        if rate is not None:
            text += f", {human(rate)}/s"
        if phase == "finishing":
            text += ", waiting for the end of its WAL"
    elif phase == "verifying":
        text = f"{copied(done, total)} copied, reading it back against the manifest"
        verified = _int(record.get("verify_bytes"))
        if verified:
            text += f" ({human(verified)} read)"
    else:
        text = phase or "running"
    if record.get("alive") is False:
        text += " (its process is gone: interrupted)"
    prefix = f"[{host}] " if host else ""
    return f"{prefix}backup {label}: {text}"


def waiting_line(host: str = "") -> str:
    """The line for a poll that found no progress record (the module is starting, or waits
    for the repository lock)."""
    prefix = f"[{host}] " if host else ""
    return f"{prefix}backup: started, no progress yet"


def final_line(result: Record, host: str = "") -> str | None:
    """The line for a finished backup (None when no backup was taken)."""
    progress = result.get("progress")
    if not isinstance(progress, t.Mapping) or not progress or result.get("changed") is False:
        return None
    done = _int(progress.get("done_bytes"))
    total = max(_int(progress.get("total_bytes")), done)
    seconds = result.get("backup_seconds")
    text = copied(done, total)
    if isinstance(seconds, (int, float)) and not isinstance(seconds, bool):
        text += f" in {seconds:.1f} s"
    text += ", verified" if result.get("usable") else ", NOT usable"
    prefix = f"[{host}] " if host else ""
    return f"{prefix}backup {result.get('label') or progress.get('label') or '?'}: {text}"


class ProgressLines:
    """Turns the records read at each poll into lines.

    The rate is measured between the two newest distinct records of the backup: a record read
    again unchanged (the backup rewrites it every two seconds, or not at all while it waits
    or verifies) shows the same line, not a rate over a shorter span.
    """

    def __init__(self, host: str = "") -> None:
        self.host = host
        self.current: Record | None = None
        self.previous: Record | None = None
        self.reads = 0

    def line(self, record: Record | None) -> str | None:
        """The line for this poll's record (None: nothing to say yet)."""
        self.reads += 1
        if record is None:
            # The first poll comes right after the job started; later ones mean it waits
            # (for the repository lock, or the module is still starting).
            return waiting_line(self.host) if self.reads > 1 else None
        current = self.current
        if current is None or any(
            record.get(k) != current.get(k) for k in ("label", "updated", "phase", "done_bytes")
        ):
            self.previous = current
        self.current = record
        return progress_line(record, self.previous, self.host)


def machine_readable(stdout_callback: object) -> bool:
    """Does this stdout callback write a document a program parses (JSON)? The progress lines
    then go to stderr, so that they do not break it."""
    name = str(stdout_callback or "").rsplit(".", 1)[-1].lower()
    return name in ("json", "jsonl")


def say(line: str) -> None:
    """Print a line from the controller (through the main process when in a worker)."""
    callback = C.config.get_config_value("DEFAULT_STDOUT_CALLBACK")
    display.display(line, stderr=machine_readable(callback))


def job_done(status: Record) -> bool:
    """Has the async job ended (as ansible's own async poll decides)?"""
    return bool(
        status.get("finished")
        or (status.get("failed") and status.get("_ansible_parsed"))
        or status.get("skipped")
    )


def job_result(status: Record) -> dict[str, t.Any]:
    """The module's result from async_status's answer (its bookkeeping keys removed)."""
    result = {k: v for k, v in status.items() if k not in ASYNC_KEYS}
    if "failed" in result:
        result["failed"] = bool(result["failed"])
    return result


class ActionModule(ActionBase):
    TRANSFERS_FILES = False
    _supports_check_mode = True
    _supports_async = False

    def run(self, tmp: t.Any = None, task_vars: dict[str, t.Any] | None = None) -> dict[str, t.Any]:
        task_vars = task_vars or {}
        result = super().run(tmp, task_vars)
        args = self.validate_argument_spec(
            argument_spec={
                "jid": {"type": "str", "required": True},
                "repository_path": {"type": "str"},
                "label": {"type": "str", "default": ""},
                "interval": {"type": "float", "default": 10.0},
                "timeout": {"type": "int", "default": 86400},
            },
        )[1]
        interval = float(args["interval"])
        if interval < 1:
            result.update(failed=True, msg=f"interval must be at least 1 second, got {interval}")
            return result
        host = str(task_vars.get("inventory_hostname", ""))
        # The job kills itself at its async limit and reports that; wait a little longer.
        deadline = time.monotonic() + max(0, args["timeout"]) + max(2 * interval, 30.0)
        if self._task.check_mode:
            # A check-mode job takes no backup: there is no progress of ours to read.
            args = {**args, "repository_path": None}
        status = self._wait(args, host, interval, deadline, task_vars)
        if not job_done(status):
            result.update(
                failed=True,
                msg=(
                    f"the backup job {args['jid']} did not finish within {args['timeout']} s;"
                    " it may still be running on the host"
                ),
                async_result=status,
            )
            return result
        # Housekeeping: a host that cannot be reached right now must not turn a finished
        # backup into a failed task.
        with contextlib.suppress(AnsibleError):
            self._async_status(args["jid"], "cleanup", task_vars)
        final = job_result(status)
        line = final_line(final, host)
        if line:
            say(line)
        result.update(final)
        return result

    def _wait(
        self,
        args: t.Mapping[str, t.Any],
        host: str,
        interval: float,
        deadline: float,
        task_vars: dict[str, t.Any],
    ) -> dict[str, t.Any]:
        lines = ProgressLines(host)
        errors = 0
        unavailable = ""
        status: dict[str, t.Any] = {}
        # Ask for the job's status after 1, 2, 4... seconds up to the interval, so that a
        # short job (check mode, a backup refused at once) is not waited for a whole interval;
        # print a progress line once per interval.
        pause = 1.0
        next_line = time.monotonic()
        while True:
            try:
                status = self._async_status(args["jid"], "status", task_vars)
                errors = 0
            except AnsibleError as exc:
                # The host may be briefly unreachable (network bounce); ansible's own async
                # poll retries too.
                errors += 1
                display.vvvv(f"{host}: async_status failed ({exc}), retrying")
                if errors > MAX_POLL_ERRORS or time.monotonic() > deadline:
                    raise
                reset = getattr(self._connection, "reset", None)
                if callable(reset):
                    with contextlib.suppress(AnsibleError):
                        reset()
                time.sleep(interval)
                continue
            if job_done(status) or time.monotonic() > deadline:
                return status
            if args.get("repository_path") and time.monotonic() >= next_line:
                next_line = time.monotonic() + interval
                records, problem = self._read_progress(args, task_vars)
                if problem:
                    if problem != unavailable:
                        say(f"[{host}] backup progress not available: {problem}")
                    unavailable = problem
                else:
                    line = lines.line(pick_record(records, args.get("label") or ""))
                    if line:
                        say(line)
            until_line = next_line - time.monotonic()
            time.sleep(max(0.5, min(pause, interval, until_line if until_line > 0 else pause)))
            pause = min(2 * pause, interval)

    def _async_status(self, jid: str, mode: str, task_vars: dict[str, t.Any]) -> dict[str, t.Any]:
        # What the async_status action does: the job files live in the (become) user's
        # async_dir on the host.
        async_dir = self._remote_expand_user(
            self.get_shell_option("async_dir", default="~/.ansible_async")
        )
        return dict(
            self._execute_module(
                module_name="ansible.legacy.async_status",
                module_args={"jid": jid, "mode": mode, "_async_dir": async_dir},
                task_vars=task_vars,
            )
        )

    def _read_progress(
        self, args: t.Mapping[str, t.Any], task_vars: dict[str, t.Any]
    ) -> tuple[list[object], str]:
        module_args: dict[str, t.Any] = {"repository_path": args["repository_path"]}
        if args.get("label"):
            module_args["label"] = args["label"]
        try:
            res = self._execute_module(
                module_name="pitr.postgresql.backup_progress_info",
                module_args=module_args,
                task_vars=task_vars,
            )
        except AnsibleError as exc:
            return [], str(exc)
        if res.get("failed") or res.get("unreachable"):
            return [], str(res.get("msg") or "backup_progress_info failed")
        records = res.get("in_progress")
        return (list(records) if isinstance(records, list) else []), ""

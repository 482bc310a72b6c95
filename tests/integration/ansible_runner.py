# Copyright: contributors to pitr.postgresql
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Run the collection's modules for real from tests: ``ansible-playbook`` against localhost.

The playbook is generated in a temporary directory, runs on ``localhost`` with
``ansible_connection=local`` and the Python running the tests as ``ansible_python_interpreter``
(so the module finds psycopg), with this checkout as the collection ``pitr.postgresql``.
Results come back parsed from the ``ansible.posix.json`` stdout callback::

    result = run_module("pitr.postgresql.wal_archiving", {"archive_command": "x %p"},
                        check=True, diff=True)
    assert result.changed and not result.failed
    assert result["queries"] == [...]

    results = run_tasks([{"name": "one", "pitr.postgresql.archive_info": {...}}, ...])

``run_playbook_text`` takes a playbook written as YAML text, for tests of how YAML itself
reaches a module (``archive_mode: on`` unquoted is the boolean true).
"""

from __future__ import annotations

import atexit
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import typing as t
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HOST = "localhost"


class AnsibleRunError(RuntimeError):
    """ansible-playbook did not produce the JSON report (it crashed, or a syntax error)."""


@dataclass
class TaskResult:
    """The result of one task on localhost: the module's return values plus Ansible's keys."""

    name: str
    result: dict[str, t.Any] = field(default_factory=dict)

    @property
    def failed(self) -> bool:
        return bool(self.result.get("failed"))

    @property
    def changed(self) -> bool:
        return bool(self.result.get("changed"))

    @property
    def msg(self) -> str:
        return str(self.result.get("msg", ""))

    @property
    def warnings(self) -> list[str]:
        return list(self.result.get("warnings", []))

    def __getitem__(self, key: str) -> t.Any:
        return self.result[key]

    def get(self, key: str, default: t.Any = None) -> t.Any:
        return self.result.get(key, default)

    def __contains__(self, key: object) -> bool:
        return key in self.result


_collections_dir: str | None = None


def collections_path() -> str:
    """A directory holding ``ansible_collections/pitr/postgresql`` -> this checkout.

    ``make collection-link`` makes build/collections; when that link is missing or points
    elsewhere, a link tree is made in a temporary directory (removed at exit).
    """
    global _collections_dir
    if _collections_dir is not None:
        return _collections_dir
    built = ROOT / "build" / "collections"
    link = built / "ansible_collections" / "pitr" / "postgresql"
    if link.is_symlink() and link.resolve() == ROOT:
        _collections_dir = str(built)
        return _collections_dir
    tmp = tempfile.mkdtemp(prefix="pitr-collection-")
    atexit.register(shutil.rmtree, tmp, True)
    (Path(tmp) / "ansible_collections" / "pitr").mkdir(parents=True)
    os.symlink(ROOT, Path(tmp) / "ansible_collections" / "pitr" / "postgresql")
    _collections_dir = tmp
    return tmp


def _environment(extra: t.Mapping[str, str] | None) -> dict[str, str]:
    env = dict(os.environ)
    bindir = str(Path(sys.executable).parent)
    env.update(
        {
            "PATH": f"{bindir}:{env.get('PATH', '')}",
            "ANSIBLE_COLLECTIONS_PATH": collections_path(),
            "ANSIBLE_STDOUT_CALLBACK": "ansible.posix.json",
            "ANSIBLE_CALLBACK_RESULT_FORMAT": "json",
            "ANSIBLE_NOCOLOR": "1",
            "ANSIBLE_RETRY_FILES_ENABLED": "0",
            "ANSIBLE_LOCALHOST_WARNING": "0",
            "ANSIBLE_INVENTORY_UNPARSED_WARNING": "0",
            "ANSIBLE_DEPRECATION_WARNINGS": "0",
            "ANSIBLE_GATHERING": "explicit",
        }
    )
    env.pop("ANSIBLE_CONFIG", None)
    env.update(extra or {})
    return env


def run_playbook_file(
    playbook: Path,
    hosts: t.Mapping[str, t.Mapping[str, t.Any]],
    workdir: Path,
    *,
    check: bool = False,
    timeout: float = 600,
) -> tuple[int, str]:
    """Run ``playbook`` as a user would (the checkout's ansible.cfg, the default stdout
    callback) for ``hosts`` in the inventory group ``postgresql``; its exit code and output
    (stdout and stderr together)."""
    inventory = workdir / "inventory.json"
    inventory.write_text(json.dumps({"postgresql": {"hosts": dict(hosts)}}))
    return run_as_user(
        ["-i", str(inventory), str(playbook)] + (["--check"] if check else []), timeout=timeout
    )


LOCALHOST_RECAP = re.compile(
    r"^localhost\s*:\s*ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", re.M
)


def recap(output: str) -> tuple[int, int, int, int]:
    """ok, changed, unreachable and failed of the one host ``localhost`` in a PLAY RECAP."""
    found = LOCALHOST_RECAP.findall(output)
    assert len(found) == 1, output[-4000:]
    ok, changed, unreachable, failed = (int(x) for x in found[0])
    return ok, changed, unreachable, failed


def run_as_user(
    args: t.Sequence[str], *, collections: str | None = None, timeout: float = 600
) -> tuple[int, str]:
    """``ansible-playbook ARGS`` as a user runs it: the checkout's ansible.cfg and the default
    stdout callback, the collections under ``collections`` (default: this checkout); its exit
    code and output (stdout and stderr together)."""
    env = dict(os.environ)
    env.update(
        {
            "PATH": f"{Path(sys.executable).parent}:{env.get('PATH', '')}",
            "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"),
            "ANSIBLE_COLLECTIONS_PATH": collections or collections_path(),
            "ANSIBLE_NOCOLOR": "1",
            "ANSIBLE_FORCE_COLOR": "0",
            "ANSIBLE_STDOUT_CALLBACK": "ansible.builtin.default",
            "ANSIBLE_RETRY_FILES_ENABLED": "0",
        }
    )
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "ansible-playbook"), *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
        check=False,
    )
    return proc.returncode, proc.stdout


def run_playbook_text(
    playbook: str,
    *,
    check: bool = False,
    diff: bool = False,
    env: t.Mapping[str, str] | None = None,
    interpreter: str | None = None,
    timeout: float = 300,
) -> list[TaskResult]:
    """Run a playbook given as YAML text (plays on ``localhost``); one TaskResult per task run.

    ``interpreter`` is the Python that runs the modules (default: the one running the tests).
    A failed task ends the play, so it is the last result. Raises AnsibleRunError when there is
    no JSON report.
    """
    workdir = Path(tempfile.mkdtemp(prefix="pitr-play-"))
    try:
        (workdir / "playbook.yml").write_text(playbook, encoding="utf-8")
        (workdir / "inventory.ini").write_text(
            f"{HOST} ansible_connection=local"
            f" ansible_python_interpreter={interpreter or sys.executable}\n",
            encoding="utf-8",
        )
        argv = [
            str(Path(sys.executable).parent / "ansible-playbook"),
            "-i",
            str(workdir / "inventory.ini"),
            str(workdir / "playbook.yml"),
        ]
        if check:
            argv.append("--check")
        if diff:
            argv.append("--diff")
        proc = subprocess.run(
            argv,
            cwd=workdir,
            env=_environment(env),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    try:
        report = json.loads(proc.stdout)
    except json.JSONDecodeError as exc:
        raise AnsibleRunError(
            f"ansible-playbook exited {proc.returncode} without a JSON report\n"
            f"stdout: {proc.stdout[-4000:]}\nstderr: {proc.stderr[-4000:]}"
        ) from exc
    results = []
    for play in report.get("plays", []):
        for task in play.get("tasks", []):
            host_result = task.get("hosts", {}).get(HOST)
            if host_result is not None:
                results.append(TaskResult(task["task"]["name"], host_result))
    return results


def run_tasks(
    tasks: t.Sequence[t.Mapping[str, t.Any]],
    *,
    check: bool = False,
    diff: bool = False,
    env: t.Mapping[str, str] | None = None,
    interpreter: str | None = None,
) -> list[TaskResult]:
    """Run tasks (dicts, as in a playbook) in one play on localhost.

    The playbook is written as JSON (which is YAML), so string values reach the module as the
    strings given: no YAML boolean or number conversion.
    """
    play = [{"name": "pitr.postgresql integration test", "hosts": HOST, "tasks": list(tasks)}]
    return run_playbook_text(
        json.dumps(play, indent=2), check=check, diff=diff, env=env, interpreter=interpreter
    )


def run_module(
    module: str,
    args: t.Mapping[str, t.Any],
    *,
    check: bool = False,
    diff: bool = False,
    env: t.Mapping[str, str] | None = None,
    interpreter: str | None = None,
) -> TaskResult:
    """Run one module once; return its result (failed or not)."""
    results = run_tasks(
        [{"name": f"run {module}", module: dict(args)}],
        check=check,
        diff=diff,
        env=env,
        interpreter=interpreter,
    )
    if len(results) != 1:
        raise AnsibleRunError(f"expected one task result, got {len(results)}: {results!r}")
    return results[0]

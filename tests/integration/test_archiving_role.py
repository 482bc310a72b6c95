# Copyright: contributors to pitr.postgresql
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The archiving role, run for real: ``ansible-playbook playbooks/setup_archiving.yml``.

Each test runs the playbook against localhost (connection local) and a scratch PostgreSQL
cluster started with pg_ctl, so the role restarts it with ``archiving_restart_method: pg_ctl``.
The collection is a snapshot of the checkout taken once per session (what an installed
collection looks like), so edits made to the working tree while the tests run cannot make a
second run look non-idempotent.
The Debian ``postgresql@VERSION-main`` (systemd) path is covered by the Molecule scenario.

Needs root: the role installs root-owned files and becomes the ``postgres`` user.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time
import typing as t
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from ansible_runner import collections_path, run_as_user
from pgcluster import PgCluster, give_to_server_user

ROOT = Path(__file__).resolve().parents[2]
COLLECTION_CONTENT = ("galaxy.yml", "meta", "plugins", "playbooks", "roles")
HOST_PYTHON = "/usr/bin/python3"

if str(collections_path()) not in sys.path:
    sys.path.append(collections_path())

from ansible_collections.pitr.postgresql.plugins.module_utils.hostcmd import (  # noqa: E402
    archive_command_for,
)
from ansible_collections.pitr.postgresql.plugins.module_utils.repository import (  # noqa: E402
    Repository,
)
from ansible_collections.pitr.postgresql.plugins.module_utils.version import (  # noqa: E402
    VERSION,
)

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="the archiving role installs root-owned files: run as root"
)

RECAP = re.compile(
    r"^(?P<host>\S+)\s*:\s*ok=(?P<ok>\d+)\s+changed=(?P<changed>\d+)\s+"
    r"unreachable=(?P<unreachable>\d+)\s+failed=(?P<failed>\d+)",
    re.MULTILINE,
)
PROOF = re.compile(r"Archiving works: WAL segment (?P<segment>[0-9A-F]{24}) was archived")


@dataclass
class PlaybookRun:
    rc: int
    output: str

    @property
    def recap(self) -> dict[str, int]:
        """The PLAY RECAP line of localhost as numbers."""
        found = [m for m in RECAP.finditer(self.output) if m["host"] == "localhost"]
        assert len(found) == 1, f"no single PLAY RECAP line for localhost in:\n{self.output}"
        return {k: int(v) for k, v in found[0].groupdict().items() if k != "host"}

    @property
    def proven_segment(self) -> str:
        match = PROOF.search(self.output)
        assert match, f"the role did not report its proof:\n{self.output[-6000:]}"
        return match["segment"]

    def changed_tasks(self) -> list[str]:
        """The task headers followed by a 'changed' line (for failure messages)."""
        sections = re.split(r"^(?=TASK \[|RUNNING HANDLER \[)", self.output, flags=re.MULTILINE)
        return [
            section.split(" *", 1)[0]
            for section in sections
            if section.startswith(("TASK [", "RUNNING HANDLER ["))
            and re.search(r"^changed:", section, re.MULTILINE)
        ]

    def handler_ran(self, name: str) -> bool:
        """True when the handler ran and reported a change (not skipped)."""
        pattern = rf"RUNNING HANDLER \[[^\]]*: {re.escape(name)}\] \*+\nchanged:"
        return re.search(pattern, self.output) is not None


def run_playbook(
    playbook: str, inventory: Path, collections: Path, *, check: bool = False
) -> PlaybookRun:
    """``ansible-playbook -i INVENTORY PLAYBOOK`` (``--check --diff`` with ``check``) with the
    collections under ``collections``."""
    args = ["-i", str(inventory), playbook] + (["--check", "--diff"] if check else [])
    return PlaybookRun(*run_as_user(args, collections=str(collections), timeout=240))


class RoleTarget:
    """A scratch cluster plus where the role puts the command and the repository."""

    def __init__(self, cluster: PgCluster, workdir: Path, collections: Path) -> None:
        self.cluster = cluster
        self.collections = collections
        self.collection = collections / "ansible_collections" / "pitr" / "postgresql"
        self.workdir = workdir
        self.prefix = workdir / "prefix"
        self.repository = cluster.basedir / "repository"
        self.inventory = workdir / "inventory.yml"

    @property
    def program(self) -> str:
        return str(self.prefix / "bin" / "pitr-wal")

    def host_vars(self) -> dict[str, t.Any]:
        return {
            "ansible_connection": "local",
            "ansible_python_interpreter": HOST_PYTHON,
            "pitr_repository_path": str(self.repository),
            "pitr_install_prefix": str(self.prefix),
            "archiving_login_unix_socket": str(self.cluster.sockdir),
            "archiving_login_port": self.cluster.port,
            "archiving_restart_method": "pg_ctl",
            "archiving_pg_bindir": self.cluster.bindir,
            "archiving_pg_ctl_log_file": str(self.cluster.logfile),
        }

    def run(
        self,
        *,
        check: bool = False,
        fqcn: bool = False,
        extra: dict[str, t.Any] | None = None,
    ) -> PlaybookRun:
        """Run the playbook (by path, or by its collection name with ``fqcn``)."""
        hostvars = {**self.host_vars(), **(extra or {})}
        inventory = {"postgresql": {"hosts": {"localhost": hostvars}}}
        self.inventory.write_text(json.dumps(inventory, indent=2), encoding="utf-8")
        playbook = (
            "pitr.postgresql.setup_archiving"
            if fqcn
            else str(self.collection / "playbooks" / "setup_archiving.yml")
        )
        return run_playbook(playbook, self.inventory, self.collections, check=check)

    # what the server and the disk say ----------------------------------------------------
    def start_time(self) -> t.Any:
        return self.cluster.scalar("SELECT pg_postmaster_start_time()")

    def settings(self) -> dict[str, tuple[str, bool]]:
        """Running value and pending_restart of the four archiving settings."""
        rows = self.cluster.sql(
            "SELECT name, setting, pending_restart FROM pg_settings WHERE name IN"
            " ('wal_level', 'archive_mode', 'archive_command', 'archive_timeout')"
        )
        return {str(name): (str(value), bool(pending)) for name, value, pending in rows}

    def expected_archive_command(self) -> str:
        """What hostcmd (the one Python implementation) builds for the role's defaults."""
        return archive_command_for(
            program=self.program,
            repo=str(self.repository),
            python=HOST_PYTHON,
            compress="auto",
            timeout=60,
        )

    def fetch(self, segment: str, dest: Path) -> subprocess.CompletedProcess[str]:
        """``pitr-wal fetch`` as the server's OS user, the way restore_command would."""
        argv = [HOST_PYTHON, "-I", "-S", self.program, "--repo", str(self.repository)]
        argv += ["fetch", segment, str(dest)]
        return subprocess.run(
            ["runuser", "-u", self.cluster.os_user, "--", *argv],
            capture_output=True,
            text=True,
            check=False,
            cwd="/",
        )


MakeRoleTarget = t.Callable[..., RoleTarget]


@pytest.fixture(scope="session")
def collection_snapshot(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the collection as ``DIR/ansible_collections/pitr/postgresql``; returns DIR."""
    collections = tmp_path_factory.mktemp("collections")
    collection = collections / "ansible_collections" / "pitr" / "postgresql"
    collection.mkdir(parents=True)
    for name in COLLECTION_CONTENT:
        source = ROOT / name
        if source.is_dir():
            ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
            shutil.copytree(source, collection / name, symlinks=True, ignore=ignore)
        else:
            shutil.copy2(source, collection / name)
    return collections


@pytest.fixture
def make_role_target(
    make_pg_cluster: t.Callable[..., PgCluster], collection_snapshot: Path
) -> t.Iterator[MakeRoleTarget]:
    """Factory: ``make_role_target(conf=None)``: a started scratch cluster for the role."""
    workdirs: list[Path] = []

    def make(conf: dict[str, str] | None = None) -> RoleTarget:
        workdir = Path(tempfile.mkdtemp(prefix="pitr-role-"))
        workdirs.append(workdir)
        workdir.chmod(0o755)  # the postgres user must reach the installed command
        return RoleTarget(make_pg_cluster(conf=conf), workdir, collection_snapshot)

    yield make
    for workdir in workdirs:
        shutil.rmtree(workdir, ignore_errors=True)


def wait_until_archived(repo: Repository, segment: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while repo.wal_header(segment) is None:
        assert time.monotonic() < deadline, f"{segment} not archived within {timeout} s"
        time.sleep(0.2)


def mode_and_owner(path: Path) -> tuple[str, int]:
    st = path.lstat()
    return oct(stat.S_IMODE(st.st_mode)), st.st_uid


@pytest.mark.timeout(900)  # three playbook runs
def test_check_mode_then_converge_then_nothing_to_change(make_role_target: MakeRoleTarget) -> None:
    target = make_role_target()
    cluster = target.cluster
    started = target.start_time()
    settings_before = target.settings()
    auto_conf_before = cluster.auto_conf()
    assert settings_before["archive_mode"] == ("off", False)

    # 1. Check mode before the first converge: predicts changes, changes nothing.
    run = target.run(check=True)
    assert run.rc == 0, run.output
    assert run.recap["failed"] == 0
    assert run.recap["changed"] > 0, "check mode predicted no change on an unconfigured server"
    assert "the end-to-end proof" in run.output and "is skipped" in run.output
    assert target.start_time() == started, "check mode restarted the server"
    assert target.settings() == settings_before
    assert cluster.auto_conf() == auto_conf_before
    assert not target.prefix.exists(), "check mode installed the command"
    assert not target.repository.exists(), "check mode created the repository"

    # 2. Converge (the playbook by path): settings, restart for archive_mode, proof.
    run = target.run()
    assert run.rc == 0, run.output
    assert run.recap["failed"] == 0 and run.recap["changed"] > 0
    settings = target.settings()
    assert settings["archive_mode"] == ("on", False)
    assert settings["wal_level"] == ("replica", False)
    assert settings["archive_command"] == (target.expected_archive_command(), False)
    assert cluster.show("archive_timeout") == "1min"
    assert run.handler_ran("Restart PostgreSQL with pg_ctl"), run.output
    restarted = target.start_time()
    assert restarted > started, "archive_mode changed but the server was not restarted"

    # The command is installed root-owned and readable, the version behind lib/current.
    lib = target.prefix / "lib"
    assert os.readlink(lib / "current") == VERSION
    package = lib / VERSION / "ansible_collections" / "pitr" / "postgresql" / "plugins"
    for directory in (target.prefix, target.prefix / "bin", lib, package / "module_utils"):
        assert mode_and_owner(directory) == ("0o755", 0), directory
    for level in (package.parents[2], package.parents[1], package.parents[0], package):
        assert mode_and_owner(level / "__init__.py") == ("0o644", 0), level
    sources = sorted((target.collection / "plugins" / "module_utils").glob("*.py"))
    assert len(sources) > 5
    pycache = package / "module_utils" / "__pycache__"
    assert mode_and_owner(pycache) == ("0o755", 0)  # precompiled: postgres cannot write here
    for source in sources:
        installed = package / "module_utils" / source.name
        assert mode_and_owner(installed) == ("0o644", 0), installed
        assert installed.read_bytes() == source.read_bytes(), installed
        compiled = pycache / f"{installed.stem}.{sys.implementation.cache_tag}.pyc"
        assert mode_and_owner(compiled) == ("0o644", 0), compiled
    # Installed from one archive, atomically: the content record, no temporary tree left.
    record = json.loads((lib / VERSION / ".pitr-lib.json").read_text(encoding="utf-8"))
    assert sorted(record["files"]) == sorted(
        str(p.relative_to(lib / VERSION)) for p in (lib / VERSION).rglob("*.py")
    )
    assert sorted(p.name for p in lib.iterdir()) == [
        f".module_utils-{VERSION}.tar.gz",
        VERSION,
        "current",
    ]
    assert mode_and_owner(Path(target.program)) == ("0o755", 0)
    version = subprocess.run(
        [target.program, "version"], capture_output=True, text=True, check=False
    )
    assert (version.returncode, version.stdout.strip()) == (0, VERSION), version.stderr

    # The repository belongs to postgres, mode 0700, and to this cluster.
    pw_uid = Path(cluster.datadir).stat().st_uid
    assert mode_and_owner(target.repository) == ("0o700", pw_uid)
    repo = Repository.open_posix(str(target.repository))
    identity = repo.identity()
    assert identity is not None
    sysid = cluster.scalar("SELECT system_identifier FROM pg_control_system()")
    assert (identity.system_identifier, identity.pg_major) == (int(sysid), 15)
    assert repo.wal_header(run.proven_segment) is not None

    # 3. Second run (the playbook by its collection name): nothing changes, no restart,
    # and the proof runs again on a new segment.
    first_proof = run.proven_segment
    run = target.run(fqcn=True)
    assert run.rc == 0, run.output
    assert run.recap["changed"] == 0, f"second run changed {run.changed_tasks()}:\n{run.output}"
    assert run.recap["failed"] == 0
    assert not run.handler_ran("Restart PostgreSQL with pg_ctl")
    assert target.start_time() == restarted, "the second run restarted the server"
    assert run.proven_segment > first_proof
    assert repo.wal_header(run.proven_segment) is not None

    # 4. A WAL switch forced now reaches the repository and fetches back byte for byte.
    segment = cluster.switch_wal()
    original = (cluster.datadir / "pg_wal" / segment).read_bytes()
    wait_until_archived(repo, segment)
    scratch = Path(tempfile.mkdtemp(prefix="pitr-fetch-", dir=cluster.basedir))
    give_to_server_user(scratch)
    fetched = target.fetch(segment, scratch / segment)
    assert fetched.returncode == 0, fetched.stderr
    assert (scratch / segment).read_bytes() == original
    failed_count = cluster.scalar("SELECT failed_count FROM pg_stat_archiver")
    assert failed_count == 0


def test_no_restart_when_archive_mode_is_already_on(make_role_target: MakeRoleTarget) -> None:
    target = make_role_target(conf={"archive_mode": "on"})
    started = target.start_time()

    run = target.run()

    assert run.rc == 0, run.output
    assert not run.handler_ran("Restart PostgreSQL with pg_ctl"), run.output
    assert target.start_time() == started, "restarted although only archive_command changed"
    assert target.settings()["archive_command"] == (target.expected_archive_command(), False)
    assert Repository.open_posix(str(target.repository)).wal_header(run.proven_segment)


def test_restart_not_allowed_stops_with_the_settings_written(
    make_role_target: MakeRoleTarget,
) -> None:
    target = make_role_target()
    cluster = target.cluster
    started = target.start_time()

    run = target.run(extra={"archiving_restart_allowed": False})

    assert run.rc != 0 and run.recap["failed"] == 1, run.output
    assert "archiving_restart_allowed is false" in run.output
    assert target.start_time() == started
    assert target.settings()["archive_mode"] == ("off", True)  # written, waiting for restart
    assert "archive_mode = 'on'" in cluster.auto_conf()
    assert "Archiving works" not in run.output


def test_proof_fails_with_the_archive_info_reasons(make_role_target: MakeRoleTarget) -> None:
    target = make_role_target(conf={"archive_mode": "on"})
    cluster = target.cluster
    # A repository whose WAL area cannot be created: every push fails.
    target.repository.mkdir(mode=0o700)
    give_to_server_user(target.repository)
    (target.repository / "wal").write_text("not a directory\n")

    run = target.run(extra={"archiving_prove_timeout": 10})

    assert run.rc != 0 and run.recap["failed"] == 1, run.output
    assert "did not reach" in run.output
    assert "archive_info reasons: failing" in run.output, run.output[-4000:]
    assert cluster.scalar("SELECT failed_count FROM pg_stat_archiver") > 0


def test_argument_specs_document_every_default() -> None:
    """meta/argument_specs.yml and defaults/main.yml name the same variables and defaults."""
    role = ROOT / "roles" / "archiving"
    defaults = yaml.safe_load((role / "defaults" / "main.yml").read_text(encoding="utf-8"))
    specs = yaml.safe_load((role / "meta" / "argument_specs.yml").read_text(encoding="utf-8"))
    options = specs["argument_specs"]["main"]["options"]
    assert sorted(options) == sorted(defaults)
    for name, spec in options.items():
        assert spec.get("default") == defaults[name], name
        assert spec.get("description"), name


def test_install_entry_point_documents_its_variables_with_the_role_defaults() -> None:
    """The ``install`` entry point (tasks_from: install) validates the variables it uses."""
    role = ROOT / "roles" / "archiving"
    defaults = yaml.safe_load((role / "defaults" / "main.yml").read_text(encoding="utf-8"))
    specs = yaml.safe_load((role / "meta" / "argument_specs.yml").read_text(encoding="utf-8"))
    options = specs["argument_specs"]["install"]["options"]
    install_tasks = (role / "tasks" / "install.yml").read_text(encoding="utf-8")
    used = set(re.findall(r"\b((?:pitr|archiving)_[a-z_]+)\b", install_tasks))
    assert sorted(options) == sorted(used)
    for name, spec in options.items():
        assert spec.get("default") == defaults[name], name
        assert spec.get("description"), name


# Keeping a bounded number of installed versions -------------------------------------------

OLDER_VERSIONS = ("0.0.9", "0.0.10")  # installed in this order: by name, 0.0.9 sorts newer
HOUR = 3600


def versioned_collection(snapshot: Path, version: str, dest: Path) -> Path:
    """A copy of the collection snapshot whose version.py says ``version``; returns the
    collections directory. The role installs it exactly as it installs a real release."""
    collection = dest / "ansible_collections" / "pitr" / "postgresql"
    shutil.copytree(snapshot / "ansible_collections" / "pitr" / "postgresql", collection)
    version_py = collection / "plugins" / "module_utils" / "version.py"
    text = version_py.read_text(encoding="utf-8")
    assert f'VERSION = "{VERSION}"' in text
    version_py.write_text(text.replace(f'VERSION = "{VERSION}"', f'VERSION = "{version}"'))
    return dest


class InstallTarget:
    """A scratch prefix that the ``install`` entry point (install_host_command.yml) fills."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.prefix = workdir / "prefix"
        self.lib = self.prefix / "lib"
        self.inventory = workdir / "inventory.yml"

    def install(
        self, collections: Path, *, check: bool = False, keep: int | str | None = None
    ) -> PlaybookRun:
        hostvars: dict[str, t.Any] = {
            "ansible_connection": "local",
            "ansible_python_interpreter": HOST_PYTHON,
            "pitr_install_prefix": str(self.prefix),
            "archiving_install_packages": False,  # not what these tests are about
        }
        if keep is not None:
            hostvars["pitr_install_keep_versions"] = keep
        inventory = {"postgresql": {"hosts": {"localhost": hostvars}}}
        self.inventory.write_text(json.dumps(inventory, indent=2), encoding="utf-8")
        playbook = collections / "ansible_collections" / "pitr" / "postgresql" / "playbooks"
        return run_playbook(
            str(playbook / "install_host_command.yml"), self.inventory, collections, check=check
        )

    def listing(self) -> list[str]:
        return sorted(p.name for p in self.lib.iterdir())

    def current(self) -> str:
        return os.readlink(self.lib / "current")

    def version(self) -> subprocess.CompletedProcess[str]:
        """``pitr-wal version`` as installed (through lib/current)."""
        return subprocess.run(
            [str(self.prefix / "bin" / "pitr-wal"), "version"],
            capture_output=True,
            text=True,
            check=False,
        )


def set_age(path: Path, seconds: float) -> None:
    when = time.time() - seconds
    os.utime(path, (when, when), follow_symlinks=False)


@pytest.fixture
def install_target() -> t.Iterator[InstallTarget]:
    workdir = Path(tempfile.mkdtemp(prefix="pitr-install-"))
    workdir.chmod(0o755)
    yield InstallTarget(workdir)
    shutil.rmtree(workdir, ignore_errors=True)


def removal_task_changed(run: PlaybookRun) -> bool:
    return any("Remove the installed versions beyond" in task for task in run.changed_tasks())


@pytest.mark.timeout(900)  # six playbook runs
def test_installs_keep_the_newest_versions_by_install_time(
    install_target: InstallTarget, collection_snapshot: Path
) -> None:
    target, lib = install_target, install_target.lib
    assert VERSION not in OLDER_VERSIONS
    older = {
        v: versioned_collection(collection_snapshot, v, target.workdir / f"collection-{v}")
        for v in OLDER_VERSIONS
    }

    # Two older versions, installed by the role itself, one after the other.
    for number, old in enumerate(OLDER_VERSIONS):
        run = target.install(older[old])
        assert run.rc == 0 and run.recap["failed"] == 0, run.output
        assert target.current() == old
        assert (target.version().returncode, target.version().stdout.strip()) == (0, old)
        set_age(lib / old, (len(OLDER_VERSIONS) - number) * HOUR)  # install times, explicit
        assert not removal_task_changed(run), run.output  # at most 2 so far
    assert target.listing() == [".module_utils-0.0.10.tar.gz", "0.0.10", "0.0.9", "current"]

    # What is not a version tree of the role stays: an unknown directory, a tree without the
    # role's record, the temporary tree of an install running now. An hour-old temporary
    # tree is a leftover of an interrupted install and goes.
    (lib / "local-notes").mkdir()
    shutil.copytree(lib / "0.0.9", lib / "0.0.1")
    (lib / "0.0.1" / ".pitr-lib.json").unlink()
    set_age(lib / "0.0.1", 5 * HOUR)
    (lib / ".new-0.1.0-running").mkdir()
    (lib / ".new-0.0.8-crashed").mkdir()
    set_age(lib / ".new-0.0.8-crashed", 2 * HOUR)
    before = target.listing()

    # Check mode: reports what it would remove, removes nothing, the link stays.
    run = target.install(collection_snapshot, check=True)
    assert run.rc == 0 and run.recap["failed"] == 0, run.output
    assert removal_task_changed(run), run.output
    assert f"versions removed from {lib}: 0.0.9" in run.output, run.output
    assert "leftovers removed: .module_utils-0.0.10.tar.gz, .new-0.0.8-crashed" in run.output, (
        run.output
    )
    assert f"versions kept, newest first: {VERSION}, 0.0.10" in run.output, run.output
    assert target.listing() == before
    assert target.current() == "0.0.10"

    # The newest version, for real: 0.0.9 (the older install, the greater name) goes.
    run = target.install(collection_snapshot)
    assert run.rc == 0 and run.recap["failed"] == 0, run.output
    assert removal_task_changed(run), run.output
    assert target.current() == VERSION
    assert (target.version().returncode, target.version().stdout.strip()) == (0, VERSION)
    assert target.listing() == [
        f".module_utils-{VERSION}.tar.gz",
        ".new-0.1.0-running",
        "0.0.1",
        "0.0.10",
        VERSION,
        "current",
        "local-notes",
    ]
    # The tree before it is whole: a rollback by re-pointing the link works.
    assert json.loads((lib / "0.0.10" / ".pitr-lib.json").read_text(encoding="utf-8"))["files"]

    # Again: nothing to change.
    run = target.install(collection_snapshot)
    assert run.rc == 0 and run.recap["changed"] == 0, run.changed_tasks()

    # One version kept: only the one in use stays, and it keeps working.
    run = target.install(collection_snapshot, keep=1)
    assert run.rc == 0 and removal_task_changed(run), run.output
    assert "0.0.10" not in target.listing() and VERSION in target.listing()
    assert (target.version().returncode, target.version().stdout.strip()) == (0, VERSION)

    # Fewer than one: refused with the fix named, before anything changes.
    before = target.listing()
    run = target.install(collection_snapshot, keep=0)
    assert run.rc != 0 and run.recap["failed"] == 1, run.output
    assert "pitr_install_keep_versions (0) must be a whole number of at least 1" in run.output
    assert target.listing() == before

# Copyright: contributors to pitr.postgresql
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Logical dumps on real PostgreSQL 15: logical_dump, dump_restore and dump_info through
ansible-playbook, and the logical_dump / restore_dump roles through their playbooks.

One scratch cluster for the file, with a database ``shop`` that has what dumps get wrong:
serial and identity sequences, a partitioned table, an unlogged table, names that need
quoting, a view, a materialized view, an extension, large objects referenced from a table,
and a table big enough that a file cut in half is cut in its data. Every test uses its own
labels and target databases. Restores are compared row by row (count and md5 of the ordered
rows of every table, md5 of every large object), not by the modules' answers.
"""

from __future__ import annotations

import hashlib
import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import typing as t
from pathlib import Path

import psycopg
import pytest
from ansible_runner import TaskResult, collections_path, run_module
from pgcluster import PgCluster, give_to_server_user

ROOT = Path(__file__).resolve().parents[2]
if str(collections_path()) not in sys.path:
    sys.path.append(collections_path())

from ansible_collections.pitr.postgresql.plugins.module_utils import dumps  # noqa: E402
from ansible_collections.pitr.postgresql.plugins.module_utils.repository import (  # noqa: E402
    Repository,
    RepositoryIdentity,
)

DUMP = "pitr.postgresql.logical_dump"
RESTORE = "pitr.postgresql.dump_restore"
INFO = "pitr.postgresql.dump_info"
HOST_PYTHON = "/usr/bin/python3"
TABLES = (
    "public.items",
    "sales.orders",
    "public.cache",
    "public.events",
    '"odd schema"."my table"',
    "public.big",
    "public.mv_items",
)
SHOP_SQL = [
    "CREATE EXTENSION pgcrypto",
    "CREATE SCHEMA sales",
    'CREATE SCHEMA "odd schema"',
    "CREATE TABLE public.items (id serial PRIMARY KEY, name text NOT NULL, price numeric)",
    "CREATE TABLE sales.orders (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,"
    " item int REFERENCES public.items (id), qty int, doc oid)",
    "CREATE UNLOGGED TABLE public.cache (k text PRIMARY KEY, v text)",
    "CREATE TABLE public.events (at date, what text) PARTITION BY RANGE (at)",
    "CREATE TABLE public.events_2026 PARTITION OF public.events"
    " FOR VALUES FROM ('2026-01-01') TO ('2027-01-01')",
    'CREATE TABLE "odd schema"."my table" ("Odd Col" int, note text)',
    "CREATE TABLE public.big (id int PRIMARY KEY, payload text)",
    "CREATE VIEW public.v_items AS SELECT id, name FROM public.items",
    "INSERT INTO public.items (name, price) SELECT 'item ' || g, g * 1.5"
    " FROM generate_series(1, 2000) g",
    "INSERT INTO sales.orders (item, qty, doc) SELECT g, g,"
    " lo_from_bytea(0, convert_to(repeat(md5(g::text), 200 * g), 'UTF8'))"
    " FROM generate_series(1, 12) g",
    "INSERT INTO public.cache SELECT 'k' || g, md5(g::text) FROM generate_series(1, 100) g",
    "INSERT INTO public.events SELECT date '2026-01-01' + g, 'e' || g"
    " FROM generate_series(0, 300) g",
    """INSERT INTO "odd schema"."my table" VALUES (1, E'tab\\there'), (2, 'quote '' and ;')""",
    # random-looking text, so that the dump is large and its data does not compress away
    "INSERT INTO public.big SELECT g, md5(g::text) || md5((g * 7)::text) || md5((g * 13)::text)"
    " FROM generate_series(1, 120000) g",
    "CREATE MATERIALIZED VIEW public.mv_items AS SELECT id, price FROM public.items WHERE id < 50",
]


class Env(t.NamedTuple):
    cluster: PgCluster
    repo_path: Path
    repo: Repository

    def params(self, **extra: t.Any) -> dict[str, t.Any]:
        return {
            **self.cluster.module_params,
            "login_db": "postgres",
            "repository_path": str(self.repo_path),
            **extra,
        }


def init_repository(cluster: PgCluster, path: Path) -> Repository:
    """What the archiving role leaves: a repository with this cluster's identity."""
    path.mkdir()
    repo = Repository.open_posix(str(path))
    sysid = int(cluster.scalar("SELECT system_identifier FROM pg_control_system()"))
    repo.ensure_identity(RepositoryIdentity(sysid, 15, 16 * 1024 * 1024))
    return repo


@pytest.fixture(scope="module")
def env() -> t.Iterator[Env]:
    base = Path(tempfile.mkdtemp(prefix="pitr-dump-"))
    cluster = PgCluster.create()
    try:
        cluster.start()
        cluster.sql("CREATE DATABASE shop")
        with psycopg.connect(**{**cluster.conninfo, "dbname": "shop"}, autocommit=True) as conn:
            for statement in SHOP_SQL:
                conn.execute(statement.encode())
        repo_path = base / "repo"
        yield Env(cluster, repo_path, init_repository(cluster, repo_path))
    finally:
        cluster.destroy()
        shutil.rmtree(base, ignore_errors=True)


def dump(env: Env, check: bool = False, **args: t.Any) -> TaskResult:
    return run_module(DUMP, env.params(**args), check=check)


def restore(env: Env, check: bool = False, **args: t.Any) -> TaskResult:
    return run_module(RESTORE, env.params(**args), check=check)


def fingerprint(cluster: PgCluster, database: str) -> dict[str, t.Any]:
    """Row count and md5 of the ordered rows of every table, and md5 of every large object."""
    out: dict[str, t.Any] = {}
    with psycopg.connect(**{**cluster.conninfo, "dbname": database}) as conn:
        for table in TABLES:
            row = conn.execute(
                f"SELECT count(*), md5(coalesce(string_agg(t::text, E'\\n' ORDER BY t::text), ''))"
                f" FROM {table} t".encode()
            ).fetchone()
            out[table] = tuple(row) if row else None
        row = conn.execute(
            b"SELECT count(*), md5(coalesce(string_agg(oid::text || ':' || md5(lo_get(oid)), ','"
            b" ORDER BY oid), '')) FROM pg_largeobject_metadata"
        ).fetchone()
        out["large objects"] = tuple(row) if row else None
        out["sequences"] = conn.execute(
            b"SELECT last_value FROM public.items_id_seq UNION ALL"
            b" SELECT last_value FROM sales.orders_id_seq"
        ).fetchall()
    return out


def databases(cluster: PgCluster) -> set[str]:
    return {str(r[0]) for r in cluster.sql("SELECT datname FROM pg_database")}


def dump_dir(env: Env, label: str) -> Path:
    return env.repo_path / "dumps" / label


def only(result: TaskResult) -> dict[str, t.Any]:
    assert len(result["dumps"]) == 1, result.result
    return t.cast(dict[str, t.Any], result["dumps"][0])


# ------------------------------------------------------------------------------------------------


def test_check_mode_shows_the_argv_and_changes_nothing(env: Env) -> None:
    before = sorted(str(p) for p in env.repo_path.rglob("*"))
    result = dump(env, check=True, databases=["shop"], label="check")
    assert not result.failed, result.msg
    assert result.changed
    (cmd,) = result["cmds"]
    assert cmd[0].endswith("/pg_dump")
    assert "--format=custom" in cmd and "--blobs" in cmd and "--dbname=shop" in cmd
    assert f"--snapshot={dumps.SNAPSHOT_PLACEHOLDER}" in cmd
    planned = only(result)["record"]
    assert planned["status"] == "running"
    objects = planned["verification"]["objects"]
    assert objects["tables"]["expected"] == 7
    assert objects["large_objects"]["expected"] == 12
    after = sorted(str(p) for p in env.repo_path.rglob("*"))
    assert after == before  # not even a staging directory or a lock file

    restore_check = restore(env, check=True, label="check-shop", target_database="x")
    assert restore_check.failed and "no dump labelled" in restore_check.msg


def test_dump_verify_restore_into_a_new_database_and_compare(env: Env) -> None:
    result = dump(env, databases=["shop"], label="rt")
    assert not result.failed, result.get("stderr", result.msg)
    assert result.changed and result["usable"]
    entry = only(result)
    assert entry["label"] == "rt-shop"
    # the catalog on disk, not only the answer
    record = dumps.read_dump(env.repo, "rt-shop")
    assert record is not None and dumps.usable(record)
    assert record.format == "custom" and record.scope == "database" and record.run == "rt"
    archive = dump_dir(env, "rt-shop") / "database.dump"
    assert record.checksum == hashlib.sha256(archive.read_bytes()).hexdigest()
    assert (
        dump_dir(env, "rt-shop") / "SHA256SUMS"
    ).read_text() == f"{record.checksum}  database.dump\n"
    assert record.files == ["SHA256SUMS", "database.dump"]
    assert record.size == sum((dump_dir(env, "rt-shop") / f).stat().st_size for f in record.files)
    assert oct(archive.stat().st_mode & 0o777) == "0o600"
    objects = record.verification["objects"]
    assert objects["tables"] == {"expected": 7, "found": 7}
    assert objects["large_objects"] == {"expected": 12, "found": 12}
    assert record.database_properties["encoding"] == "UTF8"
    assert not list((env.repo_path / "staging" / "dumps").iterdir())

    again = dump(env, databases=["shop"], label="rt")
    assert not again.failed and not again.changed

    # restore: check mode first, then for real, then again
    planned = restore(env, check=True, label="rt-shop", target_database="shop_rt")
    assert not planned.failed, planned.msg
    assert planned.changed
    assert planned["cmd"][-1] == str(archive)
    assert "--exit-on-error" in planned["cmd"] and "--clean" not in planned["cmd"]
    assert planned["queries"][0].startswith('CREATE DATABASE "shop_rt" TEMPLATE template0')
    assert "shop_rt" not in databases(env.cluster)

    restored = restore(env, database="shop", target_database="shop_rt")
    assert not restored.failed, restored.get("stderr", restored.msg)
    assert restored.changed and restored["label"] == "rt-shop"
    assert restored["restored_objects"]["tables"] == {"expected": 7, "found": 7}
    original = fingerprint(env.cluster, "shop")
    assert original["public.big"][0] == 120000
    assert original["large objects"][0] == 12
    assert fingerprint(env.cluster, "shop_rt") == original

    second = restore(env, database="shop", target_database="shop_rt")
    assert not second.failed and not second.changed, second.msg


def test_parallel_directory_format(env: Env) -> None:
    result = dump(env, databases=["shop"], label="par", format="directory", jobs=2)
    assert not result.failed, result.get("stderr", result.msg)
    assert "--jobs=2" in result["cmds"][0] and "--format=directory" in result["cmds"][0]
    record = dumps.read_dump(env.repo, "par-shop")
    assert record is not None and dumps.usable(record) and record.jobs == 2
    data_files = [f for f in record.files if f.startswith("database.dir/") and f.endswith(".gz")]
    assert len(data_files) >= 6
    sums = (dump_dir(env, "par-shop") / "SHA256SUMS").read_text()
    assert record.checksum == hashlib.sha256(sums.encode()).hexdigest()
    assert len(sums.splitlines()) == len(record.files) - 1

    restored = restore(env, label="par-shop", target_database="shop_par", jobs=2)
    assert not restored.failed, restored.get("stderr", restored.msg)
    assert "--jobs=2" in restored["cmd"]
    assert fingerprint(env.cluster, "shop_par") == fingerprint(env.cluster, "shop")


def test_a_truncated_dump_is_detected_and_never_restored(env: Env, tmp_path: Path) -> None:
    result = dump(env, databases=["shop"], label="cut")
    assert not result.failed, result.msg
    healthy = dump(env, label="cut-shop", state="verified")
    assert not healthy.failed and not healthy.changed, healthy.msg
    archive = dump_dir(env, "cut-shop") / "database.dump"
    size = archive.stat().st_size
    assert size > 1_000_000
    with open(archive, "r+b") as fh:
        fh.truncate(size // 2)

    # pg_restore --list alone does not notice: the table of contents is intact
    listed = subprocess.run(
        [env.cluster.bin("pg_restore"), "--list", str(archive)], capture_output=True, check=False
    )
    assert listed.returncode == 0

    refused = restore(env, label="cut-shop", target_database="shop_cut")
    assert refused.failed and "fails its checksum" in refused.msg, refused.msg
    assert "shop_cut" not in databases(env.cluster)

    # the verification without the checksum: pg_restore's full read fails on its own
    report = dumps.verify_archive(
        str(dump_dir(env, "cut-shop")),
        "custom",
        "shop",
        {"tables": 7},
        pg_restore=dumps.find_tool("pg_restore", env.cluster.bindir),
    )
    assert not report.ok and "does not read to its end" in report.message

    verified = dump(env, label="cut-shop", state="verified")
    assert verified.failed and verified.changed
    record = dumps.read_dump(env.repo, "cut-shop")
    assert record is not None and record.status == "failed" and not dumps.usable(record)
    assert "fails its checksum" in record.verification["message"]

    unusable = restore(env, label="cut-shop", target_database="shop_cut", verify_checksum=False)
    assert unusable.failed and "not usable" in unusable.msg
    info = run_module(INFO, {"repository_path": str(env.repo_path), "database": "shop"})
    assert info["latest_usable"].get("shop") != "cut-shop"


def test_every_database_and_the_globals(env: Env) -> None:
    env.cluster.sql("CREATE DATABASE crm")
    env.cluster.sql("CREATE ROLE app_reader LOGIN PASSWORD 'not-in-argv'")
    result = dump(env, all_databases=True, label="all")
    assert not result.failed, result.get("stderr", result.msg)
    labels = set(result["labels"])
    assert {"all-shop", "all-crm", "all-postgres", "all-globals"} <= labels
    assert not any("template" in label for label in labels)
    glob = dumps.read_dump(env.repo, "all-globals")
    assert glob is not None and dumps.usable(glob)
    assert glob.scope == "globals" and glob.format == "plain"
    text = (dump_dir(env, "all-globals") / "globals.sql").read_text()
    assert "CREATE ROLE app_reader;" in text
    assert oct((dump_dir(env, "all-globals") / "globals.sql").stat().st_mode & 0o777) == "0o600"
    assert glob.verification["objects"]["roles"]["found"] >= 2
    assert not any("not-in-argv" in arg for cmd in result["cmds"] for arg in cmd)

    refused = restore(env, label="all-globals", target_database="x")
    assert refused.failed and "psql -f globals.sql" in refused.msg


def test_a_failed_pg_dump_is_never_usable(env: Env) -> None:
    env.cluster.sql("CREATE ROLE weak LOGIN")
    with psycopg.connect(**{**env.cluster.conninfo, "dbname": "shop"}, autocommit=True) as conn:
        conn.execute(b"GRANT USAGE ON SCHEMA sales TO weak")
        conn.execute(b"GRANT SELECT ON public.items TO weak")
    result = dump(env, databases=["shop"], label="weak", login_user="weak")
    assert result.failed and "pg_dump failed" in result.msg, result.msg
    assert "permission denied" in result.get("stderr", "")
    record = dumps.read_dump(env.repo, "weak-shop")
    assert record is not None and record.status == "failed" and not dumps.usable(record)
    assert record.verification["tool"] == "pg_dump"
    assert not (dump_dir(env, "weak-shop") / "database.dump").exists()

    info = run_module(INFO, {"repository_path": str(env.repo_path), "label": "weak-shop"})
    assert not info.failed
    assert [d["usable"] for d in info["dumps"]] == [False]
    refused = restore(env, label="weak-shop", target_database="shop_weak")
    assert refused.failed and "not usable" in refused.msg


def test_restore_into_an_existing_database_only_when_asked(env: Env) -> None:
    result = dump(env, databases=["shop"], label="ex")
    assert not result.failed, result.msg
    first = restore(env, label="ex-shop", target_database="shop_ex")
    assert not first.failed, first.msg
    with psycopg.connect(**{**env.cluster.conninfo, "dbname": "shop_ex"}, autocommit=True) as c:
        c.execute(b"DELETE FROM public.big WHERE id > 100")
        c.execute(b"CREATE TABLE public.local_only (a int)")
        c.execute(b"INSERT INTO public.local_only VALUES (42)")
    # mode new never touches an existing database that it did not restore (the original!)
    refused = restore(env, label="ex-shop", target_database="shop")
    assert refused.failed and "mode=existing" in refused.msg

    planned = restore(env, check=True, label="ex-shop", target_database="shop_ex", mode="existing")
    assert planned.changed and not planned.failed
    assert {"--clean", "--if-exists", "--single-transaction"} <= set(planned["cmd"])
    assert planned["queries"] == []
    with psycopg.connect(**{**env.cluster.conninfo, "dbname": "shop_ex"}) as c:
        row = c.execute(b"SELECT count(*) FROM public.big").fetchone()
        assert row is not None and row[0] == 100  # check mode changed nothing

    replaced = restore(env, label="ex-shop", target_database="shop_ex", mode="existing")
    assert not replaced.failed, replaced.get("stderr", replaced.msg)
    assert replaced.changed
    assert fingerprint(env.cluster, "shop_ex") == fingerprint(env.cluster, "shop")
    with psycopg.connect(**{**env.cluster.conninfo, "dbname": "shop_ex"}) as c:
        row = c.execute(b"SELECT a FROM public.local_only").fetchone()
        assert row == (42,)  # objects that are not in the dump are left alone


# The roles, through their playbooks --------------------------------------------------------


def run_playbook(
    playbook: str, hostvars: dict[str, t.Any], workdir: Path, check: bool = False
) -> list[TaskResult]:
    inventory = workdir / "inventory.json"
    hosts = {
        "localhost": {
            "ansible_connection": "local",
            "ansible_python_interpreter": HOST_PYTHON,
            **hostvars,
        }
    }
    inventory.write_text(json.dumps({"postgresql": {"hosts": hosts}}))
    argv = [
        str(Path(sys.executable).parent / "ansible-playbook"),
        "-i",
        str(inventory),
        str(ROOT / "playbooks" / playbook),
    ]
    if check:
        argv.append("--check")
    environ = dict(os.environ)
    environ.update(
        {
            "PATH": f"{Path(sys.executable).parent}:{environ.get('PATH', '')}",
            "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"),
            "ANSIBLE_COLLECTIONS_PATH": collections_path(),
            "ANSIBLE_STDOUT_CALLBACK": "ansible.posix.json",
            "ANSIBLE_CALLBACK_RESULT_FORMAT": "json",
            "ANSIBLE_NOCOLOR": "1",
        }
    )
    proc = subprocess.run(
        argv, cwd=ROOT, env=environ, capture_output=True, text=True, timeout=300, check=False
    )
    try:
        report = json.loads(proc.stdout)
    except json.JSONDecodeError as exc:
        raise AssertionError(
            f"no JSON report: {proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        ) from exc
    results = []
    for play in report.get("plays", []):
        for task in play.get("tasks", []):
            host = task.get("hosts", {}).get("localhost")
            if host is not None:
                results.append(TaskResult(task["task"]["name"], host))
    return results


@pytest.mark.skipif(os.geteuid() != 0, reason="the roles become postgres: run as root")
def test_roles_dump_and_restore_through_their_playbooks(env: Env) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="pitr-dumprole-"))
    try:
        give_to_server_user(workdir)
        repo_path = workdir / "repo"
        init_repository(env.cluster, repo_path)
        subprocess.run(["chown", "-R", "postgres:postgres", str(repo_path)], check=True)
        common = {
            "pitr_repository_path": str(repo_path),
            "logical_dump_login_unix_socket": str(env.cluster.sockdir),
            "logical_dump_login_port": env.cluster.port,
            "logical_dump_login_db": "postgres",
            "logical_dump_databases": ["shop"],
            "logical_dump_label": "role",
            "logical_dump_poll_interval": 1,
        }
        checked = run_playbook("logical_dump.yml", common, workdir, check=True)
        assert not any(r.failed for r in checked), [r.result for r in checked if r.failed]
        assert not (repo_path / "dumps").exists()

        taken = run_playbook("logical_dump.yml", common, workdir)
        assert not any(r.failed for r in taken), [r.result for r in taken if r.failed]
        record = dumps.read_dump(Repository.open_posix(str(repo_path)), "role-shop")
        assert record is not None and dumps.usable(record)
        glob = dumps.read_dump(Repository.open_posix(str(repo_path)), "role-globals")
        assert glob is not None and dumps.usable(glob)
        owner = (repo_path / "dumps" / "role-shop" / "database.dump").stat().st_uid
        assert owner == pwd.getpwnam("postgres").pw_uid

        restore_vars = {
            "pitr_repository_path": str(repo_path),
            "restore_dump_database": "shop",
            "restore_dump_target_database": "shop_role",
            "restore_dump_login_unix_socket": str(env.cluster.sockdir),
            "restore_dump_login_port": env.cluster.port,
            "restore_dump_login_db": "postgres",
            "restore_dump_poll_interval": 1,
        }
        planned = run_playbook("restore_dump.yml", restore_vars, workdir, check=True)
        assert not any(r.failed for r in planned), [r.result for r in planned if r.failed]
        assert "shop_role" not in databases(env.cluster)
        done = run_playbook("restore_dump.yml", restore_vars, workdir)
        assert not any(r.failed for r in done), [r.result for r in done if r.failed]
        assert fingerprint(env.cluster, "shop_role") == fingerprint(env.cluster, "shop")
        again = run_playbook("restore_dump.yml", restore_vars, workdir)
        waited = [r for r in again if r.name.endswith("Wait for the restore to finish")]
        assert waited and not waited[0].changed
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

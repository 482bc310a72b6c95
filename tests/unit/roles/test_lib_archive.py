# Copyright: contributors to pitr.postgresql
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""roles/archiving/files/lib_archive.py: the module_utils archive and its atomic install.

Run against the collection's real module_utils directory and real directories (tmp_path).
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import io
import json
import os
import stat
import sys
import tarfile
import typing as t
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
SCRIPT = ROOT / "roles" / "archiving" / "files" / "lib_archive.py"
MODULE_UTILS = ROOT / "plugins" / "module_utils"
PACKAGE = "ansible_collections/pitr/postgresql/plugins/module_utils"


def _load() -> t.Any:
    spec = importlib.util.spec_from_file_location("lib_archive", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["lib_archive"] = module
    spec.loader.exec_module(module)
    return module


lib_archive = _load()


def packed(tmp_path: Path, src: Path = MODULE_UTILS, name: str = "a.tar.gz") -> dict[str, t.Any]:
    return t.cast(dict[str, t.Any], lib_archive.pack(str(src), str(tmp_path / name)))


def tree_files(tree: Path) -> dict[str, bytes]:
    return {
        p.relative_to(tree).as_posix(): p.read_bytes()
        for p in tree.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.name != ".pitr-lib.json"
    }


def source_copy(tmp_path: Path) -> Path:
    """A copy of module_utils that a test may change."""
    src = tmp_path / "src"
    src.mkdir()
    for p in MODULE_UTILS.glob("*.py"):
        (src / p.name).write_bytes(p.read_bytes())
    return src


def installed_copy(tmp_path: Path) -> tuple[Path, Path]:
    """(a changeable copy of module_utils, a lib directory with that copy installed as 0.1.0)."""
    src = source_copy(tmp_path)
    lib = tmp_path / "lib"
    lib.mkdir()
    old = packed(tmp_path, src, "old.tar.gz")
    lib_archive.install(str(lib), "0.1.0", str(tmp_path / "old.tar.gz"), old["sha256"], False)
    return src, lib


def repack(tmp_path: Path, src: Path, lib: Path) -> tuple[str, str, str, str]:
    """install() arguments for the changed copy."""
    new = packed(tmp_path, src, "new.tar.gz")
    return (str(lib), "0.1.0", str(tmp_path / "new.tar.gz"), new["sha256"])


# pack -----------------------------------------------------------------------------------------


def test_pack_is_deterministic_and_holds_the_importable_tree(tmp_path: Path) -> None:
    src = source_copy(tmp_path)
    first = packed(tmp_path, src, "a.tar.gz")
    os.utime(src / "walfile.py", (1, 1))  # another mtime: the same content
    second = packed(tmp_path, src, "b.tar.gz")
    assert (tmp_path / "a.tar.gz").read_bytes() == (tmp_path / "b.tar.gz").read_bytes()
    raw = gzip.decompress((tmp_path / "a.tar.gz").read_bytes())
    assert first["sha256"] == second["sha256"] == hashlib.sha256(raw).hexdigest()
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        names = tar.getnames()
        assert all(m.mtime == 0 and m.uid == 0 and m.mode == 0o644 for m in tar.getmembers())
    assert names == first["files"]
    assert names[:4] == [
        "ansible_collections/__init__.py",
        "ansible_collections/pitr/__init__.py",
        "ansible_collections/pitr/postgresql/__init__.py",
        "ansible_collections/pitr/postgresql/plugins/__init__.py",
    ]
    expected = sorted(f"{PACKAGE}/{p.name}" for p in MODULE_UTILS.glob("*.py"))
    assert names[4:] == expected


def test_pack_refuses_a_directory_that_is_not_module_utils(tmp_path: Path) -> None:
    with pytest.raises(lib_archive.LibError, match="does not look like"):
        lib_archive.pack(str(tmp_path), str(tmp_path / "x.tar.gz"))


# install --------------------------------------------------------------------------------------


def test_first_install_then_nothing_changes(tmp_path: Path) -> None:
    info = packed(tmp_path)
    lib = tmp_path / "lib"
    lib.mkdir()
    args = (str(lib), "0.1.0", str(tmp_path / "a.tar.gz"), info["sha256"])

    predicted = lib_archive.install(*args, check=True)
    assert predicted["changed"] is True and predicted["reason"] == "not installed"
    assert os.listdir(lib) == []

    result = lib_archive.install(*args, check=False)
    assert result["changed"] is True and result["method"] == "rename"
    assert result["added"] == info["files"] and result["modified"] == result["removed"] == []
    tree = lib / "0.1.0"
    installed = tree_files(tree)
    assert set(installed) == set(info["files"])
    assert installed[f"{PACKAGE}/walfile.py"] == (MODULE_UTILS / "walfile.py").read_bytes()
    for p in tree.rglob("*"):
        wanted = 0o755 if p.is_dir() else 0o644
        assert stat.S_IMODE(p.stat().st_mode) == wanted, p
    pycache = tree / PACKAGE / "__pycache__"
    assert {p.name.split(".")[0] for p in pycache.iterdir()} >= {"walfile", "hostcmd", "archive"}
    assert sorted(os.listdir(lib)) == ["0.1.0"]  # no temporary directory left

    again = lib_archive.install(*args, check=False)
    assert again["changed"] is False
    assert lib_archive.install(*args, check=True)["changed"] is False


def test_changed_content_replaces_the_tree_by_exchange(tmp_path: Path) -> None:
    src, lib = installed_copy(tmp_path)

    (src / "walfile.py").write_bytes((src / "walfile.py").read_bytes() + b"# changed\n")
    (src / "brand_new.py").write_text("VALUE = 1\n")
    (src / "dumps.py").unlink()
    args = repack(tmp_path, src, lib)
    predicted = lib_archive.install(*args, check=True)
    assert predicted["changed"] is True and predicted["reason"] == "different content"
    assert b"# changed" not in (lib / "0.1.0" / PACKAGE / "walfile.py").read_bytes()

    result = lib_archive.install(*args, check=False)
    assert result["changed"] is True and result["method"] == "exchange"
    assert result["added"] == [f"{PACKAGE}/brand_new.py"]
    assert result["modified"] == [f"{PACKAGE}/walfile.py"]
    assert result["removed"] == [f"{PACKAGE}/dumps.py"]
    installed = tree_files(lib / "0.1.0")
    assert f"{PACKAGE}/dumps.py" not in installed
    assert installed[f"{PACKAGE}/walfile.py"].endswith(b"# changed\n")
    assert sorted(os.listdir(lib)) == ["0.1.0"]
    assert lib_archive.install(*args, check=False)["changed"] is False


def test_without_exchange_the_old_tree_steps_aside(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src, lib = installed_copy(tmp_path)
    (src / "walfile.py").write_bytes(b"# replaced\n")
    monkeypatch.setattr(lib_archive, "_exchange", lambda a, b: False)
    result = lib_archive.install(*repack(tmp_path, src, lib), check=False)
    assert result["method"] == "rename aside"
    assert (lib / "0.1.0" / PACKAGE / "walfile.py").read_bytes() == b"# replaced\n"
    assert sorted(os.listdir(lib)) == ["0.1.0"]


def test_a_damaged_tree_is_repaired(tmp_path: Path) -> None:
    info = packed(tmp_path)
    lib = tmp_path / "lib"
    lib.mkdir()
    args = (str(lib), "0.1.0", str(tmp_path / "a.tar.gz"), info["sha256"])
    lib_archive.install(*args, check=False)
    damaged = lib / "0.1.0" / PACKAGE / "walfile.py"
    damaged.write_bytes(b"oops")
    (lib / "0.1.0" / PACKAGE / "archive.py").unlink()
    result = lib_archive.install(*args, check=False)
    assert result["changed"] is True
    assert result["modified"] == [f"{PACKAGE}/walfile.py"]
    assert result["added"] == [f"{PACKAGE}/archive.py"]
    assert damaged.read_bytes() == (MODULE_UTILS / "walfile.py").read_bytes()


def test_a_failed_install_leaves_the_installed_tree_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src, lib = installed_copy(tmp_path)
    before = tree_files(lib / "0.1.0")
    (src / "walfile.py").write_bytes(b"def broken(:\n")  # does not compile
    with pytest.raises(lib_archive.LibError, match="compiling"):
        lib_archive.install(*repack(tmp_path, src, lib), check=False)
    assert tree_files(lib / "0.1.0") == before
    assert sorted(os.listdir(lib)) == ["0.1.0"]


def test_an_archive_with_other_content_is_refused(tmp_path: Path) -> None:
    info = packed(tmp_path)
    lib = tmp_path / "lib"
    lib.mkdir()
    with pytest.raises(lib_archive.LibError, match="does not hold the content"):
        lib_archive.install(str(lib), "0.1.0", str(tmp_path / "a.tar.gz"), "0" * 64, False)
    assert os.listdir(lib) == []
    assert info["sha256"] != "0" * 64


@pytest.mark.parametrize(
    "name", ["../evil.py", f"{PACKAGE}/../../x.py", "etc/passwd", f"{PACKAGE}/.hidden.py"]
)
def test_unexpected_members_are_refused(tmp_path: Path, name: str) -> None:
    raw = lib_archive.tar_bytes([(name, b"x = 1\n")])
    (tmp_path / "evil.tar.gz").write_bytes(gzip.compress(raw))
    lib = tmp_path / "lib"
    lib.mkdir()
    sha = hashlib.sha256(raw).hexdigest()
    with pytest.raises(lib_archive.LibError, match="unexpected member"):
        lib_archive.install(str(lib), "0.1.0", str(tmp_path / "evil.tar.gz"), sha, False)
    assert os.listdir(lib) == []


# prune ----------------------------------------------------------------------------------------


HOUR = 3600


def aged(path: Path, seconds: float) -> Path:
    """Give ``path`` an mtime ``seconds`` in the past."""
    when = path.stat().st_mtime - seconds
    os.utime(path, (when, when))
    return path


def version_tree(lib: Path, name: str, age: float = 0) -> Path:
    """A version tree as the role installs it (its record makes it one), ``age`` seconds old."""
    tree = lib / name
    (tree / "ansible_collections").mkdir(parents=True)
    (tree / ".pitr-lib.json").write_text('{"files": {}, "sha256": "x"}', encoding="utf-8")
    return aged(tree, age)


def test_prune_removes_leftovers_and_other_archives_but_keeps_other_versions(
    tmp_path: Path,
) -> None:
    lib = tmp_path / "lib"
    for name in ("0.1.0", "0.0.9", ".new-0.1.0-abc", ".old-0.1.0-def", "unrelated"):
        (lib / name).mkdir(parents=True)
    aged(lib / ".new-0.1.0-abc", HOUR + 60)
    aged(lib / ".old-0.1.0-def", HOUR + 60)
    (lib / ".new-0.1.0-busy").mkdir()  # an install running now: left alone
    (lib / ".module_utils-0.0.9.tar.gz").write_bytes(b"old")
    (lib / ".module_utils-0.1.0.tar.gz").write_bytes(b"new")
    (lib / "current").symlink_to("0.1.0")
    predicted = lib_archive.prune(str(lib), "0.1.0", True)
    assert predicted["removed"] == [
        ".module_utils-0.0.9.tar.gz",
        ".new-0.1.0-abc",
        ".old-0.1.0-def",
    ]
    assert len(os.listdir(lib)) == 9
    result = lib_archive.prune(str(lib), "0.1.0", False)
    assert result["changed"] is True
    assert result["kept"] == [".new-0.1.0-busy", "0.0.9", "unrelated"]
    assert sorted(os.listdir(lib)) == [
        ".module_utils-0.1.0.tar.gz",
        ".new-0.1.0-busy",
        "0.0.9",
        "0.1.0",
        "current",
        "unrelated",
    ]
    assert lib_archive.prune(str(lib), "0.1.0", False)["changed"] is False


def test_versions_to_remove_orders_by_install_time_not_by_name() -> None:
    trees = {"0.9.0": 300.0, "0.10.0": 100.0, "0.2.0": 200.0, "1.0.0": 50.0}
    assert lib_archive.versions_to_remove(trees, ["2.0.0"], 2) == ["0.2.0", "0.10.0", "1.0.0"]
    assert lib_archive.versions_to_remove(trees, ["2.0.0"], 3) == ["0.10.0", "1.0.0"]
    assert lib_archive.versions_to_remove(trees, ["2.0.0"], 1) == [
        "0.9.0",
        "0.2.0",
        "0.10.0",
        "1.0.0",
    ]
    # Protected names are kept whatever their age, and take their place in the count.
    assert lib_archive.versions_to_remove(trees, ["2.0.0", "1.0.0"], 2) == [
        "0.9.0",
        "0.2.0",
        "0.10.0",
    ]
    assert lib_archive.versions_to_remove(trees, ["2.0.0", "1.0.0"], 1) == [
        "0.9.0",
        "0.2.0",
        "0.10.0",
    ]
    assert lib_archive.versions_to_remove(trees, ["2.0.0"], 5) == []
    with pytest.raises(lib_archive.LibError, match="at least 1"):
        lib_archive.versions_to_remove(trees, ["2.0.0"], 0)


def test_prune_keeps_the_newest_versions_and_never_what_is_not_a_version_tree(
    tmp_path: Path,
) -> None:
    lib = tmp_path / "lib"
    lib.mkdir()
    version_tree(lib, "0.9.0", age=3 * HOUR)
    version_tree(lib, "0.10.0", age=4 * HOUR)  # the greater version string, installed earlier
    version_tree(lib, "0.3.0", age=2 * HOUR)
    version_tree(lib, "1.0.0")
    (lib / "current").symlink_to("1.0.0")
    (lib / "local-patches").mkdir()
    (lib / "0.0.1" / "ansible_collections").mkdir(parents=True)  # no record: not the role's
    aged(lib / "0.0.1", 9 * HOUR)
    (lib / "0.0.2").write_text("a file\n")
    (lib / "0.0.3").symlink_to("0.10.0")
    before = sorted(os.listdir(lib))

    predicted = lib_archive.prune(str(lib), "1.0.0", True, keep_versions=2)
    assert sorted(os.listdir(lib)) == before, "check mode removed something"
    assert predicted["changed"] is True
    assert predicted["removed_versions"] == ["0.9.0", "0.10.0"]
    assert predicted["kept_versions"] == ["1.0.0", "0.3.0"]

    result = lib_archive.prune(str(lib), "1.0.0", False, keep_versions=2)
    assert result["removed_versions"] == predicted["removed_versions"]
    assert result["removed"] == ["0.9.0", "0.10.0"]
    assert result["kept_versions"] == ["1.0.0", "0.3.0"]
    assert sorted(os.listdir(lib)) == [
        "0.0.1",
        "0.0.2",
        "0.0.3",
        "0.3.0",
        "1.0.0",
        "current",
        "local-patches",
    ]
    assert lib_archive.prune(str(lib), "1.0.0", False, keep_versions=2)["changed"] is False
    assert lib_archive.prune(str(lib), "1.0.0", False, keep_versions=1)["removed"] == ["0.3.0"]
    assert sorted(os.listdir(lib)) == [
        "0.0.1",
        "0.0.2",
        "0.0.3",
        "1.0.0",
        "current",
        "local-patches",
    ]


def test_prune_never_removes_the_tree_current_points_at(tmp_path: Path) -> None:
    lib = tmp_path / "lib"
    lib.mkdir()
    version_tree(lib, "0.1.0", age=3 * HOUR)  # current: the oldest
    version_tree(lib, "0.2.0", age=2 * HOUR)
    version_tree(lib, "0.3.0", age=HOUR)
    (lib / "current").symlink_to("0.1.0")
    # Run by hand with another KEEP than current: both stay, whatever the count.
    result = lib_archive.prune(str(lib), "0.3.0", False, keep_versions=1)
    assert result["removed_versions"] == ["0.2.0"]
    assert sorted(os.listdir(lib)) == ["0.1.0", "0.3.0", "current"]
    assert (lib / "current").resolve() == lib / "0.1.0"


def test_check_mode_predicts_current_pointing_at_the_new_version(tmp_path: Path) -> None:
    """Before an upgrade to 0.3.0 (not installed yet in check mode), with one version kept."""
    lib = tmp_path / "lib"
    lib.mkdir()
    version_tree(lib, "0.1.0", age=2 * HOUR)
    version_tree(lib, "0.2.0", age=HOUR)
    (lib / "current").symlink_to("0.2.0")
    predicted = lib_archive.prune(str(lib), "0.3.0", True, keep_versions=1)
    assert predicted["removed_versions"] == ["0.2.0", "0.1.0"]
    assert sorted(os.listdir(lib)) == ["0.1.0", "0.2.0", "current"]
    two = lib_archive.prune(str(lib), "0.3.0", True, keep_versions=2)
    assert two["removed_versions"] == ["0.1.0"] and two["kept_versions"] == ["0.3.0", "0.2.0"]


def test_prune_refuses_fewer_than_one_version(tmp_path: Path, capsys: t.Any) -> None:
    lib = tmp_path / "lib"
    lib.mkdir()
    version_tree(lib, "0.1.0")
    assert lib_archive.main(["prune", str(lib), "0.2.0", "--keep-versions", "0"]) == 1
    failure = json.loads(capsys.readouterr().out)
    assert "pitr_install_keep_versions must be at least 1" in failure["msg"]
    assert os.listdir(lib) == ["0.1.0"]
    assert lib_archive.main(["prune", str(lib), "0.2.0", "--keep-versions", "1", "--check"]) == 0
    assert json.loads(capsys.readouterr().out)["removed_versions"] == ["0.1.0"]
    assert os.listdir(lib) == ["0.1.0"]


def test_command_line_prints_json_and_fails_with_a_message(tmp_path: Path, capsys: t.Any) -> None:
    assert lib_archive.main(["pack", str(MODULE_UTILS), str(tmp_path / "a.tar.gz")]) == 0
    sha = json.loads(capsys.readouterr().out)["sha256"]
    (tmp_path / "lib").mkdir()
    argv = ["install", str(tmp_path / "lib"), "0.1.0", str(tmp_path / "a.tar.gz"), sha]
    assert lib_archive.main(argv) == 0
    assert json.loads(capsys.readouterr().out)["changed"] is True
    assert lib_archive.main([*argv[:3], str(tmp_path / "missing.tar.gz"), "1" * 64]) == 1
    failure = json.loads(capsys.readouterr().out)
    assert failure["failed"] is True and "cannot read" in failure["msg"]

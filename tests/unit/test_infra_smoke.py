# Copyright: contributors to pitr.postgresql
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The collection's metadata and the test setup that every other test relies on."""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def load_yaml(name: str) -> dict:
    with (ROOT / name).open(encoding="utf-8") as stream:
        data = yaml.safe_load(stream)
    assert isinstance(data, dict), f"{name} is not a YAML mapping"
    return data


def test_galaxy_yml_names_the_collection_pitr_postgresql() -> None:
    galaxy = load_yaml("galaxy.yml")
    assert (galaxy["namespace"], galaxy["name"]) == ("pitr", "postgresql")
    assert re.fullmatch(r"\d+\.\d+\.\d+", str(galaxy["version"])), galaxy["version"]
    assert galaxy["license"] == ["GPL-3.0-or-later"]


def test_galaxy_build_leaves_out_local_environments() -> None:
    build_ignore = load_yaml("galaxy.yml").get("build_ignore", [])
    for local in (".venv", "build", "tests/output"):
        assert local in build_ignore, f"galaxy.yml build_ignore lacks {local}"


def test_runtime_yml_states_the_ansible_versions() -> None:
    runtime = load_yaml("meta/runtime.yml")
    assert re.fullmatch(r">=\s*2\.\d+(\.\d+)?", runtime["requires_ansible"])


def test_collection_imports_come_from_this_checkout() -> None:
    # pytest's pythonpath holds build/collections, where the checkout is linked as
    # ansible_collections/pitr/postgresql: the tests must import the code in this tree.
    from ansible_collections.pitr.postgresql.plugins.module_utils import errors

    assert Path(errors.__file__).resolve() == ROOT / "plugins" / "module_utils" / "errors.py"


def test_installed_tools_match_the_pins() -> None:
    pins = {}
    for line in (ROOT / "requirements-dev.txt").read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)(\[[^\]]+\])?==([0-9][0-9A-Za-z.]*)", line)
        assert match, f"requirements-dev.txt: not pinned with ==: {line}"
        pins[match.group(1)] = match.group(3)
    for name in ("ansible-core", "pytest"):
        assert importlib.metadata.version(name) == pins[name], name

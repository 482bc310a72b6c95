# Copyright: contributors to pitr.postgresql
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Make this checkout importable as ``ansible_collections.pitr.postgresql`` for unit tests.

``make collection-link`` links build/collections/ansible_collections/pitr/postgresql to the
checkout; when that link is missing (a bare ``pytest`` in a fresh clone), a link tree is made
in a temporary directory instead. Either way the import must resolve to *this* checkout, not
to another copy (the sanity tree, an installed collection), so that tests test the code here.
The checkout's root goes on sys.path too, for ``tests.support``.
"""

from __future__ import annotations

import atexit
import importlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROBE = "ansible_collections.pitr.postgresql.plugins.module_utils.walfile"


def _resolves_here() -> bool:
    try:
        module = importlib.import_module(PROBE)
    except ImportError:
        return False
    return Path(module.__file__ or "").resolve().is_relative_to(ROOT / "plugins")


def _forget_collection_modules() -> None:
    for name in [
        n
        for n in sys.modules
        if n == "ansible_collections" or n.startswith("ansible_collections.pitr")
    ]:
        del sys.modules[name]
    importlib.invalidate_caches()


def _link_tree() -> str:
    """A directory holding ansible_collections/pitr/postgresql -> ROOT."""
    linked = ROOT / "build" / "collections"
    link = linked / "ansible_collections" / "pitr" / "postgresql"
    if link.is_symlink() and link.resolve() == ROOT:
        return str(linked)
    tmp = tempfile.mkdtemp(prefix="pitr-collection-")
    atexit.register(shutil.rmtree, tmp, True)
    target = Path(tmp) / "ansible_collections" / "pitr"
    target.mkdir(parents=True)
    os.symlink(ROOT, target / "postgresql")
    return tmp


def _make_importable() -> None:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    if _resolves_here():
        return
    sys.path.insert(0, _link_tree())
    _forget_collection_modules()
    if not _resolves_here():
        raise RuntimeError(
            f"cannot import {PROBE} from {ROOT}: check for an ansible_collections/__init__.py"
            " shadowing the namespace package"
        )


_make_importable()


@pytest.fixture
def fsynced(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The paths os.fsync is called on from here on, in order (the real fsync still runs)."""
    paths: list[str] = []
    real_fsync = os.fsync

    def spy(fd: int) -> None:
        paths.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    return paths

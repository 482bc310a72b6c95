"""Install the host command the way the archiving role lays it out, for tests and benchmarks.

PREFIX/bin/pitr-wal, PREFIX/lib/<version>/ansible_collections/pitr/postgresql/plugins/
module_utils/*.py, PREFIX/lib/current -> <version>.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def install_host_command(prefix: str | os.PathLike[str], owner: str | None = None) -> str:
    """Install into ``prefix``; return the absolute path of the program."""
    prefix = Path(prefix)
    version = "test"
    lib = prefix / "lib" / version
    pkg = lib / "ansible_collections" / "pitr" / "postgresql" / "plugins" / "module_utils"
    pkg.mkdir(parents=True, exist_ok=True)
    for d in (lib / "ansible_collections", pkg.parents[2], pkg.parents[1], pkg.parents[0]):
        (d / "__init__.py").touch()
    for src in (ROOT / "plugins" / "module_utils").glob("*.py"):
        shutil.copy2(src, pkg / src.name)
    current = prefix / "lib" / "current"
    if current.is_symlink() or current.exists():
        current.unlink()
    current.symlink_to(version)
    (prefix / "bin").mkdir(parents=True, exist_ok=True)
    program = prefix / "bin" / "pitr-wal"
    shutil.copy2(ROOT / "roles" / "archiving" / "files" / "pitr-wal", program)
    program.chmod(0o755)
    if owner:
        for dirpath, _dirs, files in os.walk(prefix):
            shutil.chown(dirpath, owner, owner)
            for f in files:
                shutil.chown(os.path.join(dirpath, f), owner, owner)
    return str(program)

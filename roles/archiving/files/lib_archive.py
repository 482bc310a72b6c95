# Copyright: contributors to pitr.postgresql
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Ship the collection's module_utils to a database host as one archive; install it atomically.

The archiving role used to copy each module_utils file with its own task (one SSH transfer per
file, 15-55 s per run). Now:

``pack SRC_DIR DEST`` (on the controller, with the controller's Python)
    writes a deterministic ``tar.gz`` of the tree the host command imports
    (``ansible_collections/pitr/postgresql/plugins/module_utils/*.py`` and the package
    ``__init__.py`` files): sorted members, mtime 0, owner root, mode 0644. Prints JSON:
    ``sha256`` of the uncompressed tar (the content's identity, independent of how gzip
    compressed it) and ``files``.

``install LIB_DIR VERSION ARCHIVE SHA256 [--check]`` (on the host, with ``pitr_python``)
    makes ``LIB_DIR/VERSION`` hold exactly the archive's tree, compiled, or does nothing when
    it already does (``LIB_DIR/VERSION/.pitr-lib.json`` records the content and the hash of
    each file, which are checked, so a damaged tree is repaired). The new tree is extracted
    into a temporary directory beside it, compiled, fsynced, and only then takes the final
    name: by an atomic exchange with the old tree (``renameat2(RENAME_EXCHANGE)``) when there
    is one, so that ``LIB_DIR/VERSION`` always holds a complete tree, never a half-written
    one. With ``--check`` nothing changes. Prints JSON: ``changed`` and the files ``added``,
    ``modified`` and ``removed``.

``prune LIB_DIR KEEP [--keep-versions N] [--check]`` (on the host)
    removes leftovers of interrupted installs (older than an hour) and the cached archives of
    other versions; with ``--keep-versions N`` also the version trees beyond the newest N (by
    install time; never KEEP nor the tree ``current`` points at), else it lists them and keeps
    them (see ``prune``). Prints JSON: ``changed``, ``removed``, ``kept`` (and
    ``removed_versions``, ``kept_versions`` with ``--keep-versions``).

Standard library only; no Ansible import (it runs on hosts where only Python is installed).
"""

from __future__ import annotations

import argparse
import compileall
import contextlib
import ctypes
import ctypes.util
import errno
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import sys
import tarfile
import tempfile
import time
import typing as t

PACKAGE = "ansible_collections/pitr/postgresql/plugins/module_utils"
PACKAGE_PARENTS = (
    "ansible_collections",
    "ansible_collections/pitr",
    "ansible_collections/pitr/postgresql",
    "ansible_collections/pitr/postgresql/plugins",
)
RECORD = ".pitr-lib.json"
NEW_PREFIX = ".new-"  # temporary trees: LIB_DIR/.new-VERSION-XXXX
OLD_PREFIX = ".old-"  # a replaced tree on its way out (exchange fallback)
# The copy of the archive kept on the host (LIB_DIR/.module_utils-VERSION.tar.gz): the next
# run transfers nothing when it is unchanged.
ARCHIVE_RE = re.compile(r"^\.module_utils-(.+)\.tar\.gz$")
_VERSION_RE = re.compile(r"^[0-9A-Za-z][0-9A-Za-z.+_-]*$")
RENAME_EXCHANGE = 2
AT_FDCWD = -100


class LibError(Exception):
    """A failure with a message that names the problem and the fix."""


# pack (controller) -------------------------------------------------------------------------


def members(src_dir: str) -> list[tuple[str, bytes]]:
    """(name in the archive, content) for every file of the installed tree, sorted."""
    found = sorted(n for n in os.listdir(src_dir) if n.endswith(".py"))
    if "__init__.py" not in found or len(found) < 2:
        raise LibError(f"{src_dir} does not look like the collection's module_utils directory")
    result = [(f"{parent}/__init__.py", b"") for parent in PACKAGE_PARENTS]
    for name in found:
        with open(os.path.join(src_dir, name), "rb") as fh:
            result.append((f"{PACKAGE}/{name}", fh.read()))
    return result


def tar_bytes(files: t.Sequence[tuple[str, bytes]]) -> bytes:
    """A deterministic, uncompressed tar of ``files``: same content, same bytes."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            info.mtime = 0
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _write_atomically(path: str, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=os.path.dirname(path) or ".")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def pack(src_dir: str, dest: str) -> dict[str, t.Any]:
    files = members(src_dir)
    raw = tar_bytes(files)
    _write_atomically(dest, gzip.compress(raw, compresslevel=9, mtime=0))
    return {
        "path": dest,
        "sha256": hashlib.sha256(raw).hexdigest(),
        "files": [name for name, _data in files],
        "bytes": os.path.getsize(dest),
    }


# install (host) ----------------------------------------------------------------------------


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _file_sha256(path: str) -> str | None:
    try:
        with open(path, "rb") as fh:
            return _sha256(fh.read())
    except OSError:
        return None


def read_record(tree: str) -> dict[str, t.Any] | None:
    try:
        with open(os.path.join(tree, RECORD), encoding="utf-8") as fh:
            record = json.load(fh)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def tree_matches(tree: str, sha256: str) -> tuple[bool, dict[str, str]]:
    """(does ``tree`` hold exactly the content ``sha256``?, its recorded file hashes)."""
    record = read_record(tree)
    if record is None:
        return False, {}
    files = record.get("files")
    recorded: dict[str, str] = files if isinstance(files, dict) else {}
    if record.get("sha256") != sha256:
        return False, recorded
    for name, digest in recorded.items():
        if _file_sha256(os.path.join(tree, name)) != digest:
            return False, recorded
    return bool(recorded), recorded


def read_archive(archive: str, sha256: str) -> list[tuple[str, bytes]]:
    """The archive's files, after checking its content hash and every member's name and type."""
    try:
        with open(archive, "rb") as fh:
            raw = gzip.decompress(fh.read())
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise LibError(f"cannot read the module_utils archive {archive}: {exc}") from exc
    if _sha256(raw) != sha256:
        raise LibError(
            f"the module_utils archive {archive} does not hold the content the controller packed"
            f" (sha256 {_sha256(raw)}, expected {sha256}); run the role again"
        )
    files = []
    with tarfile.open(fileobj=io.BytesIO(raw), mode="r:") as tar:
        for info in tar.getmembers():
            parent, _sep, base = info.name.rpartition("/")
            allowed = (parent == PACKAGE and base.endswith(".py")) or (
                parent in PACKAGE_PARENTS and base == "__init__.py"
            )
            if not info.isfile() or not allowed or "/." in "/" + info.name:
                raise LibError(f"unexpected member {info.name!r} in {archive}; nothing installed")
            extracted = tar.extractfile(info)
            files.append((info.name, extracted.read() if extracted else b""))
    return files


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_tree(root: str, files: t.Sequence[tuple[str, bytes]], final: str) -> None:
    """Write ``files`` below ``root`` (0755 directories, 0644 files), compile, fsync."""
    os.chmod(root, 0o755)
    dirs = {root}
    for name, data in files:
        path = os.path.join(root, *name.split("/"))
        directory = os.path.dirname(path)
        if directory not in dirs:
            os.makedirs(directory, mode=0o755, exist_ok=True)
            dirs.add(directory)
        with open(path, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(path, 0o644)
    # Compiled here, once: the PostgreSQL user cannot write __pycache__ in this root-owned
    # tree, and compiling on every archive_command run would cost start-up time per segment.
    # ddir: tracebacks name the final path, not this temporary one.
    old_umask = os.umask(0o022)
    try:
        if not compileall.compile_dir(root, quiet=1, ddir=final):
            raise LibError(f"compiling the module_utils in {root} failed; nothing installed")
    finally:
        os.umask(old_umask)
    for directory, _subdirs, names in os.walk(root):
        for name in names:
            if name.endswith(".pyc"):
                with open(os.path.join(directory, name), "rb") as fh:
                    os.fsync(fh.fileno())
        _fsync_dir(directory)


def _exchange(a: str, b: str) -> bool:
    """Swap two paths atomically (Linux renameat2). False when the system cannot."""
    libc_name = ctypes.util.find_library("c")
    if not libc_name:
        return False
    libc = ctypes.CDLL(libc_name, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    rc = renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, f"renameat2({a}, {b}, RENAME_EXCHANGE): {os.strerror(err)}")


def install(lib_dir: str, version: str, archive: str, sha256: str, check: bool) -> dict[str, t.Any]:
    """Install the archive's tree as ``lib_dir/version`` (see the module docstring), then
    remove the leftovers ``prune`` removes."""
    result = _install(lib_dir, version, archive, sha256, check)
    pruned = prune(lib_dir, version, check)
    result["pruned"], result["kept"] = pruned["removed"], pruned["kept"]
    result["changed"] = result["changed"] or pruned["changed"]
    return result


def _install(
    lib_dir: str, version: str, archive: str, sha256: str, check: bool
) -> dict[str, t.Any]:
    if not _VERSION_RE.match(version):
        raise LibError(f"version {version!r} cannot name a directory")
    final = os.path.join(lib_dir, version)
    matches, recorded = tree_matches(final, sha256)
    result: dict[str, t.Any] = {"changed": False, "path": final, "sha256": sha256}
    if matches:
        return result
    result["changed"] = True
    if check:
        result["reason"] = "not installed" if not recorded else "different content"
        return result
    files = read_archive(archive, sha256)
    new = {name: _sha256(data) for name, data in files}
    on_disk = {name: _file_sha256(os.path.join(final, name)) for name in set(new) | set(recorded)}
    result["added"] = sorted(n for n in new if on_disk[n] is None)
    result["removed"] = sorted(n for n in recorded if n not in new and on_disk[n] is not None)
    result["modified"] = sorted(n for n in new if on_disk[n] not in (None, new[n]))
    tmp = tempfile.mkdtemp(prefix=f"{NEW_PREFIX}{version}-", dir=lib_dir)
    try:
        write_tree(tmp, files, final)
        with open(os.path.join(tmp, RECORD), "w", encoding="utf-8") as fh:
            json.dump({"sha256": sha256, "files": new}, fh, indent=1, sort_keys=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(os.path.join(tmp, RECORD), 0o644)
        _fsync_dir(tmp)
        if not os.path.lexists(final):
            os.rename(tmp, final)  # nothing there yet: the rename is the atomic step
            result["method"] = "rename"
        elif _exchange(tmp, final):
            result["method"] = "exchange"  # tmp now holds the old tree
        else:
            # No renameat2 (old kernel or file system): the old tree steps aside first, so
            # the final name is briefly absent (never half-written).
            aside = tempfile.mkdtemp(prefix=f"{OLD_PREFIX}{version}-", dir=lib_dir)
            os.rename(final, os.path.join(aside, "tree"))
            os.rename(tmp, final)
            shutil.rmtree(aside, ignore_errors=True)
            result["method"] = "rename aside"
        _fsync_dir(lib_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return result


# prune (host) ------------------------------------------------------------------------------

# A temporary tree (.new-*, .old-*) younger than this may belong to an install running now
# (another play on the same host): only older ones are leftovers of an interrupted install.
LEFTOVER_AGE = 3600.0


def _current_target(lib_dir: str) -> str | None:
    """The name of the version tree ``LIB_DIR/current`` points at (None: no such link)."""
    link = os.path.join(lib_dir, "current")
    if not os.path.islink(link):
        return None
    real = os.path.realpath(link)
    if os.path.dirname(real) != os.path.realpath(lib_dir):
        return None  # points elsewhere: no tree of lib_dir is protected by name alone
    return os.path.basename(real)


def _is_version_tree(path: str, name: str) -> bool:
    """A tree this role installed: a real directory named like a version, with its record."""
    return (
        _VERSION_RE.match(name) is not None
        and name != "current"
        and not os.path.islink(path)
        and os.path.isdir(path)
        and read_record(path) is not None
    )


def versions_to_remove(
    trees: t.Mapping[str, float], protected: t.Sequence[str], keep_versions: int
) -> list[str]:
    """The version trees beyond the newest ``keep_versions``, newest first.

    ``trees`` maps each version tree to its mtime (its install time); the ``protected`` names
    (the version just installed, the one ``current`` points at) are always kept and count
    towards ``keep_versions``; the others are kept newest first (by mtime, not by name) until
    there are ``keep_versions``.
    """
    if keep_versions < 1:
        raise LibError(f"keep_versions must be at least 1 (got {keep_versions})")
    protected_set = set(protected)
    others = sorted(
        (name for name in trees if name not in protected_set),
        key=lambda name: (trees[name], name),
        reverse=True,
    )
    room = max(0, keep_versions - len(protected_set))
    return others[room:]


def _remove_tree(lib_dir: str, name: str) -> None:
    """Rename the tree aside first (one atomic step), then delete it: an interruption leaves a
    ``.old-`` leftover, never a half-deleted tree under a version's name."""
    aside = tempfile.mkdtemp(prefix=f"{OLD_PREFIX}{name}-", dir=lib_dir)
    os.rename(os.path.join(lib_dir, name), os.path.join(aside, "tree"))
    shutil.rmtree(aside)


def prune(
    lib_dir: str,
    keep: str,
    check: bool,
    keep_versions: int | None = None,
    now: float | None = None,
) -> dict[str, t.Any]:
    """Remove what no command uses: leftovers of interrupted installs (``.new-*``, ``.old-*``
    older than ``LEFTOVER_AGE``; younger ones may belong to an install running now) and the
    cached archives of other versions.

    Version trees (see ``_is_version_tree``) other than ``keep``: without ``keep_versions``
    they are listed in ``kept``, never removed. With it (the role's task after ``current``
    points at ``keep``) the trees beyond the newest ``keep_versions`` go (``versions_to_remove``):
    ``keep`` is always kept, and so is the tree ``current`` points at (in check mode the link
    is predicted to point at ``keep``, as the run would make it). Anything else (unknown names,
    files, links) is never touched.
    """
    removed: list[str] = []
    kept: list[str] = []
    result: dict[str, t.Any] = {"changed": False, "removed": removed, "kept": kept}
    if keep_versions is not None:
        result["removed_versions"] = []
        result["kept_versions"] = []
        if keep_versions < 1:
            raise LibError(
                f"pitr_install_keep_versions must be at least 1 (got {keep_versions}): the"
                " version in use is always kept; set it to 1 or more"
            )
    if not os.path.isdir(lib_dir):  # check mode before the first install
        return result
    now = time.time() if now is None else now
    trees: dict[str, float] = {}
    for name in sorted(os.listdir(lib_dir)):
        path = os.path.join(lib_dir, name)
        if os.path.islink(path) or name in ("current", keep):
            continue
        archive = ARCHIVE_RE.match(name)
        temporary = name.startswith((NEW_PREFIX, OLD_PREFIX)) and os.path.isdir(path)
        leftover = temporary and now - os.lstat(path).st_mtime > LEFTOVER_AGE
        if (archive and archive[1] != keep and os.path.isfile(path)) or leftover:
            removed.append(name)
            if not check:
                if leftover:
                    shutil.rmtree(path)
                else:
                    os.unlink(path)
        elif keep_versions is not None and _is_version_tree(path, name):
            trees[name] = os.lstat(path).st_mtime
        elif os.path.isdir(path):
            kept.append(name)
    if keep_versions is not None:
        current = _current_target(lib_dir)
        # After the role's link task, current is keep; in check mode it would be.
        protected = [keep, current] if not check and current in trees else [keep]
        going = versions_to_remove(trees, protected, keep_versions)
        for name in going:
            if not check:
                _remove_tree(lib_dir, name)
        staying = sorted((n for n in trees if n not in going), key=lambda n: (-trees[n], n))
        result["removed_versions"] = going
        result["kept_versions"] = [keep, *staying]
        removed.extend(going)
        kept.extend(staying)
        kept.sort()
    if removed and not check:
        _fsync_dir(lib_dir)
    result["changed"] = bool(removed)
    return result


# command line ------------------------------------------------------------------------------


def main(argv: t.Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="lib_archive", description=__doc__.split("\n", maxsplit=1)[0]
    )
    sub = parser.add_subparsers(dest="action", required=True)
    p_pack = sub.add_parser("pack")
    p_pack.add_argument("src_dir")
    p_pack.add_argument("dest")
    p_install = sub.add_parser("install")
    p_install.add_argument("lib_dir")
    p_install.add_argument("version")
    p_install.add_argument("archive")
    p_install.add_argument("sha256")
    p_install.add_argument("--check", action="store_true")
    p_prune = sub.add_parser("prune")
    p_prune.add_argument("lib_dir")
    p_prune.add_argument("keep")
    p_prune.add_argument("--keep-versions", type=int, default=None)
    p_prune.add_argument("--check", action="store_true")
    args = parser.parse_args(argv)
    try:
        if args.action == "pack":
            result = pack(args.src_dir, args.dest)
        elif args.action == "install":
            result = install(args.lib_dir, args.version, args.archive, args.sha256, args.check)
        else:
            result = prune(args.lib_dir, args.keep, args.check, args.keep_versions)
    except (LibError, OSError) as exc:
        print(json.dumps({"failed": True, "msg": str(exc)}))
        return 1
    print(json.dumps(result, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())

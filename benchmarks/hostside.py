# Copyright: contributors to pitr.postgresql
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The benchmark's code that runs where the host command runs: ``/usr/bin/python3 -I -S``.

Standard library only (plus the distribution's codec libraries the host command finds).
Three jobs, chosen by the first argument:

``push-variant LIB VARIANTS ARGS...``
    Run ``pitr-wal ARGS...`` exactly like PREFIX/bin/pitr-wal does, after monkeypatching a
    benchmark-local change into the installed module_utils in LIB (``VARIANTS`` is a
    comma-separated list, ``control`` for none). Each variant models one optimisation of the
    push path so that its effect is measured end to end, in the same run as the original.
``codecs LIB REPEAT SEGMENT...``
    Compression and checksum throughput of the collection's own codecs, one core; JSON out.
``stages LIB REPO_BASE SEGMENT...``
    Time spent per stage inside the real ``archive.push`` (wrappers around the functions it
    calls); JSON out.

Only ``os`` and ``sys`` are imported up front: ``push-variant`` is itself timed.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import typing as t

PKG = "ansible_collections.pitr.postgresql.plugins.module_utils"
VARIANTS = (
    "control",
    "nofork",
    "single-sha",
    "writev",
    "lazy-imports",
    "lean-imports",
    "mmap",
    "zstd-direct",
    "zstd-mt",
    "zstd-cli",
    "nofsync",
)
# Imported by module_utils at the top but used only off the push path (command_for, the
# program codecs, lock records): a lazy import would skip them.
LAZY_MODULES = ("shlex", "subprocess", "shutil", "socket")


# ---------------------------------------------------------------------------------------------
# push-variant


def _plain_dataclasses() -> t.Any:
    """A ``dataclasses`` stand-in: what hand-written classes cost at import (nothing).

    The real module imports inspect, ast, dis and tokenize and generates code per class; this
    covers what module_utils use (frozen, order, asdict) for the push path only.
    """
    mod = type(sys)("dataclasses")

    def dataclass(cls: t.Any = None, **options: t.Any) -> t.Any:
        def wrap(c: t.Any) -> t.Any:
            names = list(c.__dict__.get("__annotations__", {}))  # noqa: RUF063 (no inspect)
            defaults = {n: c.__dict__[n] for n in names if n in c.__dict__}

            def __init__(self: t.Any, *args: t.Any, **kwargs: t.Any) -> None:
                values = dict(defaults)
                values.update(zip(names, args, strict=False))
                values.update(kwargs)
                for n in names:
                    object.__setattr__(self, n, values[n])

            def key(self: t.Any) -> tuple[t.Any, ...]:
                return tuple(getattr(self, n) for n in names)

            c.__init__ = __init__
            c.__eq__ = lambda a, b: type(a) is type(b) and key(a) == key(b)
            c.__hash__ = lambda a: hash(key(a))
            c.__repr__ = lambda a: f"{type(a).__name__}{key(a)!r}"
            if options.get("order"):
                c.__lt__ = lambda a, b: key(a) < key(b)
                c.__le__ = lambda a, b: key(a) <= key(b)
                c.__gt__ = lambda a, b: key(a) > key(b)
                c.__ge__ = lambda a, b: key(a) >= key(b)
            c.__dataclass_fields__ = dict.fromkeys(names)
            return c

        return wrap if cls is None else wrap(cls)

    def asdict(obj: t.Any) -> dict[str, t.Any]:
        return {n: getattr(obj, n) for n in obj.__dataclass_fields__}

    mod.dataclass = dataclass  # type: ignore[attr-defined]
    mod.asdict = asdict  # type: ignore[attr-defined]
    return mod


def _put_parts(storage: t.Any, key: str, parts: list[bytes]) -> None:
    """PosixStorage.put with os.writev of the envelope pieces instead of one joined copy."""
    from ansible_collections.pitr.postgresql.plugins.module_utils import storage as st

    final = storage.path(key)
    directory = os.path.dirname(final)
    try:
        storage._makedirs(directory)
        tmp = os.path.join(
            directory,
            f"{st.TEMP_PREFIX}{os.path.basename(final)}.{os.getpid()}.{os.urandom(4).hex()}",
        )
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        raise storage._error("write", key, exc) from exc
    try:
        try:
            views = [memoryview(p) for p in parts]
            while views:
                written = os.writev(fd, views)
                while views and written >= len(views[0]):
                    written -= len(views[0])
                    views.pop(0)
                if views and written:
                    views[0] = views[0][written:]
            st.os.fsync(fd)
        finally:
            os.close(fd)
        storage._link_no_replace(tmp, final, key)
        st._fsync_dir(directory)
    except OSError as exc:
        raise storage._error("write", key, exc) from exc
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


class _Sha256Memo:
    """``hashlib`` stand-in that hands the second sha256 of the same bytes the first result."""

    def __init__(self, real: t.Any, shared: dict[str, t.Any]) -> None:
        self._real = real
        self._shared = shared

    def sha256(self, data: bytes) -> t.Any:
        if self._shared.get("data") is data:
            return self._shared["hash"]
        h = self._real.sha256(data)
        self._shared["data"], self._shared["hash"] = data, h
        return h

    def __getattr__(self, name: str) -> t.Any:
        return getattr(self._real, name)


class _MmapSource:
    """open() stand-in for archive.py: a whole-file read() returns a read-only mmap.

    Saves the 16 MiB copy into a new bytes object (and its page faults); hashlib, zstandard,
    lz4 and bytes.join all take the mapping through the buffer protocol.
    """

    def __init__(self, path: str, mode: str) -> None:
        import builtins

        self._fh = builtins.open(path, mode)  # noqa: SIM115 (closed by __exit__)

    def read(self, n: int = -1) -> t.Any:
        if n is not None and n >= 0:
            return self._fh.read(n)
        import mmap

        if os.fstat(self._fh.fileno()).st_size == 0:
            return b""
        return mmap.mmap(self._fh.fileno(), 0, access=mmap.ACCESS_READ)

    def fileno(self) -> int:
        # The tree maps the source itself now (archive._read): then this variant changes nothing.
        return int(self._fh.fileno())

    def __enter__(self) -> _MmapSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self._fh.close()


def _mmap_open(path: str, mode: str = "r", *args: t.Any, **kwargs: t.Any) -> t.Any:
    if mode == "rb" and not args and not kwargs:
        return _MmapSource(path, mode)
    import builtins

    return builtins.open(path, mode, *args, **kwargs)


class _NoFsyncOs:
    """``os`` stand-in without fsync: only to attribute how much of a push is fsync."""

    def fsync(self, fd: int) -> None:
        return None

    def __getattr__(self, name: str) -> t.Any:
        return getattr(os, name)


def _zstd_backend_direct() -> t.Any:
    """Load python3-zstandard's C backend without the package's __init__ (which imports
    ``platform`` and with it re, collections and more: about 8 ms of CPU per start)."""
    import _imp
    from importlib.machinery import ExtensionFileLoader, ModuleSpec

    pkg = "/usr/lib/python3/dist-packages/zstandard"
    names = [n for n in os.listdir(pkg) if n.startswith("backend_c.") and n.endswith(".so")]
    if not names:
        return None
    path = os.path.join(pkg, names[0])
    spec = ModuleSpec(
        "zstandard.backend_c", ExtensionFileLoader("zstandard.backend_c", path), origin=path
    )
    module = _imp.create_dynamic(spec)
    _imp.exec_dynamic(module)
    return module


def apply_variants(lib: str, variants: t.Collection[str]) -> None:
    """Monkeypatch the installed module_utils for ``variants`` (must precede their import)."""
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"unknown variants {sorted(unknown)}; known: {', '.join(VARIANTS)}")
    sys.path.insert(0, lib)
    if "lazy-imports" in variants or "lean-imports" in variants:
        for name in LAZY_MODULES:
            sys.modules.setdefault(name, type(sys)(name))
    if "lean-imports" in variants:
        sys.modules.setdefault("dataclasses", _plain_dataclasses())
    if "zstd-direct" in variants:
        backend = _zstd_backend_direct()
        if backend is not None:
            sys.modules["zstandard"] = backend
    from ansible_collections.pitr.postgresql.plugins.module_utils import (
        archive,
        compression,
        hostcmd,
        repository,
        storage,
    )

    if "nofork" in variants:
        import signal

        def run_inline(
            work: t.Callable[[], int],
            timeout: float,
            fail_code: int,
            what: str,
            isolate: bool = True,
        ) -> int:
            # The same bound with SIGALRM in this process: no fork, no second address space.
            if timeout <= 0:
                return work()
            previous = signal.signal(signal.SIGALRM, hostcmd._on_alarm)
            signal.setitimer(signal.ITIMER_REAL, timeout)
            try:
                return work()
            except hostcmd._Timeout:
                hostcmd.log(f"{what} FAILED: no answer within {timeout:g} s (--timeout)")
                return fail_code
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
                signal.signal(signal.SIGALRM, previous)

        hostcmd.run_bounded = run_inline
    if "single-sha" in variants:
        shared: dict[str, t.Any] = {}
        memo = _Sha256Memo(archive.hashlib, shared)
        archive.hashlib = memo  # type: ignore[assignment]
        repository.hashlib = memo  # type: ignore[assignment]
    if "writev" in variants:

        def put_wal(
            self: t.Any, name: str, data: bytes, codec: str, level: int | None = None
        ) -> int:
            head, payload = repository.encode_wal_parts(name, data, codec, level)
            _put_parts(self.storage, repository.wal_key(name), [head, payload])
            return len(head) + len(payload)

        repository.Repository.put_wal = put_wal  # type: ignore[method-assign]
    if "mmap" in variants:
        archive.open = _mmap_open  # type: ignore[attr-defined]
    if "zstd-mt" in variants:

        def compress_mt(self: t.Any, data: bytes, level: int) -> bytes:
            return bytes(
                self.mod.ZstdCompressor(level=level, threads=2, write_checksum=True).compress(data)
            )

        compression._ZstdLib.compress = compress_mt  # type: ignore[method-assign]
    if "zstd-cli" in variants:
        compression._cache["zstd"] = compression._Program("zstd", "/usr/bin/zstd")
    if "nofsync" in variants:
        storage.os = _NoFsyncOs()  # type: ignore[assignment]
        storage._fsync_dir = lambda path: None


def push_variant(argv: list[str]) -> int:
    lib, variants = argv[0], [v for v in argv[1].split(",") if v and v != "control"]
    apply_variants(lib, variants)
    from ansible_collections.pitr.postgresql.plugins.module_utils.hostcmd import main

    return main(argv[2:])


# ---------------------------------------------------------------------------------------------
# codecs


def _read_segments(paths: t.Sequence[str]) -> list[bytes]:
    out = []
    for path in paths:
        with open(path, "rb") as fh:
            out.append(fh.read())
    return out


def _measure(fn: t.Callable[[], t.Any], repeat: int) -> dict[str, float]:
    import time

    walls, cpus = [], []
    for _round in range(repeat):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
    walls.sort()
    cpus.sort()
    return {"wall_s": walls[len(walls) // 2], "cpu_s": cpus[len(cpus) // 2]}


def codecs(argv: list[str]) -> int:
    import hashlib
    import json
    import resource

    lib, repeat, paths = argv[0], int(argv[1]), argv[2:]
    sys.path.insert(0, lib)
    from ansible_collections.pitr.postgresql.plugins.module_utils import compression

    segments = _read_segments(paths)
    total = sum(len(s) for s in segments)
    results: dict[str, t.Any] = {"input_bytes": total, "segments": len(segments), "codecs": {}}
    plans: list[tuple[str, str, int, t.Any]] = [
        ("zstd-1 (library)", "zstd", 1, None),
        ("lz4-1 (library)", "lz4", 1, None),
        ("gzip-6 (zlib)", "gzip", 6, None),
        ("zstd-1 (zstd program, one process per segment)", "zstd", 1, "/usr/bin/zstd"),
    ]
    for label, name, level, program in plans:
        if program:
            if not os.path.exists(program):
                continue
            impl: t.Any = compression._Program(name, program)
        else:
            impl = compression._load(name)
            if impl is None:
                results["codecs"][label] = {"error": f"{name} not available"}
                continue
        compressed: list[bytes] = []

        do_compress = functools.partial(_compress_into, impl, level, compressed, segments)

        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        comp = _measure(do_compress, repeat)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        child_cpu = (after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime) / repeat
        stored = sum(len(c) for c in compressed)

        do_decompress = functools.partial(_check_round_trip, impl, compressed, segments, label)

        decomp = _measure(do_decompress, repeat)
        cpu = comp["cpu_s"] + child_cpu
        results["codecs"][label] = {
            "compress_wall_s": comp["wall_s"],
            "compress_cpu_s": cpu,
            "compress_mb_s_wall": total / 1e6 / comp["wall_s"],
            "compress_mb_s_per_core": total / 1e6 / cpu if cpu else None,
            "decompress_wall_s": decomp["wall_s"],
            "decompress_mb_s_wall": total / 1e6 / decomp["wall_s"],
            "stored_bytes": stored,
            "ratio": stored / total,
        }

    def do_sha() -> None:
        for s in segments:
            hashlib.sha256(s).hexdigest()

    sha = _measure(do_sha, repeat)
    results["sha256"] = {"wall_s": sha["wall_s"], "mb_s": total / 1e6 / sha["wall_s"]}
    json.dump(results, sys.stdout)
    return 0


# ---------------------------------------------------------------------------------------------
# stages


class _Clock:
    def __init__(self) -> None:
        import time

        self.now = time.perf_counter
        self.spent: dict[str, float] = {}

    def wrap(self, label: str, fn: t.Callable[..., t.Any]) -> t.Callable[..., t.Any]:
        def timed(*args: t.Any, **kwargs: t.Any) -> t.Any:
            started = self.now()
            try:
                return fn(*args, **kwargs)
            finally:
                self.spent[label] = self.spent.get(label, 0.0) + self.now() - started

        return timed


class _TimedFile:
    def __init__(self, fh: t.Any, clock: _Clock) -> None:
        self._fh = fh
        self.read = clock.wrap("read source file", fh.read)

    def __enter__(self) -> _TimedFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self._fh.close()


class _TimedOs:
    def __init__(self, clock: _Clock) -> None:
        self.write = clock.wrap("write tmp file", os.write)
        self.fsync = clock.wrap("fsync tmp file", os.fsync)
        self.link = clock.wrap("link + unlink tmp", os.link)
        self.unlink = clock.wrap("link + unlink tmp", os.unlink)

    def __getattr__(self, name: str) -> t.Any:
        return getattr(os, name)


def _fsync_dir_real(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def stages(argv: list[str]) -> int:
    import builtins
    import hashlib
    import json
    import time

    lib, repo_base, paths = argv[0], argv[1], argv[2:]
    sys.path.insert(0, lib)
    from ansible_collections.pitr.postgresql.plugins.module_utils import (
        archive,
        compression,
        repository,
        storage,
    )

    clock = _Clock()

    class _Hash:
        def __init__(self, label: str) -> None:
            self.sha256 = clock.wrap(label, hashlib.sha256)

    # Wrap what exists in the tree being measured (the push path changes under this benchmark).
    if hasattr(archive, "hashlib"):
        archive.hashlib = _Hash("sha256 in archive.push")  # type: ignore[assignment]
    repository.hashlib = _Hash("sha256 of the stored bytes (envelope)")  # type: ignore[assignment]
    compression.compress = clock.wrap("compress zstd-1", compression.compress)
    if hasattr(repository, "json"):
        json_stub = type(sys)("json")
        json_stub.dumps = clock.wrap("json header", json.dumps)  # type: ignore[attr-defined]
        json_stub.loads = json.loads  # type: ignore[attr-defined]
        repository.json = json_stub
    storage.os = _TimedOs(clock)  # type: ignore[assignment]
    storage._fsync_dir = clock.wrap("fsync directory", _fsync_dir_real)
    repo_cls = repository.Repository
    repo_cls.identity = clock.wrap("identity + exists checks", repo_cls.identity)  # type: ignore[method-assign]
    repo_cls.wal_header = clock.wrap("identity + exists checks", repo_cls.wal_header)  # type: ignore[method-assign]
    real_open = builtins.open
    if hasattr(archive, "_read"):
        # The source is mapped, not read: its pages are faulted in by the first stage that
        # touches them (compression), so this is only open + mmap.
        archive._read = clock.wrap("open + map source file", archive._read)
    else:
        archive.open = lambda *a, **k: _TimedFile(real_open(*a, **k), clock)  # type: ignore[attr-defined]

    per_stage: dict[str, list[float]] = {}
    totals: list[float] = []
    cpu: list[float] = []
    for i, path in enumerate(paths):
        repo_dir = os.path.join(repo_base, f"stages-{i}")
        os.makedirs(repo_dir)
        repo = repository.Repository.open_posix(repo_dir)
        with real_open(path, "rb") as fh:
            repo.ensure_identity(archive.identity_of_segment(fh.read(8192), path))
        clock.spent = {}
        cpu_started = time.process_time()
        started = time.perf_counter()
        archive.push(repo, path, codec="zstd", level=1)
        total = time.perf_counter() - started
        cpu.append((time.process_time() - cpu_started) * 1000)
        totals.append(total * 1000)
        accounted = 0.0
        for label, spent in clock.spent.items():
            per_stage.setdefault(label, []).append(spent * 1000)
            accounted += spent
        per_stage.setdefault("other (envelope copy, stat, mkdir, Python)", []).append(
            (total - accounted) * 1000
        )
    json.dump({"total_ms": totals, "cpu_ms": cpu, "stages_ms": per_stage}, sys.stdout)
    return 0


def main(argv: list[str]) -> int:
    if not argv:
        raise SystemExit(__doc__)
    job, rest = argv[0], argv[1:]
    if job == "push-variant":
        return push_variant(rest)
    if job == "codecs":
        return codecs(rest)
    if job == "stages":
        return stages(rest)
    raise SystemExit(f"unknown job {job!r}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))


def _compress_into(impl: t.Any, level: int, out: list[bytes], segments: list[bytes]) -> None:
    out.clear()
    out.extend(impl.compress(s, level) for s in segments)


def _check_round_trip(impl: t.Any, blobs: list[bytes], segments: list[bytes], label: str) -> None:
    for blob, seg in zip(blobs, segments, strict=True):
        if len(impl.decompress(blob, len(seg))) != len(seg):
            raise SystemExit(f"{label}: round trip changed the size")

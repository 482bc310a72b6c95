# Copyright: contributors to pitr.postgresql
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Compression codecs for archived WAL.

zstd is the default when the host has it (the ``zstandard`` Python library, Debian package
python3-zstandard, else the ``zstd`` program); lz4 likewise; ``none`` always works. gzip is
available for reading and writing but never chosen automatically (it costs 5-10x the time).

The host command runs as ``python3 -I -S``, which hides the distribution's dist-packages;
libraries are looked for there explicitly, and only when a codec is first used.

Every compressed frame carries the codec's own checksum of the original bytes (zstd: XXH64
content checksum, lz4: XXH32 content checksum, gzip: CRC-32), which decompression verifies:
version 2 of the repository's WAL envelope relies on it (see repository.py).
"""

from __future__ import annotations

import os
import sys

from ansible_collections.pitr.postgresql.plugins.module_utils.errors import PitrError

TYPE_CHECKING = False
if TYPE_CHECKING:
    import typing as t

CODECS = ("zstd", "lz4", "gzip", "none")
AUTO = "auto"
DEFAULT_LEVELS = {"zstd": 1, "lz4": 1, "gzip": 6, "none": 0}
_DIST_PACKAGES = ("/usr/lib/python3/dist-packages",)


class CompressionError(PitrError):
    """A codec is unavailable, or data does not decompress."""


def _import_optional(name: str) -> t.Any:
    if name == "zstandard":
        backend = _zstandard_c_backend()
        if backend is not None:
            return backend
    try:
        return __import__(name, fromlist=["_"])
    except ImportError:
        pass
    added = [p for p in _DIST_PACKAGES if p not in sys.path]
    sys.path.extend(added)
    try:
        return __import__(name, fromlist=["_"])
    except ImportError:
        return None
    finally:
        for p in added:
            sys.path.remove(p)


def _zstandard_c_backend() -> t.Any:
    """python3-zstandard's C backend, loaded without the package's ``__init__``, or None.

    The package imports ``platform`` (and with it more of the standard library) only to pick
    a backend; the C backend is the module the package re-exports. Loading it directly saves
    a few ms of CPU per archived segment. None sends the caller to the package (any backend).
    """
    if "zstandard" in sys.modules:
        return None
    for directory in (*sys.path, *_DIST_PACKAGES):
        pkg = f"{directory or '.'}/zstandard"
        try:
            names = os.listdir(pkg)
        except OSError:
            continue
        for fn in names:
            if fn.startswith("backend_c.") and fn.endswith(".so"):
                try:
                    return _load_extension("zstandard.backend_c", f"{pkg}/{fn}")
                except ImportError:
                    return None
        return None  # the first zstandard package on the path is the one import would use
    return None


def _load_extension(name: str, path: str) -> t.Any:
    # The classes importlib.machinery re-exports, from the modules the interpreter has
    # already loaded at start-up: importlib.machinery itself would import importlib and
    # warnings.
    import _imp
    from _frozen_importlib import ModuleSpec
    from _frozen_importlib_external import ExtensionFileLoader

    spec = ModuleSpec(name, ExtensionFileLoader(name, path), origin=path)
    module = _imp.create_dynamic(spec)
    _imp.exec_dynamic(module)
    if not hasattr(module, "ZstdCompressor"):
        raise ImportError(f"{path} is not python-zstandard's C backend")
    return module


class _Codec:
    name = "none"

    def compress(self, data: bytes, level: int) -> bytes:
        return data

    def decompress(self, data: bytes, size_hint: int) -> bytes:
        return data


class _ZstdLib(_Codec):
    name = "zstd"

    def __init__(self, mod: t.Any) -> None:
        self.mod = mod

    def compress(self, data: bytes, level: int) -> bytes:
        # write_checksum: the frame carries XXH64 of the original bytes, checked on decompress.
        return bytes(self.mod.ZstdCompressor(level=level, write_checksum=True).compress(data))

    def decompress(self, data: bytes, size_hint: int) -> bytes:
        return bytes(self.mod.ZstdDecompressor().decompress(data, max_output_size=size_hint))


class _Lz4Lib(_Codec):
    name = "lz4"

    def __init__(self, mod: t.Any) -> None:
        self.mod = mod

    def compress(self, data: bytes, level: int) -> bytes:
        return bytes(
            self.mod.compress(data, compression_level=level, store_size=True, content_checksum=True)
        )

    def decompress(self, data: bytes, size_hint: int) -> bytes:
        return bytes(self.mod.decompress(data))


class _Gzip(_Codec):
    name = "gzip"

    def compress(self, data: bytes, level: int) -> bytes:
        import gzip

        return gzip.compress(data, compresslevel=level, mtime=0)

    def decompress(self, data: bytes, size_hint: int) -> bytes:
        import gzip

        return gzip.decompress(data)


class _Program(_Codec):
    """A codec through its command-line program (zstd, lz4): one process per call."""

    def __init__(self, name: str, path: str) -> None:
        self.name = name
        self.path = path

    def _run(self, argv: list[str], data: bytes) -> bytes:
        import subprocess  # only on hosts without the library: keep it off the start-up path

        proc = subprocess.run(argv, input=data, capture_output=True, check=False)
        if proc.returncode != 0:
            raise CompressionError(
                f"{self.name} failed (exit {proc.returncode}): "
                f"{proc.stderr.decode(errors='replace').strip()}",
                cmd=argv,
                rc=proc.returncode,
            )
        return proc.stdout

    def compress(self, data: bytes, level: int) -> bytes:
        # Both programs write the content checksum by default; zstd is told so explicitly.
        check = ["--check"] if self.name == "zstd" else []
        return self._run([self.path, f"-{level}", "-q", "-c", *check], data)

    def decompress(self, data: bytes, size_hint: int) -> bytes:
        return self._run([self.path, "-d", "-q", "-c"], data)


_cache: dict[str, _Codec | None] = {}


def _which(program: str) -> str | None:
    import shutil

    return shutil.which(program)


def _load(name: str) -> _Codec | None:
    if name in _cache:
        return _cache[name]
    codec: _Codec | None = None
    if name == "none":
        codec = _Codec()
    elif name == "gzip":
        codec = _Gzip()
    elif name == "zstd":
        mod = _import_optional("zstandard")
        if mod is not None:
            codec = _ZstdLib(mod)
        elif _which("zstd"):
            codec = _Program("zstd", str(_which("zstd")))
    elif name == "lz4":
        mod = _import_optional("lz4.frame")
        if mod is not None:
            codec = _Lz4Lib(mod)
        elif _which("lz4"):
            codec = _Program("lz4", str(_which("lz4")))
    else:
        raise CompressionError(
            f"unknown compression {name!r}: choose one of {', '.join((AUTO, *CODECS))}"
        )
    _cache[name] = codec
    return codec


def available(name: str) -> bool:
    """Whether the host can use codec ``name``."""
    return _load(name) is not None


def resolve(name: str) -> str:
    """Turn ``auto`` into the best codec the host has (zstd, then lz4, then none)."""
    if name != AUTO:
        if _load(name) is None:
            raise CompressionError(
                f"compression {name!r} is not available on this host: install the Debian"
                f" package python3-{'zstandard' if name == 'zstd' else name} (or the {name}"
                " program), or choose another compression"
            )
        return name
    for candidate in ("zstd", "lz4"):
        if _load(candidate) is not None:
            return candidate
    return "none"


def compress(data: bytes, codec: str, level: int | None = None) -> bytes:
    """Compress ``data`` with ``codec`` (already resolved)."""
    impl = _load(codec)
    if impl is None:
        raise CompressionError(f"compression {codec!r} is not available on this host")
    return impl.compress(data, DEFAULT_LEVELS[codec] if level is None else level)


def decompress(data: bytes, codec: str, size_hint: int) -> bytes:
    """Decompress ``data``; CompressionError when the codec is missing or the data is bad."""
    impl = _load(codec)
    if impl is None:
        raise CompressionError(
            f"this file was compressed with {codec!r}, which is not available on this host:"
            f" install python3-{'zstandard' if codec == 'zstd' else codec} or the {codec} program"
        )
    try:
        return impl.decompress(data, size_hint)
    except CompressionError:
        raise
    except Exception as exc:  # each library raises its own error type for corrupt input
        raise CompressionError(f"{codec} data does not decompress: {exc}") from exc


# Frame magic numbers and where each format records that it carries a content checksum.
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"  # frame header descriptor byte follows; bit 2: checksum
_LZ4_MAGIC = b"\x04\x22\x4d\x18"  # FLG byte follows; bit 2: content checksum
_GZIP_MAGIC = b"\x1f\x8b"  # every gzip member ends with CRC-32 and size of its content


def has_content_checksum(payload: bytes | memoryview, codec: str) -> bool:
    """Whether ``payload`` (compressed with ``codec``) carries a checksum of its content
    that decompression verifies. ``none`` has none: its stored bytes are the content."""
    head = bytes(payload[:5])
    if codec == "zstd":
        return head[:4] == _ZSTD_MAGIC and len(head) == 5 and bool(head[4] & 0x04)
    if codec == "lz4":
        return head[:4] == _LZ4_MAGIC and len(head) == 5 and bool(head[4] & 0x04)
    if codec == "gzip":
        return head[:2] == _GZIP_MAGIC
    return False

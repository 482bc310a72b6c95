# Copyright: contributors to pitr.postgresql
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Compression codecs for archived WAL.

zstd is the default when the host has it (the ``zstandard`` Python library, Debian package
python3-zstandard, else the ``zstd`` program); lz4 likewise; ``none`` always works. gzip is
available for reading and writing but never chosen automatically (it costs 5-10x the time).

The host command runs as ``python3 -I -S``, which hides the distribution's dist-packages;
libraries are looked for there explicitly, and only when a codec is first used.
"""

from __future__ import annotations

import sys
import typing as t

from ansible_collections.pitr.postgresql.plugins.module_utils.errors import PitrError

CODECS = ("zstd", "lz4", "gzip", "none")
AUTO = "auto"
DEFAULT_LEVELS = {"zstd": 1, "lz4": 1, "gzip": 6, "none": 0}
_DIST_PACKAGES = ("/usr/lib/python3/dist-packages",)


class CompressionError(PitrError):
    """A codec is unavailable, or data does not decompress."""


def _import_optional(name: str) -> t.Any:
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
        return bytes(self.mod.ZstdCompressor(level=level).compress(data))

    def decompress(self, data: bytes, size_hint: int) -> bytes:
        return bytes(self.mod.ZstdDecompressor().decompress(data, max_output_size=size_hint))


class _Lz4Lib(_Codec):
    name = "lz4"

    def __init__(self, mod: t.Any) -> None:
        self.mod = mod

    def compress(self, data: bytes, level: int) -> bytes:
        return bytes(self.mod.compress(data, compression_level=level, store_size=True))

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
        return self._run([self.path, f"-{level}", "-q", "-c"], data)

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

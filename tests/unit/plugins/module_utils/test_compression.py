# Copyright: contributors to pitr.postgresql
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Compression codecs: round trips, corrupt input, and library/program interchangeability."""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import typing as t
from pathlib import Path

import pytest

from ansible_collections.pitr.postgresql.plugins.module_utils import compression
from ansible_collections.pitr.postgresql.plugins.module_utils.compression import CompressionError
from ansible_collections.pitr.postgresql.plugins.module_utils.errors import PitrError
from tests.support import wal_samples

MiB = 1024 * 1024
AVAILABLE = [c for c in compression.CODECS if compression.available(c)]
COMPRESSING = [c for c in AVAILABLE if c != "none"]

SAMPLES = {
    "empty": b"",
    "one byte": b"\x00",
    "real WAL page": wal_samples.TL1_SEG3_PARTIAL_PAGE,
    "segment-sized, mostly zeros": wal_samples.full_segment(wal_samples.TL1_SEG2_PAGE),
    "random": os.urandom(300_000),
}


@pytest.fixture
def fresh_cache(monkeypatch: pytest.MonkeyPatch) -> dict[str, t.Any]:
    """An empty codec cache for this test only (the real one is restored afterwards)."""
    cache: dict[str, t.Any] = {}
    monkeypatch.setattr(compression, "_cache", cache)
    return cache


def test_none_and_gzip_are_always_available() -> None:
    assert "none" in AVAILABLE and "gzip" in AVAILABLE


def test_this_host_has_zstd_and_lz4() -> None:
    # CI installs python3-zstandard and python3-lz4 (Makefile APT_PACKAGES): if this fails,
    # the round trips below silently cover fewer codecs.
    assert {"zstd", "lz4"} <= set(AVAILABLE)


@pytest.mark.parametrize("codec", AVAILABLE)
@pytest.mark.parametrize("sample", sorted(SAMPLES))
def test_round_trip(codec: str, sample: str) -> None:
    data = SAMPLES[sample]
    packed = compression.compress(data, codec)
    assert compression.decompress(packed, codec, len(data)) == data


@pytest.mark.parametrize("codec", COMPRESSING)
def test_compresses_a_real_sparse_segment(codec: str) -> None:
    data = SAMPLES["segment-sized, mostly zeros"]
    assert len(compression.compress(data, codec)) < len(data) // 100


def test_none_stores_bytes_as_they_are() -> None:
    data = SAMPLES["real WAL page"]
    assert compression.compress(data, "none") == data


@pytest.mark.parametrize(
    ("codec", "levels"), [("zstd", (1, 3, 19)), ("gzip", (1, 6, 9)), ("lz4", (1, 9))]
)
def test_levels_round_trip(codec: str, levels: tuple[int, ...]) -> None:
    if codec not in AVAILABLE:
        pytest.skip(f"{codec} not on this host")
    data = SAMPLES["real WAL page"] * 8
    for level in levels:
        assert (
            compression.decompress(compression.compress(data, codec, level), codec, len(data))
            == data
        )


def test_gzip_output_is_deterministic_and_standard() -> None:
    data = SAMPLES["real WAL page"]
    packed = compression.compress(data, "gzip")
    assert packed == compression.compress(data, "gzip")  # mtime=0: same bytes each time
    assert gzip.decompress(packed) == data


@pytest.mark.parametrize("codec", COMPRESSING)
@pytest.mark.parametrize(
    "damage",
    ["garbage", "truncated", "flipped byte"],
)
def test_corrupt_input_raises_compression_error(codec: str, damage: str) -> None:
    data = SAMPLES["random"]
    packed = bytearray(compression.compress(data, codec))
    if damage == "garbage":
        blob = b"this is not compressed data at all"
    elif damage == "truncated":
        blob = bytes(packed[: len(packed) // 2])
    else:
        # the middle of the payload: lz4/zstd frames carry content checksums, gzip a CRC
        packed[len(packed) // 2] ^= 0xFF
        blob = bytes(packed)
    try:
        result = compression.decompress(blob, codec, len(data))
    except CompressionError as exc:
        assert f"{codec} data does not decompress" in exc.msg
        return
    # A codec without a content checksum may return wrong bytes; the repository's SHA-256 is
    # what catches that. It must never return the original.
    assert result != data


def test_compression_error_is_a_pitr_error() -> None:
    assert issubclass(CompressionError, PitrError)


def test_unknown_codec_is_refused(fresh_cache: dict[str, t.Any]) -> None:
    for call in (
        lambda: compression.resolve("brotli"),
        lambda: compression.compress(b"x", "brotli"),
        lambda: compression.decompress(b"x", "brotli", 1),
        lambda: compression.available("brotli"),
    ):
        with pytest.raises(CompressionError, match="unknown compression 'brotli'"):
            call()


def test_auto_prefers_zstd_then_lz4_then_none(
    fresh_cache: dict[str, t.Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    present = {"zstd": True, "lz4": True}
    real_load = compression._load

    def load(name: str) -> t.Any:
        if name in present and not present[name]:
            return None
        return real_load(name)

    monkeypatch.setattr(compression, "_load", load)
    if "zstd" in AVAILABLE:
        assert compression.resolve("auto") == "zstd"
    present["zstd"] = False
    if "lz4" in AVAILABLE:
        assert compression.resolve("auto") == "lz4"
    present["lz4"] = False
    assert compression.resolve("auto") == "none"  # never gzip automatically


@pytest.mark.parametrize("codec", ["none", "gzip", "zstd", "lz4"])
def test_resolve_explicit_codec(codec: str) -> None:
    if codec not in AVAILABLE:
        pytest.skip(f"{codec} not on this host")
    assert compression.resolve(codec) == codec


def _without_library(monkeypatch: pytest.MonkeyPatch, which: t.Sequence[str]) -> None:
    real = compression._import_optional

    def fake(name: str) -> t.Any:
        if name.split(".")[0] in which:
            return None
        return real(name)

    monkeypatch.setattr(compression, "_import_optional", fake)


@pytest.mark.parametrize(
    ("codec", "package"), [("zstd", "python3-zstandard"), ("lz4", "python3-lz4")]
)
def test_missing_codec_names_the_package_to_install(
    codec: str, package: str, fresh_cache: dict[str, t.Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    _without_library(monkeypatch, ["zstandard", "lz4"])
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert compression.available(codec) is False
    with pytest.raises(CompressionError, match=f"install the Debian package {package}"):
        compression.resolve(codec)
    with pytest.raises(CompressionError, match=f"install {package}"):
        compression.decompress(b"x", codec, 1)
    with pytest.raises(CompressionError, match="not available on this host"):
        compression.compress(b"x", codec)
    assert compression.resolve("auto") == "none"


@pytest.mark.parametrize("codec", ["zstd", "lz4"])
def test_program_is_used_when_the_library_is_missing(
    codec: str, fresh_cache: dict[str, t.Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    if shutil.which(codec) is None:
        pytest.skip(f"no {codec} program")
    _without_library(monkeypatch, ["zstandard", "lz4"])
    impl = compression._load(codec)
    assert isinstance(impl, compression._Program)
    data = SAMPLES["real WAL page"]
    assert compression.decompress(compression.compress(data, codec), codec, len(data)) == data


@pytest.mark.parametrize("codec", ["zstd", "lz4"])
def test_library_and_program_formats_are_interchangeable(
    codec: str, fresh_cache: dict[str, t.Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A host with the library archives; a host with only the program restores (and back).
    program = shutil.which(codec)
    if program is None or codec not in AVAILABLE:
        pytest.skip(f"{codec} library or program missing")
    lib = compression._load(codec)
    assert lib is not None and not isinstance(lib, compression._Program)
    prog = compression._Program(codec, program)
    data = SAMPLES["segment-sized, mostly zeros"][: 2 * MiB] + SAMPLES["random"]
    assert prog.decompress(lib.compress(data, 1), len(data)) == data
    assert lib.decompress(prog.compress(data, 1), len(data)) == data
    # and the command-line tool itself reads what the library wrote
    out = subprocess.run(
        [program, "-d", "-q", "-c"], input=lib.compress(data, 1), capture_output=True, check=True
    )
    assert out.stdout == data


def test_program_failure_is_a_compression_error() -> None:
    prog = compression._Program("zstd", "/bin/false")
    with pytest.raises(CompressionError, match=r"zstd failed \(exit 1\)") as exc:
        prog.decompress(b"x", 1)
    assert exc.value.context["rc"] == 1


def test_program_corrupt_input_is_a_compression_error() -> None:
    program = shutil.which("zstd")
    if program is None:
        pytest.skip("no zstd program")
    prog = compression._Program("zstd", program)
    with pytest.raises(CompressionError, match="zstd failed"):
        prog.decompress(b"not zstd", 8)


def test_libraries_are_found_in_dist_packages_under_isolated_mode(tmp_path: t.Any) -> None:
    # The host command runs as /usr/bin/python3 -I -S: site-packages are hidden, and the
    # module must still find Debian's python3-zstandard / python3-lz4.
    probe = (
        "import sys; sys.path.insert(0, sys.argv[1]);"
        "from ansible_collections.pitr.postgresql.plugins.module_utils import compression as c;"
        "print(c.resolve('auto'), type(c._load('zstd')).__name__, type(c._load('lz4')).__name__)"
    )
    import ansible_collections.pitr.postgresql.plugins.module_utils as mu

    tree = os.path.abspath(os.path.join(os.path.dirname(mu.__file__), *[".."] * 5))
    if not os.path.isdir("/usr/lib/python3/dist-packages/zstandard"):
        pytest.skip("python3-zstandard is not installed")
    out = subprocess.run(
        ["/usr/bin/python3", "-I", "-S", "-c", probe, tree],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.split() == ["zstd", "_ZstdLib", "_Lz4Lib"]


# ---------------------------------------------------------------------------------------------
# the host command's zstandard: the C backend, loaded without the package


HOST_PYTHON = "/usr/bin/python3"
HOST_ZSTANDARD = "/usr/lib/python3/dist-packages/zstandard"
# The directory that holds ansible_collections/ (the module's path as imported, not resolved).
COLLECTIONS = next(
    (str(p.parent) for p in Path(compression.__file__).parents if p.name == "ansible_collections"),
    "",
)


@pytest.mark.skipif(
    not os.path.isdir(HOST_ZSTANDARD) or not os.path.exists(HOST_PYTHON) or not COLLECTIONS,
    reason="needs the distribution's python3 and python3-zstandard",
)
def test_host_command_loads_the_zstandard_c_backend_without_the_package() -> None:
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]);"
        "from ansible_collections.pitr.postgresql.plugins.module_utils import compression as c;"
        "codec = c._load('zstd'); data = bytes(range(256)) * 4096;"
        "blob = c.compress(data, 'zstd');"
        "assert c.has_content_checksum(blob, 'zstd'), 'no frame checksum';"
        "assert c.decompress(blob, 'zstd', len(data)) == data;"
        "print(codec.mod.__name__, 'platform' in sys.modules, 'zstandard' in sys.modules)"
    )
    proc = subprocess.run(
        [HOST_PYTHON, "-I", "-S", "-c", code, COLLECTIONS],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["zstandard.backend_c", "False", "False"]


def test_without_a_c_backend_the_zstandard_package_is_imported(
    fresh_cache: dict[str, t.Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # A zstandard package without backend_c (the cffi build): no direct load, the package's
    # own import decides.
    (tmp_path / "zstandard").mkdir()
    (tmp_path / "zstandard" / "__init__.py").write_text("")
    monkeypatch.setattr(compression.sys, "path", [str(tmp_path)])
    monkeypatch.setattr(compression, "_DIST_PACKAGES", ())
    monkeypatch.delitem(compression.sys.modules, "zstandard", raising=False)
    assert compression._zstandard_c_backend() is None


def test_a_zstandard_already_imported_is_used_as_it_is(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(compression.sys.modules, "zstandard", object())
    assert compression._zstandard_c_backend() is None

# Copyright: contributors to pitr.postgresql
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The host command ``pitr-wal``: archive_command and restore_command on database hosts.

    archive_command = '/usr/bin/python3 -I -S /usr/local/lib/pitr-postgresql/bin/pitr-wal
                       --repo /srv/pitr push %p'
    restore_command = '/usr/bin/python3 -I -S /usr/local/lib/pitr-postgresql/bin/pitr-wal
                       --repo /srv/pitr fetch %f %p'

Exit codes follow PostgreSQL's contract:

- push: 0 only when the file is durably archived (or an identical copy already was);
  every failure exits 1..125 so that pg_stat_archiver.failed_count counts it.
- fetch: 0 after writing a complete, verified file; 1 only when the file is truly not
  archived (the normal end of WAL); any other error, after bounded retries, exits 255 (above
  125) so that recovery stops instead of ending early and promoting.

With ``fetch --prefetch N`` (opt-in) a detached background process keeps the next N segments
fetched and verified in a spool directory (prefetch.py): the next fetch is a rename. Exit codes
are unchanged; "not archived" always comes from the foreground's own look at the repository.

It runs once per WAL segment: standard library only, no argparse, one log line per action
on stderr. It never imports Ansible.
"""

from __future__ import annotations

import os
import sys
import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    import signal
    import typing as t
else:  # the C module: ``signal`` adds enum wrappers the command never needs
    import _signal as signal

PUSH_FAILED = 1
USAGE_FAILED = 2
FETCH_NOT_FOUND = 1
FETCH_FATAL = 255
DEFAULT_TIMEOUT = 60.0
DEFAULT_RETRIES = 3
DEFAULT_RETRY_DELAY = 1.0
PROG = "pitr-wal"

USAGE = f"""usage: {PROG} --repo PATH [options] push WAL_PATH
       {PROG} --repo PATH [options] fetch WAL_NAME DEST_PATH
       {PROG} --repo PATH init (--pgdata DIR | --system-identifier N --pg-major N)
                                [--segment-size BYTES (default: read from DIR/pg_wal)]
options:
  --repo PATH          the repository directory (required)
  --compress CODEC     auto (zstd, else lz4, else none), zstd, lz4, gzip or none [auto]
  --level N            compression level [codec default: zstd 1, lz4 1, gzip 6]
  --timeout SECONDS    fail when one action takes longer (0: no limit) [{DEFAULT_TIMEOUT:g}]
  --retries N          fetch: attempts before giving up on a real error [{DEFAULT_RETRIES}]
  --retry-delay SECS   fetch: pause between attempts [{DEFAULT_RETRY_DELAY:g}]
  --prefetch N         fetch: keep the next N segments fetched ahead in the spool (0: off) [0]
  --spool DIR          fetch: the prefetch spool [pg_wal/pitr-prefetch, in the data directory]
"""


class UsageError(Exception):
    pass


class Options:
    def __init__(self) -> None:
        self.repo = ""
        self.compress = "auto"
        self.level: int | None = None
        self.timeout = DEFAULT_TIMEOUT
        self.retries = DEFAULT_RETRIES
        self.retry_delay = DEFAULT_RETRY_DELAY
        self.pgdata = ""
        self.system_identifier = 0
        self.pg_major = 0
        self.segment_size = 0  # init: from the data directory's WAL, else 16 MiB
        self.prefetch = 0
        self.spool = ""
        self.action = ""
        self.args: list[str] = []


_VALUE_OPTIONS = {
    "--repo": ("repo", str),
    "--compress": ("compress", str),
    "--level": ("level", int),
    "--timeout": ("timeout", float),
    "--retries": ("retries", int),
    "--retry-delay": ("retry_delay", float),
    "--pgdata": ("pgdata", str),
    "--system-identifier": ("system_identifier", int),
    "--pg-major": ("pg_major", int),
    "--segment-size": ("segment_size", int),
    "--prefetch": ("prefetch", int),
    "--spool": ("spool", str),
}
MAX_PREFETCH = 64
_ARITY = {"push": 1, "fetch": 2, "init": 0, "version": 0}


def parse_args(argv: t.Sequence[str]) -> Options:
    """Parse the command line (options may come before or after the action)."""
    opts = Options()
    positional: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            raise UsageError("")
        name, eq, inline = arg.partition("=")
        if name in _VALUE_OPTIONS:
            attr, conv = _VALUE_OPTIONS[name]
            if eq:
                value = inline
            else:
                i += 1
                if i >= len(argv):
                    raise UsageError(f"{name} needs a value")
                value = argv[i]
            try:
                setattr(opts, attr, conv(value))
            except ValueError:
                raise UsageError(f"{name}: {value!r} is not a valid value") from None
        elif arg.startswith("--") and not positional:
            raise UsageError(f"unknown option {arg}")
        else:
            positional.append(arg)
        i += 1
    if not positional:
        raise UsageError("no action given (push, fetch or init)")
    opts.action, opts.args = positional[0], positional[1:]
    if opts.action not in _ARITY:
        raise UsageError(f"unknown action {opts.action!r}")
    if len(opts.args) != _ARITY[opts.action]:
        raise UsageError(f"{opts.action} takes {_ARITY[opts.action]} argument(s)")
    if opts.action != "version" and not opts.repo:
        raise UsageError("--repo is required")
    if opts.timeout < 0 or opts.retries < 1 or opts.retry_delay < 0:
        raise UsageError("--timeout and --retry-delay must be >= 0, --retries >= 1")
    if not 0 <= opts.prefetch <= MAX_PREFETCH:
        raise UsageError(f"--prefetch must be between 0 (off) and {MAX_PREFETCH}")
    return opts


def log(message: str) -> None:
    sys.stderr.write(f"{PROG}: {message}\n")
    sys.stderr.flush()


def _mib(n: int) -> str:
    return f"{n / 1048576:.1f} MiB" if n >= 1048576 else f"{n} bytes"


class _Timeout(BaseException):
    """Raised by SIGALRM; a BaseException so that no ``except Exception`` swallows it."""


def _on_alarm(signum: int, frame: t.Any) -> None:
    raise _Timeout()


# File systems on which a process can sleep uninterruptibly when the server behind them hangs.
_NETWORK_FS = frozenset(
    ("nfs", "nfs4", "cifs", "smb3", "smbfs", "ceph", "glusterfs", "9p", "afs", "lustre", "gpfs")
)


def may_hang(path: str, mounts: str | None = None) -> bool:
    """Whether ``path`` lives on a network or FUSE file system (or we cannot tell).

    ``mounts`` is the text of /proc/self/mounts (read when not given).
    """
    try:
        if mounts is None:
            with open("/proc/self/mounts", encoding="utf-8", errors="replace") as fh:
                mounts = fh.read()
        real = os.path.realpath(path)
    except OSError:
        return True
    best, fstype = "", ""
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        inside = real == point or real.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, fstype = point, fields[2]
    return not best or fstype in _NETWORK_FS or fstype.startswith("fuse")


def run_bounded(
    work: t.Callable[[], int], timeout: float, fail_code: int, what: str, isolate: bool = True
) -> int:
    """Run ``work`` and give up after ``timeout`` seconds.

    With ``isolate`` the work runs in a child process: a child stuck on a hung network file
    system may not even die from SIGKILL (it sleeps uninterruptibly in the kernel); the parent
    does not wait for it, so PostgreSQL gets its answer in time either way. On local storage
    an alarm in this process is enough, and saves the fork (about 6 ms of CPU per segment).
    """
    if timeout <= 0:
        try:
            return work()
        except Exception as exc:  # a bug must still end in the action's failure code
            log(f"{what} FAILED: unexpected {type(exc).__name__}: {exc}")
            return fail_code
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    try:
        if not isolate:
            signal.setitimer(signal.ITIMER_REAL, timeout)
            try:
                return work()
            except _Timeout:
                _log_timeout(what, timeout)
                return fail_code
            except Exception as exc:
                log(f"{what} FAILED: unexpected {type(exc).__name__}: {exc}")
                return fail_code
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # child
            signal.signal(signal.SIGALRM, signal.SIG_DFL)
            code = fail_code
            try:
                code = work()
            except BaseException as exc:  # never let the child return into the caller
                log(f"{what} FAILED: unexpected {type(exc).__name__}: {exc}")
            finally:
                sys.stderr.flush()
                os._exit(code)
        signal.setitimer(signal.ITIMER_REAL, timeout)
        try:
            status = os.waitpid(pid, 0)[1]
        except _Timeout:
            try:  # noqa: SIM105 - contextlib costs every start-up ~2 ms of imports
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
            _log_timeout(what, timeout)
            return fail_code
        code = os.waitstatus_to_exitcode(status)
        return code if code >= 0 else fail_code
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _log_timeout(what: str, timeout: float) -> None:
    log(
        f"{what} FAILED: no answer from the repository within {timeout:g} s (--timeout);"
        " check the storage behind it (a hung mount, a full or slow disk)"
    )


def _push(opts: Options) -> int:
    from ansible_collections.pitr.postgresql.plugins.module_utils import archive
    from ansible_collections.pitr.postgresql.plugins.module_utils.errors import PitrError
    from ansible_collections.pitr.postgresql.plugins.module_utils.repository import Repository

    path = opts.args[0]
    name = os.path.basename(path)
    started = time.monotonic()
    try:
        repo = Repository.open_posix(opts.repo)
        cluster = archive.cluster_identity_from_datadir(opts.pgdata or os.getcwd())
        res = archive.push(repo, path, codec=opts.compress, level=opts.level, cluster=cluster)
    except PitrError as exc:
        log(f"push {name} FAILED: {exc.msg}")
        return PUSH_FAILED
    ms = (time.monotonic() - started) * 1000
    log(
        f"push {name}: {res.action}, {_mib(res.size)} stored as {res.codec}"
        f" {_mib(res.stored_size)} in {ms:.0f} ms"
    )
    return 0


_ATTEMPT_FAILED = 3  # internal: one fetch attempt failed in a way worth retrying


def _fetch_once(opts: Options) -> int:
    from ansible_collections.pitr.postgresql.plugins.module_utils import archive
    from ansible_collections.pitr.postgresql.plugins.module_utils.errors import PitrError
    from ansible_collections.pitr.postgresql.plugins.module_utils.repository import Repository

    name, dest = opts.args
    started = time.monotonic()
    try:
        res = archive.fetch(Repository.open_posix(opts.repo), name, dest)
    except archive.WalNotArchivedError:
        log(f"fetch {name}: not in the archive")
        return FETCH_NOT_FOUND
    except PitrError as exc:
        log(f"fetch {name}: {exc.msg}")
        return _ATTEMPT_FAILED
    ms = (time.monotonic() - started) * 1000
    log(f"fetch {name}: restored {_mib(res.size)} ({res.codec}) in {ms:.0f} ms")
    return 0


def _fetch(opts: Options) -> int:
    """Bounded attempts, each within --timeout; only 'truly absent' may exit 1."""
    name = opts.args[0]
    isolate = may_hang(opts.repo)
    for attempt in range(1, opts.retries + 1):
        code = run_bounded(
            lambda: _fetch_once(opts),
            opts.timeout,
            _ATTEMPT_FAILED,
            f"fetch {name}",
            isolate=isolate,
        )
        if code in (0, FETCH_NOT_FOUND):
            return code
        if attempt < opts.retries:
            log(f"fetch {name}: attempt {attempt} of {opts.retries} failed; retrying")
            time.sleep(opts.retry_delay)
    log(
        f"fetch {name} FAILED after {opts.retries} attempt(s). Recovery must stop here"
        f" (exit {FETCH_FATAL}) rather than treat this as the end of the archive."
    )
    return FETCH_FATAL


def _fetch_prefetching(opts: Options) -> int:
    """fetch with --prefetch: serve the segment from the spool, else fetch it directly; then
    make sure a prefetcher works on the next segments. The prefetch machinery never decides
    the exit code: when it fails, the fetch goes (or went) the direct way."""
    from ansible_collections.pitr.postgresql.plugins.module_utils import prefetch

    name, dest = opts.args
    if not prefetch.is_segment(name):  # history, .backup, .partial: as without prefetch
        return _fetch(opts)
    started = time.monotonic()
    spool = None
    try:
        spool = prefetch.Spool.open(opts.spool or prefetch.DEFAULT_SPOOL, opts.repo)
        size = None
        if spool is not None:
            spool.expect(name)
            size = spool.take(name, dest, opts.timeout or DEFAULT_TIMEOUT)
    except Exception as exc:
        log(f"fetch {name}: the prefetch spool is unusable ({type(exc).__name__}: {exc})")
        size = None
    if size is not None:
        ms = (time.monotonic() - started) * 1000
        log(f"fetch {name}: restored {_mib(size)} from prefetch in {ms:.0f} ms")
        code = 0
    else:
        code = _fetch(opts)
    if spool is not None:
        try:
            if code == 0:
                spool.advance(name, opts.prefetch, opts.repo)
        except Exception as exc:
            log(f"fetch {name}: cannot start the prefetch ({type(exc).__name__}: {exc})")
        finally:
            spool.close()
    return code


def _init(opts: Options) -> int:
    from ansible_collections.pitr.postgresql.plugins.module_utils import archive
    from ansible_collections.pitr.postgresql.plugins.module_utils.errors import PitrError
    from ansible_collections.pitr.postgresql.plugins.module_utils.repository import (
        Repository,
        RepositoryIdentity,
    )

    sysid, major, seg_size = opts.system_identifier, opts.pg_major, opts.segment_size
    if opts.pgdata:
        found = archive.cluster_identity_from_datadir(opts.pgdata, with_segment_size=True)
        if found is None:
            log(f"init FAILED: {opts.pgdata} is not a readable PostgreSQL data directory")
            return PUSH_FAILED
        sysid, major = sysid or found.system_identifier, major or found.pg_major
        seg_size = seg_size or found.wal_segment_size
    if not sysid or not major:
        log("init FAILED: give --pgdata, or --system-identifier and --pg-major")
        return USAGE_FAILED
    try:
        repo = Repository.open_posix(opts.repo)
        identity, created = repo.ensure_identity(
            RepositoryIdentity(sysid, major, seg_size or 16 * 1024 * 1024)
        )
    except PitrError as exc:
        log(f"init FAILED: {exc.msg}")
        return PUSH_FAILED
    state = "initialised" if created else "already belongs to"
    log(f"init: repository {state} {identity.describe()}")
    return 0


def main(argv: t.Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    fetching = "fetch" in args
    try:
        opts = parse_args(args)
    except UsageError as exc:
        if str(exc):
            log(str(exc))
        sys.stderr.write(USAGE)
        # A broken restore_command must stop recovery, not look like the end of WAL.
        return FETCH_FATAL if fetching else USAGE_FAILED
    if opts.action == "version":
        from ansible_collections.pitr.postgresql.plugins.module_utils.version import VERSION

        sys.stdout.write(VERSION + "\n")
        return 0
    if opts.action == "push":
        return run_bounded(
            lambda: _push(opts),
            opts.timeout,
            PUSH_FAILED,
            f"push {opts.args[0]}",
            isolate=may_hang(opts.repo),
        )
    if opts.action == "fetch":
        try:
            return _fetch_prefetching(opts) if opts.prefetch else _fetch(opts)
        except BaseException as exc:  # anything unexpected must stop recovery, not end it
            log(f"fetch {opts.args[0]} FAILED: unexpected {type(exc).__name__}: {exc}")
            return FETCH_FATAL
    return run_bounded(lambda: _init(opts), opts.timeout, PUSH_FAILED, "init")


def _quote(arg: str) -> str:
    # archive_command/restore_command expand %p, %f and %%: a literal % must be doubled.
    import shlex

    return shlex.quote(arg).replace("%", "%%")


def command_for(
    action: str,
    *,
    program: str,
    repo: str,
    python: str = "/usr/bin/python3",
    compress: str | None = None,
    timeout: float | None = None,
    prefetch: int | None = None,
) -> str:
    """The archive_command (action 'push') or restore_command ('fetch') string.

    ``prefetch`` (fetch only; None or 0: off) adds ``--prefetch N``.
    """
    if not os.path.isabs(python) or not os.path.isabs(program):
        raise ValueError("the interpreter and the program must be absolute paths")
    parts = [_quote(python), "-I", "-S", _quote(program), "--repo", _quote(repo)]
    if compress and action == "push":
        parts += ["--compress", _quote(compress)]
    if timeout is not None:
        parts += ["--timeout", f"{timeout:g}"]
    if prefetch and action == "fetch":
        if not 0 < prefetch <= MAX_PREFETCH:
            raise ValueError(f"prefetch must be between 0 (off) and {MAX_PREFETCH}")
        parts += ["--prefetch", str(int(prefetch))]
    parts += ["push", "%p"] if action == "push" else ["fetch", "%f", "%p"]
    return " ".join(parts)


def archive_command_for(**kwargs: t.Any) -> str:
    return command_for("push", **kwargs)


def restore_command_for(**kwargs: t.Any) -> str:
    return command_for("fetch", **kwargs)

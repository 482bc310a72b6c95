# Copyright: contributors to pitr.postgresql
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""WAL prefetch for ``pitr-wal fetch --prefetch N``: a spool directory and a background fetcher.

PostgreSQL asks restore_command for one segment at a time and replays it before asking for the
next, so a serial fetch (start-up, read, decompress, verify, write) adds to every segment's
replay. With ``--prefetch N`` the foreground ``fetch`` also makes sure that a background process
(the prefetcher) fetches the next N segments of the same timeline into a spool directory, as
pgBackRest's asynchronous archive-get does; the next ``fetch`` then only renames a file.

Spool layout (default ``pg_wal/pitr-prefetch`` relative to the data directory, the working
directory of restore_command: on the same file system as ``%p``, and never in a base backup)::

    repository        which repository the spool belongs to (path, identity, identity file stat)
    want              the last segment PostgreSQL asked the foreground for (written before the
                      foreground looks into the spool, so that the prefetcher never fetches
                      again the segment being taken out of it)
    lock              flock()ed by the prefetcher while it lives (its pid inside)
    stop              present: the prefetcher exits (written by discard())
    NAME              a complete segment, verified by archive.fetch (temp file + rename)
    NAME.pitr-tmp.PID a fetch in progress (the prefetcher creates it before reading the archive)

Rules that keep PostgreSQL's restore contract (docs: postgres-contract.md, "Restore"):

- The foreground serves ``SPOOL/NAME`` only for exactly NAME, when the spool belongs to this
  repository, the file has the repository's segment size and its first page header is NAME's
  (system identifier, page address). Anything else: the direct fetch, as without prefetch.
- "Not archived" (exit 1) always comes from the foreground's own look at the repository; the
  prefetcher only ever adds verified files, and skips (and logs) whatever fails.
- The prefetcher works through directory file descriptors: when the data directory is moved
  away during a restore it keeps writing into the moved spool (which nobody reads), never into
  a new directory at the old path; it exits when idle (removing what nobody took once recovery
  is over), stopped, or its spool is gone.

Standard library only, and little of it on the foreground's path: ``threading`` is imported in
the prefetcher only.
"""

from __future__ import annotations

import fcntl
import os
import sys
import time

from ansible_collections.pitr.postgresql.plugins.module_utils.walfile import (
    LONG_HEADER_SIZE,
    WalFileName,
    WalNameError,
    parse_long_page_header,
    segment_name,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from ansible_collections.pitr.postgresql.plugins.module_utils.repository import Repository

DEFAULT_SPOOL = os.path.join("pg_wal", "pitr-prefetch")
MAX_AHEAD = 64
# repository.IDENTITY_KEY, the identity file at the repository's root (a unit test checks it is
# the same): importing repository here would cost every served segment its imports.
IDENTITY_FILE = "pitr-repository.json"
REPOSITORY_FILE = "repository"
WANT_FILE = "want"
LOCK_FILE = "lock"
STOP_FILE = "stop"
TMP_MARK = ".pitr-tmp."
IDLE_SECONDS = 10.0  # the prefetcher exits when the foreground asked for nothing new this long
POLL_SECONDS = 0.05
CLAIM_WAIT_SECONDS = 5.0  # how long a foreground waits for another repository's prefetcher


def log(message: str) -> None:
    sys.stderr.write(f"pitr-wal: {message}\n")
    sys.stderr.flush()


# ---------------------------------------------------------------------------------------------
# pure parts


def is_segment(name: str) -> bool:
    """Whether ``name`` is a plain WAL segment name (not history, .backup or .partial)."""
    try:
        return WalFileName.parse(name).kind == "segment"
    except WalNameError:
        return False


def window(want: str, ahead: int, segment_size: int) -> list[str]:
    """The names of the ``ahead`` segments after ``want`` on its timeline."""
    wal = WalFileName.parse(want)
    first = wal.segment_number(segment_size) + 1
    return [segment_name(wal.timeline, n, segment_size) for n in range(first, first + ahead)]


def repository_marker(repo_path: str, system_identifier: int, segment_size: int) -> str:
    """What the spool's ``repository`` file holds for the repository at ``repo_path``.

    Besides the path and the identity, the identity file's device, inode, size and mtime: a
    repository recreated at the same path (another cluster) is another repository.
    """
    root = os.path.abspath(repo_path)
    return f"{root}\n{system_identifier}\n{segment_size}\n{_identity_stat(root)}\n"


def _identity_stat(root: str) -> str:
    st = os.stat(os.path.join(root, IDENTITY_FILE))
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"


class Marker:
    """The parsed ``repository`` file of a spool."""

    def __init__(self, text: str) -> None:
        lines = text.split("\n")
        if len(lines) != 5 or lines[4]:
            raise ValueError("not a spool repository marker")
        self.root, self.text = lines[0], text
        self.system_identifier, self.segment_size = int(lines[1]), int(lines[2])
        self.identity_stat = lines[3]
        if self.segment_size <= 0 or self.segment_size & (self.segment_size - 1):
            raise ValueError(f"segment size {self.segment_size} is not a power of two")

    def matches(self, repo_path: str) -> bool:
        """Whether the marker is that of the repository at ``repo_path`` (as it is now)."""
        root = os.path.abspath(repo_path)
        try:
            return self.root == root and self.identity_stat == _identity_stat(root)
        except OSError:
            return False


def segment_is(fd: int, name: str, marker: Marker) -> str:
    """Why the open file ``fd`` is not segment ``name`` of ``marker``'s cluster ("": it is)."""
    st = os.fstat(fd)
    if st.st_size != marker.segment_size:
        return f"{st.st_size} bytes, not the repository's segment size {marker.segment_size}"
    try:
        header = parse_long_page_header(os.pread(fd, LONG_HEADER_SIZE, 0))
    except ValueError as exc:
        return str(exc)
    if header.system_identifier != marker.system_identifier:
        return f"system identifier {header.system_identifier}, not {marker.system_identifier}"
    start = WalFileName.parse(name).start_lsn(marker.segment_size)
    if header.pageaddr != start or header.segment_size != marker.segment_size:
        return f"its first page is at {header.pageaddr:#x}, not {start:#x}"
    return ""


# ---------------------------------------------------------------------------------------------
# small file helpers, relative to the spool's directory descriptor


def _read(dir_fd: int, name: str) -> str | None:
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=dir_fd)
    except OSError:
        return None
    try:
        return os.read(fd, 65536).decode("utf-8", "replace")
    finally:
        os.close(fd)


def _write(dir_fd: int, name: str, text: str) -> None:
    """Write a small file atomically (temp + rename) inside the spool."""
    tmp = f"{name}{TMP_MARK}{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600, dir_fd=dir_fd)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)
    os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)


def _unlink(dir_fd: int, name: str) -> None:
    try:  # noqa: SIM105 - contextlib costs every start-up ~2 ms of imports
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass


def _exists(dir_fd: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def _try_lock(dir_fd: int) -> int | None:
    """The spool's lock, taken (its descriptor), or None while a prefetcher holds it."""
    fd = os.open(LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600, dir_fd=dir_fd)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


def _lock_held(dir_fd: int) -> bool:
    fd = _try_lock(dir_fd)
    if fd is None:
        return True
    os.close(fd)
    return False


def _wait_for_lock(dir_fd: int, seconds: float) -> int | None:
    deadline = time.monotonic() + seconds
    while True:
        fd = _try_lock(dir_fd)
        if fd is not None or time.monotonic() >= deadline:
            return fd
        time.sleep(POLL_SECONDS)


# ---------------------------------------------------------------------------------------------
# the foreground


class Spool:
    """The foreground's view of a spool directory that belongs to this repository."""

    def __init__(self, path: str, dir_fd: int, marker: Marker) -> None:
        self.path, self.dir_fd, self.marker = path, dir_fd, marker

    @classmethod
    def open(cls, path: str, repo_path: str) -> Spool | None:
        """Open (create) the spool at ``path`` for the repository; None if it cannot be used.

        A spool of another repository is emptied and claimed for this one first.
        """
        try:
            try:  # noqa: SIM105 - contextlib costs every start-up ~2 ms of imports
                os.mkdir(path, 0o700)
            except FileExistsError:
                pass
            dir_fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as exc:
            log(f"prefetch: cannot use the spool {path} ({exc.strerror}); fetching directly")
            return None
        try:
            text = _read(dir_fd, REPOSITORY_FILE)
            marker = None
            if text is not None:
                try:
                    marker = Marker(text)
                except ValueError:
                    marker = None
            if marker is None or not marker.matches(repo_path):
                marker = _claim(path, dir_fd, repo_path)
            if marker is not None:
                return cls(path, dir_fd, marker)
        except OSError as exc:
            log(f"prefetch: cannot use the spool {path} ({exc.strerror}); fetching directly")
        os.close(dir_fd)
        return None

    def close(self) -> None:
        os.close(self.dir_fd)

    def take(self, name: str, dest: str, wait_seconds: float) -> int | None:
        """Move a complete ``SPOOL/name`` to ``dest``: its size, or None (fetch directly)."""
        fd = self._open_segment(name)
        if fd is None and self._in_progress(name):
            deadline = time.monotonic() + wait_seconds
            while fd is None and time.monotonic() < deadline and self._in_progress(name):
                time.sleep(0.005)
                fd = self._open_segment(name)
            if fd is None:
                fd = self._open_segment(name)
        if fd is None:
            return None
        try:
            why = segment_is(fd, name, self.marker)
        finally:
            os.close(fd)
        if why:
            log(f"prefetch: the spooled {name} is not that segment ({why}); removed it")
            _unlink(self.dir_fd, name)
            return None
        # A rename within one file system: dest is complete or absent, never half-written.
        os.replace(name, dest, src_dir_fd=self.dir_fd)
        return self.marker.segment_size

    def _open_segment(self, name: str) -> int | None:
        try:
            return os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=self.dir_fd)
        except FileNotFoundError:
            return None

    def _in_progress(self, name: str) -> bool:
        prefix = name + TMP_MARK
        busy = any(f.startswith(prefix) for f in os.listdir(self.dir_fd))
        return busy and _lock_held(self.dir_fd)

    def expect(self, name: str) -> None:
        """Record that PostgreSQL asks for ``name``, before it is taken out of the spool.

        The prefetcher skips segments at or below ``want`` and keeps ``want`` itself in the
        spool: written first, it can no longer see ``name`` gone, take it for missing and fetch
        it a second time while the foreground takes it.
        """
        _write(self.dir_fd, WANT_FILE, name + "\n")

    def advance(self, name: str, ahead: int, repo_path: str) -> None:
        """``name`` was handed out: make sure a prefetcher works on the next ``ahead`` segments
        (``want`` says ``name`` already, see :meth:`expect`)."""
        if _exists(self.dir_fd, STOP_FILE):
            return  # discarded: no new prefetcher
        lock_fd = _try_lock(self.dir_fd)
        if lock_fd is None:
            return  # one is running; it reads the new want
        spawn(self.dir_fd, lock_fd, os.path.abspath(repo_path), ahead, self.marker)


def _claim(path: str, dir_fd: int, repo_path: str) -> Marker | None:
    """Empty a spool of another (or no) repository and record this one's marker."""
    from ansible_collections.pitr.postgresql.plugins.module_utils.repository import Repository

    identity = Repository.open_posix(repo_path).identity()
    if identity is None:
        return None  # the direct fetch says what is wrong with the repository
    lock_fd = _try_lock(dir_fd)
    if lock_fd is None:  # another repository's prefetcher: ask it to stop
        _write(dir_fd, STOP_FILE, "claimed by another repository\n")
        lock_fd = _wait_for_lock(dir_fd, CLAIM_WAIT_SECONDS)
        if lock_fd is None:
            log(f"prefetch: the spool {path} is busy with another repository; fetching directly")
            return None
    try:
        removed = 0
        for fn in os.listdir(dir_fd):
            if fn != LOCK_FILE:
                _unlink(dir_fd, fn)
                removed += 1
        text = repository_marker(repo_path, identity.system_identifier, identity.wal_segment_size)
        _write(dir_fd, REPOSITORY_FILE, text)
    finally:
        os.close(lock_fd)
    if removed:
        log(f"prefetch: emptied the spool {path} (it held {removed} file(s) of another repository)")
    return Marker(text)


def spawn(dir_fd: int, lock_fd: int, repo_root: str, ahead: int, marker: Marker) -> None:
    """Start a detached prefetcher that inherits the taken lock (double fork, new session).

    The caller returns at once; PostgreSQL's system() does not wait for the prefetcher, whose
    stdin and stdout are /dev/null and whose stderr stays the server log's.
    """
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        os.close(lock_fd)
        os.waitpid(pid, 0)
        return
    code = 1
    try:
        os.setsid()
        if os.fork():
            code = 0
        else:
            null = os.open(os.devnull, os.O_RDWR)
            os.dup2(null, 0)
            os.dup2(null, 1)
            os.close(null)
            # The data directory: restore_command runs in it (a later look for recovery.signal).
            try:
                data_fd: int | None = os.open(".", os.O_RDONLY | os.O_DIRECTORY)
            except OSError:
                data_fd = None
            # Only the spool's descriptors: nothing else the server let restore_command inherit.
            keep = sorted({dir_fd, lock_fd} | ({data_fd} if data_fd is not None else set()))
            low = 3
            for fd in keep:
                os.closerange(low, fd)
                low = fd + 1
            os.closerange(low, 1 << 20)
            os.chdir("/")
            code = run(dir_fd, lock_fd, repo_root, ahead, marker, data_dir_fd=data_fd)
    except BaseException as exc:
        log(f"prefetch FAILED: unexpected {type(exc).__name__}: {exc}")
    finally:
        sys.stderr.flush()
        os._exit(code)


# ---------------------------------------------------------------------------------------------
# the prefetcher


def workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


class Prefetcher:
    """Fetches want+1..want+N into the spool; one per spool (it holds the lock)."""

    def __init__(
        self, dir_fd: int, repo: Repository, ahead: int, marker: Marker, threads: int
    ) -> None:
        import threading

        self.dir_fd, self.repo, self.ahead, self.marker = dir_fd, repo, ahead, marker
        self.threads = threads
        self.failed: set[str] = set()
        self.mutex = threading.Lock()
        self._threading = threading

    def should_stop(self) -> str:
        if os.fstat(self.dir_fd).st_nlink == 0:
            return "its spool was removed"
        if _exists(self.dir_fd, STOP_FILE):
            return "asked to stop"
        return ""

    def want(self) -> str:
        text = (_read(self.dir_fd, WANT_FILE) or "").strip()
        return text if is_segment(text) else ""

    def tidy(self, keep: set[str]) -> None:
        """Remove segments outside the wanted window (older ones, other timelines) and the temp
        files of a prefetcher that died; never the foreground's small files (want, its temp)."""
        ours = f"{TMP_MARK}{os.getpid()}"
        for fn in os.listdir(self.dir_fd):
            if fn in keep or fn.endswith(ours) or not is_segment(fn[:24]):
                continue
            if len(fn) == 24 or fn[24:].startswith(TMP_MARK):
                _unlink(self.dir_fd, fn)

    def empty(self) -> int:
        """Remove the spooled segments (and dead temp files), keeping the spool's own files; how
        many segments. A foreground taking one at the same moment finds it gone and fetches it
        directly."""
        before = sum(1 for fn in os.listdir(self.dir_fd) if len(fn) == 24 and is_segment(fn))
        self.tidy(set())
        return before

    def round(self, want: str) -> None:
        """Fetch the missing segments of the window after ``want``, stopping at an absent one."""
        names = window(want, self.ahead, self.marker.segment_size)
        # want itself too: the foreground may be taking it right now (expect() came first)
        self.tidy({want, *names})
        todo = []
        for n in names:
            if n in self.failed or _exists(self.dir_fd, n):
                continue
            if self.repo.wal_stat(n) is None:
                break  # not archived (yet): nothing past it this round
            todo.append(n)
        if not todo:
            return
        state = {"next": 0, "end": len(todo)}

        def work() -> None:
            while True:
                with self.mutex:
                    i = state["next"]
                    if i >= state["end"]:
                        return
                    state["next"] = i + 1
                if self.should_stop() or todo[i] <= self.want():
                    continue  # PostgreSQL is past it already (or we are stopping)
                if not self.fetch_one(todo[i]):
                    with self.mutex:
                        state["end"] = min(state["end"], i)

        pool = [self._threading.Thread(target=work, daemon=True) for _unused in range(self.threads)]
        for th in pool:
            th.start()
        for th in pool:
            th.join()

    def fetch_one(self, name: str) -> bool:
        """Fetch one segment into the spool; False when it is not archived (yet)."""
        from ansible_collections.pitr.postgresql.plugins.module_utils import archive
        from ansible_collections.pitr.postgresql.plugins.module_utils.errors import PitrError

        mark = f"{name}{TMP_MARK}{os.getpid()}"
        # The temp file archive.fetch will write, created now: the foreground that asks for
        # this segment meanwhile waits for it instead of fetching it a second time.
        os.close(os.open(mark, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600, dir_fd=self.dir_fd))
        try:
            archive.fetch(self.repo, name, name, dir_fd=self.dir_fd)
            return True
        except archive.WalNotArchivedError:
            return False
        except PitrError as exc:
            self.failed.add(name)
            log(f"prefetch {name}: {exc.msg} (left to the direct fetch)")
            return True
        except OSError as exc:
            self.failed.add(name)
            log(f"prefetch {name}: {exc} (left to the direct fetch)")
            return True
        finally:
            _unlink(self.dir_fd, mark)

    def loop(self, idle_seconds: float) -> str:
        last, since = "", time.monotonic()
        while True:
            why = self.should_stop()
            if why:
                return why
            want = self.want()
            if want != last:
                last, since = want, time.monotonic()
            elif time.monotonic() - since > idle_seconds:
                return f"idle for {idle_seconds:g} s"
            if want:
                self.round(want)
            time.sleep(POLL_SECONDS)


def _recovering(data_dir_fd: int) -> bool:
    """Whether the data directory still asks for recovery (or cannot be looked at)."""
    try:
        return any(_exists(data_dir_fd, n) for n in ("recovery.signal", "standby.signal"))
    except OSError:
        return True


def run(
    dir_fd: int,
    lock_fd: int,
    repo_root: str,
    ahead: int,
    marker: Marker,
    idle_seconds: float = IDLE_SECONDS,
    data_dir_fd: int | None = None,
) -> int:
    """The prefetcher's life: it holds the spool's lock (``lock_fd``, taken) until it ends.

    Idle (PostgreSQL asked for nothing new for ``idle_seconds``) in a data directory
    (``data_dir_fd``: where restore_command ran) that has neither ``recovery.signal`` nor
    ``standby.signal`` any more, recovery is over: it removes the segments it fetched and
    nobody took before it exits, as nothing else would ever remove them from ``pg_wal`` (a
    server paused at its target and promoted by hand later fetches the last segment again,
    which starts a prefetcher). While recovery goes on (a slow segment, a pause), they stay for
    the next fetch, as without a data directory to look at.
    """
    from ansible_collections.pitr.postgresql.plugins.module_utils.repository import Repository

    os.ftruncate(lock_fd, 0)
    os.pwrite(lock_fd, f"{os.getpid()}\n".encode(), 0)
    threads = workers()
    log(f"prefetch: started (pid {os.getpid()}, {ahead} segment(s) ahead, {threads} thread(s))")
    p = Prefetcher(dir_fd, Repository.open_posix(repo_root), ahead, marker, threads)
    idle = False
    try:
        why = p.loop(idle_seconds)
        idle = why.startswith("idle")
    except Exception as exc:  # a repository that fails: the foreground fetches directly
        why = f"{type(exc).__name__}: {getattr(exc, 'msg', exc)}"
    if idle and data_dir_fd is not None and not _recovering(data_dir_fd):
        try:
            removed = p.empty()
        except OSError as exc:
            why += f"; cannot remove the unused segments ({exc.strerror})"
        else:
            why += f"; removed {removed} unused segment(s)" if removed else ""
    log(f"prefetch: stopped ({why})")
    return 0


# ---------------------------------------------------------------------------------------------
# after the restore


def default_spool(datadir: str) -> str:
    """The spool of a data directory when restore_command gives no --spool."""
    return os.path.join(datadir, DEFAULT_SPOOL)


def discard(spool_dir: str, wait_seconds: float = 10.0) -> bool:
    """Stop the spool's prefetcher and remove the spool directory.

    Writes the stop file, waits up to ``wait_seconds`` until no prefetcher holds the lock, then
    removes the directory (a prefetcher still alive sees it gone and exits without writing).
    Returns whether the prefetcher was gone within the time (True also when there was none or
    no spool). OSError when the directory cannot be removed.
    """
    try:
        dir_fd = os.open(spool_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return True
    try:
        _write(dir_fd, STOP_FILE, "discarded\n")
        lock_fd = _wait_for_lock(dir_fd, wait_seconds)
        if lock_fd is not None:
            os.close(lock_fd)
    finally:
        os.close(dir_fd)
    import shutil

    shutil.rmtree(spool_dir)
    return lock_fd is not None

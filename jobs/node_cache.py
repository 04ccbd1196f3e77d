"""Row groups read once per machine and shared by its training workers.

Every worker of a run reads the row groups of the window it takes a slice of (see
`jobs.loader`): the W workers of an 8-GPU machine would read each row group eight times
from storage, and hold eight copies of two windows in memory. A `NodeCache` reads it once.
The first worker to want a row group reads it from storage, under a file lock, and saves its
JPEGs to a file in a folder of the machine's shared memory (``/dev/shm``); the others find
the file there and map it. The page cache holds one copy, and every worker's files are
views into it.

The files only ever speed up reading, never decide what is read, so no failure is worse
than the reads it saves:
- a file is written under a temporary name and renamed, so none is ever seen half written;
- a worker that dies while reading releases its lock with its process, and the next one
  reads the row group itself;
- a file deleted before a worker mapped it (its window ended for the others) is read again;
- a folder short of space is not written to until it has room again: Ray's object store
  shares /dev/shm, allocates its pages as it fills, and dies of a full one, so the cache
  keeps free the larger of a quarter of the filesystem and the object store's size (free
  space already lacks what the store holds: this errs on the safe side);
- a folder that cannot be used at all (not this user's, not writable, out of descriptors)
  leaves the worker reading as without one.

A worker deletes the file of a row group a few steps after its loader dropped it: every
worker of the machine has mapped it by then (workers step together, their loaders within a
few steps of each other), and a mapped file lives on until unmapped. A file is keyed by its
shard's URL and size and its row group's place in it, and must hold the row group's number
of rows: a file left by an earlier run of the same name is used only if it is the same row
group. Workers hold a shared lock on the folder's ``.users`` file while they use it: the
last to close it deletes the folder, and a folder no live process holds (its run was
killed) is deleted by the next run that starts on the machine.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import mmap
import os
import resource
import shutil
import stat
import tempfile
from collections.abc import Callable, Sequence
from typing import TypeVar

from jobs import storage
from jobs.loader import JpegFiles

log = logging.getLogger(__name__)

FOLDER_PREFIX = "colorcore-rowgroups-"
USERS_FILE = ".users"
LOCK_STRIPES = 4096  # lock files: row groups whose keys share one wait for each other
DESCRIPTORS = 1 << 16  # the soft limit of open files a worker raises itself to
FREE_FLOOR = 0.25  # of the folder's filesystem kept free at least (see reserve_bytes)
ROOTS = ("/dev/shm", tempfile.gettempdir())  # shared memory, else the temporary folder

T = TypeVar("T")


class NodeCache:
    """The row-group files of one run on this machine, in `folder`; `local_rank` of
    `local_world_size` workers here (it staggers which row groups each reads first)."""

    def __init__(
        self,
        folder: str,
        users_fd: int,
        local_rank: int,
        local_world_size: int,
        reserve_bytes: int = 0,
    ):
        self.folder, self._users_fd = folder, users_fd
        self.local_rank, self.local_world_size = local_rank, local_world_size
        self._saving = True  # until a write fails for a reason other than space
        self._floor = max(FREE_FLOOR * shutil.disk_usage(folder).total, reserve_bytes)
        self._said: set[str] = set()  # troubles already logged

    @classmethod
    def open(
        cls,
        run: str,
        *,
        local_rank: int,
        local_world_size: int,
        need_bytes: int,
        reserve_bytes: int = 0,
        roots: Sequence[str] = ROOTS,
    ) -> NodeCache | None:
        """The cache of run `run` (any string naming it, such as its URL) for a worker;
        None where there is nothing to share (one worker here) or no root of `roots` has a
        size of at least `need_bytes` (a root's size, not its free space: every worker of a
        machine must choose the same one). `reserve_bytes` (the size of the machine's Ray
        object store) is kept free, if more than a quarter of the root."""
        if local_world_size < 2:
            return None
        root = next((r for r in roots if _size(r) >= need_bytes), None)
        if root is None:
            log.warning(
                "loader: no folder of %s holds %.1f GB: the %d workers here read every row "
                "group each", ", ".join(roots), need_bytes / 1e9, local_world_size,
            )  # fmt: skip
            return None
        name = folder_name(run)
        folder = os.path.join(root, name)
        users_fd, cache = -1, None
        try:
            sweep(root, keep=name)
            _raise_descriptor_limit()
            users_fd = _join(folder)
            cache = cls(folder, users_fd, local_rank, local_world_size, reserve_bytes)
            _remove_dead_writers(folder)
        except OSError as error:  # not this user's folder, or none can be made
            if cache is not None:
                cache.close()
            elif users_fd >= 0:
                os.close(users_fd)
            log.warning(
                "loader: %s cannot hold shared row groups (%s): the workers here read every "
                "row group each", folder, error,
            )  # fmt: skip
            return None
        log.info(
            "loader: row groups read once for the %d workers here, in %s", local_world_size, folder
        )
        return cache

    def spread(self, items: Sequence[T]) -> list[T]:
        """`items` (row groups about to be read, the same on the workers of one read group)
        rotated by this worker's share: the workers start on different ones instead of
        queueing on one lock."""
        cut = self.local_rank * len(items) // self.local_world_size
        return [*items[cut:], *items[:cut]]

    def get(self, key: str, read: Callable[[], JpegFiles], rows: int) -> JpegFiles:
        """The files saved as `key`, mapped; else `read()`'s, saved as `key` for the others
        (and mapped, so that this worker's copy is the shared one). A saved file of other
        than `rows` files is not this row group's: it is read again."""
        path = os.path.join(self.folder, key)
        if (files := self._mapped(path, rows)) is not None:
            return files
        if not self._saving or self._short_of_space(0):  # read as it cannot be kept: no
            return read()  # worker waits on another's read that it then reads again
        try:
            lock = self._lock(key)
        except OSError as error:  # the folder is gone, or no descriptor is left
            self._say("cannot be locked", error)
            return read()
        try:
            if (files := self._mapped(path, rows)) is not None:  # read by another meanwhile
                return files
            files = read()
            if len(files) and not files.nbytes:  # a damaged row group's stand-in: not kept,
                return files  # so that it is read again once the shard is whole
            shared = self._mapped(path, rows) if self._save(path, files) else None
            return files if shared is None else shared
        finally:
            os.close(lock)  # and with it the lock

    def drop(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(self.folder, key))

    def close(self) -> None:
        """Stops using the folder; the last worker to close it deletes it."""
        if self._users_fd < 0:
            return
        try:
            fcntl.flock(self._users_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            shutil.rmtree(self.folder, ignore_errors=True)
        except BlockingIOError:
            pass  # others still use it
        finally:
            os.close(self._users_fd)
            self._users_fd = -1

    def _lock(self, key: str) -> int:
        """A descriptor holding the lock of `key`'s stripe; closing it releases the lock, as
        the end of the process does."""
        stripe = int(hashlib.blake2b(key.encode(), digest_size=4).hexdigest(), 16) % LOCK_STRIPES
        fd = os.open(os.path.join(self.folder, f".lock-{stripe}"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _save(self, path: str, files: JpegFiles) -> bool:
        """Whether `files` could be saved at `path`. Not while the folder's filesystem is
        short of space (then the next row group tries again); never again after a failure
        for another reason."""
        if not self._saving or self._short_of_space(files.nbytes):
            return False
        tmp = storage.temporary_beside(path)
        try:
            with open(tmp, "wb") as f:
                files.save(f)
            os.replace(tmp, path)
            return True
        except OSError as error:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            full = error.errno in (errno.ENOSPC, errno.EDQUOT)
            self._saving = full
            self._say("is full" if full else "cannot be written", error)
            return False

    def _mapped(self, path: str, rows: int) -> JpegFiles | None:
        """The files saved at `path`, mapped copy-on-write (writable for torch, and shared
        with every other mapping until written; each worker's mappings count in full toward
        the kernel's commit limit, without using memory of their own), or read where they
        cannot be mapped; None where there is no such file, it cannot be opened, or it is
        damaged or not of `rows` files (then deleted, to be read again)."""
        try:
            with open(path, "rb") as f:
                try:
                    buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
                except (OSError, ValueError):  # out of mappings or descriptors; an empty file
                    buffer = bytearray(f.read())
        except FileNotFoundError:
            return None
        except OSError as error:
            self._say("cannot be read", error)
            return None
        try:
            files = JpegFiles.load(memoryview(buffer))
            if len(files) == rows:
                return files
            problem = f"{len(files)} files, not {rows}"
        except ValueError as error:
            problem = str(error)
        log.warning("loader: %s is damaged (%s): read again from storage", path, problem)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return None

    def _short_of_space(self, nbytes: int) -> bool:
        """Whether saving `nbytes` would leave less free than the floor (said once), or the
        folder is gone."""
        try:
            if shutil.disk_usage(self.folder).free - nbytes >= self._floor:
                return False
        except OSError as error:  # the folder is gone (a cleaner of /tmp, say)
            self._say("cannot be used", error)
            return True
        self._say("is short of space", f"{self._floor / 1e9:.1f} GB are kept free")
        return True

    def _say(self, trouble: str, why: object) -> None:
        """Logs each kind of trouble with the folder once."""
        if trouble not in self._said:
            self._said.add(trouble)
            log.warning(
                "loader: %s %s (%s): some row groups are read from storage by each worker",
                self.folder, trouble, why,
            )  # fmt: skip


def folder_name(run: str) -> str:
    """The name of run `run`'s folder, in the root each machine chooses."""
    return FOLDER_PREFIX + hashlib.blake2b(run.encode(), digest_size=8).hexdigest()


def _size(root: str) -> int:
    try:
        return shutil.disk_usage(root).total if os.access(root, os.W_OK) else 0
    except OSError:
        return 0


def _raise_descriptor_limit() -> None:
    """Each mapped file holds a descriptor (Python's mmap keeps one) and a worker maps the
    row groups of two windows and more: the soft limit is raised towards the hard one (not
    beyond `DESCRIPTORS`: some code loops over every possible descriptor)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = DESCRIPTORS if hard == resource.RLIM_INFINITY else min(hard, DESCRIPTORS)
    if soft != resource.RLIM_INFINITY and soft < want:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def _join(folder: str) -> int:
    """A descriptor holding a shared lock on `folder`'s users file (made if need be); a
    folder deleted by a sweep while this joined it is made again."""
    users = os.path.join(folder, USERS_FILE)
    while True:
        os.makedirs(folder, mode=0o700, exist_ok=True)
        made = os.lstat(folder)
        if made.st_uid != os.getuid() or made.st_mode & 0o077 or not stat.S_ISDIR(made.st_mode):
            raise PermissionError(f"{folder} is not a folder of this user's alone")
        try:
            fd = os.open(users, os.O_RDWR | os.O_CREAT, 0o600)
        except FileNotFoundError:  # the folder was swept in between
            continue
        fcntl.flock(fd, fcntl.LOCK_SH)
        with contextlib.suppress(FileNotFoundError):
            if os.stat(users).st_ino == os.fstat(fd).st_ino:
                return fd
        os.close(fd)  # locked a users file a sweep had deleted: join the folder made anew


def _remove_dead_writers(folder: str) -> None:
    """Deletes the files that workers killed while saving left (a restarted run keeps its
    folder): they would hold the space the cache keeps free for as long as the run lives."""
    for name in os.listdir(folder):
        storage.remove_if_left_behind(os.path.join(folder, name))


def sweep(root: str, *, keep: str = "") -> list[str]:
    """Deletes the cache folders in `root` that no live process uses (but `keep`); returns
    their names. A folder whose users file is not there yet is being made: it stays."""
    swept = []
    for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        if not name.startswith(FOLDER_PREFIX) or name == keep:
            continue
        try:
            fd = os.open(os.path.join(root, name, USERS_FILE), os.O_RDWR)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
            swept.append(name)
        except BlockingIOError:
            pass
        finally:
            os.close(fd)
    if swept:
        log.info("loader: deleted %d row-group folders of ended runs in %s", len(swept), root)
    return swept

"""One driver at a time for a job's folder: a training run, a search, a dataset, an
evaluation, a colorized archive.

A second driver of the same folder is the same command run again while the first still runs:
`ray job submit` whose log stream a Ctrl-C ended leaves its job running, and a re-run then
resumes from the checkpoint the first is still training past. Both would write the same
checkpoints, tables and records. `DriverLease` refuses it, naming the driver it would clash
with.

The lease is a file of `LEASE_DIR` in the folder, one a generation (``000001.json``, ...),
created only where there is none (S3's If-None-Match, a local hard link:
`storage.create_bytes`); the newest generation holds the folder. It names its holder: its
machine (`storage.MACHINE` and the boot), process id and start, host name, Ray job id and a
token of its own, and counts its renewals, rewritten every `RENEW_S` by a thread of the
holder. A holder that ended without giving it back (killed, its node lost) is taken over by
creating the next generation, which of two drivers racing for it only one can: on the same
machine at once, its process being gone; from another machine once its lease has gone
`EXPIRE_S` without a renewal, watched from here rather than read off timestamps, which the
two machines' clocks may write apart. A holder stops its job where another driver may have
the folder: its lease taken over (a newer generation, or its own rewritten), or its lease
unrenewed for `FENCE_S` (renewals failing, or one stuck in a storage call), past which a
watcher elsewhere may take over before it can tell.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from jobs import storage

log = logging.getLogger(__name__)

LEASE_DIR = "driver_lease"
RENEW_S = 15.0
EXPIRE_S = 60.0  # unrenewed this long, a lease from another machine is taken over
WATCH_S = 2.0  # between looks at another machine's lease
FENCE_S = 45.0  # unrenewed this long, a holder stops: EXPIRE_S less a margin


def _boot() -> str:
    """This boot of the machine: hosts of one name (outside containers, whose pid namespaces
    `storage.MACHINE` tells apart) count their processes apart."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()[:8]
    except OSError:
        return ""


MACHINE = f"{storage.MACHINE}-{_boot()}"


def _process_stat(pid: int) -> tuple[str, str] | None:
    """The process's state letter and start (clock ticks since boot) from /proc, where it
    has an entry: with its id, the start names it apart from a later process given the
    same id."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        return fields[0], fields[19]
    except (OSError, IndexError):
        return None


def _holder_alive(holder: dict[str, Any]) -> bool:
    """Whether a lease's holder, a process of this machine, still runs (not one ended and
    not yet waited for by its parent, a zombie)."""
    pid = holder.get("pid")
    if not isinstance(pid, int) or not storage.process_alive(pid):
        return False
    stat = _process_stat(pid)
    if stat is None:  # no /proc: its id alone
        return True
    state, start = stat
    return state not in ("Z", "X") and holder.get("start") in (None, start)


LOST_EXIT_STATUS = 3


def _stop_the_job() -> None:
    """Ends this process at once, with `LOST_EXIT_STATUS` (its local Ray instance and its
    Ray workers go with it). Not a Ctrl-C: Ray's handlers of one let Tune write its tables
    into the folder and Ray Train exit 0, and a driver started in the background ignores
    it."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(LOST_EXIT_STATUS)


class DriverLease:
    """``with DriverLease(url, what="run x"):`` the folder `url` for this driver alone, for
    the block; a ValueError when another driver holds it, or with `wait`, once it has given
    the folder back. `on_lost` is called (from the renewing thread) where another driver
    may have taken the folder over meanwhile: by default it ends the process."""

    def __init__(
        self,
        url: str,
        s3: storage.S3Options | None = None,
        *,
        what: str,
        wait: bool = False,
        on_lost: Callable[[], None] = _stop_the_job,
    ) -> None:
        self.folder, self.s3, self.what = storage.join(url, LEASE_DIR), s3, what
        self.wait, self.on_lost = wait, on_lost
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._renewed = 0.0  # time.monotonic() of the last renewal
        self._losing, self._lost = threading.Lock(), False
        self._url: str | None = None  # the generation held
        self._renewals = 0
        self._made: list[str] = []
        self._me = {
            "machine": MACHINE,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "start": (_process_stat(os.getpid()) or (None, None))[1],
            "ray_job": _submission_id(),
            "token": uuid.uuid4().hex,
        }

    def __enter__(self) -> DriverLease:
        if storage.is_local(self.folder):  # the folders the lease makes, taken away after
            path = storage.split_url(self.folder)[1]
            while path and not os.path.isdir(path):
                self._made.append(path)
                path = os.path.dirname(path)
        self._take()
        self._renewed = time.monotonic()
        self._threads = [
            threading.Thread(target=work, name=f"driver-lease-{work.__name__[1:]}", daemon=True)
            for work in (self._renew, self._fence)
        ]
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        with self._losing:
            self._stop.set()
        for thread in self._threads:  # a renewal under way first ends: not written after
            thread.join()
        with contextlib.suppress(Exception):  # a lease left behind lapses by itself
            if self._url and self._ours(self._read(self._url)):
                storage.remove([self._url], self.s3)
            for folder in self._made:  # deepest first, while empty (a refused job's output)
                os.rmdir(folder)

    def _generations(self) -> list[str]:
        """The lease files, oldest first."""
        found = [u for u in storage.list_files(self.folder, self.s3) if _generation(u)]
        return sorted(found, key=_generation)

    def _take(self) -> None:
        waiting, missing = False, 0
        while True:
            leases = self._generations()
            if leases:
                holder = self._read(leases[-1])
                if holder is None and missing < 5:  # given back meanwhile, or listed late
                    missing += 1
                    time.sleep(0.1)
                    continue
                holder, missing = holder or {}, 0  # listed, never read: a holder unknown
                if self._ours(holder):  # this one's own create, whose reply was lost
                    self._url = leases[-1]
                    with contextlib.suppress(Exception):
                        storage.remove(leases[:-1], self.s3)
                    return
                ended = self._ended(leases[-1], holder, quiet=waiting)
                if ended is None:
                    continue  # a newer lease came meanwhile: its holder is judged instead
                if not ended:
                    if not self.wait:
                        raise ValueError(self._held_by(holder, leases[-1]))
                    if holder.get("machine") == MACHINE and holder.get("pid") == os.getpid():
                        raise ValueError(f"{self.what}: {self.folder} is held by this driver "
                                         "itself, which would wait for itself")  # fmt: skip
                    if not waiting:
                        print(f"{self.what}: waiting for {_describe(holder)} to end")
                    waiting = True
                    time.sleep(WATCH_S)
                    continue
                log.warning("%s: taking over the lease of a driver that ended: %s", self.what,
                            _describe(holder))  # fmt: skip
            generation = _generation(leases[-1]) + 1 if leases else 1
            url = storage.join(self.folder, f"{generation:06d}.json")
            if self._create(url):
                self._url = url
                with contextlib.suppress(Exception):  # the ended holders': no longer read
                    storage.remove(leases, self.s3)
                return
            # another driver created it first: its lease is read next

    def _create(self, url: str) -> bool:
        try:
            return storage.create_bytes(url, self._content(), self.s3)
        except FileNotFoundError:  # a local folder an ending holder took away meanwhile
            return False
        except OSError as error:
            if not storage.not_implemented(error):
                raise
        # a store that does not implement conditional writes: two drivers starting at once
        # may both write, and the renewals of one of them find it out
        log.warning("%s: the store writes no file only where there is none (501 to "
                    "If-None-Match): the lease is a plain write", self.what)  # fmt: skip
        if storage.exists(url, self.s3):
            return False
        storage.write_bytes(url, self._content(), self.s3)
        return True

    def _content(self) -> bytes:
        return json.dumps(self._me | {"renewals": self._renewals}).encode()

    def _read(self, url: str) -> dict[str, Any] | None:
        """A lease's holder, None where it is gone; a lease that does not read (cut short)
        is an empty holder, whom nothing names alive."""
        try:
            data = storage.read_bytes(url, self.s3)
        except FileNotFoundError:
            return None
        try:
            holder = json.loads(data)
        except ValueError:
            return {}
        return holder if isinstance(holder, dict) else {}

    def _ours(self, holder: dict[str, Any] | None) -> bool:
        return bool(holder) and holder.get("token") == self._me["token"]

    def _ended(self, url: str, holder: dict[str, Any], *, quiet: bool = False) -> bool | None:
        """Whether the holder of the lease `url` has ended: on this machine, its process is
        gone; from another, its lease goes `EXPIRE_S` unchanged (no renewal). None where a
        newer generation appears meanwhile (another driver took it over first)."""
        if holder.get("machine") == MACHINE:
            return not _holder_alive(holder)
        if not quiet:
            print(f"{self.what}: the lease of {_describe(holder)} is watched for up to "
                  f"{EXPIRE_S:.0f} s: a driver that still runs renews it")  # fmt: skip
        deadline = time.monotonic() + EXPIRE_S
        while time.monotonic() < deadline:
            time.sleep(WATCH_S)
            if self._generations()[-1:] != [url]:
                return None
            if (self._read(url) or {}) != holder:
                return False
        return True

    def _held_by(self, holder: dict[str, Any], url: str) -> str:
        job = holder.get("ray_job")
        stop = f" (`ray job stop {job}`)" if job else ""
        return (
            f"{self.what} is in use by another driver, {_describe(holder)}: stop it{stop} or "
            f"wait for it to end; its lease ({url}) is taken over once that driver has ended, "
            f"at once on its own machine, after {EXPIRE_S:.0f} s unrenewed elsewhere"
        )

    def _renew(self) -> None:
        """Renews the lease every `RENEW_S`, noting when it last did for the fence."""
        while not self._stop.wait(RENEW_S):
            try:
                newest = self._generations()[-1:]
                if newest != [self._url] or not self._ours(self._read(self._url)):
                    self._lose(f"another driver took the folder over "
                               f"({newest[0] if newest else 'its lease gone'})")  # fmt: skip
                    return
                self._renewals += 1
                storage.write_bytes(self._url, self._content(), self.s3)
                self._renewed = time.monotonic()
            except Exception as error:  # the next renewal may pass
                log.warning("%s: renewing the lease failed: %s: %s", self.what,
                            type(error).__name__, error)  # fmt: skip

    def _fence(self) -> None:
        """Stops the job once the lease has gone `FENCE_S` unrenewed, however long the
        renewal under way takes (a storage call retried with long time-outs may take
        minutes, and a driver elsewhere takes the folder over after `EXPIRE_S`)."""
        while not self._stop.wait(min(1.0, FENCE_S / 10)):
            unrenewed = time.monotonic() - self._renewed
            if unrenewed > FENCE_S:
                self._lose(f"the lease went unrenewed for {unrenewed:.1f} s, and a driver "
                           "elsewhere may take the folder over")  # fmt: skip
                return

    def _lose(self, why: str) -> None:
        """`on_lost`, once, unless the block has ended meanwhile."""
        with self._losing:
            if self._lost or self._stop.is_set():
                return
            self._lost = True
        log.error("%s: %s: this job stops", self.what, why)
        self.on_lost()


def _generation(url: str) -> int:
    """The generation a lease file's name gives, 0 for another file."""
    name = url.rpartition("/")[2]
    stem, _, suffix = name.partition(".")
    return int(stem) if suffix == "json" and stem.isdigit() else 0


def _describe(holder: dict[str, Any]) -> str:
    job = f", Ray job {holder['ray_job']}" if holder.get("ray_job") else ""
    return f"process {holder.get('pid')} on {holder.get('host')}{job}"


def _submission_id() -> str | None:
    """The id `ray job stop` takes, where this driver is a submitted Ray job: the job
    supervisor passes it in the job's config (Ray's `RAY_JOB_CONFIG_JSON_ENV_VAR`)."""
    try:
        config = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}"))
        return config.get("metadata", {}).get("job_submission_id")
    except (ValueError, AttributeError):
        return None

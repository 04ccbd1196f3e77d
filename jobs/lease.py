"""One driver at a time for a job's folder: a training run, a search.

A second driver of the same folder is the same command run again while the first still runs:
`ray job submit` whose log stream a Ctrl-C ended leaves its job running, and a re-run then
resumes from the checkpoint the first is still training past. Both would write the same
checkpoints, tables and records. `DriverLease` refuses it, naming the driver it would clash
with.

The lease is the file `LEASE_FILE` in the folder, created only where there is none (S3's
If-None-Match, a local hard link: `storage.create_bytes`). It names its holder: the machine
(`storage.MACHINE`: host and pid namespace), process id and start, host name and Ray job
id, and counts its renewals, rewritten every `RENEW_S` by a thread of the holder. A holder
that ended without giving it back (killed, its node lost) is taken over: on the same
machine at once, its process being gone; from another machine once its lease has gone
`EXPIRE_S` without a renewal, watched from here rather than read off timestamps, which the
two machines' clocks may write apart.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
from typing import Any

from jobs import storage

log = logging.getLogger(__name__)

LEASE_FILE = "driver_lease.json"
RENEW_S = 15.0
EXPIRE_S = 60.0  # unrenewed this long, a lease from another machine is taken over
WATCH_S = 2.0  # between looks at another machine's lease


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


class LeaseHeld(ValueError):
    """Another driver holds the folder."""


class DriverLease:
    """``with DriverLease(url, what="run x"):`` the folder `url` for this driver alone, for
    the block; a ValueError (`LeaseHeld`) when another driver holds it."""

    def __init__(self, url: str, s3: storage.S3Options | None = None, *, what: str) -> None:
        self.url, self.s3, self.what = storage.join(url, LEASE_FILE), s3, what
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._renewals = 0
        self._me = {
            "machine": storage.MACHINE,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "start": (_process_stat(os.getpid()) or (None, None))[1],
            "ray_job": _submission_id(),
        }

    def __enter__(self) -> DriverLease:
        self._take()
        self._thread = threading.Thread(target=self._renew, name="driver-lease", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with contextlib.suppress(Exception):  # a lease left behind lapses by itself
            if self._ours(self._read()):
                storage.remove([self.url], self.s3)

    def _content(self) -> bytes:
        return json.dumps(self._me | {"renewals": self._renewals}).encode()

    def _read(self) -> dict[str, Any] | None:
        """The lease's holder, None where there is no lease; a lease that does not read (cut
        short) is an empty holder, whom nothing names alive."""
        try:
            data = storage.read_bytes(self.url, self.s3)
        except FileNotFoundError:
            return None
        try:
            holder = json.loads(data)
        except ValueError:
            return {}
        return holder if isinstance(holder, dict) else {}

    def _ours(self, holder: dict[str, Any] | None) -> bool:
        return bool(holder) and all(holder.get(k) == v for k, v in self._me.items())

    def _take(self) -> None:
        while not storage.create_bytes(self.url, self._content(), self.s3):
            holder = self._read()
            if holder is None:
                continue  # given back meanwhile
            if holder.get("machine") == storage.MACHINE:
                if _holder_alive(holder):
                    raise LeaseHeld(self._held_by(holder))
            elif not self._lapses(holder):
                raise LeaseHeld(self._held_by(holder))
            log.warning("%s: taking over the lease of a driver that ended: %s", self.what,
                        _describe(holder))  # fmt: skip
            storage.remove([self.url], self.s3)

    def _lapses(self, holder: dict[str, Any]) -> bool:
        """Whether another machine's lease goes `EXPIRE_S` unrenewed (True), or is renewed
        or given back (False: it is alive, or free, and read again)."""
        print(f"{self.what}: the lease of {_describe(holder)} is watched for up to "
              f"{EXPIRE_S:.0f} s: a driver that still runs renews it")  # fmt: skip
        deadline = time.monotonic() + EXPIRE_S
        while time.monotonic() < deadline:
            time.sleep(WATCH_S)
            now = self._read()
            if now is None:
                return False
            if now != holder:
                raise LeaseHeld(self._held_by(now))
        return True

    def _held_by(self, holder: dict[str, Any]) -> str:
        job = holder.get("ray_job")
        stop = f" (`ray job stop {job}`)" if job else ""
        return (
            f"{self.what} is in use by another driver, {_describe(holder)}: stop it{stop} or "
            f"wait for it to end; its lease ({self.url}) is taken over once that driver has "
            f"ended, at once on its own machine, after {EXPIRE_S:.0f} s unrenewed elsewhere"
        )

    def _renew(self) -> None:
        while not self._stop.wait(RENEW_S):
            try:
                if not self._ours(self._read()):
                    log.error("%s: the lease %s was taken over by another driver; this one "
                              "no longer renews it", self.what, self.url)  # fmt: skip
                    return
                self._renewals += 1
                storage.write_bytes(self.url, self._content(), self.s3)
            except Exception as error:  # the next renewal may pass
                log.warning("%s: renewing the lease failed: %s: %s", self.what,
                            type(error).__name__, error)  # fmt: skip


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

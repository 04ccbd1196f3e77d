"""Inputs that take their process down: given up after a few deaths, not tried for ever.

Ray runs a task again, and restarts an actor and calls it again, whenever its process dies,
without limit: a node that an autoscaler or a spot market takes away costs its work, not the
job. An input that crashes whatever process decodes it (a decoder's fault on a malformed
file), or that Ray's memory monitor kills each time, is then tried for ever, and the job
never ends. `CrashGuard` has each retry of a batch narrow the search, with records in a
folder of the job's:

- ``<stage>-<digest of the batch's sources>.json``, written before a batch is worked on and
  removed after. Found at the start of a batch, it says the attempt before died with its
  process: the batch is then worked on one row at a time.
- ``<stage>-<digest of one source>.one.json``, the attempts at that row alone so far,
  written before each and removed after it. A row whose attempts alone reach `tries` is
  given up: passed on to the stage as an error with its reason, not worked on (its record
  stays until the batch is done).

Ray retries a task with the same rows in the same batches, so the retry finds its records.
Each attempt either finishes its batch or dies charged to the one row it worked on alone
(the first, whole-batch attempt excepted), so a batch is tried at most 1 + rows x `tries`
times. A node lost while a row is worked on alone is charged to that row too: `tries`
deaths are what it takes to give it up.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from jobs import storage

log = logging.getLogger(__name__)

Batch = dict[str, np.ndarray]


@dataclass(frozen=True)
class CrashGuard:
    """Runs a stage's work on batches of rows so that rows whose work kills its process are
    given up. Rows are numpy columns: `key` names each row, and a row is still to be worked
    on while its ``status`` is "pending" or, without that column, its ``reason`` is empty (or
    absent); given up, its reason says why (and its status is "error")."""

    folder: str
    """Where the records go (a folder of the job's own, beside its outputs)."""
    s3: storage.S3Options | None = None
    tries: int = 3
    """Deaths of a row's process while it was worked on alone that give it up."""
    doing: str = "worked on"
    """What the stage does to a row, for the reason: "colorized"."""
    key: str = "source"

    def __call__(self, stage: str, batch: Batch, work: Callable[[Batch], Batch]) -> Batch:
        """`work(batch)`, or where an attempt at this batch died before, `work` of each row
        alone; a row given up reaches `work` with its reason (and status "error")."""
        sources = [str(s) for s in batch[self.key]]
        url = self._url(stage, sources)
        if not storage.exists(url, self.s3):
            storage.write_bytes(url, json.dumps({"sources": sources}).encode(), self.s3)
            out = work(batch)
            storage.remove([url], self.s3)
            return out
        log.warning(
            "%s: an attempt at a batch of %d rows died with its process; each row alone now",
            stage,
            len(sources),
        )
        outs, records = [], [url]
        for i, source in enumerate(sources):
            row = {k: v[i : i + 1].copy() for k, v in batch.items()}
            if not _to_do(row):
                outs.append(work(row))
                continue
            record = self._url(stage, [source], ".one")
            records.append(record)
            deaths = self._attempts(record)
            if deaths >= self.tries:
                reason = (
                    f"the process that {self.doing} it died each of the {deaths} times it "
                    "took this input alone (a crash in a decoder, or killed for memory)"
                )
                log.warning("%s: gave up %s: %s", stage, source, reason)
                row["reason"] = np.array([reason], dtype=object)
                if "status" in row:
                    row["status"][0] = "error"
                outs.append(work(row))
                continue
            attempt = json.dumps({"source": source, "attempts": deaths + 1}).encode()
            storage.write_bytes(record, attempt, self.s3)
            outs.append(work(row))
            storage.remove([record], self.s3)  # not charged for a later row's death
        storage.remove(records, self.s3)  # a row given up stays so until its batch is done
        return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}

    def clear(self) -> None:
        """Removes every record: a run's start, with no attempt of its own under way, finds
        those of a run killed part-way, whose batches need not recur."""
        if storage.exists(self.folder, self.s3):
            storage.remove(storage.list_files(self.folder, self.s3), self.s3)

    def _url(self, stage: str, sources: list[str], kind: str = "") -> str:
        digest = hashlib.sha256("\0".join([stage, *sources]).encode()).hexdigest()[:32]
        return storage.join(self.folder, f"{stage}-{digest}{kind}.json")

    def _attempts(self, record: str) -> int:
        try:
            return int(json.loads(storage.read_bytes(record, self.s3))["attempts"])
        except FileNotFoundError:
            return 0


def _to_do(row: Batch) -> bool:
    if "status" in row:
        return row["status"][0] == "pending"
    return not ("reason" in row and row["reason"][0])

"""Inputs that take their process down: given up after a few deaths, not tried for ever.

Ray runs a task again, and restarts an actor and calls it again, whenever its process dies
(without limit by default; `jobs.prepare` allows a few tries): a node that an autoscaler or
a spot market takes away costs its work, not the job. An input that crashes whatever
process decodes it (a decoder's fault on a malformed file), or that Ray's memory monitor
kills each time, is then tried for ever, or fails its whole task each time. `CrashGuard`
has each retry narrow the search, with records in a folder of the job's:

- ``<stage>-<digest of the batch's names>.json``, written before a batch is worked on and
  removed after. Found at the start of a batch, it says an attempt before died with its
  process: the batch is then worked on carefully, one input at a time.
- ``<stage>-<digest of one input's name>.one.json``, the careful attempts at that input so
  far, written before each and removed after it. An input whose careful attempts reach
  `tries` is given up: recorded as an error with its reason, not worked on (its record
  stays until the batch is done).

Ray retries a task with the same inputs in the same batches, so the retry finds its
records. A careful attempt that dies while an input is worked on is charged to that input,
so a batch dies at most 1 + inputs x `tries` times that way before an attempt finishes it;
one that dies elsewhere (handing its results on, say) is charged to none, and Ray tries it
again as before. A node lost while an input is worked on carefully is charged to that input
too: `tries` deaths are what it takes to give it up. Work that raises (an error, not a
death) leaves no record and charges no input: the stage reports it as it always did.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from jobs import storage

log = logging.getLogger(__name__)

Batch = dict[str, np.ndarray]


@dataclass(frozen=True)
class CrashGuard:
    """Guards a stage's work so that inputs whose work kills the process are given up."""

    folder: str
    """Where the records go (a folder of the job's own, beside its outputs)."""
    s3: storage.S3Options | None = None
    tries: int = 3
    """Deaths of an input's process while it was worked on carefully that give it up."""
    doing: str = "worked on"
    """What the stage does to an input, for the reason: "colorized"."""
    hint: str = ""
    """How to try a given-up input again, for the reason."""
    key: str = "source"
    """The column naming the rows of the batches `__call__` takes."""

    @contextlib.contextmanager
    def batch(self, stage: str, names: Sequence[str]) -> Iterator[Careful | None]:
        """Around the work on a batch of inputs, `names` naming it (a retry names it alike,
        and no other batch under way does): None to work as usual, or, where an attempt at
        it died before, a `Careful` to work on each input through. The records go once the
        work is done; where it raises, the batch's own record goes and the counts of inputs
        given up stay. Where the process dies, every record stays."""
        url = self._url(stage, names)
        if _read(url, self.s3) is None:
            storage.write_bytes(url, json.dumps({"names": list(names)}).encode(), self.s3)
            try:
                yield None
            except Exception:
                storage.remove([url], self.s3)
                raise
            storage.remove([url], self.s3)
            return
        log.warning(
            "%s: an attempt at a batch of %d inputs (%s, ...) died with its process; one input "
            "at a time now",
            stage,
            len(names),
            names[0],
        )
        careful = Careful(self, stage)
        try:
            yield careful
        except Exception:
            storage.remove([url], self.s3)
            raise
        storage.remove([url, *careful.given_up_records], self.s3)

    def __call__(self, stage: str, batch: Batch, work: Callable[[Batch], Batch]) -> Batch:
        """`work(batch)` on a batch of rows (numpy columns), or where an attempt at it died
        before, `work` of each row alone. A row is still to be worked on while its
        ``status`` is "pending" or, without that column, its ``reason`` is empty (or
        absent); one given up reaches `work` with its reason (and status "error")."""
        names = [str(s) for s in batch[self.key]]
        to_do = [name for i, name in enumerate(names) if _to_do(batch, i)]
        if not to_do:  # nothing that could kill it (and rows such as a split archive's error
            return work(batch)  # rows share a name: named by its inputs to work on only)
        with self.batch(stage, to_do) as careful:
            if careful is None:
                return work(batch)
            # A column for every row's reason, a given-up row's too (so that the outputs
            # join), of objects (a fixed-width string column would cut a reason short).
            reasons = batch.get("reason", np.full(len(names), "", dtype=object))
            batch = {**batch, "reason": reasons.astype(object)}
            outs = []
            for i, name in enumerate(names):
                row = {k: v[i : i + 1].copy() for k, v in batch.items()}
                if not _to_do(row, 0):
                    outs.append(work(row))
                    continue
                with careful.attempt(name) as reason:
                    if reason:  # given up: passed on as an error
                        row["reason"][0] = reason
                        if "status" in row:
                            row["status"][0] = "error"
                    outs.append(work(row))
            return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}

    def clear(self) -> None:
        """Removes every record: a run's start, with no attempt of its own under way, finds
        those of a run killed part-way, whose batches need not recur."""
        if storage.exists(self.folder, self.s3):
            storage.remove(storage.list_files(self.folder, self.s3), self.s3)

    def _url(self, stage: str, names: Sequence[str], kind: str = "") -> str:
        digest = hashlib.sha256("\0".join([stage, *names]).encode()).hexdigest()[:32]
        return storage.join(self.folder, f"{stage}-{digest}{kind}.json")


@dataclass
class Careful:
    """The careful working of a batch whose attempt before died: each input's attempts are
    counted, and an input whose count reached the guard's tries is given up (`attempt`)."""

    guard: CrashGuard
    stage: str
    given_up_records: list[str] = field(default_factory=list)

    @contextlib.contextmanager
    def attempt(self, name: str) -> Iterator[str | None]:
        """Around the work on one input: yields None to work on it, counted before and the
        count gone after (the input is not charged for a later input's death, nor for an
        error, which is not a death); or the reason it is given up, not to work on it (its
        count then stays until the batch is done)."""
        record = self.guard._url(self.stage, [name], ".one")
        deaths = int((_read(record, self.guard.s3) or {}).get("attempts", 0))
        if deaths >= self.guard.tries:
            self.given_up_records.append(record)
            reason = (
                f"the process that {self.guard.doing} it died each of the {deaths} times it "
                f"took this input alone (a crash in a decoder, or killed for memory)"
                f"{self.guard.hint}"
            )
            log.warning("%s: gave up %s: %s", self.stage, name, reason)
            yield reason
            return
        attempt = {"name": name, "attempts": deaths + 1}
        storage.write_bytes(record, json.dumps(attempt).encode(), self.guard.s3)
        try:
            yield None
        except Exception:
            storage.remove([record], self.guard.s3)
            raise
        storage.remove([record], self.guard.s3)


def _to_do(batch: Batch, i: int) -> bool:
    if "status" in batch:
        return batch["status"][i] == "pending"
    return not ("reason" in batch and batch["reason"][i])


def _read(url: str, s3: storage.S3Options | None) -> dict | None:
    """A record's content, or None where there is none (one GET: no HEAD and listing)."""
    try:
        return json.loads(storage.read_bytes(url, s3))
    except FileNotFoundError:
        return None

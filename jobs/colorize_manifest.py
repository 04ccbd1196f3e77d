"""The colorize job's manifest: one row per input, recorded as the job goes, read to resume.

Every write of outputs (`jobs.colorize.write_batch`) is followed by a part of its own: a
Parquet file under ``OUTPUT/_colorize/parts`` with one row per input of the batch, the record
that its outputs exist. A re-run reads every part and skips the inputs they list.

One part per batch would leave 125,000 small objects for a million inputs, each a request to
list and to read on the next run. So the driver, which sees every batch's rows, folds the
parts it has seen whole into compacted parts as the job goes (`Compactor`); the start of a
re-run and the end of the job fold everything into one (`compact`). A compacted part is
written before the parts it replaces are removed: a job killed at any moment leaves every row
at least once, and readers keep each source's latest row (`latest`).
"""

from __future__ import annotations

import io
import logging
import re
import time
import uuid
from collections import Counter
from collections.abc import Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from jobs import storage
from jobs.storage import S3Options

WORK_DIR = "_colorize"
PARTS_DIR = f"{WORK_DIR}/parts"
SCHEMA = pa.schema(
    [
        ("source", pa.string()),  # input URL; archive members and Parquet rows: see jobs.colorize
        ("output", pa.string()),  # path under OUTPUT; "" for an error
        ("status", pa.string()),  # "ok", "error", or READ (not an input)
        ("reason", pa.string()),  # why an input failed; "" when it did not
        ("time", pa.string()),  # when the row was finished (UTC, ISO 8601, ms)
        ("pages", pa.int64()),
        ("width_px", pa.int64()),
        ("height_px", pa.int64()),
        ("model_sha256", pa.string()),
        ("temperature", pa.float64()),
        ("seconds", pa.float64()),  # time spent finishing the row (colorize, encode, write)
    ]
)
READ = "read"
"""The status of an archive's own row once it has been read to its end, with the number of
its members and its size in the reason (`read_through_reason`): a re-run that finds a row
for each of them, the archive's size unchanged, skips the archive without opening it, and
an earlier error row of the archive (its reading broke off) is cleared. Not an input: the
job's manifest leaves it out."""
RESOLVED = "resolved"
"""READ's forerunner, in manifests of earlier versions: an archive read through by a retry,
without its count of members. Not an input either."""
NOT_INPUTS = (READ, RESOLVED)
_READ_THROUGH = re.compile(r"read through: (\d+) members of (\d+) bytes")


def read_through_reason(members: int, size: int) -> str:
    return f"read through: {members} members of {size} bytes"


def members_read(reason: str) -> tuple[int, int] | None:
    """(members, size in bytes) of the archive a READ row's reason speaks of, or None."""
    found = _READ_THROUGH.fullmatch(reason)
    return (int(found[1]), int(found[2])) if found else None


def inputs_only(rows: pa.Table) -> pa.Table:
    """`rows` without the rows that are no input (archives' own READ and RESOLVED rows)."""
    return rows.filter(pc.invert(pc.is_in(rows.column("status"), pa.array(NOT_INPUTS))))


def archives_read(rows: pa.Table) -> dict[str, tuple[int, int]]:
    """Source -> (members, size in bytes) of every archive `rows` have a READ row of."""
    read = rows.filter(pc.equal(rows.column("status"), READ)).select(["source", "reason"])
    counted = ((r["source"], members_read(r["reason"])) for r in read.to_pylist())
    return {source: found for source, found in counted if found is not None}


PART_COLUMNS = ("part", "part_rows")
"""Columns `write_part`'s caller hands back to the driver beside the rows: which part holds
each row and how many rows that part has (`Compactor`)."""
COMPACT_ROWS = 10_000
COMPACT_S = 60.0

log = logging.getLogger(__name__)


def parts_url(output: str) -> str:
    return storage.join(output, PARTS_DIR)


def write_part(rows: Sequence[Mapping], output: str, s3: S3Options | None) -> tuple[pa.Table, str]:
    """A part with `rows` (`SCHEMA`'s columns); returns the rows as a table and its URL."""
    table = pa.Table.from_pylist(list(rows), schema=SCHEMA)
    url = storage.join(parts_url(output), f"part-{uuid.uuid4().hex}.parquet")
    _write(table, url, s3)
    return table, url


def with_part(table: pa.Table, url: str) -> dict[str, np.ndarray]:
    """The part's rows as numpy columns, with the `PART_COLUMNS` the driver compacts by."""
    columns = {k: table.column(k).to_numpy(zero_copy_only=False) for k in table.column_names}
    columns["part"] = np.full(table.num_rows, url, dtype=object)
    columns["part_rows"] = np.full(table.num_rows, table.num_rows, dtype=np.int64)
    return columns


def list_parts(output: str, s3: S3Options | None) -> list[str]:
    url = parts_url(output)
    if not storage.exists(url, s3):
        return []
    return storage.list_files(url, s3, suffix=".parquet")


def read(output: str, s3: S3Options | None) -> pa.Table:
    """Every source's latest row, sorted by source."""
    return latest(_read(list_parts(output, s3), s3))


def latest(table: pa.Table) -> pa.Table:
    """Each source's latest row (by `time`; equal times: the later in `table`), by source."""
    if table.num_rows < 2:
        return table
    table = table.sort_by([("source", "ascending"), ("time", "ascending")])  # a stable sort
    source = table.column("source").combine_chunks()
    last = pc.not_equal(source.slice(0, len(source) - 1), source.slice(1))
    return table.filter(pa.concat_arrays([last, pa.array([True])]))


def compact(output: str, s3: S3Options | None) -> pa.Table:
    """Folds every part into one; returns `read`'s table. Nothing is written when the parts
    are one already, without repeated sources."""
    urls = list_parts(output, s3)
    table = _read(urls, s3)
    rows = latest(table)
    if len(urls) > 1 or rows.num_rows < table.num_rows:
        _write(rows, _compacted_url(output), s3)
        _remove(urls, s3)
    return rows


class Compactor:
    """Folds a running job's parts into compacted ones, from the rows the driver receives
    (`write_part`'s rows with `PART_COLUMNS`): every `every_rows` rows or `every_s` seconds,
    the rows received since the last fold are written as one compacted part, then the parts
    whose rows have all been received are removed.

    A fold merges this run's newest compacted parts into its own while they hold no more
    rows than it does, as a binary counter carries: a run leaves about log2(rows / fold)
    compacted parts, and each row is rewritten about as many times. Storage that fails a
    fold (after its retries) costs a warning, not the job: the parts stay, and the next fold,
    tried `every_s` later, or the end of the job takes them.
    """

    def __init__(
        self,
        output: str,
        s3: S3Options | None,
        *,
        every_rows: int = COMPACT_ROWS,
        every_s: float = COMPACT_S,
    ) -> None:
        self.output, self.s3 = output, s3
        self.every_rows, self.every_s = every_rows, every_s
        self.pending: list[pa.Table] = []
        self.received: Counter[str] = Counter()  # rows received, by part
        self.part_rows: dict[str, int] = {}
        self.compacted: list[tuple[str, int]] = []  # this run's compacted parts and their rows
        self.last_fold, self.failing = time.monotonic(), False

    def add(self, batch: Mapping[str, np.ndarray]) -> None:
        self.pending.append(pa.table({k: batch[k] for k in SCHEMA.names}, schema=SCHEMA))
        for part, rows in zip(batch["part"], batch["part_rows"], strict=True):
            self.received[part] += 1
            self.part_rows[part] = int(rows)
        due = time.monotonic() - self.last_fold >= self.every_s
        full = sum(t.num_rows for t in self.pending) >= self.every_rows
        if due or (full and not self.failing):
            self.fold()

    def fold(self) -> None:
        """Writes the rows received since the last fold as a compacted part, with the
        compacted parts it merges, then removes what it replaces."""
        self.last_fold = time.monotonic()
        if not self.pending:
            return
        rows, kept, merged = sum(t.num_rows for t in self.pending), list(self.compacted), []
        while kept and kept[-1][1] <= rows:
            part, part_rows = kept.pop()
            merged.append(part)
            rows += part_rows
        whole = [p for p, n in self.received.items() if n >= self.part_rows[p]]
        url = _compacted_url(self.output)
        try:
            tables = [_read(merged, self.s3), *self.pending] if merged else self.pending
            _write(pa.concat_tables(tables), url, self.s3)
        except Exception as e:  # storage, whatever its client raises
            log.warning("manifest parts not compacted this time: %s: %s", type(e).__name__, e)
            self.failing = True
            return
        self.failing = False
        _remove([*merged, *whole], self.s3)
        self.compacted = [*kept, (url, rows)]
        self.pending = []
        for part in whole:
            del self.received[part], self.part_rows[part]


def _remove(urls: Sequence[str], s3: S3Options | None) -> None:
    """Removes parts whose rows are in a compacted part written already; storage refusing it
    leaves rows twice, which readers take once: a warning, not the job's end."""
    try:
        storage.remove(urls, s3)
    except Exception as e:
        log.warning("%d manifest parts not removed: %s: %s", len(urls), type(e).__name__, e)


def _compacted_url(output: str) -> str:
    return storage.join(parts_url(output), f"compacted-{uuid.uuid4().hex}.parquet")


def _write(table: pa.Table, url: str, s3: S3Options | None) -> None:
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    storage.write_bytes(url, buffer.getvalue(), s3)


def _read(urls: Sequence[str], s3: S3Options | None) -> pa.Table:
    """The parts' rows. A part that is not Parquet (cut short, e.g. by a power loss between
    its write and its folder's) is skipped with a warning: its inputs are done again."""
    if not urls:
        return SCHEMA.empty_table()
    fs, _ = storage.arrow_filesystem(urls[0], s3)

    def read(urls: Sequence[str]) -> pa.Table:
        paths = [storage.split_url(u)[1] for u in urls]
        return storage.with_retries(  # no partitioning: OUTPUT may have folders named k=v
            lambda: pq.read_table(paths, filesystem=fs, schema=SCHEMA, partitioning=None),
            what=f"read {len(urls)} manifest parts",
        )

    try:
        return read(urls)
    except pa.ArrowInvalid:
        tables = []
        for url in urls:
            try:
                tables.append(read([url]))
            except pa.ArrowInvalid as e:
                log.warning("manifest part %s unreadable, its inputs are done again: %s", url, e)
        return pa.concat_tables([SCHEMA.empty_table(), *tables])

"""The batches an evaluation has measured, kept in its output folder until its outputs are
written, so that an evaluation stopped part way (a preempted node, a killed driver) goes on
where it stopped rather than measuring every image again:

    OUTPUT/_measured/run.json          what decides each image's figures (`resume`)
    OUTPUT/_measured/part-<id>.npz     one measured batch, every column (`pack`), written by
                                       the actor that measured it before it hands it on

A re-run that decides the figures alike reads the parts and measures only the inputs they
lack; one that decides them otherwise (another model, prior, temperature, ...) removes them
and measures anew. Parts are numpy archives without pickles: loading one runs no code.
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import uuid
import zipfile
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from jobs import storage

FORMAT = 1
"""The parts' columns and what they mean: raised when either changes, so that a re-run of
a newer version measures anew rather than mixing rows of two versions."""
MEASURED_DIR = "_measured"
RUN_FILE = "run.json"
PART_SUFFIX = ".npz"
BYTES_COLUMNS = ("strip_jpeg",)
"""Columns of bytes (stored as one byte array and its offsets); other object columns are
text."""

log = logging.getLogger(__name__)


def folder(output: str) -> str:
    return storage.join(output, MEASURED_DIR)


def write_part(output: str, batch: Mapping[str, np.ndarray], s3: storage.S3Options) -> None:
    name = f"part-{uuid.uuid4().hex}{PART_SUFFIX}"
    storage.write_bytes(storage.join(folder(output), name), pack(batch), s3)


def pack(batch: Mapping[str, np.ndarray]) -> bytes:
    """A batch's columns as a numpy archive that loads without pickles."""
    arrays: dict[str, np.ndarray] = {}
    for name, column in batch.items():
        column = np.asarray(column)
        if name in BYTES_COLUMNS:
            items = [bytes(x) for x in column]
            offsets = np.cumsum([0] + [len(x) for x in items], dtype=np.int64)
            arrays[f"{name}.bytes"] = np.frombuffer(b"".join(items), dtype=np.uint8)
            arrays[f"{name}.offsets"] = offsets
        elif column.dtype == object:
            arrays[f"{name}.text"] = column.astype(str)
        else:
            arrays[name] = column
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def unpack(data: bytes) -> dict[str, np.ndarray]:
    """`pack`'s batch back, its text and bytes as object columns (as Ray hands them)."""
    batch: dict[str, np.ndarray] = {}
    with np.load(io.BytesIO(data), allow_pickle=False) as archive:
        for name in archive.files:
            column, _, kind = name.partition(".")
            if kind == "text":
                batch[column] = archive[name].astype(object)
            elif kind == "offsets":
                offsets, joined = archive[name], archive[f"{column}.bytes"].tobytes()
                batch[column] = np.empty(len(offsets) - 1, dtype=object)
                batch[column][:] = [joined[a:b] for a, b in itertools.pairwise(offsets)]
            elif kind != "bytes":
                batch[column] = archive[name]
    return batch


def resume(output: str, record: dict[str, Any], s3: storage.S3Options) -> list[str]:
    """The parts an earlier run of this evaluation left (those of an evaluation whose
    `record`, what decides the figures, is this one's); parts of another are removed, with
    a word on what changed. The record is written for the next run."""
    record = json.loads(json.dumps(record))  # as it reads back
    url = storage.join(folder(output), RUN_FILE)
    parts = storage.list_files(folder(output), s3, suffix=PART_SUFFIX)
    earlier = json.loads(storage.read_bytes(url, s3)) if storage.exists(url, s3) else None
    if earlier == record:
        return parts
    if parts:
        changed = sorted(k for k in record.keys() | (earlier or {}).keys()
                         if (earlier or {}).get(k) != record.get(k))  # fmt: skip
        print(
            f"evaluate: the {len(parts)} measured batches in {folder(output)} are of another "
            f"evaluation (other {', '.join(changed) or 'record'}): measuring anew"
        )
        storage.remove(parts, s3)
    storage.write_bytes(url, json.dumps(record, indent=1).encode(), s3)
    return []


def read_parts(urls: list[str], s3: storage.S3Options) -> Iterator[dict[str, np.ndarray]]:
    """Each part's batch; one that does not load (written by another version) is passed
    over, with a warning, and its inputs are measured again. Read a few at once, in order
    (`storage.read_each`); storage that cannot be read raises."""
    for url, data in zip(urls, storage.read_each(urls, s3), strict=True):
        if isinstance(data, Exception):
            raise data
        try:
            yield unpack(data)
        except (ValueError, KeyError, OSError, EOFError, zipfile.BadZipFile) as error:
            log.warning("evaluate: measuring again the inputs of %s: %s", url, error)


def finish(output: str, s3: storage.S3Options) -> None:
    """Remove the parts and their record: the outputs hold every figure now."""
    storage.remove(storage.list_files(folder(output), s3), s3)

"""The training input pipeline: seeded epochs over a prepared dataset, split by rank.

An epoch is a permutation of the dataset's colour images (grayscale sources are left out,
as the released training left them out), built in two levels so that a worker never needs
the whole dataset at once. The unit is a shard's Parquet row group (`jobs.prepare` writes
them of `jobs.dataset.SHARD_ROW_GROUP_ROWS` images): the row groups of all shards are
shuffled and cut into windows of about `window_images` images, and the images of each
window are shuffled.
A window thus mixes images of as many shards as it has row groups: an ImageNet shard holds
one class, and windows of whole shards would give each batch a handful of classes (and
batch statistics to match). Step s of an epoch uses the global positions [s*B, (s+1)*B) of
that order, B = world_size x per-rank batch; rank r takes the r-th slice of b = B /
world_size of them. So within an epoch no image is used twice, across all workers, and the
state of the stream is one number, the global sample offset (epoch, offset), which
checkpoints store: a resumed run continues with exactly the samples, crops and flips it
would have used.

The N mod B images left over at the end of an epoch's order are not used in that epoch
(no padding with duplicates, every step has the full global batch); the next epoch's
order is a new permutation, so a different remainder is left out each time.

Workers decode, crop and flip in a thread pool (JPEGs with OpenCV, which holds the GIL for
none of it and gives Pillow's pixels; anything else with Pillow),
with the next steps' images queued behind the current one's so the threads never wait on a
batch boundary, and read the coming steps' row groups in threads of their own, each in one
ranged read of its JPEG column (the shards' footers, read once at the start, say where);
a background thread hands out finished batches. `decode="processes"` runs the same work in
processes of their own instead, a few images to a task, where threads stop scaling (each
image holds the GIL for part of its work): each batch's files and crops pass through memory
the processes share (Linux); on CUDA, `decode="nvjpeg"` decodes on the GPU.
Every worker reads the row groups of the current window (it needs a slice of each), the
price of an exact, rank-independent sample order: the workers of one machine
share them through a `jobs.node_cache.NodeCache`, which reads each from storage once, and
without one W workers read the data W times over. An image that does not decode (a shard
damaged since `jobs.prepare` checked it), and every image of a row group whose bytes no
longer read, becomes a black crop, with a warning naming its shard and row: grey, so the
loss gives it no weight, and the order stays.

Machines share no cache: a run on M machines would read the data M times an epoch, each
machine at M times the rate its own steps use it. With `read_groups` G (a divisor of the
world size W; M for a multi-node run) the workers form G groups of W/G consecutive ranks
(Ray Train numbers a machine's workers consecutively, so a machine's are one group), and
each epoch's row groups are dealt out among the groups (`epoch_windows`): each group has
windows and an order of its own, made as above, and at each step its ranks take their
slices of its next W/G x b images. An epoch has as many steps as its smallest group has
such batches (the groups differ by at most a row group). A machine then reads 1/G of the
data an epoch. The order is as exact and as rank-independent as with one group, for a given
G, which a resumed run keeps; G = 1 is the order described above. A group's windows hold
`window_images` images, so a rank's batch mixes as many row groups as with one group.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import hashlib
import io
import itertools
import logging
import mmap
import multiprocessing
import os
import queue
import select
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from colorcore.data import crop_box, random_crop_flip
from jobs import storage
from jobs.dataset import Manifest
from jobs.images import decode_rgb, each_or_none, jpeg_size, whole_jpeg

if TYPE_CHECKING:
    from jobs.node_cache import NodeCache

log = logging.getLogger(__name__)

WINDOW_IMAGES = 16384  # images shuffled together: see epoch_windows
READ_THREADS = 8  # row groups read at once by a worker
INDEX_READ_THREADS = 16  # shard footers read at once when a worker starts
# Decoding threads a loader runs at most: each image also holds the GIL for a while (its
# crop's generator, the crop's copy out), and past about 8 threads the handoffs cost more than
# the threads add. On an H200 host's 16 cores (2026-11-30), the threads' per-image work ran
# 4,200 to 5,800 images/s on 8 threads and 2,700 to 3,800 on 16 (four runs each), where
# OpenCV's decoding alone scaled to 10,800 to 13,000 on 16.
DECODE_THREADS_MAX = 8
DECODE_MODES = ("pil", "processes", "nvjpeg")
CROP_STREAM = 1
"""Ends each image's crop seed, which would otherwise be its epoch's shuffle seed with the
position appended: a seed sequence pads with zeros, so [s, e, 0] and [s, e] are one stream."""
PROCESS_TASK_IMAGES = 8  # images a decoding process takes at a time


def decode_threads(cpus: float, decode: str = "pil") -> int:
    """The decoding threads (or processes) of a loader that has `cpus` CPUs: 2 to
    DECODE_THREADS_MAX threads; one process a CPU, at least one."""
    if decode == "processes":
        return max(1, int(cpus))
    return min(DECODE_THREADS_MAX, max(2, int(cpus)))


@dataclass(frozen=True)
class DatasetIndex:
    """Where each usable image of a prepared dataset is: shard URLs, kept row numbers, and
    the shards' Parquet row groups, the unit the loader reads."""

    shard_urls: tuple[str, ...]
    rows: tuple[np.ndarray, ...]  # per shard: row numbers of colour images
    labels: tuple[np.ndarray, ...]
    metadata: tuple[pq.FileMetaData, ...]  # per shard: its Parquet footer
    sizes: tuple[int, ...]  # per shard: its size in bytes
    _resized: dict[int, str] = field(default_factory=dict, compare=False, repr=False)
    """Shards found of another size than indexed (why, for the warnings)."""

    @property
    def num_images(self) -> int:
        return sum(len(r) for r in self.rows)

    def jpeg_range(self, s: int, g: int) -> tuple[int, int]:
        """(first byte, size) of row group `g`'s JPEG column chunk in shard `s`."""
        metadata = self.metadata[s]
        column = metadata.row_group(g).column(metadata.schema.names.index("jpeg"))
        start = column.data_page_offset
        if column.has_dictionary_page and column.dictionary_page_offset is not None:
            start = min(start, column.dictionary_page_offset)
        return start, column.total_compressed_size

    def read_jpegs(self, s: int, g: int, s3: storage.S3Options | None = None) -> JpegFiles:
        """The JPEG column of row group `g` of shard `s`, in one ranged read of its bytes.
        Bytes that are no longer that column (the shard cut short or changed since it was
        indexed) give every row of the group an empty file, with a warning: each becomes a
        black crop, and the run and its order go on (a resumed run would meet the group at
        the same step again). Storage that cannot be read raises, after its retries."""
        start, size = self.jpeg_range(s, g)
        url = self.shard_urls[s]
        if s in self._resized:  # found cut short (or grown) already: not asked again
            return self._damaged(s, g, self._resized[s])
        try:
            data = storage.read_range(url, start, size, s3)
        except OSError:  # after its retries: S3 refuses a range past a file's end, say
            fs, path = storage.filesystem(url, s3)
            now = storage.with_retries(lambda: fs.size(path), what=f"stat {url}")
            if now == self.sizes[s]:
                raise  # the storage's failure, not the shard's
            self._resized[s] = f"the shard is {now} bytes now, {self.sizes[s]} when indexed"
            return self._damaged(s, g, self._resized[s])
        file = pq.ParquetFile(_Slice(data, start, self.sizes[s]), metadata=self.metadata[s])
        try:
            return JpegFiles.of_column(file.read_row_group(g, columns=["jpeg"]).column("jpeg"))
        except (OSError, ValueError, pa.ArrowException) as error:
            return self._damaged(s, g, error)

    def _damaged(self, s: int, g: int, why: object) -> JpegFiles:
        """Row group `g` of shard `s` as empty files (black crops), with a warning."""
        rows = self.metadata[s].row_group(g).num_rows
        first = sum(self.metadata[s].row_group(i).num_rows for i in range(g))
        log.warning("%s row group %d (rows %d on) is damaged, its %d images left out: %s",
                    self.shard_urls[s], g, first, rows, why)  # fmt: skip
        return JpegFiles(np.empty(0, np.uint8), np.zeros(rows + 1, np.int64))

    @functools.cached_property
    def jpeg_bytes_per_image(self) -> float:
        """The mean stored size of a JPEG, over all the shards' rows."""
        total = sum(
            self.jpeg_range(s, g)[1]
            for s, metadata in enumerate(self.metadata)
            for g in range(metadata.num_row_groups)
        )
        return total / max(sum(m.num_rows for m in self.metadata), 1)

    @functools.cached_property
    def units(self) -> Units:
        return Units.of(self)

    @classmethod
    def load(cls, dataset_url: str, s3: storage.S3Options | None = None) -> DatasetIndex:
        """Reads each shard's footer and its label and grayscale columns, a few shards at
        a time (a dataset of a thousand shards read one by one would keep a run's workers
        waiting minutes at every start)."""
        manifest = Manifest.load(dataset_url, s3)
        fs, root = storage.arrow_filesystem(dataset_url, s3)

        def shard(name: str) -> tuple[np.ndarray, np.ndarray, pq.FileMetaData, int]:
            def read() -> tuple[pa.Table, pq.FileMetaData, int]:
                with fs.open_input_file(f"{root}/{name}") as f:
                    file = pq.ParquetFile(f, pre_buffer=True)  # row groups' ranges merged
                    return file.read(columns=["label", "grayscale"]), file.metadata, f.size()

            table, metadata, size = storage.with_retries(read, what=f"read {name} of {dataset_url}")
            gray = table.column("grayscale").to_numpy(zero_copy_only=False)
            keep = np.flatnonzero(~gray)  # colour images only, as the released training
            return keep, table.column("label").to_numpy()[keep], metadata, size

        with ThreadPoolExecutor(INDEX_READ_THREADS, thread_name_prefix="index-read") as pool:
            read = list(pool.map(shard, [s.name for s in manifest.shards]))
        columns = [tuple(column) for column in zip(*read, strict=True)] or [()] * 4
        return cls(tuple(storage.join(dataset_url, s.name) for s in manifest.shards), *columns)


@dataclass(frozen=True)
class Units:
    """The dataset's row groups as units of reading, numbered shard by shard."""

    shard: np.ndarray  # per unit: its shard
    group: np.ndarray  # per unit: its row group in the shard
    first_row: np.ndarray  # per unit: the shard row its row group starts at
    kept: tuple[np.ndarray, ...]  # per unit: its kept rows (shard row numbers)
    shard_start: np.ndarray  # per shard: its first row counted over all shards

    @classmethod
    def of(cls, index: DatasetIndex) -> Units:
        shard, group, first_row, kept, shard_rows = [], [], [], [], []
        for s, metadata in enumerate(index.metadata):
            sizes = [metadata.row_group(g).num_rows for g in range(metadata.num_row_groups)]
            starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
            cuts = np.searchsorted(index.rows[s], starts)
            shard += [s] * len(sizes)
            group += range(len(sizes))
            first_row.append(starts[:-1])
            kept += [index.rows[s][a:b] for a, b in itertools.pairwise(cuts)]
            shard_rows.append(metadata.num_rows)
        as_array = functools.partial(np.asarray, dtype=np.int64)
        rows = np.concatenate(first_row) if first_row else np.zeros(0, np.int64)
        shard_start = np.concatenate([[0], np.cumsum(shard_rows)[:-1]]) if shard_rows else []
        return cls(as_array(shard), as_array(group), rows, tuple(kept), as_array(shard_start))

    @functools.cached_property
    def _global_first_row(self) -> np.ndarray:
        return self.shard_start[self.shard] + self.first_row  # ascending: shard by shard

    def of_rows(self, shard_row_N2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(unit, row within the unit's row group) of each (shard, row) pair."""
        rows = self.shard_start[shard_row_N2[:, 0]] + shard_row_N2[:, 1]
        units = np.searchsorted(self._global_first_row, rows, "right") - 1
        return units, rows - self._global_first_row[units]


def epoch_windows(
    index: DatasetIndex, rng: np.random.Generator, window_images: int, groups: int = 1
) -> list[list[np.ndarray]]:
    """Per read group, its row groups (units) of the epoch cut into windows. The units of all
    shards are shuffled with `rng` and dealt out in that order, each to the group holding the
    fewest images so far (groups then differ by at most one row group's images); each
    group's units are cut into windows of whole units, each closed once it holds
    `window_images` images (the last may hold fewer). One group: the shuffled units, cut."""
    kept = index.units.kept
    dealt: list[list[int]] = [[] for _ in range(groups)]
    held = [0] * groups
    for u in rng.permutation(len(kept)).tolist():
        g = held.index(min(held))
        dealt[g].append(u)
        held[g] += len(kept[u])
    windows = []
    for units in dealt:
        cuts, held_here = [], 0
        for i, u in enumerate(units):
            held_here += len(kept[u])
            if held_here >= window_images:
                cuts.append(i + 1)
                held_here = 0
        windows.append([w for w in np.split(np.asarray(units, np.int64), cuts) if len(w)])
    return windows


def crop_seed(seed: int, epoch: int, position: int) -> list[int]:
    """The seed of the crop and flip of the image at global `position` of `epoch`'s order."""
    return [seed, epoch, position, CROP_STREAM]


def epoch_orders(
    index: DatasetIndex, *, epoch: int, seed: int, window_images: int, groups: int = 1
) -> list[np.ndarray]:
    """Per read group, the epoch's order of its images as (shard, row) pairs, shape
    (images, 2): the images of each of its windows (`epoch_windows`) shuffled, window after
    window."""
    rng = np.random.default_rng([seed, epoch])
    units = index.units
    orders = []
    for windows in epoch_windows(index, rng, window_images, groups):
        parts = [np.zeros((0, 2), np.int64)]
        for window in windows:
            pairs = np.concatenate(
                [
                    np.stack([np.full_like(units.kept[u], units.shard[u]), units.kept[u]], 1)
                    for u in window
                ]
            )
            parts.append(pairs[rng.permutation(len(pairs))])
        orders.append(np.concatenate(parts).astype(np.int64))
    return orders


def too_few_images(
    images: int, global_batch: int, read_groups: int, unit_images: int
) -> str | None:
    """Why `images` dealt out to `read_groups` groups in row groups of at most `unit_images`
    might not make one step of `global_batch`, or None. `epoch_windows` deals them so that no
    group holds more than a row group beyond another: the smallest holds at least
    (images - (read_groups - 1) x unit_images) / read_groups."""
    if read_groups == 1:
        if images < global_batch:
            return f"{images} colour images, fewer than one batch ({global_batch})"
        return None
    smallest = (images - (read_groups - 1) * unit_images) // read_groups
    if smallest < global_batch // read_groups:
        return (
            f"{images} colour images: in {read_groups} read groups (row groups of up to "
            f"{unit_images}) the smallest may hold {max(smallest, 0)}, fewer than its part of "
            f"a batch ({global_batch // read_groups})"
        )
    return None


@dataclass(frozen=True)
class Batch:
    rgb_N3HW: torch.Tensor
    """uint8 crops (CPU, or CUDA with nvJPEG decoding)."""
    epoch: int
    next_offset: int
    """Global sample offset in `epoch` after this step (what a checkpoint stores)."""
    positions: np.ndarray
    """Global positions of this rank's samples in the epoch (for tests and logs): step s, rank
    r, sample i of its b is s x B + r x b + i, sample s x W/G x b + (r mod W/G) x b + i of
    the order of r's read group."""


class _Slice(io.RawIOBase):
    """A file of which only the bytes from `start` on are at hand, `data`: all a Parquet
    reader that has the footer needs to read one column chunk."""

    def __init__(self, data: bytes, start: int, size: int) -> None:
        super().__init__()
        self._data, self._start, self._size = memoryview(data), start, size
        self._position = start

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, position: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._size}[whence]
        self._position = base + position
        return self._position

    def readinto(self, buffer) -> int:
        at = self._position - self._start
        if at < 0:
            raise ValueError(f"read at byte {self._position}, before the slice's {self._start}")
        piece = self._data[at : at + len(buffer)]
        buffer[: len(piece)] = piece
        self._position += len(piece)
        return len(piece)


class JpegFiles:
    """A row group's JPEGs in one writable buffer, `values`, file r its bytes
    `values[ends[r]:ends[r + 1]]`: file r is a memoryview into it, so a batch's files reach
    the decoders without a copy each (from Arrow to bytes, and again to a writable buffer
    for torch). The buffer may be a file of a `jobs.node_cache.NodeCache`, mapped."""

    _HEADER = np.dtype("<i8")  # the saved form: count, ends (count + 1), values

    def __init__(self, values: np.ndarray, ends: np.ndarray) -> None:
        self._values, self._ends = values, ends

    @classmethod
    def of_column(cls, column: pa.ChunkedArray) -> JpegFiles:
        """The files of a shard's jpeg column, copied once into a buffer of their own."""
        array = column.combine_chunks()
        if not (pa.types.is_binary(array.type) or pa.types.is_large_binary(array.type)):
            raise ValueError(f"a shard's jpeg column must be binary, not {array.type}")
        if array.null_count:
            raise ValueError(f"a shard's jpeg column has {array.null_count} nulls")
        width = np.int64 if pa.types.is_large_binary(array.type) else np.int32
        _, offsets, values = array.buffers()
        ends = np.frombuffer(offsets, width)[array.offset : array.offset + len(array) + 1]
        stored = np.frombuffer(values, np.uint8) if values is not None else np.empty(0, np.uint8)
        return cls(stored[ends[0] : ends[-1]].copy(), (ends - ends[0]).astype(np.int64))

    def save(self, file: BinaryIO) -> None:
        file.write(np.asarray([len(self)], self._HEADER).tobytes())
        file.write(self._ends.astype(self._HEADER).tobytes())
        file.write(memoryview(self._values))

    @classmethod
    def load(cls, buffer: memoryview) -> JpegFiles:
        """The files `save` wrote, from a writable buffer of its bytes (not copied); a
        ValueError if the buffer is not one."""
        size = buffer.nbytes
        count = int(np.frombuffer(buffer, cls._HEADER, 1)[0]) if size >= 8 else -1
        if not 0 <= count <= (size - 16) // 8:
            raise ValueError(f"not saved JPEG files: {size} bytes holding {count} files")
        ends = np.frombuffer(buffer, cls._HEADER, count + 1, 8)
        start = 8 * (count + 2)
        if ends[0] != 0 or np.any(np.diff(ends) < 0) or start + ends[-1] != size:
            raise ValueError(f"not saved JPEG files: {count} files in {size} bytes")
        return cls(np.frombuffer(buffer, np.uint8, size - start, start), ends)

    def __len__(self) -> int:
        return len(self._ends) - 1

    def __getitem__(self, row: int) -> memoryview:
        return memoryview(self._values[self._ends[row] : self._ends[row + 1]])

    @property
    def nbytes(self) -> int:
        return int(self._ends[-1])


def _undecodable(where: str, error: object) -> None:
    log.warning(
        "loader: %s does not decode (%s): its crop is black, a grey image, which the loss "
        "leaves out", where, error,
    )  # fmt: skip


def _crop_into(
    out_3HW: torch.Tensor,
    data: memoryview,
    rng: np.random.Generator,
    where: str,
    undecodable: Callable[[str, object], None] = _undecodable,
) -> None:
    """`random_crop_flip` of the decoded image with `rng`, written into `out_3HW`; cropped
    and flipped as views before the pixels are copied (once), when no upscaling is needed.
    An image that does not decode (a shard damaged since it was prepared) gives a black
    crop: grey, so it has no weight in the loss, and the run goes on with the same order."""
    try:
        rgb_HW3 = _decode_jpeg(data)
        if rgb_HW3 is None:  # not a JPEG OpenCV reads: the checked decoder, and its error
            rgb_HW3 = np.asarray(decode_rgb(bytes(data)))
    except Exception as error:
        undecodable(where, error)
        out_3HW.zero_()
        return
    crop_px = out_3HW.shape[-1]
    height, width = rgb_HW3.shape[:2]
    if min(height, width) < crop_px:
        image_3HW = torch.from_numpy(np.ascontiguousarray(rgb_HW3.transpose(2, 0, 1)))
        out_3HW.copy_(random_crop_flip(image_3HW, crop_px, rng))
        return
    top, left, flip = crop_box(height, width, crop_px, rng)
    crop = rgb_HW3[top : top + crop_px, left : left + crop_px]
    out_3HW.numpy()[...] = (crop[:, ::-1] if flip else crop).transpose(2, 0, 1)


def _process_pool(processes: int) -> ProcessPoolExecutor:
    """Decoding processes, forked from a server process that has imported this module and
    OpenCV (quick to start), each on one thread. Not forked from the caller, whose threads
    (Ray's, CUDA's) a fork would copy in whatever state they were. Each process then imports
    the caller's main module, as Python's forkserver does (in a Ray worker, Ray's worker
    script: about 35 MB and 0.3 s a process): a script that makes such a loader needs the
    ``if __name__ == "__main__":`` guard."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__, "cv2"])
    return ProcessPoolExecutor(
        processes, mp_context=context, initializer=_decoder_init, initargs=(os.getpid(),)
    )


def _decoder_init(loader_pid: int) -> None:
    """A decoding process: one thread for torch and OpenCV, and an end when the loader's
    process ends, however it ends. Forked from the server, a decoder holds its own end of
    the pool's pipes, which therefore never tell it that a killed loader is gone."""
    import cv2

    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    watch = threading.Thread(target=_exit_with, args=(loader_pid,), daemon=True)
    watch.start()


def _exit_with(pid: int) -> None:
    """Ends this process once process `pid` has ended."""
    try:
        handle = os.pidfd_open(pid)
    except (AttributeError, OSError):  # no pidfd (an old kernel), or gone already: poll
        while storage.process_alive(pid):
            time.sleep(1.0)
    else:
        select.select([handle], [], [])  # readable when the process has ended
    os._exit(0)


class _SharedBatch:
    """One batch's memory, shared with the decoding processes: its crops, then its JPEG
    files, in an anonymous file (memfd) that the kernel frees once no process maps it,
    however the loader ends (the processes let go of a closed one at their next task). They
    open it through /proc by the loader's pid and the file's descriptor, so only the few
    numbers of each task are pickled: the loader writes the files in (one copy) and copies
    the crops out (one copy), where the bytes sent through the pool's pipes would be copied
    three or four times each way, by the one process that also drives the GPU."""

    tokens = itertools.count()

    def __init__(self, crops_shape: tuple[int, ...], files_nbytes: int) -> None:
        crops_nbytes = int(np.prod(crops_shape))
        self.token = next(self.tokens)  # this memory's name to the processes
        self.fd = os.memfd_create(self.name(self.token), os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, crops_nbytes + files_nbytes)
            self.map = mmap.mmap(self.fd, crops_nbytes + files_nbytes)
        except BaseException:
            os.close(self.fd)
            raise
        self.path = f"/proc/{os.getpid()}/fd/{self.fd}"
        self.crops = np.frombuffer(self.map, np.uint8, crops_nbytes).reshape(crops_shape)
        self.files = np.frombuffer(self.map, np.uint8, offset=crops_nbytes)

    @staticmethod
    def name(token: int) -> str:
        return f"colorcore-loader-{token}"

    def close(self) -> None:
        del self.crops, self.files  # the views that hold the map open
        self.map.close()
        os.close(self.fd)


class _ProcessDecoders:
    """Decoding processes (`_process_pool`) and the `_SharedBatch`es each batch goes through:
    one for each batch started and not yet gathered, reused after, and remade larger for a
    batch whose files do not fit."""

    def __init__(self, processes: int) -> None:
        self.pool = _process_pool(processes)
        self.made: list[_SharedBatch] = []  # every one not closed, in a batch or free
        self.free: list[_SharedBatch] = []

    def start(
        self, data: list[memoryview], seeds: list[list[int]], where: list[str], out: torch.Tensor
    ) -> Callable[[], torch.Tensor]:
        """Starts decoding and cropping `data` into `out`; returns the call that waits for
        the crops and copies them there, and returns `out`."""
        ends = np.cumsum([0] + [len(d) for d in data])
        shared = self._batch(out.shape, int(ends[-1]))
        for d, start, end in zip(data, ends[:-1], ends[1:], strict=True):
            shared.files[start:end] = np.frombuffer(d, np.uint8)
        n, live = PROCESS_TASK_IMAGES, [made.token for made in self.made]
        memory = (shared.path, shared.token, shared.crops.nbytes, live)
        parts = [
            self.pool.submit(_crops_in_process, memory, i, ends[i : j + 1].tolist(),
                             seeds[i:j], where[i:j], out.shape[-1])
            for i, j in ((i, min(i + n, len(data))) for i in range(0, len(data), n))
        ]  # fmt: skip

        def gather() -> torch.Tensor:
            # On an error the memory stays open, and in `made`, until `shutdown` has
            # stopped the processes: the tasks queued behind still use it.
            for part in parts:
                for place, error in part.result():
                    _undecodable(place, error)
            out.copy_(torch.from_numpy(shared.crops[: len(data)]))
            self.free.append(shared)
            return out

        return gather

    def _batch(self, crops_shape: torch.Size, files_nbytes: int) -> _SharedBatch:
        shared = self.free.pop() if self.free else None
        if shared is not None and (
            shared.crops.shape[1:] != crops_shape[1:]
            or len(shared.crops) < crops_shape[0]
            or len(shared.files) < files_nbytes
        ):
            self.made.remove(shared)  # free: no process works in it
            shared.close()
            shared = None
        if shared is None:  # with room for files a half larger, as a batch's vary
            shared = _SharedBatch(tuple(crops_shape), files_nbytes * 3 // 2)
            self.made.append(shared)
        return shared

    def shutdown(self, cancel_futures: bool = False) -> None:
        """Executor.shutdown, and then the memory of every batch is freed."""
        self.pool.shutdown(cancel_futures=cancel_futures)
        self.free.clear()
        while self.made:
            self.made.pop().close()


_mapped: dict[int, mmap.mmap] = {}  # a decoding process's: token -> map


def _crops_in_process(
    shared: tuple[str, int, int, list[int]],
    first: int,
    ends: list[int],
    seeds: list[list[int]],
    where: list[str],
    crop_px: int,
) -> list[tuple[str, str]]:
    """`_crop_into` of a `_SharedBatch`'s images from `first` on, one a seed, in a decoding
    process (`shared`: the batch's path, token and where its files start, and the tokens of
    the loader's batches still open; `ends`: their files' first byte there, then the last
    one's end): their crops are written into it, the ones the threads would give. Returns
    (where, error) of the files that did not decode, for the loader's process to log."""
    path, token, files_at, live = shared
    for gone in set(_mapped) - {*live, token}:  # closed by the loader: let the memory go
        del _mapped[gone]
    if token not in _mapped:
        with open(path, "r+b") as file:
            # The descriptor number may name another file by now (the batch closed, the
            # number reused): never write into one that is not this batch's.
            name = os.readlink(f"/proc/self/fd/{file.fileno()}")
            if not name.startswith(f"/memfd:{_SharedBatch.name(token)} "):
                raise RuntimeError(f"the loader's shared batch {token} is gone ({name})")
            _mapped[token] = mmap.mmap(file.fileno(), 0)
    buffer = _mapped[token]
    crop_shape = (3, crop_px, crop_px)
    crops = np.frombuffer(buffer, np.uint8, len(seeds) * int(np.prod(crop_shape)),
                          first * int(np.prod(crop_shape))).reshape(-1, *crop_shape)  # fmt: skip
    failed: list[tuple[str, str]] = []
    for k, (seed, place) in enumerate(zip(seeds, where, strict=True)):
        data = memoryview(buffer)[files_at + ends[k] : files_at + ends[k + 1]]
        rng = np.random.default_rng(seed)
        _crop_into(torch.from_numpy(crops[k]), data, rng, place,
                   lambda w, e: failed.append((w, str(e))))  # fmt: skip
    return failed


NOT_WHOLE_JPEG = "not a whole JPEG: cut short, or empty"


JPEG_PIXELS_PER_BYTE_MAX = 1024
"""More pixels a byte than a JPEG can code: a block of 8x8 takes a bit at the least (512 a
byte), whatever the picture; a frame header that claims more was damaged."""


def _jpeg_problem(data: memoryview) -> str | None:
    """Why a shard's file is not handed to a JPEG decoder of no checks of its own (OpenCV's,
    nvJPEG): cut short (it would decode gray below the cut), or a frame header claiming more
    pixels than its bytes can code (damaged: gigabytes and seconds of decoding, of nothing)."""
    if not whole_jpeg(data):
        return NOT_WHOLE_JPEG
    size = jpeg_size(data)  # (None: no frame header found, which the decoder judges)
    if size and size[0] * size[1] > JPEG_PIXELS_PER_BYTE_MAX * len(data):
        return (
            f"its frame header gives {size[1]}x{size[0]} pixels, more than {len(data)} bytes hold"
        )
    return None


def _decode_jpeg(data: memoryview) -> np.ndarray | None:
    """A shard's JPEG as (H, W, 3) uint8 RGB, upright, through OpenCV: the pixels of
    `decode_rgb` (the same libjpeg-turbo decoding, EXIF orientation applied), from one call
    that holds the GIL for none of it, where Pillow parses the headers in Python; decoding
    threads then scale with the cores. None for anything else, and for a JPEG without its
    end marker (Pillow decodes those, and refuses a truncated one). Shards hold gray or YCbCr
    JPEGs (`jobs.prepare` re-encodes the rest), for which the two agree."""
    import cv2

    if _jpeg_problem(data):
        return None  # not a JPEG, one cut short (OpenCV would fill in what is missing) or huge
    bgr_HW3 = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    return None if bgr_HW3 is None else bgr_HW3[..., ::-1]


def _device_crops(
    images: list[torch.Tensor | None],
    crop_px: int,
    rngs: list[np.random.Generator],
    device: torch.device | None = None,
) -> torch.Tensor:
    """torch.stack of `random_crop_flip` of each image with its generator, in a few kernels
    instead of one or two an image: the crops are gathered unflipped, then the flipped ones
    are flipped together. An image that did not decode (None) gives a black crop."""
    crops, flipped = [], []
    device = next((image.device for image in images if image is not None), device)
    for i, (image, rng) in enumerate(zip(images, rngs, strict=True)):
        if image is None:
            crops.append(torch.zeros((3, crop_px, crop_px), dtype=torch.uint8, device=device))
            continue
        height, width = image.shape[-2:]
        if min(height, width) < crop_px:  # scaled up first: rare, done whole
            crops.append(random_crop_flip(image, crop_px, rng))
            continue
        top, left, flip = crop_box(height, width, crop_px, rng)
        crops.append(image[:, top : top + crop_px, left : left + crop_px])
        flipped += [i] if flip else []
    out = torch.stack(crops)
    if flipped:
        rows = torch.tensor(flipped).to(out.device, non_blocking=True)
        out[rows] = out[rows].flip(-1)
    return out


def _loader_stream() -> torch.cuda.Stream:
    """The nvJPEG loader's stream, of the highest priority: its few small kernels (crops)
    run between the training step's, instead of queueing behind them while the decoder
    waits."""
    return torch.cuda.Stream(priority=-1)  # lower numbers run first; 0 is the default


class TrainLoader:
    """This rank's batches, step after step, from (epoch, offset) on, forever."""

    def __init__(
        self,
        index: DatasetIndex,
        *,
        rank: int,
        world_size: int,
        batch_size: int,
        crop_px: int,
        seed: int,
        window_images: int = WINDOW_IMAGES,
        read_groups: int = 1,
        start_epoch: int = 0,
        start_offset: int = 0,
        num_threads: int = 4,
        prefetch_batches: int = 2,
        decode: str = "pil",
        pin_memory: bool = False,
        s3: storage.S3Options | None = None,
        cache: NodeCache | None = None,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        if read_groups < 1 or world_size % read_groups:
            raise ValueError(f"{read_groups} read groups do not divide {world_size} workers")
        self.global_batch = batch_size * world_size
        group_ranks = world_size // read_groups
        self.group, self.group_rank = divmod(rank, group_ranks)
        self.group_batch = batch_size * group_ranks
        unit_images = max((len(k) for k in index.units.kept), default=0)
        if problem := too_few_images(index.num_images, self.global_batch, read_groups, unit_images):
            raise ValueError(f"dataset has {problem}")
        if start_offset % self.global_batch:
            raise ValueError(f"offset {start_offset} is not a multiple of the global batch")
        if decode not in DECODE_MODES:
            raise ValueError(f"decode must be one of {DECODE_MODES}, got {decode!r}")
        if prefetch_batches < 1:  # 0 would make the queue unbounded
            raise ValueError(f"prefetch_batches must be >= 1, got {prefetch_batches}")
        if decode == "processes" and not hasattr(os, "memfd_create"):
            raise ValueError("decode 'processes' shares its batches through memfd: Linux only")
        self.index, self.rank, self.batch_size = index, rank, batch_size
        self.crop_px, self.seed, self.window_images = crop_px, seed, window_images
        self.read_groups = read_groups
        self.epoch, self.offset = start_epoch, start_offset
        self.num_threads, self.prefetch_batches, self.decode, self.s3, self.cache = (
            num_threads, prefetch_batches, decode, s3, cache,
        )  # fmt: skip
        # CPU crops bound for a GPU: in page-locked memory, whose copies to the device run
        # asynchronously (from pageable memory the copy would hold up the training thread).
        self.pin_memory = pin_memory and decode != "nvjpeg"

    def steps_in_epoch(self, epoch: int) -> int:
        """Steps of `epoch`: its smallest read group's whole batches (the images beyond them,
        in each group, are left out of the epoch)."""
        return self._order(epoch)[1]

    def _order(self, epoch: int) -> tuple[np.ndarray, int]:
        """This rank's read group's order of `epoch`, and the epoch's steps: as many as its
        smallest group has batches."""
        orders = epoch_orders(
            self.index,
            epoch=epoch,
            seed=self.seed,
            window_images=self.window_images,
            groups=self.read_groups,
        )
        return orders[self.group], min(len(o) for o in orders) // self.group_batch

    @property
    def _horizon(self) -> int:
        """Images of the group's order read ahead of a step: a window's first steps need
        nearly all its row groups, and reading them a window ahead spreads the reads over
        the window before instead of a burst at its start."""
        return self.window_images + (self.prefetch_batches + 2) * self.group_batch

    def _epoch(self, epoch: int) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
        """(steps, the group's order's positions its steps use, the unit of each and its row
        in the unit) of `epoch`."""
        order, steps = self._order(epoch)
        order = order[: steps * self.group_batch]
        return steps, order, *self.index.units.of_rows(order)

    def _read_ahead(
        self,
        units: dict[int, Future],
        unit_of: np.ndarray,
        offset: int,
        io_pool: Executor,
        dropped: collections.deque,
        position: int,
    ) -> None:
        """Starts reading the row groups (`unit_of`: the unit of each position of the read
        group's order of the epoch) of this step (at `offset` in that order), of the next
        `prefetch_batches` steps and of a window's images beyond them that `units` (unit ->
        its `JpegFiles`, read or being read) lacks; drops the oldest ones none of those needs
        beyond two windows' worth of images. `position` counts the group's samples of every
        epoch so far (for `_delete_dropped`)."""
        needed = dict.fromkeys(unit_of[offset : offset + self._horizon].tolist())
        fresh = [u for u in needed if u not in units]
        for u in self.cache.spread(fresh) if self.cache else fresh:
            units[u] = io_pool.submit(self._read_unit, u)
        kept = self.index.units.kept
        held = sum(len(kept[u]) for u in units)
        limit = max(2 * self.window_images, sum(len(kept[u]) for u in needed))
        for u in [u for u in units if u not in needed]:
            if held <= limit:
                break
            held -= len(kept[u])
            future = units.pop(u)
            if self.cache is not None:
                future.cancel()  # if not started yet: then never read
                dropped.append((position, future, self._unit_key(u)))
        if self.cache is not None:
            self._delete_dropped(dropped, position)

    def _delete_dropped(self, dropped: collections.deque, position: int) -> None:
        """Deletes the node-cache files of the row groups `dropped` (position, read, key)
        a few steps before `position` whose reads are over. The loaders of a machine's
        workers run up to about 2 x prefetch_batches steps apart (each runs ahead of its
        training steps), so a file deleted at once could still be wanted by another; and a
        read still going would save it again after the delete."""
        lag = (2 * self.prefetch_batches + 4) * self.group_batch
        while dropped and dropped[0][0] <= position - lag and dropped[0][1].done():
            self.cache.drop(dropped.popleft()[2])

    def _unit_key(self, u: int) -> str:
        """A row group's name in the node cache: its shard's URL and size, and its number,
        first byte and size in the shard."""
        units = self.index.units
        s, g = int(units.shard[u]), int(units.group[u])
        start, size = self.index.jpeg_range(s, g)
        shard = f"{self.index.shard_urls[s]}\n{self.index.sizes[s]}\n{start}\n{size}".encode()
        return f"{hashlib.blake2b(shard, digest_size=10).hexdigest()}-{g}"

    def _read_unit(self, u: int) -> JpegFiles:
        """The JPEG column of one row group: from the node cache, or read from storage."""
        if self.cache is None:
            return self._fetch_unit(u)
        units = self.index.units
        rows = self.index.metadata[units.shard[u]].row_group(int(units.group[u])).num_rows
        return self.cache.get(self._unit_key(u), lambda: self._fetch_unit(u), rows)

    def _fetch_unit(self, u: int) -> JpegFiles:
        units = self.index.units
        return self.index.read_jpegs(int(units.shard[u]), int(units.group[u]), self.s3)

    def _start(
        self,
        data: list[memoryview],
        where: list[str],
        epoch: int,
        positions: np.ndarray,
        pool: Executor | _ProcessDecoders,
        stream: torch.cuda.Stream | None,
    ) -> Callable[[], tuple[torch.Tensor, torch.cuda.Event | None]]:
        """Starts decoding and cropping a batch (`where`: each file's shard and row, for
        warnings); returns the call that waits for its crops (and, on CUDA, the event of
        `stream` after which they are ready)."""
        seeds = [crop_seed(self.seed, epoch, int(p)) for p in positions]
        shape = (len(data), 3, self.crop_px, self.crop_px)
        if self.decode == "processes":
            crops = torch.empty(shape, dtype=torch.uint8, pin_memory=self.pin_memory)
            gather = pool.start(data, seeds, where, crops)
            return lambda: (gather(), None)
        rngs = [np.random.default_rng(seed) for seed in seeds]
        if self.decode == "nvjpeg":
            import torchvision.io  # only on CUDA machines: PyPI's torchvision needs CUDA torch

            # A file cut short, or empty (its row group damaged), is not handed to nvJPEG:
            # it would decode the first gray below the cut, and refuse the second outright.
            problems = [_jpeg_problem(d) for d in data]
            whole = [p is None for p in problems]
            kept = itertools.compress(data, whole)
            frames = [torch.frombuffer(d, dtype=torch.uint8) for d in kept]
            # On the loader's own stream: torchvision makes the caller's current stream wait
            # for its decoder, which on the training stream would stall the step in flight.
            with torch.cuda.stream(stream):
                # The decoder writes on a stream of its own, into blocks this stream may have
                # freed with reads still queued (the last batch's crops): finish those.
                stream.synchronize()
                decoded = iter(
                    each_or_none(
                        lambda some: torchvision.io.decode_jpeg(
                            some, mode=torchvision.io.ImageReadMode.RGB, device="cuda"
                        ),
                        frames,
                    )  # a file that does not decode fails the batch: then file by file
                    if frames
                    else []
                )
                images = [next(decoded) if ok else None for ok in whole]
                for image, problem, place in zip(images, problems, where, strict=True):
                    if image is None:
                        _undecodable(place, problem or "nvJPEG refuses it")
                device = torch.device("cuda", torch.cuda.current_device())
                crops = _device_crops(images, self.crop_px, rngs, device)
                ready = torch.cuda.Event()
                ready.record()
            return lambda: (crops, ready)
        crops = torch.empty(shape, dtype=torch.uint8, pin_memory=self.pin_memory)
        done = [
            pool.submit(_crop_into, crops[i], d, g, w)
            for i, (d, g, w) in enumerate(zip(data, rngs, where, strict=True))
        ]

        def wait() -> tuple[torch.Tensor, None]:
            for future in done:
                future.result()
            return crops, None

        return wait

    def _batches(self) -> Iterator[tuple[Batch, torch.cuda.Event | None]]:
        """Steps are started `prefetch_batches` ahead of the one handed out, so that the
        decoding threads always have a queue of images; shards are read ahead likewise.
        Yields each batch with the CUDA event its crops are ready at (nvJPEG), or None."""
        epoch, offset = self.epoch, self.offset
        position = 0  # the group's samples of every epoch so far
        started: collections.deque = collections.deque()
        units: dict[int, Future] = {}
        dropped: collections.deque = collections.deque()  # see _delete_dropped
        stream = _loader_stream() if self.decode == "nvjpeg" else None
        if self.decode == "processes":
            pool: Executor | _ProcessDecoders = _ProcessDecoders(self.num_threads)
        else:
            pool = ThreadPoolExecutor(self.num_threads, thread_name_prefix="decode")
        io_pool = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="shard-read")
        coming = self._epoch(epoch)
        try:
            while True:
                steps, order, unit_of, row_in_unit = coming
                coming, ahead = None, unit_of
                while offset < steps * self.global_batch:
                    at = offset // self.global_batch * self.group_batch  # in the group's order
                    if coming is None and at + self._horizon > len(unit_of):
                        # the next epoch's first row groups, read ahead as any others
                        coming = self._epoch(epoch + 1)
                        ahead = np.concatenate([unit_of, coming[2]])
                    self._read_ahead(units, ahead, at, io_pool, dropped, position)
                    position += self.group_batch
                    mine = np.arange(self.batch_size) + at + self.group_rank * self.batch_size
                    in_units = np.stack([unit_of[mine], row_in_unit[mine]], 1).tolist()
                    read = {u: units[u].result() for u, _ in in_units}  # once a row group
                    data = [read[u][r] for u, r in in_units]
                    where = [f"{self.index.shard_urls[s]} row {r}" for s, r in order[mine]]
                    positions = np.arange(self.batch_size) + offset + self.rank * self.batch_size
                    offset += self.global_batch
                    wait = self._start(data, where, epoch, positions, pool, stream)
                    started.append((wait, epoch, offset, positions))
                    if len(started) > self.prefetch_batches:
                        wait, *step = started.popleft()
                        crops, ready = wait()
                        yield Batch(crops, *step), ready
                epoch, offset = epoch + 1, 0
                coming = coming or self._epoch(epoch)
        finally:
            pool.shutdown(cancel_futures=True)
            io_pool.shutdown(cancel_futures=True)

    def __iter__(self) -> Iterator[Batch]:
        """Batches produced by a background thread, `prefetch_batches` ahead. Closing the
        iterator stops that thread and waits for it (at most the batch it is finishing)."""
        buffer: queue.Queue = queue.Queue(maxsize=self.prefetch_batches)
        stop = threading.Event()
        # The CUDA device is set per thread: decode on the consumer's (a worker's local rank).
        device = torch.cuda.current_device() if self.decode == "nvjpeg" else None

        def put(item: object) -> None:
            while not stop.is_set():
                try:
                    buffer.put(item, timeout=0.1)
                    return
                except queue.Full:
                    continue

        def produce() -> None:
            if device is not None:
                torch.cuda.set_device(device)
            try:
                with contextlib.closing(self._batches()) as batches:
                    for batch in batches:
                        put(batch)
                        if stop.is_set():
                            return
            except BaseException as e:  # surfaced in the consumer
                put(e)

        thread = threading.Thread(target=produce, daemon=True, name="train-loader")
        thread.start()
        try:
            while True:
                item = buffer.get()
                if isinstance(item, BaseException):
                    raise item
                batch, ready = item
                if ready is not None:  # made on the loader's CUDA stream: wait for it there
                    consumer = torch.cuda.current_stream()
                    consumer.wait_event(ready)
                    batch.rgb_N3HW.record_stream(consumer)  # freed for reuse after its use here
                yield batch
        finally:
            stop.set()
            thread.join()

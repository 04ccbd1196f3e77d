"""The training input pipeline: seeded epochs over a prepared dataset, split by rank.

An epoch is a permutation of the dataset's colour images (grayscale sources are left out,
as the released training left them out), built in two levels so that a worker never needs
the whole dataset at once: the shards are shuffled, cut into windows of `window_shards`,
and the images of each window are shuffled. Step s of an epoch uses the global positions
[s*B, (s+1)*B) of that order, B = world_size x per-rank batch; rank r takes the r-th
slice of b = B / world_size of them. So within an epoch no image is used twice, across all
workers, and the state of the stream is one number, the global sample offset (epoch,
offset), which checkpoints store: a resumed run continues with exactly the samples, crops
and flips it would have used.

The N mod B images left over at the end of an epoch's order are not used in that epoch
(no padding with duplicates, every step has the full global batch); the next epoch's
order is a new permutation, so a different remainder is left out each time.

Workers decode, crop and flip in a thread pool (JPEGs with OpenCV, which holds the GIL for
none of it and gives Pillow's pixels; anything else with Pillow),
with the next steps' images queued behind the current one's so the threads never wait on a
batch boundary, and read the coming steps' shards in threads of their own; a background
thread hands out finished batches. On CUDA, `decode="nvjpeg"` decodes on the GPU instead.
Every worker reads the shards of the current window (it needs a slice of each), which
trades some repeated reads for exact, rank-independent sample order. An image that does not
decode (a shard damaged since `jobs.prepare` checked it) becomes a black crop, with a warning
naming its shard and row: grey, so the loss gives it no weight, and the order stays.
"""

from __future__ import annotations

import collections
import contextlib
import io
import logging
import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from colorcore.data import crop_box, random_crop_flip
from jobs import storage
from jobs.dataset import Manifest
from jobs.images import decode_rgb, each_or_none

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DatasetIndex:
    """Where each usable image of a prepared dataset is: shard URLs and kept row numbers."""

    shard_urls: tuple[str, ...]
    rows: tuple[np.ndarray, ...]  # per shard: row numbers of colour images
    labels: tuple[np.ndarray, ...]

    @property
    def num_images(self) -> int:
        return sum(len(r) for r in self.rows)

    @classmethod
    def load(
        cls, dataset_url: str, s3: storage.S3Options | None = None, *, include_gray: bool = False
    ) -> DatasetIndex:
        import pyarrow.parquet as pq

        manifest = Manifest.load(dataset_url, s3)
        fs, root = storage.arrow_filesystem(dataset_url, s3)
        urls, rows, labels = [], [], []
        for shard in manifest.shards:
            table = pq.read_table(
                f"{root}/{shard.name}", filesystem=fs, columns=["label", "grayscale"]
            )
            gray = table.column("grayscale").to_numpy(zero_copy_only=False)
            keep = np.arange(len(gray)) if include_gray else np.flatnonzero(~gray)
            urls.append(storage.join(dataset_url, shard.name))
            rows.append(keep)
            labels.append(table.column("label").to_numpy()[keep])
        return cls(tuple(urls), tuple(rows), tuple(labels))


def epoch_order(index: DatasetIndex, *, epoch: int, seed: int, window_shards: int) -> np.ndarray:
    """The epoch's order as (shard, row) pairs, shape (num_images, 2)."""
    rng = np.random.default_rng([seed, epoch])
    shards = rng.permutation(len(index.shard_urls))
    parts = []
    for start in range(0, len(shards), window_shards):
        window = [
            np.stack([np.full(len(index.rows[s]), s), index.rows[s]], axis=1)
            for s in shards[start : start + window_shards]
        ]
        pairs = np.concatenate(window) if window else np.zeros((0, 2), np.int64)
        parts.append(pairs[rng.permutation(len(pairs))])
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros((0, 2), np.int64)


@dataclass(frozen=True)
class Batch:
    rgb_N3HW: torch.Tensor
    """uint8 crops (CPU, or CUDA with nvJPEG decoding)."""
    epoch: int
    next_offset: int
    """Global sample offset in `epoch` after this step (what a checkpoint stores)."""
    positions: np.ndarray
    """Global positions of this rank's samples in the epoch's order (for tests and logs)."""


class JpegFiles:
    """A shard's JPEG column in one writable buffer of its own: file r is a memoryview into
    it, so a batch's files reach the decoders without a copy each (from Arrow to bytes, and
    again to a writable buffer for torch)."""

    def __init__(self, column: pa.ChunkedArray) -> None:
        array = column.combine_chunks()
        if not (pa.types.is_binary(array.type) or pa.types.is_large_binary(array.type)):
            raise ValueError(f"a shard's jpeg column must be binary, not {array.type}")
        if array.null_count:
            raise ValueError(f"a shard's jpeg column has {array.null_count} nulls")
        width = np.int64 if pa.types.is_large_binary(array.type) else np.int32
        _, offsets, values = array.buffers()
        ends = np.frombuffer(offsets, width)[array.offset : array.offset + len(array) + 1]
        stored = np.frombuffer(values, np.uint8) if values is not None else np.empty(0, np.uint8)
        self._values = stored[ends[0] : ends[-1]].copy()
        self._ends = (ends - ends[0]).astype(np.int64)

    def __len__(self) -> int:
        return len(self._ends) - 1

    def __getitem__(self, row: int) -> memoryview:
        return memoryview(self._values[self._ends[row] : self._ends[row + 1]])


def _undecodable(where: str, error: object) -> None:
    log.warning(
        "loader: %s does not decode (%s): its crop is black, a grey image, which the loss "
        "leaves out", where, error,
    )  # fmt: skip


def _crop_into(
    out_3HW: torch.Tensor, data: memoryview, rng: np.random.Generator, where: str
) -> None:
    """`random_crop_flip` of the decoded image with `rng`, written into `out_3HW`; cropped
    and flipped as views before the pixels are copied (once), when no upscaling is needed.
    An image that does not decode (a shard damaged since it was prepared) gives a black
    crop: grey, so it has no weight in the loss, and the run goes on with the same order."""
    try:
        rgb_HW3 = _decode_jpeg(data)
        if rgb_HW3 is None:  # not a JPEG OpenCV reads: the checked decoder, and its error
            rgb_HW3 = np.asarray(decode_rgb(data))
    except Exception as error:
        _undecodable(where, error)
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


def _decode_jpeg(data: memoryview) -> np.ndarray | None:
    """A shard's JPEG as (H, W, 3) uint8 RGB, upright, through OpenCV: the pixels of
    `decode_rgb` (the same libjpeg-turbo decoding, EXIF orientation applied), from one call
    that holds the GIL for none of it, where Pillow parses the headers in Python; decoding
    threads then scale with the cores. None for anything else, and for a JPEG without its
    end marker (Pillow decodes those, and refuses a truncated one). Shards hold gray or YCbCr
    JPEGs (`jobs.prepare` re-encodes the rest), for which the two agree."""
    import cv2

    if bytes(data[:2]) != b"\xff\xd8" or bytes(data[-2:]) != b"\xff\xd9":
        return None  # not a JPEG, or one cut short: OpenCV would fill in what is missing
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
        window_shards: int = 4,
        start_epoch: int = 0,
        start_offset: int = 0,
        num_threads: int = 4,
        prefetch_batches: int = 2,
        decode: str = "pil",
        pin_memory: bool = False,
        s3: storage.S3Options | None = None,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.global_batch = batch_size * world_size
        if index.num_images < self.global_batch:
            raise ValueError(
                f"dataset has {index.num_images} colour images, fewer than one global batch "
                f"({self.global_batch})"
            )
        if start_offset % self.global_batch:
            raise ValueError(f"offset {start_offset} is not a multiple of the global batch")
        if decode not in ("pil", "nvjpeg"):
            raise ValueError(f"decode must be 'pil' or 'nvjpeg', got {decode!r}")
        self.index, self.rank, self.batch_size = index, rank, batch_size
        self.crop_px, self.seed, self.window_shards = crop_px, seed, window_shards
        self.epoch, self.offset = start_epoch, start_offset
        self.num_threads, self.prefetch_batches, self.decode, self.s3 = (
            num_threads, prefetch_batches, decode, s3,
        )  # fmt: skip
        # CPU crops bound for a GPU: in page-locked memory, whose copies to the device run
        # asynchronously (from pageable memory the copy would hold up the training thread).
        self.pin_memory = pin_memory and decode == "pil"

    @property
    def steps_per_epoch(self) -> int:
        return self.index.num_images // self.global_batch

    def _read_ahead(
        self, shards: dict[int, Future], order: np.ndarray, offset: int, io_pool: Executor
    ) -> None:
        """Starts reading the shards of this step and of the next `prefetch_batches` steps
        that `shards` (shard -> its `JpegFiles`, read or being read) lacks; drops the oldest
        shards no such step needs beyond two windows' worth."""
        ahead = order[offset : offset + (self.prefetch_batches + 2) * self.global_batch, 0]
        needed = dict.fromkeys(ahead.tolist())
        for s in needed:
            if s not in shards:
                shards[s] = io_pool.submit(self._read_shard, s)
        spare = len(shards) - max(2 * self.window_shards, len(needed))
        for s in [s for s in shards if s not in needed][: max(0, spare)]:
            del shards[s]

    def _read_shard(self, s: int) -> JpegFiles:
        import pyarrow.parquet as pq

        data = storage.read_bytes(self.index.shard_urls[s], self.s3)
        return JpegFiles(pq.read_table(io.BytesIO(data), columns=["jpeg"]).column("jpeg"))

    def _start(
        self,
        data: list[memoryview],
        where: list[str],
        epoch: int,
        positions: np.ndarray,
        pool: ThreadPoolExecutor,
        stream: torch.cuda.Stream | None,
    ) -> Callable[[], tuple[torch.Tensor, torch.cuda.Event | None]]:
        """Starts decoding and cropping a batch (`where`: each file's shard and row, for
        warnings); returns the call that waits for its crops (and, on CUDA, the event of
        `stream` after which they are ready)."""
        rngs = [np.random.default_rng([self.seed, epoch, int(p)]) for p in positions]
        if self.decode == "nvjpeg":
            import torchvision.io  # only on CUDA machines: PyPI's torchvision needs CUDA torch

            frames = [torch.frombuffer(d, dtype=torch.uint8) for d in data]
            # On the loader's own stream: torchvision makes the caller's current stream wait
            # for its decoder, which on the training stream would stall the step in flight.
            with torch.cuda.stream(stream):
                # The decoder writes on a stream of its own, into blocks this stream may have
                # freed with reads still queued (the last batch's crops): finish those.
                stream.synchronize()
                images = each_or_none(
                    lambda some: torchvision.io.decode_jpeg(
                        some, mode=torchvision.io.ImageReadMode.RGB, device="cuda"
                    ),
                    frames,
                )  # a file that does not decode fails the batch: then file by file
                for image, place in zip(images, where, strict=True):
                    if image is None:
                        _undecodable(place, "nvJPEG refuses it")
                device = torch.device("cuda", torch.cuda.current_device())
                crops = _device_crops(images, self.crop_px, rngs, device)
                ready = torch.cuda.Event()
                ready.record()
            return lambda: (crops, ready)
        crops = torch.empty(
            (len(data), 3, self.crop_px, self.crop_px),
            dtype=torch.uint8,
            pin_memory=self.pin_memory,
        )
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
        started: collections.deque = collections.deque()
        shards: dict[int, Future] = {}
        stream = _loader_stream() if self.decode == "nvjpeg" else None
        pool = ThreadPoolExecutor(self.num_threads, thread_name_prefix="decode")
        io_pool = ThreadPoolExecutor(self.window_shards, thread_name_prefix="shard-read")
        try:
            while True:
                order = epoch_order(
                    self.index, epoch=epoch, seed=self.seed, window_shards=self.window_shards
                )
                last = self.steps_per_epoch * self.global_batch
                while offset < last:
                    self._read_ahead(shards, order, offset, io_pool)
                    start = offset + self.rank * self.batch_size
                    positions = np.arange(start, start + self.batch_size)
                    picked = order[positions]
                    data = [shards[int(s)].result()[int(r)] for s, r in picked]
                    where = [f"{self.index.shard_urls[s]} row {r}" for s, r in picked]
                    offset += self.global_batch
                    wait = self._start(data, where, epoch, positions, pool, stream)
                    started.append((wait, epoch, offset, positions))
                    if len(started) > self.prefetch_batches:
                        wait, *step = started.popleft()
                        crops, ready = wait()
                        yield Batch(crops, *step), ready
                epoch, offset = epoch + 1, 0
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

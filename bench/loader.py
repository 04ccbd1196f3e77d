"""Training input throughput: `jobs.loader.TrainLoader` against a plain one-thread PIL loop.

    python bench/loader.py             (from the repository root; about a minute on 2 cores)

Input: a prepared dataset written into a temporary folder in the shard schema of
`jobs.dataset` (Parquet shards + manifest, no Ray needed): windows of scikit-image's colour
photos resized to a short side of 256 (the size `jobs.prepare` stores), JPEG 4:4:4 at
quality 95, as `jobs.prepare` encodes them. Both sides turn the same JPEG bytes into batches
of uint8 (N, 3, 176, 176) crops with random horizontal flips:

- baseline, a plain loop on one thread over bytes already in memory: PIL decode, a random
  crop and flip in numpy, to a torch tensor, `torch.stack` per batch;
- `TrainLoader` with CPU threads (``decode="pil"``), as a training worker runs it: shard reads
  (ahead, in their own threads), the epoch's permutation, decoding (OpenCV, the pixels of
  `jobs.images.decode_rgb`, EXIF orientation included), crop and flip with the per-sample
  seeded generators in its thread pool, steps started ahead, a background prefetch thread.
  Its time is its second epoch, shard reads included (the first started its threads or
  processes and its read-ahead, as a training run's first steps do). It runs on 1, 2, 4, ...
  threads up to ``--threads`` (default: every core), which shows where more threads stop
  paying (`jobs.loader.DECODE_THREADS_MAX`); then in ``--threads`` processes
  (``decode="processes"``), where the GIL is no one's to share.

Each figure is the median of several timed passes over the dataset after an untimed one.

Then the storage reads of a machine's workers (``--workers``, the ranks of one node, each
with its own `TrainLoader` and its share of the batch): the bytes read from storage over one
epoch with each worker reading every row group it needs, and with the row groups shared
through a `jobs.node_cache.NodeCache`, against the bytes of the shards' JPEG columns; and
each machine's of a run on ``--machines`` of them, in one read group (every machine reads
every row group) and in one read group a machine (each reads its own part).

The figure of merit is images/s per core: the loader's divided by its decode threads. The
last column is the CPU time the loader costs its own process (all its threads), per image:
in a training worker, the time it competes for with the thread that drives the GPU; decoding
processes take most of it elsewhere.
On a CUDA machine the loader's nvJPEG path (``decode="nvjpeg"``: decode and crop on the GPU,
one producer thread) is measured too, and nvJPEG's decode of one batch of 256 alone, as
stored (4:4:4) and at 4:2:0, each on an idle GPU and beside matrix products on another
stream (`nvjpeg_decode_ms`).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import os
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import timing  # noqa: F401  (first: pins thread pools to 1 before numpy and torch load)

# isort: split
import numpy as np
import pyarrow as pa
import torch
from PIL import Image
from skimage import data

from colorcore.data import CROP_PX
from jobs import storage
from jobs.dataset import (
    SHARD_ROW_GROUP_ROWS,
    SHARD_SCHEMA,
    SHARDS_DIR,
    Manifest,
    ShardInfo,
    shard_parquet,
)
from jobs.images import encode_jpeg
from jobs.loader import WINDOW_IMAGES, DatasetIndex, TrainLoader
from jobs.node_cache import NodeCache

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry")
SHORT_SIDE_PX = 256  # jobs.prepare's default short side
MACHINE_EPOCHS = 4  # epochs the multi-machine reads are averaged over


def photo_jpegs(count: int, seed: int = 0) -> list[bytes]:
    """`count` different JPEGs: random windows (60-100% of each side) of the photos, resized."""
    rng = np.random.default_rng(seed)
    photos = [getattr(data, name)()[..., :3] for name in PHOTOS]
    jpegs = []
    for i in range(count):
        photo = photos[i % len(photos)]
        h, w = (int(side * rng.uniform(0.6, 1.0)) for side in photo.shape[:2])
        top, left = rng.integers(0, photo.shape[0] - h + 1), rng.integers(0, photo.shape[1] - w + 1)
        window = Image.fromarray(photo[top : top + h, left : left + w])
        scale = SHORT_SIDE_PX / min(h, w)
        size = (max(SHORT_SIDE_PX, round(w * scale)), max(SHORT_SIDE_PX, round(h * scale)))
        jpegs.append(encode_jpeg(window.resize(size, Image.Resampling.BICUBIC)))
    return jpegs


def write_dataset(root: str, jpegs: list[bytes], shard_images: int) -> None:
    """The jpegs as a prepared dataset at `root` (shards + manifest)."""
    shards = []
    for s, start in enumerate(range(0, len(jpegs), shard_images)):
        rows = []
        for n, jpeg in enumerate(jpegs[start : start + shard_images], start):
            w, h = Image.open(io.BytesIO(jpeg)).size
            rows.append({"key": f"photos/{n:05d}", "label": 0, "jpeg": jpeg, "height_px": h,
                         "width_px": w, "src_sha256": hashlib.sha256(jpeg).hexdigest(),
                         "grayscale": False})  # fmt: skip
        data = shard_parquet(pa.Table.from_pylist(rows, schema=SHARD_SCHEMA))  # as prepare's
        name = f"{SHARDS_DIR}/train-{s:05d}.parquet"
        storage.write_bytes(storage.join(root, name), data)
        sha = hashlib.sha256(data).hexdigest()
        shards.append(ShardInfo(name=name, num_rows=len(rows), sha256=sha))
    Manifest(classes=("photos",), shards=tuple(shards), num_inputs=len(jpegs), num_errors=0).save(
        root
    )


def plain_batches(jpegs: list[bytes], batch_size: int, rng: np.random.Generator) -> int:
    """The baseline loop over whole batches; returns the number of images produced."""
    used = len(jpegs) - len(jpegs) % batch_size
    for start in range(0, used, batch_size):
        crops = []
        for jpeg in jpegs[start : start + batch_size]:
            rgb_HW3 = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))
            top = rng.integers(0, rgb_HW3.shape[0] - CROP_PX + 1)
            left = rng.integers(0, rgb_HW3.shape[1] - CROP_PX + 1)
            crop = rgb_HW3[top : top + CROP_PX, left : left + CROP_PX]
            crop = crop[:, ::-1] if rng.random() < 0.5 else crop
            crops.append(torch.from_numpy(np.ascontiguousarray(crop)).permute(2, 0, 1))
        torch.stack(crops)
    return used


def loader_epoch(
    index: DatasetIndex, batch_size: int, threads: int, decode: str
) -> tuple[float, float]:
    """Images/s of `TrainLoader`'s second epoch, the first having started its threads or
    processes and its read-ahead, and the CPU time it cost the calling process (all its
    threads), microseconds an image: the share a training worker's own process pays, beside
    the thread driving the GPU."""
    loader = TrainLoader(
        index, rank=0, world_size=1, batch_size=batch_size, crop_px=CROP_PX, seed=0,
        num_threads=threads, decode=decode,
    )  # fmt: skip
    batches = iter(loader)

    def epoch(steps: int) -> None:
        rgb_N3HW = None
        for _ in range(steps):
            rgb_N3HW = next(batches).rgb_N3HW
        if rgb_N3HW is not None and rgb_N3HW.is_cuda:
            torch.cuda.synchronize()

    epoch(loader.steps_in_epoch(0))
    steps = loader.steps_in_epoch(1)
    start, cpu = time.perf_counter(), time.process_time()
    epoch(steps)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    batches.close()
    images = steps * batch_size
    return images / elapsed, 1e6 * cpu / images


def machine_epoch(
    index: DatasetIndex,
    workers: int,
    batch_size: int,
    threads: int,
    share: bool,
    *,
    machine: int = 0,
    machines: int = 1,
    read_groups: int = 1,
    epochs: int = 1,
    window_images: int = WINDOW_IMAGES,
) -> tuple[int, float]:
    """(bytes read from storage, seconds) of `epochs` epochs of the `workers` loaders of one
    machine run at once (`machine` of a run of `machines` x `workers` ranks, rank r on machine
    r // workers, sharing `batch_size`), each with `threads` decoding threads; with `share`
    through a `NodeCache` in a temporary folder. The loaders take their steps together, as
    the ranks of a run do. Machines share nothing, so one machine's reads are the same run
    alone as beside the others."""
    read = [0]
    step_together = threading.Barrier(workers)
    real = storage.read_range

    def counted(url, start, size, s3=None):
        data = real(url, start, size, s3)
        read[0] += len(data)
        return data

    def epoch(local_rank: int, cache: NodeCache | None) -> None:
        try:
            loader = TrainLoader(
                index, rank=machine * workers + local_rank, world_size=machines * workers,
                batch_size=batch_size // (machines * workers), crop_px=CROP_PX, seed=0,
                num_threads=threads, read_groups=read_groups, window_images=window_images,
                cache=cache,
            )  # fmt: skip
            with contextlib.closing(iter(loader)) as batches:
                for _ in range(sum(map(loader.steps_in_epoch, range(epochs)))):
                    next(batches)
                    step_together.wait()
        except BaseException:
            step_together.abort()  # the others' waits raise instead of waiting for ever
            raise

    with tempfile.TemporaryDirectory(prefix="loader-bench-shm-") as root:
        caches = [
            NodeCache.open(
                "bench", local_rank=r, local_world_size=workers, need_bytes=1, roots=(root,)
            )
            if share
            else None
            for r in range(workers)
        ]
        storage.read_range = counted
        try:
            start = time.perf_counter()
            with ThreadPoolExecutor(workers) as pool:
                list(pool.map(epoch, range(workers), caches))
            elapsed = time.perf_counter() - start
        finally:
            storage.read_range = real
            for cache in caches:
                if cache is not None:
                    cache.close()
    return read[0], elapsed


def nvjpeg_decode_ms(jpegs: list[bytes], batch: int = 256) -> dict[str, float]:
    """ms for torchvision's nvJPEG to decode one batch of the files as stored (4:4:4) and
    re-encoded with 4:2:0 chroma, each alone and while bf16 matrix products fill the GPU
    from another stream (as a training step does): nvJPEG decodes baseline JPEGs on the
    hardware decoder where it supports their layout, else partly on the host with a
    synchronisation an image, which a busy GPU delays."""
    from torchvision.io import ImageReadMode, decode_jpeg

    files = {"444": jpegs[:batch]}
    files["420"] = [
        encode_jpeg_420(Image.open(io.BytesIO(jpeg)).convert("RGB")) for jpeg in files["444"]
    ]
    side = torch.cuda.Stream()
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    out = {}
    for name, batch_files in files.items():
        frames = [torch.frombuffer(bytearray(f), dtype=torch.uint8) for f in batch_files]

        def decode(frames=frames) -> None:  # this stream waits for the decoder's
            decode_jpeg(frames, mode=ImageReadMode.RGB, device="cuda")
            torch.cuda.current_stream().synchronize()

        decode()  # warm-up
        for busy in (False, True):
            if busy:  # about 0.3 s of products queued ahead of the decode
                with torch.cuda.stream(side):
                    for _ in range(200):
                        a @ a
            start = time.perf_counter()
            decode()
            out[f"{name}{'_busy' if busy else ''}"] = 1e3 * (time.perf_counter() - start)
            side.synchronize()
    return out


def encode_jpeg_420(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95, subsampling=2)
    return buffer.getvalue()


def thread_counts(most: int) -> list[int]:
    """The decoding threads to measure: powers of two below `most`, and `most`."""
    return [t for t in (1, 2, 4, 8, 16, 32, 64) if t < most] + [most]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=1024, help="images in the dataset")
    parser.add_argument("--shard-images", type=int, default=64, help="images per shard")
    parser.add_argument("--batch-size", type=int, default=40, help="images per batch (paper: 40)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="loader threads")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per pipeline")
    parser.add_argument("--workers", type=int, default=4, help="workers of one machine")
    parser.add_argument("--machines", type=int, default=2, help="machines of a multi-node run")
    args = parser.parse_args()
    if args.batch_size % (args.machines * args.workers):
        parser.error("--batch-size must divide by --machines x --workers")
    torch.set_num_threads(1)

    jpegs = photo_jpegs(args.images)
    with tempfile.TemporaryDirectory(prefix="loader-bench-") as root:
        write_dataset(root, jpegs, args.shard_images)
        index = DatasetIndex.load(root)
        rng = np.random.default_rng(0)

        def plain_run() -> tuple[float, float]:
            start, cpu = time.perf_counter(), time.process_time()
            images = plain_batches(jpegs, args.batch_size, rng)
            elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
            return images / elapsed, 1e6 * cpu / images

        def median_run(fn) -> tuple[float, float]:
            """Median images/s and caller's CPU microseconds an image of `fn`'s passes."""
            fn()  # warm-up: page cache, thread pools, CUDA and nvJPEG start-up
            runs = [fn() for _ in range(args.repeats)]
            return tuple(statistics.median(run[i] for run in runs) for i in (0, 1))

        rows = [("plain PIL loop (decode, crop, flip)", 1, *median_run(plain_run))]
        for threads in thread_counts(args.threads):
            pil = median_run(lambda t=threads: loader_epoch(index, args.batch_size, t, "pil"))
            rows.append(("TrainLoader, CPU threads", threads, *pil))
        processes = median_run(
            lambda: loader_epoch(index, args.batch_size, args.threads, "processes")
        )
        rows.append(("TrainLoader, CPU processes", args.threads, *processes))
        if torch.cuda.is_available():
            nv = median_run(lambda: loader_epoch(index, args.batch_size, args.threads, "nvjpeg"))
            rows.append(("TrainLoader, nvJPEG on the GPU", 1, *nv))
            try:
                decode_ms = nvjpeg_decode_ms(jpegs)
            except Exception as error:  # a diagnostic: it must not lose the table
                decode_ms = {"failed": 0.0}
                print(f"nvjpeg_decode_ms failed: {error!r}")
        threads = max(1, args.threads // args.workers)
        machine = {
            share: machine_epoch(index, args.workers, args.batch_size, threads, share)
            for share in (False, True)
        }

        def machine_reads(m: int, groups: int) -> float:
            """Bytes an epoch, over a few epochs of one-row-group windows (a window as large
            as the dataset would stay in memory from one epoch to the next)."""
            run = {"machine": m, "machines": args.machines, "read_groups": groups}
            run |= {"epochs": MACHINE_EPOCHS, "window_images": SHARD_ROW_GROUP_ROWS}
            read, _ = machine_epoch(index, args.workers, args.batch_size, threads, True, **run)
            return read / MACHINE_EPOCHS

        per_machine = {
            groups: [machine_reads(m, groups) for m in range(args.machines)]
            for groups in (1, args.machines)
        }
        column_bytes = index.jpeg_bytes_per_image * index.num_images

    kib = sum(map(len, jpegs)) / len(jpegs) / 1024
    print(f"\n{len(jpegs)} JPEGs (short side {SHORT_SIDE_PX}, {kib:.0f} KiB mean) in "
          f"{len(index.shard_urls)} shards; batch {args.batch_size} of {CROP_PX} x {CROP_PX} "
          f"crops; {os.cpu_count()} cores; torch {torch.__version__}")  # fmt: skip
    plain = rows[0][2]
    print(f"{'pipeline':36s} {'cores':>5s} {'images/s':>9s} {'per core':>9s} {'vs plain':>9s} "
          f"{'own CPU us/image':>17s}")  # fmt: skip
    for name, cores, ips, cpu_us in rows:
        per_core = ips / cores
        print(f"{name:36s} {cores:5d} {ips:9.0f} {per_core:9.0f} {per_core / plain:8.2f}x "
              f"{cpu_us:17.0f}")  # fmt: skip
    if torch.cuda.is_available():
        print(f"nvJPEG decode of {min(256, len(jpegs))} files, ms (alone / beside matrix "
              "products): " + "; ".join(f"{k} {v:.1f}" for k, v in decode_ms.items()))  # fmt: skip
    print(f"\n{args.workers} workers of one machine, one epoch ({column_bytes / 1e6:.1f} MB "
          f"of JPEG column chunks), {threads} decoding threads each:")  # fmt: skip
    for share, (read, seconds) in machine.items():
        name = "row groups shared (NodeCache)" if share else "each worker reads its own"
        print(f"  {name:32s} {read / 1e6:8.1f} MB read from storage "
              f"({read / column_bytes:.2f}x the data) in {seconds:.1f} s")  # fmt: skip
    print(f"{args.machines} machines of {args.workers} workers sharing row groups, windows of "
          f"one row group, MB each machine read from storage an epoch (mean of "
          f"{MACHINE_EPOCHS}):")  # fmt: skip
    for groups, reads in per_machine.items():
        each = ", ".join(f"{read / 1e6:.1f} ({read / column_bytes:.2f}x)" for read in reads)
        print(f"  {f'{groups} read group' + 's' * (groups > 1):32s} {each}")


if __name__ == "__main__":
    main()

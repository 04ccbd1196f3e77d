"""Helpers for tests: the published reference tables and small real images."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]  # the repository's checkout
REFERENCE_DIR = ROOT.parent / "shared" / "reference"


def train_workers() -> list[int]:
    """Process ids of the Ray Train workers of this process's own Ray instance (its
    descendants: the raylet it started starts them), none of another Ray on the machine."""
    import psutil

    found = []
    for process in psutil.Process().children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(process.cmdline()):
                found.append(process.pid)
        except psutil.Error:  # gone meanwhile
            continue
    return sorted(found)


def reference_path(name: str) -> Path:
    """A published reference table; missing tables fail the test loudly (never skip)."""
    path = REFERENCE_DIR / name
    if not path.exists():
        pytest.fail(f"reference file {path} is missing: clone the project beside shared/")
    return path


def photo_rgb(name: str = "astronaut", size: int | None = None) -> np.ndarray:
    """One of scikit-image's bundled colour photos as uint8 (H, W, 3), optionally resized."""
    from PIL import Image
    from skimage import data

    rgb = getattr(data, name)()[..., :3]
    if size is not None:
        rgb = np.asarray(Image.fromarray(rgb).resize((size, size), Image.BICUBIC))
    return rgb


def write_image_tree(
    root: Path, *, classes: int = 2, per_class: int = 3, size: int = 64
) -> list[Path]:
    """A tiny ``<root>/<class>/<image>.jpg`` tree of crops from real photos."""
    from PIL import Image

    rng = np.random.default_rng(0)
    photos = [photo_rgb(n) for n in ("astronaut", "chelsea", "coffee", "rocket")]
    paths = []
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            photo = photos[(c + i) % len(photos)]
            y, x = (rng.integers(0, s - size) for s in photo.shape[:2])
            path = root / f"class{c}" / f"img{i}.jpg"
            Image.fromarray(photo[y : y + size, x : x + size]).save(path, quality=95)
            paths.append(path)
    return paths


def encode(rgb: np.ndarray, fmt: str = "JPEG", **kwargs) -> bytes:
    """An image array encoded in memory (JPEG quality 95 unless given)."""
    import io

    from PIL import Image

    if fmt == "JPEG":
        kwargs.setdefault("quality", 95)
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


SHARD_SIZES = (7, 5, 6, 5)  # 23 images, two of them grayscale
ROW_GROUP_ROWS = 3  # row groups of 3, 3, 1 | 3, 2 | 3, 3 | 3, 2 rows: the loader's units


def write_dataset(root: str, gray_rows: Iterable[int] = (3, 15)) -> None:
    """A prepared dataset written directly in the shard schema (no Ray needed): keys c/000 to
    c/022 (`gray_rows` grayscale), label n % 2 of classes a and b."""
    import hashlib

    import pyarrow as pa

    from jobs import storage
    from jobs.dataset import SHARD_SCHEMA, Manifest, ShardInfo, shard_parquet

    photo, gray_rows = photo_rgb("astronaut"), set(gray_rows)
    shards, n = [], 0
    for s, size in enumerate(SHARD_SIZES):
        rows = []
        for _ in range(size):
            gray = n in gray_rows
            crop = photo[n * 10 : n * 10 + 40, n * 5 : n * 5 + 56]
            if gray:
                crop = np.repeat(crop.mean(2, keepdims=True).astype(np.uint8), 3, axis=2)
            jpeg = encode(crop)
            rows.append({"key": f"c/{n:03d}", "label": n % 2, "jpeg": jpeg, "height_px": 40,
                         "width_px": 56, "src_sha256": hashlib.sha256(jpeg).hexdigest(),
                         "grayscale": gray})  # fmt: skip
            n += 1
        table = pa.Table.from_pylist(rows, schema=SHARD_SCHEMA)
        name = f"shards/part-{s:05d}-000.parquet"
        storage.write_bytes(storage.join(root, name), shard_parquet(table, ROW_GROUP_ROWS))
        shards.append(ShardInfo(name=name, num_rows=size, sha256="0" * 64))
    Manifest(classes=("a", "b"), shards=tuple(shards), num_inputs=n, num_errors=0,
             num_grayscale=len(gray_rows & set(range(n)))).save(root)  # fmt: skip


def tar_bytes(
    members: dict[str, bytes] | list[tuple[str, bytes]], symlink: str | None = None
) -> bytes:
    """A tar of `members` (name -> bytes, or (name, bytes) pairs, where a name may repeat),
    and a symlink member named `symlink` if given."""
    import io
    import tarfile

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in members.items() if isinstance(members, dict) else members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if symlink:
            link = tarfile.TarInfo(symlink)
            link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tar.addfile(link)
    return buffer.getvalue()


class Commands:
    """Commands started side by side as soon as they are named, each waited for by the test
    that reads it: a module fixture's `python -m` runs, which spend seconds importing torch,
    overlap instead of queueing one behind another."""

    def __init__(self, commands: dict[str, list[str]], **popen_kwargs) -> None:
        import subprocess

        self._procs = {
            key: subprocess.Popen(
                argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen_kwargs
            )
            for key, argv in commands.items()
        }

    def result(self, key: str, timeout: float = 300) -> tuple[int, str, str]:
        """(exit status, stdout, stderr) of the command named `key`, once it has ended."""
        proc = self._procs[key]
        out, err = proc.communicate(timeout=timeout)
        return proc.returncode, out, err

    def close(self) -> None:
        for proc in self._procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.communicate()


class Beside(threading.Thread):
    """A daemon thread running `target` beside the test (a killer waiting for a checkpoint):
    `join` raises what it raised, which a plain thread would leave to a log line."""

    def __init__(self, target: Callable[[], object]) -> None:
        super().__init__(daemon=True)
        self._run, self._error = target, None

    def run(self) -> None:
        try:
            self._run()
        except BaseException as error:
            self._error = error

    def join(self, timeout: float | None = None) -> None:
        super().join(timeout)
        if self._error is not None:
            raise self._error


def free_ports(count: int = 1) -> list[int]:
    """`count` distinct loopback ports that were free a moment ago (held open together while
    chosen, so that no two are the same)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()

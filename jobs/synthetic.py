"""A small synthetic dataset where colour is predictable from structure.

``python -m jobs.synthetic DST [--num-images 240] [--size-px 96] [--seed 0]``

Writes an image tree ``DST/<class>/<class>_<index>.png`` (local path or storage URL). Every
scene has a sky (a smooth vertical gradient), ground with a class-specific texture, and
objects whose hue follows from their shape and texture, so a model that sees only lightness
can learn the colours:

    day      blue sky, a pale yellow sun disc, green grass (fine noise texture)
    sunset   orange-to-purple sky, a large orange sun on the horizon, dark brown ground
    beach    light blue sky, smooth sand, blue water band with horizontal ripples

Objects on the ground: red boxes with vertical stripes, yellow discs with a dark rim.
The same (seed, class, index) always gives the same image, whatever the worker.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import numpy as np

from jobs.storage import S3Options

CLASSES = ("day", "sunset", "beach")


@dataclass(frozen=True, kw_only=True)
class SyntheticConfig:
    dst: str = ""
    """Output folder (local path or storage URL)."""
    num_images: int = 240
    """Images in all, split evenly over the classes."""
    size_px: int = 96
    """Side of the square images."""
    seed: int = 0
    """Seed: the same seed gives the same images."""
    s3: S3Options = field(default_factory=S3Options)

    def __post_init__(self) -> None:
        if not self.dst:
            raise ValueError("DST (output folder) is required")
        if self.num_images < len(CLASSES):
            raise ValueError(f"num_images must be >= {len(CLASSES)}, got {self.num_images}")
        if not 16 <= self.size_px <= 1024:
            raise ValueError(f"size_px must be in [16, 1024], got {self.size_px}")
        if self.seed < 0:  # numpy's generators take none
            raise ValueError(f"seed must be >= 0, got {self.seed}")


def _gradient(top: tuple, bottom: tuple, height: int, width: int) -> np.ndarray:
    t = np.linspace(0.0, 1.0, height)[:, None, None]
    column = (1 - t) * np.asarray(top, float) + t * np.asarray(bottom, float)
    return np.broadcast_to(column, (height, width, 3)).copy()


def _disc(
    canvas: np.ndarray, cy: float, cx: float, r: float, rgb: tuple, rim: tuple | None
) -> None:
    yy, xx = np.mgrid[: canvas.shape[0], : canvas.shape[1]]
    d = np.hypot(yy - cy, xx - cx)
    canvas[d <= r] = rgb
    if rim is not None:
        canvas[(d <= r) & (d > 0.75 * r)] = rim


def _striped_box(canvas: np.ndarray, y0: int, x0: int, h: int, w: int, rng) -> None:
    box = np.empty((h, w, 3))
    stripes = (np.arange(w) // max(1, w // 6)) % 2 == 0
    box[:, stripes] = (200, 30, 30)
    box[:, ~stripes] = (120, 10, 10)
    canvas[y0 : y0 + h, x0 : x0 + w] = box * rng.uniform(0.9, 1.1)


def render_scene(label: int, index: int, *, size_px: int = 96, seed: int = 0) -> np.ndarray:
    """One scene as uint8 RGB (size_px, size_px, 3)."""
    rng = np.random.default_rng([seed, label, index])
    s = size_px
    horizon = int(s * rng.uniform(0.45, 0.65))
    name = CLASSES[label]
    if name == "day":
        img = _gradient((40, 90, 200), (150, 190, 240), s, s)
        _disc(
            img,
            rng.uniform(0.1, 0.3) * s,
            rng.uniform(0.2, 0.8) * s,
            0.08 * s,
            (255, 240, 170),
            None,
        )
        ground = np.array((50, 140, 40)) * rng.uniform(0.7, 1.3, (s - horizon, s, 1))
    elif name == "sunset":
        img = _gradient((90, 50, 130), (250, 140, 50), s, s)
        _disc(img, horizon, rng.uniform(0.3, 0.7) * s, 0.15 * s, (255, 170, 60), None)
        ground = np.broadcast_to(np.array((80, 50, 30), float), (s - horizon, s, 3)).copy()
    else:
        img = _gradient((110, 170, 230), (190, 220, 245), s, s)
        ground = np.broadcast_to(np.array((225, 200, 140), float), (s - horizon, s, 3)).copy()
        water = max(2, (s - horizon) // 3)
        ripples = 0.85 + 0.15 * np.sin(np.arange(water) * 2.0)[:, None, None]
        ground[:water] = np.array((30, 90, 170)) * ripples
    img[horizon:] = ground
    for _ in range(int(rng.integers(1, 4))):
        size = int(rng.uniform(0.1, 0.2) * s)
        y = int(rng.uniform(horizon, s - size))
        x = int(rng.uniform(0, s - size))
        if rng.random() < 0.5:
            _striped_box(img, y, x, size, size, rng)
        else:
            _disc(img, y + size / 2, x + size / 2, size / 2, (240, 210, 20), (60, 50, 10))
    img += rng.normal(0, 3, img.shape)  # sensor noise
    return np.clip(img, 0, 255).astype(np.uint8)


def scene_names(num_images: int) -> list[tuple[int, int]]:
    """(label, index) of every image, classes balanced."""
    return [(i % len(CLASSES), i // len(CLASSES)) for i in range(num_images)]


def encode_png(rgb: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return buffer.getvalue()


def main(cfg: SyntheticConfig) -> list[str]:
    """Write the image tree; returns the written URLs."""
    from concurrent.futures import ThreadPoolExecutor

    from jobs import storage

    def write(item: tuple[int, int]) -> str:
        label, index = item
        url = storage.join(cfg.dst, CLASSES[label], f"{CLASSES[label]}_{index:05d}.png")
        storage.write_bytes(
            url,
            encode_png(render_scene(label, index, size_px=cfg.size_px, seed=cfg.seed)),
            cfg.s3,
        )
        return url

    with ThreadPoolExecutor(8) as pool:
        urls = list(pool.map(write, scene_names(cfg.num_images)))
    print(f"wrote {len(urls)} synthetic images ({', '.join(CLASSES)}) to {cfg.dst}")
    return urls


if __name__ == "__main__":
    from jobs.config import run_job

    run_job("jobs.synthetic", "SyntheticConfig", positionals=("dst",))

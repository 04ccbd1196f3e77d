"""Peak memory of `jobs.prepare.convert` per source pixel, by format, against a plain
conversion of the same files (Pillow's ``convert("RGB")`` and numpy's copy of it, as a
gray check reads them), each in a fresh process.

    python bench/convert_memory.py [--megapixels 36]    (from the repository root; ~1 min)

What `jobs.prepare.CONVERT_BYTES_PER_PIXEL` is set from: a conversion task asks Ray for
that much memory per pixel of the pixel limit. The figure is the process's peak resident
memory while converting, above its memory with the source bytes read, divided by the
source's pixels.
"""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
import tempfile

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FORMATS = {  # name: (mode, Pillow format, save options)
    "RGB JPEG": ("RGB", "JPEG", {}),
    "RGB PNG": ("RGB", "PNG", {}),
    "RGBA PNG": ("RGBA", "PNG", {}),
    "palette PNG with transparency": ("P", "PNG", {"transparency": 3}),
    "16-bit gray PNG": ("I;16", "PNG", {}),
    "32-bit float TIFF": ("F", "TIFF", {}),
    "CMYK TIFF": ("CMYK", "TIFF", {}),
}
MEASURE = """
import io, resource, sys
import numpy as np, psutil
from PIL import Image
sys.path.insert(0, {root!r})
from jobs import prepare
data = open({path!r}, "rb").read()
cfg = prepare.PrepareConfig(src="/src", dst="/dst", max_pixels={pixels} + 1)
def plain():
    np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
work = prepare.convert if {ours} else plain
rss = psutil.Process().memory_info().rss
work(data, cfg) if {ours} else work()
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss)
"""


def source(mode: str, fmt: str, options: dict, side: int) -> bytes:
    rng = np.random.default_rng(0)
    if mode == "I;16":
        image = Image.fromarray(rng.integers(0, 65535, (side, side), dtype=np.uint16))
    elif mode == "F":
        image = Image.fromarray(rng.random((side, side), dtype=np.float32))
    elif mode == "P":
        image = Image.fromarray(rng.integers(0, 255, (side, side), dtype=np.uint8)).convert("P")
    else:
        bands = len(mode)
        image = Image.fromarray(rng.integers(0, 255, (side, side, bands), dtype=np.uint8), mode)
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def peak_bytes(path: str, pixels: int, ours: bool) -> int:
    code = MEASURE.format(root=ROOT, path=path, pixels=pixels, ours=ours)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--megapixels", type=float, default=36.0)
    args = parser.parse_args()
    side = int((args.megapixels * 1e6) ** 0.5)
    pixels = side * side
    print(f"{pixels / 1e6:.1f} MP sources; peak memory above the source bytes, per pixel")
    print(f"{'source':32s} {'prepare.convert':>16s} {'plain convert':>14s}")
    with tempfile.TemporaryDirectory() as folder:
        for name, (mode, fmt, options) in FORMATS.items():
            path = os.path.join(folder, "source")
            with open(path, "wb") as f:
                f.write(source(mode, fmt, options, side))
            ours, plain = (peak_bytes(path, pixels, o) / pixels for o in (True, False))
            print(f"{name:32s} {ours:14.1f} B {plain:12.1f} B")


if __name__ == "__main__":
    main()

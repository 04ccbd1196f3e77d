"""What an ICC profile costs colorize on one CPU core: the same photo as a 1024 x 768 JPEG
untagged (sRGB), in Adobe RGB, and in Dot Gain-like gray, through the job's CPU steps.

    python bench/icc.py                (from the repository root; about 20 s)

Each figure is the median time of `prepare_row` (decode, L for the network) plus
`colorize_file` (decode, reassembly at full size, encode), the network left out (its ab is
zero): the steps a profile adds to. The inputs take turns, one run each a round, so that a
machine's drift (this one's is large) falls on all of them alike. Adobe RGB runs twice:
through its measured curves and matrix (`jobs.icc.Shaper`, what the job does), and through
LittleCMS alone (what a profile made of colour tables gets). The last line is the largest
difference of the curves' sRGB from LittleCMS's float conversion over the photo, in 16-bit
levels.
"""

from __future__ import annotations

import argparse

import timing  # noqa: F401  (first: pins thread pools to 1 before numpy and torch load)

# isort: split
import io
import statistics

import imagecodecs
import numpy as np
import torch
from PIL import Image
from skimage import data
from timing import median_ms

from jobs import colorize, icc

SIZE_WH = (1024, 768)


def jpeg(pixels: np.ndarray, profile: bytes | None) -> bytes:
    buffer = io.BytesIO()
    extra = {"icc_profile": profile} if profile else {}
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90, **extra)
    return buffer.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=12, help="rounds of runs, the first dropped")
    args = parser.parse_args()
    torch.set_num_threads(1)

    photo = np.asarray(Image.fromarray(data.astronaut()).resize(SIZE_WH, Image.BICUBIC))
    adobe = imagecodecs.cms_profile("adobergb")
    dot_gain = imagecodecs.cms_profile("gray", gamma=2.45)
    cfg = colorize.ColorizeConfig(input="/in", output="/out", model="/m.pt")
    s = cfg.infer_px // 4
    ab = np.zeros((1, 2, s, s), np.float32).tobytes()

    def once(file: bytes, measured: bool = True) -> None:
        shaper = icc._shaper
        if not measured:
            icc._shaper = lambda profile: None  # what a profile of colour tables gets
        try:
            colorize.prepare_row({"status": "pending", "data": file}, cfg)
            colorize.colorize_file(file, ab, cfg, "bench")
        finally:
            icc._shaper = shaper

    gray = np.asarray(Image.fromarray(photo).convert("L"))
    inputs = {
        "sRGB (untagged)": (jpeg(photo, None), True),
        "Adobe RGB, measured curves": (jpeg(photo, adobe), True),
        "Adobe RGB, LittleCMS alone": (jpeg(photo, adobe), False),
        "gray, gamma 2.45 profile": (jpeg(gray, dot_gain), True),
        "gray (untagged)": (jpeg(gray, None), True),
    }
    runs: dict[str, list[float]] = {name: [] for name in inputs}
    for _ in range(args.repeats):  # the first round, which makes the tables, is dropped
        for name, (file, measured) in inputs.items():
            runs[name].append(median_ms(lambda f=file, m=measured: once(f, m), 1, warmup=0))
    times = {name: statistics.median(ms[1:]) for name, ms in runs.items()}

    srgb = imagecodecs.cms_profile("srgb")
    pixels = np.asarray(Image.open(io.BytesIO(inputs["Adobe RGB, measured curves"][0])))
    ours = icc.to_srgb(pixels, adobe).transpose(1, 2, 0)
    theirs = imagecodecs.cms_transform(
        pixels.astype(np.float32) / 255, adobe, srgb, colorspace="rgb", outcolorspace="rgb",
        outdtype=np.float32, intent=1, flags=imagecodecs.CMS.FLAGS.NOOPTIMIZE,
    )  # fmt: skip
    error = np.abs(ours - theirs.clip(0, 1)).max() * 65535

    base = times["sRGB (untagged)"]
    print(f"1024 x 768 JPEG, CPU steps of colorize, 1 thread, median of {args.repeats - 1}")
    print(f"{'input':<30} {'ms':>8} {'vs sRGB':>8}")
    for name, ms in times.items():
        print(f"{name:<30} {ms:8.1f} {ms / base:7.2f}x")
    print(f"measured curves vs LittleCMS float: max {error:.2f} 16-bit levels")


if __name__ == "__main__":
    main()

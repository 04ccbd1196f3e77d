"""sRGB <-> Lab speed and accuracy: colorcore.color against scikit-image, on one CPU core.

    python bench/lab.py                (from the repository root; about 30 s)

Input: scikit-image's photos resized to 1024 x 768 (the size of a typical archive scan
preview), as float32 RGB in [0, 1]. Both libraries convert the same pixels; skimage works on
(H, W, 3) float32 numpy (it keeps the input's float type), colorcore on (N, 3, H, W) torch
tensors. The error columns compare
colorcore's output with skimage's on these photos (fp32 and bf16 inputs). Each figure is the
median of several timed repeats after a warm-up, single-threaded.
"""

from __future__ import annotations

import argparse

import timing  # noqa: F401  (first: pins thread pools to 1 before numpy and torch load)

# isort: split
import numpy as np
import torch
from skimage import color, data, transform
from timing import median_ms

from colorcore.color import lab_to_rgb, rgb_to_lab

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")
SIZE_HW = (768, 1024)


def photos_NHW3() -> np.ndarray:
    return np.stack(
        [
            transform.resize(getattr(data, name)()[..., :3], SIZE_HW, anti_aliasing=True)
            for name in PHOTOS
        ]
    ).astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per method")
    args = parser.parse_args()
    torch.set_num_threads(1)

    rgb_NHW3 = photos_NHW3()
    rgb_N3HW = torch.from_numpy(rgb_NHW3).permute(0, 3, 1, 2).contiguous()
    one_np, one_t = rgb_NHW3[0], rgb_N3HW[:1]
    lab_np = color.rgb2lab(one_np)
    lab_t = rgb_to_lab(one_t)

    lab_ref = torch.from_numpy(color.rgb2lab(rgb_NHW3)).permute(0, 3, 1, 2)
    lab_err = (rgb_to_lab(rgb_N3HW).double() - lab_ref).abs().max().item()
    lab_err_bf16 = (rgb_to_lab(rgb_N3HW.bfloat16()).double() - lab_ref).abs().max().item()
    rgb_ref = torch.from_numpy(color.lab2rgb(lab_ref.permute(0, 2, 3, 1).numpy())).permute(
        0, 3, 1, 2
    )
    rgb_err = (lab_to_rgb(lab_ref.float(), gamut="clip").double() - rgb_ref).abs().max().item()

    h, w = SIZE_HW
    print(f"{len(PHOTOS)} photos at {w} x {h}; torch {torch.__version__}, 1 thread")
    print(f"max |Lab difference| vs skimage.rgb2lab: fp32 {lab_err:.1e}, bf16 {lab_err_bf16:.2f}")
    print(f"max |RGB difference| vs skimage.lab2rgb (gamut='clip'): fp32 {rgb_err:.1e}")
    timings = {
        "rgb -> lab": (
            median_ms(lambda: rgb_to_lab(one_t), args.repeats),
            median_ms(lambda: color.rgb2lab(one_np), args.repeats),
        ),
        "lab -> rgb (chroma gamut mapping)": (
            median_ms(lambda: lab_to_rgb(lab_t), args.repeats),
            median_ms(lambda: color.lab2rgb(lab_np), args.repeats),
        ),
        "lab -> rgb (clip, as released)": (
            median_ms(lambda: lab_to_rgb(lab_t, gamut="clip"), args.repeats),
            median_ms(lambda: color.lab2rgb(lab_np), args.repeats),
        ),
    }
    print(f"{'one 1024 x 768 image':36s} {'colorcore ms':>12s} {'skimage ms':>11s}  speed-up")
    for name, (ours, theirs) in timings.items():
        print(f"{name:36s} {ours:12.1f} {theirs:11.1f} {theirs / ours:8.1f}x")


if __name__ == "__main__":
    main()

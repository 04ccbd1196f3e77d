"""`jobs.images.load_rgb`: every source mode to upright RGB, and whether it has colour."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from jobs import images
from jobs.images import GRAY_CHECK_ROWS, load_rgb


def encoded(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def gray_rgb(height: int, width: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    return np.repeat(rng.integers(0, 256, (height, width, 1), dtype=np.uint8), 3, axis=2)


@pytest.mark.parametrize("row", [0, GRAY_CHECK_ROWS - 1, GRAY_CHECK_ROWS, 2 * GRAY_CHECK_ROWS + 4])
def test_one_coloured_pixel_in_any_band_of_rows_makes_an_image_colour(row: int) -> None:
    pixels = gray_rgb(2 * GRAY_CHECK_ROWS + 5, 7)
    image, gray = load_rgb(encoded(Image.fromarray(pixels)))
    assert gray and np.array_equal(np.asarray(image), pixels)
    pixels[row, 3] = (pixels[row, 3, 0] ^ 0x80, pixels[row, 3, 1], pixels[row, 3, 2])
    image, gray = load_rgb(encoded(Image.fromarray(pixels)))
    assert not gray and np.array_equal(np.asarray(image), pixels)


def test_alpha_and_palette_transparency_are_dropped_and_the_colours_kept() -> None:
    rgba = np.dstack([gray_rgb(9, 11), np.full((9, 11), 40, np.uint8)])
    rgba[4, 5, :3] = (200, 10, 10)
    image, gray = load_rgb(encoded(Image.fromarray(rgba, "RGBA")))
    assert image.mode == "RGB" and not gray
    assert np.array_equal(np.asarray(image), rgba[..., :3])

    palette = Image.fromarray(rgba[..., :3]).convert("P", palette=Image.Palette.ADAPTIVE)
    image, gray = load_rgb(encoded(palette, transparency=0))
    assert not gray
    assert np.array_equal(np.asarray(image), np.asarray(palette.convert("RGB")))

    la = Image.fromarray(rgba[..., [0, 3]], "LA")
    image, gray = load_rgb(encoded(la))
    assert gray and np.array_equal(np.asarray(image)[..., 1], rgba[..., 0])


def test_premultiplied_gray_alpha_reads_as_its_gray() -> None:
    """A gray TIFF with associated (premultiplied) alpha opens in Pillow's mode La, which it
    converts into LA only; its colour is the gray divided by the alpha."""
    import tifffile

    gray, alpha = np.full((4, 6), 50, np.uint8), np.full((4, 6), 100, np.uint8)
    alpha[0, 0] = 255
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, np.dstack([gray, alpha]), photometric="minisblack", extrasamples=[1])
    assert Image.open(io.BytesIO(buffer.getvalue())).mode == "La"
    image, is_gray = load_rgb(buffer.getvalue())
    assert is_gray and image.mode == "RGB"
    assert np.asarray(image)[0, 0].tolist() == [50] * 3  # opaque: as stored
    assert abs(int(np.asarray(image)[1, 1, 0]) - 50 * 255 / 100) <= 1


def test_a_mode_that_does_not_convert_is_a_bad_image(monkeypatch) -> None:
    """A conversion Pillow refuses is the image's fault: a `BadImage`, recorded, where the
    jobs would have ended on a ValueError."""
    from jobs.images import BadImage

    def refuses(self, mode=None, *args, **kwargs):
        raise ValueError(f"conversion from {self.mode} to {mode} not supported")

    palette = encoded(Image.fromarray(gray_rgb(4, 4)).convert("P"))
    monkeypatch.setattr(Image.Image, "convert", refuses)
    with pytest.raises(BadImage, match="mode P not converted: conversion from P to RGB"):
        load_rgb(palette)


def test_gray_modes_are_gray_without_reading_their_pixels_again(monkeypatch) -> None:
    scanned = []
    scan = images._image_is_gray
    monkeypatch.setattr(images, "_image_is_gray", lambda rgb: scanned.append(1) or scan(rgb))
    sixteen = Image.fromarray(np.arange(60, dtype=np.uint16).reshape(6, 10) * 1000)
    image, gray = load_rgb(encoded(sixteen))
    levels = np.asarray(image)
    assert gray and image.mode == "RGB" and not scanned
    assert levels[0, 0, 0] == 0 and levels[-1, -1, 0] == round(59_000 / 65535 * 255)
    assert load_rgb(encoded(Image.new("L", (6, 4), 90)))[1] and not scanned
    assert load_rgb(encoded(Image.new("RGB", (6, 4), (90, 90, 90))))[1] and scanned  # read


def test_a_multi_picture_jpeg_decodes_at_a_reduced_scale_as_a_jpeg_does() -> None:
    """Pillow names a JPEG with an MPF block (a phone's Ultra HDR gain map) MPO: it is a
    JPEG all the same, decoded by DCT scaling to the short side asked for."""
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 256, (512, 768, 3), dtype=np.uint8))
    mpo = encoded(photo, "MPO", save_all=True, append_images=[photo.resize((96, 64))])
    assert Image.open(io.BytesIO(mpo)).format == "MPO"
    image, _ = load_rgb(mpo, min_side_px=128)
    reduced = load_rgb(encoded(photo, "JPEG"), min_side_px=128)[0].size
    assert image.size == reduced and reduced[1] < 512


def test_running_out_of_memory_is_not_called_a_corrupt_image(monkeypatch) -> None:
    """A MemoryError is the machine's state, not the image's: it is raised as it is, for the
    job to retry, not recorded for good as a `BadImage`."""
    from PIL import ImageFile

    def out_of_memory(self):
        raise MemoryError("no room")

    monkeypatch.setattr(ImageFile.ImageFile, "load", out_of_memory)
    with pytest.raises(MemoryError):
        load_rgb(encoded(Image.fromarray(gray_rgb(8, 8)), "JPEG"))


def test_a_jpeg_cut_short_and_padded_is_refused_by_every_jobs_decoding() -> None:
    """The cut file decodes without an error, gray below the cut: prepare, prior and
    evaluate refuse it as colorize does, rather than train on, count or score that gray."""
    from jobs.evaluate import decode_for_eval
    from jobs.images import BadImage, decode_3hw
    from jobs.prepare import PrepareConfig, convert
    from jobs.prior import histogram_of

    rng = np.random.default_rng(1)
    whole = encoded(Image.fromarray(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)), "JPEG")
    cut = whole[: len(whole) // 2] + bytes(len(whole) - len(whole) // 2)
    assert Image.open(io.BytesIO(cut)).load() is not None  # Pillow's decoder takes it
    for decode in (load_rgb, decode_3hw, lambda d: convert(d, PrepareConfig(src="in", dst="out")),
                   lambda d: decode_for_eval(d, 64)):  # fmt: skip
        for data in (cut, memoryview(cut)):  # (a shard's bytes as Arrow gives them)
            with pytest.raises(BadImage, match="truncated JPEG"):
                decode(data)
        decode(whole)
        decode(memoryview(whole + bytes(100)))  # whole, its end marker before the zeros
    counted = histogram_of([whole, cut])
    assert (counted.images, counted.unreadable) == (1, 1)

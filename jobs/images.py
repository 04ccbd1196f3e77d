"""Decoding untrusted image bytes with PIL: every failure becomes a `BadImage` with a reason.

Jobs that read collections of images (dataset preparation, batch colorization, evaluation)
record these reasons and go on; nothing here stops a job. torch is imported only where a
tensor is asked for: dataset preparation's tasks never load it (1.1 s and 185 MB of
resident memory a worker, measured here).
"""

from __future__ import annotations

import io
import sys
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps, PngImagePlugin, UnidentifiedImageError

if TYPE_CHECKING:
    import torch

DEFAULT_MAX_PIXELS = 100_000_000  # larger images are refused as likely decompression bombs
JPEG_MAX_SIDE_PX = 65_500  # the JPEG format's largest width or height
# Every open checks its caller's pixel limit before decoding (`open_image`); Pillow's own,
# fixed at 89.5 MP and enforced through a process-wide warnings filter, would override it.
Image.MAX_IMAGE_PIXELS = None
EXIF_ORIENTATION = 0x0112  # 1: upright; 2-8: mirrored and/or rotated (EXIF 2.32, 4.6.4)
# A PNG text chunk (XMP with an editor's history, a workflow's JSON) of up to 16 MB, where
# Pillow refuses the picture above 1 MB; its cap on the text of a whole file stays.
PngImagePlugin.MAX_TEXT_CHUNK = max(PngImagePlugin.MAX_TEXT_CHUNK, 16 * 2**20)
JPEG_QUALITY = 95


class BadImage(ValueError):
    """An input that cannot be used as an image; the message is the recorded reason."""


def open_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open (lazily) and check size; raises `BadImage` for empty, non-image or huge inputs."""
    if not data:
        raise BadImage("empty file")
    if bytes(data[:8]) == PNG_SIGNATURE and (profiles := _png_profiles(data)) > 1:
        raise BadImage(f"a PNG with {profiles} colour profiles (iCCP chunks), where the format "
                       "allows one")  # fmt: skip
    try:
        image = Image.open(io.BytesIO(data), formats=_safe_formats())
    except UnidentifiedImageError:
        raise BadImage(_unread_format(data)) from None
    except Exception as e:  # a garbled header: each format's parser fails its own way
        raise BadImage(f"unreadable image: {type(e).__name__}: {e}") from None
    width, height = image.size
    if width * height > max_pixels:
        raise BadImage(f"image too large: {width}x{height} pixels > limit {max_pixels}")
    if width < 1 or height < 1:
        raise BadImage(f"image has no pixels ({width}x{height})")
    return image


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_profiles(data: bytes) -> int:
    """The colour profiles (iCCP chunks) of a PNG, counted from its chunks' lengths without
    reading them. Pillow inflates each one it meets, up to `PngImagePlugin.MAX_TEXT_CHUNK`
    (16 MB from 16 KB); the format allows one, and a file of many costs a thousand times
    its size in inflation (4 s a 5 MB file, measured here)."""
    profiles, pos = 0, len(PNG_SIGNATURE)
    while pos + 8 <= len(data):
        kind = data[pos + 4 : pos + 8]
        if kind == b"IEND":
            break
        profiles += kind == b"iCCP"
        pos += 12 + int.from_bytes(data[pos : pos + 4], "big")  # length, type, data, CRC
    return profiles


_UNREAD_FORMATS = (  # (what the bytes start with, the format's name)
    (b"\xff\x0a", "JPEG XL"),
    (b"\0\0\0\x0cJXL \r\n\x87\n", "JPEG XL"),
    (b"II*\0", "TIFF (or camera raw)"),
    (b"MM\0*", "TIFF (or camera raw)"),
    (b"II+\0", "TIFF"),
    (b"MM\0+", "TIFF"),
    (b"%PDF", "PDF"),
    (b"8BPS", "Photoshop"),
    (b"\0\0\1\0", "Windows icon (ICO)"),
    (b"icns", "Apple icon (ICNS)"),
)
# ISO media files (an "ftyp" box first) by their brand: pictures; a video's is no image
_ISO_BRANDS = dict.fromkeys(
    (b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1"), "HEIF (HEIC)"
) | {b"avif": "AVIF", b"avis": "AVIF"}


def _unread_format(data: bytes) -> str:
    """Why bytes Pillow does not open are refused: a format named where they start as one
    does (a photo this job cannot read is not "not an image"), else not an image."""
    name = _ISO_BRANDS.get(data[8:12]) if data[4:8] == b"ftyp" else None
    name = name or next((n for magic, n in _UNREAD_FORMATS if data.startswith(magic)), None)
    if name:
        return f"a {name} file of a kind this job does not read"
    return "not an image (unrecognised format)"


def _segments_before_scan(view: memoryview, end: int) -> Iterator[tuple[int, int]]:
    """(marker, position) of each marker segment of a JPEG's bytes `view[:end]` after its
    start, up to and with its first scan's."""
    pos = 2  # after SOI: the marker segments before the first scan, each with its length
    while pos + 4 <= end and view[pos] == 0xFF:
        marker = view[pos + 1]
        yield marker, pos
        if marker == 0xDA:  # start of scan
            return
        if marker == 0xFF:  # fill byte
            pos += 1
        elif 0xD0 <= marker <= 0xD7 or marker == 0x01:  # markers without a length
            pos += 2
        else:
            pos += 2 + int.from_bytes(view[pos + 2 : pos + 4], "big")


def jpeg_cut_short(data: bytes | memoryview) -> bool:
    """Whether a JPEG file ends in zeros without an end-of-image marker after its first scan:
    one cut short and padded (as disk recovery and preallocating downloads leave them),
    which decoders take as whole, gray below the cut. Cut without zeros, the decoder finds
    the end itself; a whole file's scans end with the marker, data may follow it. Any
    buffer (a shard's bytes as Arrow gives them); only a padded file's scan is copied."""
    end = unpadded_length(data)
    if end == len(data):
        return False
    view = memoryview(data).cast("B")
    for marker, pos in _segments_before_scan(view, end):
        if marker == 0xDA:  # its entropy-coded data holds no other FFD9
            return bytes(view[pos:end]).find(b"\xff\xd9") < 0
    return False  # no scan found: the decoder judges


_START_OF_FRAME = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7,
                             0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})  # fmt: skip


def jpeg_size(data: bytes | memoryview) -> tuple[int, int] | None:
    """(height, width) a JPEG's frame header gives, read without decoding it; None where
    there is none before its first scan."""
    view = memoryview(data).cast("B")
    if bytes(view[:2]) != b"\xff\xd8":
        return None
    for marker, pos in _segments_before_scan(view, len(view)):
        if marker in _START_OF_FRAME and pos + 9 <= len(view):
            h, w = (int.from_bytes(view[i : i + 2], "big") for i in (pos + 5, pos + 7))
            return h, w
    return None


def refuse_cut_short_jpeg(data: bytes | memoryview) -> None:
    """`BadImage` for a JPEG cut short and padded (`jpeg_cut_short`): decoded, it would pass
    as a whole picture, gray below the cut."""
    if jpeg_cut_short(data):
        raise BadImage("truncated JPEG: its data ends in zeros before the end-of-image marker")


_UNSAFE_FORMATS = ("EPS", "ICO", "ICNS")
"""Formats Pillow reads that are refused: EPS, whose reader runs Ghostscript on the file,
and the icon files, whose pictures inside are decoded at a size of their own, not the one
`open_image` checks (ICO's as the file is opened): a small icon file may hold a PNG of
gigapixels."""


def _safe_formats() -> list[str]:
    """Every format Pillow reads but `_UNSAFE_FORMATS`."""
    Image.init()
    return [f for f in Image.OPEN if f not in _UNSAFE_FORMATS]


def exif_orientation(image: Image.Image) -> int:
    """The EXIF orientation tag of a (lazily opened) image: 1 (upright) to 8; 1 when the
    tag is missing or not a valid value."""
    turn = image.getexif().get(EXIF_ORIENTATION, 1)
    return turn if isinstance(turn, int) and 1 <= turn <= 8 else 1


def upright_image(image: Image.Image) -> Image.Image:
    """A loaded image turned upright by its EXIF orientation as `exif_orientation` reads it,
    the orientation then gone from its EXIF (the same image where upright: Pillow's
    `exif_transpose` copies even those, and turns by an orientation stored as a fraction,
    6/1, where this reads none, as the GPU path does)."""
    return image if exif_orientation(image) == 1 else ImageOps.exif_transpose(image)


GRAY_CHECK_ROWS = 256
GRAY_MODES = ("1", "L", "LA", "La", "I", "I;16", "F")


def decode_rgb(
    data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, min_side_px: int | None = None
) -> Image.Image:
    """Decode to an upright RGB image (alpha dropped); see `load_rgb`."""
    return _to_rgb(_decode_upright(data, max_pixels, min_side_px))


def decode_3hw(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """`decode_rgb` as a uint8 (3, H, W) tensor."""
    return as_3hw(decode_rgb(data, max_pixels=max_pixels))


def as_3hw(image: Image.Image) -> torch.Tensor:
    """An RGB image's pixels as a uint8 (3, H, W) tensor (a copy, writable)."""
    import torch

    return torch.from_numpy(np.array(image)).permute(2, 0, 1)


def load_rgb(
    data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, min_side_px: int | None = None
) -> tuple[Image.Image, bool]:
    """Decode to an upright RGB image; returns (image, source_is_grayscale).

    With `min_side_px`, JPEG sources decode at a reduced scale (DCT scaling) that still
    keeps the short side >= min_side_px: much cheaper for large photos.
    """
    image = _decode_upright(data, max_pixels, min_side_px)
    gray_mode = image.mode in GRAY_MODES
    rgb = _to_rgb(image)
    del image  # where it is not `rgb`: freed before the pixels are read again
    return rgb, gray_mode or _image_is_gray(rgb)


def whole_jpeg(data: memoryview | bytes) -> bool:
    """Whether `data` starts and ends as a JPEG does (the start and end markers; zeros
    after the end, as some writers and disk recovery pad, are no cut)."""
    return jpeg_length(data) is not None


def unpadded_length(data: memoryview | bytes) -> int:
    """The length of `data` less the zeros at its end (as some writers and disk recovery
    pad files), read a block at a time from the end: no copy of the file."""
    view = memoryview(data)
    end = len(view)
    while end:
        start = max(0, end - 4096)
        kept = len(bytes(view[start:end]).rstrip(b"\0"))
        end = start + kept
        if kept:
            break
    return end


def jpeg_length(data: memoryview | bytes) -> int | None:
    """The length of a JPEG's bytes up to its end marker, less the zeros after it (read a
    block at a time from the end: no copy of the file); None where `data` does not start
    and end as a JPEG does."""
    view, end = memoryview(data), unpadded_length(data)
    whole = (
        end >= 4 and bytes(view[:2]) == b"\xff\xd8" and bytes(view[end - 2 : end]) == b"\xff\xd9"
    )
    return end if whole else None


def _decode_upright(data: bytes, max_pixels: int, min_side_px: int | None) -> Image.Image:
    image = open_image(data, max_pixels=max_pixels)
    if image.format in ("JPEG", "MPO"):  # MPO: a JPEG with more after
        refuse_cut_short_jpeg(data)
    try:
        if min_side_px and image.format in ("JPEG", "MPO"):
            w, h = image.size
            scale = min_side_px / min(w, h)
            if scale < 1:
                image.draft("RGB", (int(w * scale) + 1, int(h * scale) + 1))
        image.load()
        image = upright_image(image)
    except Exception as e:  # decoders fail their own ways on corrupt data
        if out_of_memory(e):  # the machine's state, not the image's: the caller decides
            raise
        raise BadImage(f"corrupt or truncated image: {type(e).__name__}: {e}") from None
    return image


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB pixels of a decoded image of any mode Pillow opens (a mode it cannot convert:
    `BadImage`)."""
    try:
        if image.mode.startswith("I") or image.mode == "F":
            image = _gray_to_8bit(image)
        if image.mode == "La":  # premultiplied, which Pillow converts only into LA
            image = image.convert("LA")
        if image.mode == "LA" or "transparency" in image.info:  # by RGBA, as Pillow asks
            image = image.convert("RGBA")
        return image if image.mode == "RGB" else image.convert("RGB")
    except Exception as e:
        if out_of_memory(e):
            raise
        raise BadImage(f"image of mode {image.mode} not converted: {e}") from None


def gray_in_unit_range(image: Image.Image, bits: int = 16) -> np.ndarray:
    """float32 (H, W) in [0, 1] of an integer gray image of samples of `bits` (16-bit, fewer
    as a TIFF's 12-bit levels, which Pillow keeps as they are; or 32-bit: 16-bit values, or
    larger ones up to its maximum) or a float one (`float_top`), where Pillow's conversions
    would clip."""
    pixels = np.array(image, dtype=np.float32)  # a copy, written in place below
    if image.mode == "F":
        np.nan_to_num(pixels, copy=False, nan=0.0, posinf=0.0, neginf=0.0)
        top = float_top(pixels)
    else:
        top = max(float(2**bits - 1), float(pixels.max(initial=0)))
    pixels /= top
    return np.clip(pixels, 0, 1, out=pixels)


def float_top(samples: np.ndarray) -> float:
    """White of float samples (finite ones): the first of 1, 255 and 65535 that the largest
    is at most twice of (tools write floats in [0, 1] or keep 8- or 16-bit levels, as
    ImageJ does, and resampling overshoots them: clipped), else the largest."""
    largest = float(samples.max(initial=0))
    return next((top for top in (1.0, 255.0, 65535.0) if largest <= 2 * top), largest)


def as_16bit(values: np.ndarray) -> np.ndarray:
    """uint8 or uint16 samples as uint16 (8-bit ones spread over 16 bits: x 257)."""
    return values if values.dtype == np.uint16 else values.astype(np.uint16) * np.uint16(257)


def as_8bit(values: np.ndarray) -> np.ndarray:
    """uint8 or uint16 samples as uint8 (16-bit ones rounded to the nearest 8-bit level)."""
    if values.dtype == np.uint8:
        return values
    return ((values.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)


def _gray_to_8bit(image: Image.Image) -> Image.Image:
    pixels = gray_in_unit_range(image)
    pixels *= 255
    pixels += 0.5
    return Image.fromarray(pixels.astype(np.uint8), "L")


def is_gray(rgb_HW3: np.ndarray, tolerance: int = 2) -> bool:
    """True when no pixel's channels differ by more than `tolerance` (8-bit levels)."""
    spread = rgb_HW3.max(axis=-1).astype(np.int16) - rgb_HW3.min(axis=-1)
    return bool(spread.max(initial=0) <= tolerance)


def _image_is_gray(rgb: Image.Image) -> bool:
    """`is_gray` of an RGB image, read a band of rows at a time (and no further than its
    first band with colour): numpy's copy of a whole image would cost twice its size again
    while Pillow joins its bytes."""
    w, h = rgb.size
    return all(
        is_gray(np.asarray(rgb.crop((0, top, w, min(h, top + GRAY_CHECK_ROWS)))))
        for top in range(0, h, GRAY_CHECK_ROWS)
    )


def resize_short_side(image: Image.Image, short_side_px: int) -> Image.Image:
    """Downscale so that the short side is `short_side_px` (never upscale)."""
    w, h = image.size
    scale = short_side_px / min(w, h)
    if scale >= 1:
        return image
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return image.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)


def encode_jpeg(image: Image.Image, quality: int = JPEG_QUALITY) -> bytes:
    """JPEG with 4:4:4 chroma: colour is the training target, so no chroma subsampling."""
    if max(image.size) > JPEG_MAX_SIDE_PX:
        raise BadImage(f"{image.size[0]}x{image.size[1]} pixels: JPEG sides end at 65,500")
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality, subsampling=0)
    return buffer.getvalue()


def each_or_none(call: Callable[[list], list], items: list) -> list:
    """call(items); where that fails, call([item])[0] item by item, None for an item that
    still fails. Running out of device memory is not the items' fault: that is raised."""
    try:
        return list(call(items))
    except Exception as error:
        if out_of_memory(error):
            raise
    results = []
    for item in items:
        try:
            results.append(call([item])[0])
        except Exception as error:
            if out_of_memory(error):
                raise
            results.append(None)
    return results


def out_of_memory(error: BaseException) -> bool:
    """Whether `error` is an allocation that failed, the machine's state and not its input's:
    torch raises RuntimeError on CPUs ("can't allocate memory"), and torchvision's nvJPEG a
    plain RuntimeError wrapping the device allocator's message."""
    torch = sys.modules.get("torch")  # a torch error comes only where torch was imported
    if isinstance(error, MemoryError) or (torch and isinstance(error, torch.OutOfMemoryError)):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and ("out of memory" in text or "can't allocate" in text)

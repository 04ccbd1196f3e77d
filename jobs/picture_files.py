"""Picture files in and out of the colorize job: every page upright at full depth with its
metadata in, colorized pages out in the source's format where it can carry them.

Decoding (`decode`) gives each page as sRGB float planes (gray or RGB; converted from the
space its ICC profile states, `jobs.icc`), its alpha and bit depth, and the file's metadata:
the ICC profile the output carries, EXIF (orientation applied and removed), XMP, IPTC.
Pillow reads 16-bit colour PNG, PPM and TIFF at 8 bits, so those pages are read with OpenCV;
TIFF pages that OpenCV or Pillow misreads or does not read (samples in planes, premultiplied
alpha, 16-bit CMYK, signed, float or 32-bit samples, gray with alpha at 16 bits, ZSTD and other
compressions) with tifffile.
Encoding (`encode`) writes the colorized pages with that metadata and a provenance string in
EXIF tag 0x000B, their pixels converted into that profile: JPEG, PNG, WebP and 8-bit TIFF
through Pillow, a 16-bit picture as a 16-bit PNG (`encode_png16`), pages of which one has
16 bits as a 16-bit TIFF (`encode_tiff16`).
JPEG APP segments (`app_segments`, `with_segments`) carry the metadata into files encoded
elsewhere (nvJPEG); `upright` applies an EXIF orientation to a (C, H, W) tensor.

Untrusted bytes: every failure to decode is a `BadImage` with the reason.
"""

from __future__ import annotations

import io
import itertools
import re
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from jobs import icc as profiles
from jobs.images import (
    EXIF_ORIENTATION,
    PNG_SIGNATURE,
    BadImage,
    as_8bit,
    as_16bit,
    exif_orientation,
    float_top,
    gray_in_unit_range,
    open_image,
    out_of_memory,
    refuse_cut_short_jpeg,
    unpadded_length,
    upright_image,
)

PROVENANCE_EXIF_TAG = 0x000B  # ProcessingSoftware (TIFF/EP, EXIF IFD0): rarely set by scanners
SUFFIXES = {
    "JPEG": (".jpg", ".jpeg", ".jpe"),
    "PNG": (".png",),
    "TIFF": (".tif", ".tiff"),
    "WEBP": (".webp",),
}
# TIFF tags that describe the photo rather than the file's layout: the ones carried over.
_TIFF_DESCRIPTIVE_TAGS = (270, 271, 272, 305, 306, 315, 33432)
_EXIF_IFD, _XMP_TAG, _IPTC_TAG, _ICC_TAG = 0x8769, 700, 33723, 34675
_SOI = b"\xff\xd8"
_APP_PAYLOAD_MAX = 65533  # a segment's length field (2 bytes) counts itself
_ICC_CHUNK = _APP_PAYLOAD_MAX - 14  # "ICC_PROFILE\0" + sequence number + count
_EXIF_HEADER = b"Exif\x00\x00"
EXIF_SEGMENT_MAX = _APP_PAYLOAD_MAX  # the most EXIF (its header included) a JPEG carries
_XMP_HEADER = b"http://ns.adobe.com/xap/1.0/\x00"


# ---------------------------------------------------------------- decoding


@dataclass
class Page:
    """One colorizable picture: sRGB in [0, 1] as (1, C, H, W), C = 1 (gray) or 3; None
    once only its L is kept (`jobs.colorize.Prepared`)."""

    rgb: torch.Tensor | None
    alpha: np.ndarray | None
    bits: int


@dataclass
class Metadata:
    icc: bytes | None = None  # the output's: the source's RGB profile (`icc.output_profile`)
    exif: Any = None  # PIL.Image.Exif without the orientation tag
    xmp: bytes | None = None
    iptc: bytes | None = None
    dpi: tuple[float, float] | None = None  # (across, down) of the upright picture


ON_ITS_SIDE = (5, 6, 7, 8)  # EXIF orientations of a picture stored a quarter turn round


@dataclass
class Decoded:
    pages: list[Page]
    format: str
    meta: Metadata
    frame_ms: list[int] | None = None  # an animation's frames: how long each is shown
    loop: int = 0  # how many times an animation plays: 0 for ever
    poster: bool = False  # an APNG's first page is its default image, not a frame


_ANIMATED = ("GIF", "PNG", "WEBP")  # formats whose frames make an animation


def _page(image, white_is_zero: bool = False, icc: bytes | None = None, bits: int = 16) -> Page:
    """A PIL frame (already upright) -> sRGB float planes, alpha and bit depth. `white_is_zero`:
    a TIFF's 16- or 32-bit gray levels count from white (photometric MinIsWhite), which
    Pillow leaves as stored (its 8-bit reader turns them). `icc`: the frame's ICC profile.
    `bits`: of a 16-bit gray frame's samples as stored (`_gray_bits`)."""
    mode = image.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        alpha, transparent = None, image.info.get("transparency")
        if isinstance(transparent, int):  # PNG tRNS: the one gray level that is see-through
            alpha = np.where(np.asarray(image) == transparent, 0, 65535).astype(np.uint16)
        levels = gray_in_unit_range(image, bits)
        if white_is_zero:
            np.subtract(1, levels, out=levels)
        if profiles.converts(icc):
            levels16 = np.round(levels * 65535).astype(np.uint16)[..., None]
            levels = profiles.to_srgb(levels16, icc)[0]
        return Page(torch.from_numpy(levels)[None, None], alpha, 16)
    alpha = None
    if mode in ("LA", "La") or (mode == "L" and "transparency" in image.info):
        gray_alpha = np.asarray(image.convert("LA"))
        pixels, alpha = gray_alpha[..., :1], gray_alpha[..., 1]
    elif mode in ("RGBA", "PA", "RGBa") or "transparency" in image.info:
        rgba = np.asarray(image.convert("RGBA"))
        pixels, alpha = rgba[..., :3], rgba[..., 3]
    elif mode in ("1", "L"):
        pixels = np.asarray(image.convert("L"))[..., None]
    elif mode == "CMYK" and icc:  # inks, through their profile (`page_profile` matched it)
        pixels = np.asarray(image)
    else:  # RGB, P, CMYK, YCbCr, ...
        pixels = np.asarray(image.convert("RGB"))
    return Page(torch.from_numpy(_srgb_planes(pixels, icc))[None], alpha, 8)


def _gray_bits(image) -> int:
    """The bits of a TIFF page's gray samples where Pillow reads them into 16-bit levels as
    they are (9 to 15: a scanner's 12-bit gray), else 16."""
    bits = image.tag_v2.get(258)
    bits = bits[0] if isinstance(bits, tuple) and len(bits) == 1 else bits
    return bits if isinstance(bits, int) and 8 < bits < 16 and image.mode == "I;16" else 16


def _srgb_planes(pixels_HWC: np.ndarray, icc: bytes | None) -> np.ndarray:
    """uint8 or uint16 pixels in the space of `icc` -> sRGB float32 planes (C, H, W) in [0, 1]."""
    converted = profiles.to_srgb(pixels_HWC, icc)
    if converted is not None:
        return converted
    planes = pixels_HWC.transpose(2, 0, 1).astype(np.float32)
    planes /= 65535.0 if pixels_HWC.dtype == np.uint16 else 255.0
    return planes


def read_metadata(image) -> Metadata:
    """What is carried to the output; the image's own EXIF (its orientation) stays untouched."""
    from PIL import Image

    info = image.info
    icc = profiles.output_profile(page_profile(image))
    xmp = info.get("xmp") or info.get("XML:com.adobe.xmp")
    iptc = (info.get("photoshop") or {}).get(0x0404)
    source, exif = image.getexif(), Image.Exif()
    if image.format == "TIFF":  # a TIFF's IFD holds its layout too: copy the descriptive tags
        tags = image.tag_v2
        xmp, iptc = _tiff_block(image, _XMP_TAG) or xmp, _tiff_block(image, _IPTC_TAG)
        for tag in _TIFF_DESCRIPTIVE_TAGS:
            if tag in tags:
                exif[tag] = tags[tag]
        exif.get_ifd(_EXIF_IFD).update(source.get_ifd(_EXIF_IFD))
        exif = _writable(exif)
    elif len(source):
        exif = _writable(source)
    on_its_side = exif_orientation(image) in ON_ITS_SIDE
    if on_its_side and 0x011A in exif and 0x011B in exif:
        exif[0x011A], exif[0x011B] = exif[0x011B], exif[0x011A]  # across and down, upright
    exif.pop(EXIF_ORIENTATION, None)
    return Metadata(icc=icc, exif=exif, xmp=_upright_xmp(_as_bytes(xmp)), iptc=_as_bytes(iptc),
                    dpi=_upright_dpi(lambda: _stated_dpi(image), on_its_side))  # fmt: skip


_SUB_IFDS = (_EXIF_IFD, 0x8825)  # EXIF's own and GPS
_INTEROP_IFD = 0xA005  # in EXIF's


def _writable(exif):
    """A copy of an EXIF block less the tags Pillow cannot write back (a value of another
    type than its tag's: an orientation stored as a fraction, a resolution as text, a
    negative signed fraction): a picture is not refused for its EXIF."""
    from PIL import Image

    try:
        data = exif.tobytes()
    except Exception:
        kept = Image.Exif()
        for tag, value in exif.items():
            if tag not in _SUB_IFDS and _writes({tag: value}):
                kept[tag] = value
        interop = {t: v for t, v in exif.get_ifd(_INTEROP_IFD).items()
                   if _writes({_EXIF_IFD: {_INTEROP_IFD: {t: v}}})}  # fmt: skip
        for ifd in _SUB_IFDS:
            tags = {t: v for t, v in exif.get_ifd(ifd).items()
                    if t != _INTEROP_IFD and _writes({ifd: {t: v}})}  # fmt: skip
            if ifd == _EXIF_IFD and interop:  # as an IFD: the pointer held the old file's offset
                tags[_INTEROP_IFD] = interop
            if tags:
                kept[ifd] = tags
        data = kept.tobytes()
    copy = Image.Exif()
    copy.load(data)
    return copy


def _writes(tags: dict) -> bool:
    from PIL import Image

    probe = Image.Exif()
    probe.update(tags)
    try:
        probe.tobytes()
    except Exception:
        return False
    return True


def _upright_dpi(stated: Callable[[], Any], on_its_side: bool) -> tuple[float, float] | None:
    """The print resolution the file holds, `stated` (across, down as stored: JFIF density,
    EXIF resolution in a JPEG, PNG pHYs, TIFF resolution tags), in dots an inch across and
    down the picture once upright; None without one (Pillow fills in 72 for a JPEG and 1
    for a TIFF that say nothing), or outside 1 to 65,535, which a JPEG cannot hold."""
    try:
        x, y = (float(v) for v in stated())
    except (KeyError, TypeError, ValueError, ZeroDivisionError, IndexError):
        return None
    if not (1 <= x <= 0xFFFF and 1 <= y <= 0xFFFF):
        return None
    return (y, x) if on_its_side else (x, y)


def _stated_dpi(image) -> tuple[Any, Any] | None:
    """(across, down) as stored, in dots an inch, where the file states them."""
    if image.format == "TIFF":
        stated = 282 in image.tag_v2 and image.tag_v2.get(296, 2) in (2, 3)  # inch, cm
        return image.info.get("dpi") if stated else None
    if image.format in ("JPEG", "MPO") and image.info.get("jfif_unit") not in (1, 2):
        exif = image.getexif()  # where Pillow reads both from XResolution
        if 0x011A not in exif or exif.get(0x0128) not in (2, 3):
            return None
        scale = 2.54 if exif[0x0128] == 3 else 1.0
        x = float(exif[0x011A])
        return x * scale, float(exif.get(0x011B, x)) * scale
    return image.info.get("dpi")


def _as_bytes(value: Any) -> bytes | None:
    """Metadata blocks come as bytes, str (PNG text, a TIFF tag stored as text) or, from a
    TIFF, a tuple of byte values or of strings; anything else is left out."""
    if not value:
        return None
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, tuple) and all(isinstance(v, str) for v in value):
        return "".join(value).encode()
    try:
        return bytes(value)
    except (TypeError, ValueError):
        return None


def _tiff_block(image, tag: int) -> bytes | None:
    """A TIFF tag holding a metadata block, as its bytes. Writers store them as BYTE or
    UNDEFINED; Photoshop stores IPTC as LONG, of which Pillow keeps only the first value
    (it expects one), so those are read with tifffile."""
    value = image.tag_v2.get(tag)
    if value is None or image.tag_v2.tagtype.get(tag) != 4:  # not LONG
        return _as_bytes(value)
    import tifffile

    where = image.fp.tell()
    try:
        image.fp.seek(0)
        with tifffile.TiffFile(image.fp) as tif:
            return _tag_bytes(tif.pages.first, tag)
    except (tifffile.TiffFileError, OSError, ValueError, struct.error):
        return None  # the block is left out, the picture is not
    finally:
        image.fp.seek(where)  # Pillow reads on from where it was


def _tag_bytes(page, tag: int) -> bytes | None:
    """A metadata block tag of a page tifffile read, as its bytes: BYTE or UNDEFINED as they
    are, LONG (Photoshop's IPTC) packed back in the file's byte order."""
    found = page.tags.get(tag)
    value = None if found is None else found.value
    if value is None or isinstance(value, bytes | str):
        return _as_bytes(value)
    values = (value,) if isinstance(value, int) else tuple(value)
    if not all(isinstance(v, int) and 0 <= v < 2**32 for v in values):
        return None  # a block stored as numbers of another type: left out, not the picture
    return struct.pack(f"{page.parent.byteorder}{len(values)}I", *values)


_XMP_ORIENTATION = re.compile(  # one space before at most: `\s*` would cost time squared
    rb'\s?tiff:Orientation=["\'][1-8]["\']|<tiff:Orientation>[1-8]</tiff:Orientation>'
)  # in a run of white space, which a small compressed PNG can hold a megabyte of


def _upright_xmp(xmp: bytes | None) -> bytes | None:
    """XMP without its orientation, as the output is upright: readers (Pillow's `getexif`
    among them) take XMP's orientation when EXIF has none, and would turn it again."""
    return _XMP_ORIENTATION.sub(b"", xmp) if xmp else xmp


def _past_pillow(data: bytes, image) -> bool:
    """Whether Pillow would read the current page into fewer bits or another range than it
    holds: a PNG, a colour PPM or a TIFF page of more than 8 bits per colour channel (RGB
    or RGBA, CMYK for a TIFF, or for PNG gray with alpha), which it decodes to 8 bits, or
    a TIFF page of signed integers, whose positive half it reads as half the range."""
    if image.format == "PPM":
        return image.mode == "RGB" and _pnm_maxval(data) > 255
    if image.format == "PNG":  # IHDR, always the first chunk: bit depth, colour type
        # (OpenCV reads no animation: an APNG's frames are Pillow's, at 8 bits)
        sixteen = data[12:16] == b"IHDR" and data[24] == 16 and data[25] in (2, 4, 6)
        return sixteen and not getattr(image, "is_animated", False)
    if image.format == "TIFF":
        bits, photometric = image.tag_v2.get(258), image.tag_v2.get(262)
        if 2 in _sample_formats(image):  # signed
            return True
        if not (isinstance(bits, tuple) and set(bits) == {16} and _plain_samples(image)):
            return False
        if photometric == 2:  # RGB(A)
            return len(bits) in (3, 4)
        return _is_16bit_cmyk(image)
    return False


def _plain_samples(image) -> bool:
    """Whether a TIFF page's samples are unsigned integers of one plane deep (not floats,
    nor a volume, whose depth the pixel limit, of width x height, would not count)."""
    return image.tag_v2.get(32997, 1) == 1 and _sample_formats(image) == {1}  # ImageDepth: 1


def _sample_formats(image) -> set[int]:
    """A TIFF page's SampleFormat: 1 unsigned integers, 2 signed, 3 floats (one a sample,
    or one for all)."""
    formats = image.tag_v2.get(339, 1)
    return set(formats) if isinstance(formats, tuple) else {formats}


_PNM_TOKEN = re.compile(rb"#[^\r\n]*|[^\s#]+")  # a comment, or a field of the header


def _pnm_maxval(data: bytes) -> int:
    """The largest sample value a PPM's header states (its fourth field, after comments of
    any length); 0 where unread."""
    fields = []
    for token in _PNM_TOKEN.finditer(data):
        if not token[0].startswith(b"#"):
            fields.append(token[0])
        if len(fields) == 4:
            return int(fields[3]) if fields[3].isdigit() else 0
    return 0


def _is_16bit_cmyk(image) -> bool:
    """Whether the current TIFF page is CMYK (inks of no other kind) at 16 bits, 4 samples."""
    tags = image.tag_v2
    return (
        tags.get(262) == 5  # separated
        and tags.get(258) == (16, 16, 16, 16)
        and tags.get(332, 1) == 1  # InkSet: CMYK
        and 338 not in tags  # no extra samples
        and _plain_samples(image)
    )


def _page_past_pillow(data: bytes, image, index: int, icc: bytes | None) -> Page | None:
    """Page `index` of a file `_past_pillow` names (`image` at that page), upright, alpha
    kept, converted into sRGB from its profile `icc`; None when it does not read so (Pillow
    then reads it). A PNG or PPM is read with OpenCV (gray with alpha comes as BGRA); a TIFF
    as `_tiff_page_past_pillow` reads it."""
    if image.format == "TIFF":
        return _tiff_page_past_pillow(data, image, index, icc)
    import cv2

    pixels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    maxval = _pnm_maxval(data) if image.format == "PPM" else 65535
    if pixels is not None and maxval != 65535:  # OpenCV keeps a PPM's values as stored
        scaled = pixels.astype(np.uint32)  # rounded in integers: 4 bytes a sample
        scaled *= 65535
        scaled += maxval // 2
        scaled //= maxval
        pixels = np.minimum(scaled, 65535, out=scaled).astype(np.uint16)
    turn = exif_orientation(image) if image.format == "PNG" else 1
    return _opencv_page(pixels, icc, turn)


def _tiff_page_past_pillow(data: bytes, image, index: int, icc: bytes | None) -> Page | None:
    """A TIFF page `_past_pillow` names. Interleaved unsigned RGB(A) is read with OpenCV
    (libtiff, the quickest, which turns it by its orientation tag itself); if that fails
    (a compression its libtiff lacks, such as ZSTD), and samples in planes of their own
    (which OpenCV reads as if interleaved), premultiplied alpha or signed samples, with
    tifffile as `_tifffile_page` reads them; CMYK at 16 bits (OpenCV and Pillow keep 8 bits
    of it) with tifffile too."""
    import tifffile

    tags = image.tag_v2
    cmyk = _is_16bit_cmyk(image)
    # OpenCV where alpha is not premultiplied (it does not undo that); a fourth sample is
    # alpha unless said to be unspecified (a spot channel, a saved selection): OpenCV
    # writes alpha without saying so
    if not cmyk and tags.get(284, 1) == 1 and tags.get(338) != (1,) and _plain_samples(image):
        import cv2

        buffer = np.frombuffer(data, np.uint8)
        ok, found = cv2.imdecodemulti(buffer, cv2.IMREAD_UNCHANGED, None, (index, index + 1))
        page = _opencv_page(found[0] if ok and len(found) == 1 else None, icc, 1,
                            alpha=tags.get(338) != (0,))  # fmt: skip
        if page is not None:
            return page
    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tif:
            page = tif.pages[index]
            if not cmyk:
                return _tifffile_page(page, icc) if _tifffile_kind(page) else None
            inks = _samples_HWS(page)
    except ValueError as error:  # LZW and JPEG compression need the imagecodecs package
        raise BadImage(f"a TIFF page that does not read: {error}") from None
    if profiles.read(icc).channels == 4:  # inks through their profile
        srgb_3HW = profiles.to_srgb(inks, icc)
    else:  # as Pillow converts 8-bit CMYK: each of R, G, B is (1 - C or M or Y)(1 - K)
        unit = inks.astype(np.float64) / 65535
        rgb = np.round((1 - unit[..., :3]) * (1 - unit[..., 3:]) * 65535).astype(np.uint16)
        srgb_3HW = _srgb_planes(rgb, None)
    return Page(upright(torch.from_numpy(srgb_3HW), exif_orientation(image))[None], None, 16)


def _opencv_page(
    pixels: np.ndarray | None, icc: bytes | None, turn: int, alpha: bool = True
) -> Page | None:
    """A 16-bit page OpenCV read (BGR or BGRA, gray with alpha as BGRA: None or another
    kind gives None), turned by `turn`; a fourth channel dropped without `alpha`."""
    if pixels is None or pixels.dtype != np.uint16 or pixels.ndim != 3:
        return None
    if pixels.shape[2] not in (3, 4):
        return None
    colour = pixels[..., :1] if profiles.read(icc).channels == 1 else pixels[..., 2::-1]
    rgb_3HW = upright(torch.from_numpy(_srgb_planes(colour, icc)), turn)  # gray: (1, H, W)
    kept = _upright_alpha(pixels[..., 3], turn) if pixels.shape[2] == 4 and alpha else None
    return Page(rgb_3HW[None], kept, 16)


def _upright_alpha(alpha_HW: np.ndarray, turn: int) -> np.ndarray:
    """Alpha samples (uint8 or uint16) turned as `upright` turns a picture."""
    turned = upright(torch.from_numpy(alpha_HW.astype(np.int32)), turn).numpy()
    return turned.astype(alpha_HW.dtype)


def decode(data: bytes, max_pixels: int, min_page_px: int = 0) -> Decoded:
    """Every page of an image file, upright; raises `BadImage` with the reason. `max_pixels`
    bounds the pages together, each after the first counted as at least `min_page_px` (what
    the network takes of a page, however small): a small file of many large blank pages is a
    bomb, and so is one of a hundred thousand 1x1 pages."""
    if data[:3] == b"GIF" and (length := unpadded_length(data)) < len(data):
        data = data[:length]  # Pillow seeks a next frame through zeros a byte at a time
    try:
        image = open_image(data, max_pixels=max_pixels)
    except BadImage:  # a TIFF Pillow does not open may be one tifffile reads
        found = data[:4] in _TIFF_HEADERS and _tifffile_decoded(data, max_pixels, min_page_px)
        if found:
            return found
        raise
    fmt = "JPEG" if image.format == "MPO" else image.format
    if fmt == "JPEG":
        refuse_cut_short_jpeg(data)
    pages, total = [], 0
    try:
        if fmt == "PNG":  # reading its EXIF, which may follow the pixels, decodes them: a
            image.load()  # decoding error is the picture's (a second load keeps what was read)
        meta = read_metadata(image)
        # Page after page, until the last or the limit: not `n_frames`, which walks every
        # page's header first (in time squared in their number, with Pillow's loop check).
        frame_ms = []  # an animation's frames: how long each shows
        for index in itertools.count():
            if index and fmt not in ("TIFF", *_ANIMATED):
                break
            try:
                if index and not _next_page(image, index):
                    break
                w, h = image.size
                total += max(w * h, min_page_px if index else 0)
                if total > max_pixels:
                    each = f", each after the first counted as at least {min_page_px}" * (index > 0)
                    raise BadImage(f"image too large: pages 0-{index} hold {total} pixels{each} "
                                   f"> limit {max_pixels}")  # fmt: skip
                pages.append(_pillow_page(data, image, index))
            except BadImage:
                raise
            except Exception as e:  # an animation cut short in a later frame: those before
                if index and fmt in _ANIMATED and not out_of_memory(e):
                    break
                raise
            # (a WebP frame's duration is known once it is decoded)
            frame_ms.append(round(float(image.info.get("duration") or 0)))
    except BadImage:
        raise
    except Exception as e:  # decoders fail their own ways on corrupt data
        if out_of_memory(e):  # the machine's state, not the image's
            raise
        if fmt == "TIFF" and (found := _tifffile_decoded(data, max_pixels, min_page_px)):
            return found  # a page Pillow opens but does not decode
        if fmt == "TIFF" and isinstance(e, SyntaxError):  # Pillow's word for a layout
            raise BadImage(f"a TIFF page of a kind this job does not read ({e})") from None
        raise BadImage(f"corrupt or truncated image: {type(e).__name__}: {e}") from None
    if not (fmt in _ANIMATED and len(pages) > 1):
        return Decoded(pages, fmt, meta)
    # How often it plays (0: for ever): a GIF's count is of repeats after the first play,
    # and a GIF without one plays once
    loop = image.info.get("loop")
    plays = (1 if loop is None else loop and loop + 1) if fmt == "GIF" else loop or 0
    poster = fmt == "PNG" and bool(image.info.get("default_image"))
    return Decoded(pages, fmt, meta, frame_ms, plays, poster)


def _pillow_page(data: bytes, image, index: int) -> Page:
    """The page (or frame) `index` of a file Pillow opened, at the page."""
    icc = page_profile(image)
    if _past_pillow(data, image):
        page = _page_past_pillow(data, image, index, icc)
        if page is not None:
            return page
    image.load()
    white_is_zero = image.format == "TIFF" and image.tag_v2.get(262) == 0
    bits = _gray_bits(image) if image.format == "TIFF" else 16
    return _page(upright_image(image), white_is_zero, icc, bits)


_TIFF_HEADERS = (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+")  # classic and BigTIFF
_TIFFFILE_COLOURS = {0: 1, 1: 1, 2: 3}  # photometric: white or black is zero (gray), RGB
_DNG_VERSION, _SUB_IFDS_TAG = 50706, 330


def _tifffile_decoded(data: bytes, max_pixels: int, min_page_px: int) -> Decoded | None:
    """Every page of a TIFF that Pillow does not open or decode, read with tifffile as
    `decode` reads other files: gray with alpha at 16 bits, float or signed samples, samples
    of 2 to 32 bits, each in a plane of its own, compressions Pillow lacks (ZSTD, LZMA,
    JPEG 2000, JPEG XL, LERC, WebP). Pages upright, alpha kept (premultiplied alpha undone),
    the pixel limit kept (a pixel of many samples counted as several), and the metadata a
    TIFF output carries (not the EXIF sub-IFD).
    None where a page is of a kind it is not read for here (palette, CMYK, YCbCr, a
    camera's raw sensor data): Pillow's reason stands."""
    import tifffile

    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tif:
            pages, total = [], 0
            for index, page in enumerate(tif.pages):
                if _tifffile_kind(page) is None:
                    return None
                # a pixel of more than 8 bytes (16-bit RGBA's) counts once for every 8
                deep = -(-page.samplesperpixel * page.dtype.itemsize // 8)
                total += max(page.imagewidth * page.imagelength * deep, min_page_px * (index > 0))
                if total > max_pixels:
                    raise BadImage(f"image too large: pages 0-{index} hold {total} pixels "
                                   f"(of 8 bytes) > limit {max_pixels}")  # fmt: skip
                pages.append(_tifffile_page(page, _tag_bytes(page, _ICC_TAG)))
            meta = _tifffile_metadata(tif.pages.first)
    except BadImage:
        raise
    except tifffile.TiffFileError as e:  # its structure, cut short or damaged
        raise BadImage(f"corrupt or truncated image: TiffFileError: {e}") from None
    except Exception as e:  # tifffile fails its own ways on corrupt data
        if out_of_memory(e):
            raise
        if "imagecodecs" in str(e):  # a compression its codecs package does not hold
            raise BadImage(f"a TIFF whose compression does not read here: {e}") from None
        raise BadImage(f"corrupt or truncated image: {type(e).__name__}: {e}") from None
    return Decoded(pages, "TIFF", meta)


def _tifffile_kind(page) -> tuple[int, int] | None:
    """(colour samples, the first extra sample's kind: 0 unspecified, 1 premultiplied
    alpha, 2 alpha, -1 none) of a tifffile page `_tifffile_page` reads: gray or RGB of
    integer or float samples, one plane deep; None for any other."""
    colours = _TIFFFILE_COLOURS.get(int(page.photometric))
    extra = page.samplesperpixel - (colours or 0)
    if (
        colours is None
        or extra < 0
        or page.dtype is None
        or page.dtype.kind not in "uif"
        or page.imagedepth != 1  # a volume, which the pixel limit would not count
        or _SUB_IFDS_TAG in page.tags  # a camera raw's sensor data lies in its sub-IFDs
        or _DNG_VERSION in page.tags
    ):
        return None
    stated = tuple(page.extrasamples)  # none stated: alpha, as OpenCV writes RGBA
    return colours, (int(stated[0]) if stated else 2) if extra else -1


def _tifffile_page(page, icc: bytes | None) -> Page:
    """A page `_tifffile_kind` reads, upright, in sRGB from its profile `icc`: samples of 8
    bits or fewer stay 8-bit, others come out 16-bit (`_in_unit_range`: colour and alpha
    each over its own range)."""
    colours, extra = _tifffile_kind(page)
    samples = _samples_HWS(page)
    kind, bits = samples.dtype.kind, page.bitspersample
    top, dtype = (255, np.uint8) if kind == "u" and bits <= 8 else (65535, np.uint16)
    keep = samples[..., : colours + (extra in (1, 2))]  # colour and alpha: no other extras
    if samples.dtype == dtype and bits in (8, 16) and extra != 1 and page.photometric != 0:
        levels = keep  # as stored
    else:
        unit = np.concatenate(  # colour and alpha each over its own range
            [_in_unit_range(keep[..., :colours], kind, bits),
             _in_unit_range(keep[..., colours:], kind, bits)], axis=-1
        )  # fmt: skip
        if extra == 1:  # premultiplied (as stored): undone where it shows
            alpha = unit[..., -1:]
            np.divide(unit[..., :-1], alpha, out=unit[..., :-1], where=alpha > 0)
            np.minimum(unit, 1, out=unit)
        if int(page.photometric) == 0:  # white is zero
            np.subtract(1, unit[..., :1], out=unit[..., :1])
        levels = np.round(unit * top).astype(dtype)
    turn = _tifffile_turn(page)
    rgb_CHW = upright(torch.from_numpy(_srgb_planes(levels[..., :colours], icc)), turn)
    alpha = _upright_alpha(levels[..., colours], turn) if extra in (1, 2) else None
    return Page(rgb_CHW[None], alpha, 8 if top == 255 else 16)


def _samples_HWS(page) -> np.ndarray:
    """A tifffile page's samples as (H, W, S), whether they are stored interleaved or each
    in a plane of its own ((S, H, W) as tifffile gives them), gray too (S = 1)."""
    samples = page.asarray()
    samples = samples.transpose(1, 2, 0) if int(page.planarconfig) == 2 else samples
    return samples.reshape(*samples.shape[:2], -1)


def _in_unit_range(samples: np.ndarray, kind: str, bits: int) -> np.ndarray:
    """float32 samples in [0, 1] of integers of `bits` (signed ones' negative half black; of
    32 bits, 16-bit values or larger ones up to their maximum, as `gray_in_unit_range`) or of
    floats (`float_top`; not a number, or infinite: black)."""
    unit = samples.astype(np.float32)
    if kind == "f":
        np.nan_to_num(unit, copy=False, nan=0.0, posinf=0.0, neginf=0.0)
        top = float_top(unit)
    elif bits == 32:
        top = max(65535.0, float(unit.max(initial=0)))
    else:
        top = float(2 ** (bits - (kind == "i")) - 1)
    unit /= top
    return np.clip(unit, 0, 1, out=unit)


def _tifffile_turn(page) -> int:
    """The EXIF orientation of a page tifffile read: 1 (upright) to 8; 1 without a valid one."""
    tag = page.tags.get(EXIF_ORIENTATION)
    return int(tag.value) if tag is not None and tag.value in range(1, 9) else 1


def _tifffile_metadata(page) -> Metadata:
    """`read_metadata` of a TIFF page tifffile read: its descriptive tags, XMP, IPTC, an RGB
    ICC profile and its print resolution, upright."""
    from PIL import Image

    exif = Image.Exif()
    for tag in _TIFF_DESCRIPTIVE_TAGS:
        if (found := page.tags.get(tag)) is not None and isinstance(found.value, str):
            exif[tag] = found.value
    on_its_side = _tifffile_turn(page) in ON_ITS_SIDE
    return Metadata(
        icc=profiles.output_profile(_tag_bytes(page, _ICC_TAG)),
        exif=exif,
        xmp=_upright_xmp(_tag_bytes(page, _XMP_TAG)),
        iptc=_tag_bytes(page, _IPTC_TAG),
        dpi=_upright_dpi(lambda: _tifffile_stated_dpi(page), on_its_side),
    )


def _tifffile_stated_dpi(page) -> tuple[float, float] | None:
    """A TIFF page's resolution tags (rationals) in dots an inch, as stored; None where its
    unit is none (neither inch nor centimetre)."""
    unit = page.tags.get(296)
    scale = {2: 1.0, 3: 2.54}.get(2 if unit is None else int(unit.value))
    if scale is None:
        return None
    across, down = (page.tags[tag].value for tag in (282, 283))
    return across[0] / across[1] * scale, down[0] / down[1] * scale


_GRAY_MODES = ("1", "L", "LA", "La", "I", "F")
_RGB_MODES = ("RGB", "RGBA", "RGBa", "RGBX", "P", "PA")


def page_profile(image) -> bytes | None:
    """The ICC profile of a PIL image's current page where it is of the page's colour space
    (gray, RGB or CMYK; a profile of another is not used), else None. Pillow keeps a TIFF's first
    page's profile in `info` when a later page has none: a TIFF page's own tag is read (as
    bytes only: a tag stored as a number is no profile). A picture without one whose EXIF
    says it is Adobe RGB, as cameras set to it write (DCF), is given that profile."""
    found = image.tag_v2.get(_ICC_TAG) if image.format == "TIFF" else image.info.get("icc_profile")
    if not found and image.mode in _RGB_MODES and _exif_says_adobe_rgb(image):
        found = profiles.adobe_rgb()
    if not isinstance(found, bytes | bytearray) or not found:
        return None
    mode = image.mode
    channels = 1 if mode in _GRAY_MODES or mode.startswith("I;16") else 3 * (mode in _RGB_MODES)
    channels = 4 if mode == "CMYK" else channels
    return bytes(found) if profiles.read(bytes(found)).channels == channels else None


_EXIF_COLOUR_SPACE, _INTEROP_INDEX = 0xA001, 0x0001


def _exif_says_adobe_rgb(image) -> bool:
    """Whether a picture's EXIF names Adobe RGB: colour space "uncalibrated" with the
    interoperability index R03 (DCF 2.0's option file), or 2, which some cameras write."""
    try:
        exif = image.getexif()
        space = exif.get_ifd(_EXIF_IFD).get(_EXIF_COLOUR_SPACE)
        index = exif.get_ifd(_INTEROP_IFD).get(_INTEROP_INDEX)
    except Exception:  # EXIF is the file's own business: a broken one names no space
        return False
    return space == 2 or (space == 0xFFFF and isinstance(index, str) and index.startswith("R03"))


def _next_page(image, index: int) -> bool:
    """Seeks page `index` of a TIFF; False where there is none."""
    try:
        image.seek(index)
    except EOFError:
        return False
    return True


# ---------------------------------------------------------------- encoding


def exif_bytes(meta: Metadata, provenance: str, limit: int | None = None) -> bytes:
    """The EXIF block written with an output: the source's, with the provenance tag. Above
    `limit` bytes (a JPEG segment's room), the maker's note goes first, then the whole
    source block: the provenance tag is always written."""
    from PIL import ExifTags, Image

    exif = Image.Exif()
    if meta.exif:
        exif.load(meta.exif.tobytes())
    exif[PROVENANCE_EXIF_TAG] = provenance
    body = exif.tobytes()
    if limit is not None and len(body) > limit:
        exif.get_ifd(ExifTags.IFD.Exif).pop(ExifTags.Base.MakerNote, None)
        body = exif.tobytes()
    if limit is not None and len(body) > limit:
        return exif_bytes(Metadata(), provenance)
    return body


def _jpeg_xmp(xmp: bytes | None) -> bytes | None:
    """`xmp` where it fits one JPEG segment, else None: a larger packet is left out."""
    return xmp if xmp and len(_XMP_HEADER) + len(xmp) <= _APP_PAYLOAD_MAX else None


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def encode_png16(
    rgb_HW3: np.ndarray,
    meta: Metadata,
    exif: bytes,
    provenance: str,
    alpha_HW: np.ndarray | None = None,
) -> bytes:
    """A 16-bit RGB or RGBA PNG (Pillow writes at most 8 bits per colour channel)."""
    h, w, _ = rgb_HW3.shape
    pixels = rgb_HW3 if alpha_HW is None else np.dstack([rgb_HW3, as_16bit(alpha_HW)])
    row_bytes = w * 2 * pixels.shape[2]
    rows = np.zeros((h, 1 + row_bytes), np.uint8)  # filter byte 0, then big-endian samples
    rows[:, 1:] = np.ascontiguousarray(pixels, dtype=">u2").view(np.uint8).reshape(h, row_bytes)
    colour_type = 2 if alpha_HW is None else 6
    chunks = [_png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0))]
    if meta.icc:
        chunks.append(_png_chunk(b"iCCP", b"ICC profile\0\0" + zlib.compress(meta.icc)))
    if meta.dpi:  # pixels a metre
        x, y = (round(d / 0.0254) for d in meta.dpi)
        chunks.append(_png_chunk(b"pHYs", struct.pack(">IIB", x, y, 1)))
    chunks.append(_png_chunk(b"eXIf", exif.removeprefix(b"Exif\0\0")))
    if meta.xmp:
        chunks.append(_png_chunk(b"iTXt", b"XML:com.adobe.xmp\0\0\0\0\0" + meta.xmp))
    chunks.append(_png_chunk(b"tEXt", b"Software\0" + provenance.encode("latin-1", "replace")))
    chunks.append(_png_chunk(b"IDAT", zlib.compress(rows.tobytes(), 6)))
    return PNG_SIGNATURE + b"".join(chunks) + _png_chunk(b"IEND", b"")


def _tiff_text(meta: Metadata, provenance: str) -> dict[int, str]:
    """A TIFF output's text tags: the source's descriptive ones and the provenance."""
    text = {tag: meta.exif.get(tag) for tag in _TIFF_DESCRIPTIVE_TAGS} if meta.exif else {}
    return {**{t: v for t, v in text.items() if v is not None}, PROVENANCE_EXIF_TAG: provenance}


def encode_tiff16(rgb_pages: list[np.ndarray], decoded: Decoded, provenance: str) -> bytes:
    """A TIFF of pages at 16 bits per channel (Pillow writes at most 8), deflate-compressed,
    with the source's ICC profile, XMP, IPTC and descriptive tags and the provenance tag.
    The EXIF sub-IFD (capture date and the like) is not carried: tifffile writes none."""
    import tifffile

    meta = decoded.meta
    text = _tiff_text(meta, provenance)
    # TIFF text is 7-bit ASCII: other characters become "?", as Pillow writes them too
    tags = [
        (tag, "s", 0, value.encode("ascii", "replace"), True)
        for tag, value in text.items()
        if isinstance(value, str)
    ]
    for tag, block in ((_ICC_TAG, meta.icc), (_XMP_TAG, meta.xmp), (_IPTC_TAG, meta.iptc)):
        if block:
            tags.append((tag, "B", len(block), block, True))
    buffer = io.BytesIO()
    with tifffile.TiffWriter(buffer) as tiff:
        for rgb, page in zip(rgb_pages, decoded.pages, strict=True):
            pixels, extra = as_16bit(rgb), None
            if page.alpha is not None:
                pixels, extra = np.dstack([pixels, as_16bit(page.alpha)]), ["unassalpha"]
            resolution = {"resolution": meta.dpi, "resolutionunit": "INCH"} if meta.dpi else {}
            tiff.write(pixels, photometric="rgb", compression="zlib", extrasamples=extra,
                       extratags=tags, metadata=None, software=False, **resolution)  # fmt: skip
    return buffer.getvalue()


def output_format(decoded: Decoded, choice: str) -> str:
    """JPEG, PNG, TIFF, WEBP, PNG16 or TIFF16 (a 16-bit picture, or pages of which one has
    16 bits: a TIFF). An animation stays one in PNG (APNG; a GIF's too) and WebP, at 8 bits;
    TIFF takes the frames as pages where another format is chosen."""
    fmt = decoded.format if choice == "keep" else choice.upper()
    fmt = fmt if fmt in SUFFIXES else "PNG"
    if decoded.frame_ms is not None and fmt in ("PNG", "WEBP"):
        return fmt
    if len(decoded.pages) > 1:  # pages: a TIFF's, or frames into a format without them
        return "TIFF16" if any(page.bits == 16 for page in decoded.pages) else "TIFF"
    page = decoded.pages[0]
    if page.alpha is not None and fmt == "JPEG":  # which has no alpha
        fmt = "PNG"
    return fmt + "16" if page.bits == 16 and fmt in ("PNG", "TIFF") else fmt


def encode(
    rgb_pages: list[np.ndarray], decoded: Decoded, fmt: str, provenance: str, quality: int
) -> bytes:
    """Colorized sRGB pages (H, W, 3 uint8 or uint16; converted in place) -> file bytes with
    the source's metadata, pixels in the space of the ICC profile it carries."""
    from PIL import Image, PngImagePlugin

    limit = EXIF_SEGMENT_MAX if fmt == "JPEG" else None
    meta, exif = decoded.meta, exif_bytes(decoded.meta, provenance, limit)
    rgb_pages = [profiles.from_srgb(rgb, meta.icc) for rgb in rgb_pages]
    if fmt == "PNG16":
        return encode_png16(rgb_pages[0], meta, exif, provenance, decoded.pages[0].alpha)
    if fmt == "TIFF16":
        return encode_tiff16(rgb_pages, decoded, provenance)
    images = []
    any_alpha = any(page.alpha is not None for page in decoded.pages)  # then in every frame
    for rgb, page in zip(rgb_pages, decoded.pages, strict=True):
        image = Image.fromarray(as_8bit(rgb))
        if page.alpha is not None:  # 8 bits here, as the colour
            image.putalpha(Image.fromarray(as_8bit(page.alpha)))
        elif any_alpha and fmt != "TIFF":  # an animation's frames share the first's mode
            image.putalpha(255)
        images.append(image)
    kwargs: dict[str, Any] = {"exif": exif, "dpi": meta.dpi}  # (WebP keeps no resolution)
    if decoded.frame_ms is not None and fmt in ("PNG", "WEBP"):
        frame_ms = decoded.frame_ms[decoded.poster :]  # an APNG's default image: no frame
        if decoded.poster and fmt == "WEBP":  # (WebP has no place for it)
            images = images[1:]
        elif decoded.poster:
            kwargs["default_image"] = True
        kwargs.update(save_all=True, append_images=images[1:], duration=frame_ms,
                      loop=decoded.loop)  # fmt: skip
    if meta.icc:
        kwargs["icc_profile"] = meta.icc
    if fmt == "JPEG":
        kwargs.update(quality=quality, subsampling=0, xmp=_jpeg_xmp(meta.xmp))
        if meta.iptc:
            kwargs["extra"] = iptc_segment(meta.iptc)
    elif fmt == "PNG":
        text = PngImagePlugin.PngInfo()
        text.add_text("Software", provenance)
        if meta.xmp:
            text.add_itxt("XML:com.adobe.xmp", meta.xmp.decode("utf-8", "replace"))
        kwargs["pnginfo"] = text
    elif fmt == "WEBP":
        kwargs.update(quality=quality, xmp=meta.xmp)
        # libwebp's lossy animation shows the frame before through a frame's transparent
        # pixels: lossless keeps them
        kwargs["lossless"] = any_alpha and len(images) > 1
    else:  # TIFF: Pillow writes `tiffinfo` or `exif`, and libtiff no EXIF sub-IFD
        tags = {**_tiff_text(meta, provenance), _XMP_TAG: meta.xmp, _IPTC_TAG: meta.iptc}
        kwargs.update(compression="tiff_deflate", save_all=True, append_images=images[1:])
        kwargs.update(exif=None, tiffinfo={k: v for k, v in tags.items() if v})
    buffer = io.BytesIO()
    images[0].save(buffer, format=fmt, **{k: v for k, v in kwargs.items() if v is not None})
    return buffer.getvalue()


def output_name(rel: str, fmt: str) -> str:
    suffixes = SUFFIXES[fmt.removesuffix("16")]
    return rel if rel.lower().endswith(suffixes) else rel + suffixes[0]


# ---------------------------------------------------------------- JPEG segments, orientation


def _segment(marker: int, payload: bytes) -> bytes:
    if len(payload) > _APP_PAYLOAD_MAX:
        raise ValueError(f"APP{marker - 0xE0} payload of {len(payload)} bytes is too long")
    return bytes((0xFF, marker)) + struct.pack(">H", len(payload) + 2) + payload


def iptc_segment(iptc: bytes) -> bytes:
    """A JPEG APP13 segment holding IPTC-IIM records (Photoshop resource 0x0404); nothing
    for records too large for one segment."""
    payload = iptc + b"\0" * (len(iptc) % 2)
    if len(payload) > _APP_PAYLOAD_MAX - 26:  # "Photoshop 3.0\0", resource header, length
        return b""
    return _segment(
        0xED, b"Photoshop 3.0\0" + b"8BIM\x04\x04\0\0" + struct.pack(">I", len(iptc)) + payload
    )


def app_segments(
    exif: bytes,
    *,
    icc: bytes | None,
    xmp: bytes | None,
    iptc: bytes | None,
    dpi: tuple[float, float] | None = None,
) -> bytes:
    """The APP segments that carry a source's metadata into a JPEG, in the usual order:
    APP0 JFIF with the print resolution (`dpi`, where given: it replaces the encoder's, see
    `with_segments`), APP1 EXIF (``exif`` as PIL's ``Exif.tobytes()`` gives it), APP1 XMP,
    APP2 ICC (split into numbered chunks as the ICC spec requires), APP13 IPTC."""
    parts = []
    if dpi:  # JFIF 1.01, density in dots an inch, no thumbnail
        x, y = (min(max(round(d), 1), 0xFFFF) for d in dpi)
        parts.append(_segment(0xE0, b"JFIF\0\x01\x01\x01" + struct.pack(">HH", x, y) + b"\0\0"))
    if exif:
        body = exif if exif.startswith(_EXIF_HEADER) else _EXIF_HEADER + exif
        if len(body) <= _APP_PAYLOAD_MAX:  # a larger EXIF cannot be carried by APP1: dropped
            parts.append(_segment(0xE1, body))
    if xmp := _jpeg_xmp(xmp):
        parts.append(_segment(0xE1, _XMP_HEADER + xmp))
    if icc:
        chunks = [icc[i : i + _ICC_CHUNK] for i in range(0, len(icc), _ICC_CHUNK)]
        if len(chunks) <= 255:
            for number, chunk in enumerate(chunks, start=1):
                header = b"ICC_PROFILE\x00" + bytes((number, len(chunks)))
                parts.append(_segment(0xE2, header + chunk))
    if iptc:
        parts.append(iptc_segment(iptc))
    return b"".join(parts)


def with_segments(jpeg: bytes, segments: bytes) -> bytes:
    """``jpeg`` with ``segments`` inserted after its SOI and the JFIF APP0 an encoder writes
    first (JFIF requires APP0 right after SOI), or in place of that APP0 where ``segments``
    begin with one of their own; any APP1 / APP2 the encoder wrote stays."""
    if not jpeg.startswith(_SOI):
        raise ValueError("not a JPEG stream (no SOI marker)")
    start = end = len(_SOI)  # end: of the encoder's APP0, where it wrote one
    if jpeg[start : start + 2] == b"\xff\xe0":
        end = start + 2 + struct.unpack(">H", jpeg[start + 2 : start + 4])[0]
    if segments.startswith(b"\xff\xe0"):  # an APP0 of their own: the encoder's goes
        return _SOI + segments + jpeg[end:]
    return jpeg[:end] + segments + jpeg[end:]


def upright(image_CHW: torch.Tensor, turn: int) -> torch.Tensor:
    """An image stored with EXIF orientation `turn`, as it is meant to be seen."""
    if turn in ON_ITS_SIDE:  # transposed first
        image_CHW = image_CHW.transpose(-1, -2)
    flips = {2: (-1,), 3: (-1, -2), 4: (-2,), 6: (-1,), 7: (-1, -2), 8: (-2,)}.get(turn)
    return image_CHW.flip(flips).contiguous() if flips else image_CHW.contiguous()

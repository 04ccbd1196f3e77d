"""`jobs.picture_files.decode` on files that archives hold and the common decoders read
otherwise: metadata Pillow cannot write back, files cut short and padded, damaged pixel
data, extra channels, fewer bits than their container, and formats the job does not read."""

from __future__ import annotations

import io
import re
import struct
import zlib

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from jobs import picture_files
from jobs.images import BadImage, jpeg_cut_short


def jpeg(pixels: np.ndarray, **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90, **options)
    return buffer.getvalue()


def photo(height: int = 30, width: int = 40) -> np.ndarray:
    rng = np.random.default_rng(0)
    smooth = rng.integers(0, 256, (height // 5 + 1, width // 5 + 1, 3), dtype=np.uint8)
    return np.ascontiguousarray(smooth.repeat(5, 0).repeat(5, 1)[:height, :width])


def exif_block(entries: list[tuple[int, int, int, bytes]]) -> bytes:
    """A little-endian EXIF block of one IFD: (tag, TIFF type, count, value bytes)."""
    head = b"Exif\0\0II*\0\x08\0\0\0"
    values_at = 8 + 2 + 12 * len(entries) + 4
    table, values = struct.pack("<H", len(entries)), b""
    for tag, kind, count, value in sorted(entries):
        if len(value) <= 4:
            table += struct.pack("<HHI", tag, kind, count) + value.ljust(4, b"\0")
        else:
            table += struct.pack("<HHII", tag, kind, count, values_at + len(values))
            values += value + b"\0" * (len(value) % 2)
    return head + table + b"\0\0\0\0" + values


def test_exif_values_of_another_type_than_their_tags_are_left_out_not_the_picture() -> None:
    """Cameras and editors write tags of the wrong type (a resolution as text, an orientation
    as a fraction), which Pillow reads but cannot write back: those tags are left out, the
    rest carried over, and an orientation that is no integer turns nothing (as on the GPU
    path, which reads orientations alike)."""
    block = exif_block([
        (0x010F, 2, 6, b"Canon\0"),  # Make, as it should be
        (0x011A, 2, 4, b"300\0"),  # XResolution as text
        (0x0112, 5, 1, struct.pack("<II", 6, 1)),  # Orientation as the fraction 6/1
        (0x011B, 10, 1, struct.pack("<ii", -72, 1)),  # YResolution negative, signed
    ])  # fmt: skip
    data = jpeg(photo(), exif=block)
    decoded = picture_files.decode(data, 10**6)
    assert dict(decoded.meta.exif) == {0x010F: "Canon"}
    assert decoded.pages[0].rgb.shape[-2:] == (30, 40)  # as stored: not turned
    out = picture_files.encode([np.zeros((30, 40, 3), np.uint8)], decoded, "JPEG", "us", 90)
    exif = Image.open(io.BytesIO(out)).getexif()
    assert exif[0x010F] == "Canon" and exif[picture_files.PROVENANCE_EXIF_TAG] == "us"


def test_a_rebuilt_exif_keeps_its_exif_and_interoperability_ifds() -> None:
    """Left without a tag of the wrong type, a camera's EXIF keeps its own IFD and the
    interoperability IFD within it (whose index R03 says Adobe RGB), written anew: its old
    pointer would name bytes of the old file."""
    from PIL.TiffImagePlugin import IFDRational

    exif = Image.Exif()
    exif[0x010F], exif[0x011A], exif[0x0128] = "Canon", IFDRational(300), 2
    exif[0x8769] = {0x829A: IFDRational(1, 125), 0xA001: 0xFFFF, 0xA005: {0x0001: "R03"}}
    block = exif.tobytes()
    entry = struct.pack(">HHI", 0x011A, 5, 1)  # XResolution, a fraction: made text (as
    assert block.startswith(b"Exif\0\0MM")  # Pillow writes it, big-endian)
    assert block.count(entry) == 1
    block = block.replace(entry, struct.pack(">HHI", 0x011A, 2, 8))
    decoded = picture_files.decode(jpeg(photo(), exif=block), 10**6)
    out = picture_files.encode([np.zeros((30, 40, 3), np.uint8)], decoded, "JPEG", "us", 90)
    for written in (decoded.meta.exif, Image.open(io.BytesIO(out)).getexif()):
        assert written[0x010F] == "Canon" and 0x011A not in written
        assert written.get_ifd(0x8769)[0x829A] == IFDRational(1, 125)
        assert written.get_ifd(0xA005) == {0x0001: "R03"}


def test_a_jpeg_cut_short_and_padded_with_zeros_is_refused() -> None:
    """Disk recovery and preallocating downloads leave a cut JPEG padded with zeros, which
    decoders read as whole, gray below the cut. Its scan has no end marker: refused. A
    whole file followed by zeros or other data reads; the segments before the scan (an
    EXIF thumbnail holds a scan and an end marker of its own) do not count."""
    thumbnail = jpeg(photo(8, 8))  # in APP1, before the picture's own scan
    whole = jpeg(photo(), exif=b"Exif\0\0" + thumbnail)
    cut = whole[: len(whole) * 2 // 3] + bytes(4096)
    assert jpeg_cut_short(cut)
    with pytest.raises(BadImage, match="truncated JPEG: its data ends in zeros"):
        picture_files.decode(cut, 10**6)
    for after in (bytes(4096), b"trailer of a phone's own" + bytes(100)):
        assert not jpeg_cut_short(whole + after)
        assert picture_files.decode(whole + after, 10**6).pages[0].rgb.shape[-2:] == (30, 40)
    assert not jpeg_cut_short(whole[: len(whole) * 2 // 3])  # no zeros: the decoder's to find
    with pytest.raises(BadImage, match="truncated"):
        picture_files.decode(whole[: len(whole) * 2 // 3], 10**6)


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png(rows: bytes, width: int, height: int) -> bytes:
    """An 8-bit RGB PNG of the raw rows given (each a filter byte, then its pixels)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(rows))
        + png_chunk(b"IEND", b"")
    )


def test_a_png_whose_pixels_do_not_decode_is_refused_not_made_black() -> None:
    """Reading a PNG's EXIF decodes its pixels (the EXIF may follow them): an error there is
    the picture's. Once swallowed by the metadata's reading, the pixels came out black."""
    pixels = photo(6, 5)
    rows = b"".join(b"\0" + row.tobytes() for row in pixels)
    (page,) = picture_files.decode(png(rows, 5, 6), 10**6).pages
    assert np.array_equal((page.rgb[0].numpy() * 255).round().transpose(1, 2, 0), pixels)
    damaged = b"\7" + rows[1:]  # filter type 7 does not exist
    with pytest.raises(BadImage, match="corrupt or truncated image"):
        picture_files.decode(png(damaged, 5, 6), 10**6)


@pytest.mark.parametrize("extra, alpha", [("unspecified", False), ("unassalpha", True)])
def test_a_16bit_tiffs_fourth_channel_is_alpha_only_where_it_says_so(extra, alpha) -> None:
    """A saved selection or spot colour (extra sample "unspecified") is no transparency;
    unassociated alpha is (and a fourth sample said to be nothing, as OpenCV writes it: the
    colorize tests' 16-bit RGBA TIFF)."""
    rgbx = np.random.default_rng(1).integers(0, 65536, (4, 6, 4), dtype=np.uint16)
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, rgbx, photometric="rgb", extrasamples=[extra])
    (page,) = picture_files.decode(buffer.getvalue(), 10**6).pages
    assert page.bits == 16 and (page.alpha is not None) == alpha
    np.testing.assert_allclose(page.rgb[0].numpy().transpose(1, 2, 0), rgbx[..., :3] / 65535)
    if alpha:
        assert np.array_equal(page.alpha, rgbx[..., 3])


def test_a_12bit_gray_tiff_spans_its_12_bits() -> None:
    """Pillow keeps a scanner's 12-bit levels as they are, in 16-bit samples: 4095 is white."""
    levels = np.array([[0, 1000, 2048, 4095]], np.uint16)
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, levels, bitspersample=12, photometric="minisblack")
    (page,) = picture_files.decode(buffer.getvalue(), 10**6).pages
    np.testing.assert_allclose(page.rgb[0, 0, 0].numpy(), levels[0] / 4095, rtol=1e-6)


def test_metadata_stored_as_text_or_large_is_carried_over() -> None:
    """XMP in a TIFF tag of type ASCII (tifffile's default for a str), and a PNG text chunk
    over Pillow's 1 MB default, which refused the whole picture."""
    xmp = '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF/></x:xmpmeta>'
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, photo(), extratags=[(700, "s", 0, xmp, True)])
    assert picture_files.decode(buffer.getvalue(), 10**6).meta.xmp == xmp.encode()

    from PIL import PngImagePlugin

    history = "".join(f"<step n='{i}' seed='{i * 7919 % 10007}'/>" for i in range(100_000))
    text = PngImagePlugin.PngInfo()
    text.add_itxt("XML:com.adobe.xmp", f"<x:xmpmeta>{history}</x:xmpmeta>", zip=True)
    buffer = io.BytesIO()
    Image.fromarray(photo()).save(buffer, "PNG", pnginfo=text)
    assert len(history) > 2**21
    decoded = picture_files.decode(buffer.getvalue(), 10**6)
    assert decoded.meta.xmp.endswith(b"</x:xmpmeta>") and len(decoded.meta.xmp) > 2**21


@pytest.mark.parametrize(
    "start, name",
    [
        (b"\0\0\0\x18ftypheic\0\0\0\0", "HEIF (HEIC)"),
        (b"\0\0\0\x18ftypmif1\0\0\0\0", "HEIF (HEIC)"),
        (b"\xff\x0a\xe8\x30\x10", "JPEG XL"),
        (b"II*\0\x08\0\0\0\0\0", "TIFF (or camera raw)"),
        (b"%PDF-1.7\n", "PDF"),
        (b"\0\0\1\0\1\0", "Windows icon (ICO)"),
        (b"icns\0\0\0\x48", "Apple icon (ICNS)"),
    ],
)
def test_a_format_the_job_does_not_read_is_named_in_the_reason(start: bytes, name: str) -> None:
    reason = f"a {name} file of a kind this job does not read"
    with pytest.raises(BadImage, match=f"^{re.escape(reason)}$"):
        picture_files.decode(start + bytes(64), 10**6)
    with pytest.raises(BadImage, match="not an image"):
        picture_files.decode(b"plain text, " + start, 10**6)


def test_an_icon_file_holding_a_picture_larger_than_its_header_says_is_refused() -> None:
    """An icon's pictures inside are decoded at their own size, not the one checked: a small
    ICO file whose directory says 16x16 holding a 4-megapixel PNG (a gigapixel one is as
    small) is refused before it is decoded."""
    buffer = io.BytesIO()
    Image.new("L", (2000, 2000)).save(buffer, "PNG")
    png = buffer.getvalue()
    entry = struct.pack("<BBBBHHII", 16, 16, 0, 0, 1, 32, len(png), 22)
    icon = struct.pack("<HHH", 0, 1, 1) + entry + png
    assert len(icon) < 20_000
    with pytest.raises(BadImage, match=r"^a Windows icon \(ICO\) file of a kind"):
        picture_files.decode(icon, 10**6)


def test_a_png_of_many_colour_profiles_is_refused_before_they_are_inflated(monkeypatch) -> None:
    """Each iCCP chunk inflates up to 16 MB, however small: the format allows one, and a
    file of many would cost a thousand times its size in inflation."""
    from PIL import ImageCms, PngImagePlugin

    from jobs.images import load_rgb

    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    buffer = io.BytesIO()
    Image.new("RGB", (8, 6), (200, 40, 10)).save(buffer, "PNG", icc_profile=srgb)
    png = buffer.getvalue()
    start = png.index(b"iCCP") - 4  # its length, then its type
    end = start + 12 + int.from_bytes(png[start : start + 4], "big")
    assert picture_files.decode(png, 10**6).pages[0].rgb.shape == (1, 3, 6, 8)  # one: read
    many = png[:end] + png[start:end] * 2 + png[end:]

    def inflated(*args):
        raise AssertionError("a profile was inflated")

    monkeypatch.setattr(PngImagePlugin.PngStream, "chunk_iCCP", inflated)
    for decode in (lambda data: picture_files.decode(data, 10**6), load_rgb):
        with pytest.raises(BadImage, match=r"^a PNG with 3 colour profiles \(iCCP chunks\)"):
            decode(many)


def test_a_video_is_not_an_image() -> None:
    """An MP4 or QuickTime file (an ISO media file too, of a video's brand) beside the photos."""
    for brand in (b"isom", b"qt  "):
        with pytest.raises(BadImage, match=r"^not an image \(unrecognised format\)$"):
            picture_files.decode(b"\0\0\0\x18ftyp" + brand + bytes(64), 10**6)


def tiff(samples: np.ndarray, **options) -> bytes:
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, samples, **options)
    return buffer.getvalue()


RNG = np.random.default_rng(11)
RGB16 = RNG.integers(0, 65536, (6, 7, 3), dtype=np.uint16)
GRAY_ALPHA8 = RNG.integers(0, 256, (6, 7, 2), dtype=np.uint8)
FLOAT_RGB = RNG.random((6, 7, 3), dtype=np.float32)
SIGNED = GRAY_ALPHA8[..., 0].astype(np.int16) * 128 - 2048  # a quarter of it below 0


def layout(samples, options, bits, levels, alpha=None, *, id: str):
    """A stored TIFF's samples and options, the page's bits, its levels and alpha as read."""
    return pytest.param(samples, options, bits, (np.asarray(levels, np.float64), alpha), id=id)


@pytest.mark.parametrize(
    "samples, options, bits, expected",
    [
        layout(FLOAT_RGB, {}, 16, np.round(FLOAT_RGB * 65535), id="float"),
        layout(FLOAT_RGB.astype(np.float64), {"compression": "zstd"}, 16,
               np.round(FLOAT_RGB * 65535), id="float64-zstd"),  # 8 bytes a sample
        layout(FLOAT_RGB * 255, {"compression": "zlib"}, 16, np.round(FLOAT_RGB * 65535),
               id="float-of-255-deflate"),
        layout(RGB16, {"compression": "zstd"}, 16, RGB16, id="16-bit-zstd"),  # OpenCV: no ZSTD
        layout(RGB16, {"compression": "lzma", "tile": (16, 16)}, 16, RGB16,
               id="16-bit-lzma-tiled"),
        layout(RGB16.astype(np.uint32), {}, 16, RGB16, id="32-bit-of-16-bit-values"),
        layout(GRAY_ALPHA8, {"planarconfig": "separate", "extrasamples": ["unassalpha"]}, 8,
               GRAY_ALPHA8[..., :1], GRAY_ALPHA8[..., 1], id="8-bit-gray-alpha-planes"),
        layout(SIGNED, {}, 16, np.round(np.maximum(SIGNED, 0) * (65535 / 32767)),
               id="signed-16-bit"),  # from 0 up, the negative ones black
        layout(RGB16[..., :2] >> 4, {"bitspersample": 12, "extrasamples": ["unassalpha"]}, 16,
               np.round((RGB16[..., 0] >> 4) * (65535 / 4095)),
               np.round((RGB16[..., 1] >> 4) * (65535 / 4095)).astype(np.uint16),
               id="12-bit-gray-alpha"),
        layout(GRAY_ALPHA8[..., :1].repeat(3, -1), {"compression": "lerc"}, 8,
               GRAY_ALPHA8[..., :1].repeat(3, -1), id="8-bit-lerc"),
    ],
)  # fmt: skip
def test_tiff_layouts_pillow_does_not_read_are_read_with_tifffile(
    samples: np.ndarray, options: dict, bits: int, expected: tuple
) -> None:
    """Samples Pillow has no mode for (floats, signed or 32-bit integers, gray with alpha in
    planes), compressions it or OpenCV lacks: each read to its level, at 8 bits where it was
    stored in 8, else 16; alpha at the colour's bits."""
    photometric = "rgb" if samples.ndim == 3 and samples.shape[-1] == 3 else "minisblack"
    stored = samples.transpose(2, 0, 1) if options.get("planarconfig") == "separate" else samples
    (page,) = picture_files.decode(tiff(stored, photometric=photometric, **options), 10**6).pages
    levels, alpha = expected
    assert page.bits == bits
    top = 65535 if bits == 16 else 255
    got = (page.rgb[0].numpy() * top).round().transpose(1, 2, 0)
    assert np.array_equal(got, np.asarray(levels, np.float64).reshape(got.shape))
    if alpha is None:
        assert page.alpha is None
    else:  # as stored, in its own bits (an 8-bit output keeps it to the bit)
        assert page.alpha.dtype == alpha.dtype and np.array_equal(page.alpha, alpha)


def test_a_tiff_read_with_tifffile_is_upright_and_its_float_gaps_black() -> None:
    """A float page turned by its orientation tag; a sample not a number, or infinite,
    black (a float page's [0, 1] or [0, 255] is told by its finite samples)."""
    stored = FLOAT_RGB.copy()
    stored[0, 0], stored[1, 1] = np.nan, np.inf
    data = tiff(stored, photometric="rgb", extratags=[(274, 3, 1, 6, True)])
    (page,) = picture_files.decode(data, 10**6).pages
    shown = np.rot90(stored, k=-1)  # orientation 6: a quarter clockwise
    got = page.rgb[0].numpy().transpose(1, 2, 0)
    assert got.shape == shown.shape and np.all(got[np.isfinite(shown)] >= 0)
    assert np.array_equal(got[~np.isfinite(shown)], np.zeros(6, np.float32))
    finite = np.isfinite(shown).all(-1)
    np.testing.assert_allclose(got[finite], shown[finite], atol=0.5 / 65535)


def test_a_multipage_tiff_with_a_page_pillow_cannot_decode_is_read_whole() -> None:
    """An 8-bit page Pillow reads, then a float page it does not: both pages, each at its
    own bits."""
    buffer = io.BytesIO()
    with tifffile.TiffWriter(buffer) as writer:
        writer.write(photo(6, 7), photometric="rgb")
        writer.write(FLOAT_RGB, photometric="rgb")
    first, second = picture_files.decode(buffer.getvalue(), 10**6).pages
    assert (first.bits, second.bits) == (8, 16)
    assert np.array_equal((first.rgb[0].numpy() * 255).round().transpose(1, 2, 0), photo(6, 7))
    np.testing.assert_allclose(second.rgb[0].numpy().transpose(1, 2, 0), FLOAT_RGB, atol=1e-5)


def test_tiffs_tifffile_reads_keep_the_limits_and_refusals() -> None:
    """The pixel limit, data cut short, a camera's raw file (its thumbnail is no picture of
    it) and a compression Pillow and tifffile lack: refused with their reasons."""
    data = tiff(FLOAT_RGB, photometric="rgb", compression="zlib")
    with pytest.raises(BadImage, match="image too large"):
        picture_files.decode(data, 6 * 7 - 1)
    with pytest.raises(BadImage, match="corrupt or truncated image"):
        picture_files.decode(data[: len(data) // 2], 10**6)
    dng = tiff(FLOAT_RGB, photometric="rgb", extratags=[(50706, 1, 4, b"\1\4\0\0", True)])
    with pytest.raises(BadImage, match=r"a TIFF \(or camera raw\) file of a kind"):
        picture_files.decode(dng, 10**6)
    ycbcr_16 = tiff(RGB16, photometric="rgb", compression="jpeg")  # stored as YCbCr
    with pytest.raises(BadImage, match=r"a TIFF \(or camera raw\) file of a kind"):
        picture_files.decode(ycbcr_16, 10**6)


def test_a_tiff_pixel_of_many_samples_counts_as_several_against_the_limit() -> None:
    """Extra samples (spot channels) beside gray: the page's memory is its samples', so a
    pixel counts once for every 8 bytes of them, and a small file of many planes is refused
    before they are decoded."""
    planes = np.zeros((50, 40, 64), np.uint8)  # 64 bytes a pixel: 8 pixels' worth
    data = tiff(planes, photometric="minisblack", extrasamples=[0] * 63, compression="zlib")
    assert len(data) < 10_000
    with pytest.raises(BadImage, match="image too large"):
        picture_files.decode(data, 50 * 40 * 8 - 1)
    (page,) = picture_files.decode(data, 50 * 40 * 8).pages
    assert page.rgb.shape == (1, 1, 50, 40) and page.alpha is None  # the spot channels: not


def test_float_and_32bit_tiffs_scale_colour_and_alpha_each_over_its_range() -> None:
    """Floats of 16-bit levels (as ImageJ keeps a 16-bit scan) with alpha in [0, 1], and
    32-bit colour of 16-bit values with 32-bit alpha: each read over its own range; 24-bit
    samples over their 24 bits."""
    levels = RGB16.astype(np.float32)
    floats = np.dstack([levels, np.full((6, 7), 1.0, np.float32)])
    (page,) = picture_files.decode(tiff(floats, photometric="rgb", extrasamples=[2]), 10**6).pages
    assert np.array_equal((page.rgb[0].numpy() * 65535).round().transpose(1, 2, 0), levels)
    assert np.array_equal(page.alpha, np.full((6, 7), 65535))
    wide = np.dstack([RGB16.astype(np.uint32), np.full((6, 7), 2**32 - 1, np.uint32)])
    (page,) = picture_files.decode(tiff(wide, photometric="rgb", extrasamples=[2]), 10**6).pages
    assert np.array_equal((page.rgb[0].numpy() * 65535).round().transpose(1, 2, 0), RGB16)
    assert np.array_equal(page.alpha, np.full((6, 7), 65535))
    deep = np.full((4, 5), 2**20, np.uint32)
    deep[0, 0] = 2**21
    (page,) = picture_files.decode(tiff(deep, bitspersample=24), 10**6).pages
    np.testing.assert_allclose(page.rgb[0, 0].numpy(), deep / (2**24 - 1), rtol=1e-4)


def test_a_metadata_tag_of_an_odd_type_is_left_out_not_the_picture() -> None:
    data = tiff(FLOAT_RGB, photometric="rgb", extratags=[(700, "h", 2, (-1, 5), True)])
    decoded = picture_files.decode(data, 10**6)
    assert decoded.meta.xmp is None and len(decoded.pages) == 1


def test_a_16bit_apngs_frames_are_each_read() -> None:
    """OpenCV reads a PNG's first picture only: an animated 16-bit PNG's frames are read by
    Pillow (at 8 bits, as the animation is written), each its own."""
    levels = (1000, 30000, 60000)
    chunks = [png_chunk(b"IHDR", struct.pack(">IIBBBBB", 10, 8, 16, 2, 0, 0, 0)),
              png_chunk(b"acTL", struct.pack(">II", 3, 0))]  # fmt: skip
    sequence = 0
    for index, level in enumerate(levels):
        control = struct.pack(">IIIIIHHBB", sequence, 10, 8, 0, 0, 100, 1000, 0, 0)
        chunks.append(png_chunk(b"fcTL", control))
        rows = b"".join(b"\0" + np.full((10, 3), level, ">u2").tobytes() for _ in range(8))
        if index:
            chunks.append(png_chunk(b"fdAT", struct.pack(">I", sequence + 1) + zlib.compress(rows)))
        else:
            chunks.append(png_chunk(b"IDAT", zlib.compress(rows)))
        sequence += 1 + (index > 0)
    data = b"\x89PNG\r\n\x1a\n" + b"".join(chunks) + png_chunk(b"IEND", b"")
    decoded = picture_files.decode(data, 10**6)
    assert decoded.frame_ms == [100, 100, 100] and decoded.loop == 0
    got = [round(float(page.rgb.mean()) * 255) for page in decoded.pages]
    assert got == [level >> 8 for level in levels]  # as Pillow takes 8 of 16 bits
    assert picture_files.output_format(decoded, "keep") == "PNG"


def animation(fmt: str, count: int, **options) -> bytes:
    rng = np.random.default_rng(2)
    frames = [Image.fromarray(rng.integers(0, 256, (40, 50, 3), np.uint8)) for _ in range(count)]
    buffer = io.BytesIO()
    frames[0].save(buffer, fmt, save_all=True, append_images=frames[1:], **options)
    return buffer.getvalue()


def test_an_animation_cut_short_keeps_the_frames_before_the_cut() -> None:
    """A GIF cut in its third frame (a partial download): the frames that read whole."""
    data = animation("GIF", 4, duration=100)
    first_of_third = len(animation("GIF", 2, duration=100)) - 1  # the trailer byte, 0x3B
    decoded = picture_files.decode(data[: first_of_third + 200], 10**6)
    assert len(decoded.pages) == 2 and decoded.frame_ms == [100, 100]
    whole = picture_files.decode(data, 10**6).pages
    for page, read in zip(decoded.pages, whole[:2], strict=True):  # the frames, as they are
        assert torch.equal(page.rgb, read.rgb)
    assert not torch.equal(whole[0].rgb, whole[1].rgb)
    with pytest.raises(BadImage, match="corrupt or truncated"):  # the first frame: no picture
        picture_files.decode(data[: len(animation("GIF", 1)) // 2], 10**6)


def test_an_apngs_default_image_stays_apart_from_its_frames() -> None:
    """An APNG whose default image (what a reader without APNG shows) is not a frame: kept as
    the default image of an APNG output, left out of a WebP one."""
    data = animation("PNG", 3, duration=[100, 200], default_image=True)  # the frames'
    decoded = picture_files.decode(data, 10**6)
    assert decoded.poster and len(decoded.pages) == 3 and decoded.frame_ms == [0, 100, 200]
    rgb = [(page.rgb[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8).copy()
           for page in decoded.pages]  # fmt: skip
    for fmt, frames in (("PNG", 3), ("WEBP", 2)):
        out = Image.open(io.BytesIO(picture_files.encode(rgb, decoded, fmt, "test", 90)))
        assert out.n_frames == frames and out.info.get("default_image", False) == (fmt == "PNG")
        for index, duration in ((frames - 2, 100), (frames - 1, 200)):
            out.seek(index)
            out.load()
            assert out.info["duration"] == duration


def test_float_samples_a_little_past_their_white_are_clipped_not_rescaled() -> None:
    """Resampling overshoots: a float page of 8-bit levels with a sample at 255.5, and one in
    [0, 1] with a sample at 1.001, keep their white (255, 1), the overshoot clipped."""
    levels = np.linspace(0, 255, 30, dtype=np.float32).reshape(5, 6)
    levels[0, 0] = 255.5
    (page,) = picture_files.decode(tiff(levels, photometric="minisblack"), 10**6).pages
    np.testing.assert_allclose(page.rgb[0, 0].numpy(), np.minimum(levels / 255, 1), atol=1e-5)
    unit = FLOAT_RGB.copy()
    unit[0, 0, 0] = 1.001
    (page,) = picture_files.decode(tiff(unit, photometric="rgb"), 10**6).pages
    got = page.rgb[0].numpy().transpose(1, 2, 0)
    np.testing.assert_allclose(got, np.minimum(unit, 1), atol=1e-5)


def test_a_still_gif_padded_with_zeros_is_read() -> None:
    """A still GIF whose trailer is lost under megabytes of zeros (disk recovery): its one
    page (the zeros left out, through which Pillow seeks a next frame a byte at a time)."""
    still = io.BytesIO()
    Image.fromarray(photo(20, 30)).convert("P").save(still, "GIF")
    data = still.getvalue()[:-1] + bytes(8 << 20)  # the trailer byte, 0x3B, gone
    (page,) = picture_files.decode(data, 10**6).pages
    (whole,) = picture_files.decode(still.getvalue(), 10**6).pages
    assert page.rgb.shape[-2:] == (20, 30) and torch.equal(page.rgb, whole.rgb)
    assert len(picture_files.decode(animation("GIF", 3) + bytes(5000), 10**6).pages) == 3


def test_a_tiff_cut_short_is_said_to_be() -> None:
    """A TIFF whose structure ends early (its directory written after the pixels, as
    libtiff writes compressed files) is refused as cut short, not as an unread kind."""
    buffer = io.BytesIO()
    Image.fromarray(photo(64, 64)).save(buffer, "TIFF", compression="tiff_lzw")
    with pytest.raises(BadImage, match="corrupt or truncated image"):
        picture_files.decode(buffer.getvalue()[:-20], 10**6)

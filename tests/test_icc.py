"""Colour management in colorize: pictures tagged with ICC profiles are read into sRGB and
written back into their profile. The oracle is the colour science itself (primaries and
white point -> RGB-to-XYZ matrices, power-law curves), not LittleCMS, which the job uses."""

from __future__ import annotations

import io
import struct

import imagecodecs
import numpy as np
import pytest
import torch
from PIL import Image

from jobs import colorize, icc, picture_files
from jobs.colorize_jpeg import eligible
from jobs.images import open_image
from tests.support import photo_rgb

D65 = (0.3127, 0.3290)
SRGB_PRIMARIES = (0.64, 0.33, 0.30, 0.60, 0.15, 0.06)
WIDE_PRIMARIES = (0.64, 0.33, 0.21, 0.71, 0.15, 0.06)  # Adobe RGB's: greens beyond sRGB
GAMMA = 1.8  # the curve of ProPhoto and of old Macs' gray, far from sRGB's
WIDE = imagecodecs.cms_profile("rgb", primaries=WIDE_PRIMARIES, whitepoint=D65, gamma=GAMMA)
GRAY = imagecodecs.cms_profile("gray", gamma=GAMMA)
SRGB = imagecodecs.cms_profile("srgb")


def rgb_to_xyz(primaries, white) -> np.ndarray:
    """The matrix from linear RGB to XYZ of a space with these (x, y) primaries and white."""
    x, y = np.array(primaries).reshape(3, 2).T
    columns = np.stack([x / y, np.ones(3), (1 - x - y) / y])
    white_xyz = np.array([white[0] / white[1], 1.0, (1 - white[0] - white[1]) / white[1]])
    return columns * np.linalg.solve(columns, white_xyz)


def srgb_encode(linear: np.ndarray) -> np.ndarray:
    linear = np.clip(linear, 0, 1)
    return np.where(linear <= 0.0031308, 12.92 * linear, 1.055 * linear ** (1 / 2.4) - 0.055)


def srgb_decode(encoded: np.ndarray) -> np.ndarray:
    return np.where(encoded <= 0.04045, encoded / 12.92, ((encoded + 0.055) / 1.055) ** 2.4)


WIDE_TO_SRGB = np.linalg.solve(rgb_to_xyz(SRGB_PRIMARIES, D65), rgb_to_xyz(WIDE_PRIMARIES, D65))


def wide_to_srgb(wide_HW3: np.ndarray) -> np.ndarray:
    """Pixels in [0, 1] of the wide space -> sRGB in [0, 1] (out of gamut clipped)."""
    return srgb_encode(wide_HW3**GAMMA @ WIDE_TO_SRGB.T)


def srgb_to_wide(srgb_HW3: np.ndarray) -> np.ndarray:
    return np.clip(srgb_decode(srgb_HW3) @ np.linalg.inv(WIDE_TO_SRGB).T, 0, 1) ** (1 / GAMMA)


def save(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def singular(profile: bytes) -> bytes:
    """`profile` with its green and blue colorants made its red's: it still converts into
    sRGB, but sRGB cannot be converted into it (its matrix has no inverse), as with a
    scanner's input-only profile."""
    data = bytearray(profile)
    count = struct.unpack(">I", data[128:132])[0]
    entries = [struct.unpack(">4sII", data[132 + 12 * i : 144 + 12 * i]) for i in range(count)]
    tags = {signature: (at, size) for signature, at, size in entries}
    start, size = tags[b"rXYZ"]
    for tag in (b"gXYZ", b"bXYZ"):
        at, _ = tags[tag]
        data[at : at + size] = data[start : start + size]
    return bytes(data)


@pytest.fixture(params=["shaper", "littlecms"])
def conversion(request, monkeypatch) -> str:
    """Each test of RGB conversions runs twice: through a matrix profile's measured curves
    (`icc.Shaper`), and through LittleCMS alone, the way of profiles of other kinds."""
    if request.param == "littlecms":
        monkeypatch.setattr(icc, "_shaper", lambda profile: None)
    return request.param


def s15(value: float) -> bytes:
    return struct.pack(">i", round(value * 65536))


# sRGB's red, green and blue in XYZ, adapted to D50 as LittleCMS's sRGB profile has them
SRGB_COLORANTS = np.array([[0.4360, 0.2225, 0.0139], [0.3851, 0.7169, 0.0971],
                           [0.1431, 0.0606, 0.7141]])  # fmt: skip


def table_profile(space: bytes, device: bytes, corners: np.ndarray, gamma: float = 1.0) -> bytes:
    """An ICC v2 profile made of one table, A2B0 (lut16: a `gamma` curve a channel, then a
    grid of two points a channel into XYZ, `corners` (2, ..., 2, 3) with the first channel
    slowest), and no table out of XYZ: LittleCMS converts from it but not into it."""
    channels = corners.ndim - 1
    curve = np.round((np.arange(256) / 255) ** gamma * 65535).astype(">u2").tobytes()
    lut = b"mft2" + bytes(4) + bytes([channels, 3, 2, 0])
    lut += b"".join(s15(float(i == j)) for i in range(3) for j in range(3))  # identity
    lut += struct.pack(">HH", 256, 2) + curve * channels
    lut += np.round(corners.reshape(-1, 3) * 32768).astype(">u2").tobytes()  # u1Fixed15
    lut += struct.pack(">2H", 0, 65535) * 3
    white = b"XYZ " + bytes(4) + s15(0.9642) + s15(1.0) + s15(0.8249)
    text = b"desc" + bytes(4) + struct.pack(">I", 5) + b"test\0" + bytes(4 + 2 + 1 + 67)
    tags = [(b"desc", text), (b"wtpt", white), (b"A2B0", lut)]
    table, body, at = b"", b"", 128 + 4 + 12 * len(tags)
    for signature, data in tags:
        data += bytes(-len(data) % 4)
        table += signature + struct.pack(">II", at + len(body), len(data))
        body += data
    header = struct.pack(">I", at + len(body)) + bytes(4) + bytes([2, 0x10, 0, 0])
    header += device + space + b"XYZ " + bytes(12) + b"acsp" + bytes(24) + bytes(4)
    header += s15(0.9642) + s15(1.0) + s15(0.8249)
    header += bytes(128 - len(header))
    return header + struct.pack(">I", len(tags)) + table + body


def input_only(gamma: float = 2.2) -> bytes:
    """A scanner's profile of one table with no way back, as many calibrated scanners'
    are: its grid holds the sums of sRGB's colorants, so it describes sRGB's primaries with
    a plain `gamma` curve."""
    corners = np.array(list(np.ndindex(2, 2, 2)), float) @ SRGB_COLORANTS
    return table_profile(b"RGB ", b"scnr", corners.reshape(2, 2, 2, 3), gamma)


def ink() -> bytes:
    """A printer's CMYK profile of one table: each ink takes half of its channel of sRGB's
    linear light away, and black half of every channel's, (1 - C) / 2 + (1 - K) / 2 of red
    and so on (linear in the inks: LittleCMS's interpolation of four inputs, tetrahedral in
    three of them, is exact only for such a grid)."""
    inks = np.array(list(np.ndindex(2, 2, 2, 2)), float)
    light = (1 - inks[:, :3]) / 2 + (1 - inks[:, 3:]) / 2
    return table_profile(b"CMYK", b"prtr", (light @ SRGB_COLORANTS).reshape(2, 2, 2, 2, 3))


def planes_HW3(page: picture_files.Page) -> np.ndarray:
    return page.rgb[0].permute(1, 2, 0).double().numpy()


def test_profiles_are_told_apart_and_srgb_ones_passed_over() -> None:
    from PIL import ImageCms

    pillow_srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    for same in (SRGB, pillow_srgb):
        assert icc.read(same) == icc.Profile(3, converts=False, reversible=True)
        assert icc.output_profile(same) == same
    assert icc.read(WIDE) == icc.Profile(3, converts=True, reversible=True)
    assert icc.read(imagecodecs.cms_profile("adobergb")).converts
    assert icc.read(GRAY) == icc.Profile(1, converts=True, reversible=True)
    assert icc.output_profile(GRAY) is None  # a gray profile describes no colour output
    assert icc.read(imagecodecs.cms_profile("gray", gamma=2.2)).converts  # not sRGB's curve
    broken = WIDE[:16] + b"RGB " + bytes(200)
    for unusable in (None, b"", broken, WIDE[:300]):
        assert icc.read(unusable) == icc.Profile(0, converts=False, reversible=False)
        assert icc.output_profile(unusable) is None
    one_way = singular(WIDE)
    assert icc.read(one_way) == icc.Profile(3, converts=True, reversible=False)
    assert icc.output_profile(one_way) is None


def test_a_profile_is_measured_once_and_kept_by_its_digest(monkeypatch) -> None:
    """Each picture brings its profile as bytes of its own (a PNG's may be 16 MB): the
    findings are kept by the profile's SHA-256, for the profiles used last."""
    calls = []
    transform = icc._transform
    monkeypatch.setattr(icc, "_transform", lambda *a, **k: calls.append(1) or transform(*a, **k))
    icc.read.cache_clear()
    for _ in range(3):
        assert icc.read(bytes(WIDE)) == icc.Profile(3, converts=True, reversible=True)
    assert len(calls) == 2  # into sRGB and back, once
    made = []
    cache = icc.ProfileCache(2)
    for profile in (b"a", b"b", b"a", b"c", b"b", None, None):
        assert cache.get(profile, lambda p: made.append(p) or len(made)) >= 1
    assert made == [b"a", b"b", b"c", b"b", None]  # b went as c came (a was used after it)


@pytest.mark.parametrize("kind", ["png8", "png16", "tiff8", "jpeg_rgb_profile_on_gray"])
def test_tagged_colour_pictures_are_read_into_srgb(kind: str, conversion: str) -> None:
    wide = photo_rgb("coffee", 40).astype(np.float64) / 255
    if kind == "png16":  # the 16-bit colour path (OpenCV), profile from the iCCP chunk
        pixels16 = np.round(wide * 65535).astype(np.uint16)
        meta = picture_files.Metadata(icc=WIDE)
        data = picture_files.encode_png16(pixels16, meta, b"", "test")
    elif kind == "jpeg_rgb_profile_on_gray":  # an RGB profile does not fit gray pixels
        data = save(Image.fromarray(np.uint8(wide[..., 1] * 255)), "JPEG", icc_profile=WIDE)
    else:
        fmt = "PNG" if kind == "png8" else "TIFF"
        data = save(Image.fromarray(np.uint8(np.round(wide * 255))), fmt, icc_profile=WIDE)
    decoded = picture_files.decode(data, 10**6)
    page = decoded.pages[0]
    if kind == "jpeg_rgb_profile_on_gray":
        stored = np.asarray(Image.open(io.BytesIO(data)), np.float64) / 255
        assert page.rgb.shape[1] == 1 and decoded.meta.icc is None
        np.testing.assert_allclose(page.rgb[0, 0].double().numpy(), stored, atol=1e-6)
        return
    stored = wide if kind == "png16" else np.round(wide * 255) / 255
    assert decoded.meta.icc == WIDE  # carried to the output
    np.testing.assert_allclose(planes_HW3(page), wide_to_srgb(stored), atol=2.5e-3)
    assert np.abs(planes_HW3(page) - stored).max() > 0.05  # read as sRGB, they would be off


@pytest.mark.parametrize("kind", ["L", "LA", "I;16", "tiff16_gray_alpha"])
def test_tagged_gray_pictures_are_read_into_srgb_gray(kind: str) -> None:
    ramp = np.linspace(0, 1, 32 * 24).reshape(24, 32)
    if kind == "tiff16_gray_alpha":  # read with tifffile: the profile from its tag
        import tifffile

        buffer = io.BytesIO()
        pixels = np.dstack([np.round(ramp * 65535), np.full(ramp.shape, 65535)]).astype(np.uint16)
        tifffile.imwrite(buffer, pixels, photometric="minisblack", extrasamples=["unassalpha"],
                         extratags=[(34675, "B", len(GRAY), GRAY, True)])  # fmt: skip
        data, stored = buffer.getvalue(), np.round(ramp * 65535) / 65535
    elif kind == "I;16":
        stored = np.round(ramp * 65535) / 65535
        image = Image.fromarray((stored * 65535).astype(np.uint16))
        data = save(image, "PNG", icc_profile=GRAY)
    else:
        stored = np.round(ramp * 255) / 255
        image = Image.fromarray(np.uint8(stored * 255))
        if kind == "LA":
            image.putalpha(200)
        data = save(image, "PNG", icc_profile=GRAY)
    decoded = picture_files.decode(data, 10**6)
    page = decoded.pages[0]
    assert page.rgb.shape[:2] == (1, 1) and decoded.meta.icc is None  # the output is sRGB
    assert (page.alpha is not None) == (kind in ("LA", "tiff16_gray_alpha"))
    expected = srgb_encode(stored**GAMMA)
    np.testing.assert_allclose(page.rgb[0, 0].double().numpy(), expected, atol=2e-3)


def test_outputs_are_written_in_the_profile_they_carry(conversion: str) -> None:
    """sRGB pixels handed to `encode` come out in the source's profile (8 and 16 bits), or as
    they are where the profile is sRGB's or cannot be written into."""
    srgb = photo_rgb("chelsea", 24).astype(np.float64) / 255
    srgb16 = np.round(srgb * 65535).astype(np.uint16)
    for bits, fmt in ((8, "PNG"), (16, "PNG16"), (16, "TIFF16"), (8, "TIFF")):
        source = np.zeros((24, 24, 3), np.uint16 if bits == 16 else np.uint8)
        if bits == 16:
            data = picture_files.encode_png16(source, picture_files.Metadata(icc=WIDE), b"", "t")
        else:
            data = save(Image.fromarray(source), "PNG", icc_profile=WIDE)
        decoded = picture_files.decode(data, 10**6)
        pixels, profile = written(picture_files.encode([srgb16.copy()], decoded, fmt, "t", 95))
        assert profile == WIDE and pixels.shape == (24, 24, 3), fmt
        np.testing.assert_allclose(
            wide_to_srgb(pixels), srgb, atol=1.5 / 255 if bits == 8 else 1e-3
        )
    for source in (SRGB, singular(WIDE)):
        data = save(Image.new("RGB", (24, 24)), "PNG", icc_profile=source)
        decoded = picture_files.decode(data, 10**6)
        pixels, profile = written(picture_files.encode([srgb16.copy()], decoded, "PNG", "t", 95))
        assert profile == (SRGB if source == SRGB else None)
        assert np.array_equal(np.round(pixels * 255), np.round(srgb16 / 257))


def written(data: bytes) -> tuple[np.ndarray, bytes | None]:
    """(RGB pixels in [0, 1], ICC profile) of a PNG or TIFF of 8 or 16 bits."""
    import tifffile

    profile = Image.open(io.BytesIO(data)).info.get("icc_profile")
    if data.startswith(b"\x89PNG"):
        import cv2

        pixels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)[..., ::-1]
    else:
        pixels = tifffile.imread(io.BytesIO(data))
    return pixels / (65535.0 if pixels.dtype == np.uint16 else 255.0), profile


def test_a_picture_colorizes_the_same_whatever_space_it_is_stored_in() -> None:
    """One photo stored as sRGB and stored in a wide-gamut space with its profile: the
    network sees the same L, and the outputs, each read through the profile it carries,
    show the same colours."""
    cfg = colorize.ColorizeConfig(input="/in", output="/out", model="/m.pt", infer_px=32)
    srgb = photo_rgb("astronaut", 48).astype(np.float64) / 255
    as_srgb = save(Image.fromarray(np.uint8(np.round(srgb * 255))), "PNG")
    wide16 = np.round(srgb_to_wide(srgb) * 65535).astype(np.uint16)
    in_wide = picture_files.encode_png16(wide16, picture_files.Metadata(icc=WIDE), b"", "t")
    rows = [{"status": "pending", "data": data} for data in (as_srgb, in_wide)]
    l_small = [np.frombuffer(colorize.prepare_row(row, cfg)["l_small"], np.float32) for row in rows]
    np.testing.assert_allclose(l_small[0], l_small[1], atol=0.15)  # L in 0-100
    ab = torch.linspace(-40, 40, 2 * 8 * 8).reshape(1, 2, 8, 8).numpy().tobytes()
    (plain, none), (tagged, profile) = (
        written(colorize.colorize_file(data, ab, cfg, "t")[0]) for data in (as_srgb, in_wide)
    )
    assert none is None and profile == WIDE
    np.testing.assert_allclose(wide_to_srgb(tagged), plain, atol=2.5 / 255)


def test_jpegs_take_the_device_path_where_it_converts_their_space() -> None:
    """sRGB and matrix profiles (converted there and back) go to the device; a profile of
    tables, which LittleCMS alone converts, and one nothing converts into, do not."""
    rgb = Image.fromarray(photo_rgb("coffee", 16))
    cases = ((None, True), (SRGB, True), (WIDE, True), (input_only(), False))
    for profile, device in cases:
        data = save(rgb, "JPEG", **({"icc_profile": profile} if profile else {}))
        assert eligible(data, open_image(data, max_pixels=10**6)) is device


def test_matrix_profiles_are_measured_and_others_left_to_littlecms() -> None:
    """Adobe RGB and the wide test space are a curve a channel and a matrix: converted
    through their measured curves. A profile whose curve dips is not (it has no inverse):
    LittleCMS converts it, as the colour science says."""
    assert icc._shaper(WIDE) is not None
    assert icc._shaper(imagecodecs.cms_profile("adobergb")) is not None
    curve = np.linspace(0, 1, 256) ** GAMMA
    curve[100:110] = curve[100] - 0.01
    table = np.round(curve.clip(0, 1) * 65535).astype(np.uint16)
    dipping = imagecodecs.cms_profile(
        "rgb", primaries=WIDE_PRIMARIES, whitepoint=D65, transferfunction=table
    )
    assert icc._shaper(dipping) is None and icc.converts(dipping)
    pixels = (np.random.default_rng(3).random((16, 20, 3)) * 65535).astype(np.uint16)
    light = np.interp(pixels / 65535, np.linspace(0, 1, 256), table / 65535)
    expected = srgb_encode(light @ WIDE_TO_SRGB.T)
    got = icc.to_srgb(pixels, dipping).transpose(1, 2, 0)
    np.testing.assert_allclose(got, expected, atol=1e-3)


def test_an_input_only_profile_is_read_from_and_not_carried() -> None:
    """A scanner's table profile converts into sRGB but nothing converts into it: the picture
    is read through it (as the colour science says it should be), and its output is sRGB,
    carrying no profile, where before such a file failed as corrupt."""
    scanner = input_only()
    assert icc.read(scanner) == icc.Profile(3, converts=True, reversible=False)
    assert icc.output_profile(scanner) is None
    ramp = np.linspace(0, 255, 24 * 32).reshape(24, 32).round().astype(np.uint8)
    stored = np.dstack([ramp, ramp[::-1], ramp.T.reshape(24, 32)])
    data = save(Image.fromarray(stored), "PNG", icc_profile=scanner)
    decoded = picture_files.decode(data, 10**6)
    assert decoded.meta.icc is None
    expected = srgb_encode((stored / 255) ** 2.2)
    np.testing.assert_allclose(planes_HW3(decoded.pages[0]), expected, atol=2e-3)
    srgb16 = np.full((24, 32, 3), 30000, np.uint16)
    pixels, profile = written(picture_files.encode([srgb16], decoded, "PNG", "t", 95))
    assert profile is None and np.array_equal(np.round(pixels * 255), np.round(srgb16 / 257))


def test_a_profile_tag_that_holds_a_number_is_no_profile() -> None:
    """A TIFF whose ICC tag is a LONG decodes as sRGB, and its number (4 GB) is not taken
    for the size of a profile to make."""
    import tracemalloc

    import tifffile

    buffer = io.BytesIO()
    tifffile.imwrite(buffer, np.full((4, 4, 3), 90, np.uint8), photometric="rgb",
                     extratags=[(34675, "I", 1, 0xFFFFFFF0, True)])  # fmt: skip
    tracemalloc.start()
    try:
        decoded = picture_files.decode(buffer.getvalue(), 10**6)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert decoded.meta.icc is None and peak < 2**26
    np.testing.assert_allclose(planes_HW3(decoded.pages[0]), 90 / 255, atol=1e-7)


def test_a_profile_of_another_space_than_the_pixels_keeps_no_jpeg_off_the_device() -> None:
    """A gray JPEG tagged with an RGB profile is read as sRGB on either path (the profile
    does not describe it), so it may take the device path."""
    gray = Image.fromarray(photo_rgb("coffee", 16)[..., 0])
    data = save(gray, "JPEG", icc_profile=WIDE)
    assert eligible(data, open_image(data, max_pixels=10**6))


def test_a_jpeg_of_two_frame_headers_keeps_off_the_device() -> None:
    """Pillow takes a JPEG's last frame header, nvJPEG (and `jpeg_size`) the first: a file
    whose first claims 60000 x 60000 passes the pixel limit by the last, and would cost the
    device what the first claims. It goes to the CPU path, which refuses it."""
    data = save(Image.fromarray(photo_rgb("coffee", 16)), "JPEG")
    image = open_image(data, max_pixels=10**6)
    assert eligible(data, image)
    sof = b"\xff\xc0\x00\x11\x08" + struct.pack(">HH", 60000, 60000) + b"\x03\x01\x22\x00"
    forged = data[:2] + sof + b"\x02\x11\x01\x03\x11\x01" + data[2:]
    image = open_image(forged, max_pixels=10**6)
    assert image.size == (16, 16) and not eligible(forged, image)


@pytest.mark.parametrize("bits", [8, 16])
def test_cmyk_pictures_are_read_through_their_profile(bits: int) -> None:
    """A CMYK TIFF (8 bits through Pillow, 16 through tifffile) with a CMYK profile: its
    inks go through the profile, where without one they take Pillow's plain conversion."""
    import tifffile

    rng = np.random.default_rng(5)
    inks = rng.integers(0, 256, (12, 16, 4)).astype(np.uint8)
    stored = inks if bits == 8 else inks.astype(np.uint16) * 257
    pages = {}
    for profile in (ink(), None):
        buffer = io.BytesIO()
        extra = [(34675, "B", len(profile), profile, True)] if profile else []
        tifffile.imwrite(buffer, stored, photometric="separated", extratags=extra)
        decoded = picture_files.decode(buffer.getvalue(), 10**6)
        assert decoded.meta.icc is None and decoded.pages[0].bits == bits
        pages[profile is not None] = planes_HW3(decoded.pages[0])
    light = (1 - inks[..., :3] / 255) / 2 + (1 - inks[..., 3:] / 255) / 2
    np.testing.assert_allclose(pages[True], srgb_encode(light), atol=2e-3)
    plain = (1 - inks[..., :3] / 255) * (1 - inks[..., 3:] / 255)
    np.testing.assert_allclose(pages[False], plain, atol=1 / 255)  # Pillow's, for want of one


def dcf_exif(colour_space: int, interop_index: bytes) -> bytes:
    """An EXIF block (little-endian TIFF) holding the colour space tag and an Interop IFD
    with its index, as cameras write them (Pillow writes no Interop IFD of its own)."""

    def entry(tag: int, kind: int, count: int, value: bytes) -> bytes:
        return struct.pack("<HHI", tag, kind, count) + value

    tiff = b"II*\0" + struct.pack("<I", 8)  # IFD0 at 8, the Exif IFD at 26, Interop at 56
    tiff += struct.pack("<H", 1) + entry(0x8769, 4, 1, struct.pack("<I", 26)) + bytes(4)
    tiff += struct.pack("<H", 2) + entry(0xA001, 3, 1, struct.pack("<HH", colour_space, 0))
    tiff += entry(0xA005, 4, 1, struct.pack("<I", 56)) + bytes(4)
    tiff += struct.pack("<H", 1) + entry(0x0001, 2, 4, interop_index + b"\0") + bytes(4)
    return b"Exif\0\0" + tiff


@pytest.mark.parametrize(
    ("colour_space", "index", "adobe"),
    [(0xFFFF, b"R03", True), (2, b"R98", True), (1, b"R98", False), (0xFFFF, b"THM", False)],
)
def test_a_picture_whose_exif_says_adobe_rgb_is_read_as_adobe_rgb(
    colour_space: int, index: bytes, adobe: bool
) -> None:
    """A camera picture with no profile, but EXIF colour space "uncalibrated" with the DCF
    index R03 (or 2, as some cameras write): read as Adobe RGB, whose profile the output
    then carries."""
    stored = photo_rgb("chelsea", 32)
    data = save(Image.fromarray(stored), "PNG", exif=dcf_exif(colour_space, index))
    decoded = picture_files.decode(data, 10**6)
    assert decoded.meta.icc == (icc.adobe_rgb() if adobe else None)
    adobe_to_srgb = np.linalg.solve(
        rgb_to_xyz(SRGB_PRIMARIES, D65), rgb_to_xyz(WIDE_PRIMARIES, D65)
    )
    light = (stored / 255) ** (563 / 256) @ adobe_to_srgb.T
    expected = srgb_encode(light) if adobe else stored / 255
    np.testing.assert_allclose(planes_HW3(decoded.pages[0]), expected, atol=2.5e-3)

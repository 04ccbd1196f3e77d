"""ICC colour management for the colorize job.

The network's L and the colours it predicts are sRGB's (`colorcore.color`). A picture whose
ICC profile states another RGB space (Adobe RGB, ProPhoto, a scanner's own) or a gray one
(Dot Gain 20%, Gray Gamma 1.8) is converted into sRGB as it is decoded (`to_srgb`), so its L
is the L a colour-managed viewer shows. An RGB picture's colorized output is converted back
into its profile, which the output carries (`from_srgb`); a gray picture's output is sRGB,
as its gray profile cannot describe colour.

Profiles that describe sRGB itself, which many files carry, cost nothing: `read` converts a
grid of colours through each profile once and passes over those that leave them as they
are. Conversions are LittleCMS's (imagecodecs), relative colorimetric with black point
compensation, at 16 bits, unoptimised: LittleCMS's optimised 16-bit transforms are off by up
to 5% of the range in the shadows of a gamma-1.8 space. A gray picture is converted through
a table of its profile's 65,536 levels, made once; an RGB picture costs about 0.15 s a
megapixel each way on one core. Colours outside the target's gamut are clipped to it. A profile
LittleCMS cannot read, or of a colour space the pixels are not in (a CMYK profile among
them: CMYK pictures keep the plain conversion of `jobs.picture_files`), is passed over:
the pixels are read as sRGB, as those of a file without a profile, and the output carries
no profile.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np

_CHANNELS = {b"GRAY": 1, b"RGB ": 3}  # ICC colour space (header bytes 16-20) -> channels
_SPACE_NAMES = {1: "gray", 3: "rgb"}
_SRGB_TOLERANCE = 128  # 16-bit levels (half an 8-bit one) from sRGB that count as sRGB
_BAND_PX = 1 << 20  # pixels converted at a time: the 16-bit copies stay a few MB
_RELATIVE_COLORIMETRIC = 1


class Profile(NamedTuple):
    channels: int  # of the pixels it describes: 1 (gray) or 3 (RGB); 0 where it serves none
    converts: bool  # False for a profile of sRGB (or of gray with sRGB's curve)
    reversible: bool  # sRGB converts into it (an input-only scanner profile may not)


_UNUSABLE = Profile(0, False, False)


@functools.cache
def _srgb() -> bytes:
    import imagecodecs

    return imagecodecs.cms_profile("srgb")


def _transform(pixels: np.ndarray, source: bytes, target: bytes, dtype=np.uint16) -> np.ndarray:
    """`pixels` ((H, W) gray or (H, W, 3) RGB, uint8 or uint16) from one profile's space into
    the other's, as `dtype`."""
    import imagecodecs

    spaces = [_SPACE_NAMES[_CHANNELS[p[16:20]]] for p in (source, target)]
    flags = imagecodecs.CMS.FLAGS
    return imagecodecs.cms_transform(
        np.ascontiguousarray(pixels),
        source,
        target,
        colorspace=spaces[0],
        outcolorspace=spaces[1],
        outdtype=dtype,
        intent=_RELATIVE_COLORIMETRIC,
        flags=flags.BLACKPOINTCOMPENSATION | flags.NOOPTIMIZE,
    )


@functools.lru_cache(maxsize=16)
def _gray_table(icc: bytes) -> np.ndarray:
    """sRGB gray in [0, 1] (float32) of each of a gray profile's 65,536 16-bit levels."""
    levels = np.arange(65536, dtype=np.uint16)[None]
    return _transform(levels, icc, _srgb(), np.float32)[0, :, 1].clip(0, 1)


@functools.lru_cache(maxsize=64)
def read(icc: bytes | None) -> Profile:
    """What an ICC profile does to pixels, found by converting a grid of 16-bit colours into
    sRGB (and back) once a process."""
    import imagecodecs

    channels = _CHANNELS.get(icc[16:20] if icc else b"", 0)
    if not channels:
        return _UNUSABLE
    levels = np.linspace(0, 65535, 9 if channels == 3 else 257).round().astype(np.uint16)
    if channels == 3:
        grid = np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), -1).reshape(1, -1, 3)
    else:
        grid = levels[None]
    try:
        srgb = _transform(grid, icc, _srgb())
    except (imagecodecs.CmsError, ValueError):  # not a profile LittleCMS reads as input
        return _UNUSABLE
    as_srgb = grid[..., None] if channels == 1 else grid
    converts = bool(np.abs(srgb.astype(np.int32) - as_srgb).max() > _SRGB_TOLERANCE)
    try:
        _transform(srgb[:, :1], _srgb(), icc)
    except (imagecodecs.CmsError, ValueError):
        return Profile(channels, converts, reversible=False)
    return Profile(channels, converts, reversible=True)


def converts(icc: bytes | None) -> bool:
    """Whether pixels in `icc`'s space differ from sRGB's: False without a usable profile."""
    return read(icc).converts


def output_profile(icc: bytes | None) -> bytes | None:
    """The profile an output carries for a source's `icc`: an RGB profile the output's
    colours can be converted into; None (sRGB) for any other."""
    profile = read(icc)
    return icc if profile.channels == 3 and profile.reversible else None


def to_srgb(pixels: np.ndarray, icc: bytes | None) -> np.ndarray | None:
    """uint8 or uint16 pixels (H, W, C) in the space of `icc`, C = 1 (gray) or 3 (RGB) ->
    sRGB float32 planes (C, H, W) in [0, 1] (a gray stays gray: relative colorimetric maps
    white to white, so R = G = B to within a 16-bit level, and G is kept); None where nothing
    is to be converted: no profile, sRGB's, one of C other than the pixels', or one that
    does not read."""
    profile = read(icc)
    h, w, c = pixels.shape
    if profile.channels != c or not profile.converts:
        return None
    if c == 1:
        levels = pixels[..., 0] if pixels.dtype == np.uint16 else pixels[..., 0] * np.uint16(257)
        return _gray_table(icc)[levels][None]
    planes_CHW = np.empty((c, h, w), np.float32)
    rows = max(1, _BAND_PX // max(w, 1))
    for r in range(0, h, rows):
        band_HW3 = _transform(pixels[r : r + rows], icc, _srgb())
        planes_CHW[:, r : r + rows] = band_HW3.transpose(2, 0, 1)
    planes_CHW /= 65535.0
    return planes_CHW


def from_srgb(pixels_HW3: np.ndarray, icc: bytes | None) -> np.ndarray:
    """sRGB pixels (H, W, 3, uint8 or uint16) in the space of the RGB profile `icc`, in
    place, where `output_profile` keeps it and it is not sRGB's; as they are otherwise."""
    profile = read(icc)
    if output_profile(icc) is None or not profile.converts:
        return pixels_HW3
    rows = max(1, _BAND_PX // max(pixels_HW3.shape[1], 1))
    for r in range(0, pixels_HW3.shape[0], rows):
        band = pixels_HW3[r : r + rows]
        band[...] = _transform(band, _srgb(), icc, pixels_HW3.dtype)
    return pixels_HW3

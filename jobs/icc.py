"""ICC colour management for the colorize job.

The network's L and the colours it predicts are sRGB's (`colorcore.color`). A picture whose
ICC profile states another RGB space (Adobe RGB, ProPhoto, a scanner's own), a gray one
(Dot Gain 20%, Gray Gamma 1.8) or CMYK inks (a printer's) is converted into sRGB as it is
decoded (`to_srgb`), so its L is the L a colour-managed viewer shows; so is a camera's
picture whose EXIF says Adobe RGB (`adobe_rgb`). An RGB picture's colorized output is
converted back into its profile, which the output carries (`from_srgb`); a gray or CMYK
picture's output is sRGB.

Profiles that describe sRGB itself, which many files carry, cost nothing: `read` converts a
grid of colours through each profile once and passes over those that leave them as they
are. Conversions are LittleCMS's (imagecodecs), relative colorimetric with black point
compensation, unoptimised: its optimised 16-bit transforms are off by up to 7% of the range
in the shadows of a gamma-1.8 space. A gray picture goes through a table of its profile's
65,536 levels, made once. So does an RGB picture whose profile is a curve for each channel
then a matrix (Adobe RGB, ProPhoto, Display P3, most cameras' and scanners' profiles):
`Shaper` measures its curves and matrix through LittleCMS, and is used only where it
converts a grid of colours both ways as LittleCMS does (within 8 16-bit levels). The CPU
steps of colorizing a 1024 x 768 JPEG in Adobe RGB then take 2.1x those of one in sRGB,
against 7x through LittleCMS alone (`bench/icc.py`), which is left to profiles of other
kinds (tables of colours). The GPU path converts JPEGs of gray and matrix profiles on the
device with the same tables (`lookup`).

Colours outside the target's gamut are clipped to it. A profile LittleCMS cannot read, or of
a colour space the pixels are not in, is passed over: the pixels are read as a file's
without a profile are (sRGB; CMYK by Pillow's plain conversion), and the output carries no
profile.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import threading
from collections.abc import Callable, Iterator
from typing import Generic, NamedTuple, TypeVar

import numpy as np
import torch

from colorcore.color import linear_to_srgb, srgb_to_linear
from jobs.images import as_8bit, as_16bit

_CHANNELS = {b"GRAY": 1, b"RGB ": 3, b"CMYK": 4}  # ICC colour space (header 16-20) -> channels
_SPACES = {b"GRAY": "gray", b"RGB ": "rgb", b"CMYK": "cmyk", b"XYZ ": "xyz"}  # as imagecodecs
_SRGB_TOLERANCE = 128  # 16-bit levels (half an 8-bit one) from sRGB that count as sRGB
_BAND_PX = 1 << 20  # pixels converted at a time: the 16-bit copies stay a few MB
_RELATIVE_COLORIMETRIC = 1
_SHAPER_TOLERANCE = 8  # 16-bit levels (1/32 of an 8-bit one) from LittleCMS's conversion
_INVERSE_STEPS = 1 << 18  # of a `Shaper`'s inverse curves, evenly spaced in sqrt(light)


class Profile(NamedTuple):
    channels: int  # of the pixels it describes: 1 (gray), 3 (RGB), 4 (CMYK); 0: it serves none
    converts: bool  # False for a profile of sRGB (or of gray with sRGB's curve)
    reversible: bool  # sRGB converts into it (an input-only scanner profile may not)


_UNUSABLE = Profile(0, False, False)
T = TypeVar("T")


@functools.cache
def _srgb() -> bytes:
    import imagecodecs

    return imagecodecs.cms_profile("srgb")


@functools.cache
def adobe_rgb() -> bytes:
    """An Adobe RGB (1998) profile (LittleCMS's), for pictures whose EXIF says they are in
    it without carrying a profile (`jobs.picture_files.page_profile`)."""
    import imagecodecs

    return imagecodecs.cms_profile("adobergb")


def _transform(pixels: np.ndarray, source: bytes, target: bytes, dtype=np.uint16) -> np.ndarray:
    """`pixels` ((H, W) gray, or (H, W, C) RGB, CMYK or XYZ, uint8 or uint16) from one
    profile's space into the other's, as `dtype`."""
    import imagecodecs

    spaces = [_SPACES[p[16:20]] for p in (source, target)]
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


class ProfileCache(Generic[T]):
    """Results of a function of ICC profiles for the `size` profiles used last, keyed by a
    profile's SHA-256, not its bytes: a PNG may carry 16 MB of profile, a TIFF more, and a
    result is small whatever the profile. Safe across threads."""

    def __init__(self, size: int) -> None:
        self._size, self._items = size, collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, icc: bytes | None, make: Callable[[bytes | None], T]) -> T:
        """`make(icc)`, made once while `icc` stays among the profiles used last."""
        key = icc if icc is None else hashlib.sha256(icc).digest()
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        value = make(icc)  # (outside the lock: measuring a profile takes a while)
        with self._lock:
            self._items[key] = value
            while len(self._items) > self._size:
                self._items.popitem(last=False)
        return value

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


def _cached(size: int) -> Callable[[Callable[[bytes], T]], Callable[[bytes], T]]:
    """A function of a profile, its results kept in a `ProfileCache` of `size` (its
    `cache_clear` empties it)."""

    def wrap(function: Callable[[bytes], T]) -> Callable[[bytes], T]:
        cache: ProfileCache[T] = ProfileCache(size)

        @functools.wraps(function)
        def cached(icc: bytes) -> T:
            return cache.get(icc, function)

        cached.cache_clear = cache.clear  # type: ignore[attr-defined]
        return cached

    return wrap


@_cached(16)
def _gray_table(icc: bytes) -> np.ndarray:
    """sRGB gray in [0, 1] (float32) of each of a gray profile's 65,536 16-bit levels."""
    levels = np.arange(65536, dtype=np.uint16)[None]
    return _transform(levels, icc, _srgb(), np.float32)[0, :, 1].clip(0, 1)


@_cached(64)
def read(icc: bytes | None) -> Profile:
    """What an ICC profile does to pixels, found by converting a grid of 16-bit colours into
    sRGB (and back) once a process."""
    import imagecodecs

    channels = _CHANNELS.get(icc[16:20] if icc else b"", 0)
    if not channels:
        return _UNUSABLE
    grid = _grid(channels)
    try:
        srgb = _transform(grid[..., 0] if channels == 1 else grid, icc, _srgb())
    except (imagecodecs.CmsError, ValueError):  # not a profile LittleCMS reads as input
        return _UNUSABLE
    if channels == 4:  # ink: never sRGB, and never an output's
        return Profile(channels, converts=True, reversible=False)
    converts = bool(np.abs(srgb.astype(np.int32) - grid).max() > _SRGB_TOLERANCE)
    try:
        _transform(srgb[:, :1], _srgb(), icc)
    except (imagecodecs.CmsError, ValueError):
        return Profile(channels, converts, reversible=False)
    return Profile(channels, converts, reversible=True)


class Shaper(NamedTuple):
    """An RGB profile that is a curve for each channel, then a matrix, as LittleCMS converts
    it: `linear` (3, 65536) float32, each channel's 16-bit levels as linear light (1 at the
    top); `to_srgb` (3, 3) linear sRGB of that light; `from_srgb` its inverse; `levels`
    (3, _INVERSE_STEPS) int32, each channel's 16-bit level whose light is nearest
    (i / (steps - 1))² at step i. Torch tensors, on the CPU or (`to`) a GPU."""

    linear: torch.Tensor
    to_srgb: torch.Tensor
    from_srgb: torch.Tensor
    levels: torch.Tensor

    def to(self, device: torch.device) -> Shaper:
        return Shaper(*(t.to(device) for t in self))

    def srgb_of(self, levels_3P: torch.Tensor) -> torch.Tensor:
        """The profile's 16-bit levels (3, P), integers -> sRGB (3, P) float32 in [0, 1]."""
        return self.srgb_of_light(torch.gather(self.linear, 1, levels_3P.long()))

    def srgb_of_light(self, light_3P: torch.Tensor) -> torch.Tensor:
        """The profile's linear light (3, P) -> sRGB (3, P) float32 in [0, 1]."""
        return linear_to_srgb((self.to_srgb @ light_3P).clamp_(0, 1)).clamp_(0, 1)

    def levels_of(self, srgb_3P: torch.Tensor) -> torch.Tensor:
        """sRGB (3, P) float32 in [0, 1] -> the profile's 16-bit levels (3, P), int32."""
        return torch.gather(self.levels, 1, self.steps_of(srgb_3P))

    def steps_of(self, srgb_3P: torch.Tensor) -> torch.Tensor:
        """sRGB (3, P) float32 in [0, 1] -> the steps of `levels` its light falls on."""
        light_3P = (self.from_srgb @ srgb_to_linear(srgb_3P)).clamp_(0, 1)
        return light_3P.sqrt_().mul_(_INVERSE_STEPS - 1).round_().long()


@_cached(16)
def _shaper(icc: bytes) -> Shaper | None:
    """The `Shaper` of an RGB profile that converts; None where the profile is not one (its
    conversions of a grid of colours differ from LittleCMS's: into sRGB, and out of it where
    the profile can be converted into, `Profile.reversible`)."""
    import imagecodecs

    try:
        return _measured(icc, reversible=read(icc).reversible)
    except (imagecodecs.CmsError, ValueError):
        return None


def _measured(icc: bytes, reversible: bool) -> Shaper | None:
    import imagecodecs

    xyz, top = imagecodecs.cms_profile("xyz"), np.arange(65536, dtype=np.uint16)
    ramps = np.zeros((3, 65536, 3), np.uint16)  # each channel alone, at each of its levels
    for c in range(3):
        ramps[c, :, c] = top
    xyz_ramps = _transform(ramps, icc, xyz, np.float64)  # (3, 65536, XYZ)
    colorants = xyz_ramps[:, -1]  # XYZ of each channel at the top: the matrix's columns
    linear = np.einsum("clx,cx->cl", xyz_ramps, colorants) / (colorants**2).sum(1)[:, None]
    primaries = np.diag(np.full(3, 65535, np.uint16))[None]
    srgb_colorants = _transform(primaries, _srgb(), xyz, np.float64)[0]
    to_srgb = np.linalg.solve(srgb_colorants.T, colorants.T)
    if np.any(np.diff(linear, axis=1) < 0) or abs(np.linalg.det(to_srgb)) < 1e-6:
        return None  # no curve to invert, or no matrix
    steps = (np.arange(_INVERSE_STEPS) / (_INVERSE_STEPS - 1)) ** 2
    levels = np.stack([_nearest(curve, steps) for curve in linear])
    shaper = Shaper(
        torch.from_numpy(linear.astype(np.float32)),
        torch.from_numpy(to_srgb.astype(np.float32)),
        torch.from_numpy(np.linalg.inv(to_srgb).astype(np.float32)),
        torch.from_numpy(levels.astype(np.int32)),
    )
    grid = _grid(3)
    forward = np.round(_shaper_to_srgb(grid, shaper).transpose(1, 2, 0) * 65535)
    errors = [np.abs(forward - _transform(grid, icc, _srgb())).max()]
    if reversible:
        backward = _shaper_from_srgb(grid.copy(), shaper).astype(np.int64)
        errors.append(np.abs(backward - _transform(grid, _srgb(), icc)).max())
    return shaper if max(errors) <= _SHAPER_TOLERANCE else None


def _nearest(curve: np.ndarray, values: np.ndarray) -> np.ndarray:
    """The index of the entry of a non-decreasing `curve` nearest each of `values`."""
    above = np.searchsorted(curve, values).clip(1, len(curve) - 1)
    below_nearer = values - curve[above - 1] <= curve[above] - values
    return np.where(below_nearer, above - 1, above).astype(np.uint16)


def _bands(pixels: np.ndarray) -> Iterator[slice]:
    """The rows of an (H, W, ...) picture in bands of about `_BAND_PX` pixels."""
    h, w = pixels.shape[:2]
    rows = max(1, _BAND_PX // max(w, 1))
    return (slice(r, r + rows) for r in range(0, h, rows))


def _grid(channels: int) -> np.ndarray:
    """16-bit values spread over the cube of `channels` (3 or 4: 9 or 5 levels a channel)
    or gray levels (1), as (1, N, channels)."""
    steps = {1: 257, 3: 9, 4: 5}[channels]
    levels = np.linspace(0, 65535, steps).round().astype(np.uint16)
    axes = np.meshgrid(*[levels] * channels, indexing="ij")
    return np.stack(axes, -1).reshape(1, -1, channels)


def _shaper_to_srgb(pixels_HW3: np.ndarray, shaper: Shaper) -> np.ndarray:
    """uint8 or uint16 pixels -> sRGB float32 planes (3, H, W) in [0, 1]."""
    h, w, _ = pixels_HW3.shape
    planes_CHW = np.empty((3, h, w), np.float32)
    linear = shaper.linear.numpy()  # numpy's gather by uint8 or uint16 levels: faster here
    if pixels_HW3.dtype == np.uint8:
        linear = np.ascontiguousarray(linear[:, ::257])  # 8-bit level v is 16-bit 257 v
    for rows in _bands(pixels_HW3):
        band = pixels_HW3[rows]
        light_3P = np.stack([linear[c][band[..., c]].ravel() for c in range(3)])
        srgb_3P = shaper.srgb_of_light(torch.from_numpy(light_3P))
        planes_CHW[:, rows] = srgb_3P.view(3, -1, w).numpy()
    return planes_CHW


def _shaper_from_srgb(pixels_HW3: np.ndarray, shaper: Shaper) -> np.ndarray:
    """sRGB uint8 or uint16 pixels -> the profile's, in place."""
    top = 65535.0 if pixels_HW3.dtype == np.uint16 else 255.0
    levels = shaper.levels.numpy()
    for rows in _bands(pixels_HW3):
        band = pixels_HW3[rows]
        srgb_3P = torch.from_numpy(band.reshape(-1, 3).T.astype(np.float32)).div_(top)
        steps_3P = shaper.steps_of(srgb_3P).numpy()
        levels_P3 = np.stack([levels[c][steps_3P[c]] for c in range(3)], -1).astype(np.uint16)
        band[...] = (levels_P3 if top > 255 else as_8bit(levels_P3)).reshape(band.shape)
    return pixels_HW3


def converts(icc: bytes | None) -> bool:
    """Whether pixels in `icc`'s space differ from sRGB's: False without a usable profile."""
    return read(icc).converts


def output_profile(icc: bytes | None) -> bytes | None:
    """The profile an output carries for a source's `icc`: an RGB profile the output's
    colours can be converted into; None (sRGB) for any other."""
    profile = read(icc)
    return icc if profile.channels == 3 and profile.reversible else None


def lookup(icc: bytes | None) -> torch.Tensor | Shaper | None:
    """What the GPU path converts an 8-bit picture in the space of a profile that converts
    with (`jobs.colorize_jpeg`): for a gray profile, the sRGB gray of each of its 256 levels
    (float32); for a matrix profile that outputs can be converted back into, its `Shaper`;
    None for any other (the CPU path's)."""
    profile = read(icc)
    if not profile.converts:
        return None
    if profile.channels == 1:
        return torch.from_numpy(_gray_table(icc)[::257].copy())
    return _shaper(icc) if profile.channels == 3 and profile.reversible else None


def to_srgb(pixels: np.ndarray, icc: bytes | None) -> np.ndarray | None:
    """uint8 or uint16 pixels (H, W, C) in the space of `icc`, C = 1 (gray), 3 (RGB) or 4
    (CMYK, ink 0 to the top level) -> sRGB float32 planes (1 or 3, H, W) in [0, 1] (a gray
    stays gray: relative colorimetric maps white to white, so R = G = B to within a 16-bit
    level, and G is kept); None where nothing is to be converted: no profile, sRGB's, one of
    C other than the pixels', or one that does not read."""
    profile = read(icc)
    h, w, c = pixels.shape
    if profile.channels != c or not profile.converts:
        return None
    if c == 1:
        return _gray_table(icc)[as_16bit(pixels[..., 0])][None]
    if c == 3 and (shaper := _shaper(icc)) is not None:
        return _shaper_to_srgb(pixels, shaper)
    planes_CHW = np.empty((3, h, w), np.float32)
    for rows in _bands(pixels):
        planes_CHW[:, rows] = _transform(pixels[rows], icc, _srgb()).transpose(2, 0, 1)
    planes_CHW /= 65535.0
    return planes_CHW


def from_srgb(pixels_HW3: np.ndarray, icc: bytes | None) -> np.ndarray:
    """sRGB pixels (H, W, 3, uint8 or uint16) in the space of the RGB profile `icc`, in
    place, where `output_profile` keeps it and it is not sRGB's; as they are otherwise."""
    profile = read(icc)
    if output_profile(icc) is None or not profile.converts:
        return pixels_HW3
    if (shaper := _shaper(icc)) is not None:
        return _shaper_from_srgb(pixels_HW3, shaper)
    for rows in _bands(pixels_HW3):
        pixels_HW3[rows] = _transform(pixels_HW3[rows], _srgb(), icc, pixels_HW3.dtype)
    return pixels_HW3

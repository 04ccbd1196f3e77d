"""sRGB <-> CIE L*a*b* (D65 white, 2-degree observer) in torch: batched, any device.

Legend: N batch, 3 colour channels at dim -3 (R, G, B or L, a, b), H, W image size,
B all leading dims flattened, P = H * W pixels, K pixels outside the sRGB gamut; digits in a
name are literal sizes (lab_3K is 3 x K).
sRGB values lie in [0, 1]; L in [0, 100]; a and b within about +-110 for sRGB colours.

The constants are scikit-image's (``rgb2lab`` / ``lab2rgb`` with illuminant "D65", observer "2"),
so Lab values match the released code's data pipeline, which uses scikit-image: to < 2e-4 in
fp32 and fp64 over every 8-bit colour (see ``_power_with_linear_toe`` for the difference).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch

# sRGB transfer curve (IEC 61966-2-1): linear segment below the knee, offset power law above.
SRGB_KNEE = 0.04045  # encoded value where the power law starts
SRGB_LINEAR_KNEE = 0.0031308  # the same point in linear light
SRGB_SLOPE = 12.92
SRGB_OFFSET = 0.055
SRGB_GAMMA = 2.4

# Linear sRGB -> CIE XYZ, rows X, Y, Z (scikit-image's ``xyz_from_rgb``).
XYZ_FROM_RGB = (
    (0.412453, 0.357580, 0.180423),
    (0.212671, 0.715160, 0.072169),
    (0.019334, 0.119193, 0.950227),
)
D65_WHITE_XYZ = (0.95047, 1.0, 1.08883)  # reference white, 2-degree observer

# CIE Lab companding f(t) = t^(1/3) above (6/29)^3, LAB_SLOPE * t + 16/116 below, with the
# knees and slope rounded as in scikit-image.
LAB_T_KNEE = 0.008856  # ~ (6/29)^3, in XYZ / white
LAB_F_KNEE = 0.2068966  # ~ 6/29, the same point in f
LAB_SLOPE = 7.787
LAB_F_OFFSET = 16.0 / 116.0
L_MAX = 100.0

GAMUTS = ("chroma", "clip")
# Rounding slack of the "chroma" gamut test in linear RGB. A negative overshoot d, clipped,
# costs up to 903 * d in L for dark colours (L = 903.3 Y near black), so it stays tiny.
_GAMUT_SLACK = 1e-6
# Bisection on the chroma scale s: 2^-16 leaves the mapped chroma < 0.003 inside the boundary
# for chroma up to 200, well below one 8-bit sRGB step.
_CHROMA_BISECTION_STEPS = 16


class _Matrices(NamedTuple):
    xyzn_from_rgb: torch.Tensor  # linear RGB -> XYZ / white
    rgb_from_xyzn: torch.Tensor
    lab_from_f: torch.Tensor  # (f_x, f_y, f_z) -> (L + 16, a, b)
    f_from_lab: torch.Tensor  # (L, a, b) -> (f_x, f_y, f_z) - 16/116


def compile_constant(build):
    """Caches build(*args) (hashable args, e.g. dtype and device); compiled callers
    (torch.compile) take the result as a constant instead of tracing how it was built. Built
    outside inference mode, so that a first call under it does not leave every later caller
    an inference tensor that autograd refuses."""
    cache = {}

    @functools.wraps(build)
    def cached(*args):
        if args not in cache:
            with torch.inference_mode(False):
                cache[args] = build(*args)
        return cache[args]

    # The mark `torch.compiler.assume_constant_result` sets, set here without it: it imports
    # torch._dynamo, 0.8 s of every job's start on a CPU core, whether it compiles or not.
    cached._dynamo_marked_constant = True
    return cached


@compile_constant
def _matrices(dtype: torch.dtype, device: torch.device) -> _Matrices:
    """The conversion's linear maps, white point folded in, built in fp64."""
    xyz_from_rgb = torch.tensor(XYZ_FROM_RGB, dtype=torch.float64)
    white = torch.tensor(D65_WHITE_XYZ, dtype=torch.float64)
    # scikit-image inverts the rounded forward matrix rather than using the standard's inverse.
    rgb_from_xyz = torch.linalg.inv(xyz_from_rgb)
    lab_from_f = torch.tensor(
        [[0.0, 116.0, 0.0], [500.0, -500.0, 0.0], [0.0, 200.0, -200.0]], dtype=torch.float64
    )
    maps = (
        xyz_from_rgb / white[:, None],
        rgb_from_xyz * white[None, :],
        lab_from_f,
        torch.linalg.inv(lab_from_f),
    )
    return _Matrices(*(t.to(device, dtype) for t in maps))


def outside_autocast(fn):
    """Run `fn` (whose first argument is a tensor) with autocast off on that tensor's device:
    the colour maths keeps its own precision inside a caller's bf16 region, where autocast
    would round its 3 x 3 products to bf16 (errors up to 3 in a and b)."""

    @functools.wraps(fn)
    def wrapper(x: torch.Tensor, *args, **kwargs):
        with torch.autocast(x.device.type, enabled=False):
            return fn(x, *args, **kwargs)

    return wrapper


def _mix(
    matrix_OI: torch.Tensor, x_BIP: torch.Tensor, bias_OP: torch.Tensor | None = None
) -> torch.Tensor:
    """matrix @ x (+ bias) over the channels: I in, O out, x (..., I, P); a bias only with a
    2-D x. Eager, one matmul or addmm. Under torch.compile, written out as products summed
    over I (at most 3 terms), which inductor unrolls into the elementwise kernel around it:
    a conversion compiles to one pass over the image instead of a kernel, a batched matmul
    and another kernel, each through memory."""
    if torch.compiler.is_compiling():
        out = (matrix_OI[:, :, None] * x_BIP.unsqueeze(-3)).sum(-2)
        return out if bias_OP is None else out + bias_OP
    return matrix_OI @ x_BIP if bias_OP is None else torch.addmm(bias_OP, matrix_OI, x_BIP)


def _as_planes(x: torch.Tensor, name: str, channels: tuple[int, ...] = (3,)) -> torch.Tensor:
    """(..., C, H, W) -> (B, C, P) in the compute dtype: fp32/fp64 as given, else fp32."""
    if x.dim() < 3 or x.shape[-3] not in channels:
        wanted = " or ".join(map(str, channels))
        raise ValueError(f"{name} needs {wanted} channels at dim -3, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")
    dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    batch = math.prod(x.shape[:-3])
    return x.to(dtype).reshape(batch, x.shape[-3], x.shape[-2] * x.shape[-1])


def _power_with_linear_toe(
    x: torch.Tensor,
    knee: float,
    slope: float,
    exponent: float,
    *,
    shift: float = 0.0,
    scale: float = 1.0,
    offset: float = 0.0,
) -> torch.Tensor:
    """scale * (x + shift)^exponent + offset above the knee; below it, the line of the given
    slope through the curve's knee point. The shape of both sRGB curves and of CIE Lab's f.

    The pieces are evaluated on clamped copies and summed rather than selected with a mask: on
    CPU a torch.where costs as much as five arithmetic passes, and the unused piece never sees
    values outside its domain, so gradients stay finite. Anchoring the line on the curve moves it
    from scikit-image's rounded one by < 3.3e-7 in Lab's f (< 2e-4 in a, b near the knee).
    Allocations dominate at image sizes, so both copies are updated in place where autograd
    allows (exp keeps its output for the backward pass, so the sum lands in the line's copy).
    """
    curve = x.clamp_min(knee)
    if shift:
        curve = curve.add_(shift)
    if float(exponent).is_integer():
        curve = curve.pow_(exponent).mul_(scale) if scale != 1.0 else curve.pow_(exponent)
    else:  # exp(log) is vectorised on CPU, about twice as fast as a fractional pow
        curve = curve.log_().mul_(exponent)
        curve = curve.add_(math.log(scale)).exp_() if scale != 1.0 else curve.exp_()
    line = x.clamp_max(knee).sub_(knee - offset / slope).mul_(slope)
    return line.add_(curve)


def srgb_to_linear(rgb: torch.Tensor) -> torch.Tensor:
    """sRGB-encoded values -> linear light (IEC 61966-2-1), any shape, into a new tensor."""
    return _power_with_linear_toe(
        rgb,
        SRGB_KNEE,
        1 / SRGB_SLOPE,
        SRGB_GAMMA,
        shift=SRGB_OFFSET,
        scale=(1 + SRGB_OFFSET) ** -SRGB_GAMMA,
    )


def linear_to_srgb(linear: torch.Tensor) -> torch.Tensor:
    """Linear light -> sRGB-encoded values, any shape, into a new tensor (not clipped)."""
    return _power_with_linear_toe(
        linear,
        SRGB_LINEAR_KNEE,
        SRGB_SLOPE,
        1 / SRGB_GAMMA,
        scale=1 + SRGB_OFFSET,
        offset=-SRGB_OFFSET,
    )


def _lab_f(xyzn: torch.Tensor) -> torch.Tensor:
    return _power_with_linear_toe(xyzn, LAB_T_KNEE, LAB_SLOPE, 1 / 3)


def _lab_f_inverse(f: torch.Tensor) -> torch.Tensor:
    return _power_with_linear_toe(f, LAB_F_KNEE, 1 / LAB_SLOPE, 3)


@outside_autocast
def rgb_to_lab(rgb_N3HW: torch.Tensor) -> torch.Tensor:
    """sRGB in [0, 1] -> CIE L*a*b* (D65), channels at dim -3, any leading dims.

    fp32 and fp64 are computed in their own dtype; other float dtypes (bf16, fp16) are computed
    in fp32 and rounded to the input dtype on return. A bf16 result is therefore the fp32 result
    for the same (bf16) input up to bf16 rounding, 2^-9 relative: at most 0.25 in L, a and b
    (tested as |error| <= 2^-8 |value| + 0.01). Differentiable, with finite gradients.
    """
    rgb_B3P = _as_planes(rgb_N3HW, "rgb_to_lab input")
    m = _matrices(rgb_B3P.dtype, rgb_B3P.device)
    f_B3P = _lab_f(_mix(m.xyzn_from_rgb, srgb_to_linear(rgb_B3P)))
    lab_B3P = _mix(m.lab_from_f, f_B3P)
    lab_B3P[:, 0].sub_(16.0)
    return lab_B3P.reshape(rgb_N3HW.shape).to(rgb_N3HW.dtype)


@outside_autocast
def rgb_to_lightness(rgb_N3HW: torch.Tensor) -> torch.Tensor:
    """sRGB in [0, 1] -> CIE L* alone, shape (..., 1, H, W): the L channel of `rgb_to_lab`
    (to fp32 rounding) at a third of its cost, since L depends on luminance Y only. A gray
    image may come as one channel (..., 1, H, W), read as R = G = B, for a third of that again.

    Dtypes as in `rgb_to_lab`. Made of elementwise ops and one 1 x 3 matrix product, so
    `torch.compile` fuses it into a single pass over the image.
    """
    rgb_BCP = _as_planes(rgb_N3HW, "rgb_to_lightness input", channels=(3, 1))
    y_row = _matrices(rgb_BCP.dtype, rgb_BCP.device).xyzn_from_rgb[1:2]
    if rgb_BCP.shape[1] == 1:  # Y of a gray is its linear value times the row's sum
        y_B1P = srgb_to_linear(rgb_BCP).mul_(y_row.sum())
    else:
        y_B1P = _mix(y_row, srgb_to_linear(rgb_BCP))
    l_B1P = _lab_f(y_B1P).mul_(116.0).sub_(16.0)
    return l_B1P.reshape(*rgb_N3HW.shape[:-3], 1, *rgb_N3HW.shape[-2:]).to(rgb_N3HW.dtype)


def _lab_to_linear(lab_B3P: torch.Tensor) -> torch.Tensor:
    """Lab -> linear sRGB, unclipped."""
    m = _matrices(lab_B3P.dtype, lab_B3P.device)
    f_B3P = _mix(m.f_from_lab, lab_B3P).add_(LAB_F_OFFSET)
    # scikit-image clips negative f_z (Z far below zero), kept so that "clip" matches it. Such
    # colours are out of gamut with or without the clip, so "chroma" is unaffected.
    f_B3P[:, 2].clamp_min_(0.0)
    return _mix(m.rgb_from_xyzn, _lab_f_inverse(f_B3P))


@compile_constant
def _gamut_box(dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(centre, half-width), each (3, 1): the linear-RGB box counted as in gamut by "chroma".

    The XYZ matrix maps the D65 white to linear RGB (1.00001, 0.99999, 1.00008), so greys near
    L = 100 overshoot 1 in R and B: each channel's top is max(1, the white's value), which keeps
    every grey in gamut (the final clip then moves L by < 0.002).
    """
    rgb_from_xyzn = _matrices(torch.float64, torch.device("cpu")).rgb_from_xyzn
    top = rgb_from_xyzn.sum(dim=1, keepdim=True).clamp_min(1.0) + _GAMUT_SLACK
    bottom = -_GAMUT_SLACK
    return ((top + bottom) / 2).to(device, dtype), ((top - bottom) / 2).to(device, dtype)


def _gamut_excess(linear_3P: torch.Tensor) -> torch.Tensor:
    """Over pixels (channels at dim -2): how far the farthest of R, G, B lies outside the
    gamut box (<= 0 inside)."""
    centre_31, half_width_31 = _gamut_box(linear_3P.dtype, linear_3P.device)
    return linear_3P.sub(centre_31).abs_().sub_(half_width_31).amax(dim=-2)


def _chroma_search_constants() -> tuple[tuple[float, float, float, float], ...]:
    """Per linear-RGB channel, the gamut test |x X + y Y + z Z - centre| <= half-width in
    half-widths, X, Y, Z relative to the white: (x, y, z, centre) / half-width. Python numbers,
    which compiled code takes as literals."""
    cpu = torch.device("cpu")
    rows = _matrices(torch.float64, cpu).rgb_from_xyzn.tolist()
    centre, half_width = (t.flatten().tolist() for t in _gamut_box(torch.float64, cpu))
    return tuple(
        (x / h, y / h, z / h, c / h)
        for (x, y, z), c, h in zip(rows, centre, half_width, strict=True)
    )


_CHROMA_SEARCH_CONSTANTS = _chroma_search_constants()
# _lab_f_inverse(f) = _cube_and_toe(f) - _TOE_SHIFT: the search folds the shift into its
# per-pixel constants, a pass less per candidate for each of X and Z.
_TOE_SLOPE = 1 / LAB_SLOPE
_TOE_SHIFT = LAB_F_KNEE * _TOE_SLOPE


def _cube_and_toe(f: torch.Tensor) -> torch.Tensor:
    """_lab_f_inverse(f) + _TOE_SHIFT, in four passes (`_power_with_linear_toe`'s pieces)."""
    return f.clamp_min(LAB_F_KNEE).pow_(3).add_(f.clamp_max(LAB_F_KNEE), alpha=_TOE_SLOPE)


def _max_in_gamut_chroma(L: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Lab planes of one shape, L in [0, 100] -> the chroma scale s in [0, 1] of each pixel,
    by bisection.

    Invariant: s = lo is in gamut (s = 0 is a grey, in gamut for L in [0, 100]). Y depends on L
    only, so every candidate keeps the input's L; s only trades chroma. Written plane by plane
    (no stacked channels): every step then has the pixels' shape, and torch.compile fuses the
    whole search into one pass over memory, where stacked (2, K) and (3, K) steps each took a
    pass of their own. Eager, a candidate costs 24 passes over the pixels: everything that
    does not depend on s (Y's terms, the box's centre, the toe's shift) is summed once per
    channel beforehand.
    """
    channels = _CHROMA_SEARCH_CONSTANTS
    fy = L.mul(1 / 116).add_(LAB_F_OFFSET)
    y = _lab_f_inverse(fy)
    x_per_s, z_per_s = a * (1 / 500), b * (-1 / 200)  # d f_x / ds, d f_z / ds
    fixed = [
        torch.mul(y, y_term).sub_(centre + _TOE_SHIFT * (x_term + z_term))
        for x_term, y_term, z_term, centre in channels
    ]
    lo = torch.zeros_like(L)
    for step in (0.5**i for i in range(1, _CHROMA_BISECTION_STEPS + 1)):
        s = lo + step
        x = _cube_and_toe(torch.addcmul(fy, x_per_s, s))
        z = _cube_and_toe(torch.addcmul(fy, z_per_s, s))
        worst = None
        for rest, (x_term, _, z_term, _) in zip(fixed, channels, strict=True):
            off_centre = torch.add(rest, x, alpha=x_term).add_(z, alpha=z_term).abs_()
            worst = off_centre if worst is None else torch.maximum(worst, off_centre)
        lo.add_(worst.le_(1.0), alpha=step)  # worst becomes 1.0 where s is in gamut, else 0.0
    return lo


def _map_chroma_into_gamut(lab_B3P: torch.Tensor, linear_B3P: torch.Tensor) -> torch.Tensor:
    """linear_B3P with its out-of-gamut pixels replaced by their chroma-reduced colours.

    Eager, and compiled for CPUs, the search runs on the out-of-gamut pixels only, gathered
    (the gather waits for the device to count them). Compiled for an accelerator, it runs on
    every pixel: no host sync, and `lab_to_rgb` compiles to a few passes over memory (nine
    for the colorize job's reassembly, the whole search in one of them), where a gather
    waits for the device. (On CPUs the gathered search is faster compiled too, since
    inductor's CPU code for the every-pixel search is scalar, and its code generation of
    torch 2.13 failed on the every-pixel graph for some image sizes.)
    """
    outside_BP = _gamut_excess(linear_B3P) > 0.0
    if torch.compiler.is_compiling() and linear_B3P.device.type != "cpu":
        return _chroma_mapped_everywhere(lab_B3P, linear_B3P, outside_BP)
    if not bool(outside_BP.any()):
        return linear_B3P
    # Flat positions in (B, 3, P) of each outside pixel's three channels: one gather of
    # (3, K) and one scatter back, both through the same index.
    P = lab_B3P.shape[-1]
    pixel_K = outside_BP.flatten().nonzero().squeeze(1)  # b * P + p
    at_3K = pixel_K.add(pixel_K.div(P, rounding_mode="floor"), alpha=2 * P)
    at_3K = at_3K + torch.arange(0, 3 * P, P, device=at_3K.device)[:, None]
    L, a, b = lab_B3P.take(at_3K)
    L = L.clamp(0.0, L_MAX)
    with torch.no_grad():  # s is the result of a search: a constant for gradients
        scale_K = _max_in_gamut_chroma(L, a, b)
    mapped_13K = torch.stack([L, a * scale_K, b * scale_K])[None]
    return linear_B3P.put_(at_3K, _lab_to_linear(mapped_13K)[0])


def _chroma_mapped_everywhere(
    lab_B3P: torch.Tensor, linear_B3P: torch.Tensor, outside_BP: torch.Tensor
) -> torch.Tensor:
    """`_map_chroma_into_gamut` without data-dependent shapes: every pixel searched, the
    result kept where outside_BP."""
    L, a, b = lab_B3P[:, 0].clamp(0.0, L_MAX), lab_B3P[:, 1], lab_B3P[:, 2]
    with torch.no_grad():
        scale_BP = _max_in_gamut_chroma(L, a, b)
    mapped_B3P = _lab_to_linear(torch.stack([L, a * scale_BP, b * scale_BP], dim=1))
    return torch.where(outside_BP[:, None], mapped_B3P, linear_B3P)


@outside_autocast
def lab_to_rgb(lab_N3HW: torch.Tensor, *, gamut: str = "chroma") -> torch.Tensor:
    """CIE L*a*b* (D65) -> sRGB in [0, 1], channels at dim -3, any leading dims.

    gamut="chroma" (default): a colour outside the sRGB gamut keeps its L (clamped to [0, 100])
    and hue and has its chroma (a, b) scaled by the largest s in [0, 1] that brings it into the
    gamut (found by bisection to 2^-16), so the photo's luminance survives. gamut="clip": the
    released code's behaviour (scikit-image's ``lab2rgb``): RGB clipped to [0, 1], which
    changes L of out-of-gamut colours. Dtypes as in ``rgb_to_lab`` (a bf16 result is within
    2^-9 of the fp32 result for the same input). Differentiable; with "chroma" the scale s is a
    constant for the gradient.
    """
    if gamut not in GAMUTS:
        raise ValueError(f"gamut must be one of {GAMUTS}, got {gamut!r}")
    lab_B3P = _as_planes(lab_N3HW, "lab_to_rgb input")
    linear_B3P = _lab_to_linear(lab_B3P)
    if gamut == "chroma":
        linear_B3P = _map_chroma_into_gamut(lab_B3P, linear_B3P)
    rgb_B3P = linear_to_srgb(linear_B3P)
    # The encoding is monotone, so clipping here equals clipping linear light, as scikit-image
    # does; it is the whole of "clip" and removes rounding slack after "chroma".
    return rgb_B3P.clamp_(0.0, 1.0).reshape(lab_N3HW.shape).to(lab_N3HW.dtype)

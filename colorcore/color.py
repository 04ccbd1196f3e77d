"""sRGB <-> CIE L*a*b* (D65 white, 2-degree observer) in torch: batched, any device.

Legend: N batch, 3 colour channels at dim -3 (R, G, B or L, a, b), H, W image size,
B all leading dims flattened, P = H * W pixels, K pixels outside the sRGB gamut.
sRGB values lie in [0, 1]; L in [0, 100]; a and b roughly in [-110, 110] for sRGB colours.

The constants are scikit-image's (``rgb2lab`` / ``lab2rgb`` with illuminant "D65", observer "2"),
so Lab values match the released code's data pipeline, which uses scikit-image.
"""

from __future__ import annotations

import functools
import math

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

# CIE Lab companding f(t) = t^(1/3) above (6/29)^3, LAB_SLOPE * t + 16/116 below; the
# breakpoints are rounded as in scikit-image, which the tests hold us to within 1e-3.
LAB_T_KNEE = 0.008856  # ~ (6/29)^3, in XYZ / white
LAB_F_KNEE = 0.2068966  # ~ 6/29, the same point in f
LAB_SLOPE = 7.787
LAB_F_OFFSET = 16.0 / 116.0
L_MAX = 100.0

GAMUTS = ("chroma", "clip")
# The XYZ matrix maps the D65 white to linear RGB (1.00001, 0.99999, 1.00008), so greys near
# L = 100 sit just outside [0, 1]; this slack keeps every grey in gamut (the final clip removes
# it, moving L by < 1e-3).
_GAMUT_SLACK = 1e-4
# Bisection on the chroma scale s: 2^-16 leaves the mapped chroma < 0.003 inside the boundary
# for chroma up to 200, well below one 8-bit sRGB step.
_CHROMA_BISECTION_STEPS = 16


@functools.lru_cache(maxsize=16)
def _constants(dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    """Matrices with the white point and Lab's linear maps folded in, built in fp64."""
    xyz_from_rgb = torch.tensor(XYZ_FROM_RGB, dtype=torch.float64)
    white = torch.tensor(D65_WHITE_XYZ, dtype=torch.float64)
    # scikit-image inverts the rounded forward matrix rather than using the standard's inverse.
    rgb_from_xyz = torch.linalg.inv(xyz_from_rgb)
    lab_from_f = torch.tensor(
        [[0.0, 116.0, 0.0], [500.0, -500.0, 0.0], [0.0, 200.0, -200.0]], dtype=torch.float64
    )
    f_from_lab = torch.tensor(
        [[1 / 116, 1 / 500, 0.0], [1 / 116, 0.0, 0.0], [1 / 116, 0.0, -1 / 200]],
        dtype=torch.float64,
    )
    consts = {
        "xyzn_from_rgb": xyz_from_rgb / white[:, None],
        "rgb_from_xyzn": rgb_from_xyz * white[None, :],
        "lab_from_f": lab_from_f,
        "lab_offset": torch.tensor([[-16.0], [0.0], [0.0]], dtype=torch.float64),
        "f_from_lab": f_from_lab,
    }
    return {k: v.to(dtype=dtype, device=device) for k, v in consts.items()}


def _as_planes(x: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.dtype]:
    """(..., 3, H, W) -> (B, 3, P) in the compute dtype: fp32/fp64 as given, else fp32."""
    if x.dim() < 3 or x.shape[-3] != 3:
        raise ValueError(f"{name} needs 3 channels at dim -3, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")
    dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    batch = math.prod(x.shape[:-3])
    return x.to(dtype).reshape(batch, 3, x.shape[-2] * x.shape[-1]), dtype


def rgb_to_lab(rgb_N3HW: torch.Tensor) -> torch.Tensor:
    """sRGB in [0, 1] -> CIE L*a*b* (D65), channels at dim -3, any leading dims.

    fp32 and fp64 are computed in their own dtype; other float dtypes (bf16, fp16) are computed
    in fp32 and rounded to the input dtype on return, so a bf16 result is within bf16 rounding
    of the fp32 result: |error| <= 2^-8 * |value| + 0.01 (L, a, b up to ~0.4 near L = 100).
    """
    rgb_B3P, dtype = _as_planes(rgb_N3HW, "rgb_to_lab input")
    c = _constants(dtype, rgb_B3P.device)
    # clamp_min keeps the unused power-law branch finite, so gradients stay finite too.
    power = rgb_B3P.clamp_min(SRGB_KNEE).add_(SRGB_OFFSET).div_(1 + SRGB_OFFSET).pow_(SRGB_GAMMA)
    linear_B3P = torch.where(rgb_B3P > SRGB_KNEE, power, rgb_B3P / SRGB_SLOPE)
    xyzn_B3P = c["xyzn_from_rgb"] @ linear_B3P
    cube_root = xyzn_B3P.clamp_min(LAB_T_KNEE).pow_(1 / 3)
    f_B3P = torch.where(xyzn_B3P > LAB_T_KNEE, cube_root, xyzn_B3P.mul(LAB_SLOPE).add_(LAB_F_OFFSET))
    lab_B3P = torch.baddbmm(c["lab_offset"], c["lab_from_f"].expand(len(f_B3P), 3, 3), f_B3P)
    return lab_B3P.reshape(rgb_N3HW.shape).to(rgb_N3HW.dtype)


def _lab_to_linear(lab_B3P: torch.Tensor, c: dict[str, torch.Tensor]) -> torch.Tensor:
    """Lab -> linear sRGB, unclipped."""
    f_B3P = torch.baddbmm(
        torch.full((), LAB_F_OFFSET, dtype=lab_B3P.dtype, device=lab_B3P.device),
        c["f_from_lab"].expand(len(lab_B3P), 3, 3),
        lab_B3P,
    )
    # scikit-image clips negative f_z (Z would be far below zero); kept so "clip" matches it.
    # Such colours are out of gamut with or without the clip, so "chroma" is unaffected.
    f_B3P[:, 2].clamp_min_(0.0)
    xyzn_B3P = torch.where(
        f_B3P > LAB_F_KNEE, f_B3P.pow(3), f_B3P.sub(LAB_F_OFFSET).div_(LAB_SLOPE)
    )
    return c["rgb_from_xyzn"] @ xyzn_B3P


def _in_gamut(linear_B3P: torch.Tensor) -> torch.Tensor:
    """(B, P) mask: all three linear channels within [0, 1] up to the grey slack."""
    return linear_B3P.sub(0.5).abs_().amax(dim=1) <= 0.5 + _GAMUT_SLACK


def _max_in_gamut_chroma(lab_13K: torch.Tensor, c: dict[str, torch.Tensor]) -> torch.Tensor:
    """(1, 3, K) Lab with L in [0, 100] -> (1, 1, K) chroma scale s in [0, 1], by bisection.

    Invariant: s = lo is in gamut (s = 0 is a grey, in gamut for L in [0, 100]). Y depends on
    L only, so every candidate keeps the input's L exactly; s only trades chroma.
    """
    lo_11K = torch.zeros_like(lab_13K[:, :1])
    hi_11K = torch.ones_like(lo_11K)
    for _ in range(_CHROMA_BISECTION_STEPS):
        mid_11K = (lo_11K + hi_11K).mul_(0.5)
        candidate_13K = torch.cat([lab_13K[:, :1], lab_13K[:, 1:] * mid_11K], dim=1)
        ok_11K = _in_gamut(_lab_to_linear(candidate_13K, c)).unsqueeze(1)
        lo_11K = torch.where(ok_11K, mid_11K, lo_11K)
        hi_11K = torch.where(ok_11K, hi_11K, mid_11K)
    return lo_11K


def _map_chroma_into_gamut(
    lab_B3P: torch.Tensor, linear_B3P: torch.Tensor, c: dict[str, torch.Tensor]
) -> None:
    """Overwrite the out-of-gamut pixels of linear_B3P with their chroma-reduced colours."""
    outside_BP = ~_in_gamut(linear_B3P)
    if not bool(outside_BP.any()):
        return
    lab_K3 = lab_B3P.transpose(1, 2)[outside_BP]
    lab_13K = torch.cat([lab_K3[:, :1].clamp(0.0, L_MAX), lab_K3[:, 1:]], dim=1).T.unsqueeze(0)
    with torch.no_grad():  # s is the result of a search: a constant for gradients
        scale_11K = _max_in_gamut_chroma(lab_13K.detach(), c)
    mapped_13K = torch.cat([lab_13K[:, :1], lab_13K[:, 1:] * scale_11K], dim=1)
    linear_B3P.transpose(1, 2)[outside_BP] = _lab_to_linear(mapped_13K, c)[0].T


def lab_to_rgb(lab_N3HW: torch.Tensor, *, gamut: str = "chroma") -> torch.Tensor:
    """CIE L*a*b* (D65) -> sRGB in [0, 1], channels at dim -3, any leading dims.

    gamut="chroma" (default): a colour outside the sRGB gamut keeps its L (clamped to [0, 100])
    and hue and has its chroma (a, b) scaled by the largest s in [0, 1] that brings it into the
    gamut (found by bisection to 2^-16), so the photo's luminance survives. gamut="clip": the
    released code's behaviour (scikit-image's ``lab2rgb``): RGB clipped to [0, 1], which
    changes L of out-of-gamut colours. Dtypes as in ``rgb_to_lab``.
    """
    if gamut not in GAMUTS:
        raise ValueError(f"gamut must be one of {GAMUTS}, got {gamut!r}")
    lab_B3P, dtype = _as_planes(lab_N3HW, "lab_to_rgb input")
    c = _constants(dtype, lab_B3P.device)
    linear_B3P = _lab_to_linear(lab_B3P, c)
    if gamut == "chroma":
        _map_chroma_into_gamut(lab_B3P, linear_B3P, c)
    # Clipping in linear light equals clipping the encoded values (the curve maps 0->0, 1->1);
    # it removes rounding slack after "chroma" and is the whole gamut handling of "clip".
    linear_B3P.clamp_(0.0, 1.0)
    power = linear_B3P.clamp_min(SRGB_LINEAR_KNEE).pow_(1 / SRGB_GAMMA)
    power.mul_(1 + SRGB_OFFSET).sub_(SRGB_OFFSET)
    rgb_B3P = torch.where(linear_B3P > SRGB_LINEAR_KNEE, power, linear_B3P * SRGB_SLOPE)
    return rgb_B3P.reshape(lab_N3HW.shape).to(lab_N3HW.dtype)

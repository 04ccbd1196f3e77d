"""Decoding: mode, mean, annealed mean, and full-resolution colorization."""

from __future__ import annotations

import math

import pytest
import torch

from colorcore import decode
from colorcore.color import lab_to_rgb, rgb_to_lab
from colorcore.model import ColorizationNet, ModelConfig
from colorcore.quantize import ab_bins
from tests.support import photo_rgb


def logits(seed: int = 0, shape=(2, 313, 5, 7)) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 3


def test_annealed_mean_is_the_mean_of_the_reweighted_distribution() -> None:
    z = logits()
    T = 0.38
    probs = z.softmax(1)
    # softmax(log z / T), written as in the paper
    annealed = torch.exp(torch.log(probs) / T)
    annealed = annealed / annealed.sum(1, keepdim=True)
    expected = torch.einsum("nqhw,qc->nchw", annealed, ab_bins())
    torch.testing.assert_close(decode.annealed_mean(z, T), expected, rtol=1e-4, atol=1e-4)
    # The network's layout (channels_last) and dtype (bf16 under autocast) give the same, in
    # fp32, and the caller's logits are left as they were.
    z_last = (z * 20).contiguous(memory_format=torch.channels_last)  # large: needs the max
    before = z_last.clone()
    wide = decode.annealed_mean(z_last, T)
    assert torch.equal(z_last, before) and torch.isfinite(wide).all()
    torch.testing.assert_close(wide, decode.annealed_mean(z * 20, T), rtol=0, atol=1e-4)
    double = decode.annealed_mean(z.double(), T)
    assert double.dtype == torch.float32
    torch.testing.assert_close(double, decode.annealed_mean(z, T), rtol=0, atol=1e-4)
    half = decode.annealed_mean(z.bfloat16().contiguous(memory_format=torch.channels_last), T)
    assert half.dtype == torch.float32
    torch.testing.assert_close(
        half, decode.annealed_mean(z.bfloat16().float(), T), rtol=0, atol=1e-4
    )


def test_temperature_limits() -> None:
    z = logits(1)
    mean = torch.einsum("nqhw,qc->nchw", z.softmax(1), ab_bins())
    torch.testing.assert_close(decode.annealed_mean(z, 1.0), mean, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(decode.mean(z), mean, atol=1e-4, rtol=1e-5)
    mode = decode.mode(z)
    assert mode.shape == (2, 2, 5, 7)
    assert torch.equal(mode[0, :, 1, 2], ab_bins()[z[0, :, 1, 2].argmax()])
    margin = torch.zeros_like(z).scatter_(1, z.argmax(1, keepdim=True), 1.0)
    torch.testing.assert_close(decode.annealed_mean(z + margin, 1e-2), mode, atol=1e-3, rtol=0)
    gaps = [(decode.annealed_mean(z, t) - mode).abs().mean() for t in (1.0, 0.38, 0.1)]
    assert gaps[0] > gaps[1] > gaps[2]
    lowest = decode.annealed_mean(100 * (z + margin), decode.TEMPERATURE_MIN)  # no overflow
    torch.testing.assert_close(lowest, mode, atol=1e-3, rtol=0)
    for t in (0.0, decode.TEMPERATURE_MIN / 2, math.inf, math.nan):  # NaN colours, or none
        with pytest.raises(ValueError, match=r"temperature must be finite and >= 0.001"):
            decode.annealed_mean(z, t)
    with pytest.raises(ValueError, match="313 bin logits"):
        decode.mode(torch.zeros(1, 10, 2, 2))


def test_released_deploy_scale_is_the_annealing_temperature() -> None:
    z = logits(2)
    scaled = torch.einsum("nqhw,qc->nchw", (z * decode.DEPLOY_LOGIT_SCALE).softmax(1), ab_bins())
    annealed = decode.annealed_mean(z, 1 / decode.DEPLOY_LOGIT_SCALE)
    torch.testing.assert_close(annealed, scaled, atol=1e-4, rtol=1e-5)


def test_colorize_keeps_size_and_the_inputs_lightness() -> None:
    torch.manual_seed(0)
    model = ColorizationNet(ModelConfig(width=1 / 16)).eval()
    with torch.no_grad():  # strong colours, so that some land outside the sRGB gamut
        model.model8[-1].bias.copy_(torch.randn(313) * 4)
    rgb = torch.from_numpy(photo_rgb("chelsea")).permute(2, 0, 1)[None].float() / 255
    rgb = rgb[..., :150, :203]  # sizes that are not multiples of the network's stride
    out = decode.colorize(model, rgb, infer_px=64)
    assert out.shape == rgb.shape and out.min() >= 0 and out.max() <= 1
    l_in, l_out = rgb_to_lab(rgb)[:, 0], rgb_to_lab(out)[:, 0]
    assert (l_in - l_out).abs().max() < 0.1
    assert rgb_to_lab(out)[:, 1:].abs().mean() > 1  # it did add colour
    # the released behaviour (clip RGB) changes L where colours leave the gamut
    clipped = decode.colorize(model, rgb, infer_px=64, gamut="clip")
    assert (rgb_to_lab(clipped)[:, 0] - l_in).abs().max() > 0.5
    with pytest.raises(ValueError, match="float images in"):  # bytes, not [0, 1]
        decode.colorize(model, (rgb * 255).to(torch.uint8), infer_px=64)


def test_colorize_accepts_gray_and_matches_a_manual_pipeline() -> None:
    torch.manual_seed(1)
    model = ColorizationNet(ModelConfig(width=1 / 16)).eval()
    gray = torch.rand(1, 1, 32, 48)
    out = decode.colorize(model, gray, infer_px=32, T=0.5)
    l_full = rgb_to_lab(gray.expand(-1, 3, -1, -1))[:, :1]
    l_small = torch.nn.functional.interpolate(
        l_full, size=(32, 32), mode="bilinear", antialias=True
    )
    with torch.no_grad():
        ab = decode.annealed_mean(model(l_small), 0.5)
    ab = torch.nn.functional.interpolate(ab, size=(32, 48), mode="bilinear")
    torch.testing.assert_close(out, lab_to_rgb(torch.cat([l_full, ab], 1)))
    with pytest.raises(ValueError, match="expected"):
        decode.colorize(model, torch.rand(1, 2, 8, 8))


def test_annealed_mean_keeps_fp32_inside_autocast() -> None:
    logits = torch.randn(2, 313, 4, 4, generator=torch.Generator().manual_seed(4)) * 5
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = decode.annealed_mean(logits)
    torch.testing.assert_close(inside, decode.annealed_mean(logits), rtol=0, atol=1e-5)


class _Recorder(torch.nn.Module):
    """Records the network's input; predicts uniform logits (ab of 0 for every pixel)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))
        self.seen: list[torch.Tensor] = []

    def forward(self, l_N1SS: torch.Tensor) -> torch.Tensor:
        self.seen.append(l_N1SS.detach().clone())
        n, _, s, _ = l_N1SS.shape
        return torch.zeros(n, 313, s // 4, s // 4) * self.scale


def test_the_network_sees_the_images_lightness_resized_with_antialiasing() -> None:
    """The input is L (0-100) of the whole image resized to infer_px square, bilinear with
    antialiasing (a plain bilinear downscale by 3 would alias the photo's fine texture),
    clamped to L's range; values just above 1 in the RGB input stay inside it."""
    import torch.nn.functional as F

    from colorcore.color import rgb_to_lightness

    rgb = torch.from_numpy(photo_rgb("chelsea", 200).copy()).permute(2, 0, 1)[None].float() / 255
    rgb[..., :4, :4] = 1.02
    model = _Recorder()
    decode.colorize(model, rgb, infer_px=64)
    [seen] = model.seen
    lightness = rgb_to_lightness(rgb)
    expected = F.interpolate(lightness, size=(64, 64), mode="bilinear", antialias=True)
    torch.testing.assert_close(seen, expected.clamp(0, 100), rtol=0, atol=1e-4)
    aliased = F.interpolate(lightness, size=(64, 64), mode="bilinear")
    assert (seen - aliased).abs().max() > 1.0  # the two differ on this photo
    assert seen.max() <= 100.0

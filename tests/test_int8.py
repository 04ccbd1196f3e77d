"""Int8 inference (`colorcore.int8`): the oneDNN kernels compute what the quantisation scheme
says, calibration is fixed, and the error figure is the one the job checks."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from colorcore.datainit import data_dependent_init
from colorcore.decode import annealed_mean
from colorcore.int8 import (
    CALIBRATION_BATCH,
    AbError,
    Int8ColorizationNet,
    _Int8Upsample,
    _Quant,
    calibration_l,
    quantize,
)
from colorcore.model import ColorizationNet, ModelConfig
from colorcore.quantize import ab_bins

pytestmark = pytest.mark.skipif(
    not hasattr(torch.ops.onednn, "qconv_pointwise"), reason="no oneDNN int8 kernels"
)


@pytest.fixture(scope="module")
def calibration() -> torch.Tensor:
    return calibration_l()


@pytest.fixture(scope="module")
def net(calibration: torch.Tensor) -> ColorizationNet:
    """A narrow network with the activation statistics of a trained one: every conv
    standardised on the calibration photos, BatchNorm's statistics from them too."""
    torch.manual_seed(0)
    model = ColorizationNet(ModelConfig(width=1 / 8))
    data_dependent_init(model, calibration[::2])
    return model.eval()


def test_calibration_photos_are_real_l_at_the_inference_size(calibration) -> None:
    assert calibration.shape == (8, 1, 256, 256) and calibration.dtype == torch.float32
    assert 0 <= calibration.min() and calibration.max() <= 100
    assert calibration.flatten(1).std(dim=1).min() > 5  # photos, not flat fields


def _fake_quantised(net: ColorizationNet, input_ranges) -> nn.Module:
    """`net` in fp32 with every int8 layer (the 3x3 convs and the transposed conv) seeing what
    the int8 scheme lets it see: its input rounded to 256 levels spanning [min(lo, 0),
    max(hi, 0)] with zero exact, its weights to int8 per output channel (scale max |w| / 127)."""
    sim = copy.deepcopy(net)
    layers = [
        m
        for m in sim.modules()
        if isinstance(m, nn.ConvTranspose2d) or (isinstance(m, nn.Conv2d) and m.kernel_size[0] == 3)
    ]
    assert len(layers) == len(input_ranges) == 22 and isinstance(layers[19], nn.ConvTranspose2d)
    for layer, (lo, hi) in zip(layers, input_ranges, strict=True):
        lo, hi = min(lo, 0.0), max(hi, 0.0)
        scale = (hi - lo) / 255
        zero = round(-lo / scale)

        def quantise_input(_m, args, scale=scale, zero=zero):
            q = torch.clamp(torch.round(args[0] / scale) + zero, 0, 255)
            return ((q - zero) * scale,)

        layer.register_forward_pre_hook(quantise_input)
        out_dim = 1 if isinstance(layer, nn.ConvTranspose2d) else 0
        others = [d for d in range(4) if d != out_dim]
        with torch.no_grad():
            w_scale = layer.weight.abs().amax(dim=others, keepdim=True) / 127
            layer.weight.copy_(torch.round(layer.weight / w_scale).clamp(-128, 127) * w_scale)
    return sim


@torch.no_grad()
def test_int8_kernels_compute_the_quantisation_scheme(net, calibration) -> None:
    """oneDNN's int8 network gives the logits of an fp32 simulation of its rounding, block
    boundaries (BatchNorm folded into the requantisation), strides, dilations and the
    transposed conv's phases included (its kernel taps swapped: a gap of 1.3).
    Only rounding ties differ, which this network (as chaotic as a random one is: a change
    grows about 1.6 times a block) amplifies: measured 0.11 of the logits' spread, against
    0.85 between int8 and fp32."""
    int8, _ = quantize(net, calibration)
    sim = _fake_quantised(net, int8.input_ranges)
    # Off the photos' 8-bit grid, where L's quantisation step would split levels in half:
    # ties that round either way.
    x = (calibration[1::2] + 0.137).clamp(0, 100)
    want, got, fp32 = sim(x), int8(x), net(x)
    assert got.dtype == torch.float32 and got.shape == fp32.shape == (4, 313, 64, 64)
    scale = fp32.std()
    simulation_gap = ((got - want).pow(2).mean().sqrt() / scale).item()
    int8_gap = ((got - fp32).pow(2).mean().sqrt() / scale).item()
    assert simulation_gap < 0.2 and int8_gap > 4 * simulation_gap, (simulation_gap, int8_gap)


@torch.no_grad()
def test_calibration_takes_each_int8_layers_input_range_over_every_photo(net, calibration):
    """The range each int8 layer's input is quantised over is what that input spans over all
    the calibration photos, batch after batch (as `_fake_quantised` picks the layers)."""
    int8, _ = quantize(net, calibration)
    seen: dict[nn.Module, list[float]] = {}

    def spans(module, args) -> None:
        lo, hi = seen.setdefault(module, [math.inf, -math.inf])
        seen[module] = [min(lo, args[0].min().item()), max(hi, args[0].max().item())]

    layers = [m for m in net.modules() if isinstance(m, nn.ConvTranspose2d)
              or (isinstance(m, nn.Conv2d) and m.kernel_size[0] == 3)]  # fmt: skip
    hooks = [layer.register_forward_pre_hook(spans) for layer in layers]
    try:
        for part in calibration.split(CALIBRATION_BATCH):
            net(part)
    finally:
        for hook in hooks:
            hook.remove()
    assert list(int8.input_ranges) == [tuple(seen[layer]) for layer in layers]


@torch.no_grad()
@pytest.mark.parametrize("shape", [(2, 6, 5, 9), (1, 3, 1, 1), (3, 4, 4, 7)])
def test_int8_upsampling_is_the_transposed_conv_exactly(shape) -> None:
    """On integers the quantisation keeps exact (weights k / 64 with max |k| = 127 in every
    output channel, input scale 1 with zero point 7, output scale 1 / 64 with zero point 3),
    the four phase convs interleaved equal the transposed conv, its ReLU and the clamp to
    uint8, at odd, non-square and 1x1 sizes."""
    n, c_in, h, w = shape
    g = torch.Generator().manual_seed(sum(shape))
    k = torch.randint(-2, 3, (c_in, 5, 4, 4), generator=g).float()
    k[0, :, 1, 2] = 127.0
    bias = torch.randint(-40, 41, (5,), generator=g).float()
    up = nn.ConvTranspose2d(c_in, 5, kernel_size=4, stride=2, padding=1)
    up.weight.copy_(k / 64)
    up.bias.copy_(bias / 64)
    x = torch.randint(-2, 3, (n, c_in, h, w), generator=g).float()
    q_in = (x + 7).to(torch.uint8).contiguous(memory_format=torch.channels_last)
    got = _Int8Upsample(up, _Quant(1.0, 7))(q_in, _Quant(1 / 64, 3))
    want = F.conv_transpose2d(x, k, bias, stride=2, padding=1).relu().add(3).clamp(0, 255)
    assert got.shape == (n, 5, 2 * h, 2 * w) and got.dtype == torch.uint8
    assert torch.equal(got.float(), want)
    assert 0.2 < (want == 3).float().mean() < 0.8 and (want == 255).float().mean() < 0.2


@torch.no_grad()
def test_int8_leaves_its_input_and_repeats_itself_at_any_size(net, calibration) -> None:
    int8, _ = quantize(net, calibration)
    x = torch.rand(3, 1, 40, 72, generator=torch.Generator().manual_seed(3)) * 100
    before = x.clone()
    first, second = int8(x), int8(x)
    assert torch.equal(x, before)
    assert torch.equal(first, second) and first.shape == net(x).shape == (3, 313, 10, 18)
    rebuilt = Int8ColorizationNet(net, int8.input_ranges)  # what the job's actors build
    assert torch.equal(rebuilt(x), first)


@torch.no_grad()
def test_error_figure_is_the_distance_of_the_annealed_means(net, calibration) -> None:
    int8, error = quantize(net, calibration, temperature=0.5)
    want = annealed_mean(net(calibration), 0.5)
    assert error == AbError.between(want, annealed_mean(int8(calibration), 0.5))
    assert 0 < error.mean < error.p99 < error.max

    def colours(logits_NQhw: torch.Tensor) -> np.ndarray:  # E[ab] under softmax(logits / T)
        p = torch.softmax(logits_NQhw.double() / 0.5, dim=1).numpy()
        return np.einsum("nqhw,qc->nhwc", p, ab_bins().double().numpy())

    d = np.linalg.norm(colours(int8(calibration)) - colours(net(calibration)), axis=-1).ravel()
    written = (d.mean(), np.quantile(d, 0.99), d.max())
    assert np.allclose((error.mean, error.p99, error.max), written, rtol=1e-4, atol=1e-4)


def test_bad_uses_are_refused(net) -> None:
    with pytest.raises(ValueError, match="needs the colorization network, not Sequential"):
        quantize(nn.Sequential(net))
    with pytest.raises(ValueError, match="21 input ranges for 22 int8 layers"):
        Int8ColorizationNet(net, [(0.0, 1.0)] * 21)
    training = copy.deepcopy(net).train()
    before = {k: v.clone() for k, v in training.state_dict().items()}
    with pytest.raises(ValueError, match="eval mode"):
        Int8ColorizationNet(training, [(0.0, 1.0)] * 22)
    with pytest.raises(ValueError, match="eval mode"):
        quantize(training)
    assert all(torch.equal(v, before[k]) for k, v in training.state_dict().items())
    broken = copy.deepcopy(net)
    with torch.no_grad():
        broken.model3[0].weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="not finite"):
        quantize(broken)

"""Int8 inference of `ColorizationNet` on x86 CPUs with VNNI (u8 x s8 dot products).

The 3x3 convolutions and the transposed conv, 99% of the released network's 83.5 GFLOP at
256x256, run in oneDNN's int8 kernels: weights quantised per output channel (symmetric,
int8), activations per tensor (uint8, affine), with the ReLU after every one of them fused
and each layer writing the quantised input of the next. oneDNN has no int8 transposed conv
here, so model8's runs as four 2x2 convs, one per output phase (`_Int8Upsample`). On a CPU
core with AVX-512 VNNI but no AMX the network and the annealed mean run 1.9 times as fast
as in bf16 (0.091 s against 0.171 s an image at 256x256, batch 4; the int8 convs reach about
1,000 GOPS, the unit's peak). The rest stays in floating point:

- the final 1x1 conv to the 313 logits (fp32, or bf16 autocast when asked): they are
  divided by T = 0.38 before the annealed mean's softmax, which would magnify an 8-bit
  rounding 2.6 times;
- each block's BatchNorm, which follows the ReLU in the released net and so cannot be folded
  into the conv before it: the block's last conv writes fp32, and BatchNorm's per-channel
  scale and shift are folded into the quantisation of the next layer's input.

Activation ranges are calibrated once, on fixed photos (`calibration_l`): the same inputs
give the same outputs on every machine and every run. `quantize` also measures what int8
costs the weights there (`AbError`), which `jobs.colorize` checks before it uses them. The
figure is taken on the photos the ranges were fitted to: other inputs may fare worse
(`jobs.evaluate --precision int8` measures a dataset).
"""

from __future__ import annotations

import importlib.resources
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from colorcore.decode import ANNEALED_MEAN_T, annealed_mean
from colorcore.model import L_CENTER, L_SCALE, ColorizationNet

# Photos the activation ranges are calibrated on: scikit-image's public-domain and CC0
# samples (astronaut, chelsea, coffee, rocket), each whole and its centre half, as L in
# [0, 100] stored as uint8 (L * 2.55) at 256x256, the network's inference size.
CALIBRATION_FILE = "calibration_l.npz"
CALIBRATION_BATCH = 4


def calibration_l() -> torch.Tensor:
    """The calibration photos' L, (8, 1, 256, 256) fp32 in [0, 100]."""
    with importlib.resources.files("colorcore").joinpath(CALIBRATION_FILE).open("rb") as f:
        l_u8 = np.load(f)["l"]
    return torch.from_numpy(l_u8.astype(np.float32) / 2.55)[:, None]


def int8_kernels_available() -> bool:
    """Whether this torch build has oneDNN's int8 conv (x86 builds do)."""
    return hasattr(torch.ops.onednn, "qconv_pointwise") and hasattr(
        torch.ops.onednn, "qconv_prepack"
    )


@dataclass(frozen=True)
class _Quant:
    """uint8 affine quantisation q = round(x / scale) + zero_point, per tensor."""

    scale: float
    zero_point: int

    @classmethod
    def covering(cls, lo: float, hi: float) -> _Quant:
        lo, hi = min(lo, 0.0), max(hi, 0.0)  # zero must be exact: it is the padding
        scale = max(hi - lo, 1e-8) / 255.0
        return cls(scale, int(np.clip(round(-lo / scale), 0, 255)))


Tensorish = torch.Tensor | float


@dataclass(frozen=True)
class _Affine:
    """x -> round(x * mul + add) clamped to uint8: a quantisation, with whatever per-channel
    affine map comes before it folded in. `mul` and `add` are fp32 (1, C, 1, 1), C = 1 for a
    scalar, and so is x (a bf16 x would be promoted to fp32 by these 4-d factors, where 0-d
    ones would leave the sum in bf16, whose steps reach 1 above 128).

    Halves round up, in three passes over memory (a truncation of the clamped x * mul + add
    + 0.5), or, with `ties_to_even`, to even in four: for inputs on a grid that puts them on
    halves, where rounding them all up would shift them all, such as 8-bit L, which lands
    on k + 0.5 with the L quantisation's zero point of 128."""

    mul: torch.Tensor
    add: torch.Tensor
    ties_to_even: bool = False

    @classmethod
    def of(cls, mul: Tensorish, add: Tensorish, *, ties_to_even: bool = False) -> _Affine:
        def planes(v: Tensorish) -> torch.Tensor:
            return torch.as_tensor(v, dtype=torch.float32).reshape(1, -1, 1, 1)

        return cls(planes(mul), planes(add) + (0.0 if ties_to_even else 0.5), ties_to_even)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """`x` (left as it is) quantised: uint8, channels_last."""
        y = torch.addcmul(self.add, x, self.mul)
        if self.ties_to_even:
            y.round_()
        return y.clamp_(0.0, 255.0).to(torch.uint8, memory_format=torch.channels_last)


class _Int8Conv:
    """A convolution + ReLU as one oneDNN int8 kernel: uint8 in (quantised as `quant_in`),
    uint8 out (as `quant_out`) or fp32 out (quant_out None). Weights (O, I, kh, kw) are
    quantised per output channel, by `w_scale` (default: max |w| / 127 of each)."""

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        quant_in: _Quant,
        geometry: tuple[list[int], list[int], list[int], int],
        w_scale: torch.Tensor | None = None,
    ) -> None:
        w = weight.detach().float()
        if w_scale is None:
            w_scale = w.abs().amax(dim=(1, 2, 3)) / 127.0
        self.w_scale = w_scale.float().clamp_min(1e-12)
        w_q = torch.round(w / self.w_scale.view(-1, 1, 1, 1)).clamp_(-128, 127).to(torch.int8)
        self.w_zero_point = torch.zeros(w.shape[0], dtype=torch.int32)
        self.quant_in = quant_in
        self.geometry = geometry
        self.packed = torch.ops.onednn.qconv_prepack(
            w_q, self.w_scale, quant_in.scale, quant_in.zero_point, *self.geometry, None
        )
        self.bias = bias.detach().float() if bias is not None else None

    @classmethod
    def of(cls, conv: nn.Conv2d, quant_in: _Quant) -> _Int8Conv:
        geometry = (list(conv.stride), list(conv.padding), list(conv.dilation), conv.groups)
        return cls(conv.weight, conv.bias, quant_in, geometry)

    def __call__(self, q_in: torch.Tensor, quant_out: _Quant | None) -> torch.Tensor:
        out_scale, out_zero_point, out_dtype = (
            (quant_out.scale, quant_out.zero_point, None) if quant_out else (1.0, 0, torch.float32)
        )
        return torch.ops.onednn.qconv_pointwise(
            q_in,
            self.quant_in.scale,
            self.quant_in.zero_point,
            self.packed,
            self.w_scale,
            self.w_zero_point,
            self.bias,
            *self.geometry,
            out_scale,
            out_zero_point,
            out_dtype,
            "relu",
            [],
            "",
        )


class _Int8Upsample:
    """model8's ConvTranspose2d(kernel 4, stride 2, padding 1) + ReLU in oneDNN's int8 conv,
    which has no transposed form here. Each of the output's four phases (row and column
    parity) is a 2x2 conv of the input: output row 2i takes input rows i - 1 and i with
    kernel rows 3 and 1, row 2i + 1 rows i and i + 1 with kernel rows 2 and 0, and so for
    columns. The four run as one conv with four times the output channels, padded by one
    on every side, whose (h + 1) x (w + 1) output holds phase (r, c) in the window starting
    at (r, c); a strided copy interleaves them. Weights are quantised per output channel of
    the transposed conv (max |w| / 127 over its 16 taps and every input), as every phase's."""

    TAPS = ((3, 1), (2, 0))  # kernel rows (columns) of even and odd output rows (columns)

    def __init__(self, up: nn.ConvTranspose2d, quant_in: _Quant) -> None:
        geometry = (up.kernel_size, up.stride, up.padding, up.output_padding, up.dilation)
        if geometry != ((4, 4), (2, 2), (1, 1), (0, 0), (1, 1)) or up.groups != 1:
            raise ValueError(f"int8 upsampling takes model8's transposed conv, not {up}")
        w_IOkk = up.weight.detach().float()
        phases = [
            w_IOkk[:, :, list(rows)][:, :, :, list(cols)].transpose(0, 1)
            for rows in self.TAPS
            for cols in self.TAPS
        ]
        w_scale = w_IOkk.abs().amax(dim=(0, 2, 3)) / 127.0
        bias = up.bias.repeat(4) if up.bias is not None else None
        self.conv = _Int8Conv(
            torch.cat(phases), bias, quant_in, ([1, 1], [1, 1], [1, 1], 1), w_scale.repeat(4)
        )
        self.quant_in = quant_in

    def __call__(self, q_in: torch.Tensor, quant_out: _Quant) -> torch.Tensor:
        """uint8 (N, C, h, w) channels_last -> uint8 (N, C', 2h, 2w) channels_last."""
        n, _, h, w = q_in.shape
        phases_NHWC = self.conv(q_in, quant_out).permute(0, 2, 3, 1)
        c = phases_NHWC.shape[-1] // 4
        out = torch.empty((n, h, 2, w, 2, c), dtype=torch.uint8)
        for phase, (r, col) in enumerate(itertools.product((0, 1), repeat=2)):
            window = phases_NHWC[:, r : r + h, col : col + w, phase * c : (phase + 1) * c]
            out[:, :, r, :, col].copy_(window)
        return out.view(n, 2 * h, 2 * w, c).permute(0, 3, 1, 2)


class Int8ColorizationNet(nn.Module):
    """`ColorizationNet` in eval mode with its 3x3 convs and its transposed conv in int8: L
    (N, 1, H, W) in [0, 100] -> logits (N, Q, h, w). Built from a float net, which it shares
    the logits' conv with, and the (min, max) of each int8 layer's input in forward order
    (`input_ranges`, which `quantize` calibrates); `float_dtype` (bf16, or None for fp32) is
    the autocast dtype of the logits' conv, and so the logits' dtype, as the float net's
    under autocast."""

    def __init__(
        self,
        net: ColorizationNet,
        input_ranges: Sequence[tuple[float, float]],
        *,
        float_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        _check_quantisable(net)
        layers = _int8_layers(net)
        if len(input_ranges) != len(layers):
            raise ValueError(f"{len(input_ranges)} input ranges for {len(layers)} int8 layers")
        self.float_dtype = float_dtype
        self.input_ranges = tuple((float(lo), float(hi)) for lo, hi in input_ranges)
        quants = [_Quant.covering(lo, hi) for lo, hi in self.input_ranges]
        quant = dict(zip(layers, quants, strict=True))

        def int8(conv: nn.Conv2d) -> _Int8Conv:
            return _Int8Conv.of(conv, quant[conv])

        # Blocks model1..model7: [conv, relu] * n, BatchNorm (as scale, shift per channel).
        blocks = [getattr(net, f"model{index}") for index in range(1, 8)]
        self.blocks = [[int8(m) for m in block if isinstance(m, nn.Conv2d)] for block in blocks]
        # model8: transposed conv, relu, [conv, relu] * 2, 1x1 conv to the logits (float).
        self.upsample = _Int8Upsample(net.model8[0], quant[net.model8[0]])
        self.head = [int8(net.model8[2]), int8(net.model8[4])]
        self.logits = net.model8[6]
        # Each block's BatchNorm folded into the quantisation of the next block's input (the
        # last one's into the transposed conv's); the L input's centring and scaling into
        # its own.
        following = [convs[0].quant_in for convs in self.blocks[1:]] + [self.upsample.quant_in]
        self.requantise = [
            _Affine.of(scale / q_in.scale, shift / q_in.scale + q_in.zero_point)
            for (scale, shift), q_in in zip(
                (_affine_of_batchnorm(block[-1]) for block in blocks), following, strict=True
            )
        ]
        first = self.blocks[0][0].quant_in
        mul = 1.0 / (L_SCALE * first.scale)
        self.quantise_l = _Affine.of(mul, first.zero_point - L_CENTER * mul, ties_to_even=True)

    @property
    def plan(self) -> Int8Plan:
        return Int8Plan(self.input_ranges, self.float_dtype)

    @torch.no_grad()
    def forward(self, l_N1HW: torch.Tensor) -> torch.Tensor:
        if l_N1HW.ndim != 4 or l_N1HW.shape[1] != 1:
            raise ValueError(f"expected L as (N, 1, H, W), got {tuple(l_N1HW.shape)}")
        q = self.quantise_l(l_N1HW)
        for convs, requantise in zip(self.blocks, self.requantise, strict=True):
            for conv, following in itertools.pairwise(convs):
                q = conv(q, following.quant_in)
            q = requantise(convs[-1](q, None))
        q = self.upsample(q, self.head[0].quant_in)
        y = self.head[1](self.head[0](q, self.head[1].quant_in), None)
        with torch.autocast(
            "cpu", dtype=self.float_dtype or torch.float32, enabled=self.float_dtype is not None
        ):
            return self.logits(y)


@dataclass(frozen=True)
class Int8Plan:
    """What an `Int8ColorizationNet` is built from besides its float net: each int8 layer's
    calibrated input range and the logits conv's autocast dtype. A driver that calibrated
    (`quantize`) hands it to its workers, which build the very network it measured from the
    same weights without calibrating again, whatever their own CPUs would pick."""

    input_ranges: tuple[tuple[float, float], ...]
    float_dtype: torch.dtype | None

    def build(self, net: ColorizationNet) -> Int8ColorizationNet:
        return Int8ColorizationNet(net, self.input_ranges, float_dtype=self.float_dtype)


def _affine_of_batchnorm(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift), each (1, C, 1, 1): eval-mode BatchNorm as x * scale + shift."""
    scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
    shift = bn.bias.detach() - bn.running_mean * scale
    return scale.view(1, -1, 1, 1), shift.view(1, -1, 1, 1)


def _check_quantisable(net: ColorizationNet) -> None:
    if not isinstance(net, ColorizationNet):
        raise ValueError(f"int8 inference needs the colorization network, not {type(net).__name__}")
    if not int8_kernels_available():
        raise ValueError("this torch build has no oneDNN int8 convolution (x86 builds have)")
    if net.training:
        raise ValueError("int8 inference needs the network in eval mode")


def _int8_layers(net: ColorizationNet) -> list[nn.Module]:
    """The layers run in int8, in forward order: every 3x3 conv and the transposed conv."""
    return [
        m
        for m in net.modules()
        if isinstance(m, nn.ConvTranspose2d)
        or (isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3))
    ]


@dataclass(frozen=True)
class AbError:
    """Distance in ab (Lab units; ab spans about +-110) between two annealed-mean
    colourings, over every output pixel."""

    mean: float
    p99: float
    max: float

    @classmethod
    def between(cls, want_N2hw: torch.Tensor, got_N2hw: torch.Tensor) -> AbError:
        d = (got_N2hw - want_N2hw).norm(dim=1).flatten()
        return cls(d.mean().item(), d.quantile(0.99).item(), d.max().item())

    def __str__(self) -> str:
        return f"mean {self.mean:.2f}, 99th percentile {self.p99:.2f}, max {self.max:.2f}"


@torch.no_grad()
def quantize(
    net: ColorizationNet,
    calibration_L: torch.Tensor | None = None,
    *,
    float_dtype: torch.dtype | None = None,
    temperature: float = ANNEALED_MEAN_T,
) -> tuple[Int8ColorizationNet, AbError]:
    """`net` (eval mode, fp32, left unchanged) in int8, calibrated on `calibration_L`
    (default: `calibration_l()`), and what int8 costs there: the distance of its annealed
    mean at `temperature` from the fp32 network's."""
    _check_quantisable(net)
    calibration_L = calibration_l() if calibration_L is None else calibration_L
    ranges: dict[nn.Module, tuple[float, float]] = {}

    def record(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        x = args[0]
        lo, hi = ranges.get(module, (float("inf"), float("-inf")))
        ranges[module] = (min(lo, x.min().item()), max(hi, x.max().item()))

    layers = _int8_layers(net)
    hooks = [layer.register_forward_pre_hook(record) for layer in layers]
    try:
        parts = calibration_L.float().split(CALIBRATION_BATCH)
        want = torch.cat([annealed_mean(net(part), temperature) for part in parts])
    finally:
        for hook in hooks:
            hook.remove()
    if not all(np.isfinite(ranges[layer]).all() for layer in layers):
        raise ValueError("the network's activations on the calibration photos are not finite")
    int8 = Int8ColorizationNet(net, [ranges[layer] for layer in layers], float_dtype=float_dtype)
    got = torch.cat([annealed_mean(int8(part), temperature) for part in parts])
    return int8, AbError.between(want, got)

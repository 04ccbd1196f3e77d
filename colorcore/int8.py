"""Int8 inference of `ColorizationNet` on x86 CPUs with VNNI (u8 x s8 dot products).

The 3x3 convolutions, 94% of the released network's 83.5 GFLOP at 256x256, run in oneDNN's
int8 kernels: weights quantised per output channel (symmetric, int8), activations per tensor
(uint8, affine), with the ReLU after every one of them fused and each conv writing the
quantised input of the next. On a CPU core with AVX-512 VNNI but no AMX the network runs
1.7 times as fast as in bf16 (0.096 s against 0.166 s an image at 256x256; the int8 convs
reach about 1,000 GOPS, the unit's peak). The rest stays in floating point (fp32, or bf16
autocast when asked):

- the transposed conv of model8, for which oneDNN has no int8 kernel here (5% of the FLOPs);
- the final 1x1 conv to the 313 logits: they are divided by T = 0.38 before the annealed
  mean's softmax, which would magnify an 8-bit rounding 2.6 times;
- each block's BatchNorm, which follows the ReLU in the released net and so cannot be folded
  into the conv before it: the block's last conv writes fp32, and BatchNorm's per-channel
  scale and shift are folded into the quantisation of the next block's input.

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
from torch.nn import functional as F

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
    scalar: 4-d, so that a bf16 x is promoted to fp32 (a 0-d tensor takes no part in type
    promotion: the sum would be rounded to bf16, whose steps reach 1 above 128).

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
        """`x` (fp32 or bf16, left as it is) quantised: uint8, channels_last."""
        y = torch.addcmul(self.add, x, self.mul)
        if self.ties_to_even:
            y.round_()
        return y.clamp_(0.0, 255.0).to(torch.uint8, memory_format=torch.channels_last)


class _Int8Conv:
    """A Conv2d + ReLU as one oneDNN int8 kernel: uint8 in (quantised as `quant_in`), uint8
    out (as `quant_out`) or fp32 out (quant_out None)."""

    def __init__(self, conv: nn.Conv2d, quant_in: _Quant) -> None:
        w = conv.weight.detach().float()
        self.w_scale = (w.abs().amax(dim=(1, 2, 3)) / 127.0).clamp_min(1e-12)
        w_q = torch.round(w / self.w_scale.view(-1, 1, 1, 1)).clamp_(-128, 127).to(torch.int8)
        self.w_zero_point = torch.zeros(w.shape[0], dtype=torch.int32)
        self.quant_in = quant_in
        self.geometry = (list(conv.stride), list(conv.padding), list(conv.dilation), conv.groups)
        self.packed = torch.ops.onednn.qconv_prepack(
            w_q, self.w_scale, quant_in.scale, quant_in.zero_point, *self.geometry, None
        )
        self.bias = conv.bias.detach().float() if conv.bias is not None else None

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


class Int8ColorizationNet(nn.Module):
    """`ColorizationNet` in eval mode with its 3x3 convs in int8: L (N, 1, H, W) in [0, 100]
    -> logits (N, Q, h, w). Built from a float net, which it shares the float parts with,
    and the (min, max) of each 3x3 conv's input in forward order (`input_ranges`, which
    `quantize` calibrates); `float_dtype` (bf16, or None for fp32) is the autocast dtype of
    the parts kept in float, and the logits' dtype, as the float net's under autocast."""

    def __init__(
        self,
        net: ColorizationNet,
        input_ranges: Sequence[tuple[float, float]],
        *,
        float_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        _check_quantisable(net)
        convs = _convs3x3(net)
        if len(input_ranges) != len(convs):
            raise ValueError(f"{len(input_ranges)} input ranges for {len(convs)} 3x3 convs")
        self.float_dtype = float_dtype
        self.input_ranges = tuple((float(lo), float(hi)) for lo, hi in input_ranges)
        quants = [_Quant.covering(lo, hi) for lo, hi in self.input_ranges]
        quant = dict(zip(convs, quants, strict=True))

        def int8(conv: nn.Conv2d) -> _Int8Conv:
            return _Int8Conv(conv, quant[conv])

        # Blocks model1..model7: [conv, relu] * n, BatchNorm (as scale, shift per channel).
        blocks = [getattr(net, f"model{index}") for index in range(1, 8)]
        self.blocks = [[int8(m) for m in block if isinstance(m, nn.Conv2d)] for block in blocks]
        batchnorms = [_affine_of_batchnorm(block[-1]) for block in blocks]
        # Each block's BatchNorm folded into the quantisation of the next block's input (the
        # last one's goes to the float transposed conv); the L input's centring and scaling
        # into its own.
        self.requantise = [
            _Affine.of(scale / q_in.scale, shift / q_in.scale + q_in.zero_point)
            for (scale, shift), q_in in zip(
                batchnorms[:-1], [convs[0].quant_in for convs in self.blocks[1:]], strict=True
            )
        ]
        self.last_batchnorm = batchnorms[-1]
        first = self.blocks[0][0].quant_in
        mul = 1.0 / (L_SCALE * first.scale)
        self.quantise_l = _Affine.of(mul, first.zero_point - L_CENTER * mul, ties_to_even=True)
        # model8: transposed conv, relu, [conv, relu] * 2 (int8), 1x1 conv to the logits.
        self.upsample = net.model8[0]
        self.head = [int8(net.model8[2]), int8(net.model8[4])]
        self.logits = net.model8[6]
        head_in = self.head[0].quant_in
        self.quantise_head = _Affine.of(1.0 / head_in.scale, float(head_in.zero_point))

    def _autocast(self) -> torch.autocast:
        return torch.autocast(
            "cpu", dtype=self.float_dtype or torch.float32, enabled=self.float_dtype is not None
        )

    @torch.no_grad()
    def forward(self, l_N1HW: torch.Tensor) -> torch.Tensor:
        if l_N1HW.ndim != 4 or l_N1HW.shape[1] != 1:
            raise ValueError(f"expected L as (N, 1, H, W), got {tuple(l_N1HW.shape)}")
        q = self.quantise_l(l_N1HW)
        for convs, requantise in zip(self.blocks, [*self.requantise, None], strict=True):
            for conv, following in itertools.pairwise(convs):
                q = conv(q, following.quant_in)
            y = convs[-1](q, None)
            if requantise is not None:
                q = requantise(y)
        scale, shift = self.last_batchnorm
        x = y.mul_(scale).add_(shift)
        with self._autocast():
            x = F.relu(self.upsample(x))
        q = self.quantise_head(x)
        y = self.head[1](self.head[0](q, self.head[1].quant_in), None)
        with self._autocast():
            return self.logits(y)


def _affine_of_batchnorm(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift), each (1, C, 1, 1): eval-mode BatchNorm as x * scale + shift."""
    scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
    shift = bn.bias.detach() - bn.running_mean * scale
    return scale.view(1, -1, 1, 1), shift.view(1, -1, 1, 1)


def _check_quantisable(net: ColorizationNet) -> None:
    if not int8_kernels_available():
        raise ValueError("this torch build has no oneDNN int8 convolution (x86 builds have)")
    if net.training:
        raise ValueError("int8 inference needs the network in eval mode")


def _convs3x3(net: ColorizationNet) -> list[nn.Conv2d]:
    return [m for m in net.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]


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

    convs = _convs3x3(net)
    hooks = [conv.register_forward_pre_hook(record) for conv in convs]
    try:
        parts = calibration_L.float().split(CALIBRATION_BATCH)
        want = torch.cat([annealed_mean(net(part), temperature) for part in parts])
    finally:
        for hook in hooks:
            hook.remove()
    if not all(np.isfinite(ranges[c]).all() for c in convs):
        raise ValueError("the network's activations on the calibration photos are not finite")
    int8 = Int8ColorizationNet(net, [ranges[c] for c in convs], float_dtype=float_dtype)
    got = torch.cat([annealed_mean(int8(part), temperature) for part in parts])
    return int8, AbError.between(want, got)

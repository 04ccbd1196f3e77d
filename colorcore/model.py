"""The colorization network: the released ECCV16 architecture, returning logits.

Legend: N batch, Q = 313 ab bins, H, W input size, h, w = H/4, W/4 output size.

The default `ModelConfig` reproduces the authors' released PyTorch model: its `state_dict()`
has the same 82 keys and shapes, so the released weights load unchanged. Decoding the logits
into colours (mode, mean, annealed mean) lives in `colorcore.decode`; precision, compilation
and distribution are applied from outside.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from colorcore.quantize import NUM_AB_BINS, ab_bins

# Released code: the L input is centred and scaled as (L - 50) / 100, and the ab readout
# weights are the bin centres divided by 110.
L_CENTER = 50.0
L_SCALE = 100.0
AB_SCALE = 110.0

# (channels, convs, stride of the last conv, dilation) for blocks model1..model7.
_ENCODER = (
    (64, 2, 2, 1),
    (128, 2, 2, 1),
    (256, 3, 2, 1),
    (512, 3, 1, 1),
    (512, 3, 1, 2),
    (512, 3, 1, 2),
    (512, 3, 1, 1),
)
_DECODER_CHANNELS = 256


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Architecture of `ColorizationNet`; the defaults are the released ECCV16 network."""

    width: float = 1.0
    """Channel multiplier for every conv (1.0 = released; 1/16 gives a tiny CPU model)."""
    train_bn_affine: bool = False
    """Train BatchNorm scale and shift (the released Caffe training had none: frozen at 1, 0)."""
    bn_moving_average: float = 0.999
    """Decay of BatchNorm's running statistics, Caffe's `moving_average_fraction` (see
    `CaffeBatchNorm2d`); 0.999 is the released training's, an average over ~1,000 steps."""

    def __post_init__(self) -> None:
        if not 0.0 < self.width <= 4.0:
            raise ValueError(f"model width must be in (0, 4], got {self.width}")
        if not 0.0 <= self.bn_moving_average < 1.0:
            raise ValueError(f"bn_moving_average must be in [0, 1), got {self.bn_moving_average}")

    def channels(self, base: int) -> int:
        return max(1, round(base * self.width))


class _AbReadout(nn.Module):
    """The released 1x1 conv from bin probabilities to ab / 110, kept as a fixed buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("weight", (ab_bins() / AB_SCALE).T.reshape(2, NUM_AB_BINS, 1, 1))


class CaffeBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm whose running statistics follow Caffe's rule, as in the released training.

    Caffe keeps decayed sums of the batch statistics and of their weights, so after t training
    batches the running mean is sum_i f^(t-i) m_i / sum_i f^(t-i), f = `moving_average_fraction`:
    an exponential average with its start-up bias removed. Batch t enters with weight
    (1 - f) / (1 - f^t), so the first is taken whole. PyTorch's `momentum` is the same average
    with a fixed weight and no correction. The count t is the module's `num_batches_tracked`:
    the state dict keeps BatchNorm2d's keys, and a resumed run continues the same average.
    The variance is the unbiased batch variance, in both frameworks.
    """

    def __init__(self, num_features: int, *, moving_average_fraction: float) -> None:
        super().__init__(num_features)
        self.moving_average_fraction = moving_average_fraction

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        # momentum 1 makes F.batch_norm write the batch's own statistics into these two.
        batch_mean = torch.zeros_like(self.running_mean)
        batch_var = torch.ones_like(self.running_var)
        y = F.batch_norm(x, batch_mean, batch_var, self.weight, self.bias, True, 1.0, self.eps)
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            decayed = self.moving_average_fraction ** self.num_batches_tracked.double()
            weight = ((1.0 - self.moving_average_fraction) / (1.0 - decayed)).float()
            self.running_mean.lerp_(batch_mean, weight)
            self.running_var.lerp_(batch_var, weight)
        return y

    def extra_repr(self) -> str:
        fraction = self.moving_average_fraction
        return f"{self.num_features}, eps={self.eps}, moving_average_fraction={fraction}"


def _conv_block(
    c_in: int, c_out: int, convs: int, stride: int, dilation: int, bn_moving_average: float
) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(convs):
        last = i == convs - 1
        layers += [
            nn.Conv2d(
                c_in if i == 0 else c_out,
                c_out,
                kernel_size=3,
                stride=stride if last else 1,
                padding=dilation,
                dilation=dilation,
            ),
            nn.ReLU(inplace=True),
        ]
    layers.append(CaffeBatchNorm2d(c_out, moving_average_fraction=bn_moving_average))
    return nn.Sequential(*layers)


class ColorizationNet(nn.Module):
    """L channel in [0, 100], (N, 1, H, W) -> ab-bin logits (N, Q, h, w).

    The output is 1/4 of the input size (exactly so when H and W are multiples of 8).
    """

    def __init__(self, config: ModelConfig | None = None) -> None:
        super().__init__()
        self.config = config or ModelConfig()
        c_in = 1
        for index, (base, convs, stride, dilation) in enumerate(_ENCODER, start=1):
            c_out = self.config.channels(base)
            block = _conv_block(c_in, c_out, convs, stride, dilation, self.config.bn_moving_average)
            setattr(self, f"model{index}", block)
            c_in = c_out
        c_mid = self.config.channels(_DECODER_CHANNELS)
        self.model8 = nn.Sequential(
            nn.ConvTranspose2d(c_in, c_mid, kernel_size=4, stride=2, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(c_mid, c_mid, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(c_mid, c_mid, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(c_mid, NUM_AB_BINS, kernel_size=1),
        )
        self.model_out = _AbReadout()
        self._init_batchnorm()

    def _init_batchnorm(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
                module.weight.requires_grad_(self.config.train_bn_affine)
                module.bias.requires_grad_(self.config.train_bn_affine)

    def forward(self, l_N1HW: torch.Tensor) -> torch.Tensor:
        if l_N1HW.ndim != 4 or l_N1HW.shape[1] != 1:
            raise ValueError(f"expected L as (N, 1, H, W), got {tuple(l_N1HW.shape)}")
        x = (l_N1HW - L_CENTER) / L_SCALE
        for index in range(1, 9):
            x = getattr(self, f"model{index}")(x)
        return x

    def num_parameters(self, *, trainable_only: bool = False) -> int:
        """Parameters (the released count, 32,236,011, also counts the ab readout's 626
        values, a fixed buffer here)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

"""Data-dependent initialisation after Kraehenbuehl et al. (ICLR 2016), whose method the paper
used for its net: the within-layer part of it.

Layer by layer, in forward order, each convolution's weights are rescaled and its bias set so
that on a batch of real inputs every output channel has mean 0 and standard deviation 1
before its non-linearity. One forward pass does it: each layer is normalised as the batch
reaches it, so the next layer sees the already normalised activations. The weights it
rescales are PyTorch's random ones: the method's k-means variant (weights from k-means
centroids of the inputs' patches) and its between-layer rescaling of the learning rates are
not done here.
"""

from __future__ import annotations

import torch
from torch import nn

_CONVS = (nn.Conv2d, nn.ConvTranspose2d)


@torch.no_grad()
def data_dependent_init(model: nn.Module, inputs: torch.Tensor, *, eps: float = 1e-3) -> None:
    """Rescale every conv of `model` in place so its outputs on `inputs` are standardised.
    A channel that varies by no more than `eps` on them (dead on this batch) is only
    centred: dividing by its spread would blow its weights up. Inputs that do not vary
    at all are refused."""
    if inputs.numel() < 2 or not inputs.std() > eps:
        raise ValueError("the data-dependent init needs inputs that vary: these are flat")

    def standardise(module: nn.Module, _args: tuple, output: torch.Tensor) -> torch.Tensor:
        mean = output.mean(dim=(0, 2, 3))
        std = output.std(dim=(0, 2, 3))
        std = torch.where(std > eps, std, torch.ones_like(std))
        out_dim = 1 if isinstance(module, nn.ConvTranspose2d) else 0
        shape = [1] * module.weight.ndim
        shape[out_dim] = -1
        module.weight.div_(std.view(shape))
        module.bias.sub_(mean).div_(std)
        return (output - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)

    hooks = [m.register_forward_hook(standardise) for m in model.modules() if isinstance(m, _CONVS)]
    was_training = model.training
    try:
        model.train()  # BatchNorm normalises with batch statistics, as in training
        model(inputs)
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)

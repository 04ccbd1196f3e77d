"""Class-rebalanced multinomial cross-entropy (paper Eq. 2), computed in fp32.

Legend: N batch, Q = 313 ab bins, k bins kept by the soft encoding, h, w output size
(1/4 of the input), H, W the size the ab target was taken at (equal to h, w once subsampled).

The soft target is sparse (k bin indices + weights per pixel, from ``quantize.soft_encode``):
the loss gathers k log-probabilities per pixel instead of building the dense Q-wide target.
"""

from __future__ import annotations

import torch

GRAY_AB_THRESHOLD = 5.0  # released training: images whose |a|, |b| never exceed 5 are gray
REDUCTIONS = ("per_image", "per_pixel", "none")


def nongray_mask(ab_N2hw: torch.Tensor, threshold: float = GRAY_AB_THRESHOLD) -> torch.Tensor:
    """Bool (N,): True for images with some pixel whose |a| or |b| exceeds ``threshold``.

    Give it the subsampled ab target, as the released training does; gray photos in a colour
    dataset would otherwise teach the network to predict gray.
    """
    if ab_N2hw.ndim != 4 or ab_N2hw.shape[1] != 2:
        raise ValueError(f"ab_N2hw must have shape (N, 2, h, w), got {tuple(ab_N2hw.shape)}")
    return (ab_N2hw.abs() > threshold).flatten(1).any(dim=1)


def _check_shapes(
    logits_NQhw: torch.Tensor,
    bins_NkHW: torch.Tensor,
    weights_NkHW: torch.Tensor,
    rebalance_Q: torch.Tensor,
    nongray_N: torch.Tensor | None,
) -> None:
    if logits_NQhw.ndim != 4:
        raise ValueError(f"logits must have shape (N, Q, h, w), got {tuple(logits_NQhw.shape)}")
    N, Q, h, w = logits_NQhw.shape
    if rebalance_Q.shape != (Q,):
        raise ValueError(f"rebalance_Q must have shape ({Q},), got {tuple(rebalance_Q.shape)}")
    if bins_NkHW.ndim != 4 or (bins_NkHW.shape[0], *bins_NkHW.shape[2:]) != (N, h, w):
        raise ValueError(
            f"bins must have shape (N, k, h, w) = ({N}, k, {h}, {w}) to match the logits, "
            f"got {tuple(bins_NkHW.shape)} (subsample the target to the output size)"
        )
    if weights_NkHW.shape != bins_NkHW.shape:
        raise ValueError(
            f"weights shape {tuple(weights_NkHW.shape)} != bins shape {tuple(bins_NkHW.shape)}"
        )
    if nongray_N is not None and nongray_N.shape != (N,):
        raise ValueError(f"nongray_N must have shape ({N},), got {tuple(nongray_N.shape)}")


class _SparseCrossEntropy(torch.autograd.Function):
    """Per pixel v * -sum_j w_j log softmax(x)_{b_j}, in fp32 whatever the logits' dtype,
    with the gradient written out by hand:
    d/dx = v * (sum_j w_j softmax(x) - target), target_q = sum_{j: b_j = q} w_j.

    Only the log-sum-exp (one value per pixel) is kept for the backward pass, not the
    (N, Q, h, w) log-probabilities; autograd's own log_softmax + gather would store those and
    then scatter the gather's gradient into a zero-filled dense tensor. Under
    ``torch.compile`` the forward pass is one reduction over the logits and, on GPUs, the
    backward pass one elementwise pass that writes the gradient in the logits' dtype, then
    the k target entries of each pixel written over (`_gradient_by_overwrite`); otherwise the
    target is scattered into the fp32 softmax in place (`_gradient_by_scatter`).
    """

    @staticmethod
    def forward(ctx, logits_NQhw, bins_NkHW, weights_NkHW, v_Nhw):
        # log softmax(x)_b = x_b - logsumexp(x): only the k picked entries are formed, and the
        # log-sum-exp is exact where one logit lies far below the rest (recovering it from a
        # log-softmax entry, x_0 - log softmax(x)_0, cancels to noise there)
        lse_Nhw = torch.logsumexp(logits_NQhw.float(), dim=1)
        picked_NkHW = logits_NQhw.gather(1, bins_NkHW).float() - lse_Nhw[:, None]
        loss_Nhw = -v_Nhw * (weights_NkHW * picked_NkHW).sum(dim=1)
        ctx.save_for_backward(logits_NQhw, bins_NkHW, weights_NkHW, v_Nhw, lse_Nhw)
        return loss_Nhw

    @staticmethod
    def backward(ctx, grad_Nhw):
        logits_NQhw, bins_NkHW, weights_NkHW, v_Nhw, lse_Nhw = ctx.saved_tensors
        scale_N1hw = (grad_Nhw * v_Nhw)[:, None]
        if torch.compiler.is_compiling() and logits_NQhw.device.type != "cpu":
            grad = _gradient_by_overwrite(logits_NQhw, bins_NkHW, weights_NkHW, scale_N1hw, lse_Nhw)
        else:
            grad = _gradient_by_scatter(logits_NQhw, bins_NkHW, weights_NkHW, scale_N1hw)
        return grad.to(logits_NQhw.dtype), None, None, None


def _gradient_by_overwrite(logits_NQhw, bins_NkHW, weights_NkHW, scale_N1hw, lse_Nhw):
    """scale * (sum_j w_j softmax(x) - target), computed in fp32 and returned in the logits'
    dtype, for compilers: one elementwise pass writes every element as if its target were 0,
    then each pixel's k target entries are recomputed and written over theirs (a bin listed
    twice gets the sum of its weights, written twice). Each element costs a read and a write
    at the logits' width; building the target in place instead would compare every element
    with its pixel's k bins, re-reading k indices and weights per element."""
    w_sum_N1hw = weights_NkHW.sum(dim=1, keepdim=True)
    lse_N1hw = lse_Nhw[:, None]
    softmax_NQhw = (logits_NQhw.float() - lse_N1hw).exp()
    grad_NQhw = (scale_N1hw * (w_sum_N1hw * softmax_NQhw)).to(logits_NQhw.dtype)
    softmax_NkHW = (logits_NQhw.gather(1, bins_NkHW).float() - lse_N1hw).exp()
    target_NkHW = sum(
        torch.where(bins_NkHW[:, j, None] == bins_NkHW, weights_NkHW[:, j, None], 0.0)
        for j in range(bins_NkHW.shape[1])
    )
    at_bins_NkHW = scale_N1hw * (w_sum_N1hw * softmax_NkHW - target_NkHW)
    return grad_NQhw.scatter(1, bins_NkHW, at_bins_NkHW.to(logits_NQhw.dtype))


def _gradient_by_scatter(logits_NQhw, bins_NkHW, weights_NkHW, scale_N1hw):
    """scale * (sum_j w_j softmax(x) - target) in fp32, the target scattered in place into
    the scaled softmax (for eager runs)."""
    grad_NQhw = torch.softmax(logits_NQhw, dim=1, dtype=torch.float32)
    grad_NQhw.mul_(scale_N1hw * weights_NkHW.sum(dim=1, keepdim=True))
    return grad_NQhw.scatter_add_(1, bins_NkHW, -scale_N1hw * weights_NkHW)


def rebalanced_cross_entropy(
    logits_NQhw: torch.Tensor,
    bins_NkHW: torch.Tensor,
    weights_NkHW: torch.Tensor,
    rebalance_Q: torch.Tensor,
    *,
    nongray_N: torch.Tensor | None = None,
    reduction: str = "per_image",
) -> torch.Tensor:
    """Per pixel: v * -sum_j weights[j] * log_softmax(logits)[bins[j]], in fp32.

    v = rebalance_Q[bins[:, 0]] is the rebalancing weight of the nearest bin (``bins`` are
    ordered nearest first), times ``nongray_N`` (0 drops an image) when given. v carries no
    gradient, so the gradient is v * (softmax - target): the released net's weighting.

    reduction: "per_image" sums over pixels and divides by N (the released normalisation, which
    the paper's learning rates assume); "per_pixel" is the mean over N*h*w; "none" gives the
    (N, h, w) per-pixel losses.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    _check_shapes(logits_NQhw, bins_NkHW, weights_NkHW, rebalance_Q, nongray_N)
    # bf16 keeps 8 mantissa bits: too few for a log-softmax over Q classes summed over pixels.
    with torch.autocast(device_type=logits_NQhw.device.type, enabled=False):
        v_Nhw = rebalance_Q.to(logits_NQhw.device, torch.float32)[bins_NkHW[:, 0]]
        if nongray_N is not None:
            v_Nhw = v_Nhw * nongray_N.to(logits_NQhw.device, torch.float32)[:, None, None]
        loss_Nhw = _SparseCrossEntropy.apply(logits_NQhw, bins_NkHW, weights_NkHW.float(), v_Nhw)
    if reduction == "none":
        return loss_Nhw
    if reduction == "per_pixel":
        return loss_Nhw.mean()
    return loss_Nhw.sum() / loss_Nhw.shape[0]

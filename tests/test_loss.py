"""Tests for colorcore.loss: the sparse rebalanced loss against a dense reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from colorcore import loss, quantize

N, H, W = 3, 5, 6


def _batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random logits, the soft-encoded target of random ab values, random rebalancing weights."""
    generator = torch.Generator().manual_seed(seed)
    ab_N2HW = torch.rand(N, 2, H, W, generator=generator) * 160.0 - 80.0
    bins_NkHW, weights_NkHW = quantize.soft_encode(ab_N2HW)
    return {
        "logits_NQhw": 3.0 * torch.randn(N, quantize.NUM_AB_BINS, H, W, generator=generator),
        "bins_NkHW": bins_NkHW,
        "weights_NkHW": weights_NkHW,
        "rebalance_Q": 0.1 + 5.0 * torch.rand(quantize.NUM_AB_BINS, generator=generator),
    }


def _dense_reference(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pixel losses and per-pixel weights v, from the dense (N, Q, h, w) target."""
    target_NQhw = quantize.to_dense(batch["bins_NkHW"], batch["weights_NkHW"])
    v_Nhw = batch["rebalance_Q"][target_NQhw.argmax(dim=1)]
    ce_Nhw = -(target_NQhw * F.log_softmax(batch["logits_NQhw"].double(), dim=1)).sum(dim=1)
    return ce_Nhw.float() * v_Nhw, v_Nhw


def test_value_equals_the_dense_reference() -> None:
    batch = _batch()
    expected_Nhw, _ = _dense_reference(batch)
    per_pixel_Nhw = loss.rebalanced_cross_entropy(**batch, reduction="none")
    assert per_pixel_Nhw.shape == (N, H, W) and per_pixel_Nhw.dtype == torch.float32
    assert_close(per_pixel_Nhw, expected_Nhw)
    assert_close(loss.rebalanced_cross_entropy(**batch), expected_Nhw.sum() / N)


def test_gradient_is_the_released_weighted_softmax_minus_target() -> None:
    """The released net weighs the plain cross-entropy's gradient by v in its backward pass."""
    batch = _batch(seed=1)
    logits_NQhw = batch["logits_NQhw"].requires_grad_()
    loss.rebalanced_cross_entropy(**batch).backward()
    target_NQhw = quantize.to_dense(batch["bins_NkHW"], batch["weights_NkHW"])
    _, v_Nhw = _dense_reference(batch)
    plain_grad_NQhw = torch.softmax(logits_NQhw.detach(), dim=1) - target_NQhw
    assert_close(logits_NQhw.grad, plain_grad_NQhw * v_Nhw[:, None] / N)


def test_gradient_equals_autograd_of_the_dense_loss_for_weights_of_any_sum() -> None:
    """The hand-written backward against autograd through the dense loss (v held constant),
    with target weights that do not sum to 1 (each pixel's scaled differently), where the
    softmax term is weighted by their sum."""
    batch = _batch(seed=2)
    scale_N1HW = 0.25 + 2.0 * torch.rand(N, 1, H, W, generator=torch.Generator().manual_seed(3))
    batch["weights_NkHW"] = batch["weights_NkHW"] * scale_N1HW
    _, v_Nhw = _dense_reference(batch)
    dense_NQhw = batch["logits_NQhw"].double().requires_grad_()
    target_NQhw = quantize.to_dense(batch["bins_NkHW"], batch["weights_NkHW"]).double()
    ce_Nhw = -(target_NQhw * F.log_softmax(dense_NQhw, dim=1)).sum(dim=1)
    ((ce_Nhw * v_Nhw.double()).sum() / N).backward()
    logits_NQhw = batch["logits_NQhw"].requires_grad_()
    loss.rebalanced_cross_entropy(**batch).backward()
    assert_close(logits_NQhw.grad, dense_NQhw.grad.float(), rtol=1e-4, atol=1e-6)


def test_per_image_is_per_pixel_times_pixels_per_image() -> None:
    batch = _batch(seed=2)
    per_image = loss.rebalanced_cross_entropy(**batch, reduction="per_image")
    per_pixel = loss.rebalanced_cross_entropy(**batch, reduction="per_pixel")
    assert_close(per_image / per_pixel, torch.tensor(float(H * W)))


def test_gray_images_give_zero_loss_and_zero_gradient() -> None:
    batch = _batch(seed=3)
    logits_NQhw = batch["logits_NQhw"].requires_grad_()
    nongray_N = torch.tensor([True, False, True])
    per_pixel_Nhw = loss.rebalanced_cross_entropy(**batch, nongray_N=nongray_N, reduction="none")
    per_pixel_Nhw.sum().backward()
    assert torch.all(per_pixel_Nhw[1] == 0) and torch.all(per_pixel_Nhw[[0, 2]] > 0)
    assert torch.all(logits_NQhw.grad[1] == 0) and torch.any(logits_NQhw.grad[0] != 0)
    without_mask_Nhw = loss.rebalanced_cross_entropy(**batch, reduction="none")
    assert_close(per_pixel_Nhw[[0, 2]], without_mask_Nhw[[0, 2]])


def test_nongray_mask_is_strictly_above_the_threshold_in_a_or_b() -> None:
    ab_N2hw = torch.zeros(4, 2, 3, 3)
    ab_N2hw[0, 0, 1, 2] = 5.5
    ab_N2hw[1] = 5.0  # |a| = |b| = 5 everywhere: still gray
    ab_N2hw[1, 1, 0, 0] = -5.0
    ab_N2hw[2, 1, 2, 0] = -6.0
    mask_N = loss.nongray_mask(ab_N2hw)
    assert mask_N.dtype == torch.bool
    assert mask_N.tolist() == [True, False, True, False]
    assert loss.nongray_mask(ab_N2hw, threshold=5.6).tolist() == [False, False, True, False]
    with pytest.raises(ValueError, match="shape"):
        loss.nongray_mask(torch.zeros(4, 3, 3))


def test_bf16_logits_under_autocast_give_an_fp32_loss() -> None:
    batch = _batch(seed=4)
    logits_bf16 = batch["logits_NQhw"].bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = loss.rebalanced_cross_entropy(**{**batch, "logits_NQhw": logits_bf16})
    assert value.dtype == torch.float32
    expected = loss.rebalanced_cross_entropy(**{**batch, "logits_NQhw": logits_bf16.float()})
    assert_close(value, expected, rtol=1e-6, atol=0)
    value.backward()
    assert logits_bf16.grad.dtype == torch.bfloat16


def test_lambda_one_weights_give_the_plain_cross_entropy() -> None:
    batch = _batch(seed=5)
    batch["rebalance_Q"] = torch.ones(quantize.NUM_AB_BINS, dtype=torch.float64)
    target_NQhw = quantize.to_dense(batch["bins_NkHW"], batch["weights_NkHW"])
    plain = F.cross_entropy(batch["logits_NQhw"], target_NQhw, reduction="sum") / N
    assert_close(loss.rebalanced_cross_entropy(**batch), plain)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"reduction": "mean"}, "reduction"),
        ({"nongray_N": torch.ones(N + 1, dtype=torch.bool)}, "nongray_N"),
        ({"rebalance_Q": torch.ones(quantize.NUM_AB_BINS - 1)}, "rebalance_Q"),
        ({"logits_NQhw": torch.zeros(N, quantize.NUM_AB_BINS, H + 1, W)}, "subsample"),
        ({"logits_NQhw": torch.zeros(quantize.NUM_AB_BINS, H, W)}, "logits"),
        ({"weights_NkHW": torch.ones(N, 5, H, W) / 5}, "weights"),
    ],
)
def test_user_errors_raise_value_error(change: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        loss.rebalanced_cross_entropy(**{**_batch(), **change})


@pytest.mark.parametrize("logits_dtype", [torch.float32, torch.bfloat16])
def test_the_overwritten_and_the_scattered_gradient_agree(logits_dtype: torch.dtype) -> None:
    """The backward pass compilers get equals the eager one, bins listed twice included."""
    batch = _batch(seed=6)
    logits = batch["logits_NQhw"].to(logits_dtype)
    bins_NkHW = batch["bins_NkHW"].clone()
    bins_NkHW[0, 3] = bins_NkHW[0, 1]  # the first image's pixels list their second bin twice
    scale_N1hw = torch.rand(N, 1, H, W, generator=torch.Generator().manual_seed(7))
    lse_Nhw = torch.logsumexp(logits.float(), dim=1)
    args = (logits, bins_NkHW, batch["weights_NkHW"], scale_N1hw)
    scattered = loss._gradient_by_scatter(*args)
    overwritten = loss._gradient_by_overwrite(*args, lse_Nhw)
    assert overwritten.dtype == logits_dtype
    tolerance = {"rtol": 1e-5, "atol": 1e-6} if logits_dtype == torch.float32 else {}
    assert_close(overwritten, scattered.to(logits_dtype), **tolerance)
    compiled = torch.compile(loss._gradient_by_overwrite, fullgraph=True)  # Inductor's code
    assert_close(compiled(*args, lse_Nhw), overwritten, **tolerance)


@pytest.mark.parametrize("far", [-1e3, -1e5, -1e7])
def test_the_log_sum_exp_kept_for_the_backward_holds_when_a_logit_lies_far_below(far) -> None:
    """The forward pass keeps each pixel's log-sum-exp for `_gradient_by_overwrite`; a first
    logit far below the rest (a diverging run's) must not make it, or the gradient, noise."""
    batch = _batch(seed=9)
    logits = batch["logits_NQhw"].clone()
    logits[:, 0] = far
    v_Nhw = torch.rand(N, H, W, generator=torch.Generator().manual_seed(8))
    target = (batch["bins_NkHW"], batch["weights_NkHW"])
    out = loss._SparseCrossEntropy.apply(logits.requires_grad_(), *target, v_Nhw)
    kept_lse_Nhw = out.grad_fn.saved_tensors[-1]
    assert_close(kept_lse_Nhw, torch.logsumexp(logits.double(), dim=1).float())
    args = (logits.detach(), *target, v_Nhw[:, None])
    gradient = loss._gradient_by_overwrite(*args, kept_lse_Nhw)
    assert_close(gradient, loss._gradient_by_scatter(*args), rtol=1e-5, atol=1e-6)


def test_compiled_loss_equals_the_eager_loss() -> None:
    """The training job compiles the loss whole (no graph breaks) with ``TrainConfig.compile``."""
    batch = _batch(seed=7)
    nongray_N = torch.tensor([True, False, True])
    compiled = torch.compile(loss.rebalanced_cross_entropy, backend="aot_eager", fullgraph=True)
    for logits_dtype in (torch.float32, torch.bfloat16):
        values, grads = [], []
        for fn in (loss.rebalanced_cross_entropy, compiled):
            logits = batch["logits_NQhw"].to(logits_dtype, copy=True).requires_grad_()
            value = fn(**{**batch, "logits_NQhw": logits}, nongray_N=nongray_N)
            value.backward()
            values.append(value)
            grads.append(logits.grad)
        assert_close(values[1], values[0])
        assert_close(grads[1], grads[0])
        assert grads[1].dtype == logits_dtype and grads[1][1].abs().max() == 0  # gray image


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compiled_loss_on_gpu_takes_the_overwrite_backward_and_equals_cpu() -> None:
    """Inductor on CUDA: the backward the training step runs (`_gradient_by_overwrite`)."""
    batch = _batch(seed=8)
    nongray_N = torch.tensor([True, False, True])
    compiled = torch.compile(loss.rebalanced_cross_entropy, fullgraph=True)
    for logits_dtype in (torch.float32, torch.bfloat16):
        results = []
        for fn, device in ((loss.rebalanced_cross_entropy, "cpu"), (compiled, "cuda")):
            moved = {k: v.to(device) for k, v in batch.items()}
            # detached: on the CPU in fp32, .to() hands back the batch's own tensor
            logits = moved.pop("logits_NQhw").to(logits_dtype).detach().requires_grad_()
            value = fn(logits, **moved, nongray_N=nongray_N.to(device))
            value.backward()
            results.append((value.cpu(), logits.grad.cpu()))
        (value_cpu, grad_cpu), (value_gpu, grad_gpu) = results
        assert_close(value_gpu, value_cpu, rtol=1e-5, atol=1e-4)
        assert grad_gpu.dtype == logits_dtype and grad_gpu[1].abs().max() == 0  # gray image
        tolerance = {"rtol": 1e-5, "atol": 1e-6} if logits_dtype == torch.float32 else {}
        assert_close(grad_gpu, grad_cpu, **tolerance)

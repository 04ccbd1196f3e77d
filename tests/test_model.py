"""The network: released state-dict layout, shapes, gradients, bf16 agreement."""

from __future__ import annotations

import json

import pytest
import torch

from colorcore.model import AB_SCALE, CaffeBatchNorm2d, ColorizationNet, ModelConfig
from colorcore.quantize import NUM_AB_BINS, ab_bins
from tests.support import reference_path

TINY = ModelConfig(width=1 / 16)


def test_default_config_matches_released_state_dict() -> None:
    expected = json.loads(reference_path("eccv16_state_dict_shapes.json").read_text())
    model = ColorizationNet()
    got = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert got == expected
    assert list(got) == list(expected)  # same order, as the released file lists them
    # the published count includes the fixed ab readout (313 x 2)
    assert model.num_parameters() + model.model_out.weight.numel() == 32_236_011


def test_readout_is_a_fixed_buffer_of_bin_centres() -> None:
    model = ColorizationNet(TINY)
    assert "model_out.weight" in dict(model.named_buffers())
    assert "model_out.weight" not in dict(model.named_parameters())
    readout = model.model_out.weight.reshape(2, NUM_AB_BINS).T * AB_SCALE
    torch.testing.assert_close(readout, ab_bins())


def test_output_shape_and_no_nan() -> None:
    model = ColorizationNet(TINY).eval()
    light = torch.rand(2, 1, 176, 176) * 100
    logits = model(light)
    assert logits.shape == (2, NUM_AB_BINS, 44, 44)
    assert torch.isfinite(logits).all()
    assert model(torch.rand(1, 1, 64, 96) * 100).shape == (1, NUM_AB_BINS, 16, 24)


def test_every_trainable_parameter_gets_a_gradient_and_bn_affine_is_frozen() -> None:
    torch.manual_seed(0)
    model = ColorizationNet(TINY)
    model(torch.rand(2, 1, 64, 64) * 100).logsumexp(1).mean().backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    bn_params = {f"{name}.{p}" for name, m in model.named_modules()
                 if isinstance(m, torch.nn.BatchNorm2d) for p in ("weight", "bias")}  # fmt: skip
    assert frozen == bn_params
    assert len(frozen) == 14  # scale and shift of the 7 BatchNorm layers
    for name, p in trainable.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    bn = model.model1[4]
    assert torch.equal(bn.weight, torch.ones_like(bn.weight)) and not bn.bias.any()
    trained = ColorizationNet(ModelConfig(width=1 / 16, train_bn_affine=True))
    assert all(p.requires_grad for p in trained.parameters())


@pytest.mark.parametrize("fraction", [0.999, 0.9, 0.0])
def test_batchnorm_running_statistics_follow_caffe(fraction: float) -> None:
    """After t batches: the f-weighted mean of the batch means and unbiased variances."""
    torch.manual_seed(0)
    bn = CaffeBatchNorm2d(3, moving_average_fraction=fraction)
    batches = [torch.randn(4, 3, 5, 5) * (t + 1) + 2 * t for t in range(6)]
    for x in batches[:3]:
        torch.testing.assert_close(
            bn(x), torch.nn.functional.batch_norm(x, None, None, training=True)
        )
    resumed = CaffeBatchNorm2d(3, moving_average_fraction=fraction)
    resumed.load_state_dict(bn.state_dict())  # the count travels with the state dict
    for x in batches[3:]:
        resumed(x)
    decay = torch.tensor([fraction ** (5 - t) for t in range(6)], dtype=torch.float64)[:, None]
    means = torch.stack([x.mean((0, 2, 3)) for x in batches]).double()
    variances = torch.stack([x.var((0, 2, 3)) for x in batches]).double()
    expected_mean = (decay * means).sum(0) / decay.sum()
    torch.testing.assert_close(resumed.running_mean, expected_mean.float())
    torch.testing.assert_close(
        resumed.running_var, ((decay * variances).sum(0) / decay.sum()).float()
    )
    assert int(resumed.num_batches_tracked) == 6
    # the released decay keeps early batches: far from the last batch's statistics alone
    if fraction == 0.999:
        assert (resumed.running_mean - means[-1].float()).abs().min() > 1.0
    resumed.eval()  # inference normalises with the running statistics
    x = batches[0]
    running = (x - resumed.running_mean[:, None, None]) / (
        resumed.running_var[:, None, None] + 1e-5
    ).sqrt()
    torch.testing.assert_close(resumed(x), running)


def test_network_batchnorm_takes_the_configured_decay() -> None:
    model = ColorizationNet(ModelConfig(width=1 / 16, bn_moving_average=0.5))
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bns) == 7 and all(isinstance(m, CaffeBatchNorm2d) for m in bns)
    assert {m.moving_average_fraction for m in bns} == {0.5}
    assert ColorizationNet(TINY).model1[4].moving_average_fraction == 0.999
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError, match="bn_moving_average"):
            ModelConfig(bn_moving_average=bad)
    assert ModelConfig(bn_moving_average=0.0).bn_moving_average == 0.0  # the last batch only


def test_input_is_normalised_inside() -> None:
    model = ColorizationNet(TINY).eval()
    seen = {}
    model.model1[0].register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]))
    model(torch.full((1, 1, 16, 16), 75.0))
    torch.testing.assert_close(seen["x"], torch.full((1, 1, 16, 16), 0.25))


def test_bf16_autocast_agrees_with_fp32() -> None:
    torch.manual_seed(0)
    model = ColorizationNet(ModelConfig(width=0.25)).eval()
    light = torch.rand(2, 1, 64, 64) * 100
    with torch.no_grad():
        ref = model(light).softmax(1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(light).float().softmax(1)
    # probabilities, not raw logits, are what decoding uses
    assert (low - ref).abs().max() < 2e-2
    assert (low.argmax(1) == ref.argmax(1)).float().mean() > 0.9
    # An untrained net's probabilities are nearly flat: its logits, against their spread
    # (measured 0.0022; halved logits 0.5, another net's 1.4)
    with torch.no_grad():
        logits = model(light)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            gap = (model(light).float() - logits).pow(2).mean().sqrt() / logits.std()
    assert gap < 0.02, gap


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_batchnorm_averages_on_gpu_compiled_under_bf16_equal_the_cpu() -> None:
    """The training step's setting: channels_last, bf16 autocast, Inductor on CUDA."""
    torch.manual_seed(0)
    cpu = ColorizationNet(TINY)
    gpu = ColorizationNet(TINY)
    gpu.load_state_dict(cpu.state_dict())
    gpu = gpu.cuda().to(memory_format=torch.channels_last)
    step = torch.compile(gpu)
    for _ in range(3):
        x = torch.rand(4, 1, 32, 32) * 100
        cpu(x)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            step(x.cuda().contiguous(memory_format=torch.channels_last))
    for (name, a), (_, b) in zip(cpu.named_buffers(), gpu.named_buffers(), strict=True):
        if "running" in name or "num_batches" in name:
            torch.testing.assert_close(b.cpu().float(), a.float(), rtol=0.05, atol=0.05)
    assert int(gpu.model1[4].num_batches_tracked) == 3

"""sRGB <-> Lab against scikit-image, and the chroma gamut mapping's promises.

Legend: N batch, 3 colour channels at dim -3, H, W image size, M colours laid out as an image.
scikit-image is the oracle (channels last, float64); colorcore never imports it.
"""

from __future__ import annotations

import functools
import re
import subprocess
import sys
import warnings

import numpy as np
import pytest
import skimage.color
import skimage.data
import torch

from colorcore.color import lab_to_rgb, rgb_to_lab, rgb_to_lightness
from colorcore.data import lightness_and_target_ab

# Tolerances against scikit-image (measured: rgb_to_lab 2e-4, lab_to_rgb 6e-6, round trip 7e-6).
LAB_ATOL = 1e-3
RGB_ATOL = 1e-3
ROUND_TRIP_ATOL = 1e-4
# Chroma mapping (measured on the random colours below: L 1.3e-3, hue ray 5e-3, edge 7e-4).
KEPT_L_ATOL = 0.01
HUE_RAY_ATOL = 0.02  # distance in ab of the output from the input's hue ray
GAMUT_EDGE_ATOL = 2e-3  # how close to 0 or 1 a chroma-reduced colour's extreme channel is


def _sk_rgb2lab(rgb_3HW: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(skimage.color.rgb2lab(rgb_3HW.double().movedim(-3, -1).numpy()))


def _sk_lab2rgb(lab_3HW: torch.Tensor) -> torch.Tensor:
    with warnings.catch_warnings():  # far out-of-gamut inputs give negative Z: expected
        warnings.simplefilter("ignore")
        return torch.from_numpy(skimage.color.lab2rgb(lab_3HW.double().movedim(-3, -1).numpy()))


def _max_err(ours_3HW: torch.Tensor, ref_HW3: torch.Tensor) -> float:
    return (ours_3HW.double().movedim(-3, -1) - ref_HW3).abs().max().item()


def _colour_grid(values: torch.Tensor) -> torch.Tensor:
    """(3, V*V, V): every (r, g, b) with components from values, laid out as an image."""
    n = len(values)
    return torch.stack(torch.meshgrid(values, values, values, indexing="ij")).reshape(3, n * n, n)


@pytest.fixture(scope="module")
def colour_subset() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """65^3 8-bit colours (every 4th level and 255), their Lab and back, by scikit-image."""
    levels = torch.cat([torch.arange(0, 256, 4), torch.tensor([255])]).double()
    rgb_3HW = _colour_grid(levels / 255)
    lab_HW3 = _sk_rgb2lab(rgb_3HW)
    return rgb_3HW, lab_HW3, _sk_lab2rgb(lab_HW3.movedim(-1, -3))


@pytest.fixture(scope="module")
def random_lab() -> torch.Tensor:
    """(3, 200, 250) Lab: L uniform in [0, 100], a and b in [-200, 200], most out of gamut."""
    g = torch.Generator().manual_seed(0)
    unit = torch.rand(3, 200, 250, generator=g, dtype=torch.float64)
    return unit * torch.tensor([100.0, 400.0, 400.0]).view(3, 1, 1) - torch.tensor(
        [0.0, 200.0, 200.0]
    ).view(3, 1, 1)


def test_rgb_to_lab_fp32_matches_skimage_on_every_8bit_colour() -> None:
    # scikit-image in float32 halves the oracle's time; its own error (< 3e-5) is far below the
    # tolerance. The fp64 test below uses a float64 oracle.
    levels = torch.arange(256, dtype=torch.float32) / 255
    worst = 0.0
    for r0 in range(0, 256, 32):  # 2M colours a chunk bounds the memory
        rgb_HW3 = torch.stack(
            torch.meshgrid(levels[r0 : r0 + 32], levels, levels, indexing="ij"), dim=-1
        ).reshape(32 * 256, 256, 3)
        ref_HW3 = torch.from_numpy(skimage.color.rgb2lab(rgb_HW3.numpy()))
        lab_HW3 = rgb_to_lab(rgb_HW3.movedim(-1, -3)).movedim(-3, -1)
        worst = max(worst, (lab_HW3 - ref_HW3).abs().max().item())
    assert worst <= LAB_ATOL


def test_rgb_to_lab_fp64_matches_skimage(colour_subset) -> None:
    rgb_3HW, lab_HW3, _ = colour_subset
    lab_3HW = rgb_to_lab(rgb_3HW)
    assert lab_3HW.dtype == torch.float64
    assert _max_err(lab_3HW, lab_HW3) <= LAB_ATOL


@pytest.mark.parametrize("gamut", ["chroma", "clip"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lab_to_rgb_matches_skimage_in_gamut(colour_subset, dtype, gamut) -> None:
    _, lab_HW3, rgb_HW3 = colour_subset
    assert _max_err(lab_to_rgb(lab_HW3.movedim(-1, -3).to(dtype), gamut=gamut), rgb_HW3) <= RGB_ATOL


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_round_trip(colour_subset, dtype) -> None:
    rgb_3HW = colour_subset[0].to(dtype)
    torch.testing.assert_close(
        lab_to_rgb(rgb_to_lab(rgb_3HW)), rgb_3HW, rtol=0, atol=ROUND_TRIP_ATOL
    )


def test_real_photo_matches_skimage() -> None:
    rgb_HW3 = skimage.data.astronaut().astype(np.float64) / 255
    rgb_3HW = torch.from_numpy(rgb_HW3).movedim(-1, -3).float()
    lab_HW3 = skimage.color.rgb2lab(rgb_HW3)
    assert _max_err(rgb_to_lab(rgb_3HW), torch.from_numpy(lab_HW3)) <= LAB_ATOL
    lab_3HW = torch.from_numpy(lab_HW3).movedim(-1, -3).float()
    assert (
        _max_err(lab_to_rgb(lab_3HW), torch.from_numpy(skimage.color.lab2rgb(lab_HW3))) <= RGB_ATOL
    )
    torch.testing.assert_close(
        lab_to_rgb(rgb_to_lab(rgb_3HW)), rgb_3HW, rtol=0, atol=ROUND_TRIP_ATOL
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_chroma_keeps_L_and_hue_and_reaches_the_gamut_edge(random_lab, dtype) -> None:
    lab_3HW = random_lab.to(dtype)
    rgb_3HW = lab_to_rgb(lab_3HW)
    assert rgb_3HW.min() >= 0 and rgb_3HW.max() <= 1
    back_3HW = rgb_to_lab(rgb_3HW)
    torch.testing.assert_close(back_3HW[0], lab_3HW[0], rtol=0, atol=KEPT_L_ATOL)

    # Hue: the output's ab lies on the input's hue ray (no further out, never across grey).
    ab_in, ab_out = lab_3HW[1:], back_3HW[1:]
    chroma_in = ab_in.norm(dim=0)
    off_ray = (ab_in[0] * ab_out[1] - ab_in[1] * ab_out[0]).abs() / chroma_in
    assert off_ray.max() <= HUE_RAY_ATOL
    assert ((ab_in * ab_out).sum(dim=0) >= 0).all()
    assert (ab_out.norm(dim=0) <= chroma_in + HUE_RAY_ATOL).all()

    # In-gamut colours are left alone; the others get the most chroma the gamut allows, so an
    # extreme channel sits on 0 or 1 (a too-small scale would leave them strictly inside).
    clipped_3HW = lab_to_rgb(lab_3HW, gamut="clip")
    unchanged_HW = (rgb_3HW == clipped_3HW).all(dim=0)
    assert 0.02 < unchanged_HW.double().mean() < 0.2
    edge_HW = torch.minimum(rgb_3HW.amin(dim=0), 1 - rgb_3HW.amax(dim=0))
    assert edge_HW[~unchanged_HW].max() <= GAMUT_EDGE_ATOL


def test_in_gamut_colours_unchanged_by_chroma(colour_subset) -> None:
    lab_3HW = colour_subset[1].movedim(-1, -3).float()
    torch.testing.assert_close(lab_to_rgb(lab_3HW), lab_to_rgb(lab_3HW, gamut="clip"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_clip_matches_skimage_out_of_gamut(random_lab, dtype) -> None:
    atol = 1e-4 if dtype == torch.float32 else 1e-5  # measured 1.2e-5 and 1.7e-6
    rgb_3HW = lab_to_rgb(random_lab.to(dtype), gamut="clip")
    assert _max_err(rgb_3HW, _sk_lab2rgb(random_lab)) <= atol


def test_clip_changes_L_where_chroma_keeps_it() -> None:
    # A saturated green, a saturated blue and a bright yellow, all outside sRGB.
    lab_3HW = torch.tensor([[50.0, -120.0, 120.0], [30.0, 90.0, -140.0], [95.0, -10.0, 130.0]])
    lab_3HW = lab_3HW.T.reshape(3, 1, 3)
    L_clip = rgb_to_lab(lab_to_rgb(lab_3HW, gamut="clip"))[0]
    L_chroma = rgb_to_lab(lab_to_rgb(lab_3HW, gamut="chroma"))[0]
    assert ((L_clip - lab_3HW[0]).abs() > 1.0).all()
    torch.testing.assert_close(L_chroma, lab_3HW[0], rtol=0, atol=KEPT_L_ATOL)


def test_chroma_clamps_L() -> None:
    lab_3HW = torch.tensor([[120.0, 150.0, 0.0], [-10.0, 0.0, -90.0]]).T.reshape(3, 1, 2)
    rgb_3HW = lab_to_rgb(lab_3HW)
    torch.testing.assert_close(rgb_3HW[:, 0, 0], torch.ones(3), rtol=0, atol=1e-3)
    torch.testing.assert_close(rgb_3HW[:, 0, 1], torch.zeros(3), rtol=0, atol=1e-3)


def test_bf16_within_rounding_of_fp32(random_lab) -> None:
    g = torch.Generator().manual_seed(1)
    rgb_bf16 = torch.rand(2, 3, 32, 32, generator=g).bfloat16()
    lab_bf16 = rgb_to_lab(rgb_bf16)
    assert lab_bf16.dtype == torch.bfloat16
    # The docstring's bound: bf16 rounding (2^-9 relative) of the fp32 result for the same input.
    ref = rgb_to_lab(rgb_bf16.float())
    torch.testing.assert_close(lab_bf16.float(), ref, rtol=2**-8, atol=1e-2)

    lab_in = random_lab[:, :64, :64].bfloat16()
    rgb_out = lab_to_rgb(lab_in)
    assert rgb_out.dtype == torch.bfloat16
    torch.testing.assert_close(rgb_out.float(), lab_to_rgb(lab_in.float()), rtol=0, atol=2**-8)
    assert lab_to_rgb(lab_in.half()).dtype == torch.float16


def test_conversions_keep_their_precision_inside_an_autocast_region(random_lab) -> None:
    """A caller's bf16 autocast (around a network) does not round the 3 x 3 colour products."""
    rgb = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    lab = random_lab[:, :16, :16].float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = rgb_to_lab(rgb), lab_to_rgb(lab), rgb_to_lightness(rgb)
    outside = rgb_to_lab(rgb), lab_to_rgb(lab), rgb_to_lightness(rgb)
    for a, b in zip(inside, outside, strict=True):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_leading_dims_and_layouts() -> None:
    g = torch.Generator().manual_seed(2)
    rgb_N3HW = torch.rand(2, 2, 3, 5, 7, generator=g, dtype=torch.float64)
    lab = rgb_to_lab(rgb_N3HW)
    assert lab.shape == rgb_N3HW.shape
    torch.testing.assert_close(rgb_to_lab(rgb_N3HW[1]), lab[1])
    torch.testing.assert_close(rgb_to_lab(rgb_N3HW[1, 0]), lab[1, 0])
    torch.testing.assert_close(lab_to_rgb(lab[0, 1]), lab_to_rgb(lab)[0, 1])
    channels_last = rgb_N3HW[0].movedim(-3, -1).contiguous().movedim(-1, -3)
    torch.testing.assert_close(rgb_to_lab(channels_last), lab[0])
    assert rgb_to_lab(torch.rand(0, 3, 4, 4)).shape == (0, 3, 4, 4)


@pytest.mark.parametrize("fn", [rgb_to_lab, lab_to_rgb])
def test_bad_inputs_raise(fn) -> None:
    with pytest.raises(ValueError, match="3 channels"):
        fn(torch.rand(2, 4, 5, 5))
    with pytest.raises(ValueError, match="3 channels"):
        fn(torch.rand(5, 5))
    with pytest.raises(ValueError, match="floating-point"):
        fn(torch.zeros(3, 5, 5, dtype=torch.uint8))


def test_unknown_gamut_raises() -> None:
    with pytest.raises(ValueError, match="gamut"):
        lab_to_rgb(torch.zeros(3, 2, 2), gamut="hull")


def test_gradients() -> None:
    g = torch.Generator().manual_seed(3)
    rgb = (0.05 + 0.9 * torch.rand(1, 3, 3, 3, generator=g, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(rgb_to_lab, (rgb,))
    lab = rgb_to_lab(rgb).detach().requires_grad_()
    assert torch.autograd.gradcheck(lambda x: lab_to_rgb(x, gamut="clip"), (lab,))

    # Black input and far out-of-gamut Lab still give finite gradients.
    black = torch.zeros(3, 2, 2, requires_grad=True)
    rgb_to_lab(black).sum().backward()
    assert torch.isfinite(black.grad).all()
    wild = torch.tensor([[50.0, 300.0, -300.0], [0.0, 0.0, 0.0]]).T.reshape(3, 1, 2)
    wild.requires_grad_()
    lab_to_rgb(wild).sum().backward()
    assert torch.isfinite(wild.grad).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(random_lab) -> None:
    lab = random_lab.float()
    # Rounding can flip a bisection step right at the gamut edge (measured 2.3e-4 on an H200).
    torch.testing.assert_close(lab_to_rgb(lab.cuda()).cpu(), lab_to_rgb(lab), rtol=0, atol=1e-3)
    rgb = lab_to_rgb(lab)
    torch.testing.assert_close(rgb_to_lab(rgb.cuda()).cpu(), rgb_to_lab(rgb), rtol=0, atol=1e-3)


def _compiled_whole(fn, x: torch.Tensor) -> torch.Tensor:
    """fn(x) compiled by inductor as one graph (no host sync breaks it), checked to call no
    matrix product between its kernels."""
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    out, code = run_and_get_code(torch.compile(fn, fullgraph=True), x)
    assert not re.search(r"extern_kernels\.\w+\(", "".join(code)), "a kernel outside the fusion"
    return out


def test_compiled_conversions_are_one_graph_of_elementwise_kernels(random_lab) -> None:
    lab_23HW = random_lab[:, :40, :100].reshape(3, 2, 40, 50).transpose(0, 1).float()
    rgb_23HW = lab_to_rgb(lab_23HW, gamut="clip")
    for fn, x, atol in (
        (rgb_to_lab, rgb_23HW, 1e-4),
        (rgb_to_lightness, rgb_23HW, 1e-4),
        (functools.partial(lab_to_rgb, gamut="clip"), lab_23HW, 1e-5),
    ):
        torch.testing.assert_close(_compiled_whole(fn, x), fn(x), rtol=0, atol=atol)


def test_chroma_search_of_every_pixel_equals_the_gathered_one(random_lab) -> None:
    """The form compiled for accelerators searches every pixel instead of syncing to gather
    the out-of-gamut ones: the same mapping, and one graph of elementwise kernels."""
    from colorcore.color import (
        _chroma_mapped_everywhere,
        _gamut_excess,
        _lab_to_linear,
        linear_to_srgb,
    )

    def chroma_everywhere(lab_N3HW: torch.Tensor) -> torch.Tensor:  # lab_to_rgb's steps
        lab_N3P = lab_N3HW.flatten(2)
        linear_N3P = _lab_to_linear(lab_N3P)
        mapped = _chroma_mapped_everywhere(lab_N3P, linear_N3P, _gamut_excess(linear_N3P) > 0)
        return linear_to_srgb(mapped).clamp(0.0, 1.0).view_as(lab_N3HW)

    lab_23HW = random_lab[:, :40, :100].reshape(3, 2, 40, 50).transpose(0, 1).float()
    expected = lab_to_rgb(lab_23HW)
    assert not torch.allclose(expected, lab_to_rgb(lab_23HW, gamut="clip"))  # colours mapped
    torch.testing.assert_close(chroma_everywhere(lab_23HW), expected, rtol=0, atol=1e-4)
    # Rounding can flip a bisection step at the gamut edge, as between devices (test_cuda_...)
    compiled = _compiled_whole(chroma_everywhere, lab_23HW)
    torch.testing.assert_close(compiled, expected, rtol=0, atol=1e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_compiled_chroma_search_matches_eager(random_lab) -> None:
    """Compiled for a GPU, lab_to_rgb searches every pixel in one graph (no host sync)."""
    lab = random_lab[None].float().cuda()
    compiled = _compiled_whole(lab_to_rgb, lab)
    torch.testing.assert_close(compiled, lab_to_rgb(lab), rtol=0, atol=1e-3)


def test_constants_carry_the_compilers_mark_without_importing_it() -> None:
    from colorcore.color import compile_constant

    def build() -> torch.Tensor:
        return torch.ones(1)

    mark = vars(torch.compiler.assume_constant_result(lambda: None))
    cached = compile_constant(build)
    assert mark and all(getattr(cached, k, None) == v for k, v in mark.items())
    graphs = []

    def capture(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    torch._dynamo.reset()
    out = torch.compile(lambda x: x + cached(), backend=capture, fullgraph=True)(torch.ones(1))
    assert out.item() == 2.0 and len(graphs) == 1
    assert not [n for n in graphs[0].graph.nodes if n.target is torch.ones]  # a constant
    jobs = "jobs.colorize, jobs.evaluate, jobs.train, jobs.tune"
    code = f"import sys, {jobs}; print('torch._dynamo' in sys.modules)"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run.stdout.split() == ["False"]


def test_constants_first_built_under_inference_mode_serve_autograd() -> None:
    from colorcore.color import compile_constant

    ones = compile_constant(lambda n: torch.ones(n))
    with torch.inference_mode():
        ones(3)  # e.g. a colorize run before training in the same process
    x = torch.full((3,), 2.0, requires_grad=True)
    (x * ones(3)).sum().backward()  # an inference tensor cannot be saved for backward
    assert torch.equal(x.grad, torch.ones(3))


def test_lightness_alone_is_the_l_of_the_full_conversion() -> None:
    g = torch.Generator().manual_seed(3)
    for dtype, atol in ((torch.float32, 1e-4), (torch.float64, 1e-10)):
        rgb_N3HW = torch.rand(2, 3, 9, 11, generator=g, dtype=dtype)
        lightness = rgb_to_lightness(rgb_N3HW)
        assert lightness.shape == (2, 1, 9, 11) and lightness.dtype == dtype
        torch.testing.assert_close(lightness, rgb_to_lab(rgb_N3HW)[:, :1], rtol=0, atol=atol)
    assert rgb_to_lightness(torch.rand(3, 4, 5)).shape == (1, 4, 5)


def test_network_input_and_targets_equal_converting_everything_then_picking() -> None:
    """L at full size and ab at every 4th pixel (the released target) without converting the
    pixels in between, eagerly and traced whole by torch.compile."""
    seeded = torch.Generator().manual_seed(5)
    rgb_N3HW = torch.randint(0, 256, (2, 3, 18, 23), dtype=torch.uint8, generator=seeded)
    lab_N3HW = rgb_to_lab(rgb_N3HW.float() / 255)
    expected = (lab_N3HW[:, :1], lab_N3HW[:, 1:, ::4, ::4])
    for fn in (
        lightness_and_target_ab,
        torch.compile(lightness_and_target_ab, backend="aot_eager", fullgraph=True),
    ):
        l_N1HW, ab_N2hw = fn(rgb_N3HW, 4)
        assert ab_N2hw.shape == (2, 2, 5, 6)
        torch.testing.assert_close(l_N1HW, expected[0], rtol=0, atol=1e-4)
        torch.testing.assert_close(ab_N2hw, expected[1], rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="uint8 crops or floats"):  # not taken as [0, 1]
        lightness_and_target_ab(rgb_N3HW.to(torch.int16) * 257, 4)


def test_lightness_of_one_gray_channel_equals_its_three_channel_form() -> None:
    g = torch.Generator().manual_seed(4)
    for dtype, atol in ((torch.float32, 2e-5), (torch.float64, 1e-12)):
        gray_N1HW = torch.rand(2, 1, 7, 5, generator=g, dtype=dtype)
        gray_N1HW[0, 0, 0] = torch.tensor([0.0, 1.0, 0.02, 0.04045, 0.5])  # ends and the knee
        lightness = rgb_to_lightness(gray_N1HW)
        expected = rgb_to_lightness(gray_N1HW.expand(-1, 3, -1, -1))
        assert lightness.shape == (2, 1, 7, 5) and lightness.dtype == dtype
        torch.testing.assert_close(lightness, expected, rtol=0, atol=atol)
    with pytest.raises(ValueError, match="3 or 1 channels"):
        rgb_to_lightness(torch.rand(1, 2, 4, 4))

"""Ray start-up, device and precision choice, seeding."""

from __future__ import annotations

import pytest
import torch

from jobs import runtime


def test_init_ray_reuses_the_running_instance(ray_session) -> None:
    import ray

    before = ray.get_runtime_context().get_node_id()
    runtime.init_ray()  # must not start a second instance
    assert ray.get_runtime_context().get_node_id() == before

    @ray.remote(num_cpus=0.1)
    def endpoint() -> str | None:
        import os

        return os.environ.get("AWS_ENDPOINT_URL_S3")

    # workers inherit the S3 endpoint exported by the moto fixture
    assert ray.get(endpoint.remote()).startswith("http://127.0.0.1:")


def test_choose_precision_on_cpu() -> None:
    choice = runtime.choose_precision("cpu")
    assert choice.device == torch.device("cpu")
    expected = torch.bfloat16 if runtime.cpu_has_bf16_units() else None
    assert choice.autocast_dtype == expected and choice.reason
    assert runtime.choose_precision("cpu", "fp32").autocast_dtype is None
    with pytest.raises(ValueError, match="dtype must be"):
        runtime.choose_precision("cpu", "fp8")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_cuda_request_without_a_gpu_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="no CUDA device"):
        runtime.choose_precision("cuda")


def test_seed_everything_is_reproducible() -> None:
    runtime.seed_everything(3)
    a = torch.rand(4)
    g = runtime.seed_everything(3)
    assert torch.equal(a, torch.rand(4))
    assert torch.equal(
        torch.rand(2, generator=g), torch.rand(2, generator=torch.Generator().manual_seed(3))
    )

"""Ray start-up, device and precision choice, seeding."""

from __future__ import annotations

import platform
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from jobs import runtime, storage
from tests.support import ROOT, Commands


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


def test_local_paths_are_refused_where_work_runs_on_other_nodes(ray_session) -> None:
    """This one-node instance may keep a job's files on its disk; a second node, or a lone
    head without CPUs (its work waits for nodes to start), may not."""
    import copy

    import ray

    (node,) = [n for n in ray.nodes() if n["Alive"]]
    local, address = ["/data/runs"], "10.0.0.1:6379"
    assert runtime.local_paths_problem(local, address, [node]) is None
    other = copy.deepcopy(node) | {"NodeID": "f" * 56}
    assert "/data/runs: local paths, and the Ray cluster at 10.0.0.1:6379 has 2 nodes" in (
        runtime.local_paths_problem(local, address, [node, other]) or ""
    )
    assert runtime.local_paths_problem(local, address, [node, other | {"Alive": False}]) is None
    head = copy.deepcopy(node)
    head["Resources"]["CPU"] = 0.0
    assert "one node, with no CPUs for work" in (
        runtime.local_paths_problem(local, address, [head]) or ""
    )
    assert runtime.local_paths_problem(local, "127.0.0.1:6379", [node]) is None
    assert "is reached through Ray Client, from outside" in (  # the paths are on the client
        runtime.local_paths_problem(local, "ray://127.0.0.1:10001", [node]) or ""
    )


def test_workers_fit_each_on_one_node_in_rays_units() -> None:
    from jobs.runtime import workers_fit

    assert workers_fit({"CPU": 0.1}, [{"CPU": 1.0}]) == 10  # not 1.0 // 0.1 == 9
    assert workers_fit({"CPU": 3}, [{"CPU": 4}, {"CPU": 4}]) == 2  # 8 CPUs, 2 on one node
    gpu = {"CPU": 4, "GPU": 1}
    assert workers_fit(gpu, [{"CPU": 16, "GPU": 2}, {"CPU": 64}]) == 2
    assert workers_fit(gpu, []) == 0


def test_choose_precision_on_cpu() -> None:
    choice = runtime.choose_precision("cpu")
    assert choice.device == torch.device("cpu")
    expected = torch.bfloat16 if runtime.cpu_has_bf16_units() else None
    assert choice.autocast_dtype == expected and choice.reason
    assert runtime.choose_precision("cpu", "fp32").autocast_dtype is None
    with pytest.raises(ValueError, match="dtype must be"):
        runtime.choose_precision("cpu", "fp8")
    int8 = runtime.choose_precision("auto", "int8")  # the CPU, whatever GPUs there are
    assert int8.int8 and int8.device == torch.device("cpu") and int8.autocast_dtype == expected
    assert not choice.int8
    with pytest.raises(ValueError, match="int8 runs on CPUs"):
        runtime.choose_precision("cuda", "int8")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_cuda_request_without_a_gpu_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"torch sees no CUDA device: torch \S+ is "):
        runtime.choose_precision("cuda")


_FREED_BLOCKS = """
import os, sys
import numpy as np
from jobs.runtime import keep_freed_memory

def resident() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

if sys.argv[1] == "keep":
    assert keep_freed_memory()
kept = []
for size in (24 << 20, 96 << 20):  # below and above the 32 MB a heap block may have
    before = resident()
    block = np.ones(size, np.uint8)  # every page written
    del block
    kept.append(resident() - before)
print(*kept)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_keep_freed_memory_keeps_batch_sized_blocks_and_returns_larger_ones() -> None:
    def resident_after_free(mode: str) -> list[int]:
        run = [sys.executable, "-c", _FREED_BLOCKS, mode]
        out = subprocess.run(run, check=True, capture_output=True, text=True).stdout
        return [int(n) for n in out.split()]

    # By default a 24 MB block is an mmap of its own, unmapped when freed; kept, it stays
    # mapped for the next allocation. A 96 MB one goes back either way.
    assert max(resident_after_free("default")) < 8 << 20
    kept_24, kept_96 = resident_after_free("keep")
    assert kept_24 > 20 << 20 and kept_96 < 8 << 20
    with pytest.raises(ValueError, match="kept must be"):
        runtime.keep_freed_memory(1 << 31)


def test_seed_everything_seeds_python_numpy_and_torch_with_the_seed() -> None:
    import random

    g = runtime.seed_everything(3)
    assert torch.equal(torch.rand(4), torch.rand(4, generator=torch.Generator().manual_seed(3)))
    assert random.random() == random.Random(3).random()
    assert np.random.rand() == np.random.RandomState(3).rand()
    assert torch.equal(
        torch.rand(2, generator=g), torch.rand(2, generator=torch.Generator().manual_seed(3))
    )
    runtime.seed_everything(4)
    assert random.random() != random.Random(3).random()


def test_gpus_are_left_to_a_cluster_to_start(monkeypatch) -> None:
    """Joining a cluster (which may start GPU nodes on demand), or needing none: no check."""
    import ray

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # (the session's Ray aside)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(ValueError, match="needs 8 GPU"):
        runtime.check_gpus(8, "x")
    runtime.check_gpus(0, "x")
    runtime.check_gpus(8, "x", address="ray://head:10001")
    monkeypatch.setenv("RAY_ADDRESS", "http://head:8265")
    runtime.check_gpus(8, "x")


def test_cpu_units_are_read_from_the_cpus_flags(monkeypatch) -> None:
    cases = [({"amx_bf16"}, True, False), ({"avx512_bf16", "avx_vnni"}, True, True),
             ({"avx512_vnni"}, False, True), (set(), False, False)]  # fmt: skip
    for flags, bf16, int8 in cases:
        monkeypatch.setattr(runtime, "_cpu_flags", lambda flags=flags: flags)
        assert (runtime.cpu_has_bf16_units(), runtime.cpu_has_int8_units()) == (bf16, int8)
        dtype = runtime.choose_precision("cpu").autocast_dtype
        assert dtype == (torch.bfloat16 if bf16 else None)


GPU_CASES = {  # job's flags: (GPUs it needs, its message)
    "train --preset ci --use-gpu": (2, "training with use_gpu needs 2 GPU(s)"),
    "tune --preset ci --train.use-gpu": (2, "a trial (train.use_gpu) needs 2"),
    "evaluate --use-gpu --num-actors 2 --model m.pt --data d": (
        2,
        "use_gpu (--num-actors 2, a GPU each) needs 2 GPU(s)",
    ),
    "colorize --model m.pt --device cuda": (1, "--device cuda needs 1"),
    "colorize --model m.pt --accelerator-type L40S --model-actors 1": (
        1,
        "--accelerator-type needs 1",
    ),
}


@pytest.fixture(scope="module")
def gpu_runs(tmp_path_factory) -> Iterator[tuple[Commands, dict[str, Path]]]:
    """Each case whose GPUs the machine lacks, run on a private local Ray instance (no
    RAY_ADDRESS) with its outputs in a folder of its own: (the runs, their folders)."""
    import os

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    folders = {case: tmp_path_factory.mktemp("gpu-case") for case in GPU_CASES}
    commands = {}
    for case, (gpus, _) in GPU_CASES.items():
        if torch.cuda.device_count() >= gpus:
            continue
        job, *flags = case.split()
        outputs = {
            "train": ["--storage", str(folders[case] / "runs")],
            "tune": ["--storage", str(folders[case] / "runs")],
            "evaluate": ["--output", str(folders[case] / "eval")],
            "colorize": ["--input", str(folders[case] / "in"), "--output",
                         str(folders[case] / "out")],
        }[job]  # fmt: skip
        commands[case] = [sys.executable, "-m", f"jobs.{job}", *flags, *outputs]
    runs = Commands(commands, env=env, cwd=ROOT)
    yield runs, folders
    runs.close()


@pytest.mark.parametrize("case", GPU_CASES)
def test_a_job_that_needs_gpus_fails_at_once_without_them(case, gpu_runs) -> None:
    """A job asking for GPUs the machine lacks stops before Ray starts and before it writes
    anything, instead of waiting forever for resources no autoscaler will add."""
    gpus, message = GPU_CASES[case]
    if torch.cuda.device_count() >= gpus:
        pytest.skip("the machine has the GPUs")
    runs, folders = gpu_runs
    status, _, err = runs.result(case)
    assert status != 0
    assert message in err, err[-2000:]
    assert "cannot add any" in err and not list(folders[case].iterdir())


def test_a_gpu_type_is_missing_where_no_node_has_it_nor_can_get_it() -> None:
    h100 = {"CPU": 16, "GPU": 8, "accelerator_type:H100": 1}
    l40s_types = {"CPU": 160, "GPU": 10, "accelerator_type:L40S": 10, "accelerator_type:A10G": 0}
    missing = runtime.missing_accelerator_type
    assert missing("H100", [{"CPU": 4}, h100], None, cluster=True) is None  # a node has it
    assert missing("L40S", [{"CPU": 4}], l40s_types, cluster=True) is None  # a type has it
    assert missing("H100", [h100], None, cluster=False) is None  # this machine has it
    # a type misspelt, or one the cluster's node types give none of (A10G at most 0 nodes)
    for name in ("H1OO", "A10G"):
        assert missing(name, [h100], l40s_types, cluster=True) == (
            f"there is no GPU of type {name!r} on any node type of the cluster "
            "(types there: H100, L40S)"
        )
    # an autoscaler that does not say what its node types have: it may yet start one
    assert "on any live node of the cluster (types there: H100)" in missing(
        "H1OO", [h100], None, cluster=True
    )
    # the local instance a job starts has no autoscaler
    assert missing("L40S", [h100], None, cluster=False) == (
        "there is no GPU of type 'L40S' on this machine's local Ray instance, which has no "
        "autoscaler (types there: H100)"
    )


def test_a_gpu_type_the_local_instance_lacks_fails_before_any_work(
    ray_session, ci_config, tmp_path
) -> None:
    """Each job that takes --accelerator-type refuses one no node has, where no autoscaler
    can start one, before its work (Ray would wait for it in silence, for ever)."""
    import dataclasses

    from colorcore.model import ColorizationNet, ModelConfig
    from colorcore.weights import to_safetensors
    from jobs import colorize, evaluate, evaluate_parts, train, tune

    refused = r"there is no GPU of type 'H1OO' on this machine's local Ray instance"
    runtime.check_accelerator_type(None, "a job")  # no type asked for: nothing to check
    with pytest.raises(
        ValueError,
        match=r"^a job: " + refused + r", which has no autoscaler \(types there: [^)]*\)$",
    ):
        runtime.check_accelerator_type("H1OO", "a job")

    model = tmp_path / "tiny.safetensors"
    model.write_bytes(to_safetensors(ColorizationNet(ModelConfig(width=1 / 16))))
    (tmp_path / "in").mkdir()
    colorize_cfg = colorize.ColorizeConfig(
        input=str(tmp_path / "in"), output=str(tmp_path / "out"), model=str(model),
        accelerator_type="H1OO", model_actors=1,
    )  # fmt: skip
    with pytest.raises(ValueError, match="colorize --accelerator-type: " + refused):
        colorize._run_on_ray([], colorize_cfg, colorize._provenance("0" * 64, colorize_cfg))
    evaluate_cfg = evaluate.EvaluateConfig(
        data=ci_config.val_data, prior=ci_config.prior_url, model=str(model),
        output=str(tmp_path / "eval"), use_gpu=True, accelerator_type="H1OO",
    )  # fmt: skip
    with pytest.raises(ValueError, match="evaluate --accelerator-type: " + refused):
        evaluate.main(evaluate_cfg)
    train_cfg = dataclasses.replace(ci_config, use_gpu=True, accelerator_type="H1OO", name="h1oo")
    with pytest.raises(ValueError, match="train --accelerator-type: " + refused):
        train.main(train_cfg)
    search = dataclasses.replace(tune.ci(), train=train_cfg, storage=str(tmp_path / "searches"))
    with pytest.raises(ValueError, match="tune --train.accelerator-type: " + refused):
        tune.main(search)
    assert not storage.list_files(search.url)
    # Nothing written but the records of what the evaluation and run are (each start before
    # any result rewrites them)
    assert not (tmp_path / "out").exists()
    assert storage.list_files(str(tmp_path / "eval")) == [
        storage.join(evaluate_parts.folder(str(tmp_path / "eval")), evaluate_parts.RUN_FILE)
    ]
    assert storage.list_files(train_cfg.run_url) == [
        storage.join(train_cfg.run_url, train.RUN_FILE)
    ]


def test_actors_and_tasks_the_local_instance_cannot_hold_fail_before_any_work(
    ray_session, ci_config, tmp_path
) -> None:
    """The session's instance has 2 CPUs and no autoscaler: model actors that take them all
    leave none for the reads that feed them, and a task larger than the node never starts.
    Ray would wait in silence, for ever; each job says so at once."""
    from colorcore.model import ColorizationNet, ModelConfig
    from colorcore.weights import to_safetensors
    from jobs import colorize, evaluate, prior

    model = tmp_path / "tiny.safetensors"
    model.write_bytes(to_safetensors(ColorizationNet(ModelConfig(width=1 / 16))))
    (tmp_path / "in").mkdir()
    colorize_cfg = colorize.ColorizeConfig(
        input=str(tmp_path / "in"), output=str(tmp_path / "out"), model=str(model),
        model_actors=4, device="cpu",  # (the session's instance has a machine's GPUs)
    )  # fmt: skip
    with pytest.raises(
        ValueError,
        match=r"^colorize needs 4 model actor\(s\) of 0.5 CPUs each \(each on one node beside "
        r"0.25 CPUs for other tasks\), and the local Ray instance holds 3 \(2 CPUs, 0 GPUs\): "
        r"lower --model-actors or --actor-cpus, or run on a cluster \(RAY_ADDRESS\)$",
    ):
        colorize._run_on_ray([], colorize_cfg, colorize._provenance("0" * 64, colorize_cfg))
    runtime.check_local_fit("3 of them", {"CPU": 0.5}, 3, beside={"CPU": 0.25}, hint="")  # fit
    evaluate_cfg = evaluate.EvaluateConfig(
        data=ci_config.val_data, prior=ci_config.prior_url, model=str(model),
        output=str(tmp_path / "eval"), num_actors=3,
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"evaluate needs 3 model actor\(s\) .* holds 2 \("):
        evaluate.main(evaluate_cfg)
    prior_cfg = prior.PriorConfig(
        dataset=ci_config.data, output=str(tmp_path / "prior.npz"), cpus_per_task=3, s3=ci_config.s3
    )
    with pytest.raises(ValueError, match=r"prior needs counting tasks of 3 CPUs .* holds 0 \("):
        prior.main(prior_cfg)
    assert not (tmp_path / "out").exists() and not (tmp_path / "prior.npz").exists()

"""Where jobs start or join Ray, choose device and dtype, and seed.

Every job goes through `init_ray` so that a laptop run, a test session and a job submitted to
a cluster behave alike: with no address (argument or ``RAY_ADDRESS``) a private local
instance is started; inside ``ray job submit`` the job joins its cluster; when the caller
(a test, a notebook) already started Ray, that instance is used as it is.
"""

from __future__ import annotations

import ctypes
import logging
import os
import random
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

log = logging.getLogger(__name__)

# What a local instance's processes inherit, where the user has not set it. Ray Train's
# controller takes one report from a worker each time it polls it (every 2 s by default),
# and a worker's report waits while the one before it is not taken: a short local run (a
# search's trial, the smoke run) spends more time in these waits than in its steps. Its
# preemption watcher, an actor of its own for every worker group, watches for nodes an
# autoscaler drains, which one machine has none of: its start costs each `fit` a process.
LOCAL_RAY_ENV = {
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
}


def set_local_ray_env() -> None:
    """`LOCAL_RAY_ENV` into this process's environment, for the local instance it starts,
    where the user has not set them."""
    for name, value in LOCAL_RAY_ENV.items():
        os.environ.setdefault(name, value)


def init_ray(
    address: str | None = None,
    *,
    num_cpus: int | None = None,
    paths: Sequence[str | None] = (),
) -> None:
    """Start or join Ray once per process. `paths` are the job's inputs and outputs that its
    work reads or writes on whichever node it runs. Joining a cluster, local paths among
    them are refused where work runs on other nodes (`local_paths_problem`), and warned of
    on a one-node cluster."""
    import ray

    from jobs import storage

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        log.info("joining the Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=True)
        local = [u for u in paths if u and storage.is_local(u)]
        if local and (problem := local_paths_problem(local, address, ray.nodes())):
            ray.shutdown()  # a caller that catches this and calls again is checked again
            raise ValueError(problem)
        for url in local:
            print(
                f"warning: {url} is a local path and this job joins the Ray cluster at "
                f"{address}: it is this node's disk, which work on nodes that join later "
                "would not see; give shared storage (s3://...) unless the cluster stays one "
                "node",
                file=sys.stderr,
            )
    else:
        # "local" rather than auto-detection: a stale address file from a dead cluster
        # would otherwise make Ray try to join it.
        log.info("starting a local Ray instance")
        set_local_ray_env()
        # The dashboard serves the state API, which Ray Train's placement-group cleaner
        # polls: without it the workers' resources of a trainer whose driver was stopped
        # (a Tune trial that ASHA ends) are never released.
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=True)


def local_paths_problem(local: Sequence[str], address: str, nodes: Sequence[dict]) -> str | None:
    """Why the job's `local` paths cannot serve a cluster of `nodes` (``ray.nodes()``), or
    None: through Ray Client (``ray://``) the paths are on this machine, outside the
    cluster; with other nodes alive, or with this one offering no CPUs (as the head nodes of
    `cluster/` do: the work waits for nodes to start), work runs on nodes whose disks do not
    hold them."""
    alive = [n for n in nodes if n.get("Alive")]
    client = address.startswith("ray://")
    if not client and len(alive) == 1 and alive[0].get("Resources", {}).get("CPU", 0) > 0:
        return None
    if client:
        where = "is reached through Ray Client, from outside"
    elif len(alive) > 1:
        where = f"has {len(alive)} nodes"
    else:
        where = "has one node, with no CPUs for work"
    return (
        f"{', '.join(local)}: local paths, and the Ray cluster at {address} {where}: work "
        "on other nodes would not find them or would write to disks of its own; give shared "
        "storage (s3://...)"
    )


def workers_fit(worker: Mapping[str, float], nodes: Sequence[Mapping[str, float]]) -> int:
    """How many workers, each taking `worker`'s resources on one node, the nodes (their
    ``ray.nodes()`` resources) hold. Counted in Ray's units of 1/10,000, as Ray places
    them: ten workers of 0.1 CPU fit one CPU, where floats would make it nine."""

    def units(amount: float) -> int:
        return round(amount * 10_000)

    return sum(min(units(n.get(k, 0)) // units(v) for k, v in worker.items()) for n in nodes)


def alive_node_resources() -> list[dict[str, float]]:
    """The resources of each live node of the Ray instance joined (`workers_fit`'s nodes)."""
    import ray

    return [node["Resources"] for node in ray.nodes() if node["Alive"]]


def check_local_fit(
    what: str,
    needs: Mapping[str, float],
    count: int = 1,
    *,
    beside: Mapping[str, float] | None = None,
    hint: str,
) -> None:
    """Fails where the Ray instance a job started itself (no RAY_ADDRESS) cannot hold `count`
    of `needs` (a worker's, actor's or task's resources), each on one node, with `beside`
    (the tasks that must run alongside, such as the reads feeding actors) left free on the
    node: that instance has no autoscaler, and Ray would wait for them in silence, for ever.
    `what` names them ("evaluate needs 3 model actors of 0.5 CPUs each"). Joining a cluster,
    nothing is checked: its autoscaler may start nodes for them."""
    if os.environ.get("RAY_ADDRESS"):
        return
    nodes = alive_node_resources()
    left = [{k: max(0.0, v - (beside or {}).get(k, 0)) for k, v in n.items()} for n in nodes]
    fits = workers_fit({k: v for k, v in needs.items() if v > 0}, left)
    if fits < count:
        also = "" if not beside else f" beside {_resources_text(beside)} for other tasks"
        raise ValueError(
            f"{what} (each on one node{also}), and the local Ray instance holds "
            f"{fits} ({describe_nodes(nodes, memory='memory' in needs)}): {hint}, or run on a "
            "cluster (RAY_ADDRESS)"
        )


def _resources_text(resources: Mapping[str, float]) -> str:
    return " and ".join(f"{v:g} {k}s" for k, v in resources.items())


def describe_nodes(nodes: Sequence[Mapping[str, float]], *, memory: bool = False) -> str:
    """The nodes' CPUs and GPUs (and the memory Ray gives their tasks), for messages:
    ``4 CPUs, 0 GPUs; 8 CPUs, 1 GPUs`` (``4 CPUs, 0 GPUs, 5.3 GiB; ...``)."""
    return "; ".join(
        f"{n.get('CPU', 0):g} CPUs, {n.get('GPU', 0):g} GPUs"
        + (f", {n.get('memory', 0) / 2**30:.1f} GiB" if memory else "")
        for n in nodes
    )


ACCELERATOR_TYPE = "accelerator_type:"
"""Ray's node resource naming a node's GPU type (``accelerator_type:H100``)."""


def check_accelerator_type(name: str | None, what: str) -> None:
    """Fails when `what` asks for GPUs of type `name` (`--accelerator-type`) that no node of
    the Ray instance joined has and none can get: Ray would wait for such a node in silence,
    for ever, and the usual cause is a misspelt type. That is known of the local instance a
    job starts (no autoscaler), and of a cluster whose autoscaler publishes its node types
    (`_node_type_resources`). Where one may start such a node but does not say (the
    autoscalers of Ray 2.60, on VMs and KubeRay), the job warns what it waits for and goes
    on."""
    if not name:
        return
    nodes, node_types = alive_node_resources(), _node_type_resources()
    cluster = bool(os.environ.get("RAY_ADDRESS"))
    problem = missing_accelerator_type(name, nodes, node_types, cluster=cluster)
    if problem and cluster and node_types is None:
        print(f"warning: {what}: {problem}; waiting for the autoscaler to start such a node "
              "(stop the job if the type is misspelt)", file=sys.stderr)  # fmt: skip
    elif problem:
        raise ValueError(f"{what}: {problem}")


def missing_accelerator_type(
    name: str,
    nodes: Sequence[Mapping[str, float]],
    node_types: Mapping[str, float] | None,
    *,
    cluster: bool,
) -> str | None:
    """Why GPUs of type `name` may never come, or None where a live node (`nodes`: their
    resources) has one or the autoscaler can add one. `node_types` is what the autoscaler
    can add (each resource summed over its node types at their most nodes), None where
    unknown: a cluster's autoscaler may then add one yet, while the local instance a job
    starts (not `cluster`) has no autoscaler."""
    offered = {
        key[len(ACCELERATOR_TYPE):]
        for n in [*nodes, node_types or {}]
        for key, amount in n.items()
        if key.startswith(ACCELERATOR_TYPE) and amount > 0
    }  # fmt: skip
    if name in offered:
        return None
    types = ", ".join(sorted(offered)) or "none"
    if not cluster:
        where = "on this machine's local Ray instance, which has no autoscaler"
    elif node_types is None:
        where = "on any live node of the cluster"
    else:
        where = "on any node type of the cluster"
    return f"there is no GPU of type {name!r} {where} (types there: {types})"


def _node_type_resources() -> dict[str, float] | None:
    """The most of each resource the cluster's autoscaler may give it, summed over its node
    types at their most nodes, where the autoscaler publishes its cluster config in the GCS
    (Ray Train checks its workers against the same figures, and Ray Data scales by them);
    None where it does not: no autoscaler, or one that keeps them to itself, as Ray 2.60's
    own do. Ray's state API for it is internal: read where it is."""
    try:
        from ray._private.state import state

        return state.get_max_resources_from_cluster_config()
    except Exception as error:  # an internal API: its absence or failure means unknown
        log.debug("no node types from the cluster's autoscaler: %s", error)
        return None


def check_gpus(needed: int, what: str, address: str | None = None) -> None:
    """Fails now when `what` needs `needed` GPUs and would start a private local Ray instance
    (no address, Ray not started) on a machine where torch sees fewer: that instance has no
    autoscaler, so the job would wait for them forever. A cluster may start GPU nodes on
    demand: joining one, nothing is checked."""
    if needed <= 0 or address or os.environ.get("RAY_ADDRESS"):
        return  # (before importing Ray, which a job on one local image never needs)
    import ray

    if ray.is_initialized():
        return
    have = torch.cuda.device_count()
    if have < needed:
        build = "" if torch.version.cuda else " (a build without CUDA)"
        raise ValueError(
            f"{what} needs {needed} GPU(s), but torch sees {have} on this machine{build}, and "
            "the local Ray instance the job would start cannot add any: run it on a machine "
            "with the GPUs, or on a cluster that has or starts GPU nodes (RAY_ADDRESS)"
        )


@dataclass(frozen=True)
class Precision:
    """Where the model runs and the autocast dtype used there (None: full fp32)."""

    device: torch.device
    autocast_dtype: torch.dtype | None
    reason: str
    int8: bool = False
    """Every conv but the logits' in int8 (`colorcore.int8`; CPU only), the logits' under the
    autocast dtype."""


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return set(next((line for line in f if line.startswith("flags")), "").split())
    except OSError:
        return set()


def cpu_has_bf16_units() -> bool:
    """True on CPUs with AMX or AVX-512 BF16 instructions, where bf16 autocast pays off."""
    return bool(_cpu_flags() & {"amx_bf16", "avx512_bf16"})


def cpu_has_int8_units() -> bool:
    """True on CPUs with u8 x s8 dot products (AVX-512 VNNI, AVX-VNNI or AMX), where int8
    convolutions run fast (1.9x the bf16 network on AVX-512 VNNI without AMX)."""
    return bool(_cpu_flags() & {"avx512_vnni", "avx_vnni", "amx_int8"})


def choose_precision(device: str = "auto", dtype: str = "auto") -> Precision:
    """Pick the device (CUDA when present) and the autocast dtype, and log why. On CUDA,
    cuDNN autotuning is turned on: the jobs' networks see few input shapes, for which the
    fastest convolution kernels are worth a trial each. int8 (the CPU, with bf16 autocast for
    the parts kept in float where the CPU has bf16 units) is for callers that quantise the
    network themselves (`colorcore.int8`)."""
    if dtype == "int8":
        if device != "auto" and torch.device(device).type != "cpu":
            raise ValueError("int8 runs on CPUs: it needs device cpu (or auto)")
        rest = "bf16" if cpu_has_bf16_units() else "fp32"
        why = "requested"
        if not cpu_has_int8_units():
            why += "; this CPU has no VNNI: int8 may run slower here than bf16 or fp32"
        log.info("device cpu, int8 convs with %s autocast for the rest (%s)", rest, why)
        cpu = torch.device("cpu")
        return Precision(cpu, torch.bfloat16 if rest == "bf16" else None, why, int8=True)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        if torch.version.cuda is None:
            hint = f"torch {torch.__version__} is a CPU-only build"
        else:
            hint = (
                f"torch {torch.__version__} is built for CUDA {torch.version.cuda}; on a GPU "
                "machine the NVIDIA driver must support that version (nvidia-smi shows the "
                "highest it does)"
            )
        if (visible := os.environ.get("CUDA_VISIBLE_DEVICES")) is not None:
            hint += f"; CUDA_VISIBLE_DEVICES={visible!r}"
        raise ValueError(f"device 'cuda' requested but torch sees no CUDA device: {hint}")
    if dtype == "auto":
        if dev.type == "cuda" and torch.cuda.get_device_capability(dev) >= (8, 0):
            dtype, why = "bf16", "the GPU has bf16 tensor cores"  # Ampere on; earlier: emulated
        elif dev.type == "cpu" and cpu_has_bf16_units():
            dtype, why = "bf16", "the CPU has bf16 matrix units (AMX / AVX-512 BF16)"
        else:
            dtype, why = "fp32", f"no fast bf16 on this {dev.type}"
    else:
        why = "requested"
    if dtype not in ("bf16", "fp32"):
        raise ValueError(f"dtype must be auto, bf16, fp32 or int8, got {dtype!r}")
    choice = Precision(dev, torch.bfloat16 if dtype == "bf16" else None, why)
    log.info("device %s, %s autocast (%s)", dev, dtype, why)
    if dev.type == "cuda":  # every job's network sees fixed sizes (crops, infer_px, eval_px)
        torch.backends.cudnn.benchmark = True
    return choice


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_MAX = 32 << 20  # its documented maximum on 64-bit systems (mallopt(3))
FREED_MEMORY_KEPT = 256 << 20
"""Bytes of free heap at its top that `keep_freed_memory` lets a process keep mapped."""


def keep_freed_memory(kept: int = FREED_MEMORY_KEPT) -> bool:
    """Have glibc's malloc keep freed memory for the next allocation instead of handing it back
    to the kernel, for processes that run the same tensor work batch after batch on CPUs (CPU
    tensors are plain malloc). By default blocks from 128 KB up are mmaps of their own, handed
    back when freed, until one of their size has been freed (the threshold then rises to it,
    up to 32 MB), and free heap at the top is trimmed once it passes twice that threshold:
    every batch pays a page fault for each 4 KB page it writes. Here blocks up to 32 MB
    (mallopt's documented maximum) always come from the heap, and up to `kept` bytes of free
    heap top stay mapped. Larger blocks (a big scan's planes) are still mmaps, handed
    back when freed; what stays resident is about the largest batch's working set of smaller
    blocks, plus `kept`. Measured on one core of a 2-core VM, the colorize job's CPU work per
    1024x768 image in int8: 129 -> 117 ms. Process-wide; returns whether it was set (glibc
    only)."""
    if not 0 <= kept < 2**31:
        raise ValueError(f"kept must be in [0, 2**31), got {kept}")
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    trimmed = mallopt(_M_TRIM_THRESHOLD, kept)
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)) and bool(trimmed)


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; return a torch generator seeded the same way."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)

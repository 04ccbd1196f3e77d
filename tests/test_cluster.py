"""The cluster definitions, checked offline: the Ray cluster launcher YAML passes Ray's own
validation, the KubeRay manifests pass KubeRay's CRD schemas with unknown keys rejected, every
job command that a manifest or README names parses with ``--dry-run``, each job fits the
resources its cluster can grow to, and the security properties hold (no control port open to
the world, token authentication, no literal credentials, a pinned image).

Nothing here starts Ray or reaches a cloud: `ray.init` and every botocore API call raise.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import functools
import importlib.util
import io
import json
import math
import re
import runpy
import shlex
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from tests.support import ROOT, reference_path

CLUSTER_DIR = ROOT / "cluster"
DOCKERFILE = CLUSTER_DIR / "Dockerfile"
CLUSTER_README = CLUSTER_DIR / "README.md"
READMES = [ROOT / "README.md", CLUSTER_README]
MANIFESTS = sorted((CLUSTER_DIR / "kuberay").glob("*.yaml"))
SECRET_EXAMPLE = CLUSTER_DIR / "kuberay" / "ray-auth-secret.yaml.example"
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}
CONTROL_PORTS = {6379: "GCS", 8265: "dashboard", 10001: "client"}
WORLD = {"0.0.0.0/0", "::/0"}


def _yaml_documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def launcher_files() -> list[Path]:
    """Ray cluster launcher configs: YAML at the root or under cluster/ with a provider."""
    candidates = [*ROOT.glob("*.yaml"), *CLUSTER_DIR.rglob("*.yaml")]
    return sorted(
        p
        for p in candidates
        if any("provider" in d and "available_node_types" in d for d in _yaml_documents(p))
    )


def ray_resources() -> list[tuple[Path, dict[str, Any]]]:
    """Every KubeRay resource (RayCluster, RayJob) of the manifests."""
    return [
        (path, doc)
        for path in MANIFESTS
        for doc in _yaml_documents(path)
        if str(doc.get("apiVersion", "")).startswith("ray.io/")
    ]


def rayjobs() -> list[tuple[Path, dict[str, Any]]]:
    return [(p, d) for p, d in ray_resources() if d["kind"] == "RayJob"]


def cluster_specs() -> list[tuple[str, dict[str, Any]]]:
    """Every RayCluster spec: standalone ones and those RayJobs create."""
    specs = []
    for path, doc in ray_resources():
        spec = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
        specs.append((f"{path.name}:{doc['metadata']['name']}", spec))
    return specs


def pod_templates(spec: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield spec["headGroupSpec"]["template"]
    for group in spec.get("workerGroupSpecs", []):
        yield group["template"]


def containers() -> Iterator[dict[str, Any]]:
    for _, spec in cluster_specs():
        for template in pod_templates(spec):
            yield from template["spec"]["containers"]


def pyproject_pin(name: str) -> str:
    """The exact version pyproject.toml pins for a dependency."""
    pattern = rf'^\s*"{re.escape(name)}(?:\[[^\]]*\])?==([\w.]+)"'
    match = re.search(pattern, (ROOT / "pyproject.toml").read_text(), re.M)
    assert match, f"pyproject.toml pins no {name}"
    return match.group(1)


def project_version() -> str:
    match = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M)
    assert match
    return match.group(1)


# ---------------------------------------------------------------- no Ray, no cloud


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to start Ray or call an AWS API fails the test."""
    import botocore.client
    import ray

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a cluster test tried to start Ray or to call a cloud API")

    monkeypatch.setattr(ray, "init", refuse)
    monkeypatch.setattr(botocore.client.BaseClient, "_make_api_call", refuse)
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


# ---------------------------------------------------------------- Ray cluster launcher


def prepared_launcher_config(path: Path) -> dict[str, Any]:
    """`ray up`'s own offline steps: defaults filled in, then schema and consistency checks.

    `prepare_config` only reads the provider's defaults.yaml; the steps that call AWS
    (`bootstrap_config`: key pairs, IAM, subnets, security groups) are not run.
    """
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(yaml.safe_load(path.read_text()))
    validate_config(config)
    return config


def test_there_is_a_launcher_file() -> None:
    assert ROOT / "ray_cluster.yaml" in launcher_files()


@pytest.mark.parametrize("path", launcher_files(), ids=lambda p: p.name)
def test_launcher_file_passes_ray_validation(path: Path) -> None:
    config = prepared_launcher_config(path)
    assert config["provider"]["type"] == "aws"
    workers = {k: v for k, v in config["available_node_types"].items() if k != "head"}
    assert config["head_node_type"] == "head"
    assert all(v["min_workers"] == 0 for v in workers.values()), "workers scale from 0"
    assert all(v["max_workers"] >= 1 for v in workers.values())
    assert 0 < config["idle_timeout_minutes"] <= 15 and config["upscaling_speed"] > 0
    head = config["available_node_types"]["head"]["node_config"]
    assert "InstanceMarketOptions" not in head, "the head runs on demand"
    assert not any(config[k] for k in ("setup_commands", "head_setup_commands")), (
        "nodes install nothing at start-up: everything is in the image"
    )


def test_launcher_validation_rejects_a_misspelt_key() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())
    config["available_node_types"]["gpu-8x"]["max_worker"] = 1
    with pytest.raises(jsonschema.ValidationError, match="max_worker"):
        validate_config(prepare_config(config))


@pytest.mark.parametrize("path", launcher_files(), ids=lambda p: p.name)
def test_launcher_spot_types_fall_back_to_on_demand(path: Path) -> None:
    config = prepared_launcher_config(path)
    # Only Ray's v2 autoscaler reads a type's priority and moves on after a failed launch.
    assert any("RAY_enable_autoscaler_v2=1 ray start --head" in c
               for c in config["head_start_ray_commands"])  # fmt: skip
    types = config["available_node_types"]
    spot = {k: v for k, v in types.items() if "InstanceMarketOptions" in v["node_config"]}
    assert spot, "GPU work that can be interrupted runs on spot"
    for name, node in spot.items():
        instance = node["node_config"]["InstanceType"]
        fallbacks = [
            v
            for v in types.values()
            if v["node_config"]["InstanceType"] == instance
            and "InstanceMarketOptions" not in v["node_config"]
        ]
        assert fallbacks, f"{name} has no on-demand type of {instance} to fall back to"
        assert all(v.get("priority", 0) < node.get("priority", 0) for v in fallbacks)


# ---------------------------------------------------------------- KubeRay CRD schemas


def closed(schema: Any) -> Any:
    """The schema with unknown keys rejected: `additionalProperties: false` in every object
    schema that lists `properties` and leaves neither extra keys (maps such as labels) nor
    unknown fields open."""
    if isinstance(schema, dict):
        if (
            "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
        for value in schema.values():
            closed(value)
    elif isinstance(schema, list):
        for value in schema:
            closed(value)
    return schema


@functools.cache
def crd(kind: str) -> dict[str, Any]:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: the CRDs are 2 MB
    return yaml.load(reference_path(f"kuberay/{CRD_FILES[kind]}").read_text(), Loader=loader)


@functools.cache
def crd_schema(kind: str, api_version: str, strict: bool = True) -> dict[str, Any]:
    crd_doc = crd(kind)
    group = crd_doc["spec"]["group"]
    for version in crd_doc["spec"]["versions"]:
        if f"{group}/{version['name']}" == api_version:
            schema = copy.deepcopy(version["schema"]["openAPIV3Schema"])
            return closed(schema) if strict else schema
    raise AssertionError(f"the {kind} CRD has no version {api_version}")


def schema_errors(doc: dict[str, Any], strict: bool = True) -> list[str]:
    schema = crd_schema(doc["kind"], doc["apiVersion"], strict)
    validator = jsonschema.Draft7Validator(schema)
    return [
        f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)
    ]


def test_the_manifests_define_a_cluster_and_the_three_jobs() -> None:
    kinds = sorted(d["kind"] for _, d in ray_resources())
    assert kinds == ["RayCluster", "RayJob", "RayJob", "RayJob"]
    modules = sorted(entrypoint(d["spec"]["entrypoint"])[0] for _, d in rayjobs())
    assert modules == ["jobs.colorize", "jobs.train", "jobs.tune"]


def resource_id(path: Path, doc: dict[str, Any]) -> str:
    return f"{path.name}:{doc['metadata']['name']}"


@pytest.mark.parametrize(
    "path, doc", ray_resources(), ids=[resource_id(*r) for r in ray_resources()]
)
def test_manifest_validates_against_the_crd(path: Path, doc: dict[str, Any]) -> None:
    assert schema_errors(doc) == []


@pytest.mark.parametrize(
    "where, key, misspelt",
    [
        ("spec", "workerGroupSpecs", "workerGroupSpec"),
        ("worker group", "rayStartParams", "rayStartParam"),
        ("container", "resources", "resource"),
        ("auth options", "secretName", "secretname"),
    ],
)
def test_a_misspelt_key_fails_the_schema(where: str, key: str, misspelt: str) -> None:
    cluster = next(d for _, d in ray_resources() if d["kind"] == "RayCluster")
    doc = copy.deepcopy(cluster)
    target = {
        "spec": doc["spec"],
        "worker group": doc["spec"]["workerGroupSpecs"][0],
        "container": doc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0],
        "auth options": doc["spec"]["authOptions"],
    }[where]
    target[misspelt] = target.pop(key)
    errors = schema_errors(doc)
    assert any(f"'{misspelt}' was unexpected" in e for e in errors), errors
    # KubeRay's schemas alone accept it: the injected rule is what catches it.
    assert schema_errors(doc, strict=False) == []


# ---------------------------------------------------------------- job commands


def entrypoint(text: str) -> tuple[str, list[str]]:
    """`python -m jobs.NAME ARGS...` -> ("jobs.NAME", ARGS)."""
    words = shlex.split(text)
    assert words[:2] == ["python", "-m"] and words[2].startswith("jobs."), text
    return words[2], words[3:]


def readme_commands(path: Path) -> Iterator[tuple[str, list[str]]]:
    """Job commands in a README's fenced code blocks, continuation lines joined."""
    for block in re.findall(r"^```[a-z]*\n(.*?)^```", path.read_text(), re.M | re.S):
        for line in block.replace("\\\n", " ").splitlines():
            match = re.search(r"python -m (jobs\.[a-z_]+)(.*)", line)
            if match:
                args = re.split(r"\s(?:\||&&|;|>|#)", match.group(2))[0]
                yield match.group(1), shlex.split(args)


def job_commands() -> list[tuple[str, str, list[str]]]:
    found = [(p.name, *entrypoint(d["spec"]["entrypoint"])) for p, d in rayjobs()]
    for path in READMES:
        found += [(str(path.relative_to(ROOT)), m, a) for m, a in readme_commands(path)]
    return found


def dry_run(module: str, args: list[str]) -> dict[str, Any]:
    """What `python -m MODULE ARGS --dry-run` prints: the validated config."""
    if importlib.util.find_spec(module) is None:
        pytest.fail(f"{module} does not exist")
    out, err = io.StringIO(), io.StringIO()
    argv = [module, *args, "--dry-run"]
    with (
        warnings.catch_warnings(),
        contextlib.redirect_stdout(out),
        contextlib.redirect_stderr(err),
        pytest.MonkeyPatch.context() as mp,
    ):
        warnings.simplefilter("ignore", RuntimeWarning)  # runpy: module already imported
        mp.setattr(sys, "argv", argv)
        try:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        except SystemExit as e:
            if e.code not in (0, None):
                pytest.fail(f"{shlex.join(argv)} exited {e.code}:\n{err.getvalue()}")
    return json.loads(out.getvalue())


def test_commands_are_found_in_the_manifests_and_readmes() -> None:
    sources = {source for source, _, _ in job_commands()}
    assert {"rayjob-train.yaml", "rayjob-tune.yaml", "rayjob-colorize.yaml"} <= sources
    assert "cluster/README.md" in sources
    modules = {m for source, m, _ in job_commands() if source == "cluster/README.md"}
    assert {"jobs.prepare", "jobs.prior", "jobs.train", "jobs.tune", "jobs.colorize"} <= modules


@pytest.mark.parametrize(
    "source, module, args",
    job_commands(),
    ids=[f"{s}:{m}:{i}" for i, (s, m, _) in enumerate(job_commands())],
)
def test_job_command_parses_with_dry_run(source: str, module: str, args: list[str]) -> None:
    config = dry_run(module, args)
    assert isinstance(config, dict) and config
    if "--preset" in args:
        preset = args[args.index("--preset") + 1]
        assert preset in importlib.import_module(module).PRESETS


# ---------------------------------------------------------------- resources fit the presets


def quantity(value: str | int) -> float:
    """A Kubernetes CPU or count quantity ("14", "500m", 8) as a number."""
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def worker_groups(spec: dict[str, Any]) -> list[tuple[str, int, float, float]]:
    """(group, maxReplicas, GPUs per pod, CPUs per pod) of a cluster spec."""
    groups = []
    for group in spec.get("workerGroupSpecs", []):
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        groups.append(
            (
                group["groupName"],
                group["maxReplicas"],
                quantity(limits.get("nvidia.com/gpu", 0)),
                quantity(limits["cpu"]),
            )
        )
    return groups


def demands(config: dict[str, Any]) -> tuple[int, int, float]:
    """(workers, GPUs per worker, CPUs per worker) a job's dry-run config asks for at once."""
    if "num_workers" in config:  # a training run: DDP workers
        return config["num_workers"], int(config["use_gpu"]), config["cpus_per_worker"]
    if isinstance(config.get("train"), dict):  # a search: concurrent training runs
        workers, gpus, cpus = demands(config["train"])
        trials = (config.get("max_gpus") or workers * gpus) // max(1, workers * gpus)
        return max(1, trials) * workers, gpus, cpus
    if "model_actors" in config:  # batch colorization: model actors, one GPU each
        return max(1, config["model_actors"]), 1, config["actor_cpus"]
    raise AssertionError(f"unknown job config: {sorted(config)}")


def fits(
    workers: int, gpus: int, cpus: float, max_nodes: int, node_gpus: float, node_cpus: float
) -> bool:
    """Whether `workers` (each `gpus` GPUs, `cpus` CPUs) pack onto `max_nodes` such nodes."""
    per_node = min(node_gpus // gpus if gpus else math.inf, node_cpus // cpus)
    return per_node >= 1 and math.ceil(workers / per_node) <= max_nodes


@pytest.mark.parametrize("path, job", rayjobs(), ids=[resource_id(*r) for r in rayjobs()])
def test_rayjob_resources_fit_its_preset(path: Path, job: dict[str, Any]) -> None:
    config = dry_run(*entrypoint(job["spec"]["entrypoint"]))
    workers, gpus, cpus = demands(config)
    groups = worker_groups(job["spec"]["rayClusterSpec"])
    assert gpus, "every RayJob here runs on GPUs"
    assert any(fits(workers, gpus, cpus, *g[1:]) for g in groups), (
        f"{workers} workers x {gpus} GPUs, {cpus} CPUs each, fit none of {groups}"
    )
    if "model_actors" not in config:  # a fixed number of workers: no GPU pod it cannot use
        spare = sum(g[1] * g[2] for g in groups) - workers * gpus
        assert all(spare < g[2] for g in groups if g[2]), f"{spare} GPUs more than it uses"


def gpu_train_presets() -> dict[str, tuple[int, int, float]]:
    from jobs import train

    presets = {name: make() for name, make in train.PRESETS.items()}
    return {
        name: (cfg.num_workers, 1, cfg.cpus_per_worker)
        for name, cfg in presets.items()
        if cfg.use_gpu
    }


def test_every_gpu_training_preset_fits_the_raycluster() -> None:
    spec = next(d["spec"] for _, d in ray_resources() if d["kind"] == "RayCluster")
    groups = worker_groups(spec)
    assert {"paper", "h100x8"} <= set(gpu_train_presets())
    for name, need in gpu_train_presets().items():
        assert any(fits(*need, *g[1:]) for g in groups), f"{name} fits no group of {groups}"


@pytest.mark.parametrize("path", launcher_files(), ids=lambda p: p.name)
def test_every_gpu_training_preset_fits_the_launcher(path: Path) -> None:
    types = prepared_launcher_config(path)["available_node_types"]
    for name, need in gpu_train_presets().items():
        assert any(
            fits(*need, t["max_workers"], t["resources"].get("GPU", 0), t["resources"]["CPU"])
            for t in types.values()
        ), f"{name} fits no node type"


# ---------------------------------------------------------------- shared memory

NODE_CACHE_BYTES = 3 * 16_384 * 128_000
"""What jobs.node_cache holds for ImageNet: three windows of JPEGs of at most 128 KB."""


def byte_quantity(value: str | int) -> float:
    """A Kubernetes memory quantity ("64Gi", "20G", 1024) in bytes."""
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9}
    text = str(value)
    unit = next((u for u in sorted(units, key=len, reverse=True) if text.endswith(u)), "")
    return float(text[: len(text) - len(unit)]) * units.get(unit, 1)


def shared_memory(template: dict[str, Any]) -> float | None:
    """Bytes of the memory-backed volume the pod's Ray container mounts at /dev/shm."""
    mounts = template["spec"]["containers"][0].get("volumeMounts", [])
    name = next((m["name"] for m in mounts if m["mountPath"] == "/dev/shm"), None)
    volume = next((v for v in template["spec"].get("volumes", []) if v["name"] == name), {})
    empty = volume.get("emptyDir", {})
    return byte_quantity(empty["sizeLimit"]) if empty.get("medium") == "Memory" else None


def node_cache_room(shm: float, object_store: float) -> float:
    """What jobs.node_cache may fill of a /dev/shm of `shm` bytes beside an object store."""
    from jobs.node_cache import FREE_FLOOR

    return shm - max(FREE_FLOOR * shm, object_store)


@pytest.mark.parametrize("where, spec", cluster_specs(), ids=[w for w, _ in cluster_specs()])
def test_every_ray_pod_has_shared_memory_and_multi_gpu_pods_room_for_the_node_cache(
    where: str, spec: dict[str, Any]
) -> None:
    """Without a memory volume at /dev/shm a pod has Docker's 64 MB, and Ray puts its object
    store on disk. A pod of several GPUs runs training workers that share row groups there
    too (jobs.node_cache): its object store is sized to leave them room."""
    groups = [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]
    for group in groups:
        shm = shared_memory(group["template"])
        assert shm and shm >= 4 * 2**30, f"{where} {group.get('groupName', 'head')}: {shm}"
        gpus = quantity(
            group["template"]["spec"]["containers"][0]["resources"]["limits"].get(
                "nvidia.com/gpu", 0
            )
        )
        if gpus > 1:
            store = byte_quantity(group["rayStartParams"]["object-store-memory"])
            assert node_cache_room(shm, store) >= NODE_CACHE_BYTES, where


@pytest.mark.parametrize("where, spec", cluster_specs(), ids=[w for w, _ in cluster_specs()])
def test_every_ray_pod_asks_for_the_disk_ray_spills_to(where: str, spec: dict[str, Any]) -> None:
    """Ray spills objects into its temporary folder, /tmp/ray. Each pod requests node disk
    for it, so that pods land (and nodes are made) where it is, and bounds the volume within
    that request, with room for a whole object store: a spill fills the volume, not the
    node's disk, where the kubelet would evict every pod of the node."""
    for group in [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]:
        name, template = group.get("groupName", "head"), group["template"]
        container = template["spec"]["containers"][0]
        requests, limits = container["resources"]["requests"], container["resources"]["limits"]
        asked = byte_quantity(requests["ephemeral-storage"])
        assert byte_quantity(limits["ephemeral-storage"]) == asked, (where, name)
        mount = next(m for m in container["volumeMounts"] if m["mountPath"] == "/tmp/ray")
        volume = next(v for v in template["spec"]["volumes"] if v["name"] == mount["name"])
        bound = byte_quantity(volume["emptyDir"]["sizeLimit"])
        store = group["rayStartParams"].get("object-store-memory")
        store = byte_quantity(store) if store else 0.95 * shared_memory(template)
        assert store <= bound < asked, (where, name, store, bound, asked)


@pytest.mark.parametrize("path", launcher_files(), ids=lambda p: p.name)
def test_launcher_multi_gpu_nodes_have_room_for_the_node_cache(path: Path) -> None:
    config = prepared_launcher_config(path)
    for name, node_type in config["available_node_types"].items():
        if node_type["resources"].get("GPU", 0) <= 1:
            continue
        options = " ".join(node_type["docker"]["worker_run_options"])
        shm = byte_quantity(re.search(r"--shm-size[= ](\d+)g", options)[1] + "G")
        store = float(re.search(r"RAY_DEFAULT_OBJECT_STORE_MAX_MEMORY_BYTES=(\d+)", options)[1])
        assert node_cache_room(shm, store) >= NODE_CACHE_BYTES, name


@pytest.mark.parametrize("where, spec", cluster_specs(), ids=[w for w, _ in cluster_specs()])
def test_only_gpu_pods_see_gpus_and_only_the_head_gets_an_api_token(where, spec) -> None:
    """A pod that asks for no GPU tells Ray it has none, whatever node it lands on (the
    image shows none: the device plugin shows a pod those it asked for). Only the head's
    autoscaler talks to the Kubernetes API; the workers, which decode untrusted archives,
    carry no token for it."""
    head = spec["headGroupSpec"]
    assert head["rayStartParams"].get("num-gpus") == "0", where
    assert head["template"]["spec"].get("automountServiceAccountToken") is not False, where
    for group in spec.get("workerGroupSpecs", []):
        template = group["template"]["spec"]
        limits = template["containers"][0]["resources"]["limits"]
        if not quantity(limits.get("nvidia.com/gpu", 0)):
            assert group["rayStartParams"].get("num-gpus") == "0", (where, group["groupName"])
        assert template.get("automountServiceAccountToken") is False, (where, group["groupName"])


@pytest.mark.parametrize("path", launcher_files(), ids=lambda p: p.name)
def test_launcher_head_offers_the_tune_driver_resource(path: Path) -> None:
    from jobs.tune import DRIVER_RESOURCE

    config = prepared_launcher_config(path)
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"].get(DRIVER_RESOURCE, 0) >= 8  # the paper search's trials at once
    # each trial's function and its trainer's controller: about 1 GB, beside the object store
    start = " ".join(config["head_start_ray_commands"])
    store = int(re.search(r"--object-store-memory=(\d+)", start)[1])
    memory = {"m7i.2xlarge": 32 * 2**30}[head["node_config"]["InstanceType"]]
    assert head["resources"][DRIVER_RESOURCE] * 2**30 + store + 4 * 2**30 <= memory


def kuberay_resources(params: dict[str, Any]) -> dict[str, float]:
    """The custom resources of a group's rayStartParams (a JSON object, quoted)."""
    text = params.get("resources")
    return json.loads(json.loads(text)) if text else {}


def test_kuberay_tune_clusters_offer_the_tune_driver_resource_on_the_head() -> None:
    from jobs.tune import DRIVER_RESOURCE

    for where, spec in cluster_specs():
        runs_tune = "rayjob-tune" in where or "raycluster" in where
        params = spec["headGroupSpec"]["rayStartParams"]
        head = kuberay_resources(params)
        assert (head.get(DRIVER_RESOURCE, 0) >= 8) == runs_tune, where
        if runs_tune:  # each trial's function and its trainer's controller: about 1 GB
            limits = spec["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]
            memory = byte_quantity(limits["limits"]["memory"])
            store = byte_quantity(params["object-store-memory"])
            assert head[DRIVER_RESOURCE] * 2**30 + store + 4 * 2**30 <= memory, where


def test_accelerator_types_asked_for_are_offered() -> None:
    """A command asking for a GPU model (`--accelerator-type`) waits forever where no node
    type offers it: a RayJob's own cluster offers what its command names, and the long-lived
    cluster and the launcher's what the READMEs' commands name."""

    def offered(spec: dict[str, Any]) -> set[str]:
        return {
            key.split(":", 1)[1]
            for group in spec.get("workerGroupSpecs", [])
            for key in kuberay_resources(group["rayStartParams"])
            if key.startswith("accelerator_type:")
        }

    def asked(module: str, args: list[str]) -> set[str]:
        config = dry_run(module, args)
        named = (config.get("accelerator_type"), config.get("train", {}).get("accelerator_type"))
        return {t for t in named if t}

    for path, job in rayjobs():
        wanted = asked(*entrypoint(job["spec"]["entrypoint"]))
        assert wanted <= offered(job["spec"]["rayClusterSpec"]), path.name
    raycluster = next(d["spec"] for _, d in ray_resources() if d["kind"] == "RayCluster")
    launchers = [prepared_launcher_config(p)["available_node_types"] for p in launcher_files()]
    from_readmes = set()
    for path in READMES:
        for module, args in readme_commands(path):
            from_readmes |= asked(module, args)
    assert from_readmes, "the READMEs show --accelerator-type"
    assert from_readmes <= offered(raycluster)
    for types in launchers:
        assert from_readmes <= {
            key.split(":", 1)[1]
            for t in types.values()
            for key in t["resources"]
            if key.startswith("accelerator_type:")
        }


# ---------------------------------------------------------------- one image, the pinned versions


def test_one_image_and_ray_version_everywhere() -> None:
    version = project_version()
    images = {c["image"] for c in containers()}
    for path in launcher_files():
        images.add(yaml.safe_load(path.read_text())["docker"]["image"])
    assert len(images) == 1, images
    image = images.pop()
    assert image.rsplit(":", 1)[1].startswith(version), "the image is tagged with the version"
    assert f"-t {image} " in CLUSTER_README.read_text(), "the README builds that image"
    ray_version = pyproject_pin("ray")
    assert {spec["rayVersion"] for _, spec in cluster_specs()} == {ray_version}


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [tuple(line.split(None, 1)) for line in lines if line and not line.startswith("#")]


def pip_requirements(run: str) -> list[str]:
    """The requirement arguments of every `pip install` in a RUN instruction."""
    takes_value = {"--index-url", "--extra-index-url", "-i", "-r", "-c", "--constraint"}
    found = []
    commands = [[]]
    for word in shlex.split(run):
        if word in ("&&", ";", "||"):
            commands.append([])
        else:
            commands[-1].append(word)
    for words in commands:
        if words[:2] != ["pip", "install"]:
            continue
        skip = False
        for word in words[2:]:
            if skip or word.startswith("-"):
                skip = not skip and word in takes_value
                continue
            found.append(word)
    return found


def test_dockerfile_pins_base_image_and_packages() -> None:
    instructions = dockerfile_instructions()
    bases = [arg.split()[0] for op, arg in instructions if op == "FROM"]
    assert len(bases) == 1
    base = bases[0]
    assert re.search(r"@sha256:[0-9a-f]{64}$", base) or re.search(
        r":\d+\.\d+\.\d+[\w.-]*$", base
    ), f"base image {base} is not pinned by digest or exact version"
    requirements = [r for op, arg in instructions if op == "RUN" for r in pip_requirements(arg)]
    assert "." in requirements, "the project is installed from the copied source"
    assert all(r == "." or re.search(r"==[\w.]+$", r) for r in requirements), requirements
    assert f"torch=={pyproject_pin('torch')}" in requirements
    assert f"ray[default,train,tune,data]=={pyproject_pin('ray')}" in requirements
    # torchvision (nvJPEG on GPU nodes) is the release built for that torch: 0.(minor + 15)
    torch_minor = int(pyproject_pin("torch").split(".")[1])
    assert f"torchvision==0.{torch_minor + 15}.0" in requirements
    copied = " ".join(arg for op, arg in instructions if op == "COPY")
    assert all(p in copied for p in ("pyproject.toml", "colorcore/", "jobs/"))
    # The project's dependencies at the versions the suite passes with, not the newest.
    assert "scripts/constraints.txt" in copied
    runs = [arg for op, arg in instructions if op == "RUN"]
    assert any(re.search(r"pip install -c constraints\.txt \.( |$)", arg) for arg in runs)
    users = [arg for op, arg in instructions if op == "USER"]
    assert users and users[-1] not in ("root", "0"), "the image runs as an ordinary user"
    # Not in the image: every container of it would see every GPU of its node, the head's
    # and CPU pods' too (the launcher's GPU node types set it: see the test below).
    env = " ".join(arg for op, arg in instructions if op == "ENV")
    assert "NVIDIA_VISIBLE_DEVICES" not in env
    # The image is checked as installed, not as the source copy in its working folder.
    assert any(re.search(r"cd / && python -c \"import torch, torchvision\.io", a) for a in runs)


@pytest.mark.parametrize("path", launcher_files(), ids=lambda p: p.name)
def test_launcher_gpu_containers_and_only_they_see_the_gpus(path: Path) -> None:
    """The launcher starts a GPU node's container with --runtime=nvidia, which shows it the
    GPUs only where NVIDIA_VISIBLE_DEVICES says so: every GPU node type sets it, no other."""
    config = yaml.safe_load(path.read_text())
    everywhere = " ".join(config["docker"].get("run_options", []))
    assert "NVIDIA_VISIBLE_DEVICES" not in everywhere
    for name, node_type in config["available_node_types"].items():
        options = " ".join(node_type.get("docker", {}).get("worker_run_options", []))
        gpus = node_type.get("resources", {}).get("GPU", 0)
        assert ("-e NVIDIA_VISIBLE_DEVICES=all" in options) == bool(gpus), name
        assert ("NVIDIA_DRIVER_CAPABILITIES=compute,utility" in options) == bool(gpus), name


# ---------------------------------------------------------------- security


def open_launcher_ports(config: dict[str, Any]) -> list[str]:
    """Control ports a launcher config opens to the whole internet."""
    problems = []
    rules = config["provider"].get("security_group", {}).get("IpPermissions", [])
    for rule in rules:
        ranges = [r.get("CidrIp") for r in rule.get("IpRanges", [])]
        ranges += [r.get("CidrIpv6") for r in rule.get("Ipv6Ranges", [])]
        low, high = rule.get("FromPort", -1), rule.get("ToPort", -1)
        for port, name in CONTROL_PORTS.items():
            covered = rule.get("IpProtocol") == "-1" or low == -1 or low <= port <= high
            if covered and WORLD & set(ranges):
                problems.append(f"{name} ({port}) open to {sorted(WORLD & set(ranges))}")
    start = " ".join(config["head_start_ray_commands"])
    for host in re.findall(r"--dashboard-host[= ](\S+)", start):
        if host not in ("127.0.0.1", "localhost"):
            problems.append(f"dashboard listens on {host}")
    return problems


def open_kuberay_ports(doc: dict[str, Any]) -> list[str]:
    """Control ports a Kubernetes resource exposes beyond the cluster or to any address."""
    problems = []
    if str(doc.get("apiVersion", "")).startswith("ray.io/"):
        spec = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
        head = spec["headGroupSpec"]
        if head.get("serviceType", "ClusterIP") != "ClusterIP" or head.get("enableIngress"):
            problems.append("the head service is exposed outside the cluster")
        for template in pod_templates(spec):
            for container in template["spec"]["containers"]:
                for port in container.get("ports", []):
                    if port.get("hostPort"):
                        problems.append(f"host port {port['hostPort']}")
            if template["spec"].get("hostNetwork"):
                problems.append("host network")
    if doc.get("kind") == "NetworkPolicy":
        for rule in doc["spec"].get("ingress", []):
            ports = {p.get("port") for p in rule.get("ports", [])} or set(CONTROL_PORTS)
            cidrs = {peer["ipBlock"]["cidr"] for peer in rule.get("from", []) if "ipBlock" in peer}
            if not rule.get("from") or (WORLD & cidrs and ports & set(CONTROL_PORTS)):
                problems.append("a network policy admits any address")
    return problems


@pytest.mark.parametrize("path", launcher_files(), ids=lambda p: p.name)
def test_launcher_opens_no_control_port_to_the_world(path: Path) -> None:
    config = prepared_launcher_config(path)
    assert open_launcher_ports(config) == []
    # The check itself catches an open dashboard.
    bad = copy.deepcopy(config)
    rule = {"IpProtocol": "tcp", "FromPort": 8265, "ToPort": 8265}
    bad["provider"].setdefault("security_group", {})["IpPermissions"] = [
        rule | {"IpRanges": [{"CidrIp": "0.0.0.0/0"}]}
    ]
    assert open_launcher_ports(bad) == ["dashboard (8265) open to ['0.0.0.0/0']"]


def test_kuberay_exposes_no_control_port() -> None:
    docs = [d for path in MANIFESTS for d in _yaml_documents(path)]
    assert [p for d in docs for p in open_kuberay_ports(d)] == []
    assert any(d["kind"] == "NetworkPolicy" for d in docs)
    world = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "spec": {"ingress": [{"from": [{"ipBlock": {"cidr": "0.0.0.0/0"}}]}]},
    }
    assert open_kuberay_ports(world) == ["a network policy admits any address"]


@pytest.mark.parametrize("path", launcher_files(), ids=lambda p: p.name)
def test_launcher_token_auth_from_ssm(path: Path) -> None:
    config = prepared_launcher_config(path)
    options = " ".join(config["docker"]["run_options"])
    assert "-e RAY_AUTH_MODE=token" in options
    # Mounted from where the fetch below writes it (the ssh user's ~), to where Ray in the
    # container looks for it (the image's HOME).
    user = config["auth"]["ssh_user"]
    mount = rf"-v /home/{user}/\.ray/auth_token:/home/ray/\.ray/auth_token:ro"
    assert re.search(mount, options), options
    assert re.search(r"^ENV HOME=/home/ray$", DOCKERFILE.read_text(), re.MULTILINE)
    fetch = " ".join(config["initialization_commands"])
    assert "aws ssm get-parameter" in fetch and "--with-decryption" in fetch
    assert "> ~/.ray/auth_token" in fetch
    assert f"--region {config['provider']['region']}" in fetch
    for name, node_type in config["available_node_types"].items():
        assert "IamInstanceProfile" in node_type["node_config"], f"{name}: storage via its role"


def test_kuberay_token_auth_from_a_secret() -> None:
    secrets = {d["metadata"]["name"] for d in _yaml_documents(SECRET_EXAMPLE)}
    accounts = {
        d["metadata"]["name"]
        for path in MANIFESTS
        for d in _yaml_documents(path)
        if d["kind"] == "ServiceAccount"
    }
    for where, spec in cluster_specs():
        auth = spec.get("authOptions", {})
        assert auth.get("mode") == "token", where
        assert auth.get("secretName") in secrets, where
        for template in pod_templates(spec):
            assert template["spec"].get("serviceAccountName") in accounts, where
    for container in containers():
        for env in container.get("env", []):
            assert env["name"] != "RAY_AUTH_MODE" or env.get("value") == "token"
            assert env["name"] != "RAY_AUTH_TOKEN" or "value" not in env


CREDENTIAL_PATTERNS = {
    "AWS access key id": r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b",
    "private key": r"-----BEGIN [A-Z ]*PRIVATE KEY-----",
    "GitHub token": r"\bgh[pousr]_[A-Za-z0-9]{30,}",
    "Slack token": r"\bxox[abprs]-[A-Za-z0-9-]{10,}",
    "credential assignment": r"(?i)\b(aws_secret_access_key|aws_access_key_id|aws_session_token"
    r"|password|passwd)\b\s*[:=]\s*['\"]?[^\s'\"$<{]{8,}",
}


def literal_credentials(text: str) -> list[str]:
    """Credentials or random-looking tokens (hex, or mixed-case base64-like) written into a file."""
    found = [name for name, pattern in CREDENTIAL_PATTERNS.items() if re.search(pattern, text)]
    text = re.sub(r"sha256:[0-9a-f]{64}", "", text)  # image digests are not secrets
    text = re.sub(r"\b[A-Za-z_]\w*=\w{1,7}(?!\w)", "", text)  # a setting: RAY_enable_x_v2=1
    for word in re.findall(r"[A-Za-z0-9+=_-]{24,}", text):
        classes = sum(bool(re.search(c, word)) for c in ("[a-z]", "[A-Z]", "[0-9]"))
        counts = [word.count(c) for c in set(word)]
        entropy = -sum(n / len(word) * math.log2(n / len(word)) for n in counts)
        if re.fullmatch(r"[0-9a-fA-F]{32,}", word) or (classes == 3 and entropy > 4.0):
            found.append(f"random-looking token {word[:6]}...")
    return found


def cluster_files() -> list[Path]:
    return sorted({*launcher_files(), DOCKERFILE, CLUSTER_README, *MANIFESTS, SECRET_EXAMPLE})


@pytest.mark.parametrize("path", cluster_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_literal_credentials(path: Path) -> None:
    assert literal_credentials(path.read_text()) == []


def test_credential_scan_catches_keys_and_tokens() -> None:
    key_id = "AKIA" + "Z7Q2" * 4
    hex_token = "".join(f"{i * 7919 % 256:02x}" for i in range(32))
    base64_token = base64.b64encode(bytes.fromhex(hex_token)).decode()
    assert literal_credentials(f"aws_access_key_id = {key_id}")
    assert literal_credentials(f"RAY_AUTH_TOKEN={hex_token}")
    assert literal_credentials(f"auth_token: {base64_token}")
    assert literal_credentials("password: hunter2hunter2")
    assert literal_credentials("aws_secret_access_key: ${SECRET}") == []
    assert literal_credentials("RAY_enable_autoscaler_v2=1 ray start --head") == []


def test_applying_the_manifest_folder_leaves_the_secret_alone() -> None:
    """`kubectl apply -f cluster/kuberay/` takes the .yaml files: none may hold the token's
    Secret, or it would overwrite the real one with the placeholder."""
    assert not [p.name for p in MANIFESTS for d in _yaml_documents(p) if d["kind"] == "Secret"]


def test_secret_example_holds_a_placeholder_only() -> None:
    secrets = [d for d in _yaml_documents(SECRET_EXAMPLE) if d["kind"] == "Secret"]
    assert secrets
    for secret in secrets:
        assert not secret.get("data"), "no encoded values in the repository"
        values = secret.get("stringData", {}).values()
        assert all(re.fullmatch(r"REPLACE[A-Z-]*", v) for v in values), values


# ---------------------------------------------------------------- the README's cost figures


def test_readme_prices_every_node_type() -> None:
    readme = CLUSTER_README.read_text()
    instances = {
        t["node_config"]["InstanceType"]
        for path in launcher_files()
        for t in yaml.safe_load(path.read_text())["available_node_types"].values()
    }
    for _, spec in cluster_specs():
        for template in pod_templates(spec):
            selector = template["spec"].get("nodeSelector", {})
            if "node.kubernetes.io/instance-type" in selector:
                instances.add(selector["node.kubernetes.io/instance-type"])
    priced = set(re.findall(r"^\| ([a-z0-9]+\.[a-z0-9]+) \| [^|]+ \| \$[\d.]+", readme, re.M))
    assert instances <= priced, f"no hourly price for {sorted(instances - priced)}"
    assert "on-demand" in readme.lower() and "us-east-1" in readme

"""Hyperparameter search with Ray Tune over the learning-rate schedule and lambda.

``python -m jobs.tune --preset NAME [--config FILE] [--name SEARCH] [--storage URL]
[--max-gpus N] [overrides]``

The space: the base learning rate, the drop schedule and the rebalancing lambda. A schedule
is written ``FRACTION:FACTOR[,FRACTION:FACTOR...]`` (``0.444:0.333,0.833:0.3`` is the
released 3e-5 -> 1e-5 at 200k -> 3e-6 at 375k of 450k steps; ``none`` keeps the rate
constant): drops sit at fractions of a trial's step budget, so a schedule means the same
thing whatever the budget. Grid and random search are built in; ``--search-alg`` also
names ``optuna``, ``hyperopt`` or ``ax`` (`SEARCH_ALGS`; its package must be installed).

Every trial is a distributed training run built by `jobs.train.build_trainer` (the same
loop as ``jobs.train``), launched from a Tune function and reporting through Ray's
Train-to-Tune callback at each of its checkpoints, where it also validates. Rebalancing
weights for a trial's lambda come from the dataset's ``prior.npz`` counts. The objective is
the mean of the raw and class-rebalanced validation AuC (``--objective auc``), or the
validation loss under lambda = 1 weights (``--objective val_loss``), which unlike each
trial's own training loss compares across lambdas.

ASHA stops weak trials early. A trial judged before its learning-rate drops looks worse than
one judged after them, so by default the first rung is placed after the last drop of every
schedule in the space (``--first-rung-fraction`` overrides it, for more pruning with that
bias accepted).

Output in ``STORAGE/SEARCH/``: ``results.csv`` and ``results.md`` (every trial, its
config, both AuCs, its status), ``best_config.yaml`` (``python -m jobs.train --config
FILE`` runs it), ``objective.png`` (objective against lambda and against the schedule) and
``curves.png`` (every trial's learning curve); the trials' run folders in ``trials/``.
Re-running the same command after the driver died continues the search; finished trials
are not rerun, and ASHA's rungs hold what the trials reported before (`jobs.tune_asha`).
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import io
import json
import math
import os
import posixpath
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from jobs import storage, train
from jobs.config import (
    ConfigError,
    choice_problems,
    empty_problems,
    from_dict,
    presets_of,
    run_name_problem,
    save_config,
    to_dict,
)
from jobs.plots import figure_png, pyplot
from jobs.runtime import alive_node_resources, describe_nodes, workers_fit
from jobs.train import TrainConfig

TUNE_STATE_PREFIX = "experiment_state-"  # Tune's saved search state: <prefix><session>.json
LAMBDA_RANGE = (0.05, 1.0)
"""Lambda's search range: below 0.05 the rebalancing weights grow towards ~5e5."""
TRIAL_DRIVER_CPU = 0.1
"""CPU reserved for each trial's Tune function (it only waits on its trainer)."""
DRIVER_RESOURCE = "colorcore_driver"
"""A resource the cluster definitions give the head node: where the cluster has it, each
trial's function takes one of it and no CPU, and so runs on the head (on demand, and up for
the whole search) instead of keeping a CPU node up, whose loss would end every trial on it
(a trial's trainer runs its controller where the trial's function runs)."""
SEARCH_ALGS = ("grid", "random", "ax", "hyperopt", "optuna")
"""Searchers that take the categorical schedule choice and learn under ASHA (bayesopt has no
categorical parameters; bohb learns only beside its own HyperBand scheduler; nevergrad
needs an optimizer chosen for the space)."""
SEARCHER_PACKAGES = {"ax": ("ax", "ax-platform"), "hyperopt": ("hyperopt", "hyperopt"),
                     "optuna": ("optuna", "optuna")}  # fmt: skip
"""The module each named searcher imports, and the package that installs it."""
SEED_ARGUMENTS = {"optuna": "seed", "hyperopt": "random_state_seed"}
"""How the named searchers take `SearchConfig.seed` (ax takes none)."""
RESUME_FREE_FIELDS = ("max_gpus", "max_concurrent", "final_steps")
"""Search fields a continued search may change: they change no trial's result (a restored
search keeps its concurrency; the best config is written anew)."""
RESUME_FREE_TRAIN_FIELDS = (
    "tracking", "max_failures", "share_reads", "keep_checkpoints", "make_sample_data",
    # set per trial by `trial_config`:
    "name", "storage", "lr", "rebalance_lambda", "lr_drop_steps", "lr_drop_factors",
    "checkpoint_every_steps", "val_every_steps",
)  # fmt: skip
"""Training fields of the trials a continued search may change likewise."""
TRIAL_RESTARTS = 1
"""Tune's restarts of a trial whose function died (with its node, where it does not run on
the head): its trainer resumes from its last checkpoint. Ray Train restarts the workers of a
trial up to train.max_failures times itself; a trial whose training failed after those is
not trained again by Tune's restart (`TRAIN_FAILED_FILE`), which would multiply them."""
TRAIN_FAILED_FILE = "train_failed.json"
"""In a trial's run folder: the error its training failed with after train.max_failures
restarts, and the search driver's session it failed in. A restart in that session fails
at once with it; a continued search (another session) trains the trial again."""
RANDOM_SEEDS = 1 << 20
"""The seeds a random search's trials draw from (from train.seed on) where its space is
choices only, so that repeats of a point are other seeds, not copies."""
SEARCH_CONFIG_FILE = "search_config.yaml"
SEARCH_INPUTS_FILE = "search_inputs.json"  # the prior's and the data's checksums
BEST_CONFIG_FILE = "best_config.yaml"
OBJECTIVES = {"auc": ("val_auc_mean", "max"), "val_loss": ("val_loss", "min")}


def parse_schedule(text: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``"0.5:0.3,0.8:0.1"`` -> ((0.5, 0.8), (0.3, 0.1)); ``"none"`` -> ((), ())."""
    if text.strip().lower() in ("none", ""):
        return (), ()
    try:
        pairs = [tuple(float(v) for v in part.split(":")) for part in text.split(",")]
        fractions, factors = zip(*pairs, strict=True)
    except ValueError:
        raise ConfigError(f"schedule {text!r}: expected FRACTION:FACTOR[,...] or none") from None
    if not all(0 < f < 1 for f in fractions) or list(fractions) != sorted(set(fractions)):
        raise ConfigError(f"schedule {text!r}: fractions must increase within (0, 1)")
    if not all(f > 0 for f in factors):
        raise ConfigError(f"schedule {text!r}: factors must be > 0")
    return tuple(fractions), tuple(factors)


def drop_steps(fractions: tuple[float, ...], budget: int) -> tuple[int, ...]:
    """A schedule's drop fractions as the steps a trial of `budget` steps drops at."""
    return tuple(round(f * budget) for f in fractions)


@dataclass(frozen=True, kw_only=True)
class SearchConfig:
    train: TrainConfig = field(default_factory=TrainConfig)
    """The base training config of every trial (its storage and name are set per trial)."""
    name: str = "search"
    """Search name: re-running with the same name and storage continues the search."""
    storage: str = "runs"
    """Where the search folder goes: local path or storage URL."""
    lrs: tuple[float, ...] = (3e-5,)
    """Base learning rates to try (grid, or a choice for other algorithms). With lr_range,
    leave it at its default or empty: other values are refused, never ignored."""
    lr_range: tuple[float, ...] | None = None
    """(low, high): sample the base rate log-uniformly instead (not for grid)."""
    lambdas: tuple[float, ...] = (0.5,)
    """Rebalancing lambdas to try, within [0.05, 1]. With lambda_range, leave it at its
    default or empty: other values are refused, never ignored."""
    lambda_range: tuple[float, ...] | None = None
    """(low, high) within [0.05, 1]: sample lambda uniformly instead (not for grid)."""
    schedules: tuple[str, ...] = ("0.444:0.333,0.833:0.3",)
    """Drop schedules to try: FRACTION:FACTOR[,...] of the step budget, or none."""
    search_alg: str = "grid"
    """grid, random, or a Tune search algorithm: ax, hyperopt, optuna (installed)."""
    num_samples: int = 1
    """Trials to sample (grid: repeats of the whole grid, each repeat with seed + its
    number: initialisation and data order of its own)."""
    objective: Literal["auc", "val_loss"] = "auc"
    """auc: mean of raw and rebalanced validation AuC (max); val_loss: lambda = 1 validation
    loss (min)."""
    scheduler: Literal["asha", "fifo"] = "asha"
    """asha: stop weak trials early; fifo: run every trial to its end."""
    first_rung_fraction: float | None = None
    """ASHA's first rung as a fraction of the budget (default: after every schedule's last
    drop)."""
    reduction_factor: float = 2.0
    """ASHA keeps the best 1 / reduction_factor of the trials at each rung."""
    reports_per_trial: int = 8
    """Validations (and checkpoints) per trial: the points where ASHA can judge it."""
    max_gpus: int | None = None
    """GPUs the search may hold at once (default: the GPUs of the nodes up when it starts);
    sets concurrency."""
    max_concurrent: int | None = None
    """Cap on concurrent trials (default: as many as the nodes up when it starts hold). On a
    cluster (RAY_ADDRESS), the trials to run at once, whatever nodes are up yet: an
    autoscaler starts worker nodes as they ask for them."""
    seed: int = 0
    """Seed of the sampling searchers (random, optuna, hyperopt; ax takes none)."""
    final_steps: int | None = None
    """Step budget of best_config.yaml, its drops at the same fractions of it (default: the
    trials' budget, train.max_steps)."""

    SET_BY_THE_JOB: ClassVar[dict[str, str]] = {
        "train.lr": "give --lrs or --lr-range",
        "train.rebalance_lambda": "give --lambdas or --lambda-range",
        "train.lr_drop_steps": "give --schedules (fractions of the budget)",
        "train.lr_drop_factors": "give --schedules (fractions of the budget)",
        "train.checkpoint_every_steps": "give --reports-per-trial",
        "train.val_every_steps": "give --reports-per-trial",
        "train.name": "trials are named by their id (--name names the search)",
        "train.storage": "trials go under the search's folder (--storage)",
    }
    """The training fields each trial sets (`trial_config`): their flags are refused rather
    than ignored."""

    def __post_init__(self) -> None:
        problems = choice_problems(self)
        if self.search_alg not in SEARCH_ALGS:
            problems.append(f"search_alg {self.search_alg!r} is not one of {list(SEARCH_ALGS)}")
        if not self.lrs and self.lr_range is None:
            problems.append("the search space is empty: no lrs and no lr_range")
        if not self.lambdas and self.lambda_range is None:
            problems.append("the search space is empty: no lambdas and no lambda_range")
        if not self.schedules:
            problems.append("the search space is empty: no schedules")
        if any(not 0 <= lr < math.inf for lr in self.lrs):
            problems.append(f"lrs must be finite and >= 0, got {list(self.lrs)}")
        lo, hi = LAMBDA_RANGE
        if any(not lo <= lam <= hi for lam in self.lambdas):
            problems.append(f"lambdas must lie in [{lo}, {hi}], got {list(self.lambdas)}")
        for name in ("lrs", "lambdas"):  # a point twice: its trials, or its seeds, run again
            if len(set(values := getattr(self, name))) < len(values):
                problems.append(f"{name} lists a value twice: {list(values)}")
        for name, bounds, floor in (
            ("lr_range", self.lr_range, 0.0),
            ("lambda_range", self.lambda_range, lo),
        ):
            if bounds is None:
                continue
            if len(bounds) != 2 or not floor <= bounds[0] < bounds[1] < math.inf:
                problems.append(f"{name} must be (low, high) with {floor} <= low < high < inf")
            elif name == "lr_range" and bounds[0] <= 0:
                problems.append("lr_range is sampled log-uniformly: low must be > 0")
            elif name == "lambda_range" and bounds[1] > hi:
                problems.append(f"lambda_range must lie in [{lo}, {hi}]")
            if self.search_alg == "grid":
                problems.append(f"{name} needs a sampling search_alg, not grid")
        for values, name, bounds in (
            ("lrs", "lr_range", self.lr_range),
            ("lambdas", "lambda_range", self.lambda_range),
        ):
            given = getattr(self, values)
            default = next(f.default for f in dataclasses.fields(self) if f.name == values)
            if bounds is not None and given and given != default:
                problems.append(
                    f"{values} {list(given)} (given, or a preset's) and {name} {list(bounds)}: "
                    f"the search draws from {name} only: drop one (--{values} with no values "
                    "clears the list)"
                )
        parsed: set[tuple] = set()
        for text in self.schedules:
            try:
                fractions, factors = parse_schedule(text)
            except ConfigError as e:
                problems.append(str(e))
                continue
            if (fractions, factors) in parsed:
                problems.append(f"schedule {text!r} is listed twice (as written or another way)")
            parsed.add((fractions, factors))
            for budget in {self.train.max_steps, self.final_steps or self.train.max_steps}:
                steps = list(drop_steps(fractions, budget))
                if not all(0 < s < budget for s in steps) or len(set(steps)) < len(steps):
                    problems.append(f"schedule {text!r}: drops at steps {steps} of {budget}")
            if not all(math.isfinite(f) for f in factors):
                problems.append(f"schedule {text!r}: factors must be finite")
        if (
            self.num_samples < 1
            or self.reports_per_trial < 1
            or not 1 < self.reduction_factor < math.inf
        ):
            problems.append("num_samples, reports_per_trial >= 1 and reduction_factor > 1, finite")
        if self.first_rung_fraction is not None and not 0 < self.first_rung_fraction <= 1:
            problems.append("first_rung_fraction must lie in (0, 1]")
        if self.max_concurrent is not None and self.max_concurrent < 1:
            problems.append("max_concurrent must be >= 1")
        learning = self.search_alg not in ("grid", "random")
        if learning and self.discrete and self.num_samples > 1:
            problems.append(
                f"{self.search_alg} over choices only (no lr_range or lambda_range) may draw a "
                "point twice, the trials then copies with one seed: --search-alg grid runs "
                "each point once, random repeats a point with a seed of its own; or give a range"
            )
        if not 0 <= self.seed < 2**32:
            problems.append(f"seed must lie in [0, 2**32), got {self.seed}")
        if self.train.seed + (added := max(self.num_samples, RANDOM_SEEDS)) >= 2**63:
            problems.append(f"train.seed must be < 2**63 - {added} (trials add to it), "
                            f"got {self.train.seed}")  # fmt: skip
        problems += empty_problems(self, "storage")
        if self.final_steps is not None and self.final_steps < 1:
            problems.append("final_steps must be >= 1")
        if self.max_gpus is not None and self.gpus_per_trial > self.max_gpus:
            problems.append(
                f"a trial needs {self.gpus_per_trial} GPUs (train.num_workers) but max_gpus is "
                f"{self.max_gpus}"
            )
        if not self.train.val_data:
            problems.append("the objective needs validation data: set train.val_data")
        if problem := run_name_problem(self.name):
            problems.append(problem)
        if not problems and self.scheduler == "asha" and self.first_rung() >= self.train.max_steps:
            problems.append(
                f"ASHA's first rung falls at the budget's end (step {self.first_rung()}): it "
                "would stop no trial; give more reports_per_trial or an earlier rung"
            )
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def discrete(self) -> bool:
        """Whether the space is choices only (lists, no ranges): its points can repeat."""
        return self.lr_range is None and self.lambda_range is None

    @property
    def gpus_per_trial(self) -> int:
        return self.train.num_workers if self.train.use_gpu else 0

    @property
    def url(self) -> str:
        return storage.join(self.storage, self.name)

    @property
    def trials_url(self) -> str:
        """The folder of the trials' training runs, each named by its trial id."""
        return storage.join(self.url, "trials")

    @property
    def metric(self) -> str:
        return OBJECTIVES[self.objective][0]

    @property
    def mode(self) -> str:
        return OBJECTIVES[self.objective][1]

    def report_every(self) -> int:
        return max(1, math.ceil(self.train.max_steps / self.reports_per_trial))

    def first_rung(self) -> int:
        """ASHA's grace period in steps, on a report step: by default the first report after
        every schedule's last drop has taken effect (a report at step s covers the steps
        before s, and a drop at step d applies from step d on: s > d)."""
        every, budget = self.report_every(), self.train.max_steps
        if self.first_rung_fraction is None:
            drops = [d for s in self.schedules for d in drop_steps(parse_schedule(s)[0], budget)]
            steps = (max(drops, default=0) // every + 1) * every
        else:
            reports = round(self.first_rung_fraction * budget / every, 9)  # not 11.000000000002
            steps = max(every, math.ceil(reports) * every)
        return min(steps, budget)


def trial_config(search: SearchConfig, point: dict[str, Any], *, name: str) -> TrainConfig:
    """The training config of one trial: the base with the point's lr, lambda and schedule,
    validating and checkpointing at every report."""
    base = search.train
    fractions, factors = parse_schedule(point["schedule"])
    every = search.report_every()
    return dataclasses.replace(
        base,
        name=name,
        storage=search.trials_url,
        lr=float(point["lr"]),
        rebalance_lambda=float(point["rebalance_lambda"]),
        lr_drop_steps=drop_steps(fractions, base.max_steps),
        lr_drop_factors=factors,
        seed=int(point.get("seed", base.seed)),
        checkpoint_every_steps=every,
        val_every_steps=every,
        make_sample_data=False,
    )


# ---------------------------------------------------------------- presets


def ci() -> SearchConfig:
    """Four `ci` trials on CPU in a fixed order: `python -m jobs.tune --preset ci`; about
    1.5 minutes on 2 cores.

    Grid over lr in (1e-3, 0) x lambda in (0.5, 1.0) with the drop at 75% of 40 steps. ASHA's
    first rung sits at step 10, before the drop, to show pruning at this scale (a deliberate
    choice here, not the safe default): a trial that trails the earlier ones there stops.
    The lr = 0 trials never learn, but in 40 steps only lambda = 1 learns clearly, so which
    trials stop depends on the data; the results table says.
    """
    return SearchConfig(
        train=train.ci(),
        name="ci-search",
        lrs=(1e-3, 0.0),
        lambdas=(0.5, 1.0),
        schedules=("0.75:0.3",),
        reports_per_trial=4,
        first_rung_fraction=0.25,
    )


def paper() -> SearchConfig:
    """Lambda and the schedule around the released recipe, on GPUs: `python -m jobs.tune
    --preset paper --max-gpus 8 --train.data URL --train.val-data URL --storage URL`.

    Random search, 24 trials of 60k steps (batch 40, one GPU each): lr log-uniform in
    [1e-5, 1e-4], lambda uniform in [0.05, 1], and three schedules (the released fractions,
    earlier drops, one late drop). Budget-relative drops plus ASHA's first rung at the first
    report after the last drop of every schedule (step 57k, after the drop at 0.9 of the
    budget), so no trial is judged before annealing; the pruning comes from the single rung
    there (half the trials stop before their last 5%). 20 reports, one every 3k steps.
    best_config.yaml trains the winner for the released 450k steps.
    A trial's 2.4M crops take about 2 GPU-hours at an H100's naive fp32 rate and at least
    0.2 at its compiled bf16 rate (measured at batch 256; batch 40 keeps the GPU less busy),
    plus 20 validations of 2,000 images: 24 trials on 8 GPUs in well under a day.
    """
    base = dataclasses.replace(
        train.paper(), max_steps=60_000, val_images=2_000, name="paper-trial"
    )
    return SearchConfig(
        train=base,
        final_steps=train.paper().max_steps,
        name="paper-search",
        lrs=(),
        lr_range=(1e-5, 1e-4),
        lambdas=(),
        lambda_range=LAMBDA_RANGE,
        schedules=("0.444:0.333,0.833:0.3", "0.3:0.3,0.6:0.3", "0.9:0.1"),
        search_alg="random",
        num_samples=24,
        reports_per_trial=20,
    )


PRESETS = presets_of(ci, paper)


# ---------------------------------------------------------------- the search


def _param_space(search: SearchConfig) -> dict[str, Any]:
    from ray import tune

    if search.search_alg == "grid":
        space = {
            "lr": tune.grid_search(list(search.lrs)),
            "rebalance_lambda": tune.grid_search(list(search.lambdas)),
            "schedule": tune.grid_search(list(search.schedules)),
        }
        if search.num_samples > 1:  # repeats differ by their seed, or they would be copies
            seeds = [search.train.seed + r for r in range(search.num_samples)]
            space["seed"] = tune.grid_search(seeds)
        return space
    space = {
        "lr": tune.loguniform(*search.lr_range) if search.lr_range else tune.choice(search.lrs),
        "rebalance_lambda": (
            tune.uniform(*search.lambda_range)
            if search.lambda_range
            else tune.choice(search.lambdas)
        ),
        "schedule": tune.choice(list(search.schedules)),
    }
    if search.search_alg == "random" and search.discrete and search.num_samples > 1:
        # Draws of choices repeat points: each trial with a seed of its own, as a grid's
        # repeats (a learning searcher would model the seed: it is refused choices only,
        # see SearchConfig).
        seed = search.train.seed
        space["seed"] = tune.randint(seed, seed + RANDOM_SEEDS)
    return space


def _run_trial(point: dict[str, Any], *, search: dict[str, Any], session: str) -> None:
    """One Tune trial: a `TorchTrainer` run whose reports reach Tune through the callback.
    `session`: the search driver's run (`TRAIN_FAILED_FILE`)."""
    from ray import tune
    from ray.train import TrainingFailedError
    from ray.tune.integration.ray_train import TuneReportCallback

    cfg = from_dict(SearchConfig, search)
    trial_id = tune.get_context().get_trial_id()
    print(f"tune: trial {trial_id} starts", flush=True)
    trial = trial_config(cfg, point, name=trial_id)
    failed = storage.join(trial.run_url, TRAIN_FAILED_FILE)
    if storage.exists(failed, trial.s3):
        record = json.loads(storage.read_bytes(failed, trial.s3))
        if record.get("session") == session:
            raise RuntimeError(
                f"trial {trial_id}'s training failed after {trial.max_failures} restart(s) of "
                f"its workers: {record.get('error')}; continue the search to train it again"
            )
        storage.remove([failed], trial.s3)  # an earlier session's: trained again now
    # A trial that resumes (the search continued, or the trial restarted) goes on with the
    # data and prior it started with, as a training run must.
    train.check_resumable(trial)
    try:  # forgets an earlier attempt's divergence, which `jobs.tune_asha` would replay
        train.fit(trial, callbacks=[TuneReportCallback()])
    except TrainingFailedError as error:  # after train.max_failures restarts
        text = f"{type(error).__name__}: {error}"[:4000]
        record = json.dumps({"session": session, "error": text}).encode()
        storage.write_bytes(failed, record, trial.s3)
        raise


def _run_state(experiment: str, fs) -> str | None:
    """The newest of Tune's saved states of the search in folder `experiment` (None where
    the search stopped before Tune saved one: it starts anew), checked to read as JSON. Tune
    meeting one that does not read would start a new search in the folder, and every later
    continue would continue that one."""
    import pyarrow.fs

    selector = pyarrow.fs.FileSelector(experiment, allow_not_found=True)
    files = [info.path for info in fs.get_file_info(selector)]
    states = sorted(
        path
        for path in files
        if posixpath.basename(path).startswith(TUNE_STATE_PREFIX) and path.endswith(".json")
    )
    if not states:
        return None
    try:
        with fs.open_input_stream(states[-1]) as f:
            json.loads(f.read())
    except ValueError as error:
        # The searcher's state of that session too: Tune reads the newest of those apart,
        # and would pair it with the older search state.
        session = posixpath.basename(states[-1])[len(TUNE_STATE_PREFIX) : -len(".json")]
        saved = sorted(p for p in files if posixpath.splitext(p)[0].endswith(f"-{session}"))
        raise ValueError(
            f"the search's state {states[-1]} does not read ({error}): move away the files "
            f"Tune saved with it ({', '.join(saved)}; the search then continues from the "
            "state before them, or starts anew where there is none), or search under "
            "another --name"
        ) from None
    return states[-1]


def _concurrency(search: SearchConfig) -> int:
    autoscaling = bool(os.environ.get("RAY_ADDRESS"))  # a cluster, which may add nodes
    slots = trial_slots(search, alive_node_resources(), autoscaling=autoscaling)
    return min(slots, search.max_concurrent or math.inf)


def trial_slots(
    search: SearchConfig, nodes: list[dict[str, float]], *, autoscaling: bool = False
) -> int:
    """The trials of `search` that can run at once on nodes of these resources (each a
    node's, as `ray.nodes()` gives them), or a ValueError when not one can. Each of a trial's
    workers takes its CPUs (and GPU) on one node, so a cluster whose total would do but whose
    nodes are each too small to hold a worker would leave trials waiting forever.

    GPU trials with `max_gpus` take that count as given, and on an `autoscaling` cluster,
    whose worker nodes start as the trials ask for them, so do `max_concurrent` trials.
    Where the nodes offer `DRIVER_RESOURCE`, each trial's function takes one (and no CPU),
    and no more trials run at once than there are; elsewhere `TRIAL_DRIVER_CPU`."""
    drivers = sum(node.get(DRIVER_RESOURCE, 0) for node in nodes)
    if drivers >= 1:
        slots = _resource_slots(search, nodes, driver_cpu=0.0, autoscaling=autoscaling)
        return min(slots, int(drivers))
    return _resource_slots(search, nodes, driver_cpu=TRIAL_DRIVER_CPU, autoscaling=autoscaling)


def _resource_slots(
    search: SearchConfig, nodes: list[dict[str, float]], *, driver_cpu: float, autoscaling: bool
) -> int:
    train_cfg = search.train
    if search.gpus_per_trial and search.max_gpus is not None:
        return search.max_gpus // search.gpus_per_trial  # >= 1: SearchConfig checks it
    if autoscaling and search.max_concurrent:
        return search.max_concurrent
    fits = workers_fit(train_cfg.worker_needs, nodes)
    cpus = sum(node.get("CPU", 0) for node in nodes)
    per_trial = train_cfg.num_workers * train_cfg.cpus_per_worker + driver_cpu
    slots = min(fits // train_cfg.num_workers, int(cpus // per_trial))
    if slots < 1:
        function = f" (and {driver_cpu} CPU for its Tune function)" if driver_cpu else ""
        hint = ""
        if autoscaling:
            flags = (
                "--max-gpus or --max-concurrent" if search.gpus_per_trial else "--max-concurrent"
            )
            hint = (f": on an autoscaling cluster whose worker nodes are not up yet, give "
                    f"{flags} (the trials to run at once)")  # fmt: skip
        raise ValueError(
            f"a trial needs {train_cfg.workers_text()}, each worker on one node{function}: the "
            f"cluster's nodes hold {fits} such workers ({describe_nodes(nodes)}){hint}"
        )
    return slots


def _trial_driver_resources() -> dict[str, float]:
    import ray

    if ray.cluster_resources().get(DRIVER_RESOURCE):
        return {"cpu": 0, DRIVER_RESOURCE: 1}
    return {"cpu": TRIAL_DRIVER_CPU}


def build_tuner(search: SearchConfig):
    """The `Tuner` for `search`, restored when the search folder already holds one."""
    from ray import tune
    from ray.tune.schedulers import FIFOScheduler
    from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter, create_searcher

    from jobs.tune_asha import ResumableASHA

    search = dataclasses.replace(search, train=train.with_absolute_paths(search.train))
    search = dataclasses.replace(search, storage=storage.absolute(search.storage))
    fs, path = storage.arrow_filesystem(search.storage, search.train.s3)
    session = uuid.uuid4().hex  # this driver's: see TRAIN_FAILED_FILE
    trainable = tune.with_resources(
        tune.with_parameters(_run_trial, search=to_dict(search), session=session),
        _trial_driver_resources(),
    )
    experiment = f"{path.rstrip('/')}/{search.name}"
    if tune.Tuner.can_restore(experiment, storage_filesystem=fs) and _run_state(experiment, fs):
        print(
            f"tune: continuing search {search.name} from {search.url} (at the concurrency "
            "it started with: max_gpus and max_concurrent are not changed)"
        )
        space = _param_space(search)  # not saved with the search
        restore = functools.partial(
            tune.Tuner.restore, experiment, trainable=trainable, resume_unfinished=True,
            resume_errored=True, storage_filesystem=fs,
        )  # fmt: skip
        try:
            return restore(param_space=space)
        except ValueError as error:  # begun before random searches drew a seed a trial
            if "seed" not in space or "param_space" not in str(error):
                raise
            return restore(param_space={k: v for k, v in space.items() if k != "seed"})

    concurrency = _concurrency(search)
    if search.search_alg in ("grid", "random"):
        searcher = BasicVariantGenerator(max_concurrent=concurrency, random_state=search.seed)
    else:
        seeded = {}
        if search.search_alg in SEED_ARGUMENTS:
            seeded[SEED_ARGUMENTS[search.search_alg]] = search.seed
        searcher = ConcurrencyLimiter(
            create_searcher(search.search_alg, metric=search.metric, mode=search.mode, **seeded),
            max_concurrent=concurrency,
        )
    if search.scheduler == "asha":
        scheduler = ResumableASHA(  # rungs refilled from the trials' runs when continued
            trials_url=search.trials_url,
            s3=search.train.s3,
            max_t=search.train.max_steps,
            grace_period=search.first_rung(),
            reduction_factor=search.reduction_factor,
        )
    else:
        scheduler = FIFOScheduler()
    return tune.Tuner(
        trainable,
        param_space=_param_space(search),
        tune_config=tune.TuneConfig(
            metric=search.metric,
            mode=search.mode,
            search_alg=searcher,
            scheduler=scheduler,
            num_samples=1 if search.search_alg == "grid" else search.num_samples,
        ),  # concurrency: the searcher's own limit (Tune's max_concurrent_trials beside it warns)
        run_config=tune.RunConfig(
            name=search.name,
            storage_path=path,
            storage_filesystem=fs,
            failure_config=tune.FailureConfig(max_failures=TRIAL_RESTARTS),
        ),
    )


# ---------------------------------------------------------------- results


METRIC_COLUMNS = ("val_auc_raw", "val_auc_rebalanced", "val_auc_mean", "val_loss")
TABLE_COLUMNS = ("trial", "lr", "lambda", "schedule", "seed", "steps", *METRIC_COLUMNS, "status")


def trial_status(
    error: BaseException | None,
    state: str,
    steps: int,
    budget: int,
    diverged: bool = False,
    done: bool = True,
) -> str:
    """How a trial ended: an error, diverged (its loss no longer finite: the training loop
    stopped it), completed (its whole budget), stopped early (by the scheduler), or
    unfinished: the search was interrupted (Tune's `state` is not TERMINATED, or it is short
    of its budget and its last result is not `done`: Tune stops the trials it was running
    when interrupted, while one the scheduler stopped has a last result marked done).
    Re-running the search continues it."""
    if error is not None or state == "ERROR":  # (its error file may be unreadable)
        return f"error: {type(error).__name__}" if error is not None else "error"
    if state != "TERMINATED":
        return "unfinished"
    if diverged:
        return "diverged"
    if steps >= budget:  # (a search continued after its driver died may not say done)
        return "completed"
    return "stopped early" if done else "unfinished"


def results_table(result_grid, search: SearchConfig) -> list[dict[str, Any]]:
    """One row per trial: its config, its last reported figures and how it ended."""
    # Tune's own state of each trial, in the order of the grid's results (no public API).
    trials = getattr(getattr(result_grid, "_experiment_analysis", None), "trials", None)
    states = [t.status for t in trials] if trials else ["TERMINATED"] * len(result_grid)
    rows = []
    for result, state in zip(result_grid, states, strict=True):
        metrics = result.metrics or {}
        steps = int(metrics.get("step", 0))
        status = trial_status(
            result.error,
            state,
            steps,
            search.train.max_steps,
            diverged="diverged" in metrics,
            done=bool(metrics.get("done")),
        )
        if status == "diverged":  # its worst figures were for Tune's sake: no score
            metrics = {k: v for k, v in metrics.items() if k not in METRIC_COLUMNS}
        rows.append(
            {
                "trial": metrics.get("trial_id") or result.path.rsplit("/", 1)[-1],
                "lr": result.config["lr"],
                "lambda": result.config["rebalance_lambda"],
                "schedule": result.config["schedule"],
                "seed": result.config.get("seed", search.train.seed),
                "steps": steps,
                **{k: metrics.get(k, math.nan) for k in METRIC_COLUMNS},
                "status": status,
                "_history": (
                    result.metrics_dataframe.to_dict("records")
                    if result.metrics_dataframe is not None
                    else []
                ),
            }
        )
    return sorted(rows, key=lambda row: row["trial"])  # a continued search lists them anew


def best_row(rows: list[dict[str, Any]], search: SearchConfig) -> dict[str, Any] | None:
    """The best trial by the objective. Trials of one point (lr, lambda, schedule) with
    other seeds, a grid's repeats or a random search's over choices, count by their mean:
    the point is chosen, not the luckiest seed; its best trial stands for it. Points all of
    whose trials completed come first (the mean of the seeds a scheduler let through would
    be a mean of the lucky ones), then the completed trials of the others (figures at one
    budget), then any scored."""
    points: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        points.setdefault((row["lr"], row["lambda"], row["schedule"]), []).append(row)
    scored = [
        [r for r in same if not math.isnan(r[search.metric]) and r["status"] != "diverged"]
        for same in points.values()
    ]
    every_completed = [
        same
        for same, every in zip(scored, points.values(), strict=True)
        if same and all(r["status"] == "completed" for r in every)
    ]
    completed = [[r for r in same if r["status"] == "completed"] for same in scored]
    tiers = (every_completed, [same for same in completed if same], [s for s in scored if s])
    pool = next((tier for tier in tiers if tier), None)
    if pool is None:
        return None
    sign = 1 if search.mode == "max" else -1
    best = max(pool, key=lambda same: sign * sum(r[search.metric] for r in same) / len(same))
    return max(best, key=lambda r: sign * r[search.metric])


def _format(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + " --- |" * len(TABLE_COLUMNS)]
    for row in rows:
        lines.append("| " + " | ".join(_format(row[c]) for c in TABLE_COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def csv_table(rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=TABLE_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def plot_objective(rows: list[dict[str, Any]], search: SearchConfig) -> bytes:
    """Objective against lambda (colour: lr, on a log scale as it is searched, where every
    rate is > 0) and against the schedule, for the trials that have one."""
    from matplotlib.colors import LogNorm

    plt = pyplot()
    fig, (ax_lam, ax_sched) = plt.subplots(1, 2, figsize=(10, 3.8), dpi=110)
    scored = [r for r in rows if math.isfinite(r[search.metric])]
    lrs = [r["lr"] for r in scored]
    log_scale = lrs and min(lrs) > 0 and max(lrs) > min(lrs)
    points = ax_lam.scatter(
        [r["lambda"] for r in scored],
        [r[search.metric] for r in scored],
        c=lrs,
        cmap="viridis",
        norm=LogNorm() if log_scale else None,
    )
    if scored:
        fig.colorbar(points, ax=ax_lam, label="base lr")
    schedules = sorted({r["schedule"] for r in rows})
    ax_sched.scatter(
        [schedules.index(r["schedule"]) for r in scored], [r[search.metric] for r in scored]
    )
    ax_sched.set_xticks(range(len(schedules)), schedules, rotation=15, fontsize=8)
    ax_lam.set(xlabel="lambda", ylabel=search.metric, title="objective against lambda")
    ax_sched.set(xlabel="schedule (fraction:factor)", title="objective against the schedule")
    return figure_png(fig)


def plot_curves(rows: list[dict[str, Any]], search: SearchConfig) -> bytes:
    """Every trial's objective against the step, stopped trials dashed."""
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for row in rows:
        points = [h for h in row["_history"] if search.metric in h and "step" in h]
        style = "-" if row["status"] == "completed" else "--"
        label = f"lr {row['lr']:.2g}, lambda {row['lambda']:.2f}, {row['schedule']}"
        ax.plot([p["step"] for p in points], [p[search.metric] for p in points], style, label=label)
    ax.set(xlabel="step", ylabel=search.metric, title="trials (dashed: stopped early)")
    ax.legend(fontsize=7)
    return figure_png(fig)


def best_train_config(search: SearchConfig, row: dict[str, Any]) -> TrainConfig:
    """The winning trial as a training config of its own, of `final_steps` steps (the
    schedule's drops at the same fractions of them), its local paths absolute: it runs
    from wherever `jobs.train --config` is."""
    cfg = trial_config(search, row, name=f"{search.name}-best")
    base = search.train
    steps = search.final_steps or base.max_steps
    return train.with_absolute_paths(
        dataclasses.replace(
            cfg,
            seed=base.seed,  # the point was chosen over its seeds: the search's own
            storage=search.storage,
            max_steps=steps,
            lr_drop_steps=drop_steps(parse_schedule(row["schedule"])[0], steps),
            checkpoint_every_steps=base.checkpoint_every_steps,
            val_every_steps=base.val_every_steps,
        )
    )


def planned_trials(search: SearchConfig) -> int:
    """How many trials the search makes: the grid's points times its repeats, or the
    samples of the other searchers."""
    if search.search_alg == "grid":
        return len(search.lrs) * len(search.lambdas) * len(search.schedules) * search.num_samples
    return search.num_samples


def unfinished(rows: list[dict[str, Any]], search: SearchConfig) -> int:
    """Trials of the search not finished: started and interrupted, or not started."""
    started = sum(r["status"] == "unfinished" for r in rows)
    return started + max(0, planned_trials(search) - len(rows))


def write_outputs(rows: list[dict[str, Any]], search: SearchConfig) -> dict[str, Any] | None:
    """The results table and plots; and the best config, once every trial has finished
    (until then, or where no trial has a score, one an earlier run of the search wrote is
    removed: a continued search may retrain its errored trials, and another may win)."""
    s3 = search.train.s3
    storage.write_bytes(storage.join(search.url, "results.md"), markdown_table(rows).encode(), s3)
    storage.write_bytes(storage.join(search.url, "results.csv"), csv_table(rows).encode(), s3)
    storage.write_bytes(storage.join(search.url, "objective.png"), plot_objective(rows, search), s3)
    storage.write_bytes(storage.join(search.url, "curves.png"), plot_curves(rows, search), s3)
    best_url = storage.join(search.url, BEST_CONFIG_FILE)
    best = None if unfinished(rows, search) else best_row(rows, search)
    if best is None:
        storage.remove([best_url], s3)
        return None
    point = {"lr": best["lr"], "rebalance_lambda": best["lambda"], **best}
    save_config(best_train_config(search, point), best_url, s3)
    return best


def search_changes(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """The fields (dotted) in which the search config `now` differs from the one a search
    folder was started with, `saved`. Fields the record lacks (added to the code since)
    are not compared, nor those that change no trial's result (`RESUME_FREE_FIELDS`,
    `RESUME_FREE_TRAIN_FIELDS`)."""
    changed = []
    for key, value in now.items():
        if key in RESUME_FREE_FIELDS or key not in saved:
            continue
        if key == "train":
            changed += [
                f"train.{k}"
                for k, v in value.items()
                if k in saved[key]
                and k not in RESUME_FREE_TRAIN_FIELDS
                and not train.kept(saved[key][k], v)
            ]
        elif not train.kept(saved[key], value):
            changed.append(key)
    return changed


def _check_same_search(search: SearchConfig) -> bool:
    """Whether the search folder holds this search already: continuing it with a config
    that would change its trials' results is refused."""
    url = storage.join(search.url, SEARCH_CONFIG_FILE)
    s3 = search.train.s3
    if not storage.exists(url, s3):
        return False
    from jobs.config import load_config_file

    if changed := search_changes(load_config_file(url, s3), to_dict(search)):
        raise ValueError(
            f"{search.url} holds a search with other {', '.join(changed)} (see {url}); pass "
            "another --name, or the same values to continue it"
        )
    return True


def _check_same_inputs(search: SearchConfig, started: bool) -> bytes:
    """The record of the search's prior, training and validation data (`SEARCH_INPUTS_FILE`):
    continuing a search whose prior or data changed since it started is refused (its trials
    would be trained and ranked on two of them). A search started before the record was
    kept takes this one."""
    digests = train.input_digests(train.with_absolute_paths(search.train), validation=True)
    url, s3 = storage.join(search.url, SEARCH_INPUTS_FILE), search.train.s3
    if started and storage.exists(url, s3):
        recorded = json.loads(storage.read_bytes(url, s3))
        if changed := sorted(k for k in recorded if recorded[k] != digests.get(k)):
            raise ValueError(
                f"{search.url} holds a search that started with another "
                f"{', '.join(k.removesuffix('_sha256') for k in changed)} (see {url}): "
                "continue it with the files it started with, or pass another --name"
            )
    return json.dumps(digests, indent=1).encode()


def _check_searcher(search: SearchConfig) -> None:
    """A named searcher's package must be installed (checked before Ray starts)."""
    import importlib.util

    if search.search_alg in SEARCHER_PACKAGES:
        module, package = SEARCHER_PACKAGES[search.search_alg]
        if importlib.util.find_spec(module) is None:
            raise ValueError(
                f"search_alg {search.search_alg} needs the {package} package: pip install {package}"
            )


def main(search: SearchConfig) -> list[dict[str, Any]]:
    """Run (or continue) the search; returns the results table. An interrupted search
    (Ctrl-C) writes the table of what it has, marks the trials it had not finished, and
    writes no best config: the same command continues it."""
    from jobs.lease import DriverLease
    from jobs.runtime import check_accelerator_type, check_gpus, init_ray

    # the trials' config as they run it: under the search's folder, not train.storage
    base = dataclasses.replace(train.with_absolute_paths(search.train), storage=search.storage)
    _check_searcher(search)
    check_gpus(search.gpus_per_trial, "a trial (train.use_gpu)")
    train.preflight(base)  # (the search's storage among its checks)
    started = _check_same_search(search)  # a refused change fails before Ray starts
    with DriverLease(search.url, search.train.s3, what=f"search {search.name}"):
        init_ray(paths=[search.storage, base.data, base.val_data, base.prior_url])
        check_accelerator_type(base.accelerator_type, "tune --train.accelerator-type")
        if base.make_sample_data:
            train.ensure_sample_data(base)
            train.preflight(dataclasses.replace(base, make_sample_data=False))
        start = time.monotonic()
        inputs = _check_same_inputs(search, started)
        tuner = build_tuner(search)
        if not started:  # recorded once the search could be set up, not by a failed start
            save_config(search, storage.join(search.url, SEARCH_CONFIG_FILE), search.train.s3)
        storage.write_bytes(storage.join(search.url, SEARCH_INPUTS_FILE), inputs, search.train.s3)
        result_grid = tuner.fit()
        rows = results_table(result_grid, search)
        best = write_outputs(rows, search)
        print(markdown_table(rows), end="")
        print(
            f"tune: {len(rows)} trials in {time.monotonic() - start:.0f}s; results in {search.url}"
        )
        if left := unfinished(rows, search):
            print(
                f"tune: the search was interrupted with {left} of its {planned_trials(search)} "
                "trials unfinished (no best config yet); run the same command again to continue it"
            )
        elif best is not None:
            print(
                f"tune: best {search.metric} {best[search.metric]:.4f} with lr {best['lr']:.3g}, "
                f"lambda {best['lambda']:.3g}, schedule {best['schedule']}; "
                f"python -m jobs.train --config {storage.join(search.url, BEST_CONFIG_FILE)}"
            )
        return rows


if __name__ == "__main__":
    from jobs.config import run_job

    run_job("jobs.tune", "SearchConfig")

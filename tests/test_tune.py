"""The search job: its space and validation, and a real 4-trial ASHA search of the `ci`
model on the S3 fixture."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import subprocess
import sys

import pytest

from jobs import storage, train, tune
from jobs.config import ConfigError, load_config_file, parse_config, save_config, to_dict
from jobs.lease import LEASE_DIR, DriverLease
from jobs.models import CHECKPOINT_FILE, checkpoint_dir_name
from jobs.train import TrainConfig
from tests.support import ROOT, Beside, train_workers


def test_schedules_parse_to_budget_fractions() -> None:
    assert tune.parse_schedule("0.444:0.333,0.833:0.3") == ((0.444, 0.833), (0.333, 0.3))
    assert tune.parse_schedule("none") == ((), ())
    for bad in ("0.8:0.3,0.5:0.3", "1.2:0.3", "0.5", "0.5:-1", "half:0.3"):
        with pytest.raises(ConfigError):
            tune.parse_schedule(bad)


def test_trial_config_places_drops_within_the_trial_budget() -> None:
    search = dataclasses.replace(tune.ci(), schedules=("0.5:0.3,0.75:0.1",))
    cfg = tune.trial_config(
        search, {"lr": 2e-3, "rebalance_lambda": 0.25, "schedule": "0.5:0.3,0.75:0.1"}, name="t"
    )
    assert (cfg.lr, cfg.rebalance_lambda) == (2e-3, 0.25)
    assert cfg.lr_drop_steps == (20, 30) and cfg.lr_drop_factors == (0.3, 0.1)
    assert cfg.val_every_steps == cfg.checkpoint_every_steps == 10  # 40 steps, 4 reports
    assert cfg.storage == storage.join(search.url, "trials") and cfg.name == "t"


def test_first_rung_defaults_to_after_every_schedules_last_drop() -> None:
    search = dataclasses.replace(
        tune.ci(), schedules=("0.3:0.3", "0.5:0.3,0.7:0.3"), first_rung_fraction=None
    )
    assert search.first_rung() == 30  # after 0.7 x 40 = 28, on a report step
    on_report = dataclasses.replace(search, schedules=("0.5:0.3",))  # drop at 20, a report step
    assert on_report.first_rung() == 30  # the report at 20 has no step at the lowered rate
    assert dataclasses.replace(search, first_rung_fraction=0.25).first_rung() == 10
    # the first report after the late "0.9:0.1" schedule's drop at step 54k
    assert tune.paper().first_rung() == 57_000
    # 0.55 x 450k / 22.5k is 11.000000000000002 in floating point: still the 11th report
    paper = tune.paper()
    released = dataclasses.replace(paper.train, max_steps=450_000)
    late = dataclasses.replace(paper, train=released, first_rung_fraction=0.55)
    assert late.first_rung() == 11 * late.report_every() == 247_500


def test_the_best_point_is_chosen_by_the_mean_of_its_seeds() -> None:
    """Repeats of a point with other seeds count by their mean, not by the luckiest one."""
    search = dataclasses.replace(tune.ci(), num_samples=2)

    def row(lr: float, seed: int, auc: float, status: str = "completed") -> dict:
        return {"lr": lr, "lambda": 0.5, "schedule": "0.5:0.3", "seed": seed,
                "val_auc_mean": auc, "status": status}  # fmt: skip

    rows = [row(1e-3, 0, 0.90), row(1e-3, 1, 0.60), row(2e-3, 0, 0.80), row(2e-3, 1, 0.78),
            row(3e-3, 0, 0.99, "stopped early"),
            row(4e-3, 0, 0.95), row(4e-3, 1, 0.90, "stopped early")]  # fmt: skip
    best = tune.best_row(rows, search)
    # mean 0.79 beats 0.75; points whose every seed completed first: 4e-3's surviving seed
    # alone is not its mean
    assert (best["lr"], best["seed"]) == (2e-3, 0)
    stopped = [r for r in rows if r["lr"] >= 3e-3]
    # no point whose every repeat completed: the completed trials (one budget) first
    assert tune.best_row(stopped, search)["lr"] == 4e-3
    assert tune.best_row(stopped[:1], search)["lr"] == 3e-3  # none completed: the scored
    diverged = [row(5e-3, 0, 0.0, "diverged")]  # its worst figures are not a score
    assert tune.best_row(diverged, search) is None
    assert tune.best_row([row(5e-3, 0, float("nan"))], search) is None
    # the mean, not the sum (more seeds do not make a point better); its best seed stands
    rows = [row(1e-3, 0, 0.70), row(2e-3, 0, 0.50), row(2e-3, 1, 0.50), row(2e-3, 2, 0.55)]
    assert tune.best_row(rows, search)["lr"] == 1e-3
    rows = [row(1e-3, 0, 0.78), row(1e-3, 1, 0.80)]
    assert tune.best_row(rows, search)["seed"] == 1
    losses = dataclasses.replace(search, objective="val_loss")  # minimised
    rows = [{**row(1e-3, 0, 0.0), "val_loss": 2.0}, {**row(2e-3, 0, 0.0), "val_loss": 1.0}]
    assert tune.best_row(rows, losses)["lr"] == 2e-3
    assert tune.best_train_config(search, {**best, "rebalance_lambda": 0.5}).seed == 0
    lucky = {**best, "seed": 1, "rebalance_lambda": 0.5}
    assert tune.best_train_config(search, lucky).seed == search.train.seed


def test_the_best_config_trains_for_the_final_budget_with_the_same_fractions() -> None:
    search = dataclasses.replace(tune.ci(), final_steps=400)
    point = {"lr": 1e-3, "rebalance_lambda": 0.5, "schedule": "0.75:0.3", "seed": 3}
    cfg = tune.best_train_config(search, point)
    assert (cfg.max_steps, cfg.lr_drop_steps, cfg.lr_drop_factors) == (400, (300,), (0.3,))
    trial = tune.best_train_config(dataclasses.replace(search, final_steps=None), point)
    assert (trial.max_steps, trial.lr_drop_steps) == (40, (30,))  # the trials' own budget
    # its own run beside the search, checkpointed and validated as the base config says
    # (local paths made absolute: the config runs from wherever `jobs.train --config` is)
    assert search.storage == "runs" and cfg.storage == os.path.abspath("runs")
    assert cfg.name == f"{search.name}-best"
    assert cfg.data == os.path.abspath(search.train.data) != search.train.data
    assert cfg.checkpoint_every_steps == search.train.checkpoint_every_steps
    assert cfg.val_every_steps == search.train.val_every_steps
    with pytest.raises(ValueError, match="final_steps must be >= 1"):
        dataclasses.replace(search, final_steps=0)
    paper = tune.paper()
    assert paper.final_steps == 450_000 and paper.train.max_steps == 60_000


def test_trial_status_tells_unfinished_trials_from_stopped_ones() -> None:
    assert tune.trial_status(None, "TERMINATED", 40, 40) == "completed"
    assert tune.trial_status(None, "TERMINATED", 10, 40) == "stopped early"
    for state in ("RUNNING", "PENDING", "PAUSED"):  # a search interrupted
        assert tune.trial_status(None, state, 10, 40) == "unfinished"
    assert tune.trial_status(OSError("x"), "ERROR", 10, 40) == "error: OSError"
    assert tune.trial_status(None, "TERMINATED", 10, 40, diverged=True) == "diverged"
    assert tune.trial_status(None, "ERROR", 10, 40) == "error"  # its error file unread
    # Tune stops the trials it was running when interrupted: TERMINATED, last result not done
    assert tune.trial_status(None, "TERMINATED", 20, 40, done=False) == "unfinished"
    assert tune.trial_status(None, "TERMINATED", 40, 40, done=False) == "completed"


def test_a_continued_search_may_change_only_what_changes_no_result(tmp_path) -> None:
    save_config(tune.ci(), str(tmp_path / "search.yaml"))  # as a search folder records it
    saved = load_config_file(str(tmp_path / "search.yaml"))
    same = tune.search_changes(saved, to_dict(tune.ci()))
    assert same == []
    free = dataclasses.replace(
        tune.ci(), max_concurrent=1, max_gpus=3, final_steps=100,
        train=dataclasses.replace(tune.ci().train, tracking="none", max_failures=0),
    )  # fmt: skip
    assert tune.search_changes(saved, to_dict(free)) == []
    changed = dataclasses.replace(
        tune.ci(), lambdas=(0.25,), train=dataclasses.replace(tune.ci().train, batch_size=8)
    )
    assert tune.search_changes(saved, to_dict(changed)) == ["train.batch_size", "lambdas"]
    older = {k: v for k, v in saved.items() if k != "reduction_factor"}  # a field added since
    older["train"] = {k: v for k, v in saved["train"].items() if k != "batch_size"}
    newer = dataclasses.replace(tune.ci(), reduction_factor=3.0)
    assert tune.search_changes(older, to_dict(newer)) == []


def test_an_interrupted_search_writes_its_table_and_no_best_config(tmp_path) -> None:
    search = dataclasses.replace(tune.ci(), storage=str(tmp_path), lrs=(1e-3, 2e-3), lambdas=(0.5,))
    rows = [
        {"trial": f"t{i}", "lr": 1e-3 * (i + 1), "lambda": 0.5, "schedule": "0.75:0.3",
         "seed": 0, "steps": steps, "val_auc_raw": 0.8, "val_auc_rebalanced": 0.8,
         "val_auc_mean": 0.8, "val_loss": 1.0, "status": status, "_history": []}
        for i, (steps, status) in enumerate([(40, "completed"), (20, "unfinished")])
    ]  # fmt: skip
    assert tune.write_outputs(rows, search) is None
    assert storage.exists(storage.join(search.url, "results.csv"))
    assert not storage.exists(storage.join(search.url, tune.BEST_CONFIG_FILE))
    rows[1]["status"] = "stopped early"  # the same table, finished: a best config
    assert tune.write_outputs(rows, search)["trial"] == "t0"
    assert storage.exists(storage.join(search.url, tune.BEST_CONFIG_FILE))
    # a grid point not started yet (interrupted before it) is unfinished too
    assert tune.unfinished(rows[:1], search) == 1 and tune.unfinished(rows, search) == 0
    bigger = dataclasses.replace(search, num_samples=2)
    assert tune.planned_trials(bigger) == 4 and tune.write_outputs(rows, bigger) is None
    # the best config of the search's earlier end is removed: the trials left may win
    assert not storage.exists(storage.join(search.url, tune.BEST_CONFIG_FILE))


def test_the_objective_plot_draws_any_table() -> None:
    """Diverged trials (no score), a single rate, a rate of 0 (no log scale), no trial."""
    nan = float("nan")

    def row(lr: float, auc: float) -> dict:
        return {"lr": lr, "lambda": 0.5, "schedule": "0.75:0.3", "val_auc_mean": auc}

    for rows in ([row(1e30, nan)], [row(1e-3, 0.8)], [row(0.0, 0.8), row(1e-3, 0.7)], []):
        assert tune.plot_objective(rows, tune.ci()).startswith(b"\x89PNG")


def test_a_searcher_not_installed_fails_before_ray(monkeypatch) -> None:
    monkeypatch.setitem(tune.SEARCHER_PACKAGES, "optuna", ("no_such_searcher", "no-such"))
    search = dataclasses.replace(tune.ci(), search_alg="optuna", lrs=(), lr_range=(1e-4, 1e-3))
    with pytest.raises(ValueError, match="needs the no-such package: pip install no-such"):
        tune.main(search)


def test_grid_repeats_differ_by_their_seed() -> None:
    from ray.tune.search.variant_generator import generate_variants

    search = dataclasses.replace(tune.ci(), lrs=(1e-3, 2e-3), lambdas=(0.5,), num_samples=2)
    points = [spec for _, spec in generate_variants(tune._param_space(search))]
    configs = [tune.trial_config(search, p, name=f"t{i}") for i, p in enumerate(points)]
    assert sorted((c.lr, c.seed) for c in configs) == [(1e-3, 0), (1e-3, 1), (2e-3, 0), (2e-3, 1)]
    single = dataclasses.replace(search, num_samples=1)
    assert "seed" not in tune._param_space(single)

    # A random search over choices draws repeats of its points: each with a seed of its own.
    drawn = dataclasses.replace(search, search_alg="random", num_samples=12)
    space = tune._param_space(drawn)
    points = [spec for _ in range(drawn.num_samples) for _, spec in generate_variants(space)]
    configs = [tune.trial_config(drawn, p, name=f"t{i}") for i, p in enumerate(points)]
    assert len({(c.lr, c.seed) for c in configs}) == len(configs)  # not one copy
    assert len({c.lr for c in configs}) == 2  # of two points
    ranged = dataclasses.replace(drawn, lrs=(), lr_range=(1e-4, 1e-3))
    assert "seed" not in tune._param_space(ranged)  # points never repeat


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--lrs"], "search space is empty"),
        (["--schedules"], "search space is empty"),
        (["--lambdas", "0.01"], "lambdas must lie in [0.05, 1.0]"),
        (["--lambdas", "1.5"], "lambdas must lie in [0.05, 1.0]"),
        (["--lambda-range", "0.01", "0.5", "--search-alg", "random"], "lambda_range"),
        (["--lr-range", "1e-5", "1e-3"], "needs a sampling search_alg"),
        (
            ["--lr-range", "1e-5", "1e-3", "--search-alg", "random"],
            "lrs [0.001, 0.0] (given, or a preset's)",
        ),
        (
            ["--lambdas", "0.3", "--lambda-range", "0.1", "0.5", "--search-alg", "random"],
            "lambdas [0.3] (given, or a preset's) and lambda_range [0.1, 0.5]",
        ),
        (["--train.use-gpu", "--train.num-workers", "4", "--max-gpus", "2"], "needs 4 GPUs"),
        (["--search-alg", "annealing"], "is not one of"),
        (["--search-alg", "optuna", "--num-samples", "2"], "optuna over choices only (no lr_"),
        (["--search-alg", "hyperopt", "--seed", "-1"], "seed must lie in [0, 2**32), got -1"),
        (["--train.seed", str(2**63 - 2)], "train.seed must be < 2**63 - 1048576"),
        (["--storage", ""], "storage is empty: give a path or URL"),
        (["--schedules", "0.9:0.3,0.5:0.3"], "fractions must increase"),
        (["--schedules", "0.99:0.3"], "drops at steps [40] of 40"),
        (["--final-steps", "2", "--schedules", "0.3:0.3,0.6:0.3"], "drops at steps [1, 1] of 2"),
        (["--lambdas", "0.5", "0.5"], "lambdas lists a value twice: [0.5, 0.5]"),
        (["--lrs", "1e-3", "0.001"], "lrs lists a value twice"),
        (["--schedules", "0.75:0.3", "0.750:0.30"], "schedule '0.750:0.30' is listed twice"),
        (["--schedules", "0.5:inf"], "factors must be finite"),
        (["--reports-per-trial", "1"], "ASHA's first rung falls at the budget's end"),
        (["--lrs", "inf"], "lrs must be finite and >= 0"),
        (["--lr-range", "1e-5", "inf", "--search-alg", "random"], "low < high < inf"),
        (["--reduction-factor", "nan"], "reduction_factor > 1, finite"),
        (["--name", ".."], "name must be a non-empty folder name"),
        (["--train.lr", "0.5"], "--train.lr is set by the job for each run it starts: give --lrs"),
        (["--train.lr-drop-steps", "5"], "--train.lr-drop-steps is set by the job"),
    ],
)
def test_bad_search_spaces_fail_before_any_trial(flags, message, capsys) -> None:
    with pytest.raises(SystemExit):
        parse_config(tune.SearchConfig, ["--preset", "ci", *flags], presets=tune.PRESETS)
    assert message in capsys.readouterr().err


def test_a_config_file_setting_what_each_trial_sets_is_said_to_be_unused(tmp_path, capsys):
    """A saved search config may hold the training fields each trial sets: they are not
    refused (the file's writer need not have meant them), and not used, as said."""
    saved = tmp_path / "search.yaml"
    saved.write_text("train:\n  lr: 0.1\n  batch_size: 32\n")
    search, _ = parse_config(tune.SearchConfig, ["--preset", "ci", "--config", str(saved)],
                             presets=tune.PRESETS)  # fmt: skip
    assert search.train.batch_size == 32 and search.train.lr == 0.1  # (each trial's lr its own)
    err = capsys.readouterr().err
    assert f"{saved} sets --train.lr, which the job sets for each run it starts" in err
    assert "--train.batch-size" not in err
    saved.write_text("train:\n  batch_size: 32\n")
    parse_config(tune.SearchConfig, ["--preset", "ci", "--config", str(saved)],
                 presets=tune.PRESETS)  # fmt: skip
    assert "note" not in capsys.readouterr().err


@pytest.mark.parametrize("preset", sorted(tune.PRESETS))
def test_every_preset_parses_and_validates(preset) -> None:
    search, _ = parse_config(tune.SearchConfig, ["--preset", preset], presets=tune.PRESETS)
    if search.scheduler == "asha":  # a rung before the budget's end, or ASHA stops nothing
        assert search.first_rung() < search.train.max_steps


def test_a_search_checks_its_own_storage_and_not_train_storage(s3_server, monkeypatch) -> None:
    """Trials write under the search's folder: a bucket missing there fails before Ray starts,
    and one missing in train.storage, which no trial uses, is no reason to refuse."""
    from jobs import runtime

    missing = "s3://no-such-bucket/runs"
    with pytest.raises(ValueError, match="s3://no-such-bucket/runs is not reachable"):
        tune.main(dataclasses.replace(tune.ci(), storage=missing, name="unreachable"))

    def starts_ray(*args, **kwargs):
        raise RuntimeError("Ray is started next")

    monkeypatch.setattr(runtime, "init_ray", starts_ray)
    search = dataclasses.replace(
        tune.ci(), train=dataclasses.replace(tune.ci().train, storage=missing),
        storage=s3_server.url("searches"), name="train-storage-unused",
    )  # fmt: skip
    with pytest.raises(RuntimeError, match="Ray is started next"):
        tune.main(search)


def test_a_search_continues_only_on_the_prior_and_data_it_started_with(tmp_path) -> None:
    from jobs.dataset import Manifest, ShardInfo

    def dataset(name: str, sha256: str) -> str:
        shards = (ShardInfo(name="shards/part-0.parquet", num_rows=9, sha256=sha256),)
        Manifest(classes=("a",), shards=shards, num_inputs=9, num_errors=0,
                 config={}).save(str(tmp_path / name))  # fmt: skip
        return str(tmp_path / name)

    prior = tmp_path / "prior.npz"
    prior.write_bytes(b"counts")
    base = tune.ci()
    trains = dataclasses.replace(
        base.train, data=dataset("train", "a" * 64), val_data=dataset("val", "b" * 64),
        prior=str(prior), make_sample_data=False,
    )  # fmt: skip
    search = dataclasses.replace(base, train=trains, storage=str(tmp_path / "searches"))
    record = tune._check_same_inputs(search, started=False)
    storage.write_bytes(storage.join(search.url, tune.SEARCH_INPUTS_FILE), record)
    assert tune._check_same_inputs(search, started=True) == record
    prior.write_bytes(b"counts of another pixel stride")
    with pytest.raises(ValueError, match=r"started with another prior .* another --name"):
        tune._check_same_inputs(search, started=True)
    prior.write_bytes(b"counts")
    dataset("val", "c" * 64)  # validation images changed in place
    with pytest.raises(ValueError, match="started with another val_shards "):
        tune._check_same_inputs(search, started=True)


def test_a_search_continues_only_from_a_state_tune_saved_that_reads(tmp_path) -> None:
    """Before Tune's first save a stopped search starts anew; a state cut short is refused
    (Tune would start a new search in the folder, and every later continue that one)."""
    import pyarrow.fs

    fs, folder = pyarrow.fs.LocalFileSystem(), str(tmp_path / "search")
    assert tune._run_state(folder, fs) is None  # not even the folder
    (tmp_path / "search").mkdir()
    (tmp_path / "search" / "tuner.pkl").write_bytes(b"...")
    assert tune._run_state(folder, fs) is None
    for session, text in (("2026-12-01_00-00-00", "{}"), ("2026-12-01_01-00-00", '{"tr')):
        (tmp_path / "search" / f"{tune.TUNE_STATE_PREFIX}{session}.json").write_text(text)
    for session in ("2026-12-01_00-00-00", "2026-12-01_01-00-00"):  # the searcher's, apart
        (tmp_path / "search" / f"basic-variant-state-{session}.json").write_text("{}")
    with pytest.raises(ValueError, match=r"01-00-00.json does not read .* move away") as e:
        tune._run_state(folder, fs)
    named = re.findall(r"/search/([\w.-]+)", str(e.value))
    session = "2026-12-01_01-00-00"
    assert set(named) == {
        f"{tune.TUNE_STATE_PREFIX}{session}.json",
        f"basic-variant-state-{session}.json",
    }
    (tmp_path / "search" / f"{tune.TUNE_STATE_PREFIX}2026-12-01_01-00-00.json").unlink()
    assert tune._run_state(folder, fs).endswith("00-00-00.json")


def test_trial_slots_count_the_workers_each_node_holds() -> None:
    """Three nodes of 3 CPUs hold three workers of 2 CPUs, not the four their total would: one
    trial of two such workers at a time, not two; and a trial of three workers on nodes that
    hold two would wait forever, so it is refused before the search."""
    search = dataclasses.replace(tune.ci(), train=dataclasses.replace(tune.ci().train,
                                 num_workers=2, cpus_per_worker=2.0))  # fmt: skip
    three = dataclasses.replace(
        search, train=dataclasses.replace(search.train, num_workers=3, batch_size=18)
    )
    small = [{"CPU": 3.0}, {"CPU": 3.0}, {"CPU": 3.0}]  # 9 CPUs: two trials of 4.1 by total
    assert tune.trial_slots(search, small) == 1
    assert tune.trial_slots(search, [{"CPU": 4.0}, {"CPU": 4.0}, {"CPU": 1.0}]) == 2
    assert tune.trial_slots(search, [{"CPU": 8.5}, {"CPU": 8.5}]) == 4
    with pytest.raises(ValueError, match=r"3 workers of 2 CPUs each, .* hold 2 such workers"):
        tune.trial_slots(three, [{"CPU": 3.0}, {"CPU": 3.0}, {"CPU": 1.0}])  # 7 by total
    gpu = dataclasses.replace(search.train, use_gpu=True, cpus_per_worker=8.0)
    nodes = [{"CPU": 17.0, "GPU": 4.0}, {"CPU": 72.0, "GPU": 8.0}]  # 2 + 8 workers
    assert tune.trial_slots(dataclasses.replace(search, train=gpu), nodes) == 5
    autoscaling = dataclasses.replace(search, train=gpu, max_gpus=8)  # GPU nodes to come
    assert tune.trial_slots(autoscaling, [{"CPU": 2.0}]) == 4
    head = {"CPU": 2.0, tune.DRIVER_RESOURCE: 3.0}  # a trial's function takes one
    assert tune.trial_slots(autoscaling, [head]) == 3
    assert tune.trial_slots(dataclasses.replace(search, train=gpu), [head, *nodes]) == 3
    # ... and no CPU: nodes whose every CPU a worker takes hold a trial each
    whole = dataclasses.replace(gpu, num_workers=1, cpus_per_worker=14.0, batch_size=16)
    gpu_nodes = [{"CPU": 0.0, tune.DRIVER_RESOURCE: 8.0}, *[{"CPU": 14.0, "GPU": 1.0}] * 8]
    assert tune.trial_slots(dataclasses.replace(search, train=whole), gpu_nodes) == 8
    assert tune.trial_slots(dataclasses.replace(search, train=whole), gpu_nodes[1:]) == 7
    with pytest.raises(ValueError, match="and a GPU each"):
        tune.trial_slots(dataclasses.replace(search, train=gpu), [{"CPU": 16.0}])
    h100 = dataclasses.replace(gpu, accelerator_type="H100")  # only the second node's GPUs
    nodes[1] |= {"accelerator_type:H100": 1.0}
    assert tune.trial_slots(dataclasses.replace(search, train=h100), nodes) == 4
    with pytest.raises(ValueError, match=r"and a GPU \(H100\) each"):
        tune.trial_slots(dataclasses.replace(search, train=h100), nodes[:1])
    # An autoscaling cluster's worker nodes start with the trials: the search says how many
    # trials to run at once, whatever nodes are up yet.
    head_only = [{"CPU": 0.0, tune.DRIVER_RESOURCE: 16.0}]
    with pytest.raises(ValueError, match=r"hold 0 such workers .*\): on an autoscaling cluster"
                       r" whose worker nodes are not up yet, give --max-concurrent"):  # fmt: skip
        tune.trial_slots(search, head_only, autoscaling=True)
    with pytest.raises(ValueError, match=r"hold 0 such workers \([^)]*\)$"):  # nor a local one
        tune.trial_slots(dataclasses.replace(search, max_concurrent=3), head_only)
    capped = dataclasses.replace(search, max_concurrent=3)
    assert tune.trial_slots(capped, head_only, autoscaling=True) == 3
    assert (
        tune.trial_slots(capped, [{"CPU": 0.0, tune.DRIVER_RESOURCE: 2.0}], autoscaling=True) == 2
    )
    assert tune.trial_slots(capped, small, autoscaling=True) == 3  # more nodes to come


def test_trial_functions_run_on_the_driver_resource_where_the_cluster_has_it(ray_session):
    """The test session's Ray has the head's resource of the cluster definitions: the ci
    search's trials run on it (0 CPUs each), as on a cluster."""
    import ray

    assert ray.cluster_resources().get(tune.DRIVER_RESOURCE)
    assert tune._trial_driver_resources() == {"cpu": 0, tune.DRIVER_RESOURCE: 1}


def one_worker(cfg):
    """`cfg`'s trials on one worker: these tests are of the search (DDP is the training
    tests'), and each worker a trial starts costs seconds on 2 cores. One trial at a time, as
    with two workers, keeps ASHA's decisions in a fixed order."""
    return dataclasses.replace(cfg, num_workers=1)


def test_ci_search_stops_weak_trials_and_writes_a_runnable_best_config(ci_config, s3_server):
    # The preset's lrs at one lambda (a trial costs about 15 s here): lr 1e-3 first, then
    # lr 0, which never learns and trails it at the rung.
    search = dataclasses.replace(
        tune.ci(), train=one_worker(ci_config), storage=s3_server.url("searches"),
        name="ci-search", lambdas=(1.0,), max_concurrent=1,
    )  # fmt: skip
    rows = tune.main(search)

    configs = sorted((r["lr"], r["lambda"]) for r in rows)
    assert configs == [(0.0, 1.0), (1e-3, 1.0)]  # all accounted for
    assert all(not r["status"].startswith("error") for r in rows), rows
    stopped = [r for r in rows if r["status"] == "stopped early"]
    assert stopped and all(r["steps"] < 40 for r in stopped)
    assert all(r["steps"] == 40 for r in rows if r["status"] == "completed")
    for row in rows:  # both AuCs reported, the objective their mean
        assert row["val_auc_mean"] == pytest.approx(
            (row["val_auc_raw"] + row["val_auc_rebalanced"]) / 2
        )

    best_url = storage.join(search.url, tune.BEST_CONFIG_FILE)
    best = load_config_file(best_url)
    assert best["lr"] == 1e-3 and best["name"] == "ci-search-best"
    for name in ("results.md", "results.csv", "objective.png", "curves.png"):
        assert storage.exists(storage.join(search.url, name)), name
    for row in rows:  # each trial recorded what a resumed trial must keep (its data, prior)
        assert storage.exists(storage.join(search.url, "trials", row["trial"], train.RUN_FILE))
    table = storage.read_bytes(storage.join(search.url, "results.csv")).decode()
    assert len(table.strip().splitlines()) == 1 + len(rows)

    done = subprocess.run(
        [sys.executable, "-m", "jobs.train", "--config", best_url, "--dry-run"],
        cwd=ROOT,
        env=os.environ | {"RAY_AUTH_MODE": "disabled"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    cfg, _ = parse_config(TrainConfig, ["--config", best_url])
    assert cfg.max_steps == 40 and cfg.lr_drop_steps == (30,)

    with pytest.raises(ValueError, match="other lambdas"):  # the folder belongs to one search
        tune.main(dataclasses.replace(search, lambdas=(0.25,)))

    # The same command again continues the search: every trial kept as it ended, none rerun
    # (a concurrency cap and tracking, which change no result, may differ).
    train_cfg = dataclasses.replace(search.train, tracking="none")
    again = tune.main(dataclasses.replace(search, max_concurrent=2, train=train_cfg))
    key = ("trial", "lr", "lambda", "steps", "status", "val_auc_mean")
    assert sorted(tuple(r[k] for k in key) for r in again) == sorted(
        tuple(r[k] for k in key) for r in rows
    )


def test_a_diverging_trial_ends_at_once_and_the_search_with_it(ci_config, s3_server) -> None:
    """A trial whose loss stops being finite reports its objective as the worst (Tune
    refuses a report without it, and the whole search would fail), ends, and is listed as
    diverged, without a score; it is nobody's best."""
    search = dataclasses.replace(
        tune.ci(), train=one_worker(ci_config), storage=s3_server.url("searches"), name="diverging",
        lrs=(1e30,), lambdas=(0.5,), scheduler="fifo",
    )  # fmt: skip
    (row,) = tune.main(search)
    assert row["status"] == "diverged" and row["steps"] == search.report_every()
    # its worst figures were reported for Tune's sake; the table shows no score
    assert math.isnan(row["val_auc_mean"]) and math.isnan(row["val_loss"])
    assert not storage.exists(storage.join(search.url, tune.BEST_CONFIG_FILE))


def test_a_trial_whose_training_failed_is_not_trained_again_by_tunes_restart(
    ci_config, s3_server
) -> None:
    """Ray Train gives up on a trial after train.max_failures restarts of its workers (none
    here: one worker killed ends it); Tune's own restart of the trial, there for a trial
    function lost with its node, fails at once instead of training it again."""
    import signal
    import time

    train_cfg = dataclasses.replace(one_worker(ci_config), max_failures=0)
    search = dataclasses.replace(
        tune.ci(), train=train_cfg, storage=s3_server.url("searches"), name="train-failed",
        lrs=(1e-3,), lambdas=(0.5,), scheduler="fifo",
    )  # fmt: skip
    trials = storage.join(search.url, "trials")
    killed: list[int] = []

    def kill_the_worker() -> None:  # once, after the trial's first checkpoint
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            if any(u.endswith("checkpoint.pt") for u in storage.list_files(trials)):
                for pid in train_workers():
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                return
            time.sleep(0.2)

    thread = Beside(kill_the_worker)
    thread.start()
    (row,) = tune.main(search)
    thread.join()
    assert killed and row["status"].startswith("error"), row
    assert row["steps"] < search.train.max_steps  # not resumed and trained to its end
    [failed] = [u for u in storage.list_files(trials) if u.endswith(tune.TRAIN_FAILED_FILE)]
    assert json.loads(storage.read_bytes(failed))["error"].startswith("WorkerGroupError")


def test_an_interrupted_search_is_said_to_be_and_continues(ci_config, s3_server) -> None:
    """Interrupted (SIGUSR1, as Ctrl-C) during its trial, a search lists that trial as
    unfinished and writes no best config; the same command then finishes it, under the
    ResumableASHA it restores (whose refilled rungs the unit test below checks; a second
    trial, started by the continued search, the killed search's subprocess test)."""
    import signal
    import time

    search = dataclasses.replace(
        tune.ci(), train=one_worker(ci_config), storage=s3_server.url("searches"),
        name="interrupted", lrs=(1e-3,), lambdas=(0.5,), max_concurrent=1,
    )  # fmt: skip
    # ASHA, its first rung at the first report: the interrupted trial's first result (when
    # Tune has it) is the rung's, and the continued search restores a ResumableASHA.
    assert search.scheduler == "asha" and search.first_rung() == search.report_every()
    trials = storage.join(search.url, "trials")

    def interrupt() -> None:  # once the first trial has its first checkpoint
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            if any(u.endswith("checkpoint.pt") for u in storage.list_files(trials)):
                os.kill(os.getpid(), signal.SIGUSR1)
                return
            time.sleep(0.2)

    previous = signal.signal(signal.SIGUSR1, lambda *_: None)  # what Tune restores after
    try:
        thread = Beside(interrupt)
        thread.start()
        rows = tune.main(search)
        thread.join()
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert [r["status"] for r in rows] == ["unfinished"] and rows[0]["steps"] < 40
    assert tune.unfinished(rows, search) == 1
    assert not storage.exists(storage.join(search.url, tune.BEST_CONFIG_FILE))
    rows = tune.main(search)  # under ResumableASHA, restored from the search's folder
    assert [(r["status"], r["steps"]) for r in rows] == [("completed", 40)]
    assert storage.exists(storage.join(search.url, tune.BEST_CONFIG_FILE))


def test_a_search_that_fails_to_start_leaves_its_name_free(ci_config, s3_server, monkeypatch):
    search = dataclasses.replace(
        tune.ci(), train=ci_config, storage=s3_server.url("searches"), name="failed-start"
    )

    def fails(_search):
        raise ValueError("a trial needs 1 GPUs; the cluster has 0 for it")

    monkeypatch.setattr(tune, "build_tuner", fails)
    with pytest.raises(ValueError, match="cluster has 0"):
        tune.main(search)
    assert not storage.exists(storage.join(search.url, tune.SEARCH_CONFIG_FILE))
    assert not storage.list_files(storage.join(search.url, LEASE_DIR))  # given back
    held = DriverLease(search.url, what="the same search, run before")  # still running
    with held, pytest.raises(ValueError, match="search failed-start is in use by another driver"):
        tune.main(search)


@pytest.mark.parametrize("objective", ["auc", "val_loss"])
def test_a_continued_search_refills_ashas_rungs_from_the_trials_runs(tmp_path, objective, caplog):
    """Tune gives a continued search ASHA as it was created, rungs empty. As Tune adds each
    trial back, the validations in its run's metrics.csv up to the last result Tune had of
    it go through the rungs again, so a trial that reaches a rung after the restart is
    judged against those that reached it before. A row Tune never received is left to be
    judged when the trial reports again; a new trial, or an unreadable run, adds nothing."""
    from ray.tune.experiment import Trial
    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    from jobs.train_loop import _csv
    from jobs.tune_asha import ResumableASHA

    metric, mode = tune.OBJECTIVES[objective]
    sign = 1 if mode == "max" else -1
    trials = str(tmp_path / "trials")
    runs = {  # validations at 10 and 20; a training row between them has no metric
        "a": [{"step": 10, metric: 0.8 * sign}, {"step": 15}, {"step": 20, metric: 0.9 * sign}],
        "b": [{"step": 10, metric: 0.6 * sign}],
        "late": [{"step": 10, metric: 0.7 * sign}, {"step": 20, metric: 0.1 * sign}],
        "diverged": [{"step": 10, metric: 0.75 * sign}],  # then its loss at 20 was not finite
    }
    for trial_id, rows in runs.items():
        storage.write_bytes(storage.join(trials, trial_id, train.METRICS_FILE), _csv(rows))
    where = {"step": 20, "loss": "nan", "lr": 1.0}  # its last report, with the worst figures
    storage.write_bytes(
        storage.join(trials, "diverged", train.DIVERGED_FILE), json.dumps(where).encode()
    )
    torn = f"step,{metric}\nten,0.5\n".encode()
    storage.write_bytes(storage.join(trials, "torn", train.METRICS_FILE), torn)
    received = {"a": 20, "b": 10, "late": 10, "torn": 10, "diverged": 20}  # Tune's last

    def scheduler(cls, **kw):
        asha = cls(max_t=40, grace_period=10, reduction_factor=2, **kw)
        asha.set_search_properties(metric, mode)
        return asha

    def add(asha, trial_id: str) -> Trial:
        trial = Trial("trainable", trial_id=trial_id, stub=True)
        if trial_id in received:
            trial.run_metadata.last_result = {"step": received[trial_id], metric: 0.0}
        asha.on_trial_add(None, trial)
        return trial

    asha = scheduler(ResumableASHA, trials_url=trials)
    for trial_id in ("a", "b", "late", "torn", "diverged", "new"):
        add(asha, trial_id)
    rungs = {milestone: recorded for milestone, recorded in asha._brackets[0]._rungs}
    assert rungs[10] == {"a": 0.8, "b": 0.6, "late": 0.7, "diverged": 0.75}
    worst = 0.0 if mode == "max" else -math.inf  # an AuC of 0, a loss of inf
    assert rungs[20] == {"a": 0.9, "diverged": worst}
    assert "lack trial torn's earlier results: ValueError" in caplog.text
    weak = {"step": 10, metric: 0.5 * sign}
    assert asha.on_trial_result(None, add(asha, "c"), weak) == TrialScheduler.STOP
    plain = scheduler(ASHAScheduler, time_attr="step")  # Tune's own: the restart forgets
    add(plain, "a")
    assert plain.on_trial_result(None, add(plain, "c"), weak) == TrialScheduler.CONTINUE
    with pytest.raises(ValueError, match="one bracket"):
        ResumableASHA(trials_url=trials, max_t=40, grace_period=10, brackets=2)

    # "late" had checkpointed step 20 when Tune last saved: it resumes past 20 and never
    # reports it again. Its row at 20 is in the rung at once, for the others ("b" there
    # after it: by a cutoff of 0.5, not 0.9), and judged at its next report against the
    # rung as every trial refilled it ("a", added after it, among them): the rung stops it.
    checkpoint = storage.join(trials, "late", checkpoint_dir_name(20), CHECKPOINT_FILE)
    storage.write_bytes(checkpoint, b"a checkpoint")
    asha = scheduler(ResumableASHA, trials_url=trials)
    trials_added = {trial_id: add(asha, trial_id) for trial_id in ("late", "a", "b")}
    rungs = {milestone: recorded for milestone, recorded in asha._brackets[0]._rungs}
    assert rungs[20] == {"a": 0.9, "late": 0.1}
    b_at_20 = {"step": 20, metric: 0.6 * sign}
    assert asha.on_trial_result(None, trials_added["b"], b_at_20) == TrialScheduler.CONTINUE
    later = {"step": 30, metric: 0.95 * sign}  # however well it does next
    assert asha.on_trial_result(None, trials_added["late"], later) == TrialScheduler.STOP
    assert asha.on_trial_result(None, trials_added["a"], later) == TrialScheduler.CONTINUE
    # Had "late" been stopped at 10 (its workers checkpointing 20 as they were stopped), it
    # resumes not at all: its row at 20 never reached the rung, and does not now.
    asha = scheduler(ResumableASHA, trials_url=trials)
    stopped = Trial("trainable", trial_id="late", stub=True)
    stopped.run_metadata.last_result = {"step": 10, metric: 0.0}
    stopped.set_status(Trial.TERMINATED)
    asha.on_trial_add(None, stopped)
    rungs = {milestone: recorded for milestone, recorded in asha._brackets[0]._rungs}
    assert rungs[10] == {"late": 0.7} and rungs[20] == {}

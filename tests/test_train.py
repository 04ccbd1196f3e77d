"""The training job: a ci run to completion on S3 (with its TensorBoard events), a killed
worker, bad configs, presets."""

from __future__ import annotations

import dataclasses
import importlib.util
import io
import json
import math
import os
import re
import signal
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from colorcore.prior import AbHistogram
from colorcore.quantize import ab_bins
from jobs import models, node_cache, storage, train
from jobs.config import parse_config
from jobs.models import CHECKPOINT_FILE, checkpoint_dir_name, load_model
from tests.support import Beside, train_workers, write_dataset


def test_ci_run_completes_with_checkpoints_in_the_bucket(ci_run) -> None:
    cfg, metrics = ci_run
    assert metrics["step"] == cfg.max_steps
    names = {u.rsplit("/", 2)[-2] for u in storage.list_files(cfg.run_url, suffix=CHECKPOINT_FILE)}
    assert names == {checkpoint_dir_name(s) for s in (20, 40)}  # keep_checkpoints=3, every 20
    loaded = load_model(cfg.run_url)
    assert loaded.kind == "run" and loaded.checkpoint.extra["step"] == cfg.max_steps
    extra = loaded.checkpoint.extra
    assert extra["config"]["max_steps"] == cfg.max_steps and "optimizer" in extra
    assert loaded.checkpoint.prior_counts.sum() > 0
    history = train.read_metrics(cfg.run_url)
    assert [r["step"] for r in history] == [10, 20, 30, 40]
    assert {"loss", "lr", "img_per_s", "val_loss", "val_auc_raw"} <= set(history[-1])
    for name in ("curves.png", "samples.png", "model.safetensors"):
        assert storage.exists(storage.join(cfg.run_url, name)), name
    # even 40 steps of a tiny model colour the held-out scenes better than gray
    assert metrics["final_auc_rebalanced"] > metrics["final_gray_auc_rebalanced"]


def tensorboard_events(event_file: bytes) -> list:
    """The `Event`s of a TensorBoard event file (TFRecord framing: length, its CRC, the
    serialized event, its CRC)."""
    from tensorboardX.proto.event_pb2 import Event

    events, position = [], 0
    while position < len(event_file):
        (length,) = struct.unpack_from("<Q", event_file, position)
        events.append(Event.FromString(event_file[position + 12 : position + 12 + length]))
        position += 12 + length + 4
    return events


def tensorboard_scalars(event_file: bytes) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} of an event file."""
    scalars: dict[str, dict[int, float]] = {}
    for event in tensorboard_events(event_file):
        for value in event.summary.value:
            scalars.setdefault(value.tag, {})[event.step] = value.simple_value
    return scalars


def tensorboard_run(run_url: str) -> list[dict[str, dict[int, float]]]:
    """The scalars of each event file of a run folder, in TensorBoard's reading order."""
    files = storage.list_files(storage.join(run_url, "tensorboard"))
    assert all(".tfevents." in f for f in files)
    return [tensorboard_scalars(storage.read_bytes(f)) for f in files]


def test_tensorboard_events_hold_the_metrics_table(ci_run) -> None:
    """The tracking callback sent every row of metrics.csv, every column, to TensorBoard
    event files uploaded to the run folder in the bucket."""
    cfg, _ = ci_run
    files = tensorboard_run(cfg.run_url)
    assert len(files) == 2  # one per checkpoint (steps 20 and 40)
    scalars: dict[str, dict[int, float]] = {}
    for file in files:
        for tag, by_step in file.items():
            assert not set(by_step) & set(scalars.get(tag, {})), tag  # no row sent twice
            scalars.setdefault(tag, {}).update(by_step)
    history = train.read_metrics(cfg.run_url)
    assert set(scalars) == {k for row in history for k in row} - {"step"}
    for tag, by_step in scalars.items():
        table = {int(r["step"]): r[tag] for r in history if tag in r}
        assert by_step == pytest.approx(table, rel=1e-6), tag  # float32 in the events
    assert sorted(scalars["loss"]) == [10, 20, 30, 40]  # rows between checkpoints too
    assert sorted(scalars["val_loss"]) == [20, 40]


def test_tensorboard_in_a_local_run_folder_across_a_driver_restart(tmp_path) -> None:
    """Events go straight into a local run folder, each row once per driver run; a restarted
    driver resends the table in a new file that purges the old one's steps, also when the run
    was already at its end and reports its final figures without a checkpoint."""
    from ray.train import Checkpoint

    from jobs.tracking import tracking_callbacks
    from jobs.train_loop import _csv

    run = tmp_path / "run"
    rows = [{"step": 10, "loss": 5.0}, {"step": 20, "loss": 4.0, "val_loss": 7.5}]
    tb = run / "tensorboard"

    def report(tracker, table, step, checkpoint=True) -> None:
        storage.write_bytes(str(run / train.METRICS_FILE), _csv(table))
        metrics = [{"step": step}] * 2  # what each rank reported
        tracker.after_report(None, metrics, Checkpoint(str(run)) if checkpoint else None)

    def tracker():
        args = {"run_url": str(run), "run_name": "run", "final_step": 40, "config": {}}
        [callback] = tracking_callbacks("tensorboard", **args, s3=storage.S3Options())
        return callback

    first = tracker()
    report(first, rows, 20)
    # rank 0 already wrote the next checkpoint's table when the controller handles step 30
    report(first, [*rows, {"step": 30, "loss": 3.0}, {"step": 40, "loss": 2.5}], 30)
    report(first, [*rows, {"step": 30, "loss": 3.0}, {"step": 40, "loss": 2.5}], 30)
    files = sorted(tb.iterdir())
    assert len(files) == 2  # one per report with rows not sent yet
    assert [tensorboard_scalars(f.read_bytes()) for f in files] == [
        {"loss": {10: 5.0, 20: 4.0}, "val_loss": {20: 7.5}},
        {"loss": {30: 3.0}},  # rows already sent are not sent again, later ones not yet
    ]
    table = [*rows, {"step": 30, "loss": 3.5}, {"step": 40, "loss": 2.0}]
    report(tracker(), table, 40, checkpoint=False)  # a driver restarted at the run's end
    [resent] = sorted(tb.iterdir())[2:]  # names order the files as TensorBoard reads them
    events = tensorboard_events(resent.read_bytes())
    assert [e.step for e in events if e.HasField("session_log")] == [10]  # hides older steps
    assert tensorboard_scalars(resent.read_bytes())["loss"] == {10: 5.0, 20: 4.0, 30: 3.5, 40: 2.0}


def test_tensorboard_gets_the_steps_of_a_restart_from_an_older_checkpoint_again(tmp_path) -> None:
    """Within one driver, an attempt that resumes from an older checkpoint than one already
    reported (the newest unloadable) computes some steps again: they are sent again from the
    first step whose figures changed, behind a purge marker at that step; a diverged run's
    NaN rows, the same in each table, are not."""
    from ray.train import Checkpoint

    from jobs.tracking import tracking_callbacks
    from jobs.train_loop import _csv

    run = tmp_path / "run"
    args = {"run_url": str(run), "run_name": "run", "final_step": 60, "config": {}}
    [tracker] = tracking_callbacks("tensorboard", **args, s3=storage.S3Options())

    def report(table, step) -> list[dict]:
        storage.write_bytes(str(run / train.METRICS_FILE), _csv(table))
        tracker.after_report(None, [{"step": step}], Checkpoint(str(run)))
        return [tensorboard_events(f.read_bytes()) for f in sorted((run / "tensorboard").iterdir())]

    nan = float("nan")
    rows = [{"step": 10, "loss": 5.0}, {"step": 20, "loss": nan}]
    report(rows, 20)
    files = report([*rows, {"step": 30, "loss": 3.0}, {"step": 40, "loss": 2.5}], 40)
    assert len(files) == 2 and not any(e.HasField("session_log") for e in files[1])
    assert sorted({e.step for e in files[1] if e.summary.value}) == [30, 40]  # NaN at 20 kept
    # the attempt that failed after step 40 resumes from step 20: step 30 comes out otherwise
    files = report([*rows, {"step": 30, "loss": 3.25}], 30)
    assert len(files) == 3
    [purge] = [e.step for e in files[2] if e.HasField("session_log")]
    assert purge == 30  # hides the old 30 and 40
    assert [(e.step, e.summary.value[0].simple_value) for e in files[2] if e.summary.value] == [
        (30, 3.25)
    ]
    files = report([*rows, {"step": 30, "loss": 3.25}, {"step": 40, "loss": 2.75}], 40)
    assert len(files) == 4 and not any(e.HasField("session_log") for e in files[3])
    assert [(e.step, e.summary.value[0].simple_value) for e in files[3] if e.summary.value] == [
        (40, 2.75)
    ]


def test_checkpoint_offset_matches_the_step(ci_run) -> None:
    """The stored data offset is exactly where step s leaves the epoch: after a resume no
    sample of the epoch is used again."""
    from jobs.loader import DatasetIndex

    cfg, _ = ci_run
    extra = load_model(cfg.run_url).checkpoint.extra
    steps_per_epoch = DatasetIndex.load(cfg.data).num_images // cfg.batch_size
    assert extra["epoch"] == cfg.max_steps // steps_per_epoch
    assert extra["offset"] == (cfg.max_steps % steps_per_epoch) * cfg.batch_size


@dataclasses.dataclass
class Placement:
    """Where a worker runs, as Ray Train's context says (ranks numbered machine by machine)."""

    world_rank: int
    local_rank: int
    local_world_size: int
    world_size: int

    def get_world_rank(self) -> int:
        return self.world_rank

    def get_local_rank(self) -> int:
        return self.local_rank

    def get_local_world_size(self) -> int:
        return self.local_world_size

    def get_world_size(self) -> int:
        return self.world_size


@pytest.mark.parametrize(
    ("world", "per_machine", "read_groups", "groups_here", "warned"),
    [
        (8, 8, 1, 1, False),  # one machine
        (16, 8, 1, 1, True),  # one group over two machines: each reads all of it
        (16, 8, 2, 1, False),  # a group a machine
        (16, 8, 4, 2, False),  # two groups a machine
        (6, 2, 2, 2, True),  # groups of 3 over machines of 2: the middle machine has two
    ],
)
def test_a_machine_knows_its_read_groups_and_warns_of_shared_ones(
    world, per_machine, read_groups, groups_here, warned, caplog
) -> None:
    from jobs.train_loop import _machine_groups

    cfg = dataclasses.replace(
        train.ci(), num_workers=world, batch_size=world, read_groups=read_groups
    )
    machine = 1 if world // per_machine > 1 else 0
    for local in range(per_machine):
        caplog.clear()
        where = Placement(machine * per_machine + local, local, per_machine, world)
        assert _machine_groups(where, cfg) == groups_here
        assert ("have workers on other machines too" in caplog.text) == (warned and local == 0)


def test_learning_rate_schedule() -> None:
    cfg = train.paper()
    assert train.learning_rate(0, cfg) == pytest.approx(3e-5)
    assert train.learning_rate(200_000, cfg) == pytest.approx(1e-5)
    assert train.learning_rate(374_999, cfg) == pytest.approx(1e-5)
    assert train.learning_rate(375_000, cfg) == pytest.approx(3e-6)
    big = train.h100x8()
    assert train.learning_rate(0, big) < big.lr / 100  # warm-up
    assert big.max_steps * big.batch_size >= 450_000 * 40


def test_a_killed_worker_is_restarted_and_the_run_is_exact(ci_config) -> None:
    """A worker killed after the first checkpoint is restarted with the others from it: the
    run ends at its step count, no step trained twice or lost, on two DDP workers that each
    take two micro-batches a step (gradients synchronised on the last only), read their own
    part of the data (two read groups) and decode it in processes of their own; the stored
    offset counts whole global batches of the two groups' epochs."""
    import ray

    from jobs.loader import DatasetIndex, TrainLoader

    cfg = dataclasses.replace(
        ci_config, name="killed-worker", grad_accum_steps=2, max_steps=40, lr_drop_steps=(5,),
        checkpoint_every_steps=10, keep_checkpoints=4, val_every_steps=20, log_every_steps=10,
        read_groups=2, decode="processes",
    )  # fmt: skip
    assert cfg.micro_batch * cfg.grad_accum_steps * cfg.num_workers == cfg.batch_size == 16
    killed: list[int] = []
    shared: list[bool] = []  # whether the workers shared their row groups (jobs.node_cache)
    folder = node_cache.folder_name(cfg.run_url)
    first = storage.join(cfg.run_url, checkpoint_dir_name(10), CHECKPOINT_FILE)
    written: list[object] = []  # when the first checkpoint was written, seen at the kill

    def last_modified() -> object:
        fs, path = storage.filesystem(first)
        fs.invalidate_cache()
        return fs.info(path)["LastModified"]

    def kill_a_worker() -> None:
        deadline = time.monotonic() + 240
        while not storage.exists(first) and time.monotonic() < deadline:
            time.sleep(0.2)
        written.append(last_modified())
        workers = train_workers()
        shared.append(any(os.path.isdir(os.path.join(r, folder)) for r in node_cache.ROOTS))
        os.kill(workers[-1], signal.SIGKILL)
        killed.append(workers[-1])

    killer = Beside(kill_a_worker)
    killer.start()
    metrics = train.main(cfg)
    killer.join()
    assert killed and ray.is_initialized()
    assert shared == [True]  # and the last of the restarted workers deleted their folder:
    assert not any(os.path.exists(os.path.join(r, folder)) for r in node_cache.ROOTS)
    assert metrics["step"] == 40 and math.isfinite(metrics["loss"])
    history = train.read_metrics(cfg.run_url)
    steps = [int(r["step"]) for r in history]
    assert steps == [10, 20, 30, 40]  # no step twice, none lost, none beyond
    assert last_modified() == written[0]  # resumed from it: its steps were not trained again
    # TensorBoard got the table, not the lost attempt's rows: each step once, in order
    assert [s for file in tensorboard_run(cfg.run_url) for s in file["loss"]] == steps

    def place(read_groups: int) -> tuple[int, int]:
        """(epoch, offset) after the run's steps."""
        loader = TrainLoader(
            DatasetIndex.load(cfg.data), rank=0, world_size=2, batch_size=8,
            crop_px=cfg.crop_px, seed=cfg.seed, window_images=cfg.window_images,
            read_groups=read_groups,
        )  # fmt: skip
        epoch, steps = 0, cfg.max_steps
        while steps >= loader.steps_in_epoch(epoch):
            epoch, steps = epoch + 1, steps - loader.steps_in_epoch(epoch)
        return epoch, steps * cfg.batch_size

    extra = load_model(cfg.run_url).checkpoint.extra
    assert place(2) != place(1)  # the groups' epochs are shorter: the steps tell them apart
    assert (extra["epoch"], extra["offset"]) == place(2)


def test_a_run_resumed_past_a_damaged_checkpoint_keeps_its_new_ones(ci_config, tmp_path) -> None:
    """The newest checkpoint, damaged in place (whole, but it no longer loads), is passed
    over; the steps after the older one are trained again into folders of their own, which
    Ray's keep-last-K, deleting the damaged one, leaves alone. Under the damaged one's name,
    it deleted the new checkpoint, and the controller failed deleting it a second time.
    A checkpoint Ray never recorded is removed at the end, beyond the K kept."""
    cfg = dataclasses.replace(
        ci_config,
        name="damaged",
        storage=str(tmp_path),
        max_steps=20,
        checkpoint_every_steps=10,
        val_every_steps=20,
        keep_checkpoints=2,
    )
    train.main(cfg)
    damaged = storage.join(cfg.run_url, checkpoint_dir_name(20), CHECKPOINT_FILE)
    storage.write_bytes(damaged, zip_of(b"not a checkpoint"))
    # One Ray never recorded (its driver killed as it was written): keep-last-K would never
    # delete it; the run does, once it is older than the K it keeps.
    first = storage.join(cfg.run_url, checkpoint_dir_name(10), CHECKPOINT_FILE)
    unrecorded = storage.join(cfg.run_url, checkpoint_dir_name(5), CHECKPOINT_FILE)
    storage.write_bytes(unrecorded, storage.read_bytes(first))
    assert train.main(dataclasses.replace(cfg, max_steps=30))["step"] == 30
    names = [p for p in os.listdir(cfg.run_url) if p.startswith("checkpoint_0")]
    again = checkpoint_dir_name(20, [checkpoint_dir_name(20)])  # Ray deleted the damaged one
    assert sorted(names) == [again, checkpoint_dir_name(30)]
    assert load_model(cfg.run_url).checkpoint.extra["step"] == 30
    steps = [int(r["step"]) for r in train.read_metrics(cfg.run_url)]
    assert steps == [10, 20, 30]  # the table of the run resumed from step 10


def test_a_diverged_run_stops_at_once_and_says_so(ci_config) -> None:
    """A loss that is no longer finite ends the run at the step it is logged: no step after
    it, no checkpoint of its weights, and an error that says what to do."""
    cfg = dataclasses.replace(
        ci_config, name="diverged", lr=1e30, max_steps=40, log_every_steps=5,
        checkpoint_every_steps=20, val_every_steps=20,
    )  # fmt: skip
    with pytest.raises(
        ValueError, match=r"diverged: its loss was nan at step 5 .*lower --lr to start it again"
    ):  # it has no checkpoint yet
        train.main(cfg)
    assert not storage.list_files(cfg.run_url, suffix=CHECKPOINT_FILE)


def test_a_held_out_set_of_gray_images_only_gives_no_final_figures(tmp_path, capsys) -> None:
    """Nothing to measure (a prepared set keeps no gray image as an input): the report says
    so and gives no figures, rather than zeros that read as measured; the plots and the
    export are written all the same."""
    from colorcore.model import ColorizationNet, ModelConfig
    from colorcore.prior import AbHistogram
    from colorcore.weights import save_checkpoint
    from jobs.train_loop import _csv
    from jobs.train_report import write_report

    write_dataset(str(tmp_path / "val"), gray_rows=range(23))
    cfg = dataclasses.replace(
        train.ci(),
        storage=str(tmp_path / "runs"),
        data=str(tmp_path / "train"),
        val_data=str(tmp_path / "val"),
    )
    histogram = AbHistogram(np.ones(313, np.int64))
    os.makedirs(tmp_path / "train")
    with open(tmp_path / "train" / "prior.npz", "wb") as f:
        histogram.save(f)
    checkpoint = storage.join(cfg.run_url, checkpoint_dir_name(40), CHECKPOINT_FILE)
    os.makedirs(os.path.dirname(checkpoint))
    save_checkpoint(checkpoint, ColorizationNet(ModelConfig(width=1 / 16)),
                    prior_counts=histogram.counts_Q, extra={"step": 40})  # fmt: skip
    storage.write_bytes(storage.join(cfg.run_url, train.METRICS_FILE),
                        _csv([{"step": 40, "loss": 5.0}]))  # fmt: skip
    assert write_report(cfg) == {}
    assert "has no colour image: no held-out figures" in capsys.readouterr().out
    for name in ("curves.png", "model.safetensors"):
        assert storage.exists(storage.join(cfg.run_url, name)), name


def test_a_run_resumed_at_its_end_returns_its_final_figures(tmp_path) -> None:
    """Ray's result holds the last report it recorded a checkpoint with (step 20 here); a
    run resumed at its end reported its final figures without one: they come from the
    run's table."""
    from jobs.train_loop import _csv

    cfg = dataclasses.replace(train.ci(), storage=str(tmp_path), max_steps=40)
    rows = [{"step": s, "loss": 10.0 - s / 10} for s in (10, 20, 30, 40)]
    storage.write_bytes(storage.join(cfg.run_url, train.METRICS_FILE), _csv(rows))
    old = {"step": 20, "epoch": 1, "offset": 64, "loss": 8.0}
    assert train.final_metrics(old, cfg) == {"step": 40, "loss": 6.0}
    done = {"step": 40, "loss": 6.0}
    assert train.final_metrics(done, cfg) is done
    storage.write_bytes(storage.join(cfg.run_url, train.METRICS_FILE), _csv(rows[:2]))
    assert train.final_metrics(old, cfg) == old  # nothing later to tell: as Ray has it


def test_weights_an_update_broke_are_caught_before_a_checkpoint() -> None:
    """An Adam step on a gradient that overflowed makes the weights NaN while the loss,
    measured before the step, was finite: the check before a checkpoint sees them."""
    from colorcore.model import ColorizationNet, ModelConfig
    from jobs.train_loop import _weights_broken

    model = ColorizationNet(ModelConfig(width=1 / 16))
    assert not _weights_broken(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss = model(torch.zeros(1, 1, 32, 32)).float().mean()
    assert torch.isfinite(loss)
    loss.backward()
    next(model.parameters()).grad.fill_(float("inf"))  # as a bf16 backward can overflow
    optimizer.step()
    assert _weights_broken(model)


def _broken_on_one_rank(rank: int, folder: str) -> None:
    from jobs.train_loop import _weights_broken

    init = f"file://{folder}/rendezvous"
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        model = torch.nn.Linear(2, 2)
        if rank == 1:  # rounded apart on one GPU of another kind
            with torch.no_grad():
                model.weight[0, 0] = float("nan")
        Path(folder, f"rank{rank}").write_text(str(_weights_broken(model)))
    finally:
        torch.distributed.destroy_process_group()


def test_every_rank_finds_weights_broken_on_one_rank(tmp_path) -> None:
    """The ranks agree: one that stopped while the others trained on would leave them
    waiting for it at their next collective. (Two spawned processes: none is forked from
    this one, whose Ray connections a fork would copy.)"""
    import torch.multiprocessing as mp

    mp.spawn(_broken_on_one_rank, args=(str(tmp_path),), nprocs=2)
    assert [(tmp_path / f"rank{r}").read_text() for r in (0, 1)] == ["True", "True"]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--lr", "-0.1"], "lr must be finite and >= 0"),
        (["--lr", "inf"], "lr must be finite and >= 0"),
        (["--adam-beta1", "1.0"], "adam betas must be in [0, 1)"),
        (["--weight-decay", "nan"], "weight_decay must be finite"),
        (["--batch-size", "0"], "batch_size must be >= 1"),
        (["--soft-encode-sigma", "nan"], "sigmas finite and in [0.001, 1000]"),
        (["--prior-sigma", "inf"], "sigmas finite and in [0.001, 1000]"),
        (["--prior-sigma", "1e200"], "sigmas finite and in [0.001, 1000]"),  # overflows
        (["--soft-encode-sigma", "1e-30"], "sigmas finite and in [0.001, 1000]"),  # NaN targets
        (
            ["--lr-drop-steps", "-5", "0", "--lr-drop-factors", "1", "1"],
            "lr_drop_steps must be >= 1",
        ),
        (["--val-data", "./runs/sample-data/ci/train"], "needs a held-out set"),
        (["--storage", ""], "storage is empty: give a path or URL"),
        (["--val-data", ""], "val_data is empty: give a path or URL"),
        (["--lr-drop-factors", "inf"], "lr_drop_factors be finite and > 0"),
        (["--cpus-per-worker", "inf"], "cpus_per_worker finite and >= 0.0001"),
        (["--cpus-per-worker", "0.00001"], "cpus_per_worker finite and >= 0.0001"),
        (["--val-images", "0"], "val_images must be >= 1"),
        (["--val-data", "runs/sample-data/ci/train/"], "needs a held-out set"),
        (["--name", ".."], "name must be a non-empty folder name"),
        (["--model.bn-moving-average", "1"], "bn_moving_average must be in [0, 1)"),
        (["--rebalance-lambda", "1.5"], "rebalance_lambda must be in [0, 1]"),
        (["--batch-size", "15"], "must divide by num_workers"),
        (["--accelerator-type", "L40S"], "accelerator_type names a GPU: it needs use_gpu"),
        (["--lr-drop-steps", "5", "9"], "same length"),
        (["--tracking", "tensorboard,wandb"], "tracking must be auto, none or a comma list"),
        (["--window-images", "0"], "window_images must be >= 1"),
        (["--read-groups", "3"], "read_groups must be >= 1 and divide num_workers (2)"),
        (["--read-groups", "0"], "read_groups must be >= 1"),
        (["--warmup-steps", "-1"], "warmup_steps >= 0"),
        (["--seed", "-1"], "seed must be >= 0 and < 2**63, got -1"),
        (["--seed", str(2**64)], "seed must be >= 0 and < 2**63"),
        (["--num-workers", "0"], "num_workers, grad_accum_steps, max_steps and batch_size"),
        (["--sample-images", "2"], "sample_images must be >= 3 (a scene a class), got 2"),
        (["--tracking", "tensorboard,tensorboard"], "tracking names a tracker twice"),
        (["--grad-accum-steps", "0"], "num_workers, grad_accum_steps, max_steps and batch_size"),
        (["--decode", "nvjpeg"], "it needs use_gpu"),
        (["--batch", "32"], "unrecognized arguments: --batch 32"),  # not --batch-size
    ],
)
def test_bad_values_are_refused_by_the_command_line(flags, message, capsys) -> None:
    with pytest.raises(SystemExit):
        parse_config(train.TrainConfig, ["--preset", "ci", *flags], presets=train.PRESETS)
    assert message in capsys.readouterr().err


def test_sample_data_smaller_than_a_batch_fails_before_it_is_made(tmp_path) -> None:
    cfg = dataclasses.replace(
        train.ci(), storage=str(tmp_path / "runs"), data=str(tmp_path / "train"), batch_size=512
    )
    with pytest.raises(ValueError, match=r"sample data would hold 300 colour images, fewer "
                       r"than one batch \(512\): raise --sample-images"):  # fmt: skip
        train.preflight(cfg)
    assert not (tmp_path / "train").exists()
    train.preflight(dataclasses.replace(cfg, sample_images=512))


def test_crops_larger_than_the_prepared_images_are_said_to_be(tmp_path, capsys) -> None:
    from jobs.dataset import Manifest

    Manifest(classes=(), shards=(), num_inputs=0, num_errors=0,
             config={"short_side_px": 64}).save(str(tmp_path / "train"))  # fmt: skip
    cfg = dataclasses.replace(train.ci(), data=str(tmp_path / "train"), make_sample_data=False,
                              storage=str(tmp_path / "runs"), crop_px=72)  # fmt: skip
    with pytest.raises(ValueError, match="0 colour images, fewer than one batch"):  # on
        train.preflight(cfg)
    assert re.search(r"crop_px 72 is above the short side .* \(64\): every crop is scaled up",
                     capsys.readouterr().err)  # fmt: skip
    with pytest.raises(ValueError, match="0 colour images, fewer than one batch"):
        train.preflight(dataclasses.replace(cfg, crop_px=64))
    assert "crop_px" not in capsys.readouterr().err


def test_sample_data_made_for_another_run_is_said_to_be(tmp_path, capsys) -> None:
    """smoke's sample data is twice ci's: a run finding other sample data where its own
    would go says so as it trains on it."""
    from jobs.dataset import Manifest

    cfg = dataclasses.replace(train.ci(), data=str(tmp_path / "train"), val_data=None,
                              prior=str(tmp_path / "prior.npz"))  # fmt: skip
    Manifest(classes=(), shards=(), num_inputs=600, num_errors=600).save(cfg.data)
    (tmp_path / "prior.npz").write_bytes(b"")  # (found, not read)
    train.ensure_sample_data(cfg)
    warned = "holds 600 sample images, made before, not the 300 --sample-images asks"
    assert warned in capsys.readouterr().err
    train.ensure_sample_data(dataclasses.replace(cfg, sample_images=600))
    assert "warning" not in capsys.readouterr().err


def test_missing_prior_and_unreachable_storage_fail_before_workers(ci_config, tmp_path) -> None:
    with pytest.raises(ValueError, match="no prior at"):
        train.main(dataclasses.replace(ci_config, prior=str(tmp_path / "absent.npz")))
    narrow = torch.zeros(313, dtype=torch.int64)  # one far bin: smoothed, bins underflow
    narrow[int(ab_bins()[:, 0].argmax())] = 1000
    AbHistogram(narrow).save(tmp_path / "narrow.npz")
    with pytest.raises(ValueError, match=r"the prior at .*narrow.npz: lam = 0 weighs each"):
        train.main(dataclasses.replace(ci_config, prior=str(tmp_path / "narrow.npz")))
    with pytest.raises(ValueError, match="not reachable"):
        train.main(dataclasses.replace(ci_config, storage="s3://no-such-bucket/runs"))
    with pytest.raises(ValueError, match="not a prepared dataset"):
        train.main(dataclasses.replace(ci_config, data=str(tmp_path)))
    write_dataset(str(tmp_path / "gray-val"), gray_rows=range(23))  # validation measures colour
    with pytest.raises(ValueError, match=r"gray-val holds no colour image \(23 grayscale\)"):
        train.main(dataclasses.replace(ci_config, val_data=str(tmp_path / "gray-val")))
    with pytest.raises(ValueError, match="colour images, fewer than one batch"):
        train.main(dataclasses.replace(ci_config, batch_size=10_000))
    # 300 images make a batch of 240, but not two groups' halves of it for certain
    with pytest.raises(ValueError, match=r"in 2 read groups .* the smallest may hold 118"):
        train.main(dataclasses.replace(ci_config, batch_size=240, read_groups=2))
    # The local instance has no autoscaler: workers its node cannot hold never come.
    with pytest.raises(ValueError, match=r"100000 CPUs each \(each on one node\), .* holds 0 \("):
        train.main(dataclasses.replace(ci_config, cpus_per_worker=100_000))


def test_a_run_another_driver_holds_is_refused_before_it_is_touched(ci_config) -> None:
    """The same command run again while the first still trains (a `ray job submit` whose log
    stream was interrupted leaves it running) must not resume from under it."""
    from jobs.lease import DriverLease

    cfg = dataclasses.replace(ci_config, name="held")
    held = DriverLease(cfg.run_url, cfg.s3, what="the same run, started before")
    with held, pytest.raises(ValueError, match="run held is in use by another driver, process"):
        train.main(cfg)
    assert storage.list_files(cfg.run_url, cfg.s3) == []  # no record, checkpoint or lease


def test_tracking_uris_lose_their_password_in_logs() -> None:
    from jobs.tracking import _without_password

    assert (
        _without_password("postgresql://ml:s3cret@db:5432/runs")
        == "postgresql://ml:***@db:5432/runs"
    )
    assert _without_password("http://mlflow:5000") == "http://mlflow:5000"
    # forms a URL parser splits wrongly, and a token as the whole user part
    assert _without_password("postgresql://bob:p/ss@db/x") == "postgresql://bob:***@db/x"
    assert _without_password("postgresql://bob:p#ss@db") == "postgresql://bob:***@db"
    assert _without_password("https://tok3n@host/x") == "https://***@host/x"
    assert _without_password("https://user:p@ss@host/x") == "https://user:***@host/x"


@pytest.mark.skipif(importlib.util.find_spec("mlflow") is not None, reason="mlflow installed")
def test_asking_for_mlflow_without_it_fails_before_ray() -> None:
    with pytest.raises(ValueError, match="mlflow is not installed"):
        train.preflight(dataclasses.replace(train.ci(), tracking="mlflow"))
    assert train.preflight(dataclasses.replace(train.ci(), tracking="auto")) is None


@pytest.mark.parametrize("preset", sorted(train.PRESETS))
def test_every_preset_parses_and_validates(preset, capsys) -> None:
    from jobs.config import run_cli

    run_cli(train.TrainConfig, train.main, ["--preset", preset, "--dry-run"], presets=train.PRESETS)
    assert f'"name": "{preset}"' in capsys.readouterr().out


def test_data_dependent_init_standardises_every_conv() -> None:
    from colorcore.datainit import data_dependent_init
    from colorcore.model import ColorizationNet, ModelConfig

    torch.manual_seed(0)
    model = ColorizationNet(ModelConfig(width=1 / 8))
    batch = torch.rand(8, 1, 64, 64) * 100
    data_dependent_init(model, batch)
    stats = []
    hooks = [
        m.register_forward_hook(
            lambda m, a, out: stats.append((out.mean((0, 2, 3)), out.std((0, 2, 3))))
        )
        for m in model.modules()
        if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))
    ]
    with torch.no_grad():
        model.train()(batch)
    for h in hooks:
        h.remove()
    assert len(stats) == 23
    for mean, std in stats:
        torch.testing.assert_close(mean, torch.zeros_like(mean), atol=1e-3, rtol=0)
        alive = std > 0.01  # channels dead on this batch (std <= 1e-3) stay dead
        torch.testing.assert_close(std[alive], torch.ones_like(std[alive]), atol=1e-3, rtol=0)
        assert alive.float().mean() > 0.5


def test_data_dependent_init_leaves_dead_channels_unscaled_and_refuses_flat_inputs() -> None:
    from colorcore.datainit import data_dependent_init
    from colorcore.model import ColorizationNet, ModelConfig

    torch.manual_seed(0)
    model = ColorizationNet(ModelConfig(width=1 / 8))
    with pytest.raises(ValueError, match="flat"):
        data_dependent_init(model, torch.full((4, 1, 64, 64), 50.0))
    # Two flat images and one photo-like: the channels that see only borders of the flat
    # ones still vary, but none is scaled up past what the varying one allows.
    before = max(p.abs().max() for p in model.parameters())
    batch = torch.full((3, 1, 64, 64), 50.0)
    batch[2] = torch.rand(64, 64) * 100
    data_dependent_init(model, batch)
    after = max(p.abs().max() for p in model.parameters())
    assert torch.isfinite(after) and after < 1e3 * before
    with torch.no_grad():
        assert torch.isfinite(model.eval()(torch.rand(1, 1, 64, 64) * 100)).all()


def test_the_data_init_batch_is_read_with_the_run_s3_options(s3_server, monkeypatch) -> None:
    """An endpoint given in the config, not the environment, reaches the init batch's reads."""
    from jobs.loader import DatasetIndex
    from jobs.train_loop import init_batch

    root = s3_server.url("data-init-dataset")
    write_dataset(root)
    s3 = storage.S3Options(endpoint_url=s3_server.endpoint_url)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")  # nothing listens there
    cfg = dataclasses.replace(train.ci(), data=root, s3=s3, crop_px=32)
    batch = init_batch(cfg, DatasetIndex.load(root, s3))
    assert batch.shape == (cfg.micro_batch, 3, 32, 32) and batch.dtype == torch.uint8
    assert torch.equal(batch, init_batch(cfg, DatasetIndex.load(root, s3)))  # same on every rank


def test_a_diverged_model_validates_as_the_worst_not_as_nan() -> None:
    """NaN logits: loss +inf and AuC 0, which a search minimising the loss or maximising the
    AuC prunes (a NaN objective passes every cut-off)."""
    from colorcore.model import ColorizationNet, ModelConfig
    from jobs.validation import validate
    from tests.support import photo_rgb

    model = ColorizationNet(ModelConfig(width=1 / 16))
    with torch.no_grad():
        model.model8[-1].bias.fill_(math.nan)
    crops = torch.from_numpy(photo_rgb("coffee")[:64, :64].copy()).permute(2, 0, 1)[None]
    result = validate(
        model, crops.expand(2, -1, -1, -1), rebalance0_Q=torch.ones(313), k=5, sigma=5.0
    )
    assert result.images == 2 and result.loss == math.inf
    assert result.auc_raw == 0 and result.auc_rebalanced == 0 and result.gray_auc_raw > 0


def test_validation_pools_the_pixels_of_its_images() -> None:
    """Rebalanced AuC as the paper counts it: the weighted share of all the images' pixels
    within each threshold, not a mean of each image's own share (rare colours would make one
    image's few pixels weigh as much as another's whole)."""
    from colorcore.color import rgb_to_lab
    from colorcore.metrics import ab_auc
    from colorcore.model import ColorizationNet, ModelConfig
    from colorcore.prior import rebalance_weights
    from colorcore.quantize import nearest_bin
    from jobs.validation import validate
    from tests.support import photo_rgb, reference_path

    prior = np.load(reference_path("prior_probs.npy"), allow_pickle=False)
    w_Q = rebalance_weights(prior, lam=0.0).float()
    pictures = [photo_rgb("coffee")[:64, :64], photo_rgb("astronaut")[100:164, 200:264]]
    crops = torch.stack([torch.from_numpy(p.copy()).permute(2, 0, 1) for p in pictures])
    result = validate(
        ColorizationNet(ModelConfig(width=1 / 16)), crops, rebalance0_Q=w_Q, k=5, sigma=5.0
    )
    ab_N2HW = rgb_to_lab(crops.float() / 255)[:, 1:]
    side_by_side = torch.cat(list(ab_N2HW), dim=-1)[None]  # one image of both images' pixels
    gray = torch.zeros_like(side_by_side)
    pooled = ab_auc(gray, side_by_side, pixel_weights=w_Q[nearest_bin(side_by_side)])[0].item()
    each = ab_auc(torch.zeros_like(ab_N2HW), ab_N2HW, pixel_weights=w_Q[nearest_bin(ab_N2HW)])[0]
    assert abs(each.mean().item() - pooled) > 0.01  # the two readings differ here
    assert result.gray_auc_rebalanced == pytest.approx(pooled, abs=1e-9)
    assert result.gray_auc_raw == pytest.approx(ab_auc(gray, side_by_side)[0].item(), abs=1e-9)
    # no held-out image decoded: nothing measured (a loss of 0 would read as the best model)
    none = validate(ColorizationNet(ModelConfig(width=1 / 16)), crops[:0], rebalance0_Q=w_Q,
                    k=5, sigma=5.0)  # fmt: skip
    assert none.images == 0 and all(math.isnan(v) for v in list(none.__dict__.values())[1:])


def _eight_crops() -> torch.Tensor:
    from tests.support import photo_rgb

    photos = [photo_rgb(name) for name in ("astronaut", "coffee", "chelsea", "rocket")]
    return torch.stack(
        [torch.from_numpy(p[y : y + 64, 64:128].copy()) for p in photos for y in (40, 120)]
    ).permute(0, 3, 1, 2)


def _flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _tiny_net() -> tuple[torch.nn.Module, torch.Tensor]:
    """The same tiny network, BatchNorm in eval mode (an image's output does not depend on
    the others in its batch), and rebalancing weights, on every call and in every process."""
    from colorcore.model import ColorizationNet, ModelConfig

    torch.manual_seed(0)
    rebalance_Q = torch.rand(313) + 0.5
    return ColorizationNet(ModelConfig(width=1 / 16)).eval(), rebalance_Q


def _sgd_step(
    model: torch.nn.Module, rebalance_Q: torch.Tensor, rgb_N3HW: torch.Tensor, micro_batch: int
) -> torch.Tensor:
    """One `train_step` by SGD at lr 1 (the weights move by the gradient); its loss."""
    from jobs.train_loop import step_loss, train_step

    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    loss_of = step_loss(model, rebalance_Q, train.ci(), None, torch.device("cpu"))
    return train_step(model, optimizer, loss_of, rgb_N3HW, micro_batch)


def test_micro_batches_step_as_their_whole_batch() -> None:
    """Gradient accumulation: four micro-batches of two move the weights as one batch of
    eight does, and the step's loss is the batch's."""
    rgb_N3HW = _eight_crops()
    losses, moves = [], []
    for micro_batch in (8, 2):
        model, rebalance_Q = _tiny_net()
        start = _flat(model)
        losses.append(_sgd_step(model, rebalance_Q, rgb_N3HW, micro_batch))
        moves.append(_flat(model) - start)
        assert all(p.grad is None for p in model.parameters())  # cleared for the next step
    assert moves[0].abs().max() > 1e-3
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=0)
    torch.testing.assert_close(moves[1], moves[0], rtol=1e-3, atol=1e-6)


def _accumulate_on_rank(rank: int, folder: str) -> None:
    """Rank `rank` of 2 takes its half of the eight crops in two micro-batches of two."""
    init = f"file://{folder}/rendezvous"
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        torch.set_num_threads(1)  # two ranks on this machine's cores
        model, rebalance_Q = _tiny_net()
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        _sgd_step(ddp, rebalance_Q, _eight_crops()[rank * 4 : rank * 4 + 4], 2)
        torch.save(_flat(model), Path(folder, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def test_ranks_accumulating_micro_batches_step_as_one_process_with_the_whole_batch(
    tmp_path,
) -> None:
    """DDP with gradient accumulation: two ranks of two micro-batches each (their gradients
    all-reduced once, with the last) leave the same weights on both ranks, those of one
    process stepping on the whole batch. Gradients kept apart (no all-reduce) would leave
    the ranks apart; a micro-batch's loss counted at another share, off the whole batch."""
    import torch.multiprocessing as mp

    mp.spawn(_accumulate_on_rank, args=(str(tmp_path),), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    whole, rebalance_Q = _tiny_net()
    start = _flat(whole)
    _sgd_step(whole, rebalance_Q, _eight_crops(), 8)
    assert (_flat(whole) - start).abs().max() > 1e-3
    torch.testing.assert_close(ranks[1], ranks[0], rtol=0, atol=0)
    torch.testing.assert_close(ranks[0] - start, _flat(whole) - start, rtol=1e-3, atol=1e-6)


def _restore_on_rank(rank: int, world: int, run: str, store: str, steps) -> None:
    from jobs.train_loop import _restore

    def unread(url, s3=None):
        raise AssertionError(f"rank {rank} read {url} from storage")

    if rank:
        storage.read_bytes = unread  # this process's own: the others get the bytes
    torch.distributed.init_process_group("gloo", init_method=store, rank=rank, world_size=world)
    try:
        state, taken = _restore(run, storage.S3Options(), rank, world)
        weight = state["model_state"]["model1.0.weight"]
        steps[rank] = (state["extra"]["step"], float(weight.double().sum()), taken)
    finally:
        torch.distributed.destroy_process_group()


def test_every_rank_resumes_from_the_checkpoint_rank_0_reads(tmp_path) -> None:
    """Rank 0 reads the newest checkpoint that loads and sends it over the process group
    (gloo here): each rank resumes from the same step and weights, and names its later
    checkpoints alike, and only rank 0 reads storage."""
    import multiprocessing

    from colorcore.model import ColorizationNet, ModelConfig
    from colorcore.weights import save_checkpoint

    run = tmp_path / "run"
    folder = run / checkpoint_dir_name(10)
    folder.mkdir(parents=True)
    model = ColorizationNet(ModelConfig(width=1 / 16))
    save_checkpoint(str(folder / CHECKPOINT_FILE), model, extra={"step": 10})
    unloadable = run / checkpoint_dir_name(20)
    unloadable.mkdir()
    (unloadable / CHECKPOINT_FILE).write_bytes(zip_of(b"not a checkpoint"))
    context = multiprocessing.get_context("spawn")
    with context.Manager() as manager:
        steps = manager.dict()
        store = f"file://{tmp_path / 'store'}"
        ranks = [
            context.Process(target=_restore_on_rank, args=(r, 2, str(run), store, steps))
            for r in (0, 1)
        ]
        for process in ranks:
            process.start()
        for process in ranks:
            process.join(120)
        assert [p.exitcode for p in ranks] == [0, 0]
        taken = [checkpoint_dir_name(10), checkpoint_dir_name(20)]  # names later ones avoid
        expected = (10, float(model.model1[0].weight.detach().double().sum()), taken)
        assert dict(steps) == {0: expected, 1: expected}


def test_resume_takes_the_newest_readable_checkpoint_in_the_run_folder(tmp_path) -> None:
    from colorcore.model import ColorizationNet, ModelConfig
    from colorcore.weights import save_checkpoint
    from jobs.train_loop import _restore

    run, s3 = tmp_path / "run", storage.S3Options()
    assert _restore(str(run), s3, 0, 1) == (None, [])  # fresh run
    model = ColorizationNet(ModelConfig(width=1 / 16))
    for step in (10, 20, 30):
        folder = run / checkpoint_dir_name(step)
        folder.mkdir(parents=True)
        save_checkpoint(str(folder / CHECKPOINT_FILE), model, extra={"step": step})
    newest = run / checkpoint_dir_name(30) / CHECKPOINT_FILE
    newest.write_bytes(newest.read_bytes()[:1000])  # torn by a crash mid-copy: removed
    state, _ = _restore(str(run), s3, 0, 1)
    assert state["extra"]["step"] == 20 and not newest.exists()

    # Checkpoints whole but unreadable are passed over, and if none loads the run stops
    # rather than start over (and overwrite them).
    (run / checkpoint_dir_name(20) / CHECKPOINT_FILE).write_bytes(zip_of(b"not a checkpoint"))
    state, taken = _restore(str(run), s3, 0, 1)
    assert state["extra"]["step"] == 10
    # Its checkpoint at step 20 again has a folder of its own, newest of all.
    again = checkpoint_dir_name(20, taken)
    assert again == "checkpoint_000000020.1" and again not in taken
    folder = run / again
    folder.mkdir()
    save_checkpoint(str(folder / CHECKPOINT_FILE), model, extra={"step": 20})
    assert _restore(str(run), s3, 0, 1)[0]["extra"]["step"] == 20
    assert checkpoint_dir_name(20, [*taken, again]) == "checkpoint_000000020.2"
    (folder / CHECKPOINT_FILE).write_bytes(zip_of(b"nor this one"))
    assert _restore(str(run), s3, 0, 1)[0]["extra"]["step"] == 10
    (folder / CHECKPOINT_FILE).unlink()
    folder.rmdir()
    (run / checkpoint_dir_name(10) / CHECKPOINT_FILE).write_bytes(zip_of(b"nor this"))
    with pytest.raises(RuntimeError, match="none of the 2 checkpoints"):
        _restore(str(run), s3, 0, 1)

    # Checkpoints a crash cut short, all of them: the run starts over. Those Ray recorded,
    # the removed among them, keep their names: Ray's keep-last-K deletes a recorded folder
    # in turn, and would take a new checkpoint of the same name with it.
    (run / models.RAY_CHECKPOINT_RECORD).write_text(json.dumps(ray_record(10, 20)))
    for step in (10, 20):
        (run / checkpoint_dir_name(step) / CHECKPOINT_FILE).write_bytes(b"PK\x03\x04")
    state, taken = _restore(str(run), s3, 0, 1)
    assert state is None and taken == [checkpoint_dir_name(10), checkpoint_dir_name(20)]
    assert not list(run.glob(f"*/{CHECKPOINT_FILE}"))
    assert _restore(str(run), s3, 0, 1) == (None, taken)  # (removed: named by Ray's record)
    assert checkpoint_dir_name(10, taken) == "checkpoint_000000010.1"
    (run / models.RAY_CHECKPOINT_RECORD).write_text(json.dumps(ray_record(10, pending=20)))
    assert _restore(str(run), s3, 0, 1) == (None, taken)


def ray_record(*steps: int, pending: int | None = None) -> dict:
    """Ray Train's record of a run's checkpoints (`jobs.models.RAY_CHECKPOINT_RECORD`), as
    Ray 2.60 writes it, of checkpoints at `steps`, the last the latest, and one `pending`."""
    results = [{"checkpoint_dir_name": checkpoint_dir_name(s), "metrics": {}} for s in steps]
    waiting = [] if pending is None else [pending]
    return {
        "ray_version": "2.60.0",
        "checkpoint_results": results,
        "latest_checkpoint_result": results[-1] if results else None,
        "pending_training_results": [
            {"checkpoint_dir_name": checkpoint_dir_name(s), "metrics": {}} for s in waiting
        ],
    }


def zip_of(data: bytes) -> bytes:
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        z.writestr("data.pkl", data)
    return buffer.getvalue()


def test_a_run_keeps_its_settings_once_it_has_a_checkpoint(tmp_path) -> None:
    from colorcore.model import ModelConfig
    from jobs.dataset import Manifest, ShardInfo

    def dataset(folder, sha256: str, source: str) -> None:
        shards = (ShardInfo(name="shards/part-0.parquet", num_rows=9, sha256=sha256),)
        Manifest(classes=("a",), shards=shards, num_inputs=9, num_errors=0,
                 config={"src": source}).save(str(folder))  # fmt: skip

    prior, data, moved = tmp_path / "prior.npz", tmp_path / "data", tmp_path / "moved"
    prior.write_bytes(b"counts")
    dataset(data, "a" * 64, "s3://raw/train")
    dataset(moved, "a" * 64, "/elsewhere/train")  # the same shards, prepared elsewhere
    cfg = dataclasses.replace(
        train.ci(), storage=str(tmp_path / "runs"), prior=str(prior), data=str(data)
    )
    train.check_resumable(cfg)
    other = dataclasses.replace(cfg, seed=7)
    train.check_resumable(other)  # nothing trained yet: it may start over differently
    folder = tmp_path / "runs" / cfg.name / checkpoint_dir_name(10)
    folder.mkdir(parents=True)
    (folder / CHECKPOINT_FILE).write_bytes(zip_of(b"x"))  # whole: the run has one
    train.check_resumable(other)
    with pytest.raises(ValueError, match="started with other seed"):
        train.check_resumable(cfg)
    # More steps may be asked for, or as many as trained; fewer would end past max_steps.
    train.check_resumable(dataclasses.replace(other, max_steps=10))
    with pytest.raises(ValueError, match="checkpoint of step 10, past max_steps 9"):
        train.check_resumable(dataclasses.replace(other, max_steps=9))
    # Checkpoints without the record of how they were trained: no settings can be checked.
    record = tmp_path / "runs" / cfg.name / "run.json"
    kept = record.read_bytes()
    record.unlink()
    with pytest.raises(ValueError, match="no record of how it started"):
        train.check_resumable(other)
    assert not record.exists()
    record.write_bytes(kept)
    train.check_resumable(dataclasses.replace(other, data=str(moved)))  # the same shards
    dataset(moved, "b" * 64, "/elsewhere/train")
    with pytest.raises(ValueError, match="data_shards_sha256"):
        train.check_resumable(dataclasses.replace(other, data=str(moved)))
    prior.write_bytes(b"other counts")
    with pytest.raises(ValueError, match="prior_sha256"):
        train.check_resumable(other)

    prior.write_bytes(b"counts")
    with pytest.raises(ValueError, match="started with other read_groups"):
        train.check_resumable(dataclasses.replace(other, read_groups=2))

    # A record written before fields existed (no data checksum, no BatchNorm decay): those
    # are not compared, the rest is; a run recorded before read groups read in one.
    old = json.loads(record.read_text())
    del old["data_shards_sha256"], old["model"]["bn_moving_average"], old["read_groups"]
    record.write_text(json.dumps(old))
    train.check_resumable(other)
    with pytest.raises(ValueError, match="started with other model"):
        train.check_resumable(dataclasses.replace(other, model=ModelConfig(width=1 / 8)))
    with pytest.raises(ValueError, match="started with other read_groups"):
        train.check_resumable(dataclasses.replace(other, read_groups=2))
    # A record of the order by whole shards (before row groups): that order is not made now
    del old["window_images"]
    record.write_text(json.dumps(old | {"window_shards": 4}))
    with pytest.raises(ValueError, match=r"started with window_shards .* another --name"):
        train.check_resumable(other)

    # Its only checkpoint cut short by a crash: nothing to keep, the run may start over.
    (folder / CHECKPOINT_FILE).write_bytes(b"PK\x03\x04 cut short")
    train.check_resumable(dataclasses.replace(other, seed=8))
    assert not (folder / CHECKPOINT_FILE).exists()


def test_auto_decode_takes_nvjpeg_only_where_torchvision_imports(monkeypatch, caplog) -> None:
    """A GPU worker without a torchvision built for its torch decodes on the CPU, saying so,
    rather than failing in every restart of its workers."""
    import sys

    from jobs.train_loop import _auto_decode

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert _auto_decode(cpu) == "pil"
    monkeypatch.setitem(sys.modules, "torchvision.io", None)  # an import that fails
    assert _auto_decode(cuda) == "pil"
    assert "torchvision does not import here" in caplog.text
    monkeypatch.setitem(sys.modules, "torchvision.io", type(sys)("torchvision.io"))
    monkeypatch.setitem(sys.modules, "torchvision", type(sys)("torchvision"))
    assert _auto_decode(cuda) == "nvjpeg"

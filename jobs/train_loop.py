"""The training loop each Ray Train worker runs (configured by `jobs.train.TrainConfig`).

Per step: the rank's micro-batches of uint8 crops come from `jobs.loader.TrainLoader`;
Lab conversion and soft encoding run on the training device (`colorcore.data`); the loss is
`colorcore.loss.rebalanced_cross_entropy` in fp32 under autocast; gradients are
accumulated (DDP synchronises only on the last micro-batch) and Adam steps once.

Every rank calls `ray.train.report` at every checkpoint step; rank 0 attaches the
checkpoint directory, named ``checkpoint_<step>`` (`jobs.models.checkpoint_dir_name`) so
the run folder follows the ``--model`` convention, and rewrites ``metrics.csv`` beside it.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import io
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch

from colorcore.data import make_targets
from colorcore.datainit import data_dependent_init
from colorcore.loss import rebalanced_cross_entropy
from colorcore.model import ColorizationNet
from colorcore.weights import load_checkpoint, save_checkpoint
from jobs import storage
from jobs.config import from_dict
from jobs.loader import DatasetIndex, TrainLoader, decode_threads
from jobs.models import (
    CHECKPOINT_FILE,
    UNREAD_RECORD,
    checkpoint_dir_name,
    checkpoint_files,
    checkpoint_folder,
    newest_loadable,
    recorded_checkpoints,
    remove_torn,
)
from jobs.node_cache import NodeCache
from jobs.runtime import choose_precision, keep_freed_memory
from jobs.train import (
    DIVERGED_FILE,
    METRICS_FILE,
    TrainConfig,
    learning_rate,
    load_prior,
    rebalance_from,
)

# Progress goes through logging, never print: in a Ray Train worker, `print` both writes to
# the worker's stdout and logs the line, and the driver shows each of the two.
log = logging.getLogger(__name__)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    cfg = from_dict(TrainConfig, config["cfg"])
    run_url = config["run_url"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if cfg.use_gpu else torch.device("cpu")
    precision = choose_precision(device.type, cfg.precision)
    torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    if device.type == "cpu":
        keep_freed_memory()
    if device.type == "cuda":
        # TF32 for the network's convolutions only: its matrix products (not TF32, the
        # default) are the colour conversions of the targets and validation's annealed
        # mean, whose 10-bit mantissas would move ab by tenths.
        torch.backends.cudnn.allow_tf32 = True

    histogram = load_prior(cfg.prior_url, cfg.s3)
    rebalance_Q = rebalance_from(histogram, lam=cfg.rebalance_lambda, sigma=cfg.prior_sigma)
    rebalance_Q = rebalance_Q.to(device, torch.float32)
    rebalance0_Q = (
        rebalance_from(histogram, lam=0.0, sigma=cfg.prior_sigma) if cfg.val_data else None
    )

    state, taken = _restore(run_url, cfg.s3, rank, world)
    torch.manual_seed(cfg.seed + rank)
    model = ColorizationNet(cfg.model)
    if state:
        model.load_state_dict(state["model_state"])
        torch.set_rng_state(state["extra"]["rng_state"][rank % len(state["extra"]["rng_state"])])
    step = state["extra"]["step"] if state else 0
    epoch, offset = (state["extra"]["epoch"], state["extra"]["offset"]) if state else (0, 0)
    history: list[dict[str, float]] = state["extra"]["history"] if state else []
    if state and rank == 0:
        log.info("train: resumed from step %d (epoch %d, offset %d)", step, epoch, offset)

    index = DatasetIndex.load(cfg.data, cfg.s3)
    groups_here = _machine_groups(ctx, cfg)
    cache = (
        NodeCache.open(
            run_url,
            local_rank=ctx.get_local_rank(),
            local_world_size=ctx.get_local_world_size(),
            need_bytes=int(3 * cfg.window_images * index.jpeg_bytes_per_image * groups_here),
            reserve_bytes=_object_store_bytes(),
        )
        if cfg.share_reads
        else None
    )
    batches = None  # closed, with the cache, whatever fails from here on
    try:
        decode = cfg.decode if cfg.decode != "auto" else _auto_decode(device)
        loader = TrainLoader(
            index,
            rank=rank,
            world_size=world,
            batch_size=cfg.micro_batch * cfg.grad_accum_steps,
            crop_px=cfg.crop_px,
            seed=cfg.seed,
            window_images=cfg.window_images,
            read_groups=cfg.read_groups,
            start_epoch=epoch,
            start_offset=offset,
            num_threads=decode_threads(cfg.cpus_per_worker, decode),
            decode=decode,
            pin_memory=device.type == "cuda",
            s3=cfg.s3,
            cache=cache,
        )
        batches = iter(loader)

        # On rank 0 only: DDP's construction copies rank 0's parameters and buffers (the
        # BatchNorm statistics the init sets too) to the others.
        if cfg.data_init and not state and rank == 0:
            first = make_targets(init_batch(cfg, index))
            data_dependent_init(model, first.l_N1HW)
        model = model.to(
            device, memory_format=torch.channels_last if device.type == "cuda" else None
        )
        model = ray.train.torch.prepare_model(model) if world > 1 else model
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(
            trainable,
            lr=cfg.lr,
            betas=(cfg.adam_beta1, cfg.adam_beta2),
            weight_decay=cfg.weight_decay,
        )
        if state:
            optimizer.load_state_dict(state["extra"]["optimizer"])
            for group in optimizer.param_groups:  # this config's, not the checkpoint's settings
                group["betas"] = (cfg.adam_beta1, cfg.adam_beta2)
                group["weight_decay"] = cfg.weight_decay
        loss_of = step_loss(model, rebalance_Q, cfg, precision.autocast_dtype, device)

        val_crops = None
        if cfg.val_data:
            from jobs.validation import load_crops

            val_crops = load_crops(
                cfg.val_data,
                num_images=cfg.val_images,
                crop_px=cfg.crop_px,
                rank=rank,
                world_size=world,
                s3=cfg.s3,
            )

        # The loss is summed on the device and read when logged: no host sync in a step.
        window_start, window_images, window_loss = (
            time.monotonic(),
            0,
            torch.zeros((), device=device),
        )
        while step < cfg.max_steps:
            lr = learning_rate(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batch = next(batches)
            rgb_N3HW = batch.rgb_N3HW.to(device, non_blocking=True)
            window_loss += train_step(model, optimizer, loss_of, rgb_N3HW, cfg.micro_batch)
            step += 1
            epoch, offset = (batch.epoch, batch.next_offset)
            window_images += cfg.batch_size

            row: dict[str, float] = {}
            # Rows at checkpoints too: a loss gone non-finite is caught before it is saved, and
            # so are weights an update made non-finite since the loss was last measured.
            checkpoint = step % cfg.checkpoint_every_steps == 0 or step == cfg.max_steps
            if step % cfg.log_every_steps == 0 or checkpoint:
                elapsed = time.monotonic() - window_start
                row = {
                    "step": step,
                    "epoch": epoch,
                    "lr": lr,
                    "loss": _mean_over_ranks(
                        window_loss.item() / max(1, window_images // cfg.batch_size), device
                    ),
                    "img_per_s": window_images / max(elapsed, 1e-9),
                }
                window_start, window_images = time.monotonic(), 0
                window_loss = torch.zeros((), device=device)
                broken = not math.isfinite(row["loss"]) or (checkpoint and _weights_broken(model))
                if broken:  # the same on every rank: all stop here
                    if val_crops is not None:  # a search's objective must be in every report
                        from jobs.validation import ValidationResult

                        row |= ValidationResult.worst().as_metrics()
                    _diverged(row, step, epoch, offset, history, rank, run_url, cfg.s3)
                    break
            paused = time.monotonic()  # validation and checkpoints are not training time
            if val_crops is not None and (step % cfg.val_every_steps == 0 or step == cfg.max_steps):
                from jobs.validation import validate

                # The module, not DDP's wrapper: its forward syncs buffers across ranks, and a
                # rank with fewer validation batches than another would wait for it forever.
                # Synced here instead: every rank measures with rank 0's BatchNorm statistics,
                # the checkpoint's (each rank's own moved on with its own last batch).
                module = getattr(model, "module", model)
                if world > 1:
                    for buffer in module.buffers():
                        torch.distributed.broadcast(buffer, src=0)
                result = validate(
                    module,
                    val_crops,
                    rebalance0_Q=rebalance0_Q,
                    k=cfg.soft_encode_k,
                    sigma=cfg.soft_encode_sigma,
                    autocast_dtype=precision.autocast_dtype,
                )
                row = {"step": step, **row, **result.as_metrics()}
            if row:
                history.append(row)
                if rank == 0:
                    log.info(" ".join(f"{k}={v:.4g}" for k, v in row.items()))
            if checkpoint:
                _report(model, optimizer, cfg, run_url, histogram, step, epoch, offset, history,
                        rank, world, folder=checkpoint_dir_name(step, taken))  # fmt: skip
            window_start += time.monotonic() - paused
    finally:  # an error in a step too: the reading threads and processes, and the cache
        if batches is not None:
            batches.close()  # its reads end before the folder they share goes
        if cache is not None:
            cache.close()
    if state and state["extra"]["step"] >= cfg.max_steps:
        # Resumed at its end (the driver died after the last checkpoint): report the final
        # figures again for whoever waits on them, such as the Tune trial running this.
        ray.train.report(_metrics(step, epoch, offset, history), checkpoint=None)


def _auto_decode(device: torch.device) -> str:
    """`TrainConfig.decode` "auto": nvJPEG on a GPU where torchvision (which holds it) imports
    beside this torch, the CPU's decoders ("pil") otherwise, said once per worker."""
    if device.type != "cuda":
        return "pil"
    try:
        import torchvision.io  # noqa: F401
    except Exception as error:  # absent, or built for another torch
        log.warning("decode auto: torchvision does not import here (%s): JPEGs decode on the "
                    "CPU, not with nvJPEG", error)  # fmt: skip
        return "pil"
    return "nvjpeg"


def _machine_groups(ctx: Any, cfg: TrainConfig) -> int:
    """The read groups of this machine's workers (Ray Train numbers a machine's workers
    consecutively); warns once a machine when one of them has workers elsewhere too, which
    read the same row groups."""
    first = ctx.get_world_rank() - ctx.get_local_rank()
    last = first + ctx.get_local_world_size() - 1
    group_ranks = ctx.get_world_size() // cfg.read_groups
    if ctx.get_local_rank() == 0 and (first % group_ranks or (last + 1) % group_ranks):
        log.warning(
            "train: the read groups of workers %d-%d have workers on other machines too, "
            "which read the same row groups: --read-groups NUMBER_OF_MACHINES has each "
            "machine read its own part of the data", first, last,
        )  # fmt: skip
    return last // group_ranks - first // group_ranks + 1


def _object_store_bytes() -> int:
    """The size of this machine's Ray object store (which lives in /dev/shm where it fits)."""
    import ray

    node = ray.get_runtime_context().get_node_id()
    for info in ray.nodes():
        if info.get("NodeID") == node:
            return int(info.get("Resources", {}).get("object_store_memory", 0))
    return 0


def init_batch(cfg: TrainConfig, index: DatasetIndex) -> torch.Tensor:
    """uint8 (micro_batch, 3, crop, crop) on the CPU: the batch of the data-dependent
    initialisation (rank 0's; its own seed), read as the training data is."""
    loader = TrainLoader(
        index,
        rank=0,
        world_size=1,
        batch_size=cfg.micro_batch,
        crop_px=cfg.crop_px,
        seed=cfg.seed + 1,
        window_images=cfg.window_images,
        s3=cfg.s3,
    )
    with contextlib.closing(iter(loader)) as batches:
        return next(batches).rgb_N3HW


def step_loss(
    model: torch.nn.Module,
    rebalance_Q: torch.Tensor,
    cfg: TrainConfig,
    autocast_dtype: torch.dtype | None,
    device: torch.device,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The loss of one micro-batch of uint8 crops on the device: Lab and sparse targets,
    forward under autocast, rebalanced cross-entropy.

    With ``cfg.compile``, the model, the targets (Lab conversion and soft encoding) and the
    loss are each compiled whole, so the work outside the network is a handful of fused
    kernels. Off the CPU the targets are encoded without a host sync (the crops are sRGB, so
    `colorcore.quantize.soft_encode_in_table` applies), compiled or not.
    """
    compiled = functools.partial(torch.compile, fullgraph=True) if cfg.compile else None
    forward = torch.compile(model) if compiled else model
    targets_of = functools.partial(
        make_targets,
        k=cfg.soft_encode_k,
        sigma=cfg.soft_encode_sigma,
        in_table=compiled is not None or device.type != "cpu",
    )
    targets_fn = compiled(targets_of) if compiled else targets_of
    loss_fn = compiled(rebalanced_cross_entropy) if compiled else rebalanced_cross_entropy
    autocast = (
        functools.partial(torch.autocast, device.type, dtype=autocast_dtype)
        if autocast_dtype
        else contextlib.nullcontext
    )

    def loss(rgb_N3HW: torch.Tensor) -> torch.Tensor:
        targets = targets_fn(rgb_N3HW)
        l_in = targets.l_N1HW
        if device.type == "cuda":
            l_in = l_in.contiguous(memory_format=torch.channels_last)
        with autocast():
            logits = forward(l_in)
        return loss_fn(
            logits,
            targets.bins_NkHW,
            targets.weights_NkHW,
            rebalance_Q,
            nongray_N=targets.nongray_N,
            reduction=cfg.loss_reduction,
        )

    return loss


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_of: Callable[[torch.Tensor], torch.Tensor],
    rgb_N3HW: torch.Tensor,
    micro_batch: int,
) -> torch.Tensor:
    """One optimizer step on a batch, run in micro-batches of `micro_batch` images whose
    gradients add up to the whole batch's (each loss is a mean over its micro-batch, so
    each counts for its share); a DDP model all-reduces them once, with the last. Returns
    the batch's loss, left on the device (no host sync)."""
    micro = rgb_N3HW.split(micro_batch)
    ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
    total = torch.zeros((), device=rgb_N3HW.device)
    for i, rgb in enumerate(micro):
        last = i == len(micro) - 1
        with model.no_sync() if ddp and not last else contextlib.nullcontext():
            loss = loss_of(rgb)
            (loss / len(micro)).backward()
        total += loss.detach() / len(micro)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total


def _mean_over_ranks(value: float, device: torch.device) -> float:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return t.item() / torch.distributed.get_world_size()


def _restore(
    run_url: str, s3: storage.S3Options, rank: int, world: int
) -> tuple[dict[str, Any] | None, list[str]]:
    """The newest readable checkpoint in the run folder (None for a fresh run), and the
    checkpoint folder names the run's new checkpoints must not take; the same on every rank:
    rank 0 chooses and reads them and sends them to the others (the interconnect rather
    than every rank's read of it from storage).

    Read from the folder rather than taken from `ray.train.get_checkpoint()`: a driver killed
    just after a checkpoint was written may not have recorded it, and a re-run should not
    repeat those steps. Checkpoints a crash cut short are removed (a run with no other
    starts over); one whose file is whole but does not load is passed over for an older
    one. The names taken are those of the folder's checkpoints and those Ray's record of the
    run holds (`jobs.models.recorded_checkpoints`), the removed ones among them: Ray's
    keep-last-K deletes a recorded folder in turn, and with it the files of a new checkpoint
    of the same name. Storage that cannot be read fails the worker, which Ray restarts,
    rather than starting the run over. When checkpoints exist and none loads, the run
    fails: starting over would overwrite them.
    """
    data, ckpt, taken = None, None, []
    if rank == 0:
        taken = sorted(
            {checkpoint_folder(url) for url in checkpoint_files(run_url, s3)}
            | _recorded(run_url, s3)
        )
        remove_torn(run_url, s3)  # after a restart: those of the workers Ray replaced
        try:
            found = newest_loadable(run_url, s3, lambda data: load_checkpoint(io.BytesIO(data)))
        except RuntimeError as error:  # checkpoints, none of them loads
            raise RuntimeError(
                f"{error}; train under another --name, or delete the run's folder (with Ray's "
                "record of its checkpoints) to start it over"
            ) from None
        if found is not None:
            _, data, ckpt = found
    if world > 1:
        sent = [data, taken]
        torch.distributed.broadcast_object_list(sent, src=0)
        data, taken = sent
        if rank != 0 and data is not None:
            ckpt = load_checkpoint(io.BytesIO(data))
    if ckpt is None:
        return None, taken
    return {"model_state": ckpt.model_state, "extra": ckpt.extra}, taken


def _recorded(run_url: str, s3: storage.S3Options) -> set[str]:
    """`recorded_checkpoints`, none where Ray has no record of the run or one this version
    does not read."""
    try:
        return recorded_checkpoints(run_url, s3)
    except UNREAD_RECORD:
        return set()


def _weights_broken(model: torch.nn.Module) -> bool:
    """Whether a parameter of any rank holds a NaN or an infinity. Checked before a
    checkpoint: an update from a gradient that overflowed breaks the weights without its
    loss, measured before it, showing it, and a checkpoint of them would be where every
    re-run starts. DDP keeps the ranks' weights equal, but GPUs of two kinds may round an
    update apart: the ranks agree on the answer, or one would stop while the others wait."""
    broken = ~torch.stack([p.isfinite().all() for p in model.parameters()]).all()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        broken = broken.to(torch.int32)
        torch.distributed.all_reduce(broken, op=torch.distributed.ReduceOp.MAX)
    return bool(broken)  # one wait for the device, not one a parameter


def _diverged(
    row: dict, step: int, epoch: int, offset: int, history: list, rank: int, run_url: str, s3
) -> None:
    """Ends a run whose loss, or whose weights, are no longer finite: every step after
    would be wasted, and its weights are not checkpointed. Says where in the run folder
    (`DIVERGED_FILE`, for the driver, which sees only checkpointed reports) and in a last
    report (`diverged`: the step, for a search to tell the trial from one stopped early)."""
    import ray.train

    history.append(row)
    if rank == 0:
        weights_broken = math.isfinite(row["loss"])  # else the loss is what showed it
        log.error(
            "train: %s at step %d (loss %s, lr %.3g): the run diverged and stops, and nothing "
            "of it since the last checkpoint is saved",
            "the weights are no longer finite" if weights_broken else "the loss is not finite",
            step, row["loss"], row["lr"],
        )  # fmt: skip
        record = {"step": step, "loss": str(row["loss"]), "lr": row["lr"]}
        record["weights_broken"] = weights_broken
        storage.write_bytes(storage.join(run_url, DIVERGED_FILE), json.dumps(record).encode(), s3)
    ray.train.report(_metrics(step, epoch, offset, history) | {"diverged": step}, checkpoint=None)


def _metrics(step: int, epoch: int, offset: int, history: list[dict[str, float]]) -> dict:
    return {"step": step, "epoch": epoch, "offset": offset, **(history[-1] if history else {})}


def _report(
    model,
    optimizer,
    cfg: TrainConfig,
    run_url,
    histogram,
    step,
    epoch,
    offset,
    history,
    rank,
    world,
    *,
    folder: str,
) -> None:
    import ray.train

    from jobs.config import to_dict

    metrics = _metrics(step, epoch, offset, history)
    rng_states: list[Any] = [torch.get_rng_state()]
    if world > 1:
        rng_states = [None] * world
        torch.distributed.all_gather_object(rng_states, torch.get_rng_state())
    if rank != 0:
        ray.train.report(metrics, checkpoint=None, checkpoint_dir_name=folder)
        return
    with tempfile.TemporaryDirectory() as directory:
        extra = {
            "step": step,
            "epoch": epoch,
            "offset": offset,
            "history": history,
            "optimizer": optimizer.state_dict(),
            "rng_state": rng_states,
            "config": to_dict(cfg),
        }
        save_checkpoint(
            os.path.join(directory, CHECKPOINT_FILE),
            model,
            prior_counts=histogram.counts_Q,
            extra=extra,
        )
        storage.write_bytes(storage.join(run_url, METRICS_FILE), _csv(history), cfg.s3)
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(directory),
            checkpoint_dir_name=folder,
        )


def _csv(history: list[dict[str, float]]) -> bytes:
    columns = list(dict.fromkeys(k for row in history for k in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(history)
    return buffer.getvalue().encode()

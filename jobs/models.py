"""The ``--model URL`` convention shared by every job that loads a model.

A URL (local path, ``s3://``, ``gs://``) names one of, detected automatically:

- the authors' released ECCV16 weights (``colorization_release_v2-9b330a0b.pth``);
- a project checkpoint file (`colorcore.weights.save_checkpoint`);
- a training run folder: its latest checkpoint that loads, ``<run>/checkpoint_<step>/
  checkpoint.pt`` with zero-padded steps (``checkpoint_<step>.<n>`` when a resumed run
  reaches a step whose folder name is taken, by a checkpoint it could not load or one a
  crash cut short that Ray recorded: `checkpoint_dir_name`; runs in folders below it, such
  as a search's trials, are not its own);
- a ``model.safetensors`` export of a training run (`colorcore.weights.to_safetensors`).

Checkpoints are read with ``torch.load(..., weights_only=True)``, exports by safetensors:
neither can run code.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import pickle
import posixpath
import re
import zipfile
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, TypeVar

from colorcore import weights
from colorcore.model import ColorizationNet
from jobs import storage

if TYPE_CHECKING:
    from colorcore.int8 import AbError, Int8ColorizationNet

CHECKPOINT_FILE = "checkpoint.pt"
CHECKPOINT_DIR_PREFIX = "checkpoint_"

ModelKind = Literal["released", "checkpoint", "run", "export"]
TORN = (RuntimeError, EOFError, ValueError, KeyError, pickle.UnpicklingError)
"""What loading a checkpoint file cut short raises (torch's zip reader: RuntimeError)."""
ZIP_END_RECORD_BYTES = 22  # the shortest zip file: its end of central directory record alone
T = TypeVar("T")

log = logging.getLogger(__name__)


CHECKPOINT_DIR = re.compile(rf"{CHECKPOINT_DIR_PREFIX}(\d+)(?:\.([1-9]\d*))?")


def checkpoint_dir_name(step: int, taken: Collection[str] = ()) -> str:
    """The folder of the run's checkpoint at `step`: ``checkpoint_<step>``, or where that
    name is `taken` (a checkpoint the run resumed before, as it did not load, or one Ray's
    record of the run names, cut short by a crash and removed) the first
    ``checkpoint_<step>.<n>`` that is not. The same name twice would make Ray's
    keep-last-K, dropping the older checkpoint of the two, delete the newer one's files."""
    name = f"{CHECKPOINT_DIR_PREFIX}{step:09d}"
    again = 0
    while (found := f"{name}.{again}" if again else name) in taken:
        again += 1
    return found


@dataclass(frozen=True)
class LoadedModel:
    model: ColorizationNet
    kind: ModelKind
    url: str
    """The file the weights came from (for a run folder: its latest checkpoint)."""
    sha256: str
    """Hex SHA-256 of that file (provenance for outputs)."""
    checkpoint: weights.Checkpoint | None = None


def checkpoint_step(url: str) -> int:
    """The step of a run folder's checkpoint file, from its folder's name."""
    return _checkpoint_order(checkpoint_folder(url))[0]


def _checkpoint_order(folder: str) -> tuple[int, int]:
    """(step, n) of a folder named by `checkpoint_dir_name`: later checkpoints sort after."""
    found = CHECKPOINT_DIR.fullmatch(folder)
    if found is None:
        raise ValueError(f"{folder} is not named as a checkpoint folder")
    return int(found[1]), int(found[2] or 0)


def checkpoint_files(run_url: str, s3: storage.S3Options | None = None) -> list[str]:
    """URLs of the checkpoint files of a training run folder, oldest first: its own
    ``checkpoint_<step>/checkpoint.pt``, not those of runs in folders below it."""
    if not storage.exists(run_url, s3):
        return []
    root = storage.split_url(run_url)[1].rstrip("/")
    found = []
    for url in storage.list_files(run_url, s3, suffix="/" + CHECKPOINT_FILE):
        folder = posixpath.dirname(storage.split_url(url)[1])
        if posixpath.dirname(folder) == root and CHECKPOINT_DIR.fullmatch(
            posixpath.basename(folder)
        ):
            found.append(url)
    return sorted(found, key=lambda u: _checkpoint_order(checkpoint_folder(u)))


def torn(url: str, s3: storage.S3Options | None = None) -> bool:
    """Whether a checkpoint file was cut short, as a crash while it is copied leaves one:
    its zip directory, at the end of the file, is missing. Reads that directory only."""
    fs, path = storage.filesystem(url, s3)

    def check() -> bool:
        with fs.open(path, "rb", block_size=1 << 16) as f:  # ranged reads, not read-ahead
            if f.seek(0, os.SEEK_END) < ZIP_END_RECORD_BYTES:  # fsspec would not seek before 0
                return True
            try:
                zipfile.ZipFile(f).close()
            except zipfile.BadZipFile:
                return True
        return False

    return storage.with_retries(check, what=f"read {url}")


def remove_torn(run_url: str, s3: storage.S3Options | None = None) -> list[str]:
    """Delete the run folder's torn checkpoint files (`torn`), which hold nothing to resume
    from; returns their URLs. Checkpoints that are whole but do not load are kept: the fault
    may be this version's (a file a newer one wrote), not theirs."""
    found = [url for url in checkpoint_files(run_url, s3) if torn(url, s3)]
    for url in found:
        log.warning("removing checkpoint %s: it was cut short (by a crash while written)", url)
    storage.remove(found, s3)
    return found


RAY_CHECKPOINT_RECORD = "checkpoint_manager_snapshot.json"
"""Ray Train's record of a run's checkpoints, in its run folder: those its keep-last-K
deletes in turn."""


def remove_unrecorded(run_url: str, keep: int, s3: storage.S3Options | None = None) -> list[str]:
    """Delete the run folder's checkpoints older than its newest `keep` that Ray's record of
    the run (`RAY_CHECKPOINT_RECORD`) does not hold, and so would never delete: a driver
    killed between a checkpoint's upload and its record leaves one. Returns their URLs;
    none where the record is missing or does not read (another Ray version's layout), and
    those left where the storage refuses (with a warning: the run is done all the same)."""
    try:
        recorded = recorded_checkpoints(run_url, s3)
    except UNREAD_RECORD as error:
        log.warning("%s: Ray's record of its checkpoints does not read (%s: %s); none of "
                    "them is removed", run_url, type(error).__name__, error)  # fmt: skip
        return []
    removed = []
    try:  # a clean-up: a storage that refuses it leaves them to the next run's
        files = checkpoint_files(run_url, s3)
        older = files[: max(0, len(files) - keep)]
        for url in [url for url in older if checkpoint_folder(url) not in recorded]:
            log.warning(
                "removing checkpoint %s: Ray never recorded it (its driver was killed as it "
                "was written), and %d newer ones are kept", url, keep,
            )  # fmt: skip
            folder = url.rsplit("/", 1)[0]
            storage.remove(storage.list_files(folder, s3), s3)
            if storage.is_local(folder):
                with contextlib.suppress(OSError):  # emptied: a folder of its own no more
                    os.rmdir(storage.split_url(folder)[1])
            removed.append(url)
    except Exception as error:
        log.warning("%s: checkpoints Ray never recorded are left (%s: %s)", run_url,
                    type(error).__name__, error)  # fmt: skip
    return removed


# What `recorded_checkpoints` raises where Ray has no record of the run (FileNotFoundError)
# or one this version does not read (another Ray version's layout)
UNREAD_RECORD = (FileNotFoundError, KeyError, TypeError, ValueError)


def recorded_checkpoints(run_url: str, s3: storage.S3Options | None = None) -> set[str]:
    """The checkpoint folders Ray's record of the run (`RAY_CHECKPOINT_RECORD`) names, which
    its keep-last-K deletes in turn, whatever they hold by then; `UNREAD_RECORD` where
    there is none that reads."""
    record = json.loads(storage.read_bytes(storage.join(run_url, RAY_CHECKPOINT_RECORD), s3))
    results = [*record["checkpoint_results"], *record.get("pending_training_results", [])]
    if record.get("latest_checkpoint_result"):
        results.append(record["latest_checkpoint_result"])
    return {r["checkpoint_dir_name"] for r in results}


def checkpoint_folder(url: str) -> str:
    """The name of a checkpoint file's folder (``checkpoint_<step>``)."""
    return url.rsplit("/", 2)[-2]


def newest_loadable(
    run_url: str, s3: storage.S3Options | None, load: Callable[[bytes], T]
) -> tuple[str, bytes, T] | None:
    """(URL, bytes, `load` of them) of the newest checkpoint in the run folder that loads;
    one torn by a crash is passed over, with a warning. None for a folder without
    checkpoints; an error when there are some and none loads."""
    urls = checkpoint_files(run_url, s3)
    for url in reversed(urls):
        data = storage.read_bytes(url, s3)  # storage that cannot be read: raised
        try:
            return url, data, load(data)
        except TORN as error:
            log.warning("skipping unreadable checkpoint %s: %s", url, error)
    if urls:
        raise RuntimeError(f"none of the {len(urls)} checkpoints in {run_url} loads")
    return None


def _is_dir(url: str, s3: storage.S3Options | None) -> bool:
    fs, path = storage.filesystem(url, s3)
    return storage.with_retries(lambda: fs.isdir(path), what=f"stat {url}")


def load_model(
    url: str, s3: storage.S3Options | None = None, sha256: str | None = None
) -> LoadedModel:
    """Load whatever `url` names (see the module docstring) as a `ColorizationNet` on CPU.
    With `sha256` (what a job's driver read from `url`), a file that hashes otherwise is
    refused: a job's workers then run the very model its driver checked."""
    loaded = _load_model(url, s3)
    if sha256 and loaded.sha256 != sha256:
        raise RuntimeError(
            f"the model {url} changed since the job started: sha256 {loaded.sha256[:12]}, "
            f"not {sha256[:12]}"
        )
    return loaded


def int8_model(
    model: ColorizationNet, temperature: float, job: str
) -> tuple[Int8ColorizationNet, AbError]:
    """`model` (eval mode) in int8 (`colorcore.int8.quantize`, the logits conv in bf16 where
    the CPU has bf16 units) and what int8 costs its colours on the calibration photos at
    `temperature`, which `job` prints."""
    from colorcore.int8 import quantize
    from jobs.runtime import choose_precision

    float_dtype = choose_precision("cpu", "int8").autocast_dtype
    int8, error = quantize(model, float_dtype=float_dtype, temperature=temperature)
    print(f"{job}: int8 moves the colours of the calibration photos by {error} ab units")
    return int8, error


def _load_model(url: str, s3: storage.S3Options | None) -> LoadedModel:
    kind: ModelKind = "checkpoint"
    if _is_dir(url, s3):
        read = lambda data: weights.load_weights_file(io.BytesIO(data))  # noqa: E731
        found = newest_loadable(url, s3, read)
        if found is None:
            raise ValueError(f"{url} holds no {CHECKPOINT_DIR_PREFIX}*/{CHECKPOINT_FILE}")
        url, data, obj = found
        kind = "run"
    elif not storage.exists(url, s3):
        raise ValueError(f"--model {url}: no such file or folder")
    else:
        data = storage.read_bytes(url, s3)
        if weights.is_safetensors(data):
            model = weights.model_from_safetensors(data)
            return LoadedModel(model, "export", url, hashlib.sha256(data).hexdigest())
        obj = weights.load_weights_file(io.BytesIO(data))
    digest = hashlib.sha256(data).hexdigest()
    if weights.is_checkpoint(obj):
        ckpt = weights.checkpoint_from_object(obj)
        return LoadedModel(ckpt.build_model(), kind, url, digest, ckpt)
    if weights.is_released_state_dict(obj):
        return LoadedModel(weights.model_from_released_state_dict(obj), "released", url, digest)
    raise ValueError(
        f"--model {url}: neither a project checkpoint or export nor released ECCV16 weights"
    )

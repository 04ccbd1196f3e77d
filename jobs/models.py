"""The ``--model URL`` convention shared by every job that loads a model.

A URL (local path, ``s3://``, ``gs://``) names one of, detected automatically:

- the authors' released ECCV16 weights (``colorization_release_v2-9b330a0b.pth``);
- a project checkpoint file (`colorcore.weights.save_checkpoint`);
- a training run folder: its latest checkpoint, ``<run>/checkpoint_<step>/checkpoint.pt``
  with zero-padded steps, so that the last name in sorted order is the latest.

Every file is read with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from typing import Literal

from colorcore import weights
from colorcore.model import ColorizationNet
from jobs import storage

CHECKPOINT_FILE = "checkpoint.pt"
CHECKPOINT_DIR_PREFIX = "checkpoint_"

ModelKind = Literal["released", "checkpoint", "run"]


def checkpoint_dir_name(step: int) -> str:
    return f"{CHECKPOINT_DIR_PREFIX}{step:09d}"


@dataclass(frozen=True)
class LoadedModel:
    model: ColorizationNet
    kind: ModelKind
    url: str
    """The file the weights came from (for a run folder: its latest checkpoint)."""
    sha256: str
    """Hex SHA-256 of that file (provenance for outputs)."""
    checkpoint: weights.Checkpoint | None = None


def checkpoint_files(run_url: str, s3: storage.S3Options | None = None) -> list[str]:
    """URLs of the checkpoint files in a training run folder, oldest first."""
    if not storage.exists(run_url, s3):
        return []
    found = [
        u
        for u in storage.list_files(run_url, s3, suffix="/" + CHECKPOINT_FILE)
        if u.rsplit("/", 2)[-2].startswith(CHECKPOINT_DIR_PREFIX)
    ]
    return sorted(found, key=lambda u: u.rsplit("/", 2)[-2])


def latest_checkpoint(run_url: str, s3: storage.S3Options | None = None) -> str:
    """URL of the latest checkpoint file in a training run folder."""
    found = checkpoint_files(run_url, s3)
    if not found:
        raise ValueError(f"{run_url} holds no {CHECKPOINT_DIR_PREFIX}*/{CHECKPOINT_FILE}")
    return found[-1]


def _is_dir(url: str, s3: storage.S3Options | None) -> bool:
    fs, path = storage.filesystem(url, s3)
    return storage.with_retries(lambda: fs.isdir(path), what=f"stat {url}")


def load_model(url: str, s3: storage.S3Options | None = None) -> LoadedModel:
    """Load whatever `url` names (see the module docstring) as a `ColorizationNet` on CPU."""
    kind: ModelKind = "checkpoint"
    if _is_dir(url, s3):
        url, kind = latest_checkpoint(url, s3), "run"
    elif not storage.exists(url, s3):
        raise ValueError(f"--model {url}: no such file or folder")
    data = storage.read_bytes(url, s3)
    digest = hashlib.sha256(data).hexdigest()

    obj = weights.load_weights_file(io.BytesIO(data))
    if weights.is_checkpoint(obj):
        ckpt = weights.checkpoint_from_object(obj)
        return LoadedModel(ckpt.build_model(), kind, url, digest, ckpt)
    if weights.is_released_state_dict(obj):
        return LoadedModel(weights.model_from_released_state_dict(obj), "released", url, digest)
    raise ValueError(f"--model {url}: neither a project checkpoint nor released ECCV16 weights")

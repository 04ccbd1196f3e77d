"""Checkpoints of this project and the authors' released ECCV16 weights.

A project checkpoint is one file written by `torch.save` holding only tensors and plain
data, so `torch.load(..., weights_only=True)` reads it and nothing in it can run code:

    format        CHECKPOINT_FORMAT
    model_state   the model's state dict
    model_config  `ModelConfig` as a dict
    ab_bins       (313, 2) float32 bin centres the logits refer to
    prior_counts  (313,) int64 ab histogram of the training data, or None
    extra         plain data the writer adds (training state, resolved job config, ...)

Sources are local paths, binary file objects or fsspec URLs (``s3://...``).
"""

from __future__ import annotations

import dataclasses
import io
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import torch

from colorcore.model import AB_SCALE, ColorizationNet, ModelConfig
from colorcore.quantize import ab_bins

CHECKPOINT_FORMAT = "colorcore-checkpoint-v1"
RELEASED_ECCV16_FILE = "colorization_release_v2-9b330a0b.pth"
_READOUT_KEY = "model_out.weight"

Source = str | BinaryIO


@dataclass(frozen=True)
class Checkpoint:
    """The contents of a project checkpoint."""

    model_state: dict[str, torch.Tensor]
    model_config: ModelConfig
    ab_bins: torch.Tensor
    prior_counts: torch.Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def build_model(self) -> ColorizationNet:
        model = ColorizationNet(self.model_config)
        model.load_state_dict(self.model_state)
        return model


def _read(source: Source) -> bytes:
    if not isinstance(source, str):
        return source.read()
    import fsspec  # a URL scheme picks the filesystem; plain paths read locally

    with fsspec.open(source, "rb") as f:
        return f.read()


def load_weights_file(source: Source) -> Any:
    """`torch.load` with `weights_only=True`: a file that would run code is refused."""
    return torch.load(io.BytesIO(_read(source)), map_location="cpu", weights_only=True)


def save_checkpoint(
    destination: str | BinaryIO,
    model: torch.nn.Module,
    *,
    prior_counts: torch.Tensor | None = None,
    extra: Mapping[str, Any] | None = None,
) -> None:
    """Write `model` (a `ColorizationNet`, possibly wrapped by DDP or compile) as a checkpoint."""
    net = _unwrap(model)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "model_state": {k: v.detach().cpu() for k, v in net.state_dict().items()},
        "model_config": dataclasses.asdict(net.config),
        "ab_bins": ab_bins(),
        "prior_counts": None if prior_counts is None else prior_counts.detach().cpu(),
        "extra": dict(extra or {}),
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    if isinstance(destination, str):
        import fsspec

        with fsspec.open(destination, "wb") as f:
            f.write(buffer.getvalue())
    else:
        destination.write(buffer.getvalue())


def _unwrap(model: torch.nn.Module) -> ColorizationNet:
    while not isinstance(model, ColorizationNet):
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            raise ValueError(f"expected a ColorizationNet, got {type(model).__name__}")
        model = inner
    return model


def is_checkpoint(obj: Any) -> bool:
    return isinstance(obj, Mapping) and obj.get("format") == CHECKPOINT_FORMAT


def is_released_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and _READOUT_KEY in obj and "model1.0.weight" in obj


def checkpoint_from_object(obj: Any) -> Checkpoint:
    if not is_checkpoint(obj):
        raise ValueError("not a colorcore checkpoint (no matching 'format' entry)")
    _check_bins(obj["ab_bins"], "the checkpoint's ab bins")
    _check_readout(obj["model_state"])
    return Checkpoint(
        model_state=obj["model_state"],
        model_config=_model_config(obj["model_config"]),
        ab_bins=obj["ab_bins"],
        prior_counts=obj["prior_counts"],
        extra=obj["extra"],
    )


def _model_config(fields: Mapping[str, Any]) -> ModelConfig:
    """The `ModelConfig` a file states; a ValueError where it names fields this version does
    not know (a newer version's file), as for any other file that is not one of ours."""
    if not isinstance(fields, Mapping):
        raise ValueError(f"model_config is not a mapping: {type(fields).__name__}")
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    if unknown := sorted(set(fields) - known):
        raise ValueError(f"model_config has fields this version does not know: {unknown}")
    return ModelConfig(**fields)


SAFETENSORS_FORMAT = "colorcore-eccv16"


def to_safetensors(model: torch.nn.Module) -> bytes:
    """`model`'s weights as a safetensors file, with its `ModelConfig` in the metadata: a
    file for distribution, which loads without running code (`model_from_safetensors`)."""
    from safetensors.torch import save

    net = _unwrap(model)
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    config = json.dumps(dataclasses.asdict(net.config))
    return save(state, metadata={"format": SAFETENSORS_FORMAT, "model_config": config})


def _safetensors_header_size(data: bytes) -> int:
    return int.from_bytes(data[:8], "little")  # a safetensors file starts with it


def is_safetensors(data: bytes) -> bool:
    """Whether `data` starts as a safetensors file does: a little-endian header length,
    then that many bytes of JSON."""
    if len(data) < 10:
        return False
    return 2 <= _safetensors_header_size(data) <= len(data) - 8 and data[8:9] == b"{"


def model_from_safetensors(data: bytes) -> ColorizationNet:
    """The network a `to_safetensors` file holds, built from its metadata's config."""
    from safetensors.torch import load

    header = json.loads(data[8 : 8 + _safetensors_header_size(data)])
    metadata = header.get("__metadata__") or {}
    if metadata.get("format") != SAFETENSORS_FORMAT:
        raise ValueError(
            f"not a {SAFETENSORS_FORMAT} safetensors file (format {metadata.get('format')!r})"
        )
    model = ColorizationNet(_model_config(json.loads(metadata["model_config"])))
    state = load(data)
    _check_readout(state)
    model.load_state_dict(state)
    return model


def load_checkpoint(source: Source) -> Checkpoint:
    """Read a checkpoint written by `save_checkpoint`."""
    return checkpoint_from_object(load_weights_file(source))


def model_from_released_state_dict(state: Mapping[str, torch.Tensor]) -> ColorizationNet:
    """Build the full-width network from the authors' state dict, checking its ab readout."""
    _check_readout(state)
    model = ColorizationNet(ModelConfig())
    model.load_state_dict(dict(state))
    return model


def _check_readout(state: Mapping[str, torch.Tensor]) -> None:
    """The fixed 1x1 conv that reads ab out of the 313 bins' probabilities must hold them:
    the logits of weights with another one do not mean these bins."""
    readout = state.get(_READOUT_KEY)
    if readout is None or readout.numel() != 2 * len(ab_bins()):
        raise ValueError("the weights have no ab readout of the 313 ab bins")
    # bins / 110 held at the weights' own precision (bf16 keeps 8 bits: 0.2 of a at 100),
    # wherever they are (a state dict of a model on a GPU)
    atol = max(1e-3, AB_SCALE * torch.finfo(readout.dtype).eps)
    bins = readout.detach().to("cpu", torch.float64).reshape(2, -1).T * AB_SCALE
    _check_bins(bins, "the weights' ab readout", atol=atol)


def _check_bins(bins: Any, what: str, *, atol: float = 1e-3) -> None:
    expected = ab_bins()
    if not (
        isinstance(bins, torch.Tensor)
        and bins.shape == expected.shape
        and torch.allclose(bins.cpu().double(), expected.double(), atol=atol)
    ):
        raise ValueError(f"{what} do not match the 313 ab bins")


def load_released_eccv16(source: Source) -> ColorizationNet:
    """The authors' released ECCV16 weights (`colorization_release_v2-9b330a0b.pth`).

    The released forward pass applies softmax to the logits of `model8.6` with no
    temperature and returns the mean (T = 1); the Caffe deploy net scaled those same logits
    by 2.606 (T = 0.384) before its softmax. `colorcore.decode` applies T to these logits.
    """
    state = load_weights_file(source)
    if not is_released_state_dict(state):
        raise ValueError("not a released ECCV16 state dict (expected keys 'model1.0.weight', ...)")
    return model_from_released_state_dict(state)

"""Checkpoints, the released ECCV16 weights and the --model URL convention."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle

import pytest
import torch
import torch.nn.functional as F

from colorcore import weights
from colorcore.model import AB_SCALE, ColorizationNet, ModelConfig
from colorcore.quantize import ab_bins
from jobs import storage
from jobs.models import (
    CHECKPOINT_FILE,
    checkpoint_dir_name,
    checkpoint_files,
    checkpoint_step,
    load_model,
    remove_torn,
)

TINY = ModelConfig(width=1 / 16)


def released_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict in the released file's layout with random values (BN statistics too)."""
    torch.manual_seed(seed)
    state = ColorizationNet().state_dict()
    out = {}
    for key, value in state.items():
        if key == "model_out.weight":
            out[key] = value.clone()
        elif key.endswith("running_var"):
            out[key] = torch.rand_like(value) + 0.5
        elif value.is_floating_point():
            fan_in = value[0].numel() if value.ndim > 1 else 1
            out[key] = torch.randn_like(value) / fan_in**0.5
        else:
            out[key] = value
    return out


def released_forward(state: dict[str, torch.Tensor], l_N1HW: torch.Tensor) -> torch.Tensor:
    """The released eval-mode forward restated with functional ops, up to the 313 logits."""
    x = (l_N1HW - 50.0) / 100.0
    plan = {
        1: (2, 2, 1),
        2: (2, 2, 1),
        3: (3, 2, 1),
        4: (3, 1, 1),
        5: (3, 1, 2),
        6: (3, 1, 2),
        7: (3, 1, 1),
    }
    for block, (convs, stride, dil) in plan.items():
        for i in range(convs):
            w, b = state[f"model{block}.{2 * i}.weight"], state[f"model{block}.{2 * i}.bias"]
            s = stride if i == convs - 1 else 1
            x = F.relu(F.conv2d(x, w, b, stride=s, padding=dil, dilation=dil))
        bn = f"model{block}.{2 * convs}"
        x = F.batch_norm(
            x,
            state[f"{bn}.running_mean"],
            state[f"{bn}.running_var"],
            state[f"{bn}.weight"],
            state[f"{bn}.bias"],
            training=False,
            eps=1e-5,
        )
    x = F.relu(F.conv_transpose2d(x, state["model8.0.weight"], state["model8.0.bias"], 2, 1))
    x = F.relu(F.conv2d(x, state["model8.2.weight"], state["model8.2.bias"], padding=1))
    x = F.relu(F.conv2d(x, state["model8.4.weight"], state["model8.4.bias"], padding=1))
    return F.conv2d(x, state["model8.6.weight"], state["model8.6.bias"])


def test_released_weights_load_and_match_an_independent_forward(tmp_path) -> None:
    state = released_state_dict()
    path = tmp_path / weights.RELEASED_ECCV16_FILE
    torch.save(state, path)
    model = weights.load_released_eccv16(str(path)).eval()
    l_in = torch.rand(1, 1, 64, 64, dtype=torch.float64) * 100
    with torch.no_grad():
        ours = model.double()(l_in)
    expected = released_forward(
        {k: v.double() if v.is_floating_point() else v for k, v in state.items()}, l_in
    )
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    # the released readout: mean of the bins under softmax (T = 1), times 110
    ab = torch.einsum("nqhw,qc->nchw", ours.softmax(1), ab_bins().double())
    readout = F.conv2d(ours.softmax(1), state["model_out.weight"].double()) * AB_SCALE
    torch.testing.assert_close(ab, readout)


def test_released_loader_checks_the_readout(tmp_path) -> None:
    state = released_state_dict()
    # weights kept in bf16 hold the readout to 8 bits, and still mean the 313 bins
    half = {k: v.bfloat16() if v.is_floating_point() else v for k, v in state.items()}
    torch.save(half, tmp_path / "bf16.pth")
    model = weights.load_released_eccv16(str(tmp_path / "bf16.pth"))
    assert torch.equal(model.state_dict()["model1.0.weight"], half["model1.0.weight"].float())
    for kept in (state, half):
        kept["model_out.weight"] = kept["model_out.weight"].flip(1)
        torch.save(kept, tmp_path / "bad.pth")
        with pytest.raises(ValueError, match="ab readout"):
            weights.load_released_eccv16(str(tmp_path / "bad.pth"))


def test_checkpoint_round_trip() -> None:
    torch.manual_seed(1)
    model = ColorizationNet(TINY)
    counts = torch.arange(313, dtype=torch.int64)
    buffer = io.BytesIO()
    weights.save_checkpoint(
        buffer, model, prior_counts=counts, extra={"step": 7, "cfg": {"lr": 1.0}}
    )
    ckpt = weights.load_checkpoint(io.BytesIO(buffer.getvalue()))
    assert ckpt.model_config == TINY
    assert torch.equal(ckpt.prior_counts, counts) and torch.equal(ckpt.ab_bins, ab_bins())
    assert ckpt.extra == {"step": 7, "cfg": {"lr": 1.0}}
    rebuilt = ckpt.build_model()
    for (k, a), (_, b) in zip(
        model.state_dict().items(), rebuilt.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), k
    # A newer version's checkpoint, of a field this one does not know: refused as a file
    # that does not load (ValueError), which a resume passes over for an older checkpoint
    newer = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    newer["model_config"]["attention"] = True
    buffer = io.BytesIO()
    torch.save(newer, buffer)
    with pytest.raises(ValueError, match=r"fields this version does not know: \['attention'\]"):
        weights.load_checkpoint(io.BytesIO(buffer.getvalue()))


def test_checkpoints_and_exports_must_mean_the_313_bins() -> None:
    """A file whose logits refer to other bins (its stored bin table, or the readout conv in
    its weights) is refused: its colours would be wrong without a word."""
    from safetensors.torch import load, save

    model = ColorizationNet(TINY)
    buffer = io.BytesIO()
    weights.save_checkpoint(buffer, model)
    good = weights.load_weights_file(io.BytesIO(buffer.getvalue()))
    other_bins = dict(good, ab_bins=good["ab_bins"].flip(0))
    with pytest.raises(ValueError, match="checkpoint's ab bins do not match"):
        weights.checkpoint_from_object(other_bins)
    state = dict(good["model_state"], **{"model_out.weight": torch.zeros(2, 313, 1, 1)})
    with pytest.raises(ValueError, match="ab readout do not match"):
        weights.checkpoint_from_object(dict(good, model_state=state))
    export = weights.to_safetensors(model)
    header = json.loads(export[8 : 8 + int.from_bytes(export[:8], "little")])
    tensors = load(export) | {"model_out.weight": torch.zeros(2, 313, 1, 1)}
    broken = save(tensors, metadata=header["__metadata__"])
    with pytest.raises(ValueError, match="ab readout do not match"):
        weights.model_from_safetensors(broken)
    weights.model_from_safetensors(export)  # as written


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_loading_refuses_a_pickle_that_would_run_code() -> None:
    buffer = io.BytesIO()
    torch.save({"format": weights.CHECKPOINT_FORMAT, "payload": _RunsCode()}, buffer)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        weights.load_checkpoint(io.BytesIO(buffer.getvalue()))


@pytest.fixture(params=["local", "s3"])
def model_root(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path)
    return request.getfixturevalue("s3_server").url("model-detection")


def test_model_url_detects_all_three_forms(model_root) -> None:
    released = storage.join(model_root, weights.RELEASED_ECCV16_FILE)
    buffer = io.BytesIO()
    torch.save(released_state_dict(), buffer)
    storage.write_bytes(released, buffer.getvalue())

    run = storage.join(model_root, "run")
    models = {}
    for step in (5, 20, 100):  # 100 is the latest although "…100" < "…20" as plain strings
        torch.manual_seed(step)
        models[step] = ColorizationNet(TINY)
        buffer = io.BytesIO()
        weights.save_checkpoint(buffer, models[step], extra={"step": step})
        storage.write_bytes(
            storage.join(run, checkpoint_dir_name(step), CHECKPOINT_FILE), buffer.getvalue()
        )
    storage.write_bytes(storage.join(run, "metrics.csv"), b"step,loss\n")

    def sha256(url: str) -> str:  # what jobs compare to refuse a model changed mid-run
        return hashlib.sha256(storage.read_bytes(url)).hexdigest()

    loaded = load_model(released)
    assert loaded.kind == "released" and loaded.model.config == ModelConfig()
    assert loaded.sha256 == sha256(released)

    single = storage.join(run, checkpoint_dir_name(20), CHECKPOINT_FILE)
    loaded = load_model(single)
    assert loaded.kind == "checkpoint" and loaded.checkpoint.extra == {"step": 20}
    assert loaded.sha256 == sha256(single)

    assert checkpoint_files(run)[-1].endswith(f"{checkpoint_dir_name(100)}/{CHECKPOINT_FILE}")
    loaded = load_model(run)
    assert loaded.kind == "run" and loaded.checkpoint.extra == {"step": 100}
    torch.testing.assert_close(loaded.model.model1[0].weight, models[100].model1[0].weight)

    # A run below this one (a search's trial) is not this run's; a torn newest file is
    # passed over for the one before it.
    trial = storage.join(run, "trials", "t1", checkpoint_dir_name(900), CHECKPOINT_FILE)
    storage.write_bytes(trial, storage.read_bytes(single))
    storage.write_bytes(
        storage.join(run, checkpoint_dir_name(200), CHECKPOINT_FILE), buffer.getvalue()[:1000]
    )
    assert len(checkpoint_files(run)) == 4
    loaded = load_model(run)
    assert loaded.checkpoint.extra == {"step": 100}
    assert loaded.url.endswith(f"{checkpoint_dir_name(100)}/{CHECKPOINT_FILE}")
    assert loaded.sha256 == sha256(loaded.url)  # step 100's, not the torn newest file's
    with pytest.raises(ValueError, match="holds no checkpoint_"):
        load_model(model_root)  # the runs' parent is no run


def test_a_step_checkpointed_again_sorts_after_its_first_checkpoint(tmp_path) -> None:
    """A resumed run names a step's checkpoint apart from one it could not load; the run
    folder's order stays the order the checkpoints were written in, past ten of them too."""
    run = tmp_path / "run"
    again = [checkpoint_dir_name(20)]
    for _ in range(11):
        again.append(checkpoint_dir_name(20, again))
    assert again[1] == "checkpoint_000000020.1" and again[-1] == "checkpoint_000000020.11"
    names = [checkpoint_dir_name(100), *reversed(again), checkpoint_dir_name(5)]
    for name in [*names, "checkpoint_000000020.0", "checkpoint_notes", "checkpoint_7.x"]:
        (run / name).mkdir(parents=True)
        (run / name / CHECKPOINT_FILE).write_bytes(b"PK")
    files = checkpoint_files(str(run))
    assert [u.rsplit("/", 2)[-2] for u in files] == [checkpoint_dir_name(5), *again, names[0]]
    assert [checkpoint_step(u) for u in files] == [5] + [20] * 12 + [100]


def test_checkpoints_ray_never_recorded_are_removed_beyond_the_newest_kept(model_root) -> None:
    """Older than the newest K and missing from Ray's record: removed (Ray would never);
    recorded ones are Ray's to delete; with no readable record, nothing is removed."""
    from jobs.models import RAY_CHECKPOINT_RECORD, remove_unrecorded

    run = storage.join(model_root, "unrecorded")
    for step in (5, 10, 20, 30):
        storage.write_bytes(storage.join(run, checkpoint_dir_name(step), CHECKPOINT_FILE), b"PK")
    record = storage.join(run, RAY_CHECKPOINT_RECORD)
    assert remove_unrecorded(run, 2) == []  # no record yet
    storage.write_bytes(record, b'{"checkpoint_results": [')  # cut short
    assert remove_unrecorded(run, 2) == []
    names = [{"checkpoint_dir_name": checkpoint_dir_name(s), "metrics": {}} for s in (10, 30)]
    storage.write_bytes(record, json.dumps({"checkpoint_results": names}).encode())
    assert remove_unrecorded(run, 4) == []  # all four kept
    [removed] = remove_unrecorded(run, 2)  # 20 is among the newest 2; 10 is recorded
    assert removed.endswith(f"{checkpoint_dir_name(5)}/{CHECKPOINT_FILE}")
    [removed] = remove_unrecorded(run, 1)
    assert removed.endswith(f"{checkpoint_dir_name(20)}/{CHECKPOINT_FILE}")
    left = [u.rsplit("/", 2)[-2] for u in checkpoint_files(run)]
    assert left == [checkpoint_dir_name(s) for s in (10, 30)]


def test_only_checkpoints_cut_short_are_removed(model_root) -> None:
    import zipfile

    run = storage.join(model_root, "torn-run")
    buffer = io.BytesIO()
    weights.save_checkpoint(buffer, ColorizationNet(TINY), extra={"step": 10})
    whole = buffer.getvalue()
    other = io.BytesIO()
    with zipfile.ZipFile(other, "w") as z:
        z.writestr("notes.txt", "a zip, whole, that is not a checkpoint")
    files = {
        10: whole,
        20: other.getvalue(),  # does not load, but is no crash's doing: kept
        30: whole[:1000],
        40: whole[:-1],  # only the end of its zip directory missing
        50: b"",
    }
    for step, data in files.items():
        storage.write_bytes(storage.join(run, checkpoint_dir_name(step), CHECKPOINT_FILE), data)
    removed = remove_torn(run)
    assert [u.rsplit("/", 2)[-2] for u in removed] == [checkpoint_dir_name(s) for s in (30, 40, 50)]
    left = [u.rsplit("/", 2)[-2] for u in checkpoint_files(run)]
    assert left == [checkpoint_dir_name(10), checkpoint_dir_name(20)]
    assert remove_torn(run) == []


def test_a_safetensors_export_loads_back_with_its_config(tmp_path) -> None:
    config = ModelConfig(width=1 / 16, bn_moving_average=0.9)
    torch.manual_seed(3)
    model = ColorizationNet(config)
    model.train()(torch.rand(2, 1, 32, 32) * 100)  # running statistics of their own
    path = tmp_path / "model.safetensors"
    path.write_bytes(weights.to_safetensors(model))
    loaded = load_model(str(path))
    assert loaded.kind == "export" and loaded.model.config == config
    x = torch.rand(1, 1, 32, 32) * 100
    torch.testing.assert_close(loaded.model.eval()(x), model.eval()(x))
    other = tmp_path / "other.safetensors"
    from safetensors.torch import save

    other.write_bytes(save({"w": torch.zeros(2)}, metadata={"format": "someone-else"}))
    with pytest.raises(ValueError, match="not a colorcore-eccv16 safetensors file"):
        load_model(str(other))


def test_model_url_errors_are_clear(tmp_path) -> None:
    with pytest.raises(ValueError, match="no such file or folder"):
        load_model(str(tmp_path / "absent.pt"))
    (tmp_path / "empty_run").mkdir()
    with pytest.raises(ValueError, match="holds no checkpoint_"):
        load_model(str(tmp_path / "empty_run"))
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="neither a project checkpoint or export nor released"):
        load_model(str(tmp_path / "other.pt"))

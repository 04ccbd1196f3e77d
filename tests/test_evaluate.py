"""The evaluation job: exact figures on constructed images, split lists, and two runs on a
local Ray instance against S3 (the `ci` model on its held-out dataset; a folder of held-out
synthetic scenes with a split list, bad inputs and a classifier trained here)."""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import io
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

import colorcore.int8
from colorcore import metrics
from colorcore.color import lab_to_rgb, rgb_to_lab
from colorcore.int8 import Int8ColorizationNet
from colorcore.model import ColorizationNet, ModelConfig
from colorcore.prior import rebalance_weights
from colorcore.quantize import SOFT_ENCODE_K, SOFT_ENCODE_SIGMA
from jobs import evaluate, evaluate_parts, runtime, storage, synthetic
from jobs.config import parse_config
from jobs.dataset import Manifest
from jobs.models import load_model
from tests.support import encode, photo_rgb, reference_path

MAX = metrics.AUC_MAX_DIST
COLORIZED_MARGIN = 0.10  # colorized top-1 may trail gray by at most this on 36 images


def _closed_form_auc(error: float) -> float:
    """Constant per-pixel error: the curve steps from 0 to 1 at ceil(error)."""
    step = math.ceil(error)
    return (MAX - step + (0.5 if step > 0 else 0.0)) / MAX


def _reference_rebalance0() -> torch.Tensor:
    prior = np.load(reference_path("prior_probs.npy"), allow_pickle=False)
    return rebalance_weights(prior, lam=0.0).float()


def test_rows_are_exact_on_constructed_images() -> None:
    """Uniform colour images: every row's error is one known constant per image."""
    rgb_N3HW = torch.tensor([[0.8, 0.3, 0.2], [0.2, 0.5, 0.7]]).reshape(2, 3, 1, 1)
    rgb_N3HW = rgb_N3HW.expand(-1, -1, 16, 24).contiguous()
    ab_N2 = rgb_to_lab(rgb_N3HW)[:, 1:, 0, 0]
    # constant errors away from integers: upsampling may move a value by float rounding
    offsets = {"annealed_mean": (1.5, 0.0), "mean": (0.0, 2.5), "mode": (-3.5, 0.0)}
    ab_small = {
        m: (ab_N2 + torch.tensor(o))[:, :, None, None].expand(-1, -1, 4, 6)
        for m, o in offsets.items()
    }
    scores = evaluate.measure_images(rgb_N3HW, ab_small, rebalance0_Q=_reference_rebalance0())

    col = {m: i for i, m in enumerate(evaluate.METHODS)}
    gray_error_N = ab_N2.double().norm(dim=1)
    expected_gray = torch.tensor([_closed_form_auc(e) for e in gray_error_N.tolist()])
    torch.testing.assert_close(scores.auc_raw_NM[:, col["gray"]], expected_gray.double())
    for m, (a, b) in offsets.items():
        expected = _closed_form_auc(math.hypot(a, b))
        assert scores.auc_raw_NM[:, col[m]].tolist() == pytest.approx([expected] * 2, abs=1e-12)
    assert scores.auc_raw_NM[:, col["ground_truth"]].tolist() == [1.0, 1.0]
    # one error value per image: weighting the pixels cannot change the curve
    torch.testing.assert_close(scores.auc_rebalanced_NM, scores.auc_raw_NM)
    assert scores.curve_raw_NMT.shape == (2, len(evaluate.METHODS), MAX + 1)

    assert scores.psnr_db_NM[:, col["ground_truth"]].tolist() == [math.inf, math.inf]
    lab = rgb_to_lab(rgb_N3HW)
    gray_rgb = lab_to_rgb(torch.cat([lab[:, :1], torch.zeros_like(lab[:, 1:])], dim=1))
    mse_N = (gray_rgb.double() - rgb_N3HW.double()).square().mean((1, 2, 3))
    torch.testing.assert_close(scores.psnr_db_NM[:, col["gray"]], -10 * torch.log10(mse_N))


def test_the_loss_counts_near_gray_colour_photos_as_released() -> None:
    """The released loss layer only weights the gradient: a colour photo whose ab stays
    within 5 of gray still has its loss, in the evaluation and in training's validation."""
    torch.manual_seed(0)
    ctx = evaluate.EvalContext(
        cfg=evaluate.EvaluateConfig(data="d", model="m"),
        model=ColorizationNet(ModelConfig(width=1 / 16)).eval(),
        device=torch.device("cpu"),
        autocast_dtype=None,
        rebalance0_Q=torch.ones(313),
    )
    tinted = torch.tensor([126, 120, 116], dtype=torch.uint8)[:, None, None].expand(3, 64, 64)
    _, loss_N = evaluate._network(ctx, tinted[None].contiguous())
    assert loss_N.item() > 0
    # Training's validation reports the same loss (lambda = 1 weights are the ones here).
    from jobs.validation import validate

    held_out = validate(ctx.model, tinted[None].contiguous(), rebalance0_Q=torch.ones(313),
                        k=SOFT_ENCODE_K, sigma=SOFT_ENCODE_SIGMA)  # fmt: skip
    assert held_out.loss == pytest.approx(loss_N.item(), rel=1e-5)


def test_summary_means_only_measured_images_and_labelled_accuracy() -> None:
    M = len(evaluate.METHODS)
    rows = evaluate._empty_columns(4)
    rows["status"][:] = ["ok", "ok", "error", "grayscale"]
    rows["auc_raw"][:2] = [[1.0, 0.5, 0.7, 0.6, 0.4], [1.0, 0.3, 0.9, 0.8, 0.2]]
    rows["auc_rebalanced"][:2] = 0.25
    rows["mass_raw"][:2], rows["mass_rebalanced"][:2] = 100.0, [3.0, 1.0]
    rows["psnr_db"][:2] = [[math.inf, 20, 30, 30, 10], [math.inf, 20, math.inf, 30, 10]]
    rows["correct"][:2] = [[1] * M, [-1] * M]
    rows["correct"][2] = 0  # an unreadable input counts for nothing
    table = {r["method"]: r for r in evaluate.summarise(rows)}
    assert table["gray"]["auc_raw"] == pytest.approx(0.4)
    assert table["annealed_mean"]["auc_raw"] == pytest.approx(0.8)
    rows["auc_rebalanced"][:2, 1] = [0.5, 0.1]  # gray: pooled, the first image weighs 3 to 1
    table = {r["method"]: r for r in evaluate.summarise(rows)}
    assert table["gray"]["auc_rebalanced"] == pytest.approx((3 * 0.5 + 0.1) / 4)
    assert table["gray"]["auc_rebalanced_per_image"] == pytest.approx(0.3)
    assert table["ground_truth"]["psnr_db"] == math.inf
    assert table["mode"]["psnr_db"] == pytest.approx(10.0)
    assert table["annealed_mean"]["psnr_db"] == pytest.approx(30.0)  # exact image left out
    assert table["gray"]["top1"] == 1.0 and table["gray"]["top1_images"] == 1
    assert json.loads(json.dumps(evaluate._json_safe({"x": math.inf, "y": np.float64(2)}))) == {
        "x": None,
        "y": 2.0,
    }


def test_split_lists_parse_and_resolve_by_path_then_file_name(tmp_path) -> None:
    text = "/n01/ILSVRC2012_val_00000001.JPEG 3\n\nflat_00000002.JPEG\n/n02/gone.JPEG 7\n"
    entries = evaluate.read_split(text, "list.txt")
    assert entries == [
        ("n01/ILSVRC2012_val_00000001.JPEG", 3),
        ("flat_00000002.JPEG", -1),
        ("n02/gone.JPEG", 7),
    ]
    # spaces in a path followed by its label, as in prepare's label files
    assert evaluate.read_split("scans 1950/box 3.jpg  4 \n") == [("scans 1950/box 3.jpg", 4)]
    with pytest.raises(ValueError, match=r"list.txt:2"):
        evaluate.read_split("a.jpg 1\nb.jpg one\n", "list.txt")
    with pytest.raises(ValueError, match="no images"):
        evaluate.read_split("\n", "list.txt")
    files = [
        tmp_path / "n01" / "ILSVRC2012_val_00000001.JPEG",
        tmp_path / "x" / "flat_00000002.JPEG",
    ]
    repeat = ("ILSVRC2012_val_00000001.JPEG", 3)  # the first file again, by its name
    urls = [str(f) for f in files]
    again = [*entries, repeat, entries[-1]]  # and the missing one listed twice
    found, missing = evaluate.resolve_split(again, str(tmp_path), urls)
    assert [(f["url"], f["label"]) for f in found] == [(str(files[0]), 3), (str(files[1]), -1)]
    assert found[0]["key"] == "n01/ILSVRC2012_val_00000001.JPEG"
    # Two files of one name but for their extension are two inputs, with keys of their own.
    pair = [str(tmp_path / "p" / "x.jpg"), str(tmp_path / "p" / "x.png")]
    found, _ = evaluate.resolve_split([("p/x.jpg", 1), ("p/x.png", 2)], str(tmp_path), pair)
    assert [f["key"] for f in found] == ["p/x.jpg", "p/x.png"]
    assert missing == ["n02/gone.JPEG"]
    # A line whose file is not there does not take, by its name, a file another line
    # names by its path (with that line's label), in whichever order they come.
    classes = [str(tmp_path / "a" / "0001.jpg"), str(tmp_path / "c" / "0001.jpg")]
    lines = [("b/0001.jpg", 1), ("a/0001.jpg", 2)]
    for order in (lines, lines[::-1]):
        found, missing = evaluate.resolve_split(order, str(tmp_path), classes[:1])
        assert [(f["key"], f["label"]) for f in found] == [("a/0001.jpg", 2)]
        assert missing == ["b/0001.jpg"]
    with pytest.raises(ValueError, match=r"'b/0001.jpg' names 2 images .*a/0001.jpg, c/0001"):
        evaluate.resolve_split(lines[:1], str(tmp_path), classes)  # a or c: not known
    # A line by name only, of a name that lines name in two folders: which is not known
    with pytest.raises(ValueError, match=r"'0001.jpg' names 2 images"):
        evaluate.resolve_split([("0001.jpg", 1), ("a/0001.jpg", 2), ("c/0001.jpg", 3)],
                               str(tmp_path), classes)  # fmt: skip


def test_a_split_over_a_prepared_dataset_keeps_its_images_with_its_labels(tmp_path) -> None:
    """The listed stems are kept, labelled by the split (a dataset's labels index its own
    classes, not the classifier's), or by the dataset when the split has no labels at all;
    unlisted images are left out."""
    import pyarrow.parquet as pq

    from tests.support import write_dataset

    write_dataset(str(tmp_path / "ds"))
    split = tmp_path / "split.txt"
    split.write_text("val/001.JPEG 7\n004.JPEG\nval/gone.JPEG 3\n001.JPEG 2\n")
    cfg = evaluate.EvaluateConfig(data=str(tmp_path / "ds"), model="m", split=str(split))
    plan = evaluate.plan_inputs(cfg)
    assert plan.split_labels == {"c/001": 7, "c/004": evaluate.NO_LABEL}  # the first line's
    assert plan.missing == ["val/gone.JPEG"] and (plan.listed, plan.repeated) == (3, 1)
    table = pq.read_table(plan.shard_paths[0], columns=["key", "label", "jpeg"])
    batch = {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}
    kept = evaluate._keep_listed(batch, plan.split_labels)
    assert kept["key"].tolist() == ["c/001", "c/004"]
    assert kept["label"].tolist() == [7, evaluate.NO_LABEL]

    split.write_text("001.JPEG\n004.JPEG\n")  # no labels: the dataset's (n % 2)
    plan = evaluate.plan_inputs(cfg)
    assert evaluate._keep_listed(batch, plan.split_labels)["label"].tolist() == [1, 0]

    # A split of another dataset (none of its lines there) is refused, over files too
    split.write_text("val/ILSVRC2012_val_00000001.JPEG 65\nval/gone.JPEG 3\n")
    for data in (tmp_path / "ds", tmp_path):
        with pytest.raises(ValueError, match=r"none of the 2 images --split .*split.txt lists "
                           r"is in .* \(such as 'val/ILSVRC2012_val_00000001.JPEG'\)"):  # fmt: skip
            evaluate.plan_inputs(dataclasses.replace(cfg, data=str(data)))

    # Keys have lost their extension already: a dot left in one is part of the name.
    dotted = ["c/photo.2019", "c/photo"]
    assert evaluate._listed_keys([("val/photo.2019.JPEG", 5)], dotted, "d") == (
        {"c/photo.2019": 5}, [],
    )  # fmt: skip
    listed_bare = evaluate._stem("photo.2019", {"photo.2019", "photo"})
    assert listed_bare == "photo.2019"  # listed without an extension
    # a line naming no key is missing: not another key, by a dot taken for an extension
    assert evaluate._listed_keys([("c/photo.2019", 3)], ["c/photo"], "d") == ({}, ["c/photo.2019"])
    # An image file's extension is dropped, as jobs.prepare drops it from keys
    assert evaluate._listed_keys([("c/scan.jfif", 1), ("c/anim.gif", 2)], ["c/scan", "c/anim"],
                                 "d") == ({"c/scan": 1, "c/anim": 2}, [])  # fmt: skip


def test_the_record_of_kept_batches_names_contents_not_places(tmp_path) -> None:
    """Kept batches are taken again after the dataset or the classifier's weights moved,
    not after the weights changed in place, nor by a version whose parts differ."""
    import shutil

    from tests.support import write_dataset

    write_dataset(str(tmp_path / "ds"))
    shutil.copytree(tmp_path / "ds", tmp_path / "moved")
    cfg = evaluate.EvaluateConfig(data=str(tmp_path / "ds"), model="m", classifier="small_cnn",
                                  classifier_weights=str(tmp_path / "w"))  # fmt: skip
    moved = dataclasses.replace(cfg, data=str(tmp_path / "moved"), classifier_weights="s3://b/w")

    def record(c: evaluate.EvaluateConfig, weights_sha256: str) -> dict:
        return evaluate._record(c, evaluate.plan_inputs(c), {"sha256": "m"}, torch.ones(313),
                                weights_sha256)  # fmt: skip

    assert record(cfg, "w1") == record(moved, "w1") != record(cfg, "w2")
    assert record(cfg, "w1")["parts_format"] == evaluate_parts.FORMAT
    # --max-file-mb decides no figure: its refusals are measured again, not kept
    assert record(cfg, "w1") == record(dataclasses.replace(cfg, max_file_mb=1), "w1")
    assert not evaluate._lasting(f"{evaluate.FILE_TOO_LARGE}300000000 bytes (--max-file-mb)")
    assert evaluate._lasting("corrupt or truncated image: OSError: broken data stream")


def test_a_split_line_names_one_image_of_a_name_several_folders_have() -> None:
    keys = ["train/a/001", "train/b/001", "train/b/002"]
    lines = [("b/001.JPEG", 4), ("val/a/001.JPEG", 5), ("003.JPEG", 6), ("002.JPEG", 7)]
    labels, missing = evaluate._listed_keys(lines, keys, "d")
    assert labels == {"train/b/001": 4, "train/a/001": 5, "train/b/002": 7}
    assert missing == ["003.JPEG"]
    with pytest.raises(ValueError, match=r"'c/001.JPEG' names 2 images"):  # no folder c has it
        evaluate._listed_keys([("c/001.JPEG", 1)], keys, "d")
    with pytest.raises(ValueError, match=r"'001.JPEG' names 2 images of d \(train/a/001, "):
        evaluate._listed_keys([("001.JPEG", 1)], keys, "d")


def test_bad_configs_fail_before_any_work(tmp_path) -> None:
    with pytest.raises(ValueError, match="required"):
        evaluate.EvaluateConfig(data="d")
    with pytest.raises(ValueError, match="eval_px"):
        evaluate.EvaluateConfig(data="d", model="m", eval_px=100)
    with pytest.raises(ValueError, match="accelerator_type names a GPU"):
        evaluate.EvaluateConfig(data="d", model="m", accelerator_type="L40S")
    for fields, message in [({"temperature": 1e-8}, "temperature must be finite and >= 0.001"),
                            ({"cpus_per_actor": math.nan}, "cpus_per_actor must be finite"),
                            ({"output": ""}, "output is empty: give a path or URL")]:  # fmt: skip
        with pytest.raises(ValueError, match=message):
            evaluate.EvaluateConfig(data="d", model="m", **fields)
    with pytest.raises(ValueError, match="pass --split"):
        evaluate.plan_inputs(evaluate.EvaluateConfig(data=str(tmp_path), model="m"))
    # a prepared dataset of no images (every input failed): said so, before Ray starts
    Manifest(classes=("a",), shards=(), num_inputs=2, num_errors=2).save(str(tmp_path))
    with pytest.raises(ValueError, match=r"holds no images \(2 of its 2 inputs failed"):
        evaluate.plan_inputs(evaluate.EvaluateConfig(data=str(tmp_path), model="m"))
    for name in evaluate.PRESETS:
        cfg, _ = parse_config(evaluate.EvaluateConfig, ["--preset", name], presets=evaluate.PRESETS)
        assert cfg.protocol == "resized" and cfg.eval_px == 256


def test_int8_precision_measures_the_int8_network(tmp_path, monkeypatch) -> None:
    """precision int8 evaluates the network `jobs.colorize --dtype int8` runs: its loss on a
    batch moves from fp32's, a little. CPUs only. Actors handed the driver's calibration
    build its network without calibrating again, and refuse a model file that changed since
    the driver hashed it."""
    with pytest.raises(ValueError, match="int8 runs on CPUs"):
        evaluate.EvaluateConfig(data="d", model="m", precision="int8", use_gpu=True)
    torch.manual_seed(3)
    torch.save(ColorizationNet().state_dict(), tmp_path / "w.pth")  # the released format
    jpegs = []
    for name in ("astronaut", "coffee"):
        buffer = io.BytesIO()
        Image.fromarray(photo_rgb(name, size=64)).save(buffer, format="JPEG")
        jpegs.append(buffer.getvalue())
    batch = {"key": np.array(["a", "b"]), "label": np.array([-1, -1]), "jpeg": np.array(jpegs)}
    losses = {}
    for precision in ("fp32", "int8"):
        cfg = evaluate.EvaluateConfig(
            data="d", model=str(tmp_path / "w.pth"), eval_px=64, precision=precision,
            output=str(tmp_path / "out"),
        )  # fmt: skip
        evaluator = evaluate.Evaluator(evaluate._config_dict(cfg), [1.0] * 313)
        assert isinstance(evaluator.ctx.model, Int8ColorizationNet) == (precision == "int8")
        out = evaluator(batch)
        assert list(out["status"]) == ["ok", "ok"]
        losses[precision] = out["loss"]
    assert 0 < np.abs(losses["int8"] - losses["fp32"]).max() < 0.01 * losses["fp32"].min()

    # What the driver hands the actors: the plan of its one calibration, the file it loaded
    # and that file's hash; the error figure goes into results.json.
    loaded = load_model(cfg.model)
    arguments, model_info = evaluate.evaluator_arguments(cfg, loaded, torch.ones(313))
    sha256 = hashlib.sha256((tmp_path / "w.pth").read_bytes()).hexdigest()
    assert arguments["model_sha256"] == model_info["sha256"] == sha256
    assert arguments["cfg"]["model"] == loaded.url and arguments["int8"] is not None
    assert model_info["int8"]["calibration_ab_error"]["mean"] >= 0

    def no_calibration(*args, **kwargs):
        raise AssertionError("an actor handed a plan calibrated again")

    monkeypatch.setattr(colorcore.int8, "quantize", no_calibration)
    handed = evaluate.Evaluator(**arguments)
    assert np.array_equal(handed(batch)["loss"], losses["int8"])
    with pytest.raises(RuntimeError, match="changed since the job started"):
        evaluate.Evaluator(**(arguments | {"model_sha256": "0" * 64}))


def _direct_gray_row(cfg: evaluate.EvaluateConfig) -> tuple[float, float, float, int]:
    """The gray row computed without the job: PIL decode, resize, Lab, ab = 0."""
    import pyarrow.parquet as pq

    from colorcore.prior import AbHistogram
    from jobs.dataset import Manifest

    manifest = Manifest.load(cfg.data)
    fs, root = storage.arrow_filesystem(cfg.data)
    # lambda 0 (the paper's eq. 4): w = 1 / (Q p) of the smoothed prior, whose mean under p is 1
    p_Q = AbHistogram.load(io.BytesIO(storage.read_bytes(cfg.prior_url))).smoothed_probabilities()
    w_Q = 1.0 / (len(p_Q) * p_Q.double())
    raw, rebalanced, psnr, mass = [], [], [], []
    for shard in manifest.shards:
        for data in pq.read_table(f"{root}/{shard.name}", filesystem=fs).column("jpeg").to_pylist():
            image = Image.open(io.BytesIO(data)).convert("RGB")
            small = image.resize((cfg.eval_px, cfg.eval_px), Image.Resampling.BICUBIC)
            rgb = torch.from_numpy(np.array(small)).permute(2, 0, 1)[None].float() / 255
            lab = rgb_to_lab(rgb)
            gray_ab = torch.zeros_like(lab[:, 1:])
            nearest = torch.cdist(lab[0, 1:].flatten(1).T, _bins()).argmin(1)
            weights = w_Q[nearest].reshape(1, *rgb.shape[-2:])
            raw.append(metrics.ab_auc(gray_ab, lab[:, 1:])[0].item())
            rebalanced.append(metrics.ab_auc(gray_ab, lab[:, 1:], pixel_weights=weights)[0].item())
            mass.append(weights.double().sum().item())
            gray_rgb = lab_to_rgb(torch.cat([lab[:, :1], gray_ab], dim=1))
            psnr.append(metrics.psnr(gray_rgb, rgb).item())
    # The dataset's pixels pooled: images of one size weigh alike in the raw AuC, and by
    # their pixels' total weight in the rebalanced one.
    pooled = float(np.average(rebalanced, weights=mass))
    return float(np.mean(raw)), pooled, float(np.mean(psnr)), len(raw)


def _bins() -> torch.Tensor:
    return torch.from_numpy(np.load(reference_path("pts_in_hull.npy"))).float()


def _ci_evaluation(ci_run, output: str, **kw) -> evaluate.EvaluateConfig:
    """The session's ci model measured on its validation scenes."""
    train_cfg, _ = ci_run
    return evaluate.EvaluateConfig(
        data=train_cfg.val_data,
        model=train_cfg.run_url,
        prior=train_cfg.prior_url,
        output=output,
        eval_px=96,  # the synthetic scenes' own size
        batch_size=8,
        **kw,
    )


@pytest.fixture(scope="module")
def ci_evaluation(ci_run, s3_server) -> tuple[evaluate.EvaluateConfig, dict]:
    """The session's ci model measured on its whole validation set, in fp32 (an image's
    figures then do not depend on the batch it is measured in): (config, result)."""
    cfg = _ci_evaluation(ci_run, s3_server.url("eval", "ci"), precision="fp32")
    return cfg, evaluate.main(cfg)


def test_ci_model_beats_gray_and_the_gray_row_is_the_direct_computation(
    ci_evaluation, s3_server
) -> None:
    cfg, result = ci_evaluation
    table = {row["method"]: row for row in result["table"]}

    raw, rebalanced, psnr, images = _direct_gray_row(cfg)
    assert result["counts"]["measured"] == images and result["counts"]["errors"] == 0
    assert table["gray"]["auc_raw"] == pytest.approx(raw, abs=1e-9)
    assert table["gray"]["auc_rebalanced"] == pytest.approx(rebalanced, abs=1e-6)
    assert table["gray"]["psnr_db"] == pytest.approx(psnr, abs=1e-6)
    assert table["ground_truth"]["auc_raw"] == 1.0 == table["ground_truth"]["auc_rebalanced"]
    assert table["annealed_mean"]["auc_rebalanced"] > table["gray"]["auc_rebalanced"]
    assert result["loss_per_image"] > 0 and result["model"]["kind"] == "run"

    out = lambda name: storage.join(cfg.output, name)  # noqa: E731
    saved = json.loads(storage.read_bytes(out("results.json")))
    assert saved["table"][1]["auc_raw"] == pytest.approx(raw, abs=1e-9)
    assert saved["table"][0]["psnr_db"] is None  # ground truth: infinite PSNR, null in JSON
    assert len(saved["images"]) == images and "resized to 96x96" in saved["protocol"]
    assert saved["network_dtype"] == ["fp32"] and "the network in fp32" in saved["protocol"]
    for kind in ("raw", "rebalanced"):  # the pooled curves integrate to the pooled AuC
        for row in result["table"]:
            curve = torch.tensor(result["curves"][kind][row["method"]], dtype=torch.float64)
            area = torch.trapezoid(curve).item() / (len(curve) - 1)
            assert area == pytest.approx(row[f"auc_{kind}"], abs=1e-6)

    # --max-images: the first images in shard order, whichever blocks are read first
    import pyarrow.parquet as pq

    from jobs.dataset import Manifest

    fs, root = storage.arrow_filesystem(cfg.data)
    tables = [
        pq.read_table(f"{root}/{s.name}", filesystem=fs) for s in Manifest.load(cfg.data).shards
    ]
    keys = [k for table in tables for k in table.column("key").to_pylist()]
    first5 = s3_server.url("eval", "ci-first5")  # and precision auto
    limited = evaluate.main(dataclasses.replace(cfg, max_images=5, output=first5, precision="auto"))
    assert limited["counts"]["measured"] + limited["counts"]["grayscale"] == 5
    ran = "bf16" if runtime.choose_precision("cpu").autocast_dtype else "fp32"
    first5_saved = json.loads(storage.read_bytes(storage.join(first5, "results.json")))
    assert first5_saved["network_dtype"] == [ran]
    assert {r["key"] for r in limited["images"]} <= set(keys[:5])
    rows = list(csv.DictReader(io.StringIO(storage.read_bytes(out("table.csv")).decode())))
    assert [r["method"] for r in rows] == list(evaluate.METHODS)
    assert float(rows[1]["auc_rebalanced"]) == pytest.approx(rebalanced, abs=1e-6)
    markdown = storage.read_bytes(out("table.md")).decode()
    assert "| Gray (ab = 0) |" in markdown and result["protocol"] in markdown
    for name in ("auc_curves.png", "best_worst.png"):
        assert Image.open(io.BytesIO(storage.read_bytes(out(name)))).size[0] > 200


def test_an_evaluation_stopped_part_way_measures_only_the_rest(
    ci_evaluation, s3_server, capsys
) -> None:
    """A re-run takes the batches an earlier run of the evaluation kept, measures the other
    inputs, and reports the figures of one whole run; batches kept by an evaluation that
    decides the figures otherwise are measured anew."""
    import pyarrow.parquet as pq

    from jobs.dataset import Manifest

    cfg, whole = ci_evaluation  # (in fp32: an image's figures do not depend on its batch)
    fs, root = storage.arrow_filesystem(cfg.data)
    shard = Manifest.load(cfg.data).shards[0]
    first = pq.read_table(f"{root}/{shard.name}", filesystem=fs).slice(0, 8).to_pydict()
    first = {k: np.array(first[k], dtype=object) for k in ("key", "label", "jpeg")}
    # and an input whose read failed in storage: not kept, a re-run reads it again
    first = {k: np.append(v, x) for (k, v), x in zip(first.items(), ["gone", 0, b""], strict=True)}
    first["reason"] = np.array([""] * 8 + [evaluate.UNREADABLE + "reset"], dtype=object)
    rebalance0_Q = evaluate.load_rebalance0(cfg.prior_url)

    def stopped_run(stopped: evaluate.EvaluateConfig) -> None:
        """What a run stopped after its first batch leaves: its record, and that batch as an
        actor kept it, twice (an actor that died once it was kept, and the batch's retry)."""
        arguments, info = evaluate.evaluator_arguments(stopped, load_model(cfg.model), rebalance0_Q)
        record = evaluate._record(stopped, evaluate.plan_inputs(stopped), info, rebalance0_Q)
        assert evaluate_parts.resume(stopped.output, record, stopped.s3) == []
        for _ in range(2):
            evaluate.Evaluator(**arguments)(first)

    resumed_cfg = dataclasses.replace(cfg, output=s3_server.url("eval", "stopped"))
    stopped_run(resumed_cfg)
    capsys.readouterr()
    resumed = evaluate.main(resumed_cfg)
    assert "8 inputs measured by an earlier run" in capsys.readouterr().out
    assert resumed["counts"] == whole["counts"]  # each input once
    for part in ("table", "images"):
        for ours, theirs in zip(resumed[part], whole[part], strict=True):
            assert ours.keys() == theirs.keys()
            for name, value in theirs.items():
                number = isinstance(value, float)
                assert ours[name] == (
                    pytest.approx(value, rel=1e-5, nan_ok=True) if number else value
                )
    assert not storage.list_files(evaluate_parts.folder(resumed_cfg.output))  # done with

    # Kept by an evaluation at another temperature: not taken.
    stopped_run(dataclasses.replace(resumed_cfg, temperature=0.5))
    _, info = evaluate.evaluator_arguments(resumed_cfg, load_model(cfg.model), rebalance0_Q)
    plan = evaluate.plan_inputs(resumed_cfg)
    record = evaluate._record(resumed_cfg, plan, info, rebalance0_Q)
    assert evaluate_parts.resume(resumed_cfg.output, record, resumed_cfg.s3) == []
    assert "of another evaluation (other temperature): measuring anew" in capsys.readouterr().out
    assert storage.list_files(evaluate_parts.folder(resumed_cfg.output)) == [
        storage.join(evaluate_parts.folder(resumed_cfg.output), evaluate_parts.RUN_FILE)
    ]


def _scenes(seed: int, per_class: int) -> tuple[torch.Tensor, list[int]]:
    labels = [c for _ in range(per_class) for c in range(len(synthetic.CLASSES))]
    rgb = [synthetic.render_scene(c, i // 3, seed=seed) for i, c in enumerate(labels)]
    return torch.from_numpy(np.stack(rgb)).permute(0, 3, 1, 2).float() / 255, labels


def _train_classifier() -> evaluate.SmallConvNet:
    """A small classifier of day / sunset / beach, trained on colour scenes (seed 11)."""
    torch.manual_seed(0)
    rgb, labels = _scenes(seed=11, per_class=20)
    x, y = evaluate.SmallConvNet.preprocess(rgb), torch.tensor(labels)
    model = evaluate.SmallConvNet(len(synthetic.CLASSES), width=8)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(150):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.mark.parametrize(
    "name, error",
    [("nosuchpkg.mod:build", "ModuleNotFoundError"), ("json:nosuch", "AttributeError")],
)
def test_a_classifier_that_does_not_import_is_named(name, error) -> None:
    with pytest.raises(ValueError, match=f"^classifier {name!r}: {error}: "):
        evaluate.classifier_from(name, None)


def test_a_datasets_own_labels_are_refused_for_a_classifier_of_other_classes(tmp_path) -> None:
    """A prepared dataset's labels index its own classes (a and b here): a classifier of
    three classes numbers them otherwise, so top-1 needs a split giving its labels."""
    from tests.support import write_dataset

    data = str(tmp_path / "ds")
    write_dataset(data)
    cfg = evaluate.EvaluateConfig(data=data, model="m")
    three, two = (evaluate.Classifier(evaluate.SmallConvNet(n), evaluate.SmallConvNet.preprocess)
                  for n in (3, 2))  # fmt: skip
    with pytest.raises(ValueError, match="its own 2 classes, and the classifier has 3 outputs"):
        evaluate._check_label_numbering(cfg, evaluate.plan_inputs(cfg), three)
    evaluate._check_label_numbering(cfg, evaluate.plan_inputs(cfg), two)
    for lines, refused in (("c/000.jpg 2\nc/001.jpg 0", False), ("c/000.jpg\nc/001.jpg", True)):
        (tmp_path / "split.txt").write_text(lines)
        listed = dataclasses.replace(cfg, split=str(tmp_path / "split.txt"))
        plan = evaluate.plan_inputs(listed)
        other_numbering = r"labels number its own 2 classes, and the classifier has 3 outputs"
        with (
            pytest.raises(ValueError, match=other_numbering)
            if refused
            else contextlib.nullcontext()
        ):
            evaluate._check_label_numbering(listed, plan, three)


def test_split_folder_with_bad_inputs_and_classifier(ci_run, s3_server) -> None:
    """Held-out scenes in a folder: a listed missing file is counted before work, a corrupt
    one is skipped, one above --max-file-mb too, unread, and one whose decoding kills the
    actor (a format the session's workers die on) after --crash-tries deaths; ground truth
    beats gray for the classifier, colorized is close to gray or better."""
    from tests.crashing_format import MAGIC

    train_cfg, _ = ci_run
    folder = s3_server.url("eval-split", "images")
    rgb, labels = _scenes(seed=5, per_class=12)
    lines = []
    for i, label in enumerate(labels):
        name = f"{synthetic.CLASSES[label]}/scene_{i:03d}.png"
        image = (rgb[i].permute(1, 2, 0) * 255).round().byte().numpy()
        storage.write_bytes(storage.join(folder, name), encode(image, "PNG"))
        lines.append(f"/{name} {label}")
    storage.write_bytes(storage.join(folder, "day", "corrupt.png"), b"\x89PNG not really")
    storage.write_bytes(storage.join(folder, "day", "huge.png"), bytes(2**20 + 1))
    storage.write_bytes(storage.join(folder, "day", "crashes.png"), MAGIC + bytes(64))
    lines += ["/day/corrupt.png 0", "/day/huge.png 0", "/beach/never_written.png 2"]
    lines.insert(5, "/day/crashes.png 0")  # in a batch of scenes
    split = s3_server.url("eval-split", "split.txt")
    storage.write_bytes(split, "\n".join(lines).encode())
    weights = s3_server.url("eval-split", "classifier.pt")
    storage.write_bytes(weights, _train_classifier().to_bytes())

    cfg = evaluate.EvaluateConfig(
        data=folder,
        split=split,
        model=train_cfg.run_url,
        prior=train_cfg.prior_url,
        output=s3_server.url("eval-split", "out"),
        protocol="full",
        eval_px=96,
        classifier="small_cnn",
        classifier_weights=weights,
        batch_size=8,
        max_file_mb=1,
        crash_tries=1,
    )
    plan = evaluate.plan_inputs(cfg)
    assert (plan.listed, plan.missing) == (len(labels) + 4, ["beach/never_written.png"])
    result = evaluate.main(cfg)
    counts = result["counts"]
    assert (counts["measured"], counts["errors"], counts["missing"]) == (len(labels), 3, 1)
    reasons = {row["key"]: row["reason"] for row in result["skipped"]}
    assert reasons.keys() == {"day/corrupt.png", "day/huge.png", "day/crashes.png"}
    assert reasons["day/huge.png"] == f"file too large: {2**20 + 1} bytes (--max-file-mb)"
    assert "died each of the 1 times it took this input alone" in reasons["day/crashes.png"]
    top1 = {row["method"]: row["top1"] for row in result["table"]}
    assert top1["ground_truth"] > top1["gray"]
    assert top1["annealed_mean"] >= top1["gray"] - COLORIZED_MARGIN
    assert "metrics at full resolution" in result["protocol"]


def test_full_resolution_measures_one_by_one_as_a_batch_measures(tmp_path, monkeypatch) -> None:
    """--protocol full measures, classifies and draws each image alone, keeping only its
    thumbnails: on images of the eval size it gives what the batched path gives."""
    torch.manual_seed(0)
    rgb, labels = _scenes(seed=3, per_class=2)
    weights = tmp_path / "classifier.pt"
    weights.write_bytes(_train_classifier().to_bytes())
    images = [(image * 255).round().byte() for image in rgb]

    def measured(protocol: str):
        cfg = evaluate.EvaluateConfig(data="d", model="m", protocol=protocol, eval_px=96)
        ctx = evaluate.EvalContext(
            cfg=cfg,
            model=ColorizationNet(ModelConfig(width=1 / 16)).eval(),
            device=torch.device("cpu"),
            autocast_dtype=None,
            rebalance0_Q=_reference_rebalance0(),
            classifier=evaluate.load_classifier("small_cnn", str(weights)),
        )
        torch.manual_seed(1)
        ctx.model.load_state_dict(ColorizationNet(ModelConfig(width=1 / 16)).state_dict())
        ab_small, _ = evaluate._network(ctx, torch.stack(images))
        return evaluate._measure_group(ctx, images, ab_small, torch.tensor(labels))

    batched, one_by_one = measured("resized"), measured("full")
    for name in ("auc_raw_NM", "auc_rebalanced_NM", "psnr_db_NM", "mass_rebalanced_N"):
        torch.testing.assert_close(getattr(one_by_one[0], name), getattr(batched[0], name))
    assert one_by_one[0].rgb_by_method == {}  # nothing full-size kept
    assert torch.equal(one_by_one[1], batched[1])
    for i in range(len(images)):
        for a, b in zip(one_by_one[2](i), batched[2](i), strict=True):
            torch.testing.assert_close(a, b)
    assert batched[3] == one_by_one[3] == {}

    # An image too large for the memory at hand is left out, said why; the rest as before.
    # Any other error is a bug, and raised.
    measure, calls = evaluate.measure_images, []

    def short_of_memory(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried ...")
        return measure(*args, **kwargs)

    monkeypatch.setattr(evaluate, "measure_images", short_of_memory)
    scores, hits, thumbnails, failed = measured("full")
    assert list(failed) == [1] and "too large to measure" in failed[1]
    rest = [0, *range(2, len(images))]
    torch.testing.assert_close(scores.auc_raw_NM, batched[0].auc_raw_NM[rest])
    assert torch.equal(hits, batched[1][rest])
    for a, b in zip(thumbnails(1), batched[2](2), strict=True):
        torch.testing.assert_close(a, b)
    monkeypatch.setattr(evaluate, "measure_images", lambda *a, **k: torch.ones(2) @ torch.ones(3))
    with pytest.raises(RuntimeError, match="size"):
        measured("full")


def test_a_panoramas_strip_stays_within_jpegs_reach() -> None:
    """A 100 x 18,000 image's tiles are 8 times as wide as high (a strip of 69,120 pixels
    would not save as a JPEG); a common image's are 128 high."""
    from PIL import Image

    for (h, w), tile in (((100, 18000), (6, 1024)), ((60, 90), (128, 192))):
        rgb = {m: torch.rand(1, 3, h, w) for m in ("gray", evaluate.PRIMARY, "ground_truth")}
        tiles = evaluate._thumbnails(rgb, 0)
        assert [tuple(t.shape[-2:]) for t in tiles] == [tile] * 3
        strip = Image.open(io.BytesIO(evaluate._strip(tiles)))
        assert strip.size == (3 * tile[1], tile[0])


def test_a_narrow_prior_weighs_far_colours_beyond_float32_and_keeps_them(tmp_path) -> None:
    """A prior of gray alone (a dataset's own, narrow) gives the colours farthest from it
    weights past float32's range: kept in float64, an image holding one still has a finite
    rebalanced AuC and mass, which the pooled figure counts."""
    from colorcore.prior import AbHistogram
    from colorcore.quantize import ab_bins

    counts = torch.zeros(313, dtype=torch.int64)
    counts[int(ab_bins().norm(dim=1).argmin())] = 1000
    AbHistogram(counts).save(tmp_path / "prior.npz")
    w_Q = evaluate.load_rebalance0(str(tmp_path / "prior.npz"))
    assert w_Q.dtype == torch.float64 and bool(w_Q.isfinite().all())
    assert bool(w_Q.float().isinf().any())  # what float32 would have made of them
    rgb = torch.full((1, 3, 16, 16), 0.5)
    rgb[0, :, 0, 0] = torch.tensor([0.0, 1.0, 0.0])  # one saturated green pixel
    ab_small = {m: torch.zeros(1, 2, 4, 4) for m in ("annealed_mean", "mean", "mode")}
    scores = evaluate.measure_images(rgb, ab_small, rebalance0_Q=w_Q)
    assert bool(scores.auc_rebalanced_NM.isfinite().all())
    assert bool(scores.mass_rebalanced_N.isfinite().all())


def test_a_prior_too_narrow_to_weigh_every_colour_is_refused_as_such(tmp_path) -> None:
    """A prior of one far bin leaves, smoothed, bins of probability 0 (underflow), which
    lambda 0 cannot weigh: the error says what the prior lacks."""
    from colorcore.prior import AbHistogram
    from colorcore.quantize import ab_bins

    counts = torch.zeros(313, dtype=torch.int64)
    counts[int(ab_bins()[:, 0].argmax())] = 1000  # the reddest bin alone
    AbHistogram(counts).save(tmp_path / "prior.npz")
    assert bool((AbHistogram(counts).smoothed_probabilities() == 0).any())
    with pytest.raises(ValueError, match=r"the prior at .*prior.npz: lam = 0 weighs .*broader"):
        evaluate.load_rebalance0(str(tmp_path / "prior.npz"))


def test_cli_dry_run_parses_the_documented_command(capsys) -> None:
    from jobs.config import run_cli

    argv = ["data/val", "--model", "m.pth", "--split", "ctest10k.txt", "--protocol", "full"]
    ran = run_cli(
        evaluate.EvaluateConfig, evaluate.main, [*argv, "--dry-run"], positionals=("data",)
    )
    printed = json.loads(capsys.readouterr().out)
    assert ran is None  # a dry run builds and prints the config, and starts nothing
    assert [printed[k] for k in ("data", "model", "split")] == ["data/val", "m.pth", "ctest10k.txt"]
    assert printed["protocol"] == "full" and printed["temperature"] == 0.38


def test_torchvision_is_imported_only_on_the_vgg16_path() -> None:
    import subprocess
    import sys

    code = (
        "import sys, jobs.evaluate as e; "
        "assert 'torchvision' not in sys.modules; "
        "x = e.imagenet_preprocess(__import__('torch').rand(2, 3, 256, 300)); "
        "assert tuple(x.shape) == (2, 3, 224, 224); "
        "e.SmallConvNet(3)(e.SmallConvNet.preprocess(x)); "
        "assert 'torchvision' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    with pytest.raises(ValueError, match="classifier-weights"):
        evaluate.load_classifier("vgg16", None)  # refused before torchvision is needed
    with pytest.raises(ValueError, match=r"package\.module:fn"):
        evaluate.load_classifier("no_such_classifier", None)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_vgg16_classifier_on_the_gpu(tmp_path) -> None:
    import torchvision

    torch.manual_seed(0)
    path = tmp_path / "vgg16.pth"
    torch.save(torchvision.models.vgg16().state_dict(), path)
    classifier = evaluate.load_classifier("vgg16", str(path))
    classifier.module.eval().cuda()
    rgb = torch.rand(2, 3, 256, 256, device="cuda")
    with torch.no_grad():
        labels = classifier.module(classifier.preprocess(rgb)).argmax(1).cpu()
    correct = evaluate.top1_correct(classifier, dict.fromkeys(evaluate.METHODS, rgb), labels)
    assert correct.tolist() == [[1] * len(evaluate.METHODS)] * 2


def _as_ray_hands_them(batches: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """Copies of the batches' numpy columns, read-only as Ray's views of its blocks are."""
    batches = [{k: v.copy() for k, v in b.items()} for b in batches]
    for column in (v for b in batches for v in b.values()):
        column.flags.writeable = False
    return batches


def test_collect_sums_the_curves_and_keeps_only_the_strips_the_grid_can_show() -> None:
    """The driver keeps no per-image curves and at most 2k strips, and the grid it draws and
    the mean curves it reports are those of every row kept whole."""
    rng = np.random.default_rng(0)
    batches = []
    for b in range(6):
        columns = evaluate._empty_columns(5)
        columns["key"] = np.array([f"img{b}{i}" for i in range(5)], dtype=object)
        columns["label"] = np.zeros(5, np.int64)
        columns["status"][1] = "error"  # no strip, no curve
        columns["auc_raw"][:] = rng.random((5, len(evaluate.METHODS)))
        p = evaluate.METHODS.index(evaluate.PRIMARY)
        columns["auc_raw"][[0, 4], p] = 0.99  # ties at the top and at the bottom, which the
        columns["auc_raw"][[2, 3], p] = 0.01  # grid breaks by key
        columns["auc_raw"][3, p] = np.nan if b in (2, 4) else 0.01  # NaN: worst of all
        for c in evaluate.CURVES:
            columns[c][:] = rng.random(columns[c].shape).astype(np.float32)
            columns[evaluate._mass(c)][:] = rng.random(5) * 100
        strip = Image.fromarray(rng.integers(0, 255, (8, 24, 3), np.uint8))
        for i in range(5):
            buffer = io.BytesIO()
            strip.save(buffer, "JPEG")
            columns["strip_jpeg"][i] = buffer.getvalue() if i != 1 else b""
        batches.append(columns)
    rows, sums = evaluate.collect(_as_ray_hands_them(batches), grid_images=3)
    assert not set(evaluate.CURVES) & set(rows) and len(rows["key"]) == 30
    assert sum(len(s) > 0 for s in rows["strip_jpeg"]) <= 6
    whole = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    order = np.argsort(whole["key"].astype(str), kind="stable")
    whole = {k: v[order] for k, v in whole.items()}
    assert evaluate._grid(rows, 3) == evaluate._grid(whole, 3)
    ok = whole["status"] == "ok"
    for c in evaluate.CURVES:
        mass = whole[evaluate._mass(c)][ok]
        weighted = (whole[c][ok].astype(np.float64) * mass[:, None, None]).sum(0)
        np.testing.assert_allclose(sums[c], weighted, rtol=1e-6)
        assert float(sums[evaluate._mass(c)]) == pytest.approx(mass.sum())


def test_a_batchs_grid_candidates_rank_nan_as_the_grid_does() -> None:
    """The best of a batch is its highest AuC, a NaN counting below every number."""
    assert evaluate._extremes(torch.tensor([0.5, math.nan, 0.9, 0.1, 0.7]), 1) == [1, 2]


def test_psnr_and_the_classifier_see_srgb_clipped_as_the_released_code_makes_it() -> None:
    """A decoding's out-of-gamut colours reach PSNR and the classifier as the released
    pipeline's scikit-image lab2rgb leaves them, clipped, not chroma-reduced as the colorize
    job writes them."""
    torch.manual_seed(0)
    rgb = torch.rand(2, 3, 8, 8)
    lab = rgb_to_lab(rgb)
    saturated = {"annealed_mean": torch.full((2, 2, 2, 2), 90.0)}  # far outside sRGB
    ab, colours = evaluate._row_colours("annealed_mean", rgb, lab, saturated)
    from skimage.color import lab2rgb

    lab_NHW3 = torch.cat([lab[:, :1], ab], dim=1).permute(0, 2, 3, 1).double().numpy()
    released = torch.from_numpy(np.clip(lab2rgb(lab_NHW3), 0, 1)).permute(0, 3, 1, 2).float()
    reduced = lab_to_rgb(torch.cat([lab[:, :1], ab], dim=1))
    torch.testing.assert_close(colours, released, atol=1e-5, rtol=0)
    assert not torch.allclose(colours, reduced, atol=1e-2)

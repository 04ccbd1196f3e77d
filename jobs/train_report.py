"""What a finished training run leaves beside its checkpoints.

- the held-out rebalanced and raw AuC of the final model and of the gray baseline, printed;
- ``curves.png``: training loss, validation loss and AuC against the step;
- ``samples.png``: validation images, gray input / colorized / ground truth;
- ``model.safetensors``: the final weights for distribution, with the model config in
  its metadata.
"""

from __future__ import annotations

import torch

from colorcore import weights
from jobs import storage
from jobs.models import load_model
from jobs.plots import figure_png, pyplot
from jobs.train import TrainConfig, load_prior, read_metrics, rebalance_from
from jobs.validation import format_summary, load_crops, validate


def plot_curves(history: list[dict[str, float]]) -> bytes:
    plt = pyplot()

    fig, (ax_loss, ax_auc) = plt.subplots(1, 2, figsize=(10, 3.8), dpi=110)
    for key, label in (("loss", "train loss"), ("val_loss", "val loss (lambda = 1)")):
        rows = [r for r in history if key in r]
        ax_loss.plot([r["step"] for r in rows], [r[key] for r in rows], label=label)
    for key, label in (
        ("val_auc_raw", "raw AuC"),
        ("val_auc_rebalanced", "rebalanced AuC"),
        ("val_gray_auc_raw", "gray, raw"),
        ("val_gray_auc_rebalanced", "gray, rebalanced"),
    ):
        rows = [r for r in history if key in r]
        style = "--" if "gray" in key else "-"
        ax_auc.plot([r["step"] for r in rows], [r[key] for r in rows], style, label=label)
    ax_loss.set(xlabel="step", ylabel="loss per image", title="loss")
    ax_auc.set(xlabel="step", ylabel="AuC", title="held-out AuC")
    ax_loss.legend()
    ax_auc.legend()
    return figure_png(fig)


def sample_grid(model: torch.nn.Module, crops_N3HW: torch.Tensor, *, T: float = 0.38) -> bytes:
    """Rows of gray input / colorized / ground truth for a few validation crops."""
    plt = pyplot()

    from colorcore.decode import colorize

    rgb = crops_N3HW.float() / 255
    out = colorize(model.eval(), rgb, infer_px=rgb.shape[-1], T=T)
    gray = rgb.mean(1, keepdim=True).expand(-1, 3, -1, -1)
    n = len(rgb)
    fig, axes = plt.subplots(3, n, figsize=(1.6 * n, 5), dpi=110, squeeze=False)
    for row, (images, title) in enumerate(((gray, "input"), (out, "colorized"), (rgb, "truth"))):
        for col in range(n):
            axes[row][col].imshow(images[col].permute(1, 2, 0).clamp(0, 1).numpy())
            axes[row][col].axis("off")
        axes[row][0].set_title(title, loc="left", fontsize=9)
    return figure_png(fig)


def write_report(cfg: TrainConfig, run_url: str | None = None) -> dict[str, float]:
    """Measure the final model, write plots and the export; returns the held-out figures."""
    run_url = run_url or cfg.run_url
    loaded = load_model(run_url, cfg.s3)
    model = loaded.model.eval()
    history = read_metrics(run_url, cfg.s3)
    storage.write_bytes(storage.join(run_url, "curves.png"), plot_curves(history), cfg.s3)
    storage.write_bytes(
        storage.join(run_url, "model.safetensors"),
        weights.to_safetensors(model),
        cfg.s3,
    )
    if not cfg.val_data:
        return {}
    crops = load_crops(cfg.val_data, num_images=cfg.val_images, crop_px=cfg.crop_px, s3=cfg.s3)
    histogram = load_prior(cfg.prior_url, cfg.s3)
    result = validate(
        model,
        crops,
        rebalance0_Q=rebalance_from(histogram, lam=0.0, sigma=cfg.prior_sigma),
        k=cfg.soft_encode_k,
        sigma=cfg.soft_encode_sigma,
    )
    if not result.images:  # a validation set of gray images only: nothing measured
        print(f"the held-out set {cfg.val_data} has no colour image: no held-out figures")
        return {}
    grid = sample_grid(model, crops[:8])
    storage.write_bytes(storage.join(run_url, "samples.png"), grid, cfg.s3)
    print(format_summary(result))
    verdict = "beats" if result.auc_rebalanced > result.gray_auc_rebalanced else "does NOT beat"
    print(f"the model {verdict} the gray baseline in rebalanced AuC; plots and export in {run_url}")
    return result.as_metrics("final_")

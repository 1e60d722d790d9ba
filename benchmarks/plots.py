"""Bar charts of the results: encoder throughput (like the report's Figure 1), captioning split, training speed.

`python -m benchmarks` calls one after each section and writes the PNG beside the JSON.
"""

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLOURS = {"timm": "#4c72b0", "cnngemma": "#55a868", "siglip": "#c44e52", "projector": "#8172b2"}
PHASE_COLOURS = {"vision": "#c44e52", "prefill": "#dd8452", "decode": "#4c72b0"}


SOFTWARE = "cnngemma benchmarks"  # in each PNG's metadata: how a later run knows the file is its own


def save(fig, path: Path) -> Path:
    """Writes the figure beside its target and renames it into place, tagged as the benchmarks' own."""
    fig.tight_layout()
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}.png")
    try:
        fig.savefig(partial, dpi=90, metadata={"Software": SOFTWARE})
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
        plt.close(fig)
    return path


def _error(summary: dict) -> list[list[float]]:
    return [[summary["median"] - summary["q1"]], [summary["q3"] - summary["median"]]]


def plot_encoders(result: dict, path: Path, title_suffix: str = "") -> Path:
    rows = [r for r in result["rows"] if r["kind"] != "projector"]
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(rows) + 1.5))
    for i, row in enumerate(rows):
        value = row["images_per_s"]
        ax.barh(i, value["median"], xerr=_error(value), color=COLOURS[row["kind"]], capsize=3)
        ax.text(value["q3"] * 1.1, i, f"{value['median']:.1f}", va="center", fontsize=8)
    ax.set_yticks(range(len(rows)), [r["name"] for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("log")
    settings = result["settings"]
    ax.set_xlabel(
        f"images/s (batch {settings['batch_size']}, {settings['image_size']} px, {settings['dtype']}; median, IQR)"
    )
    ax.set_title(f"Encoder throughput{title_suffix}")
    return save(fig, path)


def plot_captioning(result: dict, path: Path, title_suffix: str = "") -> Path:
    panels = list(dict.fromkeys((r["lm_size"], r["batch_size"]) for r in result["rows"]))
    height = max(len([r for r in result["rows"] if (r["lm_size"], r["batch_size"]) == p]) for p in panels)
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 0.4 * height + 1.8), squeeze=False)
    for ax, (lm_size, batch) in zip(axes[0], panels, strict=True):
        rows = [r for r in result["rows"] if (r["lm_size"], r["batch_size"]) == (lm_size, batch)]
        left = [0.0] * len(rows)
        for phase, colour in PHASE_COLOURS.items():
            widths = [r["split_s"][phase] for r in rows]
            ax.barh(range(len(rows)), widths, left=left, color=colour, label=phase)
            left = [a + b for a, b in zip(left, widths, strict=True)]
        for i, row in enumerate(rows):
            ax.text(left[i] * 1.02, i, f"{row['captions_per_s']['median']:.2f} cap/s", va="center", fontsize=8)
        ax.set_yticks(range(len(rows)), [f"{r['model']} ({r['path']})" for r in rows], fontsize=8)
        ax.invert_yaxis()
        ax.set_xlim(0, max(left) * 1.35)
        ax.set_xlabel("seconds per batch (median)")
        ax.set_title(f"LM {lm_size}, batch {batch}", fontsize=10)
    axes[0][0].legend(fontsize=8, loc="upper right")
    settings = result["settings"]
    fig.suptitle(f"Captioning, {settings['new_tokens']} new tokens{title_suffix}")
    return save(fig, path)


def plot_training(result: dict, path: Path, title_suffix: str = "") -> Path:
    policies = sorted({r["policy"] for r in result["rows"]}, key=["frozen_lm", "lora"].index)
    models = list(dict.fromkeys(r["model"] for r in result["rows"]))
    fig, ax = plt.subplots(figsize=(9, 3.8))
    width = 0.8 / len(policies)
    for j, policy in enumerate(policies):
        at = {r["model"]: r for r in result["rows"] if r["policy"] == policy}
        values = [at[m]["samples_per_s"] for m in models]
        ax.bar(
            [i + j * width for i in range(len(models))],
            [v["median"] for v in values],
            width,
            yerr=[[v["median"] - v["q1"] for v in values], [v["q3"] - v["median"] for v in values]],
            capsize=3,
            label=policy,
        )
    ax.set_xticks([i + width * (len(policies) - 1) / 2 for i in range(len(models))], models, fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("training samples/s (median, IQR)")
    settings = result["settings"]
    ax.set_title(f"Training, LM {settings['lm_size']}{title_suffix}")
    ax.legend(fontsize=8)
    return save(fig, path)

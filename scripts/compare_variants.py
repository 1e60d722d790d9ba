"""Trains several configurations with the same data and budget, each in a fresh train_hf.py process (clean memory
figures), and compares their test scores, speed, size and position accuracy in OUTPUT_DIR/comparison.{md,json,png}.

From the repository root; every flag but --variants and --output_dir goes to train_hf.py unchanged:

    python -m scripts.compare_variants \\
        --variants mobilenet_single,mobilenet_multi,efficientnet_single,efficientnet_multi \\
        --output_dir outputs/variants --max_steps 200 --batch_size 16 --report_to none
"""

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

from matplotlib.figure import Figure

from metrics.caption_metrics import METRIC_KEYS

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO_ROOT / "configuration"
SUMMARY_KEYS = (
    *METRIC_KEYS,
    "train_samples_per_second",
    "eval_captions_per_second",
    "peak_memory_mb",
    "parameters_total",
    "parameters_trainable",
    "num_images",
)
POSITIONS = (
    "top left",
    "top right",
    "bottom left",
    "bottom right",
    "top",
    "bottom",
    "left",
    "right",
    "centre",
    "center",
    "middle",
)


def parse_args(argv=None) -> tuple[argparse.Namespace, list[str]]:
    """This script's own flags, and the training flags (everything else) that each train_hf.py run receives."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument(
        "--variants",
        required=True,
        help="Comma-separated configuration names, e.g. mobilenet_single,mobilenet_multi,efficientnet_single,"
        "efficientnet_multi (configuration/NAME.json).",
    )
    parser.add_argument(
        "--output_dir",
        default=str(REPO_ROOT / "outputs" / "variants"),
        help="Each variant trains into OUTPUT_DIR/NAME; the comparison files go here.",
    )
    args, training_flags = parser.parse_known_args(argv)
    args.variants = [name.strip() for name in args.variants.split(",") if name.strip()]
    if missing := [name for name in args.variants if not (CONFIG_DIR / f"{name}.json").is_file()]:
        known = ", ".join(sorted(path.stem for path in CONFIG_DIR.glob("*.json")))
        parser.error(f"--variants: no configuration/{missing[0]}.json. Known: {known}.")
    if has_flag(training_flags, "--config"):
        parser.error("--config: each variant's configuration/NAME.json is its config; name them in --variants.")
    return args, training_flags


def has_flag(flags: list[str], name: str) -> bool:
    return any(flag == name or flag.startswith(f"{name}=") for flag in flags)


def compare_variants(args, training_flags: list[str]) -> int:
    """Trains each variant in its own process, then writes the comparison; the exit code of the first failure."""
    if not (has_flag(training_flags, "--language_model") or has_flag(training_flags, "--text_config")):
        # a random 2B decoder cannot train on a CPU: keep each variant's real encoder, swap in tiny.json's decoder
        training_flags = [*training_flags, "--text_config", str(CONFIG_DIR / "tiny.json")]
    output_dir, summary = Path(args.output_dir), {}
    for name in args.variants:
        print(f"\n=== variant {name} ===", flush=True)
        command = [
            sys.executable,
            str(REPO_ROOT / "train_hf.py"),
            *training_flags,
            "--config",
            str(CONFIG_DIR / f"{name}.json"),
            "--output_dir",
            str(output_dir / name),
            "--skip_baselines",
        ]
        if code := subprocess.run(command).returncode:
            print(f"error: variant {name} failed (exit code {code}); its output is above.", file=sys.stderr)
            return code
        metrics = json.loads((output_dir / name / "metrics.json").read_text())
        rows = [json.loads(line) for line in (output_dir / name / "predictions.jsonl").read_text().splitlines()]
        accuracy, counted = position_accuracy(rows)
        summary[name] = {
            **{key: metrics[key] for key in SUMMARY_KEYS},
            "position_accuracy": accuracy,
            "position_images": counted,
        }
    write_comparison(output_dir, summary, training_flags)
    return 0


def position_phrases(text: str) -> set[str]:
    """Position phrases a caption states; 'top left' counts once, not also as 'top' and 'left'."""
    text, found = " " + re.sub(r"[^a-z ]", " ", text.lower()) + " ", set()
    for phrase in POSITIONS:
        if f" {phrase} " in text:
            found.add({"center": "centre", "middle": "centre"}.get(phrase, phrase))
            text = text.replace(f" {phrase} ", " ")
    return found


def position_accuracy(rows: list[dict]) -> tuple[float, int]:
    """Among images whose references state a position, how often the prediction states one of those positions."""
    scored = [(position_phrases(r["prediction"]), set().union(*map(position_phrases, r["references"]))) for r in rows]
    scored = [(pred, refs) for pred, refs in scored if refs]
    return (sum(bool(pred & refs) for pred, refs in scored) / len(scored) if scored else float("nan")), len(scored)


def write_comparison(output_dir: Path, summary: dict, training_flags: list[str]):
    (output_dir / "comparison.json").write_text(json.dumps({"args": training_flags, "variants": summary}, indent=2))
    lines = [
        "| variant | BLEU-4 | METEOR | ROUGE-L | CIDEr | position acc. | params (trainable) | train samples/s "
        "| eval captions/s | peak memory MB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in summary.items():
        meteor = "n/a" if m["meteor"] is None else f"{m['meteor']:.3f}"
        lines.append(
            f"| {name} | {m['bleu_4']:.3f} | {meteor} | {m['rouge_l']:.3f} | {m['cider']:.3f} "
            f"| {m['position_accuracy']:.2f} ({m['position_images']} img) | {m['parameters_total']:,} "
            f"({m['parameters_trainable']:,}) | {m['train_samples_per_second']:.1f} "
            f"| {m['eval_captions_per_second']:.1f} | {m['peak_memory_mb']:.0f} |"
        )
    table = "\n".join(lines)
    (output_dir / "comparison.md").write_text(table + "\n")
    print("\n" + table)
    fig = Figure(figsize=(12, 3.6), dpi=120)
    axes = fig.subplots(1, 3)
    for ax, key, title in zip(
        axes,
        ("cider", "position_accuracy", "train_samples_per_second"),
        ("CIDEr (test)", "position accuracy (test)", "training samples/s"),
        strict=True,
    ):
        ax.bar(list(summary), [m[key] for m in summary.values()], color=["#4c72b0", "#55a868", "#c44e52", "#8172b2"])
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(output_dir / "comparison.png")


def main(argv=None) -> int:
    return compare_variants(*parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

"""The token-budget study: what 1, 4, 9, 16 and 49 image tokens buy, on a frozen pretrained EfficientNet-Lite0 with
the projector and the tiny decoder trained on the synthetic aerial set, over several seeds; plus a trained-encoder
contrast and each budget's captioning speed. From the repository root:

    python -m scripts.token_study                    # the full study -> outputs/token_study/
    python -m scripts.token_study --quick            # a smoke run in seconds (what the tests run)
"""

import argparse
import json
import math
import re
import statistics
import sys
import time
from pathlib import Path

import datasets
import torch
from matplotlib.figure import Figure
from PIL import Image
from torch import nn
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from benchmarks.common import (
    PROMPT_IDS,
    attach_language_model,
    build_language_model,
    stub_text_config,
    summarize,
    time_in_rounds,
)
from cnngemma.backbones import from_backbones
from dataset_builder.demo import build_demo_dataset
from dataset_builder.synth import COLOURS, NUMBERS
from metrics.caption_metrics import compute_caption_metrics
from modeling_cnngemma import (
    CNNGemmaConfig,
    CNNGemmaForConditionalGeneration,
    CNNGemmaImageProcessor,
    CNNGemmaProcessor,
    build_caption_tokenizer,
)
from scripts.compare_variants import position_phrases
from scripts.convert_efficientnet_lite0 import IMAGE_MEAN, IMAGE_STD, convert, wheel_weights_path

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY_TEXT = json.loads((REPO_ROOT / "configuration" / "tiny.json").read_text())["text_config"]
ENCODER, IMAGE_SIZE = "efficientnet_lite0", 224
# Student's t quantiles (two-sided 95%) for n - 1 degrees of freedom: the interval of a mean over a few seeds
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}
ATTRIBUTES = ("position", "count", "colour")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("--output_dir", default=str(REPO_ROOT / "outputs" / "token_study"), help="Where it all goes.")
    parser.add_argument("--images", type=int, default=2000, help="Synthetic images (224 px), split 80/10/10.")
    parser.add_argument("--grids", default="1,2,3,4,7", help="Grid sides k: k*k image tokens (7: the whole 7x7 map).")
    parser.add_argument("--seeds", type=int, default=3, help="Seeds per budget for the frozen-encoder arms.")
    parser.add_argument("--steps", type=int, default=1000, help="Optimizer steps per frozen-encoder arm.")
    parser.add_argument(
        "--contrast_steps", type=int, default=250, help="Steps of each random-init, trained-encoder arm (0: none)."
    )
    parser.add_argument("--batch_size", type=int, default=32, help="Training pairs per step.")
    parser.add_argument("--learning_rate", type=float, default=2e-3, help="Peak AdamW learning rate.")
    parser.add_argument("--speed_lm", default="270m", help="Decoder shape for the captions/s timing (benchmarks).")
    parser.add_argument("--quick", action="store_true", help="Tiny sizes: a smoke run in seconds.")
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.grids, args.seeds, args.steps, args.contrast_steps = 40, "1,2", 1, 2, 1
        args.batch_size, args.speed_lm = 8, "tiny"
    args.grids = [int(k) for k in args.grids.split(",")]
    for name in ("images", "seeds", "steps", "batch_size"):
        if getattr(args, name) < (20 if name == "images" else 1):
            parser.error(f"--{name} {getattr(args, name)} is too small.")
    return args


class MapsIn(nn.Module):
    """Stands in for the frozen CNN: `forward_features` returns the precomputed (B, 1280, 7, 7) maps it is given as
    `pixel_values`, so pooling, projector, decoder and `generate` run CNNGemma's own code on them."""

    def __init__(self):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()), requires_grad=False)  # get_image_features reads its dtype

    def forward_features(self, maps):
        return maps


def stated(text: str, attribute: str) -> set[str]:
    """The positions, counts (number words) or colours a caption states."""
    if attribute == "position":
        return position_phrases(text)
    words = set(re.findall(r"[a-z]+", text.lower()))
    vocabulary = NUMBERS if attribute == "count" else COLOURS
    return {word for word in vocabulary if word in words}


def attribute_scores(predictions: list[str], references: list[list[str]]) -> dict:
    """Per attribute: accuracy over the images whose references state it (the prediction states one of those
    values), the best constant answer's accuracy on the same images, and how many images count."""
    scores = {}
    for attribute in ATTRIBUTES:
        rows = [
            (stated(p, attribute), set().union(*(stated(r, attribute) for r in refs)))
            for p, refs in zip(predictions, references, strict=True)
        ]
        rows = [(pred, refs) for pred, refs in rows if refs]
        values = set().union(*(refs for _, refs in rows)) if rows else set()
        constant = max((sum(v in refs for _, refs in rows) for v in values), default=0)
        scores[attribute] = sum(bool(pred & refs) for pred, refs in rows) / max(len(rows), 1)
        scores[f"{attribute}_constant"] = constant / max(len(rows), 1)
        scores[f"{attribute}_images"] = len(rows)
    return scores


def load_data(args, output_dir: Path):
    """Images (one row each, all their captions) of the train and held-out (validation + test) splits."""
    built = build_demo_dataset(output_dir / "synth", args.images, seed=0, size=IMAGE_SIZE)
    grouped = datasets.load_from_disk(str(built / "grouped"))
    held_out = datasets.concatenate_datasets([grouped[s] for s in ("validation", "test") if s in grouped])
    return grouped["train"], held_out


def feature_maps(tower, image_processor, images: datasets.Dataset, desc: str) -> torch.Tensor:
    """The frozen tower's (N, 1280, 7, 7) final maps, computed once."""
    maps = []
    with torch.inference_mode():
        for start in tqdm(range(0, len(images), 32), desc=desc, leave=False):
            pixels = image_processor(images[start : start + 32]["image"])["pixel_values"]
            maps.append(tower.forward_features(pixels.contiguous(memory_format=torch.channels_last)))
    return torch.cat(maps)


def grid_config(k: int, vocab_size: int) -> CNNGemmaConfig:
    return CNNGemmaConfig(
        vision_model_name=ENCODER,
        image_size=IMAGE_SIZE,
        token_mode="grid",
        token_grid=k,
        text_config={**TINY_TEXT, "vocab_size": vocab_size},
        image_token_id=4,
    )


def train_arm(model, processor, images, train, args, seed: int, steps: int, stops: set[int], desc: str):
    """AdamW with warmup and cosine decay over `steps`, on (image, caption) pairs drawn with a seeded generator;
    yields (in eval mode) at each step in `stops`. `images(rows)` gives the pixel_values of those train rows:
    precomputed maps (frozen arms) or processed images."""
    pairs = [(row, caption) for row, captions in enumerate(train["captions"]) for caption in captions]
    generator = torch.Generator().manual_seed(seed)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.learning_rate, weight_decay=0.01)
    scheduler = get_cosine_schedule_with_warmup(optimizer, min(100, steps // 10), steps)
    blank = Image.new("RGB", (1, 1))  # the text layout needs images; the pixels come from `images(rows)`
    model.train()
    for step in tqdm(range(1, steps + 1), desc=desc, leave=False):
        picks = torch.randint(len(pairs), (args.batch_size,), generator=generator).tolist()
        rows = [pairs[i][0] for i in picks]
        batch = processor(images=[blank] * len(rows), suffix=[pairs[i][1] for i in picks], do_resize=False)
        batch["pixel_values"] = images(rows)
        model(**batch).loss.backward()
        nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        if step in stops:
            model.eval()
            yield step
            model.train()


def caption(model, processor, images, count: int) -> list[str]:
    blank = Image.new("RGB", (1, 1))
    out = []
    with torch.inference_mode():
        for start in range(0, count, 64):
            rows = list(range(start, min(start + 64, count)))
            inputs = processor(images=[blank] * len(rows), do_resize=False)
            inputs["pixel_values"] = images(rows)
            generated = model.generate(**inputs, max_new_tokens=32, do_sample=False)
            out += processor.post_process_image_text_to_text(generated, input_ids=inputs["input_ids"])
    return out


def captions_per_second(args, grids: list[int]) -> dict[int, dict]:
    """Captions/s of each budget at batch 8 with random weights of the true shapes: EfficientNet-Lite0 at 224 px and
    the `--speed_lm` decoder, 20 new tokens, timed in interleaved rounds as `python -m benchmarks captioning` does."""
    language_model = build_language_model(args.speed_lm)
    batch, new_tokens = (2, 4) if args.quick else (8, 20)
    cases = {}
    for k in grids:
        config = CNNGemmaConfig(
            vision_model_name=ENCODER,
            image_size=IMAGE_SIZE,
            token_mode="grid",
            token_grid=k,
            text_config=stub_text_config(language_model.config.hidden_size),
            image_token_id=4,
        )
        model = attach_language_model(CNNGemmaForConditionalGeneration(config), language_model).eval()
        input_ids = torch.tensor([[4] * k * k + PROMPT_IDS] * batch)
        inputs = {
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),
            "pixel_values": torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0)),
        }
        kwargs = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False, "pad_token_id": 0}
        cases[k] = lambda m=model, i=inputs, g=kwargs: m.generate(**i, **g)
    with torch.inference_mode():
        for fn in cases.values():
            fn()  # warm-up
        times = time_in_rounds(cases, 1 if args.quick else 3, 0.0, torch.device("cpu"), log=lambda _: None)
    return {k: {**summarize([batch / t for t in times[k]]), "batch": batch, "lm": args.speed_lm} for k in grids}


def interval(values: list[float]) -> tuple[float, float, float]:
    """Mean and its two-sided 95% t-interval over seeds (a point for one seed)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, mean, mean
    half = T_975[len(values) - 1] * statistics.stdev(values) / math.sqrt(len(values))
    return mean, mean - half, mean + half


def write_report(output_dir: Path, runs: list[dict], speed: dict[int, dict], settings: dict) -> str:
    metrics = ("cider", "bleu_4", *ATTRIBUTES)
    lines = ["| tokens | arm | metric | mean | 95% interval | n |", "|---|---|---|---|---|---|"]
    summary = {}
    for arm in dict.fromkeys(r["arm"] for r in runs):
        for tokens in sorted({r["tokens"] for r in runs if r["arm"] == arm}):
            group = [r for r in runs if r["arm"] == arm and r["tokens"] == tokens]
            for metric in metrics:
                mean, low, high = interval([r[metric] for r in group])
                summary[f"{arm}/{tokens}/{metric}"] = {"mean": mean, "low": low, "high": high, "n": len(group)}
                lines.append(f"| {tokens} | {arm} | {metric} | {mean:.3f} | [{low:.3f}, {high:.3f}] | {len(group)} |")
    for attribute in ATTRIBUTES:
        constant = statistics.fmean(r[f"{attribute}_constant"] for r in runs)
        images = runs[0][f"{attribute}_images"]
        lines.append(f"| - | best constant answer | {attribute} | {constant:.3f} | - | {images} images |")
    for k, s in speed.items():
        lines.append(
            f"| {k * k} | speed, {s['lm']} decoder, batch {s['batch']} | captions/s | {s['median']:.2f} "
            f"| IQR {s['q1']:.2f}-{s['q3']:.2f} | {s['n']} runs |"
        )
    table = "\n".join(lines)
    (output_dir / "table.md").write_text(table + "\n")
    (output_dir / "results.json").write_text(
        json.dumps({"settings": settings, "runs": runs, "summary": summary, "speed": speed}, indent=1) + "\n"
    )
    plot(output_dir / "tokens.png", runs, speed, metrics)
    return table


def plot(path: Path, runs: list[dict], speed: dict[int, dict], metrics: tuple[str, ...]):
    fig = Figure(figsize=(3.2 * (len(metrics) + 1), 3.2), dpi=110)
    axes = fig.subplots(1, len(metrics) + 1)
    for ax, metric in zip(axes, metrics, strict=False):
        for arm, style in zip(dict.fromkeys(r["arm"] for r in runs), ("o-", "^:", "s--", "d-."), strict=False):
            tokens = sorted({r["tokens"] for r in runs if r["arm"] == arm})
            stats = [interval([r[metric] for r in runs if r["arm"] == arm and r["tokens"] == t]) for t in tokens]
            means = [s[0] for s in stats]
            errors = [
                [m - s[1] for m, s in zip(means, stats, strict=True)],
                [s[2] - m for m, s in zip(means, stats, strict=True)],
            ]
            ax.errorbar(tokens, means, yerr=errors, fmt=style, capsize=3, label=arm)
        if metric in ATTRIBUTES:
            ax.axhline(statistics.fmean(r[f"{metric}_constant"] for r in runs), color="grey", ls=":", label="constant")
        ax.set(xscale="log", xlabel="image tokens", title=metric)
    speed_axis = axes[-1]
    speed_axis.plot([k * k for k in speed], [s["median"] for s in speed.values()], "o-")
    speed_axis.set(xscale="log", xlabel="image tokens", title="captions/s", ylim=(0, None))
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    train, held_out = load_data(args, output_dir)
    references = [list(captions) for captions in held_out["captions"]]
    tokenizer = build_caption_tokenizer([c for captions in train["captions"] for c in captions], vocab_size=1024)
    weights = convert(wheel_weights_path(), output_dir / "efficientnet_lite0_imagenet.safetensors")
    image_processor = CNNGemmaImageProcessor(size=IMAGE_SIZE, image_mean=IMAGE_MEAN, image_std=IMAGE_STD)
    encoder, tokenizer = from_backbones(grid_config(7, len(tokenizer)), vision_pretrained=weights, tokenizer=tokenizer)
    tower = encoder.model.vision_tower.eval()
    maps = {
        "train": feature_maps(tower, image_processor, train, "train maps"),
        "held_out": feature_maps(tower, image_processor, held_out, "held-out maps"),
    }
    runs = []
    arms = [("frozen pretrained", k, seed, args.steps) for k in args.grids for seed in range(args.seeds)]
    if args.contrast_steps:
        arms += [("trained from scratch", k, 0, args.contrast_steps) for k in (min(args.grids), max(args.grids))]
    for arm, k, seed, steps in arms:
        arm_start = time.perf_counter()
        config = grid_config(k, len(tokenizer))
        torch.manual_seed(seed)
        model = CNNGemmaForConditionalGeneration(config)
        processor = CNNGemmaProcessor(image_processor, tokenizer, num_image_tokens=config.num_image_tokens)
        if arm == "frozen pretrained":
            model.model.vision_tower = MapsIn()
            model.set_trainable(vision_tower=False, multi_modal_projector=True, language_model=True)
            train_images = lambda rows: maps["train"][rows]  # noqa: E731 - the two arms differ only here
            held_out_images = lambda rows: maps["held_out"][rows]  # noqa: E731
        else:
            train_images = lambda rows: image_processor(train[rows]["image"])["pixel_values"]  # noqa: E731
            held_out_images = lambda rows: image_processor(held_out[rows]["image"])["pixel_values"]  # noqa: E731
        # frozen arms are also scored at the contrast arms' step count, the same steps and data as those
        stops = {steps, args.contrast_steps} if arm == "frozen pretrained" and args.contrast_steps else {steps}
        desc = f"{arm}, {k * k} tokens, seed {seed}"
        for step in train_arm(model, processor, train_images, train, args, seed, steps, stops, desc):
            predictions = caption(model, processor, held_out_images, len(held_out))
            scores = compute_caption_metrics(predictions, references, with_meteor=False)
            run = {"arm": f"{arm}, {step} steps", "tokens": k * k, "seed": seed, "steps": step, **scores}
            run.update(attribute_scores(predictions, references), seconds=time.perf_counter() - arm_start)
            runs.append(run)
            tqdm.write(
                f"{run['arm']}, {k * k:>2} tokens, seed {seed}: CIDEr {scores['cider']:.3f}, BLEU-4 "
                f"{scores['bleu_4']:.3f}, "
                + ", ".join(f"{a} {run[a]:.2f}" for a in ATTRIBUTES)
                + f" ({run['seconds']:.0f} s)"
            )
    speed = captions_per_second(args, args.grids)
    settings = {**vars(args), "encoder": ENCODER, "image_size": IMAGE_SIZE}
    settings.update(train_images=len(train), held_out_images=len(held_out), wall_s=time.perf_counter() - started)
    print(write_report(output_dir, runs, speed, settings))
    print(f"Wrote {output_dir}/table.md, results.json and tokens.png in {settings['wall_s'] / 60:.1f} min.")
    return 0


if __name__ == "__main__":
    sys.exit(main())

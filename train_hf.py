"""Fine-tune CNNGemma with Accelerate (one or more GPUs, or CPU), optionally with LoRA, and score it with coco-caption.

    python train_hf.py                      # CPU demo: synthetic aerial set, tiny config, learns in minutes
    accelerate launch train_hf.py --config configuration/mobilenet_single.json --dataset data/riscm \\
        --language_model google/paligemma-3b-pt-224 --vision_pretrained imagenet
"""

import argparse
import base64
import io
import json
import math
import os
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent
DEMO_DATA = REPO_ROOT / "outputs" / "synth"
DEFAULT_LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
METRIC_KEYS = ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "meteor", "rouge_l", "cider")


class UsageError(ValueError):
    """Bad input found before training starts: printed as one 'error: ...' line, exit code 2."""


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_argument_group("data and model")
    data.add_argument(
        "--config",
        default=str(REPO_ROOT / "configuration" / "tiny.json"),
        help="A configuration/*.json file (model shape). Default: the CPU demo's tiny.json.",
    )
    data.add_argument(
        "--dataset",
        default=None,
        help="A dataset_builder output folder or a Hub dataset id. Default: build (or reuse) the "
        f"synthetic aerial set in {DEMO_DATA.relative_to(REPO_ROOT)}/.",
    )
    data.add_argument("--synth_images", type=int, default=2000, help="Images in the default synthetic set.")
    data.add_argument(
        "--language_model",
        default=None,
        help="Gemma or PaliGemma checkpoint (folder or Hub id) for the decoder and tokenizer. "
        "Default: a randomly initialised decoder and a BPE tokenizer trained on the captions.",
    )
    data.add_argument(
        "--vision_pretrained",
        default=None,
        help="'imagenet' for timm's ImageNet weights (Hub), or a weights file. Default: timm init.",
    )
    data.add_argument("--tokenizer", default=None, help="Tokenizer folder to use with a random decoder.")
    data.add_argument(
        "--text_config",
        default=None,
        help="Take text_config and image_token_id from this configuration/*.json instead (e.g. a "
        "full variant's real encoder with tiny.json's decoder for CPU comparisons).",
    )
    data.add_argument(
        "--variants",
        default=None,
        help="Comma-separated configuration names (e.g. mobilenet_single,mobilenet_multi,"
        "efficientnet_single,efficientnet_multi): train each with the same data and budget in "
        "OUTPUT_DIR/NAME and write comparison.{md,json,png}.",
    )
    data.add_argument(
        "--output_dir",
        default=str(REPO_ROOT / "outputs" / "cnngemma-demo"),
        help="Where checkpoints, the final model, metrics.json and plots go.",
    )

    train = parser.add_argument_group("what trains")
    train.add_argument("--freeze_vision", action="store_true", help="Freeze the CNN (kept in eval mode).")
    train.add_argument(
        "--train_language_model",
        action="store_true",
        help="Fully train a pretrained decoder (frozen by default, as in the report). A randomly "
        "initialised decoder always trains.",
    )
    train.add_argument("--lora_r", type=int, default=0, help="LoRA rank on the decoder (0 = no LoRA).")
    train.add_argument("--lora_alpha", type=int, default=16, help="LoRA alpha.")
    train.add_argument("--lora_dropout", type=float, default=0.0, help="LoRA dropout.")
    train.add_argument(
        "--lora_target_modules",
        default=DEFAULT_LORA_TARGETS,
        help="Regex of the decoder modules that get LoRA adapters.",
    )
    train.add_argument(
        "--save_adapter_only",
        action="store_true",
        help="With LoRA, save only the adapter (default: merge it into the saved model).",
    )

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--learning_rate", type=float, default=2e-3, help="Peak learning rate for every part.")
    optim.add_argument(
        "--vision_lr", type=float, default=None, help="Learning rate of the CNN (default: --learning_rate)."
    )
    optim.add_argument("--projector_lr", type=float, default=None, help="Learning rate of the projector.")
    optim.add_argument("--language_model_lr", type=float, default=None, help="Learning rate of the decoder / LoRA.")
    optim.add_argument("--weight_decay", type=float, default=0.01, help="AdamW weight decay.")
    optim.add_argument("--warmup_steps", type=int, default=100, help="Linear warmup steps before the cosine decay.")
    optim.add_argument("--batch_size", type=int, default=32, help="Training pairs per device per micro-batch.")
    optim.add_argument("--gradient_accumulation_steps", type=int, default=1, help="Micro-batches per optimizer step.")
    optim.add_argument("--num_epochs", type=int, default=4, help="Epochs over the training pairs.")
    optim.add_argument("--max_steps", type=int, default=0, help="Optimizer steps; overrides --num_epochs when > 0.")
    optim.add_argument("--mixed_precision", choices=("no", "fp16", "bf16"), default="no", help="Autocast precision.")
    optim.add_argument("--gradient_checkpointing", action="store_true", help="Recompute decoder activations.")
    optim.add_argument("--augment", action="store_true", help="Random flips and 90-degree rotations of images.")
    optim.add_argument("--seed", type=int, default=42, help="Seed for weights, data order and augmentation.")
    optim.add_argument("--num_workers", type=int, default=0, help="DataLoader worker processes.")

    evaluation = parser.add_argument_group("evaluation")
    evaluation.add_argument(
        "--eval_steps", type=int, default=0, help="Evaluate on validation every N steps (0: end only)."
    )
    evaluation.add_argument("--eval_batch_size", type=int, default=64, help="Images per generate() call.")
    evaluation.add_argument("--max_eval_images", type=int, default=0, help="Cap on validation images (0: all).")
    evaluation.add_argument("--num_beams", type=int, default=1, help="Beam width for evaluation captions (1: greedy).")
    evaluation.add_argument("--max_new_tokens", type=int, default=32, help="Longest generated caption.")
    evaluation.add_argument(
        "--no_eval", action="store_true", help="Skip every evaluation (smoke tests, timing runs): no metrics.json."
    )
    evaluation.add_argument(
        "--skip_baselines", action="store_true", help="Do not score the untrained model and the image-blind baseline."
    )
    evaluation.add_argument(
        "--eval_only",
        action="store_true",
        help="Only evaluate --model on --eval_split and write metrics.json / predictions.jsonl.",
    )
    evaluation.add_argument("--model", default=None, help="With --eval_only: a saved model folder or Hub id.")
    evaluation.add_argument("--eval_split", default="test", help="With --eval_only: the split to score.")

    state = parser.add_argument_group("checkpoints and logging")
    state.add_argument("--checkpointing_steps", type=int, default=0, help="save_state every N steps (0: never).")
    state.add_argument("--checkpoints_total_limit", type=int, default=2, help="Keep the last K checkpoints.")
    state.add_argument("--resume_from_checkpoint", default=None, help="'latest' or a checkpoint folder.")
    state.add_argument(
        "--report_to",
        default="tensorboard",
        help="Accelerate trackers: tensorboard, wandb, trackio, all or none (missing ones are skipped).",
    )
    state.add_argument(
        "--logging_steps", type=int, default=20, help="Log loss / lr / samples per second every N steps."
    )
    args = parser.parse_args(argv)
    check_flags(args)
    return args


def check_flags(args):
    """Out-of-range flags fail before anything is loaded, naming the flag, the value and the range."""
    rules = [
        ("batch_size", args.batch_size >= 1, ">= 1"),
        ("eval_batch_size", args.eval_batch_size >= 1, ">= 1"),
        ("gradient_accumulation_steps", args.gradient_accumulation_steps >= 1, ">= 1"),
        ("num_epochs", args.num_epochs >= 1, ">= 1"),
        ("max_steps", args.max_steps >= 0, ">= 0"),
        ("learning_rate", args.learning_rate > 0, "> 0"),
        ("weight_decay", args.weight_decay >= 0, ">= 0"),
        ("warmup_steps", args.warmup_steps >= 0, ">= 0"),
        ("lora_r", args.lora_r >= 0, ">= 0"),
        ("lora_alpha", args.lora_alpha >= 1, ">= 1"),
        ("lora_dropout", 0 <= args.lora_dropout < 1, "in [0, 1)"),
        ("eval_steps", args.eval_steps >= 0, ">= 0"),
        ("max_eval_images", args.max_eval_images >= 0, ">= 0"),
        ("num_beams", args.num_beams >= 1, ">= 1"),
        ("max_new_tokens", args.max_new_tokens >= 1, ">= 1"),
        ("checkpointing_steps", args.checkpointing_steps >= 0, ">= 0"),
        ("checkpoints_total_limit", args.checkpoints_total_limit >= 1, ">= 1"),
        ("num_workers", args.num_workers >= 0, ">= 0"),
        ("synth_images", args.synth_images >= 20, ">= 20"),
        ("logging_steps", args.logging_steps >= 1, ">= 1"),
    ]
    rules += [
        (name, getattr(args, name) is None or getattr(args, name) > 0, "> 0")
        for name in ("vision_lr", "projector_lr", "language_model_lr")
    ]
    for name, ok, allowed in rules:
        if not ok:
            raise UsageError(f"--{name} {getattr(args, name)} is out of range; expected {allowed}.")
    if args.save_adapter_only and args.lora_r == 0:
        raise UsageError("--save_adapter_only needs LoRA: set --lora_r > 0.")
    if args.eval_only and not args.model:
        raise UsageError("--eval_only needs --model (a saved model folder or Hub id).")
    if not Path(args.config).is_file():
        raise UsageError(f"--config {args.config}: no such file. Use one of configuration/*.json.")


# ----------------------------------------------------------------------------- data
def load_caption_dataset(path_or_id: str | None, num_synth_images: int, seed: int):
    """The pair DatasetDict (image, image_id, caption) with train and validation/test splits."""
    import datasets

    if path_or_id is None:
        path_or_id = str(build_demo_dataset(num_synth_images, seed))
    if Path(path_or_id).exists():
        if not (Path(path_or_id) / "dataset_dict.json").is_file():
            raise UsageError(
                f"--dataset {path_or_id}: not a dataset_builder output (no dataset_dict.json). "
                "Build one with `python -m dataset_builder build ...`."
            )
        dataset = datasets.load_from_disk(path_or_id)
    elif path_or_id.startswith((".", "/", "~")) or path_or_id.count("/") > 1:
        raise UsageError(f"--dataset {path_or_id}: no such folder.")
    elif os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        raise UsageError(f"--dataset {path_or_id} looks like a Hub id, but HF_HUB_OFFLINE=1; pass a local folder.")
    else:
        dataset = datasets.load_dataset(path_or_id)
    needed = {"image", "image_id", "caption"}
    for split, part in dataset.items():
        if missing := needed - set(part.column_names):
            raise UsageError(
                f"--dataset {path_or_id}: split {split!r} has columns {sorted(part.column_names)}, "
                f"missing {sorted(missing)}. Expected dataset_builder's image, image_id and caption."
            )
    if "train" not in dataset or not ({"validation", "test"} & set(dataset)):
        raise UsageError(
            f"--dataset {path_or_id}: splits {sorted(dataset)}; expected 'train' and at least one of "
            "'validation' or 'test'."
        )
    return dataset


def build_demo_dataset(num_images: int, seed: int) -> Path:
    """Synthesises (once) the aerial demo set and builds it with dataset_builder; reused when already there."""
    from dataset_builder.build import build
    from dataset_builder.synth import synthesize

    raw, built = DEMO_DATA / f"raw-{num_images}-{seed}", DEMO_DATA / f"dataset-{num_images}-{seed}"
    if not (built / "dataset_dict.json").is_file():
        if not (raw / "captions.csv").is_file():
            # drawn at the tiny config's 128 px: the same pictures the model sees, made and decoded 3x faster
            synthesize(raw, num_images=num_images, seed=seed, size=128)
        build(raw / "captions.csv", built, images=raw / "resized")
    return built


def group_by_image(pairs, max_images: int = 0):
    """One row per image with all its reference captions, from a pair split (first row of each image)."""
    first_row, references = {}, {}
    for row, (image_id, caption) in enumerate(zip(pairs["image_id"], pairs["caption"], strict=True)):
        first_row.setdefault(image_id, row)
        references.setdefault(image_id, []).append(caption)
    image_ids = list(first_row)[: max_images or None]
    images = pairs.select([first_row[i] for i in image_ids])
    return images, [references[i] for i in image_ids], image_ids


def augment(pixel_values, generator):
    """Random horizontal/vertical flips and 90-degree rotations: aerial scenes have no up. Deterministic per step."""
    import torch

    flips = torch.randint(0, 2, (pixel_values.shape[0], 3), generator=generator)
    out = []
    for image, (h, v, r) in zip(pixel_values, flips.tolist(), strict=True):
        image = image.flip(-1) if h else image
        image = image.flip(-2) if v else image
        out.append(image.rot90(1, dims=(-2, -1)) if r else image)
    return torch.stack(out)


# ----------------------------------------------------------------------------- model
def build_model_and_processor(args, train_captions):
    from transformers import AutoTokenizer

    from modeling_cnngemma import (
        CNNGemmaConfig,
        CNNGemmaForConditionalGeneration,
        CNNGemmaProcessor,
        build_caption_tokenizer,
    )

    config = CNNGemmaConfig.from_json_file(args.config)
    if args.text_config:
        donor = CNNGemmaConfig.from_json_file(args.text_config)
        config = CNNGemmaConfig.from_dict(
            {**config.to_dict(), "text_config": donor.text_config.to_dict(), "image_token_id": donor.image_token_id}
        )
    tokenizer = None
    if args.language_model is None:
        if args.tokenizer:
            tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
        else:
            tokenizer = build_caption_tokenizer(
                train_captions, vocab_size=config.text_config.vocab_size, prompts=[config.prompt_prefix]
            )
    vision = args.vision_pretrained
    vision = True if vision == "imagenet" else (vision or False)
    try:
        model, tokenizer = CNNGemmaForConditionalGeneration.from_backbones(
            config, language_model=args.language_model, vision_pretrained=vision, tokenizer=tokenizer
        )
    except (OSError, ValueError) as error:
        raise UsageError(str(error)) from error
    return model, CNNGemmaProcessor.from_model_config(model.config, tokenizer)


def apply_training_policy(model, args):
    """Sets what trains (report: CNN + projector, pretrained LM frozen) and wraps LoRA adapters when asked."""
    train_lm = args.language_model is None or args.train_language_model
    model.set_trainable(
        vision_tower=not args.freeze_vision, multi_modal_projector=True, language_model=train_lm and args.lora_r == 0
    )
    if args.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if args.lora_r == 0:
        return model
    from peft import LoraConfig, get_peft_model

    to_save = ["multi_modal_projector"] + ([] if args.freeze_vision else ["vision_tower"])
    lora = LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=args.lora_target_modules,
        modules_to_save=to_save,
    )
    return get_peft_model(model, lora)


def param_groups(model, args):
    groups = {"vision_tower": [], "multi_modal_projector": [], "language_model": []}
    for name, param in model.named_parameters():
        if param.requires_grad:
            part = next((p for p in ("vision_tower", "multi_modal_projector") if p in name), "language_model")
            groups[part].append(param)
    lrs = {
        "vision_tower": args.vision_lr,
        "multi_modal_projector": args.projector_lr,
        "language_model": args.language_model_lr,
    }
    return [
        {"params": params, "lr": lrs[part] or args.learning_rate, "name": part}
        for part, params in groups.items()
        if params
    ]


def peak_memory_mb(device) -> float:
    """Peak GPU memory allocated by torch, or on CPU the process's peak resident set size."""
    import resource

    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def count_parameters(model) -> dict:
    unique = {id(p): p for p in model.parameters()}.values()
    return {"total": sum(p.numel() for p in unique), "trainable": sum(p.numel() for p in unique if p.requires_grad)}


# ----------------------------------------------------------------------------- evaluation
class CaptionScorer:
    """coco-caption metrics through the project's `evaluate` module (loaded once, by path, offline)."""

    def __init__(self):
        import evaluate

        self.metric = evaluate.load(str(REPO_ROOT / "metrics" / "caption_metrics"))

    def __call__(self, predictions, references) -> dict:
        return self.metric.compute(predictions=predictions, references=references)


def generate_captions(accelerator, model, processor, images, args, desc: str) -> tuple[list[str], list[int]]:
    """Greedy or beam captions for a Dataset of images, sharded over processes and gathered without duplicates.
    Also returns how many images each process captioned (the last batch may be padded with repeats)."""
    import torch
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    def collate(rows):
        inputs = processor(images=[row["image"] for row in rows])
        inputs["index"] = torch.tensor([row["index"] for row in rows])
        return inputs

    indexed = images.select_columns(["image"]).add_column("index", list(range(len(images))))
    loader = accelerator.prepare_data_loader(DataLoader(indexed, batch_size=args.eval_batch_size, collate_fn=collate))
    unwrapped = accelerator.unwrap_model(model)
    was_training = unwrapped.training
    unwrapped.eval()
    local = []
    for batch in tqdm(loader, desc=desc, disable=not accelerator.is_local_main_process, leave=False):
        index = batch.pop("index")
        with torch.inference_mode(), accelerator.autocast():
            generated = unwrapped.generate(
                **batch, max_new_tokens=args.max_new_tokens, num_beams=args.num_beams, do_sample=False
            )
        captions = processor.post_process_image_text_to_text(generated, input_ids=batch["input_ids"])
        local.extend(zip(index.tolist(), captions, strict=True))
    unwrapped.train(was_training)
    gathered = accelerator.gather_for_metrics(local, use_gather_object=True)
    counts = accelerator.gather_for_metrics([len(local)], use_gather_object=True)
    by_index = dict(gathered)
    assert sorted(by_index) == list(range(len(images))), "every image must be captioned exactly once"
    return [by_index[i] for i in range(len(images))], counts


def evaluate_split(accelerator, model, processor, scorer, grouped, args, step: int, split: str) -> tuple[dict, list]:
    images, references, image_ids = grouped
    start = time.perf_counter()
    predictions, counts = generate_captions(accelerator, model, processor, images, args, desc=f"captioning {split}")
    seconds = time.perf_counter() - start
    result = {
        "split": split,
        "step": step,
        "num_images": len(predictions),
        "eval_captions_per_second": len(predictions) / seconds,
        "images_per_process": counts,
    }
    if accelerator.is_main_process:
        result.update(scorer(predictions, references))
    rows = [
        {"image_id": i, "prediction": p, "references": r}
        for i, p, r in zip(image_ids, predictions, references, strict=True)
    ]
    return result, rows


def best_constant_caption(train_captions, val_references, max_candidates: int = 100) -> str:
    """The image-blind baseline: the training caption with the highest CIDEr-D as the answer for every validation
    image. Candidates are the most frequent training captions (case/space-normalised), scored with pycocoevalcap's
    CIDEr-D on lower-cased, punctuation-free tokens."""
    import re

    from pycocoevalcap.cider.cider import Cider

    def tokens(text):
        return " ".join(re.findall(r"[a-z0-9]+", text.lower()))

    counts = Counter(tokens(c) for c in train_captions)
    original = {}
    for caption in train_captions:
        original.setdefault(tokens(caption), caption.strip())
    refs = {i: [tokens(r) for r in references] for i, references in enumerate(val_references)}
    best, best_score = None, -1.0
    for candidate, _ in counts.most_common(max_candidates):
        score, _ = Cider().compute_score(refs, {i: [candidate] for i in refs})
        if score > best_score:
            best, best_score = candidate, score
    return original[best]


# ----------------------------------------------------------------------------- checkpoints
def checkpoint_dirs(output_dir: Path) -> list[Path]:
    folder = output_dir / "checkpoints"
    return sorted(folder.glob("step_*"), key=lambda p: int(p.name.split("_")[1])) if folder.is_dir() else []


def resolve_resume(args) -> Path | None:
    if not args.resume_from_checkpoint:
        return None
    if args.resume_from_checkpoint == "latest":
        found = checkpoint_dirs(Path(args.output_dir))
        if not found:
            raise UsageError(
                f"--resume_from_checkpoint latest: no checkpoint in {Path(args.output_dir) / 'checkpoints'}."
            )
        return found[-1]
    path = Path(args.resume_from_checkpoint)
    if not (path / "training_state.json").is_file():
        raise UsageError(
            f"--resume_from_checkpoint {path}: not a checkpoint folder (no training_state.json). "
            "Pass 'latest' or an OUTPUT_DIR/checkpoints/step_N folder."
        )
    return path


def save_checkpoint(accelerator, output_dir: Path, state: dict, keep: int):
    """save_state into a temporary folder, then rename it: a killed run never leaves a half-written checkpoint."""
    final = output_dir / "checkpoints" / f"step_{state['global_step']:06d}"
    partial = final.with_name(f".partial-{final.name}")
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (partial / "training_state.json").write_text(json.dumps(state))
        os.replace(partial, final)
        for old in checkpoint_dirs(output_dir)[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()


# ----------------------------------------------------------------------------- reports
def write_loss_curve(history: list[tuple[int, float]], path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not history:
        return
    steps, losses = zip(*history, strict=True)
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot(steps, losses, lw=1)
    ax.set(xlabel="optimizer step", ylabel="training loss", yscale="log", title="CNNGemma training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_gallery(images, rows, path: Path, count: int = 12):
    """An HTML page with each image, its prediction and its references."""
    import html

    cells = []
    for image, row in zip(images.select(range(min(count, len(images))))["image"], rows, strict=False):
        buffer = io.BytesIO()
        image.convert("RGB").resize((192, 192)).save(buffer, "JPEG", quality=85)
        refs = "".join(f"<li>{html.escape(r)}</li>" for r in row["references"])
        cells.append(
            f'<figure><img src="data:image/jpeg;base64,{base64.b64encode(buffer.getvalue()).decode()}">'
            f"<figcaption><b>{html.escape(row['image_id'])}</b><br>prediction: <i>{html.escape(row['prediction'])}"
            f"</i><ul>{refs}</ul></figcaption></figure>"
        )
    style = "body{font-family:sans-serif}figure{display:inline-block;width:260px;vertical-align:top;margin:8px}"
    path.write_text(
        f"<html><head><meta charset='utf-8'><style>{style}</style></head><body>"
        f"<h1>CNNGemma test captions</h1>{''.join(cells)}</body></html>"
    )


def results_table(rows: dict[str, dict]) -> str:
    header = f"| {'model':<22} | BLEU-4 | METEOR | ROUGE-L | CIDEr |"
    lines = [header, "|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|"]
    for name, m in rows.items():
        meteor = "n/a" if m.get("meteor") is None else f"{m['meteor']:.3f}"
        lines.append(f"| {name:<22} | {m['bleu_4']:.3f}  | {meteor:<6} | {m['rouge_l']:.3f}   | {m['cider']:.3f} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- training
def make_accelerator(args):
    import torch
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed

    trackers = [] if args.report_to == "none" else ["all"] if args.report_to == "all" else args.report_to.split(",")
    available = [t for t in trackers if t == "all" or _installed(t)]
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=available or None,
        project_config=ProjectConfiguration(
            project_dir=args.output_dir, logging_dir=str(Path(args.output_dir) / "logs")
        ),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    set_seed(args.seed)
    return accelerator


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def training_function(args):
    import torch
    from accelerate.utils import set_seed
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm
    from transformers import get_cosine_schedule_with_warmup

    output_dir = Path(args.output_dir)
    resume = resolve_resume(args)
    accelerator = make_accelerator(args)
    log = accelerator.print
    with accelerator.main_process_first():
        dataset = load_caption_dataset(args.dataset, args.synth_images, args.seed)
    train_pairs = dataset["train"]
    val_split = "validation" if "validation" in dataset else "test"
    test_split = "test" if "test" in dataset else "validation"
    val = group_by_image(dataset[val_split], args.max_eval_images)
    test = group_by_image(dataset[test_split])

    set_seed(args.seed)
    model, processor = build_model_and_processor(args, train_pairs["caption"])
    model = apply_training_policy(model, args)
    counts = count_parameters(model)
    log(
        f"CNNGemma {model.config.vision_model_name} ({model.config.token_mode}, {model.config.num_image_tokens} "
        f"tokens) | {counts['total']:,} parameters, {counts['trainable']:,} trainable | {accelerator.num_processes} "
        f"process(es) on {accelerator.device} | train {len(train_pairs):,} pairs, {val_split} {len(val[0]):,} images, "
        f"{test_split} {len(test[0]):,} images"
    )

    def collate(rows):
        return processor(images=[row["image"] for row in rows], suffix=[row["caption"] for row in rows])

    train_loader = DataLoader(
        train_pairs.select_columns(["image", "caption"]),
        batch_size=args.batch_size,
        shuffle=True,
        collate_fn=collate,
        num_workers=args.num_workers,
        drop_last=True,
    )
    optimizer = torch.optim.AdamW(param_groups(model, args), weight_decay=args.weight_decay)
    updates_per_epoch = math.ceil(len(train_loader) / args.gradient_accumulation_steps)
    max_steps = args.max_steps or args.num_epochs * updates_per_epoch
    num_epochs = math.ceil(max_steps / updates_per_epoch)
    scheduler = get_cosine_schedule_with_warmup(optimizer, min(args.warmup_steps, max_steps // 5), max_steps)
    model, optimizer, train_loader, scheduler = accelerator.prepare(model, optimizer, train_loader, scheduler)

    scorer = CaptionScorer() if accelerator.is_main_process and not args.no_eval else None
    results = {}
    if not (args.skip_baselines or args.no_eval) and resume is None:
        untrained, _ = evaluate_split(accelerator, model, processor, scorer, test, args, 0, test_split)
        results["untrained model"] = untrained
        if accelerator.is_main_process:
            constant = best_constant_caption(train_pairs["caption"], val[1])
            blind = {"split": test_split, "caption": constant, **scorer([constant] * len(test[1]), test[1])}
            results["image-blind baseline"] = blind
            log(f"image-blind baseline caption: {constant!r}")

    config = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in vars(args).items()}
    accelerator.init_trackers("cnngemma", config=config)
    global_step, start_epoch, skip_batches, history, loss_history = 0, 0, 0, [], []
    if resume is not None:
        accelerator.load_state(str(resume))
        state = json.loads((resume / "training_state.json").read_text())
        global_step, start_epoch, skip_batches = state["global_step"], state["epoch"], state["batches_in_epoch"]
        history, loss_history = state["history"], [tuple(x) for x in state["loss_history"]]
        log(f"resumed from {resume} at step {global_step} (epoch {start_epoch}, batch {skip_batches})")

    progress = tqdm(
        total=max_steps, initial=global_step, desc="training", disable=not accelerator.is_local_main_process
    )
    model.train()
    window_loss, window_samples, window_start = 0.0, 0, time.perf_counter()
    train_seconds, train_samples, tick = 0.0, 0, time.perf_counter()  # excludes evaluation and checkpoints
    for epoch in range(start_epoch, num_epochs):
        train_loader.set_epoch(epoch)
        loader = accelerator.skip_first_batches(train_loader, skip_batches) if skip_batches else train_loader
        batches_in_epoch, skip_batches = skip_batches, 0
        for batch in loader:
            batches_in_epoch += 1
            if args.augment:
                generator = torch.Generator().manual_seed(args.seed * 1_000_003 + global_step)
                batch["pixel_values"] = augment(batch["pixel_values"].cpu(), generator).to(accelerator.device)
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            window_loss += loss.detach().float().item()
            window_samples += batch["input_ids"].shape[0] * accelerator.num_processes
            train_samples += batch["input_ids"].shape[0] * accelerator.num_processes
            train_seconds, tick = train_seconds + time.perf_counter() - tick, time.perf_counter()
            if not accelerator.sync_gradients:
                continue
            global_step += 1
            progress.update(1)
            if global_step % args.logging_steps == 0 or global_step == max_steps:
                elapsed = time.perf_counter() - window_start
                mean_loss = window_loss / (args.logging_steps * args.gradient_accumulation_steps)
                metrics = {
                    "train/loss": mean_loss,
                    "train/lr": scheduler.get_last_lr()[0],
                    "train/samples_per_second": window_samples / elapsed,
                }
                accelerator.log(metrics, step=global_step)
                loss_history.append((global_step, mean_loss))
                progress.set_postfix(
                    loss=f"{mean_loss:.3f}",
                    lr=f"{metrics['train/lr']:.1e}",
                    samples_s=f"{metrics['train/samples_per_second']:.0f}",
                )
                window_loss, window_samples, window_start = 0.0, 0, time.perf_counter()
            if args.eval_steps and not args.no_eval and global_step % args.eval_steps == 0 and global_step < max_steps:
                result, _ = evaluate_split(accelerator, model, processor, scorer, val, args, global_step, val_split)
                history.append(result)
                accelerator.log(
                    {f"{val_split}/{k}": result[k] for k in METRIC_KEYS if result.get(k) is not None}, step=global_step
                )
                log(f"step {global_step}: {val_split} CIDEr {result.get('cider', float('nan')):.3f}")
            if args.checkpointing_steps and global_step % args.checkpointing_steps == 0:
                state = {
                    "global_step": global_step,
                    "epoch": epoch,
                    "batches_in_epoch": batches_in_epoch,
                    "history": history,
                    "loss_history": loss_history,
                }
                if batches_in_epoch == len(train_loader):
                    state.update(epoch=epoch + 1, batches_in_epoch=0)
                save_checkpoint(accelerator, output_dir, state, args.checkpoints_total_limit)
            tick = time.perf_counter()
            if global_step >= max_steps:
                break
        if global_step >= max_steps:
            break
    progress.close()
    save_final_model(accelerator, model, processor, args)
    if accelerator.is_main_process:
        (output_dir / "train_args.json").write_text(json.dumps(vars(args), indent=2, default=str) + "\n")
        write_loss_curve(loss_history, output_dir / "loss_curve.png")
    if args.no_eval:
        accelerator.end_training()  # also ends the process group: last
        return

    result, _ = evaluate_split(accelerator, model, processor, scorer, val, args, global_step, val_split)
    history.append(result)
    final, rows = evaluate_split(accelerator, model, processor, scorer, test, args, global_step, test_split)
    results["trained model"] = final
    final.update(
        train_samples_per_second=train_samples / max(train_seconds, 1e-9),
        parameters_total=counts["total"],
        parameters_trainable=counts["trainable"],
        peak_memory_mb=peak_memory_mb(accelerator.device),
    )
    if accelerator.is_main_process:
        write_outputs(output_dir, final, history, results, rows, test)
        report(results, rows, test_split)
    accelerator.wait_for_everyone()
    accelerator.end_training()


def save_final_model(accelerator, model, processor, args):
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    if args.lora_r and not args.save_adapter_only:
        unwrapped = unwrapped.merge_and_unload()  # a plain CNNGemma again, loadable without peft
    # with --save_adapter_only this is PeftModel.save_pretrained: adapter_config.json + adapter weights
    unwrapped.save_pretrained(
        args.output_dir, save_function=accelerator.save, is_main_process=accelerator.is_main_process
    )
    if accelerator.is_main_process:
        processor.save_pretrained(args.output_dir)


def write_outputs(output_dir, final, history, results, rows, test):
    metrics = {**final, "history": history, "baselines": {k: v for k, v in results.items() if k != "trained model"}}
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    with open(output_dir / "predictions.jsonl", "w") as file:
        for row in rows:
            file.write(json.dumps(row) + "\n")
    write_gallery(test[0], rows, output_dir / "samples.html")


def report(results: dict, rows: list, split: str):
    print(f"\n{split} split, {len(rows)} images:\n" + results_table(results))
    print("\nsample captions:")
    for row in rows[:3]:
        print(f"  {row['image_id']}: {row['prediction']!r}\n      reference: {row['references'][0]!r}")


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


def position_phrases(text: str) -> set[str]:
    """Position phrases a caption states; 'top left' counts once, not also as 'top' and 'left'."""
    import re

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


def compare_variants(args, argv: list[str]):
    """Trains each named configuration with the same data and budget, each in a fresh process (clean memory
    figures), then writes OUTPUT_DIR/comparison.{json,md,png}."""
    import subprocess

    names = [name.strip() for name in args.variants.split(",") if name.strip()]
    configs = {name: REPO_ROOT / "configuration" / f"{name}.json" for name in names}
    if missing := [name for name, path in configs.items() if not path.is_file()]:
        raise UsageError(
            f"--variants: no configuration/{missing[0]}.json. Known: "
            f"{', '.join(sorted(p.stem for p in (REPO_ROOT / 'configuration').glob('*.json')))}."
        )
    passthrough, skip = [], False
    for token in argv:
        if skip:
            skip = False
        elif token in ("--variants", "--config", "--output_dir"):
            skip = True
        elif not token.startswith(("--variants=", "--config=", "--output_dir=")):
            passthrough.append(token)
    if args.language_model is None and args.text_config is None:
        # a random 2B decoder cannot train on a CPU: keep each variant's real encoder, swap in tiny.json's decoder
        passthrough += ["--text_config", str(REPO_ROOT / "configuration" / "tiny.json")]
    output_dir, summary = Path(args.output_dir), {}
    for name, config in configs.items():
        print(f"\n=== variant {name} ===", flush=True)
        command = [
            sys.executable,
            str(Path(__file__).resolve()),
            *passthrough,
            "--config",
            str(config),
            "--output_dir",
            str(output_dir / name),
            "--skip_baselines",
        ]
        subprocess.run(command, check=True)
        metrics = json.loads((output_dir / name / "metrics.json").read_text())
        rows = [json.loads(line) for line in (output_dir / name / "predictions.jsonl").read_text().splitlines()]
        accuracy, counted = position_accuracy(rows)
        summary[name] = {
            **{
                k: metrics[k]
                for k in (
                    *METRIC_KEYS,
                    "train_samples_per_second",
                    "eval_captions_per_second",
                    "peak_memory_mb",
                    "parameters_total",
                    "parameters_trainable",
                    "num_images",
                )
            },
            "position_accuracy": accuracy,
            "position_images": counted,
        }
    write_comparison(output_dir, summary, passthrough)


def write_comparison(output_dir: Path, summary: dict, passthrough: list[str]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (output_dir / "comparison.json").write_text(json.dumps({"args": passthrough, "variants": summary}, indent=2))
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
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6), dpi=120)
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
    plt.close(fig)


def evaluation_function(args):
    """--eval_only: score a saved model (folder or Hub id) on one split; same metrics.json and predictions.jsonl."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    accelerator = make_accelerator(args)
    dataset = load_caption_dataset(args.dataset, args.synth_images, args.seed)
    if args.eval_split not in dataset:
        raise UsageError(f"--eval_split {args.eval_split}: the dataset has splits {sorted(dataset)}.")
    if not Path(args.model).exists() and (args.model.startswith((".", "/", "~")) or args.model.count("/") > 1):
        raise UsageError(f"--model {args.model}: no such folder.")
    model = AutoModelForImageTextToText.from_pretrained(args.model, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(args.model, trust_remote_code=True)
    model = accelerator.prepare(model)
    grouped = group_by_image(dataset[args.eval_split], args.max_eval_images)
    scorer = CaptionScorer() if accelerator.is_main_process else None
    result, rows = evaluate_split(accelerator, model, processor, scorer, grouped, args, 0, args.eval_split)
    if accelerator.is_main_process:
        output_dir = Path(args.output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "metrics.json").write_text(json.dumps({**result, "model": args.model}, indent=2) + "\n")
        with open(output_dir / "predictions.jsonl", "w") as file:
            file.writelines(json.dumps(row) + "\n" for row in rows)
        report({"model": result}, rows, args.eval_split)


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
        if args.variants:
            compare_variants(args, list(sys.argv[1:] if argv is None else argv))
        else:
            (evaluation_function if args.eval_only else training_function)(args)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

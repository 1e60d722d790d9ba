"""Scores CNNGemma captions with coco-caption: generation sharded over processes, the baselines, the results table,
the gallery, metrics.json / predictions.jsonl, and the command that scores a saved model (below).

    python -m metrics.evaluation --model outputs/cnngemma-demo                   # the demo's synthetic test split
    accelerate launch -m metrics.evaluation --model you/cnngemma --dataset data/riscm --split test
"""

import argparse
import base64
import html
import io
import json
import re
import sys
import time
from collections import Counter
from pathlib import Path

import datasets
import evaluate
import torch
from accelerate import Accelerator
from pycocoevalcap.cider.cider import Cider
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from cnngemma import adapters
from cnngemma.errors import RunError, UsageError, check_ranges, first_line, path_type, run_command
from cnngemma.inference import check_generation_length, compiled_generation, load_model
from cnngemma.int8 import quantize_int8
from cnngemma.outputs import check_replaceable, replace_folder
from dataset_builder.demo import build_demo_dataset
from modeling_cnngemma import check_source

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_DATA = REPO_ROOT / "outputs" / "synth"
TOOL = "metrics.evaluation"
OUTPUT_FILES = ("metrics.json", "predictions.jsonl", "samples.html")


def legacy_output(folder: Path) -> list[str] | None:
    """An evaluation output of an earlier version (no record): its three files, and no model (a training run's folder
    holds these files too, beside config.json). Anything else in it is kept."""
    present = {p.name for p in folder.iterdir()}
    return list(OUTPUT_FILES) if set(OUTPUT_FILES) <= present and "config.json" not in present else None


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument(
        "--model", required=True, type=path_type, help="A saved model folder (train_hf.py's output) or a Hub id."
    )
    parser.add_argument(
        "--dataset",
        default=None,
        type=path_type,
        help="A dataset_builder output folder or a Hub dataset id. Default: build (or reuse) the synthetic aerial "
        f"set in {DEMO_DATA.relative_to(REPO_ROOT)}/, as train_hf.py does.",
    )
    parser.add_argument("--synth_images", type=int, default=2000, help="Images in the default synthetic set.")
    parser.add_argument(
        "--synth_size", type=int, default=128, help="Image side of the default synthetic set (224 for real CNNs)."
    )
    parser.add_argument("--seed", type=int, default=42, help="Seed of the default synthetic set.")
    parser.add_argument("--split", default="test", help="The split to score.")
    parser.add_argument(
        "--output_dir",
        default=str(REPO_ROOT / "outputs" / "eval"),
        type=path_type,
        help="Where metrics.json, predictions.jsonl and samples.html go: a new or empty folder, or an earlier output of "
        "this command, which is replaced once the new one is written.",
    )
    parser.add_argument("--mixed_precision", choices=("no", "fp16", "bf16"), default="no", help="Autocast precision.")
    parser.add_argument("--max_eval_images", type=int, default=0, help="Cap on the images scored (0: all).")
    parser.add_argument(
        "--quantize",
        choices=("none", "int8"),
        default="none",
        help="int8: score the int8 decoding of caption.py --quantize int8 (runs on CPU).",
    )
    adapters.add_base_argument(parser, "--adapter_base")
    add_generation_arguments(parser)
    args = parser.parse_args(argv)
    rules = [
        ("synth_images", args.synth_images >= 20, ">= 20"),
        ("synth_size", args.synth_size >= 32, ">= 32"),
        ("max_eval_images", args.max_eval_images >= 0, ">= 0"),
        ("mixed_precision", args.quantize == "none" or args.mixed_precision == "no", "no with --quantize int8"),
    ]
    check_ranges(args, rules + generation_rules(args))
    return args


def add_generation_arguments(group):
    """The flags `generate_captions` reads, shared with train_hf.py."""
    group.add_argument("--eval_batch_size", type=int, default=64, help="Images per generate() call.")
    group.add_argument("--num_beams", type=int, default=1, help="Beam width for captions (1: greedy).")
    group.add_argument("--max_new_tokens", type=int, default=32, help="Longest generated caption.")
    group.add_argument(
        "--compile_generation",
        action="store_true",
        help="Greedy captions on caption.py --compile's path (static cache, compiled decode steps; with --quantize "
        "int8 too): in fp32 the same captions, after a one-off compile per batch size. Off by default: on CPU a new "
        "token is 12%% faster in fp32 and 38%% in int8 after 1.5-2 minutes' compile; not yet measured on GPU.",
    )


def generation_rules(args) -> list[tuple[str, bool, str]]:
    return [
        ("eval_batch_size", args.eval_batch_size >= 1, ">= 1"),
        ("num_beams", args.num_beams >= 1, ">= 1"),
        ("max_new_tokens", args.max_new_tokens >= 1, ">= 1"),
        ("num_beams", args.num_beams == 1 or not args.compile_generation, "1 with --compile_generation"),
    ]


def load_caption_dataset(
    path_or_id: str | None, num_synth_images: int, seed: int, synth_size: int = 128
) -> datasets.DatasetDict:
    """The pair DatasetDict (image, image_id, caption) with train and validation/test splits. Call it inside
    `main_process_first()`: the default synthetic set is written on first use."""
    if path_or_id is None:
        path_or_id = str(build_demo_dataset(DEMO_DATA, num_synth_images, seed, synth_size))
    try:
        check_source(path_or_id, "--dataset")
    except OSError as error:
        raise UsageError(str(error)) from error
    if Path(path_or_id).exists():
        if not (Path(path_or_id) / "dataset_dict.json").is_file():
            raise UsageError(
                f"--dataset {path_or_id}: not a dataset_builder output (no dataset_dict.json). "
                "Build one with `python -m dataset_builder build ...`."
            )
        try:
            dataset = datasets.load_from_disk(path_or_id)
        except (OSError, ValueError, KeyError) as error:  # a missing state.json, a truncated arrow file, bad JSON
            raise RunError(
                f"--dataset {path_or_id}: cannot read it ({type(error).__name__}: {first_line(error)}). Expected a "
                "complete dataset_builder output; rebuild it with `python -m dataset_builder build ...`."
            ) from None
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
    for split in [name for name in ("train", "validation", "test") if name in dataset]:
        captions = dataset[split]["caption"]
        if not any(isinstance(caption, str) and caption.strip() for caption in captions):
            what = f"all {len(captions):,} of its captions are empty" if len(captions) else "it has no pairs"
            raise RunError(
                f"--dataset {path_or_id}: split {split!r} cannot be used: {what}. Expected image-caption pairs with "
                "text in every split; rebuild it with dataset_builder."
            )
    return dataset


def group_by_image(pairs, max_images: int = 0):
    """One row per image with all its reference captions, from a pair split (first row of each image)."""
    first_row, references = {}, {}
    for row, (image_id, caption) in enumerate(zip(pairs["image_id"], pairs["caption"], strict=True)):
        first_row.setdefault(image_id, row)
        references.setdefault(image_id, []).append(caption)
    image_ids = list(first_row)[: max_images or None]
    images = pairs.select([first_row[i] for i in image_ids])
    return images, [references[i] for i in image_ids], image_ids


class CaptionScorer:
    """coco-caption metrics through the project's `evaluate` module (loaded once, by path, offline)."""

    def __init__(self):
        self.metric = evaluate.load(str(Path(__file__).resolve().parent / "caption_metrics"))

    def __call__(self, predictions, references) -> dict:
        return self.metric.compute(predictions=predictions, references=references)


def generate_captions(accelerator, model, processor, images, args, desc: str) -> tuple[list[str], list[int]]:
    """Greedy or beam captions for a Dataset of images, sharded over processes and gathered without duplicates.
    Also returns how many images each process captioned (the last batch may be padded with repeats)."""

    def collate(rows):
        # the compiled path compiles once per batch size (1.5-2 minutes on CPU for the 270M decoder): a short last
        # batch is filled up with copies of its last image, whose captions are dropped
        padding = rows[-1:] * (args.eval_batch_size - len(rows)) if args.compile_generation else []
        inputs = processor(images=[row["image"] for row in rows + padding])
        inputs["index"] = torch.tensor([row["index"] for row in rows])
        return inputs

    indexed = images.select_columns(["image"]).add_column("index", list(range(len(images))))
    loader = accelerator.prepare_data_loader(DataLoader(indexed, batch_size=args.eval_batch_size, collate_fn=collate))
    unwrapped = accelerator.unwrap_model(model)
    generation = {"max_new_tokens": args.max_new_tokens, "num_beams": args.num_beams, "do_sample": False}
    generation |= compiled_generation(device=accelerator.device) if args.compile_generation else {}
    was_training = unwrapped.training
    unwrapped.eval()
    local = []
    for batch in tqdm(loader, desc=desc, disable=not accelerator.is_local_main_process, leave=False):
        index = batch.pop("index")
        with torch.inference_mode(), accelerator.autocast():
            generated = unwrapped.generate(**batch, **generation)
        captions = processor.post_process_image_text_to_text(generated, input_ids=batch["input_ids"])
        local.extend(zip(index.tolist(), captions[: len(index)], strict=True))
    unwrapped.train(was_training)
    gathered = accelerator.gather_for_metrics(local, use_gather_object=True)
    counts = accelerator.gather_for_metrics([len(local)], use_gather_object=True)
    by_index = dict(gathered)
    assert sorted(by_index) == list(range(len(images))), "every image must be captioned exactly once"
    return [by_index[i] for i in range(len(images))], counts


def caption_loss(accelerator, model, processor, images, references, args) -> float:
    """The teacher-forced loss per caption token of each image's first reference caption: the validation loss that
    the training loss is compared with (sharded over processes like the captions)."""

    def collate(rows):
        return processor(images=[row["image"] for row in rows], suffix=[row["reference"] for row in rows])

    pairs = images.select_columns(["image"]).add_column("reference", [refs[0] for refs in references])
    loader = accelerator.prepare_data_loader(DataLoader(pairs, batch_size=args.eval_batch_size, collate_fn=collate))
    unwrapped = accelerator.unwrap_model(model)
    was_training = unwrapped.training
    unwrapped.eval()
    total, tokens = torch.zeros((), device=accelerator.device), torch.zeros((), device=accelerator.device)
    with torch.inference_mode(), accelerator.autocast():
        for batch in loader:  # the last batch may repeat a few pairs on several processes: a negligible weight
            count = (batch["labels"][:, 1:] != -100).sum()  # the labels the shifted loss counts
            total += unwrapped(**batch).loss.float() * count
            tokens += count
    unwrapped.train(was_training)
    return (accelerator.reduce(total, "sum") / accelerator.reduce(tokens, "sum")).item()


def evaluate_split(accelerator, model, processor, scorer, grouped, args, step: int, split: str) -> tuple[dict, list]:
    """Captions and scores one grouped split; the scores only on the main process (scorer is None elsewhere)."""
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
        "loss": caption_loss(accelerator, model, processor, images, references, args),
    }
    if accelerator.is_main_process:
        result.update(scorer(predictions, references))
    rows = [
        {"image_id": i, "prediction": p, "references": r}
        for i, p, r in zip(image_ids, predictions, references, strict=True)
    ]
    return result, rows


def score_baselines(
    accelerator, model, processor, scorer, train_captions, val, test, args, split: str, name: str = "untrained model"
) -> dict:
    """The scores on the test split of the model before training (`name`), and the image-blind baseline's (main
    process only)."""
    start, _ = evaluate_split(accelerator, model, processor, scorer, test, args, 0, split)
    results = {name: start}
    if accelerator.is_main_process:
        constant = best_constant_caption(train_captions, val[1])
        results["image-blind baseline"] = {
            "split": split,
            "caption": constant,
            **scorer([constant] * len(test[1]), test[1]),
        }
        accelerator.print(f"image-blind baseline caption: {constant!r}")
    return results


def best_constant_caption(train_captions, val_references, max_candidates: int = 100) -> str:
    """The image-blind baseline: the training caption with the highest CIDEr-D as the answer for every validation
    image. Candidates are the most frequent training captions (case/space-normalised), scored with pycocoevalcap's
    CIDEr-D on lower-cased, punctuation-free tokens."""

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


def results_table(rows: dict[str, dict]) -> str:
    header = f"| {'model':<22} | BLEU-4 | METEOR | ROUGE-L | CIDEr |"
    lines = [header, "|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|"]
    for name, m in rows.items():
        meteor = "n/a" if m.get("meteor") is None else f"{m['meteor']:.3f}"
        lines.append(f"| {name:<22} | {m['bleu_4']:.3f}  | {meteor:<6} | {m['rouge_l']:.3f}   | {m['cider']:.3f} |")
    return "\n".join(lines)


def report(results: dict, rows: list, split: str):
    print(f"\n{split} split, {len(rows)} images:\n" + results_table(results))
    print("\nsample captions:")
    for row in rows[:3]:
        print(f"  {row['image_id']}: {row['prediction']!r}\n      reference: {row['references'][0]!r}")


def write_outputs(output_dir: Path, metrics: dict, rows: list, images):
    """metrics.json, predictions.jsonl (one row per image) and the samples.html gallery."""
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    with open(output_dir / "predictions.jsonl", "w") as file:
        file.writelines(json.dumps(row) + "\n" for row in rows)
    write_gallery(images, rows, output_dir / "samples.html")


def write_gallery(images, rows, path: Path, count: int = 12):
    """An HTML page with each image, its prediction and its references."""
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


def evaluation_function(args):
    """Scores a saved model (folder or Hub id) on one split: metrics.json and predictions.jsonl as training writes."""
    check_replaceable(args.output_dir, TOOL, legacy_output, "--output_dir")  # before minutes of captioning
    accelerator = Accelerator(
        cpu=args.quantize == "int8" or not torch.cuda.is_available(), mixed_precision=args.mixed_precision
    )
    try:
        check_source(args.model, "--model")
    except OSError as error:
        raise UsageError(str(error)) from error
    with accelerator.main_process_first():
        dataset = load_caption_dataset(args.dataset, args.synth_images, args.seed, args.synth_size)
    if args.split not in dataset:
        raise UsageError(f"--split {args.split}: the dataset has splits {sorted(dataset)}.")
    model, processor = load_model(args.model, adapter_base=args.adapter_base, device=str(accelerator.device))
    check_generation_length(model, processor, args.max_new_tokens)
    if getattr(model, "is_loaded_in_4bit", False) and (args.quantize == "int8" or args.compile_generation):
        raise UsageError(
            f"{'--quantize int8' if args.quantize == 'int8' else '--compile_generation'} needs the base decoder in full "
            f"precision, but {args.model} loads it in 4-bit. Add --adapter_base full (the adapters merged into it)."
        )
    if args.quantize == "int8":
        model = quantize_int8(model)
    model = accelerator.prepare(model)
    grouped = group_by_image(dataset[args.split], args.max_eval_images)
    scorer = CaptionScorer() if accelerator.is_main_process else None
    result, rows = evaluate_split(accelerator, model, processor, scorer, grouped, args, 0, args.split)
    if accelerator.is_main_process:
        with replace_folder(args.output_dir, TOOL, legacy_output, "--output_dir") as folder:
            write_outputs(folder, {**result, "model": args.model}, rows, grouped[0])
        report({"model": result}, rows, args.split)
    accelerator.end_training()


def main(argv=None) -> int:
    return run_command(lambda: evaluation_function(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())

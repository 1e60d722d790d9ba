"""`score`: CLIP screening of a built dataset, to find captions that do not describe their image.

Adds a `clip_score` column (cosine similarity of CLIP image and text embeddings) to every pair, and writes
`clip_report/histogram.png`, `clip_report/lowest.png` (contact sheet) and `clip_report/lowest.csv`.
Each image is embedded once (from `grouped/`), each caption once.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import datasets
import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from cnngemma.outputs import replace_folder, survey
from modeling_cnngemma import check_source

from .build import TOOL, build_layout, write_errors
from .card import write_card
from .tables import write_csv


def _features(output):
    # transformers 5 returns a ModelOutput whose pooler_output holds the projected embedding; 4.x a tensor.
    return getattr(output, "pooler_output", output)


def _decode(image) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    return Image.open(io.BytesIO(image["bytes"])).convert("RGB")


def clip_scores(
    pairs: datasets.Dataset,
    grouped: datasets.Dataset,
    model,
    tokenizer,
    image_processor,
    batch_size: int = 64,
    device: str = "cpu",
    desc: str = "",
) -> np.ndarray:
    """Cosine similarity of each pair's caption with its image; images are embedded once each."""
    import torch

    max_length = model.config.text_config.max_position_embeddings
    raw_images = grouped.cast_column("image", datasets.Image(decode=False))
    image_embeddings = []
    with torch.inference_mode():
        for start in tqdm(range(0, len(grouped), batch_size), desc=f"{desc} images", unit="batch"):
            batch = [_decode(image) for image in raw_images[start : start + batch_size]["image"]]
            pixels = image_processor(images=batch, return_tensors="pt")["pixel_values"].to(device)
            image_embeddings.append(
                torch.nn.functional.normalize(_features(model.get_image_features(pixel_values=pixels)).float(), dim=-1)
            )
        images = torch.cat(image_embeddings)
        row_of = {image_id: row for row, image_id in enumerate(grouped["image_id"])}
        image_rows = torch.tensor([row_of[image_id] for image_id in pairs["image_id"]], device=device)
        captions = pairs["caption"]
        scores = []
        for start in tqdm(range(0, len(pairs), batch_size), desc=f"{desc} captions", unit="batch"):
            tokens = tokenizer(
                captions[start : start + batch_size],
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            ).to(device)
            text = torch.nn.functional.normalize(
                _features(
                    model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
                ).float(),
                dim=-1,
            )
            scores.append((text * images[image_rows[start : start + batch_size]]).sum(-1).cpu())
    return torch.cat(scores).numpy()


def _write_report(folder: Path, rows: list[tuple[str, str, str, float]], pairs: dict, lowest: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .synth import write_grid

    folder.mkdir()
    figure, axis = plt.subplots(figsize=(7, 4), dpi=100)
    for split in dict.fromkeys(row[0] for row in rows):
        axis.hist([row[3] for row in rows if row[0] == split], bins=50, alpha=0.6, label=split)
    axis.set_xlabel("CLIP cosine similarity (image, caption)")
    axis.set_ylabel("pairs")
    axis.set_title(f"clip_score over {len(rows):,} pairs")
    axis.legend()
    figure.tight_layout()
    figure.savefig(folder / "histogram.png")
    plt.close(figure)
    worst = sorted(range(len(rows)), key=lambda k: (rows[k][3], k))[:lowest]
    # the score as a number: a negative one stays a number in a spreadsheet, not text with an apostrophe
    write_csv(
        folder / "lowest.csv",
        [["split", "image_id", "caption", "clip_score"], *([*rows[k][:3], round(rows[k][3], 4)] for k in worst)],
    )
    raw = {split: grouped.cast_column("image", datasets.Image(decode=False)) for split, grouped in pairs.items()}
    row_of = {
        (split, image_id): row for split, grouped in pairs.items() for row, image_id in enumerate(grouped["image_id"])
    }
    examples = []
    for k in worst:
        split, image_id, caption, score = rows[k]
        examples.append((_decode(raw[split][row_of[split, image_id]]["image"]), f"{score:.3f} {image_id}: {caption}"))
    write_grid(examples, folder / "lowest.png", cell=160)


def score(dataset: str | Path, clip_model: str, batch_size: int = 64, device: str = "cpu", lowest: int = 16) -> dict:
    """Score every pair of a built dataset in place (new first: the folder is swapped whole at the end) and write the
    report; returns a summary."""
    dataset = Path(dataset)
    if survey(dataset, TOOL, build_layout, verify=False).kind not in ("ours", "legacy"):
        raise FileNotFoundError(
            f"--dataset {dataset}: not a dataset_builder build output (no record of `build`, nor its dataset_dict.json "
            "and stats.json). Expected the --output folder of `build`. Fix: build it first."
        )
    stats = json.loads((dataset / "stats.json").read_text(encoding="utf-8"))
    if not stats["with_images"]:
        raise ValueError(
            f"--dataset {dataset} was built with --captions-only, so there are no images to score. "
            "Expected a build with --images. Fix: rebuild with --images DIR."
        )
    check_source(clip_model, "--clip-model")
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    model = CLIPModel.from_pretrained(clip_model).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(clip_model)
    image_processor = AutoImageProcessor.from_pretrained(clip_model)
    pairs = datasets.load_from_disk(str(dataset))
    grouped = datasets.load_from_disk(str(dataset / "grouped"))
    scored, rows = {}, []
    for split, split_pairs in pairs.items():
        if "clip_score" in split_pairs.column_names:
            split_pairs = split_pairs.remove_columns("clip_score")
        values = clip_scores(
            split_pairs, grouped[split], model, tokenizer, image_processor, batch_size, device, desc=split
        )
        scored[split] = split_pairs.add_column(
            "clip_score", values.astype(np.float32).tolist(), feature=datasets.Value("float32")
        )
        rows += list(
            zip([split] * len(values), split_pairs["image_id"], split_pairs["caption"], values.tolist(), strict=True)
        )
    all_scores = np.array([row[3] for row in rows])
    stats["clip_score"] = {
        "model": clip_model,
        "pairs": len(rows),
        "mean": float(all_scores.mean()),
        "median": float(np.median(all_scores)),
        "min": float(all_scores.min()),
        "max": float(all_scores.max()),
        "lowest": min(lowest, len(rows)),
    }
    with (
        write_errors("--dataset", dataset),
        replace_folder(dataset, TOOL, legacy=build_layout, flag="--dataset") as work,
    ):
        datasets.DatasetDict(scored).save_to_disk(str(work))
        for name in ("grouped", "csv"):
            shutil.copytree(dataset / name, work / name)
        for name in ("problems.csv", "duplicates.csv"):  # duplicates.csv: absent in captions-only builds
            if (dataset / name).is_file():
                shutil.copy2(dataset / name, work / name)
        _write_report(work / "clip_report", rows, grouped, lowest)
        (work / "stats.json").write_text(json.dumps(stats, indent=2) + "\n", encoding="utf-8")
        write_card(work / "README.md", stats)
    return stats["clip_score"]

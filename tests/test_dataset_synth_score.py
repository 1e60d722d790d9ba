"""dataset_builder synth, score and push: deterministic synthetic data whose captions match the pictures, CLIP
screening with a tiny random CLIP saved to a temp folder, and clear offline errors."""

from __future__ import annotations

import csv
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest

from dataset_builder.__main__ import main
from dataset_builder.build import build
from dataset_builder.synth import COLOURS, COUNTED, NUMBERS, POSITIONS, REGION_HALF, SCENES, make_example, synthesize

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))


@pytest.fixture(scope="module")
def synth_set(tmp_path_factory):
    folder = tmp_path_factory.mktemp("synth") / "set"
    summary = synthesize(folder, num_images=60, seed=3)
    return folder, summary


def _digest(folder: Path) -> str:
    """Of every file but the record (cnngemma_output.json), which says when it was written."""
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name != "cnngemma_output.json":
            digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()


def test_synth_layout_and_determinism(synth_set, tmp_path):
    folder, summary = synth_set
    with open(folder / "captions.csv", encoding="utf-8", newline="") as file:
        rows = list(csv.DictReader(file))
    assert list(rows[0]) == ["source", "split", "image", *(f"caption_{n}" for n in range(1, 6))]
    assert len(rows) == 60 and {row["split"] for row in rows} == {"train", "val", "test"}
    from PIL import Image

    assert Image.open(folder / "resized" / rows[0]["image"]).size == (224, 224)
    again = synthesize(tmp_path / "again", num_images=60, seed=3)
    assert again == summary and _digest(tmp_path / "again") == _digest(folder)
    other = synthesize(tmp_path / "other", num_images=60, seed=4)
    assert _digest(tmp_path / "other") != _digest(folder) and other["images"] == 60


def test_synth_covers_scene_kinds_and_inserts_riscm_like_duplicates():
    scenes, duplicated = set(), 0
    for index in range(300):
        _, captions, facts = make_example(7, index, size=64)
        scenes.add(facts["scene"])
        keys = [c.strip().lower() for c in captions if c.strip()]
        duplicated += len(keys) != len(set(keys))
        assert len(captions) == 5
    assert scenes == set(SCENES) and len(SCENES) >= 10
    assert 40 < duplicated < 150  # about 30% of images repeat a caption up to case and white space


def test_synth_captions_state_what_is_drawn():
    """The counted objects' captions carry the drawn count, colour and position; the object colour is in the
    picture's region."""
    checked = 0
    for index in range(200):
        image, captions, facts = make_example(11, index, size=224)
        if facts["scene"] not in COUNTED:
            continue
        checked += 1
        for caption in captions:
            if caption.strip():
                text = caption.lower()
                assert NUMBERS[facts["count"] - 1] in text and facts["colour"] in text, (facts, caption)
        (cx, cy), phrase = POSITIONS[facts["position"]]
        assert any(phrase in caption.lower() for caption in captions)
        distance = np.abs(np.asarray(image, np.float32) - np.asarray(COLOURS[facts["colour"]], np.float32)).sum(-1)
        near = distance < distance.min() + 90  # lighting scales colours, so: the pixels closest to the stated one
        inside = np.zeros_like(near)
        inside[
            int((cy - REGION_HALF) * 224) : int((cy + REGION_HALF) * 224),
            int((cx - REGION_HALF) * 224) : int((cx + REGION_HALF) * 224),
        ] = True
        # the stated colour is concentrated in the stated region
        assert near[inside].mean() > 0.01, facts
        if facts["scene"] != "beach":  # the beach's sea is blue too, outside the region by construction
            assert near[inside].mean() > 1.5 * near[~inside].mean(), facts
    assert checked > 50


def _tiny_clip(folder: Path, captions: list[str]) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1}
    for word in sorted({w for c in captions for w in c.lower().split()}):
        vocab.setdefault(word, len(vocab))
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]")
    config = CLIPConfig(
        text_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            vocab_size=len(vocab),
            max_position_embeddings=32,
            bos_token_id=None,
            eos_token_id=2,
            pad_token_id=0,
        ),  # 2: legacy pooling
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=16,
    )
    import torch

    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def test_score_adds_clip_score_and_writes_the_report(synth_set, tmp_path):
    folder, _ = synth_set
    built = tmp_path / "built"
    build(folder / "captions.csv", built, images=folder / "resized", num_workers=1)
    listings = {name: (built / name).read_bytes() for name in ("problems.csv", "duplicates.csv")}
    before = datasets.load_from_disk(str(built))
    clip = _tiny_clip(tmp_path / "clip", before["train"]["caption"])
    assert (
        main(["score", "--dataset", str(built), "--clip-model", str(clip), "--batch-size", "32", "--lowest", "8"]) == 0
    )
    summary = json.loads((built / "stats.json").read_text())["clip_score"]
    after = datasets.load_from_disk(str(built))
    for split in before:
        assert after[split]["caption"] == before[split]["caption"]
        scores = np.asarray(after[split]["clip_score"])
        assert scores.shape == (before[split].num_rows,) and np.all(np.abs(scores) <= 1.0001)
    assert summary["pairs"] == sum(d.num_rows for d in before.values()) and summary["lowest"] == 8
    from PIL import Image

    report = built / "clip_report"
    assert Image.open(report / "histogram.png").size == (700, 400)
    assert Image.open(report / "lowest.png").size[0] > 600
    with open(report / "lowest.csv", encoding="utf-8", newline="") as file:
        lowest = list(csv.DictReader(file))
    all_scores = np.concatenate([np.asarray(after[s]["clip_score"]) for s in after])
    assert len(lowest) == 8 and float(lowest[0]["clip_score"]) == pytest.approx(all_scores.min(), abs=1e-4)
    assert "## CLIP screening" in (built / "README.md").read_text()
    assert (built / "grouped" / "dataset_dict.json").is_file() and (built / "csv" / "train.csv").is_file()
    assert {name: (built / name).read_bytes() for name in listings} == listings  # scoring keeps both listings


def test_score_with_a_hub_id_offline_fails_fast(tmp_path):
    build_dir = tmp_path / "built"
    table = tmp_path / "t.csv"
    table.write_text("image,caption,split\na.png,x .,train\n", encoding="utf-8")
    (tmp_path / "images").mkdir()
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "a.png")
    build(table, build_dir, images=tmp_path / "images", num_workers=1)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "dataset_builder",
            "score",
            "--dataset",
            str(build_dir),
            "--clip-model",
            "openai/clip-vit-base-patch32",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "error: --clip-model='openai/clip-vit-base-patch32' looks like a Hub id, but HF_HUB_OFFLINE=1 forbids "
        "downloads. Download it elsewhere and pass the local folder or file instead, or unset HF_HUB_OFFLINE."
    )

    before = sorted((p.relative_to(build_dir), p.stat().st_mtime_ns) for p in build_dir.rglob("*"))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "dataset_builder",
            "push",
            "--dataset",
            str(build_dir),
            "--repo-id",
            "someone/riscm-clean",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "error: the Hub cannot be reached: offline mode is on (HF_HUB_OFFLINE=1). Nothing was changed. Fix: unset "
        "HF_HUB_OFFLINE on a machine with network access."
    )
    assert sorted((p.relative_to(build_dir), p.stat().st_mtime_ns) for p in build_dir.rglob("*")) == before
    assert datasets.load_from_disk(str(build_dir))["train"]["caption"] == ["x ."]

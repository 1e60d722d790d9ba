"""Test-wide settings: always offline, HF_HOME in a temporary folder (removed at the end), shared tiny fixtures."""

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO_ROOT / "configuration" / "tiny.json"
RISCM_DIR = REPO_ROOT / "tests" / "data" / "riscm"  # RISCM's real test-split captions (no images)

CAPTION_WORDS = {
    "count": ["one", "two", "three", "four", "five", "six"],
    "colour": ["red", "white", "blue", "green", "yellow"],
    "object": ["planes", "ships", "storage tanks", "cars", "houses"],
    "place": ["top left", "top right", "bottom left", "bottom right", "centre", "left", "right"],
}


def pytest_configure(config):
    # Set before any test module imports huggingface_hub / transformers, which read these at import time.
    hf_home = tempfile.mkdtemp(prefix="cnngemma-tests-hf-home-")
    config._cnngemma_hf_home = hf_home
    os.environ.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HOME=hf_home,
        TOKENIZERS_PARALLELISM="false",
    )


def pytest_unconfigure(config):
    shutil.rmtree(getattr(config, "_cnngemma_hf_home", ""), ignore_errors=True)


def synthetic_captions(n: int = 200, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [
        f"there are {rng.choice(CAPTION_WORDS['count'])} {rng.choice(CAPTION_WORDS['colour'])} "
        f"{rng.choice(CAPTION_WORDS['object'])} in the {rng.choice(CAPTION_WORDS['place'])}"
        for _ in range(n)
    ]


def random_images(n: int, size: int = 96, seed: int = 0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size + 8 * i, 3), dtype=np.uint8)) for i in range(n)]


@pytest.fixture(scope="session")
def tokenizer():
    from modeling_cnngemma import build_caption_tokenizer

    return build_caption_tokenizer(synthetic_captions(), vocab_size=1024)


@pytest.fixture(scope="session")
def tiny_config(tokenizer):
    from modeling_cnngemma import CNNGemmaConfig

    config = CNNGemmaConfig.from_json_file(TINY_CONFIG)
    config.text_config.vocab_size = len(tokenizer)
    return config


def make_tiny_model(config, seed: int = 0):
    """The tiny model with decoder weights drawn wide enough that greedy decoding does not repeat one token."""
    import torch

    from modeling_cnngemma import CNNGemmaForConditionalGeneration

    torch.manual_seed(seed)
    model = CNNGemmaForConditionalGeneration(config).eval()
    with torch.no_grad():
        for param in model.model.language_model.parameters():
            param.normal_(0.0, 0.2)
    return model


@pytest.fixture(scope="session")
def tiny_model(tiny_config):
    return make_tiny_model(tiny_config)


@pytest.fixture(scope="session")
def processor(tiny_config, tokenizer):
    from modeling_cnngemma import CNNGemmaProcessor

    return CNNGemmaProcessor.from_model_config(tiny_config, tokenizer)


@pytest.fixture(scope="session")
def saved_model_dir(tmp_path_factory, tiny_model, processor):
    """A save_pretrained folder (model + processor + remote code), as train_hf.py writes it."""
    path = tmp_path_factory.mktemp("saved-tiny")
    tiny_model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """A 30-image synthetic set built by dataset_builder (train / validation / test), read only."""
    from dataset_builder.build import build
    from dataset_builder.synth import synthesize

    root = tmp_path_factory.mktemp("synth")
    synthesize(root / "raw", num_images=30, seed=3, size=64)
    build(root / "raw" / "captions.csv", root / "dataset", images=root / "raw" / "resized", num_workers=1)
    return root / "dataset"


@pytest.fixture(scope="session")
def trained_demo(tmp_path_factory):
    """A tiny CNNGemma that has learned something: train_hf.py, 200 steps at batch 8 on 48 synthetic 128 px images
    (~20-30 s on 2 cores), in a fresh process. Returns (the saved model folder, the built dataset folder)."""
    import subprocess
    import sys

    from dataset_builder.demo import build_demo_dataset

    root = tmp_path_factory.mktemp("trained-demo")
    dataset = build_demo_dataset(root / "synth", num_images=48, seed=0)
    command = [sys.executable, str(REPO_ROOT / "train_hf.py"), "--dataset", str(dataset), "--output_dir"]
    command += [str(root / "model"), "--max_steps", "200", "--batch_size", "8", "--warmup_steps", "20"]
    command += ["--no_eval", "--report_to", "none", "--logging_steps", "50", "--seed", "0"]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return root / "model", dataset

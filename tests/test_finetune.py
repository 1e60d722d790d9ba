"""train_hf.py --model: fine-tuning a trained CNNGemma starts from its weights (its own loss on new captions, far
below a fresh model's), refuses the flags that would build a new model, and works with LoRA."""

import importlib.util
import json

import pytest
import torch
from conftest import REPO_ROOT
from safetensors.torch import load_file

spec = importlib.util.spec_from_file_location("train_hf", REPO_ROOT / "train_hf.py")
train_hf = importlib.util.module_from_spec(spec)
spec.loader.exec_module(train_hf)


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    """48 synthetic images drawn with another seed than the ones `trained_demo` learned."""
    from dataset_builder.demo import build_demo_dataset

    return build_demo_dataset(tmp_path_factory.mktemp("held-out"), num_images=48, seed=1)


def first_logged_loss(argv, dataset_dir, output_dir) -> float:
    """The loss train_hf.py logs at step 1, computed before any update, with every training pair in that batch."""
    from datasets import load_from_disk

    batch_size = len(load_from_disk(str(dataset_dir))["train"])
    argv += ["--dataset", dataset_dir, "--batch_size", batch_size, "--max_steps", 1, "--logging_steps", 1, "--seed", 0]
    argv += ["--checkpointing_steps", 1, "--no_eval", "--report_to", "none", "--output_dir", output_dir]
    assert train_hf.main([str(arg) for arg in argv]) == 0
    state = json.loads((output_dir / "checkpoints" / "step_000001" / "training_state.json").read_text())
    [(step, loss)] = state["loss_history"]
    assert step == 1
    return loss


def loss_on_all_pairs(model_dir, dataset_dir) -> float:
    """The saved model's loss on every training pair in one batch, as a training step computes it (train mode:
    BatchNorm uses the batch's statistics), loaded through AutoModel and AutoProcessor as a Hub user would."""
    from datasets import load_from_disk
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(model_dir, trust_remote_code=True).train()
    processor = AutoProcessor.from_pretrained(model_dir, trust_remote_code=True)
    pairs = load_from_disk(str(dataset_dir))["train"]
    with torch.no_grad():
        return model(**processor(images=list(pairs["image"]), suffix=list(pairs["caption"]))).loss.item()


def test_fine_tuning_starts_at_the_trained_models_loss(trained_demo, held_out, tmp_path):
    model_dir, _ = trained_demo
    fine_tune = first_logged_loss(["--model", str(model_dir)], held_out, tmp_path / "fine-tune")
    scratch = first_logged_loss([], held_out, tmp_path / "scratch")  # same config (tiny.json), data, seed and batch
    own = loss_on_all_pairs(model_dir, held_out)
    print(f"\nfirst logged loss: fine-tune {fine_tune:.4f}, from scratch {scratch:.4f}; trained model's own {own:.4f}")
    assert fine_tune < scratch / 2
    # the same pairs in another order: equal up to float summation order
    assert fine_tune == pytest.approx(own, rel=1e-4)


@pytest.mark.parametrize(
    "flag,value",
    [
        ("--config", "configuration/tiny.json"),
        ("--text_config", "configuration/tiny.json"),
        ("--language_model", "google/gemma-2b"),
        ("--vision_pretrained", "imagenet"),
        ("--tokenizer", "tokenizer-folder"),
    ],
)
def test_flags_that_build_a_new_model_conflict_with_model(flag, value, tmp_path, capsys):
    argv = ["--model", str(tmp_path / "missing"), flag, value, "--output_dir", str(tmp_path / "out")]
    assert train_hf.main([*argv, "--report_to", "none"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: {flag} cannot be combined with --model: the --model folder brings its own weights, config, "
        f"tokenizer and processor. Drop {flag}, or drop --model to build a new model."
    )
    assert not (tmp_path / "out").exists()


def test_missing_model_folder_fails_before_training(tmp_path, capsys):
    argv = ["--model", str(tmp_path / "missing"), "--output_dir", str(tmp_path / "out"), "--report_to", "none"]
    assert train_hf.main(argv) == 2
    message = f"error: --model='{tmp_path / 'missing'}': no such file or folder. Check the path."
    assert capsys.readouterr().err.strip().splitlines()[-1] == message
    assert not (tmp_path / "out").exists()


def test_output_dir_may_not_be_the_model_folder(tmp_path, capsys):
    """The default --output_dir is the demo's folder, the usual --model: writing there would replace the start."""
    argv = ["--model", str(tmp_path / "demo"), "--output_dir", str(tmp_path / "demo"), "--report_to", "none"]
    assert train_hf.main(argv) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: --output_dir {tmp_path / 'demo'} is the --model folder: the fine-tune would overwrite the model it "
        "starts from. Pass another --output_dir."
    )


def test_lora_fine_tune_changes_only_the_adapted_decoder_projections(trained_demo, held_out, tmp_path):
    model_dir, _ = trained_demo
    argv = ["--model", str(model_dir), "--dataset", str(held_out), "--lora_r", "4", "--max_steps", "2", "--no_eval"]
    argv += ["--batch_size", "8", "--warmup_steps", "0", "--report_to", "none", "--output_dir", str(tmp_path / "lora")]
    assert train_hf.main(argv) == 0
    before, after = load_file(model_dir / "model.safetensors"), load_file(tmp_path / "lora" / "model.safetensors")
    assert before.keys() == after.keys()  # LoRA merged back: a plain CNNGemma again
    changed = {key for key in before if not torch.equal(before[key], after[key])}
    decoder = {key for key in changed if "language_model" in key}
    assert decoder and all(key.endswith("_proj.weight") for key in decoder)
    assert any("multi_modal_projector" in key for key in changed)  # modules_to_save: trained in full

"""train_hf.py: bad input stops before training, exact kill-and-resume with true logged losses and the requested
warmup, two CPU processes, LoRA round trip."""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO_ROOT, make_tiny_model, random_images, synthetic_captions
from safetensors.torch import load_file

from metrics.caption_metrics import METRIC_KEYS

spec = importlib.util.spec_from_file_location("train_hf", REPO_ROOT / "train_hf.py")
train_hf = importlib.util.module_from_spec(spec)
spec.loader.exec_module(train_hf)

FAST = ["--batch_size", "4", "--report_to", "none", "--seed", "7"]


def run_train(*args, cwd, processes: int = 1, wait: bool = True):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    if processes == 1:
        command = [sys.executable, str(REPO_ROOT / "train_hf.py")]
    else:  # on a CPU-only machine only --multi_gpu starts two processes (gloo); --cpu starts one
        command = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_processes",
            str(processes),
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--main_process_port",
            "29517",
            str(REPO_ROOT / "train_hf.py"),
        ]
    command += [str(a) for a in args]
    if not wait:
        return subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory, tiny_dataset):
    """A 12-step run straight through (loss logged every step), and the same run killed with SIGKILL after a
    checkpoint and resumed (loss logged every 5 steps, so the first window after the resume and the last are partial).
    Warmup (20 steps) is longer than the run."""
    tmp_path = tmp_path_factory.mktemp("resume")
    common = [
        "--dataset",
        tiny_dataset,
        *FAST,
        "--warmup_steps",
        "20",
        "--max_steps",
        "12",
        "--checkpointing_steps",
        "4",
        "--checkpoints_total_limit",
        "3",
        "--no_eval",
        "--augment",
    ]
    straight = run_train(*common, "--logging_steps", "1", "--output_dir", tmp_path / "straight", cwd=tmp_path)
    assert straight.returncode == 0, straight.stdout[-3000:] + straight.stderr[-3000:]

    killed_dir = tmp_path / "killed"
    common += ["--logging_steps", "5", "--output_dir", killed_dir]
    process = run_train(*common, cwd=tmp_path, wait=False)
    deadline = time.monotonic() + 300
    while not (killed_dir / "checkpoints" / "step_000004").is_dir():
        assert process.poll() is None, process.stdout.read()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint after 300 s"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    checkpoints = sorted(p.name for p in (killed_dir / "checkpoints").iterdir())
    assert checkpoints[-1] < "step_000012" and not (killed_dir / "model.safetensors").exists(), checkpoints

    resumed = run_train(*common, "--resume_from_checkpoint", "latest", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {killed_dir / 'checkpoints' / checkpoints[-1]}" in resumed.stdout
    return tmp_path / "straight", killed_dir, int(checkpoints[-1].split("_")[1]), straight.stdout


def loss_history(output_dir):
    state = json.loads((output_dir / "checkpoints" / "step_000012" / "training_state.json").read_text())
    return [tuple(entry) for entry in state["loss_history"]]


def test_kill_and_resume_gives_bitwise_identical_weights(resumed_run, tiny_dataset):
    straight_dir, killed_dir, _, _ = resumed_run
    expected, actual = load_file(straight_dir / "model.safetensors"), load_file(killed_dir / "model.safetensors")
    assert expected.keys() == actual.keys()
    different = [k for k in expected if not torch.equal(expected[k], actual[k])]
    assert different == []
    # the run trained: weights moved away from a fresh initialisation
    assert not torch.equal(
        expected["model.multi_modal_projector.linear.weight"], make_tiny_model_projector(tiny_dataset)
    )


def test_logged_loss_is_the_mean_of_its_window_after_a_resume_and_at_an_unaligned_end(resumed_run):
    straight_dir, killed_dir, resumed_at, _ = resumed_run
    per_step = dict(loss_history(straight_dir))  # weights are bitwise identical, so each step's loss is too
    assert sorted(per_step) == list(range(1, 13))
    expected, previous = [], 0
    for step in (5, 10, 12):  # logging every 5 steps, and at the last step
        first = max(previous, resumed_at) if step > resumed_at else previous
        window = [per_step[s] for s in range(first + 1, step + 1)]
        expected.append((step, pytest.approx(sum(window) / len(window), rel=1e-6)))
        previous = step
    assert loss_history(killed_dir) == expected


def test_warmup_steps_are_used_as_given(resumed_run):
    straight_dir, _, _, stdout = resumed_run
    scheduler = torch.load(straight_dir / "checkpoints" / "step_000004" / "scheduler.bin", weights_only=True)
    assert scheduler["_last_lr"][0] == pytest.approx(2e-3 * 4 / 20)  # linear warmup: 4 of 20 steps
    warning = "warning: --warmup_steps 20 >= the run's 12 optimizer steps: the learning rate never reaches its peak"
    assert warning in stdout


def make_tiny_model_projector(tiny_dataset):
    from modeling_cnngemma import CNNGemmaConfig

    torch.manual_seed(7)
    config = CNNGemmaConfig.from_json_file(REPO_ROOT / "configuration" / "tiny.json")
    return make_tiny_model(config, seed=7).model.multi_modal_projector.linear.weight.detach()


def test_two_cpu_processes_score_each_image_once(tmp_path, tiny_dataset):
    result = run_train(
        "--dataset",
        tiny_dataset,
        *FAST,
        "--max_steps",
        "4",
        "--checkpointing_steps",
        "4",
        "--skip_baselines",
        "--eval_batch_size",
        "2",
        "--max_new_tokens",
        "8",
        "--warmup_steps",
        "8",
        "--output_dir",
        tmp_path / "ddp",
        cwd=tmp_path,
        processes=2,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "2 process(es) on cpu" in result.stdout
    metrics = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    rows = [json.loads(line) for line in (tmp_path / "ddp" / "predictions.jsonl").read_text().splitlines()]
    from datasets import load_from_disk

    test_images = set(load_from_disk(str(tiny_dataset))["test"]["image_id"])
    assert len(metrics["images_per_process"]) == 2 and min(metrics["images_per_process"]) > 0
    assert sorted(r["image_id"] for r in rows) == sorted(test_images)  # each image exactly once
    assert metrics["num_images"] == len(test_images) and metrics["step"] == 4
    assert sorted(p.name for p in (tmp_path / "ddp" / "checkpoints").iterdir()) == ["step_000004"]
    assert set(METRIC_KEYS) <= set(metrics) and len(metrics["history"]) == 1
    # with two processes too, 4 of 8 warmup steps give half the peak (accelerate steps the scheduler once per process)
    scheduler = torch.load(tmp_path / "ddp" / "checkpoints" / "step_000004" / "scheduler.bin", weights_only=True)
    assert scheduler["_last_lr"][0] == pytest.approx(2e-3 * 4 / 8)


def test_lora_adapter_trains_saves_reloads_and_merges(tmp_path, tiny_config, processor):
    from peft import PeftModel

    args = train_hf.parse_args(["--lora_r", "4", "--lora_alpha", "8", "--freeze_vision"])
    args.language_model = "pretrained"  # as with a real checkpoint: the decoder itself stays frozen
    model = train_hf.apply_training_policy(make_tiny_model(tiny_config, seed=1), args)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "multi_modal_projector" in n for n in trainable)
    batch = processor(images=random_images(4, seed=9), suffix=synthetic_captions(4, seed=9))
    optimizer = torch.optim.AdamW(
        train_hf.param_groups(model, args)[0]["params"]
        + [p for g in train_hf.param_groups(model, args)[1:] for p in g["params"]],
        lr=1e-2,
    )
    model.train()
    bn_before = model.base_model.model.vision_tower.bn1.running_mean.clone()
    for _ in range(3):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert torch.equal(bn_before, model.base_model.model.vision_tower.bn1.running_mean)  # frozen BN did not move
    model.eval()
    with torch.no_grad():
        trained_logits = model(**batch).logits
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert any(p.abs().sum() > 0 for p in lora_b)  # adapters moved from their zero init

    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(make_tiny_model(tiny_config, seed=1), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, trained_logits, atol=0, rtol=0)
        merged = reloaded.merge_and_unload()
        # W + BA in one matrix changes the float summation order only: equal within float32 rounding
        torch.testing.assert_close(merged(**batch).logits, trained_logits, atol=1e-4, rtol=1e-4)
    assert type(merged).__name__ == "CNNGemmaForConditionalGeneration"


@pytest.fixture(scope="module")
def wrong_columns_dataset(tmp_path_factory):
    import datasets

    path = tmp_path_factory.mktemp("wrong") / "ds"
    part = datasets.Dataset.from_dict({"filename": ["a.jpg"], "text": ["a plane"]})
    datasets.DatasetDict({"train": part, "test": part}).save_to_disk(str(path))
    return path


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--dataset", "{tmp}/missing"], "error: --dataset='{tmp}/missing': no such file or folder. Check the path."),
        (
            ["--dataset", "{wrong}"],
            "error: --dataset {wrong}: split 'train' has columns ['filename', 'text'], "
            "missing ['caption', 'image', 'image_id']. Expected dataset_builder's image, "
            "image_id and caption.",
        ),
        (
            ["--dataset", "someone/riscm"],
            "error: --dataset='someone/riscm' looks like a Hub id, but HF_HUB_OFFLINE=1 forbids downloads. Download it "
            "elsewhere and pass the local folder or file instead, or unset HF_HUB_OFFLINE.",
        ),
        (
            ["--language_model", "google/gemma-2b"],
            "error: --language_model='google/gemma-2b' looks like a Hub id, but HF_HUB_OFFLINE=1 forbids downloads. "
            "Download it elsewhere and pass the local folder or file instead, or unset HF_HUB_OFFLINE.",
        ),
        (
            ["--resume_from_checkpoint", "{tmp}/nothing"],
            "error: --resume_from_checkpoint {tmp}/nothing: not a "
            "checkpoint folder (no training_state.json). Pass 'latest' or an OUTPUT_DIR/checkpoints/step_N folder.",
        ),
        (
            ["--resume_from_checkpoint", "latest", "--output_dir", "{tmp}/fresh"],
            "error: --resume_from_checkpoint latest: no checkpoint in {tmp}/fresh/checkpoints.",
        ),
        (["--batch_size", "0"], "error: --batch_size 0 is out of range; expected >= 1."),
        (["--lora_dropout", "1.5"], "error: --lora_dropout 1.5 is out of range; expected in [0, 1)."),
        (["--learning_rate", "-1"], "error: --learning_rate -1.0 is out of range; expected a finite number > 0."),
        (["--save", "adapter"], "error: --save adapter needs LoRA: set --lora_r > 0, or drop --save."),
        (
            ["--load_in_4bit", "--language_model", "{tmp}"],
            "error: --load_in_4bit needs LoRA: the 4-bit decoder stays frozen and only adapters train on it. Add "
            "--lora_r 16 (or another rank).",
        ),
        (
            ["--load_in_4bit", "--lora_r", "4"],
            "error: --load_in_4bit quantizes the pretrained decoder of --language_model, but got a random decoder (no "
            "--language_model). Pass --language_model (a Gemma checkpoint, Hub id or .gguf file).",
        ),
        (
            ["--load_in_4bit", "--lora_r", "4", "--language_model", "{tmp}", "--train_language_model"],
            "error: --load_in_4bit keeps the decoder frozen; drop --train_language_model (LoRA trains it).",
        ),
        (
            ["--lora_r", "4", "--language_model", "{tmp}", "--save", "adapter"],
            "error: --save adapter names the base decoder for others to find (a Hub id or a .gguf file), but "
            "--language_model {tmp} is a local folder. Pass --save merged.",
        ),
        (
            ["--lora_r", "4", "--save", "adapter"],
            "error: --save adapter needs a pretrained --language_model to name as its base. Pass --save merged.",
        ),
        (
            ["--config", "{tmp}/nope.json"],
            "error: --config='{tmp}/nope.json': no such file or folder. Check the path.",
        ),
        (
            ["--vision_pretrained", "weights.pth"],
            "error: --vision_pretrained='weights.pth': no such file or folder. Check the path.",
        ),
    ],
)
def test_bad_input_fails_before_training(argv, message, tmp_path, wrong_columns_dataset, capsys):
    fill = {"tmp": str(tmp_path), "wrong": str(wrong_columns_dataset)}
    argv = [a.format(**fill) for a in argv]
    argv += [] if "--output_dir" in argv else ["--output_dir", str(tmp_path / "out")]
    assert train_hf.main([*argv, "--report_to", "none"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == message.format(**fill)
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_load_in_4bit_without_bitsandbytes_is_one_line(tmp_path, monkeypatch, capsys):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real_find_spec(name, *a)
    )
    argv = [
        "--load_in_4bit",
        "--lora_r",
        "4",
        "--language_model",
        str(tmp_path),
        "--output_dir",
        str(tmp_path / "out"),
    ]
    assert train_hf.main(argv) == 2
    assert capsys.readouterr().err.strip() == (
        "error: --load_in_4bit needs bitsandbytes, which is not installed. Install it (pip install bitsandbytes), or "
        "drop --load_in_4bit."
    )


def test_an_adapter_folder_as_model_is_refused(tmp_path, capsys):
    adapter = tmp_path / "qlora"
    adapter.mkdir()
    for name in ("adapter_config.json", "cnngemma_adapter.json", "config.json"):
        (adapter / name).write_text("{}")
    assert train_hf.main(["--model", str(adapter), "--output_dir", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: --model {adapter} is an adapter folder (the base is not in it). Merge it first (python -m "
        "cnngemma.adapters merge DIR OUT) and pass --model OUT."
    )


def test_config_that_does_not_match_the_checkpoint(tmp_path, tiny_dataset, capsys):
    from transformers import GemmaConfig, GemmaForCausalLM

    from modeling_cnngemma import build_caption_tokenizer

    tokenizer = build_caption_tokenizer(synthetic_captions(50), vocab_size=300)
    GemmaForCausalLM(
        GemmaConfig(
            hidden_size=64,
            num_hidden_layers=1,
            intermediate_size=128,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=32,
            vocab_size=len(tokenizer),
        )
    ).save_pretrained(tmp_path / "lm")
    tokenizer.save_pretrained(tmp_path / "lm")
    code = train_hf.main(
        [
            "--dataset",
            str(tiny_dataset),
            "--language_model",
            str(tmp_path / "lm"),
            "--output_dir",
            str(tmp_path / "out"),
            "--report_to",
            "none",
        ]
    )
    assert code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: The config's text_config does not match the checkpoint '{tmp_path / 'lm'}': hidden_size: config 128 "
        "!= checkpoint 64; num_hidden_layers: config 2 != checkpoint 1; intermediate_size: config 512 != checkpoint "
        "128; num_attention_heads: config 4 != checkpoint 2. Use a config whose text_config is the checkpoint's."
    )


@pytest.mark.parametrize("argv", [["--var", "tiny"], ["--variants", "tiny"], ["--max_step", "3"]])
def test_variants_and_abbreviations_are_unknown_flags(argv, capsys):
    """--variants lives in scripts/compare_variants.py; abbreviations would let `--var` reach a training flag."""
    with pytest.raises(SystemExit) as exit_info:
        train_hf.parse_args(argv)
    assert exit_info.value.code == 2
    assert f"error: unrecognized arguments: {' '.join(argv)}" in capsys.readouterr().err

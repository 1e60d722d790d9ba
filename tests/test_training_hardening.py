"""train_hf.py against bad input: every bad flag, split, output folder or checkpoint stops with one 'error: ...' line
before the first step (exit 2 for flags, 1 for data and damaged files), a diverging run stops without saving, long
captions are cut and counted, and a run never mixes with, deletes or resumes from another run's checkpoints."""

import importlib.util
import json
import re
import shutil

import numpy as np
import pytest
from conftest import REPO_ROOT
from safetensors.torch import load_file
from transformers import PreTrainedTokenizerFast

spec = importlib.util.spec_from_file_location("train_hf", REPO_ROOT / "train_hf.py")
train_hf = importlib.util.module_from_spec(spec)
spec.loader.exec_module(train_hf)

MARKER = "checkpoint_complete.json"
RESTART = "Resume from another checkpoint, or start again with --overwrite_output_dir."


@pytest.fixture(scope="module")
def pairs(tiny_dataset):
    """conftest's 30-image set: 112 train pairs, validation and test (read only; variants are copies)."""
    return tiny_dataset


def variant(pairs, folder, split, change):
    """The set with one split changed (datasets cannot save an empty split with images unless it is filtered)."""
    from datasets import load_from_disk

    dataset = load_from_disk(str(pairs))
    dataset[split] = change(dataset[split])
    dataset.save_to_disk(str(folder))
    return folder


def train(dataset, output_dir, *argv) -> int:
    """train_hf.main on the tiny config: 2 steps of 4 pairs, no evaluation; later flags override these."""
    common = ["--dataset", dataset, "--output_dir", output_dir, "--batch_size", 4, "--max_steps", 2, "--seed", 7]
    return train_hf.main([str(a) for a in [*common, "--no_eval", "--report_to", "none", *argv]])


def last_line(capsys) -> str:
    return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def earlier_run(tmp_path_factory, pairs):
    """A finished run with a checkpoint at each of its 2 steps and its final model."""
    folder = tmp_path_factory.mktemp("earlier") / "run"
    assert train(pairs, folder, "--checkpointing_steps", 1) == 0
    return folder


@pytest.fixture
def run_copy(earlier_run, tmp_path):
    return shutil.copytree(earlier_run, tmp_path / "run")


def marker(checkpoint) -> dict:
    return json.loads((checkpoint / MARKER).read_text())


@pytest.mark.parametrize(
    "flag,value,allowed",
    [
        ("--learning_rate", "inf", "a finite number > 0"),
        ("--learning_rate", "nan", "a finite number > 0"),
        ("--learning_rate", "0", "a finite number > 0"),
        ("--vision_lr", "inf", "a finite number > 0"),
        ("--projector_lr", "nan", "a finite number > 0"),
        ("--language_model_lr", "-1", "a finite number > 0"),
        ("--weight_decay", "inf", "a finite number >= 0"),
        ("--lora_dropout", "nan", "in [0, 1)"),
        ("--max_caption_tokens", "0", ">= 1"),
    ],
)
def test_non_finite_and_out_of_range_flags_fail_before_anything_loads(flag, value, allowed, tmp_path, capsys):
    assert train(tmp_path / "missing-data", tmp_path / "out", flag, value) == 2
    shown = value if flag in ("--max_caption_tokens",) else float(value)
    assert last_line(capsys) == f"error: {flag} {shown} is out of range; expected {allowed}."
    assert not (tmp_path / "out").exists()


def test_output_dir_that_is_a_file_fails_before_training(pairs, tmp_path, capsys):
    (tmp_path / "out").write_text("notes\n")
    assert train(pairs, tmp_path / "out") == 2
    assert last_line(capsys) == (
        f"error: --output_dir {tmp_path / 'out'}: {tmp_path / 'out'} is a file; expected a folder for checkpoints and "
        "the final model. Pass another --output_dir, or move the file away."
    )
    assert (tmp_path / "out").read_text() == "notes\n"


def test_batch_larger_than_the_train_split(pairs, tmp_path, capsys):
    assert train(pairs, tmp_path / "out", "--batch_size", 200) == 2
    assert last_line(capsys) == (
        "error: --batch_size 200 with 1 process(es) needs at least 200 training pairs; the train split has 112. "
        "Pass --batch_size 112 or less."
    )


@pytest.mark.parametrize(
    "split,change,what",
    [
        ("train", lambda part: part.filter(lambda row: False), "it has no pairs"),
        ("train", lambda part: part.map(lambda row: {"caption": " "}), "all 112 of its captions are empty"),
        ("validation", lambda part: part.filter(lambda row: False), "it has no pairs"),
    ],
    ids=["empty-train", "empty-captions", "empty-validation"],
)
def test_unusable_split_fails_before_training(split, change, what, pairs, tmp_path, capsys):
    broken = variant(pairs, tmp_path / "broken", split, change)
    assert train(broken, tmp_path / "out") == 1
    assert last_line(capsys) == (
        f"error: --dataset {broken}: split {split!r} cannot be used: {what}. Expected image-caption pairs with text "
        "in every split; rebuild it with dataset_builder."
    )
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_evaluation_refuses_an_unusable_split_too(pairs, saved_model_dir, tmp_path, capsys):
    from metrics import evaluation

    broken = variant(pairs, tmp_path / "broken", "test", lambda part: part.map(lambda row: {"caption": ""}))
    assert evaluation.main(["--model", str(saved_model_dir), "--dataset", str(broken)]) == 1
    assert last_line(capsys).startswith(f"error: --dataset {broken}: split 'test' cannot be used: all 14 of its")


def test_non_finite_loss_stops_training_without_a_final_model(pairs, tmp_path, capsys):
    """A finite but far too high rate: the first step's update sends the weights to where the loss is NaN."""
    argv = ["--learning_rate", "1e30", "--warmup_steps", 0, "--max_steps", 4, "--checkpointing_steps", 1]
    assert train(pairs, tmp_path / "out", *argv) == 1
    assert last_line(capsys) == (
        "error: the training loss is nan at step 2: training stopped, no final model saved. Lower --learning_rate or "
        "the per-part rates, or check the data."
    )
    assert not (tmp_path / "out" / "model.safetensors").exists()
    assert [p.name for p in (tmp_path / "out" / "checkpoints").iterdir()] == ["step_000001"]


def test_long_caption_is_cut_and_counted_before_the_first_step(pairs, tmp_path, capsys):
    """One 3,500-word caption of made-up words (the tiny decoder has 512 positions)."""
    rng = np.random.default_rng(0)
    words = ["".join(rng.choice(list("bcdfghjklmnpqrstvwxz"), 3)) for _ in range(3500)]

    def change(part):
        return part.map(lambda row, i: {"caption": " ".join(words) if i == 0 else row["caption"]}, with_indices=True)

    long = variant(pairs, tmp_path / "long", "train", change)
    assert train(long, tmp_path / "out", "--max_steps", 1) == 0
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tmp_path / "out")
    count = len(tokenizer(" ".join(words), add_special_tokens=False)["input_ids"])
    assert count > 3500
    assert (
        f"warning: 1 of 112 training captions are longer than --max_caption_tokens 64 (the longest has {count:,} "
        "tokens): each is cut to its first 64 tokens." in capsys.readouterr().out
    )


def test_cut_captions_are_their_first_tokens_then_eos(processor):
    captions = ["there are two red planes in the top left " * 20, "one ship"]
    cuts = train_hf.caption_cuts(captions, processor, 512, 10, print)
    assert list(cuts) == [captions[0]]
    ids = processor.tokenizer(captions[0], add_special_tokens=False)["input_ids"]
    assert processor.tokenizer(cuts[captions[0]], add_special_tokens=False)["input_ids"] == ids[:10]
    labels = processor(images=[np.zeros((8, 8, 3), np.uint8)] * 2, suffix=[cuts[captions[0]], "one ship"])["labels"]
    assert labels[0][labels[0] != -100].tolist() == ids[:10] + [processor.tokenizer.eos_token_id]


def test_max_caption_tokens_must_fit_the_decoders_positions(pairs, tmp_path, capsys):
    assert train(pairs, tmp_path / "out", "--max_caption_tokens", 600) == 2
    assert last_line(capsys) == (
        "error: --max_caption_tokens 600 does not fit: the decoder's 512 positions less 16 image tokens, <bos>, 3 "
        "prompt tokens and <eos> leave 491. Pass --max_caption_tokens 491 or less."
    )


def test_a_new_run_leaves_another_runs_checkpoints_alone(run_copy, pairs, capsys):
    """The issue: the new run's step_1 met the old step_1 (OSError), or rotation deleted the new checkpoints."""

    def states():
        return {p.name: (p / "training_state.json").read_text() for p in (run_copy / "checkpoints").iterdir()}

    before = states()
    assert train(pairs, run_copy, "--checkpointing_steps", 1, "--seed", 8) == 2
    assert last_line(capsys) == (
        f"error: --output_dir {run_copy} holds another run's checkpoints (step_000001, step_000002); a new run there "
        "would mix with them. Continue that run with --resume_from_checkpoint latest, replace it with "
        "--overwrite_output_dir (the earlier run is deleted only once the new one has finished; disk use doubles "
        "meanwhile), or pass another --output_dir."
    )
    assert states() == before


def test_resuming_an_earlier_checkpoint_would_overwrite_later_ones(run_copy, pairs, capsys):
    first = run_copy / "checkpoints" / "step_000001"
    assert train(pairs, run_copy, "--resume_from_checkpoint", first, "--max_steps", 3, "--checkpointing_steps", 1) == 2
    assert last_line(capsys) == (
        f"error: --resume_from_checkpoint {first}: {first.parent} also holds later checkpoints (step_000002), which "
        "this run would overwrite. Resume from the latest (--resume_from_checkpoint latest), or delete the later ones "
        "first."
    )


def test_overwrite_output_dir_replaces_the_earlier_run_at_its_end(run_copy, earlier_run, pairs):
    """Only the earlier run's recorded files go; a file the user put there is kept byte for byte."""
    (run_copy / "adapter_config.json").write_text("{}")  # not written by train_hf.py: the user's
    assert (
        train(pairs, run_copy, "--checkpointing_steps", 1, "--max_steps", 1, "--seed", 8, "--overwrite_output_dir")
        == 0
    )
    assert [p.name for p in (run_copy / "checkpoints").iterdir()] == ["step_000001"]
    old_id = marker(earlier_run / "checkpoints" / "step_000001")["run_id"]
    assert marker(run_copy / "checkpoints" / "step_000001")["run_id"] != old_id
    assert (run_copy / "adapter_config.json").read_text() == "{}"
    assert not list(run_copy.glob(".overwrite-*")) and not list(run_copy.parent.glob(".run.*"))
    old, new = load_file(earlier_run / "model.safetensors"), load_file(run_copy / "model.safetensors")
    assert any(not (old[k] == new[k]).all() for k in old)


def test_resume_latest_continues_the_earlier_run_and_rotates_only_its_checkpoints(
    run_copy, earlier_run, pairs, capsys
):
    argv = ["--checkpointing_steps", 1, "--max_steps", 3, "--resume_from_checkpoint", "latest"]
    assert train(pairs, run_copy, *argv) == 0
    assert f"resumed from {run_copy / 'checkpoints' / 'step_000002'} at step 2" in capsys.readouterr().out
    assert sorted(p.name for p in (run_copy / "checkpoints").iterdir()) == ["step_000002", "step_000003"]
    old_id = marker(earlier_run / "checkpoints" / "step_000002")["run_id"]
    assert marker(run_copy / "checkpoints" / "step_000003")["run_id"] == old_id


def test_a_finished_run_without_checkpoints_is_not_overwritten(run_copy, pairs, capsys):
    """The probe's R06: the guard looked at checkpoints/ only, so a second run replaced a finished model silently."""
    shutil.rmtree(run_copy / "checkpoints")
    before = {p.name: p.read_bytes() for p in run_copy.iterdir() if p.is_file() and p.name != ".cnngemma.lock"}
    assert train(pairs, run_copy, "--max_steps", 1, "--seed", 8) == 2
    line = last_line(capsys)
    assert line.startswith(f"error: --output_dir {run_copy} holds a finished run of train_hf.py, written ")
    assert line.endswith(
        "To start again there, replace it with --overwrite_output_dir (the earlier run is deleted only once the new "
        "one has finished; disk use doubles meanwhile), or pass another --output_dir."
    )
    assert {p.name: p.read_bytes() for p in run_copy.iterdir() if p.is_file() and p.name != ".cnngemma.lock"} == before


def damage(checkpoint, kind):
    if kind == "no-optimizer":
        (checkpoint / "optimizer.bin").unlink()
    elif kind == "corrupt-rng":  # same size, other bytes
        path = checkpoint / "random_states_0.pkl"
        path.write_bytes(bytes(len(path.read_bytes())))
    elif kind == "truncated-weights":
        path = checkpoint / "model.safetensors"
        path.write_bytes(path.read_bytes()[:1000])
    elif kind == "two-processes":
        (checkpoint / MARKER).write_text(json.dumps({**marker(checkpoint), "num_processes": 2}))


@pytest.mark.parametrize(
    "kind,problem",
    [
        ("no-optimizer", f"is damaged: optimizer.bin is missing. {RESTART}"),
        ("corrupt-rng", f"is damaged: random_states_0.pkl is corrupt (BadZipFile: File is not a zip file). {RESTART}"),
        (
            "truncated-weights",
            f"is damaged: model.safetensors is corrupt (1000 bytes, {{size}} when saved). {RESTART}",
        ),
        (
            "two-processes",
            "was written by 2 process(es); this run has 1. Resume with 2: the data shards and random states are per "
            "process.",
        ),
    ],
)
def test_damaged_checkpoint_is_named_before_loading(kind, problem, run_copy, pairs, capsys):
    latest = run_copy / "checkpoints" / "step_000002"
    size = (latest / "model.safetensors").stat().st_size
    damage(latest, kind)
    assert train(pairs, run_copy, "--resume_from_checkpoint", "latest", "--max_steps", 3) == 1
    assert last_line(capsys) == f"error: checkpoint {latest} {problem.format(size=size)}"


def test_latest_is_never_an_incomplete_checkpoint(run_copy, pairs, capsys):
    """A step_N folder without its marker (an older train_hf.py, or a marker lost): named, with the complete one."""
    (run_copy / "checkpoints" / "step_000002" / MARKER).unlink(missing_ok=True)
    assert train(pairs, run_copy, "--resume_from_checkpoint", "latest", "--max_steps", 3) == 1
    assert last_line(capsys) == (
        f"error: --resume_from_checkpoint latest: {run_copy / 'checkpoints' / 'step_000002'} is incomplete: no "
        f"readable {MARKER}, which is written last (the save was killed, or an older train_hf.py wrote it). Resume "
        f"from {run_copy / 'checkpoints' / 'step_000001'}, the newest complete one, or start again with "
        "--overwrite_output_dir."
    )


def test_a_save_killed_before_its_marker_is_not_resumed(run_copy, pairs, capsys):
    """save_state wrote into .partial-step_N and the run died before the marker and the rename."""
    partial = run_copy / "checkpoints" / ".partial-step_000003"
    shutil.copytree(run_copy / "checkpoints" / "step_000002", partial)
    (partial / MARKER).unlink(missing_ok=True)
    assert train(pairs, run_copy, "--resume_from_checkpoint", partial, "--max_steps", 3) == 1
    assert last_line(capsys) == (
        f"error: checkpoint {partial} is incomplete: no readable {MARKER}, which is written last (the save was "
        "killed, or an older train_hf.py wrote it). Resume from an earlier checkpoint, or start again with "
        "--overwrite_output_dir."
    )


def test_overwrite_cannot_delete_the_checkpoint_it_resumes_from(run_copy, pairs, capsys):
    argv = ["--resume_from_checkpoint", "latest", "--overwrite_output_dir"]
    assert train(pairs, run_copy, *argv) == 2
    latest = run_copy / "checkpoints" / "step_000002"
    assert last_line(capsys) == (
        f"error: --overwrite_output_dir would delete {latest}, the checkpoint --resume_from_checkpoint resumes from. "
        "Drop one of the two flags."
    )
    assert re.fullmatch("[0-9a-f]{32}", marker(latest)["run_id"])

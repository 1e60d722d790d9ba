"""train_hf.py and the model loaders never lose a user's files: each test plants a user file or an earlier run, makes
the failure happen (NaN loss, Ctrl-C, disk full, a refusal, a second writer) and compares the sha256 of everything
that was there. Also: one writer per folder, readers never load half of two saves, and a resume that would train
something else than its checkpoint is refused."""

import errno
import hashlib
import importlib.util
import json
import shutil
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO_ROOT
from safetensors.torch import load_file, save_file

from cnngemma import inference, saving
from cnngemma.errors import RunError
from modeling_cnngemma import CNNGemmaForConditionalGeneration

spec = importlib.util.spec_from_file_location("train_hf", REPO_ROOT / "train_hf.py")
train_hf = importlib.util.module_from_spec(spec)
spec.loader.exec_module(train_hf)
LOCK = ".cnngemma.lock"


def train(dataset, output_dir, *argv) -> int:
    """train_hf.main on the tiny config: 2 steps of 4 pairs, no evaluation; later flags override these."""
    common = ["--dataset", dataset, "--output_dir", output_dir, "--batch_size", 4, "--max_steps", 2, "--seed", 7]
    return train_hf.main([str(a) for a in [*common, "--no_eval", "--report_to", "none", *argv]])


def snapshot(folder) -> dict[str, str]:
    """sha256 of every file below `folder` (the lock file excepted: every writer stamps its PID there)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != LOCK
    }


def last_line(capsys) -> str:
    return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def earlier_run(tmp_path_factory, tiny_dataset):
    """A finished run with a checkpoint at each of its 2 steps, and the user's files planted beside it."""
    folder = tmp_path_factory.mktemp("earlier") / "run"
    assert train(tiny_dataset, folder, "--checkpointing_steps", 1) == 0
    (folder / "notes.txt").write_text("my notes\n")
    for name in ("vae.safetensors", "my_cnngemma.py", "tokenizer_backup.json"):  # the probe's R08 names
        (folder / name).write_bytes(name.encode() * 10)
    return folder


@pytest.fixture
def run_copy(earlier_run, tmp_path):
    return shutil.copytree(earlier_run, tmp_path / "run")


def test_overwrite_that_fails_leaves_the_earlier_run_as_it_was(run_copy, tiny_dataset, capsys):
    """The probe's R09: the NaN loss stopped the new run after --overwrite_output_dir had deleted the old one."""
    before = snapshot(run_copy)
    argv = ["--overwrite_output_dir", "--learning_rate", "1e30", "--warmup_steps", "0", "--max_steps", "5"]
    assert train(tiny_dataset, run_copy, *argv) == 1
    assert "the training loss is nan" in last_line(capsys)
    assert snapshot(run_copy) == before
    assert not list(run_copy.glob(".overwrite-*")) and not list(run_copy.parent.glob(".run.*"))


def test_overwrite_interrupted_by_ctrl_c_leaves_the_earlier_run(run_copy, tiny_dataset, monkeypatch, capsys):
    before = snapshot(run_copy)

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_hf.checkpoints, "save_final_model", interrupt)
    assert train(tiny_dataset, run_copy, "--overwrite_output_dir", "--max_steps", 1) == 130
    assert last_line(capsys).startswith("interrupted (Ctrl-C): stopped before the end. Outputs are replaced only once")
    assert snapshot(run_copy) == before
    assert not list(run_copy.glob(".overwrite-*"))


def test_overwrite_keeps_every_file_it_did_not_write(run_copy, earlier_run, tiny_dataset, capsys):
    """The probe's R08: files deleted by name pattern (*.safetensors, *_cnngemma.py, tokenizer*.json)."""
    planted = {name: h for name, h in snapshot(run_copy).items() if name in ("notes.txt", "vae.safetensors")}
    planted |= {
        name: h for name, h in snapshot(run_copy).items() if name in ("my_cnngemma.py", "tokenizer_backup.json")
    }
    assert train(tiny_dataset, run_copy, "--overwrite_output_dir", "--max_steps", 1, "--seed", 8) == 0
    after = snapshot(run_copy)
    assert {name: after.get(name) for name in planted} == planted
    assert "kept 4 file(s) train_hf.py did not write" in capsys.readouterr().out
    assert not (run_copy / "checkpoints").exists()  # the earlier run's checkpoints were its own: deleted
    record = json.loads((run_copy / "cnngemma_output.json").read_text())
    assert record["status"] == "finished" and "model.safetensors" in record["files"]
    assert not set(planted) & set(record["files"])
    old, new = load_file(earlier_run / "model.safetensors"), load_file(run_copy / "model.safetensors")
    assert any(not torch.equal(old[k], new[k]) for k in old)


def test_a_folder_of_someone_else_is_never_written(tmp_path, tiny_dataset, capsys):
    folder = tmp_path / "thesis"
    folder.mkdir()
    (folder / "thesis.tex").write_text("\\documentclass{article}")
    (folder / "config.json").write_text('{"another": "project"}')
    before = snapshot(folder)
    for extra in ([], ["--overwrite_output_dir"]):
        assert train(tiny_dataset, folder, *extra) == 2
        assert last_line(capsys) == (
            f"error: --output_dir {folder} holds files that train_hf.py did not write: config.json, thesis.tex. "
            "Expected a new or empty folder, or an earlier train_hf.py run; no flag replaces other files. Pass "
            "another --output_dir."
        )
    assert snapshot(folder) == before


@pytest.mark.parametrize("value", ["", "  "])
def test_an_empty_output_dir_is_refused(value, tmp_path, tiny_dataset, monkeypatch, capsys):
    """The probe's C12: an unset shell variable gave Path("") and the model landed in the current folder."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        train(tiny_dataset, value)
    assert exit_info.value.code == 2
    assert (
        capsys.readouterr()
        .err.strip()
        .splitlines()[-1]
        .endswith(
            f"argument --output_dir: got {value!r}, expected a path. Pass one (an unset shell variable gives an empty "
            "value)"
        )
    )
    assert list(tmp_path.iterdir()) == []


def test_a_second_writer_stops_before_loading_anything_and_the_first_finishes(tmp_path, tiny_dataset, capsys):
    """One writer per folder: the second run is refused by the first one's flock, within a second; the first run's
    model then loads."""
    folder = tmp_path / "run"
    command = [sys.executable, str(REPO_ROOT / "train_hf.py"), "--dataset", str(tiny_dataset), "--output_dir"]
    command += [str(folder), "--batch_size", "4", "--max_steps", "40", "--no_eval", "--report_to", "none"]
    first = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not ((folder / LOCK).is_file() and (folder / LOCK).read_text()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (folder / LOCK).read_text().startswith(f"{__import__('socket').gethostname()} PID {first.pid} ")
        start = time.perf_counter()
        assert train(tiny_dataset, folder) == 2
        seconds = time.perf_counter() - start
        line = last_line(capsys)
        assert line.startswith(f"error: --output_dir {folder} is in use by ") and f"PID {first.pid} (started " in line
        assert line.endswith("One writer at a time: wait for it to finish, or pass another --output_dir.")
        assert seconds < 1.0  # before any model or data loads
    finally:
        out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-2000:]
    model, processor = inference.load_model(str(folder))
    assert model.config.num_image_tokens == processor.num_image_tokens


def test_a_full_disk_while_checkpointing_is_one_line_and_leaves_nothing_half_written(
    run_copy, tiny_dataset, monkeypatch, capsys
):
    """The probe's J02: a SafetensorError traceback and a .partial-step folder left behind."""
    latest = run_copy / "checkpoints" / "step_000002"
    before = snapshot(latest)

    def disk_full(self, output_dir=None, **kwargs):
        (train_hf.Path(output_dir) / "model.safetensors").parent.mkdir(parents=True, exist_ok=True)
        (train_hf.Path(output_dir) / "model.safetensors").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(train_hf.Accelerator, "save_state", disk_full)
    argv = ["--resume_from_checkpoint", "latest", "--max_steps", 3, "--checkpointing_steps", 1]
    assert train(tiny_dataset, run_copy, *argv) == 1
    assert last_line(capsys) == (
        f"error: saving checkpoint step_000003 into {run_copy / 'checkpoints'} failed (OSError: [Errno 28] No space "
        "left on device). Its partial folder was removed; free disk space and resume from the last checkpoint "
        "(--resume_from_checkpoint latest)."
    )
    assert sorted(p.name for p in (run_copy / "checkpoints").iterdir()) == ["step_000001", "step_000002"]
    assert snapshot(latest) == before


def test_a_full_disk_at_the_final_save_keeps_the_previous_model(run_copy, tiny_dataset, monkeypatch, capsys):
    """The probe's J03: the resumed run's final save hit the limit; a traceback and .partial-final were left."""
    before = snapshot(run_copy)
    real = CNNGemmaForConditionalGeneration.save_pretrained

    def disk_full(self, folder, **kwargs):
        real(self, folder, **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(CNNGemmaForConditionalGeneration, "save_pretrained", disk_full)
    assert train(tiny_dataset, run_copy, "--resume_from_checkpoint", "latest", "--max_steps", 3) == 1
    assert last_line(capsys).startswith(f"error: saving the final model into {run_copy} failed (OSError: [Errno 28]")
    after = snapshot(run_copy)
    assert {k: v for k, v in after.items() if k != "cnngemma_output.json"} == {
        k: v for k, v in before.items() if k != "cnngemma_output.json"
    }
    assert not list(run_copy.glob(".partial-*"))


def test_resume_refuses_changed_flags_and_applies_them_when_asked(run_copy, tiny_dataset, capsys):
    """The probe's R05 (a new --learning_rate silently ignored) and R04b (a new --batch_size re-trained pairs)."""
    latest = run_copy / "checkpoints" / "step_000002"
    before = snapshot(run_copy)
    argv = ["--resume_from_checkpoint", "latest", "--max_steps", 3, "--learning_rate", 0.1, "--batch_size", 2]
    assert train(tiny_dataset, run_copy, *argv) == 2
    assert last_line(capsys) == (
        f"error: --resume_from_checkpoint {latest}: the flags differ from the run that wrote it: --batch_size 2 "
        "(checkpoint: 4); --learning_rate 0.1 (checkpoint: 0.002). Pass the checkpoint's values to continue it "
        "exactly, or add --apply_changed_flags to continue with the new ones."
    )
    assert snapshot(run_copy) == before
    assert train(tiny_dataset, run_copy, *argv, "--apply_changed_flags", "--logging_steps", 1) == 0
    out = capsys.readouterr().out
    assert "applied the new flags: --batch_size 2 (checkpoint: 4); --learning_rate 0.1 (checkpoint: 0.002)" in out
    assert "(epoch 0, batch 4)" in out  # 2 batches of 4 pairs were seen in this epoch: 4 batches of 2


def test_resume_with_max_steps_at_or_below_the_checkpoint_is_refused(run_copy, tiny_dataset, capsys):
    """The probe's R03: nothing trained and the step-40 weights saved as this run's model without a word."""
    latest = run_copy / "checkpoints" / "step_000002"
    before = snapshot(run_copy)
    assert train(tiny_dataset, run_copy, "--resume_from_checkpoint", "latest", "--max_steps", 1) == 2
    assert last_line(capsys) == (
        f"error: --max_steps 1 is at or below the step of {latest} (2): nothing would train. Pass --max_steps 3 or "
        "more to continue it."
    )
    assert snapshot(run_copy) == before


def restamped(folder, target, save_id):
    """A copy of `folder` whose config.json comes from another save than its weights."""
    shutil.copytree(folder, target, ignore=shutil.ignore_patterns("checkpoints", "logs"))
    config = json.loads((target / "config.json").read_text())
    (target / "config.json").write_text(json.dumps({**config, saving.SAVE_ID: save_id}))
    return target


def test_readers_refuse_a_folder_holding_two_saves(earlier_run, tmp_path):
    folder = restamped(earlier_run, tmp_path / "mixed", "0" * 32)
    weights_id = saving.read_safetensors_metadata(folder / "model.safetensors")[saving.SAVE_ID]
    with pytest.raises(RunError) as error:
        inference.load_model(str(folder))
    assert str(error.value) == (
        f"--model {folder}: its files come from different saves (model.safetensors from save {weights_id[:8]}, "
        "processor_config.json from save "
        f"{json.loads((folder / 'processor_config.json').read_text())[saving.SAVE_ID][:8]}, config.json from save "
        "00000000): a save into it is under way or was interrupted. Wait for the writer to finish and retry; after "
        "an interruption, re-save the model."
    )


def test_a_reader_racing_a_writer_gets_one_whole_save(earlier_run, tmp_path, monkeypatch):
    """A save lands while the reader is inside from_pretrained (the probe's H02): the reader notices and reads
    again, and the model it returns is the new save, whole."""
    folder = tmp_path / "model"
    shutil.copytree(earlier_run, folder, ignore=shutil.ignore_patterns("checkpoints", "logs"))
    model, processor = inference.load_model(str(folder))
    real, calls = inference._from_pretrained, []

    def racing(*args, **kwargs):
        loaded = real(*args, **kwargs)
        if not calls:  # a writer replaces the folder during the first read
            staging = tmp_path / "staging"
            with torch.no_grad():
                model.multi_modal_projector.linear.bias.fill_(0.5)
            model.save_pretrained(staging)
            processor.save_pretrained(staging)
            saving.stamp(staging, saving.new_save_id())
            saving.move_into_place(staging, folder)
        calls.append(1)
        return loaded

    monkeypatch.setattr(inference, "_from_pretrained", racing)
    reloaded, _ = inference.load_model(str(folder))
    assert len(calls) == 2
    assert torch.equal(
        reloaded.multi_modal_projector.linear.bias, torch.full_like(model.multi_modal_projector.linear.bias, 0.5)
    )


@pytest.mark.parametrize(
    "damage,problem",
    [
        (
            "missing",
            "the weights do not fit its config: 1 missing weight(s) (model.multi_modal_projector.linear.weight)",
        ),
        ("unexpected", "the weights do not fit its config: 1 unexpected weight(s) (extra.weight)"),
        ("processor", "processor_config.json does not fit the model: num_image_tokens 4 (the model has 16)"),
        (
            "shape",
            "the weights do not fit its config: 1 wrongly shaped weight(s) (model.multi_modal_projector.linear.weight "
            "(3, 3), config (128, 288))",
        ),
    ],
)
def test_every_loader_refuses_a_model_with_missing_or_unexpected_weights(
    damage, problem, earlier_run, tmp_path, tiny_dataset, capsys
):
    """The probe's D06 (captions from a random projector at exit 0), D05 and D14: caption.py, metrics.evaluation and
    train_hf.py --model all load through cnngemma.inference.load_model."""
    import caption
    from metrics import evaluation

    folder = tmp_path / damage
    shutil.copytree(earlier_run, folder, ignore=shutil.ignore_patterns("checkpoints", "logs"))
    if damage == "processor":
        config = json.loads((folder / "processor_config.json").read_text())
        (folder / "processor_config.json").write_text(json.dumps({**config, "num_image_tokens": 4}))
    else:
        weights = load_file(folder / "model.safetensors")
        metadata = saving.read_safetensors_metadata(folder / "model.safetensors")
        if damage == "missing":
            del weights["model.multi_modal_projector.linear.weight"]
        elif damage == "shape":  # the probe's D03
            weights["model.multi_modal_projector.linear.weight"] = torch.zeros(3, 3)
        else:
            weights["extra.weight"] = torch.zeros(2)
        save_file(weights, folder / "model.safetensors", metadata=metadata)
    image = sorted((tiny_dataset.parent / "raw" / "resized").glob("*.jpg"))[0]
    assert caption.main(["--model", str(folder), str(image)]) == 1
    assert last_line(capsys).startswith(f"error: --model {folder}: {problem}")
    argv = ["--model", str(folder), "--dataset", str(tiny_dataset), "--output_dir", str(tmp_path / "out")]
    assert evaluation.main(argv) == 1
    assert last_line(capsys).startswith(f"error: --model {folder}: {problem}")
    argv += ["--max_steps", "1", "--batch_size", "4", "--no_eval", "--report_to", "none"]
    if damage == "processor":  # train_hf.py rebuilds the processor from config.json (the probe's D14t: correct)
        assert train_hf.main(argv) == 0
    else:
        assert train_hf.main(argv) == 1
        assert last_line(capsys).startswith(f"error: --model {folder}: {problem}")

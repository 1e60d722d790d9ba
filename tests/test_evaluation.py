"""metrics/evaluation.py and the demo data: a saved model scored on one split, the demo set built once (under
main_process_first) without dataset-saving bars, and Java's tokenizer log kept out of the terminal."""

import contextlib
import json
import shutil

import pytest
from accelerate import Accelerator
from datasets import load_from_disk

from dataset_builder.demo import build_demo_dataset
from metrics import evaluation
from metrics.caption_metrics import METRIC_KEYS
from metrics.caption_metrics.caption_metrics import ptb_tokenize


@pytest.fixture(scope="module")
def demo_dataset(tmp_path_factory):
    return build_demo_dataset(tmp_path_factory.mktemp("synth"), num_images=30, seed=3)


def test_demo_dataset_is_built_once_without_saving_bars(tmp_path, capfd):
    built = build_demo_dataset(tmp_path, num_images=20, seed=5)
    assert built == tmp_path / "dataset-20-5" and (built / "dataset_dict.json").is_file()
    err = capfd.readouterr().err
    assert "synthesising" in err and "Saving the dataset" not in err
    stamp = (built / "dataset_dict.json").stat().st_mtime_ns
    assert build_demo_dataset(tmp_path, num_images=20, seed=5) == built  # reused, not rebuilt
    assert (built / "dataset_dict.json").stat().st_mtime_ns == stamp and capfd.readouterr().err == ""


def test_eval_only_scores_a_saved_model(tmp_path, demo_dataset, saved_model_dir, capsys):
    argv = ["--model", str(saved_model_dir), "--dataset", str(demo_dataset), "--split", "validation"]
    assert evaluation.main([*argv, "--max_new_tokens", "6", "--output_dir", str(tmp_path / "eval")]) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    rows = [json.loads(line) for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    images = sorted(set(load_from_disk(str(demo_dataset))["validation"]["image_id"]))
    assert sorted(r["image_id"] for r in rows) == images and metrics["num_images"] == len(images)
    assert set(METRIC_KEYS) <= set(metrics) and metrics["split"] == "validation"
    assert metrics["model"] == str(saved_model_dir) and (tmp_path / "eval" / "samples.html").is_file()
    out, err = capsys.readouterr()
    assert "| model" in out and "PTBTokenizer tokenized" not in err


def test_eval_only_builds_the_demo_data_inside_main_process_first(monkeypatch, saved_model_dir):
    """Without --dataset every process wants the demo set: the main process must build it while the others wait."""
    inside, calls = [], []

    @contextlib.contextmanager
    def main_process_first(self):
        inside.append(True)
        try:
            yield
        finally:
            inside.pop()

    class Built(Exception):
        """Stops the run once the demo set is asked for."""

    def fake_build(folder, num_images, seed, size=128):
        calls.append((bool(inside), folder, num_images, seed))
        raise Built

    monkeypatch.setattr(Accelerator, "main_process_first", main_process_first)
    monkeypatch.setattr(evaluation, "build_demo_dataset", fake_build)
    with pytest.raises(Built):
        evaluation.main(["--model", str(saved_model_dir), "--synth_images", "30"])
    assert calls == [(True, evaluation.DEMO_DATA, 30, 42)]


def test_eval_only_bad_input(tmp_path, capsys):
    assert evaluation.main(["--model", str(tmp_path / "nope")]) == 2
    assert (
        capsys.readouterr().err.strip()
        == f"error: --model='{tmp_path / 'nope'}': no such file or folder. Check the path."
    )
    assert evaluation.main(["--model", str(tmp_path), "--num_beams", "0"]) == 2
    assert capsys.readouterr().err.strip() == "error: --num_beams 0 is out of range; expected >= 1."


def test_java_tokenizer_log_stays_out_of_the_terminal(capfd):
    if shutil.which("java") is None:
        pytest.skip("needs Java")
    assert ptb_tokenize({0: ["Two planes , parked ."], 1: ["A ship (white)."]}) == {
        0: ["two planes parked"],
        1: ["a ship -lrb- white -rrb-"],
    }
    assert capfd.readouterr().err == ""


def test_java_tokenizer_failure_shows_java_stderr(tmp_path, monkeypatch):
    java = tmp_path / "java"
    java.write_text("#!/bin/sh\necho 'Error: Could not find or load main class' >&2\nexit 1\n")
    java.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(RuntimeError, match=r"exit code 1, .*Its stderr: Error: Could not find or load main class"):
        ptb_tokenize({0: ["a plane"]})


def test_compile_generation_scores_the_same_captions(tmp_path, demo_dataset, saved_model_dir, monkeypatch):
    """--compile_generation (train_hf.py has it too) runs caption.py --compile's path: the same predictions. Dynamo's
    `eager` backend keeps the test fast; the whole decode step is still traced (test_generation.py runs inductor)."""
    from torch._dynamo.utils import counters

    from cnngemma import inference

    monkeypatch.setattr(
        evaluation, "compiled_generation", lambda device: inference.compiled_generation("eager", device)
    )
    counters.clear()
    argv = ["--model", str(saved_model_dir), "--dataset", str(demo_dataset), "--split", "validation"]
    argv += ["--max_new_tokens", "6", "--eval_batch_size", "2"]
    predictions = []
    for extra in ([], ["--compile_generation"]):
        out = tmp_path / f"eval{len(extra)}"
        assert evaluation.main([*argv, *extra, "--output_dir", str(out)]) == 0
        predictions.append((out / "predictions.jsonl").read_text())
    images = set(load_from_disk(str(demo_dataset))["validation"]["image_id"])
    assert predictions[0] == predictions[1] and predictions[0].count("\n") == len(images) > 1
    assert len(images) % 2  # a short last batch, filled up so that the decode step compiles once
    assert counters["stats"]["unique_graphs"] == 1

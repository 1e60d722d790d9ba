"""scripts/compare_variants.py: its own flags never reach the train_hf.py children, the comparison files, and
position phrases."""

import json
import subprocess
from pathlib import Path

import pytest

from scripts import compare_variants

METRICS = {
    "bleu_1": 0.5,
    "bleu_2": 0.4,
    "bleu_3": 0.3,
    "bleu_4": 0.2,
    "meteor": 0.25,
    "rouge_l": 0.45,
    "cider": 1.1,
    "train_samples_per_second": 20.0,
    "eval_captions_per_second": 50.0,
    "peak_memory_mb": 2000.0,
    "parameters_total": 1000,
    "parameters_trainable": 900,
    "num_images": 2,
}


@pytest.fixture
def children(monkeypatch):
    """Stands in for the train_hf.py runs: records each command and writes what a finished run leaves."""
    commands = []

    def run(command):
        commands.append(command)
        output_dir = Path(command[command.index("--output_dir") + 1])
        output_dir.mkdir(parents=True)
        (output_dir / "metrics.json").write_text(json.dumps(METRICS))
        rows = [
            {"image_id": "a.jpg", "prediction": "two cars on the left", "references": ["cars on the left ."]},
            {"image_id": "b.jpg", "prediction": "a forest", "references": ["a dense forest ."]},
        ]
        (output_dir / "predictions.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(compare_variants.subprocess, "run", run)
    return commands


def test_own_flags_stay_out_of_the_training_runs(children, tmp_path, capsys):
    argv = ["--variants", "tiny,mobilenet_single", "--max_steps", "3", "--output_dir", str(tmp_path), "--seed", "1"]
    assert compare_variants.main(argv) == 0
    assert len(children) == 2
    for name, command in zip(("tiny", "mobilenet_single"), children):
        flags = command[2:]
        assert not [flag for flag in flags if flag.startswith("--var")]
        assert flags == [
            "--max_steps",
            "3",
            "--seed",
            "1",
            "--text_config",
            str(compare_variants.CONFIG_DIR / "tiny.json"),
            "--config",
            str(compare_variants.CONFIG_DIR / f"{name}.json"),
            "--output_dir",
            str(tmp_path / name),
            "--skip_baselines",
        ]
    summary = json.loads((tmp_path / "comparison.json").read_text())["variants"]
    assert list(summary) == ["tiny", "mobilenet_single"] and summary["tiny"]["position_accuracy"] == 1.0
    assert (tmp_path / "comparison.png").stat().st_size > 0
    assert "| tiny | 0.200 | 0.250 | 0.450 | 1.100 | 1.00 (1 img) |" in (tmp_path / "comparison.md").read_text()
    assert "| mobilenet_single |" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--var", "tiny"], "the following arguments are required: --variants"),
        (["--variants", "tiny", "--config", "x.json"], "--config: each variant's configuration/NAME.json"),
        (["--variants", "tiny,nope"], "--variants: no configuration/nope.json. Known: "),
    ],
)
def test_bad_flags_start_no_training_run(argv, message, children, capsys):
    with pytest.raises(SystemExit) as exit_info:
        compare_variants.main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert children == []


def test_position_phrases_and_accuracy():
    assert compare_variants.position_phrases("Three planes in the top left corner, one at the bottom .") == {
        "top left",
        "bottom",
    }
    assert compare_variants.position_phrases("A ship in the center of the harbour") == {"centre"}
    rows = [
        {"prediction": "two cars on the left", "references": ["Two red cars are on the left .", "cars at left"]},
        {"prediction": "two cars on the right", "references": ["Two red cars are in the top left corner ."]},
        {"prediction": "a dense forest", "references": ["A dense orange forest ."]},  # no position: not counted
    ]
    assert compare_variants.position_accuracy(rows) == (0.5, 2)

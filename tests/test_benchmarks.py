"""`python -m benchmarks all --quick`: every section runs and writes its JSON and PNG (no timing assertions), never
into the committed results/."""

import contextlib
import hashlib
import io
import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from benchmarks.__main__ import main, parse_args
from benchmarks.common import BASELINE, VARIANTS, summarize

MODELS = {*VARIANTS, BASELINE}
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    main(["all", "--quick", "--output-dir", str(out)])
    return out, json.loads((out / "benchmarks.json").read_text())


def _is_summary(value):
    return set(value) == {"median", "q1", "q3", "min", "max", "n"} and value["min"] <= value["median"] <= value["max"]


def test_quick_run_writes_json_and_pngs(quick_run):
    out, results = quick_run
    assert results["quick"] is True
    assert {"date", "device", "torch", "transformers", "timm", "cpu_count"} <= set(results["machine"])
    for section in ("encoders", "captioning", "training"):
        png = out / results[section]["png"]
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", section
        assert results[section]["wall_s"] > 0


def _median(rows, name):
    return next(r for r in rows if r["name"] == name)["images_per_s"]["median"]


def test_encoder_rows_and_ratios(quick_run):
    _, results = quick_run
    rows = results["encoders"]["rows"]
    kinds = [r["kind"] for r in rows]
    assert kinds.count("timm") == 4 and kinds.count("cnngemma") == 4 and kinds.count("projector") == 2
    assert kinds.count("siglip") == 1
    # each encoder bare with NCHW and channels_last input; CNNGemma feeds channels_last (the default)
    assert {(r["encoder"], r["path"]) for r in rows if r["kind"] == "timm"} == {
        (e, p) for e in ("mobilenetv3_large_100", "efficientnet_b0") for p in ("NCHW", "channels_last input")
    }
    assert {r["path"] for r in rows if r["kind"] == "cnngemma"} == {"channels_last input"}
    assert all(_is_summary(r["images_per_s"]) and _is_summary(r["seconds_per_batch"]) for r in rows)
    siglip = _median(rows, "SigLIP tiny (SiglipVisionModel)")
    for encoder, variant in (("mobilenetv3_large_100", "mobilenet"), ("efficientnet_b0", "efficientnet")):
        entry = results["encoders"]["summary"][encoder]
        assert entry["report_gpu_ratio"] == pytest.approx(
            {"mobilenetv3_large_100": 15.9, "efficientnet_b0": 7.2}[encoder], abs=0.05
        )
        nchw = _median(rows, f"{encoder} (timm, NCHW)")
        channels_last = _median(rows, f"{encoder} (timm, channels_last input)")
        single = _median(rows, f"CNNGemma {variant}_single (get_image_features)")
        multi = _median(rows, f"CNNGemma {variant}_multi (get_image_features)")
        assert entry["plain_ratio"] == pytest.approx(nchw / siglip)
        assert entry["default_path_ratio"] == pytest.approx(single / siglip)
        assert entry["channels_last_speedup"] == pytest.approx(channels_last / nchw)
        assert entry["wrapper_single_vs_bare"] == pytest.approx(single / channels_last)
        assert entry["multi_vs_single"] == pytest.approx(multi / single)
        assert entry["default_path_target_met"] == (single / siglip >= entry["default_path_target"])
        assert entry["wrapper_target_met"] == (single / channels_last >= entry["wrapper_target"])


def test_captioning_rows_cover_every_model_and_batch(quick_run):
    _, results = quick_run
    cap = results["captioning"]
    assert cap["settings"]["paths"] == ["eager"]  # the CPU default
    assert {(r["model"], r["batch_size"], r["path"]) for r in cap["rows"]} == {
        (m, b, "eager") for m in MODELS for b in (1, 2)
    }
    for row in cap["rows"]:
        _check_caption_row(row)
    assert {r["num_image_tokens"] for r in cap["rows"] if r["model"] == "mobilenet_single"} == {1}
    assert set(cap["summary"]["tiny/1"]["eager"]) == MODELS
    assert cap["summary"]["tiny/1"]["eager"][BASELINE] == {"path": "eager", "speedup": 1.0, "ttft_ratio": 1.0}
    assert [t["measured"] for t in cap["summary"]["targets"]] == [None] * 6  # tiny shapes check no target


def _check_caption_row(row):
    assert _is_summary(row["captions_per_s"]) and _is_summary(row["ttft_s"])
    assert row["runs"] == row["captions_per_s"]["n"] >= 1
    assert row["latency_s"]["p95"] is None if row["runs"] < 5 else row["latency_s"]["p50"] <= row["latency_s"]["p95"]
    assert set(row["split_s"]) == {"vision", "prefill", "decode"}
    assert row["split_s"]["vision"] > 0 and min(row["split_s"].values()) >= 0
    assert row["first_call_s"] > 0 and row["peak_memory_mb"] is not None


def test_training_rows_cover_every_model_and_policy(quick_run):
    _, results = quick_run
    train = results["training"]
    assert {(r["model"], r["policy"]) for r in train["rows"]} == {
        (m, p) for m in MODELS for p in ("frozen_lm", "lora")
    }
    for row in train["rows"]:
        assert _is_summary(row["samples_per_s"]) and row["trainable_parameters"] > 0
    lora = {r["model"]: r["trainable_parameters"] for r in train["rows"] if r["policy"] == "lora"}
    frozen = {r["model"]: r["trainable_parameters"] for r in train["rows"] if r["policy"] == "frozen_lm"}
    assert all(lora[m] < frozen[m] for m in VARIANTS)  # LoRA leaves the CNN frozen


def test_report_prints_markdown_tables(quick_run, capsys):
    out, _ = quick_run
    main(["report", "--output-dir", str(out)])
    text = capsys.readouterr().out
    assert "**Encoders**" in text and "**Captioning**" in text and "**Training**" in text


def test_summarize_quartiles():
    assert summarize([4.0, 1.0, 3.0, 2.0, 5.0]) == {
        "median": 3.0,
        "q1": 2.0,
        "q3": 4.0,
        "min": 1.0,
        "max": 5.0,
        "n": 5,
    }


def _snapshot(folder: Path) -> dict[str, tuple[int, str]]:
    return {
        str(p.relative_to(folder)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def default_quick_run():
    """`encoders --quick --no-channels-last` with no --output-dir: the default a user gets."""
    before = _snapshot(ROOT / "results")
    started = time.time_ns()
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        main(["encoders", "--quick", "--no-channels-last"])
    return before, started, printed.getvalue()


def test_quick_run_without_output_dir_leaves_results_untouched(default_quick_run):
    before, started, printed = default_quick_run
    assert _snapshot(ROOT / "results") == before
    json_path = ROOT / "outputs" / "benchmarks-quick" / "benchmarks.json"
    assert json_path.stat().st_mtime_ns >= started
    assert f"Wrote {json_path} in" in printed
    assert json.loads(json_path.read_text())["quick"] is True
    ignored = subprocess.run(["git", "check-ignore", "-q", str(json_path)], cwd=ROOT)
    assert ignored.returncode == 0, f"{json_path} is not git-ignored"


def test_quick_refuses_to_write_into_results(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["all", "--quick", "--device", "cpu", "--output-dir", str(ROOT / "results" / "gpu")])
    assert exit_info.value.code == 2
    assert "results/ holds the committed results" in capsys.readouterr().err
    assert parse_args(["all", "--device", "cpu"]).output_dir == ROOT / "results"


def test_no_channels_last_feeds_cnngemma_nchw_and_compares_it_with_the_bare_nchw_row(default_quick_run):
    encoders = json.loads((ROOT / "outputs" / "benchmarks-quick" / "benchmarks.json").read_text())["encoders"]
    assert encoders["settings"]["cnngemma_vision_channels_last"] is False
    assert {r["path"] for r in encoders["rows"] if r["kind"] == "cnngemma"} == {"NCHW"}
    entry = encoders["summary"]["efficientnet_b0"]
    bare = _median(encoders["rows"], "efficientnet_b0 (timm, NCHW)")
    single = _median(encoders["rows"], "CNNGemma efficientnet_single (get_image_features)")
    assert entry["default_path"] == "NCHW"
    assert entry["wrapper_single_vs_bare"] == pytest.approx(single / bare)


def test_all_on_cpu_shrinks_the_batches_that_siglip_makes_slow_and_flags_still_win():
    from benchmarks.__main__ import CPU_ALL, CPU_DEFAULTS

    alone = parse_args(["captioning", "--device", "cpu"])
    together = parse_args(["all", "--device", "cpu"])
    assert alone.caption_batch_sizes == CPU_DEFAULTS["caption_batch_sizes"] == [1, 8, 32]
    assert (alone.lm_size, alone.paths, alone.caption_budget_s) == (["270m"], ["eager"], 30.0)
    assert together.caption_batch_sizes == CPU_ALL["caption_batch_sizes"] == [1, 8]
    assert (together.train_batch_size, together.baseline_train_batch_size) == (4, 2)
    assert together.batch_size == alone.batch_size == 32  # the encoders keep the report's protocol
    explicit = parse_args(["all", "--device", "cpu", "--caption-batch-sizes", "1", "32", "--train-batch-size", "8"])
    assert explicit.caption_batch_sizes == [1, 32] and explicit.train_batch_size == 8


def test_gpu_script_refuses_an_unknown_step_before_doing_any_work(tmp_path):
    """A typo in a step name stops run_gpu.sh at once, naming the steps it knows, before it writes anything."""
    script = ROOT / "benchmarks" / "run_gpu.sh"
    env = {"PATH": "/usr/bin:/bin", "RESULTS": str(tmp_path / "gpu"), "ARCHIVE": str(tmp_path / "gpu.tgz")}
    done = subprocess.run(["bash", str(script), "fp32", "bf61"], capture_output=True, text=True, env=env)
    assert done.returncode == 2
    assert done.stderr == (
        "run_gpu.sh: unknown step 'bf61'; expected any of: e2e_2b_b256 e2e_2b_b32 e2e_2b_b1 qlora_2b e2e_270m_b256 "
        "e2e_270m_b32 e2e_270m_b1 e2e_rest fp32 bf16 bf16_b256 compile_b32 compile_b256\n"
    )
    assert list(tmp_path.iterdir()) == []


def test_gpu_script_dry_run_on_cpu_measures_both_paths_and_writes_outside_results(tmp_path):
    """The GPU script's first step, dry-run on CPU (EXTRA="--quick --device cpu": tiny shapes, and the compiled
    path traced whole by dynamo with the eager backend). It writes to the git-ignored outputs/, never to results/."""
    script = ROOT / "benchmarks" / "run_gpu.sh"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "EXTRA": "--quick --device cpu"}
    done = subprocess.run(["bash", str(script), "e2e_2b_b256"], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    results_dir = tmp_path / "outputs" / "benchmarks-quick" / "gpu"
    assert "=== e2e_2b_b256: exit 0 after" in (results_dir / "gpu_e2e_2b_b256.log").read_text()
    assert (tmp_path / "outputs" / "benchmarks-quick" / "gpu.tgz").exists()
    assert not (tmp_path / "results").exists()
    cap = json.loads((results_dir / "benchmarks_gpu_e2e_2b_b256.json").read_text())["captioning"]
    assert {(r["model"], r["path"], r["batch_size"]) for r in cap["rows"]} == {
        (m, p, b) for m in ("mobilenet_single", BASELINE) for p in ("eager", "compiled") for b in (1, 2)
    }
    for row in cap["rows"]:
        _check_caption_row(row)


@pytest.mark.parametrize(
    "argv",
    [["--device", "cpu", "--dtype", "bf16"], ["--device", "meta"]],
    ids=["bf16", "not-cpu"],
)
def test_int8_path_is_refused_off_cpu_fp32(capsys, argv):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["captioning", "--paths", "int8", *argv])
    assert exit_info.value.code == 2
    device = argv[argv.index("--device") + 1]
    dtype = argv[argv.index("--dtype") + 1] if "--dtype" in argv else "fp32"
    assert capsys.readouterr().err.endswith(
        f"error: --paths int8 runs on CPU in fp32 only (caption.py --quantize int8), got --device {device} "
        f"--dtype {dtype}.\n"
    )


@pytest.mark.parametrize("flag", ["--caption-batch-sizes", "--new-tokens", "--caption-rounds"])
def test_caption_counts_below_one_are_refused(capsys, flag):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["captioning", "--device", "cpu", flag, "0"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.endswith(f"error: {flag} 0: expected whole numbers >= 1.\n")

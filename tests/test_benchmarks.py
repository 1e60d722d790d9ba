"""`python -m benchmarks all --quick`: every section runs and writes its JSON and PNG (no timing assertions)."""

import json

import pytest

from benchmarks.__main__ import main
from benchmarks.common import BASELINE, VARIANTS, median_interval, summarize

MODELS = {*VARIANTS, BASELINE}


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


def test_encoder_rows_and_ratios(quick_run):
    _, results = quick_run
    rows = results["encoders"]["rows"]
    kinds = [r["kind"] for r in rows]
    assert kinds.count("timm") == 6 and kinds.count("cnngemma") == 4 and kinds.count("projector") == 2
    # each encoder bare in NCHW, channels_last and channels_last + folded BN; CNNGemma runs the last (the default)
    paths = {(r["encoder"], r["path"]) for r in rows if r["kind"] == "timm"}
    assert {p for _, p in paths} == {"NCHW", "channels_last", "channels_last + folded BN"} and len(paths) == 6
    assert {r["path"] for r in rows if r["kind"] == "cnngemma"} == {"channels_last + folded BN"}
    assert kinds.count("siglip") == 1
    assert all(_is_summary(r["images_per_s"]) and _is_summary(r["seconds_per_batch"]) for r in rows)
    for encoder in ("mobilenetv3_large_100", "efficientnet_b0"):
        entry = results["encoders"]["summary"][encoder]
        assert entry["report_gpu_ratio"] == pytest.approx(
            {"mobilenetv3_large_100": 15.9, "efficientnet_b0": 7.2}[encoder], abs=0.05
        )
        for key in (
            "plain_ratio",
            "default_path_ratio",
            "channels_last_speedup",
            "fold_batchnorm_speedup",
            "wrapper_single_vs_bare",
            "multi_vs_single",
        ):
            assert entry[key] > 0, key
        assert isinstance(entry["default_path_target_met"], bool) and isinstance(entry["wrapper_target_met"], bool)


def test_captioning_rows_cover_every_model_and_batch(quick_run):
    _, results = quick_run
    cap = results["captioning"]
    assert {(r["model"], r["batch_size"]) for r in cap["rows"]} == {(m, b) for m in MODELS for b in (1, 2)}
    for row in cap["rows"]:
        assert _is_summary(row["captions_per_s"])
        assert row["latency_s"]["p50"] <= row["latency_s"]["p95"]
        assert set(row["split_s"]) == {"vision", "prefill", "decode"}
        assert row["split_s"]["vision"]["median"] > 0 and row["split_s"]["decode"]["median"] > 0
        assert row["peak_memory_mb"] is not None
    assert {r["num_image_tokens"] for r in cap["rows"] if r["model"] == "mobilenet_single"} == {1}
    assert set(cap["summary"]["1"]) == set(VARIANTS)
    assert {"variant", "batch_size", "speedup", "measured", "met"} <= set(cap["summary"]["target"])


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


def test_median_interval_covers_the_true_median_about_95_percent_of_the_time():
    """2,000 samples of 30 draws from a distribution with a known median (an exponential's, ln 2): the interval holds
    it in 95.7% of them (the binomial coverage for n = 30). With 3 values it is the whole range."""
    import math
    import random

    rng = random.Random(0)
    samples = [[rng.expovariate(1.0) for _ in range(30)] for _ in range(2000)]
    covered = sum(low <= math.log(2) <= high for low, high in map(median_interval, samples)) / len(samples)
    assert 0.94 <= covered <= 0.975
    assert median_interval([3.0, 1.0, 2.0]) == (1.0, 3.0)


def test_fast_paths_can_be_switched_off(tmp_path):
    """--no-fold-batchnorm: CNNGemma runs channels_last alone, and the wrapper is compared with that bare row."""
    main(["encoders", "--quick", "--no-fold-batchnorm", "--output-dir", str(tmp_path)])
    encoders = json.loads((tmp_path / "benchmarks.json").read_text())["encoders"]
    assert encoders["settings"]["cnngemma_vision_fold_batchnorm"] is False
    assert {r["path"] for r in encoders["rows"] if r["kind"] == "cnngemma"} == {"channels_last"}
    main(["encoders", "--quick", "--no-fold-batchnorm", "--no-channels-last", "--output-dir", str(tmp_path)])
    encoders = json.loads((tmp_path / "benchmarks.json").read_text())["encoders"]
    assert {r["path"] for r in encoders["rows"] if r["kind"] == "cnngemma"} == {"NCHW"}
    entry = encoders["summary"]["efficientnet_b0"]
    bare = next(r for r in encoders["rows"] if r["name"] == "efficientnet_b0 (timm, NCHW)")
    single = next(r for r in encoders["rows"] if r["name"] == "CNNGemma efficientnet_single (get_image_features)")
    assert entry["default_path"] == "NCHW"
    assert entry["wrapper_single_vs_bare_medians"] == (
        single["images_per_s"]["median"] / bare["images_per_s"]["median"]
    )
    # the target uses rounds of the same calls back to back, each with an A/A control: --quick runs 3
    assert entry["wrapper_single_vs_bare_paired"]["n"] == entry["wrapper_control"]["n"] == 3
    assert entry["wrapper_single_vs_bare"] == entry["wrapper_single_vs_bare_paired"]["median"]


def test_all_on_cpu_shrinks_the_batches_that_siglip_makes_slow_and_flags_still_win():
    from benchmarks.__main__ import CPU_ALL, CPU_DEFAULTS, parse_args

    alone = parse_args(["captioning", "--device", "cpu"])
    together = parse_args(["all", "--device", "cpu"])
    assert alone.caption_batch_sizes == CPU_DEFAULTS["caption_batch_sizes"] == [1, 32]
    assert together.caption_batch_sizes == CPU_ALL["caption_batch_sizes"] == [1, 8]
    assert (together.train_batch_size, together.baseline_train_batch_size) == (4, 2)
    assert together.batch_size == alone.batch_size == 32  # the encoders keep the report's protocol
    explicit = parse_args(["all", "--device", "cpu", "--caption-batch-sizes", "1", "32", "--train-batch-size", "8"])
    assert explicit.caption_batch_sizes == [1, 32] and explicit.train_batch_size == 8


def test_wrapper_rounds_below_one_are_refused_with_the_fix(capsys):
    from benchmarks.__main__ import parse_args

    with pytest.raises(SystemExit) as exit_info:
        parse_args(["encoders", "--device", "cpu", "--wrapper-rounds", "0"])
    assert exit_info.value.code == 2
    assert (
        "--wrapper-rounds 0: expected at least 1 round of bare, CNNGemma, bare calls, the wrapper ratio is measured "
        "from them (a multiple of 3 puts each call in each place equally often). Drop the flag for the default "
        "(60 on CPU, 15 in `all`, 99 on GPU)." in capsys.readouterr().err
    )


def test_wrapper_rounds_give_each_call_each_place_and_an_a_a_control(monkeypatch):
    """Per round: the two bare times' mean over the wrapped time, and the first bare time over the second. The bare
    call slows down by a second each time it runs (drift), so a control that mixed up the two bare calls would show."""
    import torch

    from benchmarks import encoders

    clock, order, bare_runs = [0.0], [], []

    def bare():
        bare_runs.append(None)
        order.append("bare")
        clock[0] += len(bare_runs)  # 1 s, 2 s, 3 s, ...

    def wrapped():
        order.append("wrapped")
        clock[0] += 10.0

    monkeypatch.setattr(encoders.time, "perf_counter", lambda: clock[0])
    ratios = encoders.wrapper_rounds(bare, wrapped, 3, torch.device("cpu"))
    # round 1 runs bare (1 s), wrapped, again (2 s); round 2 wrapped, again (3 s), bare (4 s); round 3 again (5 s),
    # bare (6 s), wrapped
    assert [order[3 * i : 3 * i + 3].index("wrapped") for i in range(3)] == [1, 0, 2]
    assert ratios["wrapper"] == pytest.approx([1.5 / 10, 3.5 / 10, 5.5 / 10])
    assert ratios["control"] == pytest.approx([1 / 2, 4 / 3, 6 / 5])


def test_the_bare_row_on_cnngemmas_path_runs_the_very_module_cnngemma_runs():
    """The wrapper ratio compares CNNGemma's call with the folded copy it runs itself, not with a second copy of the
    weights: the two differ by CNNGemma's code around the encoder (pooling, projector, the fold check) alone."""
    import torch

    from benchmarks import encoders
    from benchmarks.__main__ import parse_args

    args = parse_args(["encoders", "--quick", "--device", "cpu"])
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    cases = encoders._cases(args, torch.device("cpu"), torch.float32, x, {})
    for variant in ("mobilenet_single", "efficientnet_single"):
        encoder = VARIANTS[variant][0]
        model = cases[f"CNNGemma {variant} (get_image_features)"][1].func.__self__
        with torch.no_grad():
            folded = model.model.inference_vision_tower()
        assert folded is not model.vision_tower  # folding is on: CNNGemma runs its cached copy
        for path in ("NCHW", "channels_last", "channels_last + folded BN"):
            meta, bare = cases[f"{encoder} (timm, {path})"]
            own = path == "channels_last + folded BN"
            assert meta["cnngemma_module"] is own and (bare.args[0] is folded) is own, path
        with torch.inference_mode():
            feature_map = bare()
            pooled = model.model.multi_modal_projector(feature_map.mean(dim=(2, 3)).unsqueeze(1))
            torch.testing.assert_close(model.get_image_features(x), pooled, rtol=0, atol=0)


def test_compiled_runs_time_the_bare_encoders_on_cnngemmas_path_only():
    """Under --compile the bare rows run only CNNGemma's own path (channels_last, unfolded: the fold happens outside
    the graph), and the ratios that need the other bare rows are None, shown as `-`."""
    import torch

    from benchmarks import encoders
    from benchmarks.__main__ import markdown_tables, parse_args

    args = parse_args(["encoders", "--quick", "--compile", "--device", "cpu"])
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    cases = encoders._cases(args, torch.device("cpu"), torch.float32, x, {})
    bare = sorted(name for name, (meta, _) in cases.items() if meta["kind"] == "timm")
    assert bare == ["efficientnet_b0 (timm, channels_last)", "mobilenetv3_large_100 (timm, channels_last)"]
    assert encoders.default_path_of(args) == "channels_last"
    # compiled, CNNGemma runs its tower unfolded: the bare row runs that very tower
    model = cases["CNNGemma mobilenet_single (get_image_features)"][1].func.__self__
    assert cases["mobilenetv3_large_100 (timm, channels_last)"][1].args[0] is model.vision_tower

    rows = [
        {"name": name, **meta, "images_per_s": {"median": 10.0 + i, "q1": 9.0, "q3": 11.0 + i, "n": 1}}
        for i, (name, (meta, _)) in enumerate(cases.items())
    ]
    wrapper = {"mobilenetv3_large_100": [1.0], "efficientnet_b0": [0.9]}
    summary = encoders._summary(
        rows, "channels_last", {encoder: {"wrapper": r, "control": [1.0]} for encoder, r in wrapper.items()}
    )
    assert summary["efficientnet_b0"]["wrapper_single_vs_bare_ci95"] == (0.9, 0.9)
    entry = summary["efficientnet_b0"]
    assert entry["plain_ratio"] is None and entry["channels_last_speedup"] is None
    assert entry["wrapper_single_vs_bare"] == 0.9 and not entry["wrapper_target_met"]
    for row in rows:
        row["seconds_per_batch"] = {"median": 1 / row["images_per_s"]["median"]}
    settings = {"batch_size": 2, "image_size": 64, "dtype": "fp32", "device": "cpu", "compile": True}
    table = markdown_tables({"encoders": {"settings": settings, "rows": rows, "summary": summary}})
    assert "| CPU fp32 compiled plain ratio |" in table
    assert "| efficientnet_b0 | 7.2x | - |" in table and "| - / - |" in table


def test_gpu_script_refuses_an_unknown_step_before_doing_any_work(tmp_path):
    """A typo in a step name stops run_gpu.sh at once, naming the steps it knows, before it writes anything."""
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "run_gpu.sh"
    env = {"PATH": "/usr/bin:/bin", "RESULTS": str(tmp_path / "gpu"), "ARCHIVE": str(tmp_path / "gpu.tgz")}
    done = subprocess.run(["bash", str(script), "fp32", "bf61"], capture_output=True, text=True, env=env)
    assert done.returncode == 2
    assert done.stderr == (
        "run_gpu.sh: unknown step 'bf61'; expected any of: fp32 bf16 bf16_b256 compile_b32 compile_b256\n"
    )
    assert list(tmp_path.iterdir()) == []


def test_malloc_keep_lets_a_second_big_tensor_reuse_the_pages_of_the_first():
    """glibc by default hands a freed 16 MB tensor back to the system, so the next one page-faults all 4k pages in
    again; after keep_freed_memory() the next one reuses them (the biggest activation of a batch of 32 here is 51 MB;
    blocks of 64 MB and more still come fresh). In a Python of its own: the setting is process-wide."""
    import subprocess
    import sys
    from pathlib import Path

    probe = (
        "import resource, torch\n"
        "from benchmarks.common import keep_freed_memory\n"
        "def faults_of_a_second_tensor():\n"
        "    torch.ones(4 << 20)\n"  # 16 MB, allocated, touched, freed
        "    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "    torch.ones(4 << 20)\n"
        "    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before\n"
        "glibc = faults_of_a_second_tensor()\n"
        "keep_freed_memory()\n"
        "print(glibc, faults_of_a_second_tensor())\n"
    )
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", probe], cwd=root, capture_output=True, text=True, check=True)
    glibc, keep = map(int, done.stdout.split())
    pages = (16 << 20) // 4096
    assert glibc >= pages // 2 and keep < pages // 20, (glibc, keep)


def test_malloc_keep_without_glibc_says_what_to_do(monkeypatch):
    import ctypes

    from benchmarks import common

    def no_glibc(name):
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(ctypes, "CDLL", no_glibc)
    with pytest.raises(RuntimeError) as error:
        common.keep_freed_memory()
    assert str(error.value) == (
        "--malloc keep tunes glibc's malloc, and this system has no glibc (libc.so.6: cannot open shared object "
        "file). Drop the flag, or use your allocator's own settings (jemalloc, tcmalloc) through the environment."
    )

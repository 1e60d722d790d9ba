"""Runs the benchmarks and writes results/benchmarks.json and the PNGs (--quick: outputs/benchmarks-quick/).

python -m benchmarks all              # encoders + captioning + training, minutes on 2 CPU cores
python -m benchmarks encoders --batch-size 32 --dtype bf16 --compile
python -m benchmarks captioning --lm-size 270m 2b --paths eager compiled
python -m benchmarks all --quick      # seconds: tiny shapes, what the tests run; never writes into results/
python -m benchmarks report           # the Markdown tables of an existing results/benchmarks.json
"""

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

import torch

from cnngemma.errors import UsageError, path_type, run_command
from cnngemma.outputs import write_text_atomically

from . import plots
from .captioning import MODELS, PATHS
from .common import DTYPES, LM_SHAPES, SIGLIP_SHAPES, machine_info

SECTIONS = ("encoders", "captioning", "training")
ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "results"
# git-ignored: tiny-shape numbers must never replace the committed results that README quotes
QUICK_DIR = ROOT / "outputs" / "benchmarks-quick"

# Sizes and timing on CPU. Each section run alone measures at full size: the report's encoder protocol (batch 32,
# each model 5 rounds of >= 1 s or 30 s in all), captioning with the 270M decoder on the eager path (the CPU default:
# see benchmarks/README.md) at batch 1, 8 and 32 (5 runs or 30 s per cell), training at batch 8 (baseline 4).
CPU_DEFAULTS = {
    "rounds": 5,
    "slice_s": 1.0,
    "budget_s": 30.0,
    "lm_size": ["270m"],
    "paths": ["eager"],
    "caption_batch_sizes": [1, 8, 32],
    "caption_rounds": 5,
    "caption_slice_s": 0.0,
    "caption_budget_s": 30.0,
    "train_batch_size": 8,
    "baseline_train_batch_size": 4,
    "train_rounds": 3,
    "train_slice_s": 0.0,
}
# `all` on CPU keeps the encoders at full size and shrinks the batches that SigLIP so400m makes slow (one batch-32
# caption takes it ~2 minutes on 2 cores).
CPU_ALL = {
    **CPU_DEFAULTS,
    "caption_batch_sizes": [1, 8],
    "caption_rounds": 2,
    "caption_budget_s": None,
    "train_batch_size": 4,
    "baseline_train_batch_size": 2,
    "train_rounds": 2,
}
GPU_DEFAULTS = {
    "rounds": 100,
    "slice_s": 0.0,
    "budget_s": None,
    "lm_size": ["270m", "2b"],
    "paths": ["eager", "compiled"],
    "caption_batch_sizes": [1, 32, 256],
    "caption_rounds": 10,
    "caption_slice_s": 0.0,
    "caption_budget_s": None,
    "train_batch_size": 32,
    "baseline_train_batch_size": 4,
    "train_rounds": 10,
    "train_slice_s": 0.0,
}
QUICK = {
    "image_size": 64,
    "batch_size": 2,
    "projector_width": 128,
    "siglip_shapes": ["siglip_tiny"],
    "baseline_siglip": "siglip_tiny",
    "lm_size": ["tiny"],
    "backend": "eager",  # dynamo still traces the whole decode step (a graph break fails), without inductor's build
    "caption_batch_sizes": [1, 2],
    "new_tokens": 4,
    "caption_tokens": 4,
    "train_batch_size": 2,
    "baseline_train_batch_size": 2,
    "rounds": 1,
    "slice_s": 0.0,
    "budget_s": None,
    "caption_rounds": 1,
    "caption_slice_s": 0.0,
    "caption_budget_s": None,
    "train_rounds": 1,
    "train_slice_s": 0.0,
    "lora_rank": 4,
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("command", choices=[*SECTIONS, "all", "report"], help="What to measure, or `report`.")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="Tiny shapes and one round: a smoke test in seconds, written to outputs/benchmarks-quick/ by default.",
    )
    parser.add_argument("--device", default=None, help="torch device; default cuda when available, else cpu.")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="Weights and inputs dtype.")
    parser.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="CNNGemma's vision_channels_last: channels_last input images (default on); --no-channels-last feeds NCHW.",
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile every encoder row (encoders only).")
    parser.add_argument("--batch-size", type=int, default=32, help="Encoder batch size (the report's: 32).")
    parser.add_argument(
        "--iters", type=int, default=None, help="Encoders: exactly this many timed runs per model (GPU default 100)."
    )
    parser.add_argument("--rounds", type=int, default=None, help="Encoders: interleaved timing rounds.")
    parser.add_argument("--slice-s", type=float, default=None, help="Encoders: seconds each model runs per round.")
    parser.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="Encoders: a model stops after this many timed seconds (>= 2 runs).",
    )
    parser.add_argument("--image-size", type=int, default=224, help="Square input size in pixels.")
    parser.add_argument(
        "--projector-width", type=int, default=2048, help="Encoders: LM width CNNGemma projects to (Gemma-2B: 2048)."
    )
    parser.add_argument(
        "--siglip-shapes",
        nargs="+",
        default=["siglip_base16", "siglip_so400m14"],
        choices=list(SIGLIP_SHAPES),
        help="Encoders: SigLIP towers to measure.",
    )
    parser.add_argument(
        "--baseline-siglip", default="siglip_so400m14", choices=list(SIGLIP_SHAPES), help="PaliGemma's tower."
    )
    parser.add_argument(
        "--lm-size",
        nargs="+",
        choices=list(LM_SHAPES),
        default=None,
        help="Decoder shapes (random init): captioning runs each; training the first (default 270m; GPU 270m 2b).",
    )
    parser.add_argument(
        "--paths",
        nargs="+",
        choices=PATHS,
        default=None,
        help="Captioning paths: caption.py's default (eager), --compile (compiled), --quantize int8 (int8, CPU "
        "only). Default: eager; GPU eager compiled.",
    )
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS), help="Captioning: which models.")
    parser.add_argument(
        "--backend", default="inductor", help="torch.compile backend of the compiled path (--quick: eager)."
    )
    parser.add_argument(
        "--caption-batch-sizes",
        type=int,
        nargs="+",
        default=None,
        help="Captioning batch sizes (default 1 8 32; GPU 1 32 256; 1 8 for `all` on CPU).",
    )
    parser.add_argument("--new-tokens", type=int, default=20, help="Captioning: tokens generated per image.")
    parser.add_argument("--caption-rounds", type=int, default=None, help="Captioning: timed runs per model.")
    parser.add_argument("--caption-slice-s", type=float, default=None, help="Captioning: seconds per model per round.")
    parser.add_argument(
        "--caption-budget-s", type=float, default=None, help="Captioning: a model stops after this many timed seconds."
    )
    parser.add_argument(
        "--train-batch-size",
        type=int,
        default=None,
        help="Training batch of the variants (default 8; 4 for `all` on CPU).",
    )
    parser.add_argument(
        "--baseline-train-batch-size",
        type=int,
        default=None,
        help="Training batch of the baseline (default 4; 2 for `all` on CPU).",
    )
    parser.add_argument("--caption-tokens", type=int, default=20, help="Training: caption length in tokens.")
    parser.add_argument("--train-rounds", type=int, default=None, help="Training: timed steps per model and policy.")
    parser.add_argument("--train-slice-s", type=float, default=None, help="Training: seconds per model per round.")
    parser.add_argument("--lora-rank", type=int, default=16, help="Training: LoRA rank for the `lora` policy.")
    parser.add_argument(
        "--output-dir",
        type=lambda text: Path(path_type(text)),
        default=None,
        help="Where JSON and PNGs go (default results/; with --quick outputs/benchmarks-quick/, which git ignores).",
    )
    parser.add_argument("--tag", default="", help="Suffix for the output names, e.g. `gpu` -> benchmarks_gpu.json.")
    args = parser.parse_args(argv)

    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.device.type == "cuda":
        defaults = GPU_DEFAULTS
    else:
        defaults = CPU_ALL if args.command == "all" else CPU_DEFAULTS
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.iters is not None:
        args.rounds, args.slice_s, args.budget_s = args.iters, 0.0, None
    if args.output_dir is None:
        args.output_dir = QUICK_DIR if args.quick else RESULTS_DIR
    elif args.quick and args.command != "report" and args.output_dir.resolve().is_relative_to(RESULTS_DIR):
        parser.error(
            f"--quick --output-dir {args.output_dir}: results/ holds the committed results, and --quick's tiny-shape "
            "numbers would replace them. Drop --output-dir (default outputs/benchmarks-quick/) or pick another folder."
        )
    counts = {"--caption-batch-sizes": min(args.caption_batch_sizes), "--new-tokens": args.new_tokens}
    counts["--caption-rounds"] = args.caption_rounds
    for flag, value in counts.items():
        if value < 1:
            parser.error(f"{flag} {value}: expected whole numbers >= 1.")
    if "int8" in args.paths and (args.device.type != "cpu" or args.dtype != "fp32"):
        parser.error(
            f"--paths int8 runs on CPU in fp32 only (caption.py --quantize int8), got --device {args.device} "
            f"--dtype {args.dtype}."
        )
    args.torch_dtype = DTYPES[args.dtype]
    return args


def _fmt(summary: dict, digits: int = 1) -> str:
    return f"{summary['median']:.{digits}f} [{summary['q1']:.{digits}f}-{summary['q3']:.{digits}f}]"


def _x(ratio: float | None, digits: int = 1) -> str:
    """`1.4x`, or `-` for a ratio whose rows were not measured (compiled runs before 2026-11-30 left some out)."""
    return "-" if ratio is None else f"{ratio:.{digits}f}x"


def markdown_tables(results: dict) -> str:
    """The three tables (medians with IQR in brackets) and the ratios, as Markdown."""
    out = []
    if "encoders" in results:
        enc = results["encoders"]
        s = enc["settings"]
        out += [
            f"**Encoders** (batch {s['batch_size']}, {s['image_size']} px, {s['dtype']}, {s['device']}; "
            f"images/s, median [IQR] of n runs)",
            "",
            "| model | images/s | ms/batch | n | vs SigLIP base/16 |",
            "|---|---|---|---|---|",
        ]
        ref = next((r for r in enc["rows"] if r["encoder"] == "siglip_base16"), None) or next(
            r for r in enc["rows"] if r["kind"] == "siglip"
        )
        for r in enc["rows"]:
            ratio = r["images_per_s"]["median"] / ref["images_per_s"]["median"]
            out.append(
                f"| {r['name']} | {_fmt(r['images_per_s'])} | {1000 * r['seconds_per_batch']['median']:.0f} "
                f"| {r['images_per_s']['n']} | {ratio:.1f}x |"
            )
        where = f"{s['device'].split(':')[0].upper()} {s['dtype']}" + (" compiled" if s["compile"] else "")
        out += [
            "",
            f"| encoder | report GPU ratio | {where} bare NCHW / SigLIP | {where} CNNGemma single / SigLIP (target) "
            "| channels_last input speedup | single wrapper / bare timm, same input (target 95%) "
            "| multi / single throughput |",
            "|---|---|---|---|---|---|---|",
        ]
        for name in ("mobilenetv3_large_100", "efficientnet_b0"):
            e = enc["summary"][name]
            out.append(
                f"| {name} | {e['report_gpu_ratio']:.1f}x | {_x(e['plain_ratio'])} | {e['default_path_ratio']:.1f}x "
                f"({e['default_path_target']:.0f}x: {'met' if e['default_path_target_met'] else 'not met'}) "
                f"| {_x(e['channels_last_speedup'], 2)} | {100 * e['wrapper_single_vs_bare']:.0f}% "
                f"({'met' if e['wrapper_target_met'] else 'not met'}) | {100 * e['multi_vs_single']:.0f}% |"
            )
        out.append("")
    if "captioning" in results and "paths" not in results["captioning"]["settings"]:
        out += ["**Captioning**: recorded before 2026-11-30 in an older layout; read its rows in the JSON.", ""]
    elif "captioning" in results:
        cap = results["captioning"]
        s = cap["settings"]
        out += [
            f"**Captioning** ({s['new_tokens']} new tokens, greedy, {s['dtype']}, {s['device']}; median [IQR] of n "
            "runs; TTFT: vision + prefill; speedup and TTFT ratio against the PaliGemma design on the same path)",
            "",
            "| LM | path | model | batch | image tokens | captions/s | n | TTFT (s) | latency p50 / p95 (s) "
            "| vision / prefill / decode (s) | first call (s) | peak memory (MB) | speedup | TTFT ratio |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in cap["rows"]:
            split = " / ".join(f"{r['split_s'][k]:.3f}" for k in ("vision", "prefill", "decode"))
            ratios = cap["summary"].get(f"{r['lm_size']}/{r['batch_size']}", {}).get(r["path"], {}).get(r["model"])
            p95 = r["latency_s"]["p95"]
            memory = f"{r['peak_memory_mb']:.0f}" if r["peak_memory_mb"] is not None else "-"
            out.append(
                f"| {r['lm_size']} | {r['path']} | {r['model']} | {r['batch_size']} | {r['num_image_tokens']} "
                f"| {_fmt(r['captions_per_s'], 2)} | {r['runs']} | {r['ttft_s']['median']:.3f} "
                f"| {r['latency_s']['p50']:.2f} / {'-' if p95 is None else f'{p95:.2f}'} | {split} "
                f"| {r['first_call_s']:.1f} | {memory} | {_x(ratios and ratios['speedup'], 2)} "
                f"| {_x(ratios and ratios['ttft_ratio'], 3)} |"
            )
        out += [
            "",
            "| target (mobilenet_single vs PaliGemma, faster path each) | measured | verdict |",
            "|---|---|---|",
        ]
        for t in cap["summary"]["targets"]:
            bound = f">= {t['at_least']:g}" if "at_least" in t else f"<= {t['at_most']:.3g}"
            measured = "not run here" if t["measured"] is None else f"{t['measured']:.3g}"
            verdict = "-" if t["met"] is None else ("met" if t["met"] else "not met")
            out.append(
                f"| LM {t['lm_size']}, batch {t['batch_size']}: {t['metric']} {bound} | {measured} | {verdict} |"
            )
        out.append("")
    if "training" in results:
        tr = results["training"]
        s = tr["settings"]
        out += [
            f"**Training** (LM {s['lm_size']}, caption {s['caption_tokens']} tokens, AdamW, {s['dtype']}, "
            f"{s['device']}; median [IQR])",
            "",
            "| model | policy | batch | samples/s | peak memory (MB) | trainable params | vs baseline |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in tr["rows"]:
            ratio = tr["summary"][r["policy"]].get(r["model"])
            memory = f"{r['peak_memory_mb']:.0f}" if r["peak_memory_mb"] is not None else "-"
            out.append(
                f"| {r['model']} | {r['policy']} | {r['batch_size']} | {_fmt(r['samples_per_s'], 2)} | {memory} "
                f"| {r['trainable_parameters']:,} | {f'{ratio:.1f}x' if ratio else '1.0x (baseline)'} |"
            )
        out.append("")
    return "\n".join(out)


def earlier_results(json_path: Path, sections) -> dict:
    """The benchmarks' own earlier JSON (its sections are kept), or {}. The JSON and PNGs this run writes replace only
    files the benchmarks wrote: a JSON with their `machine` entry, a PNG tagged as theirs or named by that JSON."""
    results = {}
    if json_path.exists():
        try:
            results = json.loads(json_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            results = None
        if not isinstance(results, dict) or "machine" not in results:
            raise UsageError(
                f"--output-dir {json_path.parent}: {json_path.name} there was not written by the benchmarks; it would "
                "be replaced. Pass another --output-dir (or --tag for other file names)."
            )
    for section in sections:
        png = json_path.parent / f"{section}{json_path.stem.removeprefix('benchmarks')}.png"
        if png.exists() and not png_is_ours(png, (results.get(section) or {}).get("png")):
            raise UsageError(
                f"--output-dir {json_path.parent}: {png.name} there was not written by the benchmarks; it would be "
                "replaced. Pass another --output-dir (or --tag for other file names)."
            )
    return results


def png_is_ours(path: Path, recorded: str | None) -> bool:
    from PIL import Image, UnidentifiedImageError

    if recorded == path.name:  # an earlier version's PNG, named by its JSON
        return True
    try:
        with Image.open(path) as image:
            return image.info.get("Software") == plots.SOFTWARE
    except (OSError, UnidentifiedImageError):
        return False


def run_benchmarks(args) -> dict:
    from . import captioning, encoders, training

    modules = {"encoders": encoders, "captioning": captioning, "training": training}
    sections = SECTIONS if args.command == "all" else (args.command,)
    suffix = f"_{args.tag}" if args.tag else ""
    json_path = args.output_dir / f"benchmarks{suffix}.json"
    results = earlier_results(json_path, sections)  # before minutes of measuring
    args.output_dir.mkdir(parents=True, exist_ok=True)
    results["machine"] = machine_info(args.device)
    results["quick"] = args.quick
    print(f"Writing {json_path} and the PNGs beside it.")
    started = time.perf_counter()
    for section in sections:
        section_start = time.perf_counter()
        load = [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None
        results[section] = modules[section].run(args, args.device)
        results[section]["wall_s"] = time.perf_counter() - section_start
        results[section]["date"] = machine_info(args.device)["date"]
        results[section]["load_average_at_start"] = load  # other processes' load: these are shared CPUs
        gc.collect()
        plot = getattr(plots, f"plot_{section}")
        png = plot(results[section], args.output_dir / f"{section}{suffix}.png", f" ({results['machine']['device']})")
        results[section]["png"] = png.name
        write_text_atomically(
            json_path, json.dumps(results, indent=1) + "\n"
        )  # after each section: a crash keeps the rest
    results["wall_s"] = time.perf_counter() - started
    write_text_atomically(json_path, json.dumps(results, indent=1) + "\n")
    print(markdown_tables({k: results[k] for k in sections}))
    print(f"Wrote {json_path} in {results['wall_s']:.0f}s.")
    return results


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.command == "report":
        suffix = f"_{args.tag}" if args.tag else ""
        json_path = args.output_dir / f"benchmarks{suffix}.json"
        if not json_path.exists():
            sys.exit(f"{json_path} does not exist; run `python -m benchmarks all` first.")
        print(markdown_tables(json.loads(json_path.read_text())))
        return 0
    return run_command(lambda: run_benchmarks(args) and None)


if __name__ == "__main__":
    sys.exit(main())

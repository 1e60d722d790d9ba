"""End-to-end captioning: captions/s, time to first token (TTFT), latency and the vision / prefill / decode split.

The four CNNGemma variants and the PaliGemma design (SigLIP so400m/14, 256 image tokens) share one decoder, prompt
and batch, all with random weights of the true shapes. The generation paths are caption.py's:
- eager: the dynamic KV cache, every step in eager PyTorch (transformers' default);
- compiled: `caption.py --compile`, the static KV cache with the decode steps compiled whole; prefill is eager;
- int8: `caption.py --quantize int8` (CPU only), eager with int8 weights in the decoder and its head.
A run generates `new_tokens` tokens (no early <eos>). A TTFT run generates one: vision plus prefill, until the whole
batch has its first new token. Vision is timed inside the runs; prefill = TTFT - vision, decode = run - TTFT.
"""

import copy
import functools
import time

import torch

from cnngemma.inference import compiled_generation
from cnngemma.int8 import quantize_int8

from .common import (
    BASELINE,
    IMAGE_TOKEN_ID,
    PROMPT_IDS,
    VARIANTS,
    FirstRunMemory,
    build_cnngemma,
    build_language_model,
    build_paligemma,
    image_size_of,
    num_image_tokens,
    percentile,
    summarize,
    synchronize,
    time_in_rounds,
    weight_megabytes,
)

MODELS = (*VARIANTS, BASELINE)
PATHS = ("eager", "compiled", "int8")
# Targets for mobilenet_single against the PaliGemma design, each on its faster measured path: on a GPU with the
# Gemma-2B decoder, on CPU with the 270M one (where the CPU run measures the eager path, `caption.py`'s default).
TARGETS = [
    {"lm_size": "2b", "batch_size": 256, "metric": "captions/s ratio", "at_least": 5.0},
    {"lm_size": "2b", "batch_size": 32, "metric": "captions/s ratio", "at_least": 2.0},
    {"lm_size": "2b", "batch_size": 32, "metric": "TTFT ratio", "at_most": 1 / 3},
    {"lm_size": "270m", "batch_size": 1, "metric": "latency (s)", "at_most": 1.0},
    {"lm_size": "270m", "batch_size": 32, "metric": "captions/s ratio", "at_least": 10.0},
    {"lm_size": "270m", "batch_size": 1, "metric": "TTFT ratio", "at_most": 0.1},
]


class VisionTimer:
    """Adds up the time each model spends in `get_image_features` (CNNGemma calls it inside its first forward,
    PaliGemma's `generate` before it). Forward hooks would break the compiled decode graph, so this is all it wraps."""

    def __init__(self, model: torch.nn.Module, device: torch.device):
        self.device, self.seconds = device, 0.0
        original = model.model.get_image_features

        @functools.wraps(original)  # generate reads the signature to find the encoder's arguments
        def timed(*args, **kwargs):
            synchronize(device)
            start = time.perf_counter()
            out = original(*args, **kwargs)
            synchronize(device)
            self.seconds += time.perf_counter() - start
            return out

        model.model.get_image_features = timed  # an instance attribute: the model's forward calls it


def _inputs(model, batch: int, device, dtype) -> dict:
    tokens = [IMAGE_TOKEN_ID] * num_image_tokens(model) + PROMPT_IDS
    input_ids = torch.tensor([tokens] * batch, device=device)
    size = image_size_of(model)
    generator = torch.Generator().manual_seed(0)
    pixel_values = torch.randn(batch, 3, size, size, generator=generator).to(device, dtype)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "pixel_values": pixel_values}


def _generate_fn(model, inputs: dict, generate_kwargs: dict, timer: VisionTimer, vision: list):
    def fn():
        timer.seconds = 0.0
        model.generate(**inputs, **generate_kwargs)
        vision.append(timer.seconds)

    return fn


def build_models(args, language_model, device, dtype) -> dict:
    models = {}
    for name in args.models:
        if name == BASELINE:
            model = build_paligemma(language_model, args.baseline_siglip, image_size=args.image_size)
        else:
            model = build_cnngemma(name, language_model, image_size=args.image_size, channels_last=args.channels_last)
        models[name] = model.to(device, dtype)
    return models


def run(args, device, log=print) -> dict:
    dtype = args.torch_dtype
    log(
        f"captioning: LM {' '.join(args.lm_size)}, paths {' '.join(args.paths)}, batches {args.caption_batch_sizes}, "
        f"{args.new_tokens} new tokens, {args.dtype}, {args.caption_rounds} rounds"
    )
    # Every model, batch size and path compiles its own decode graph: more than dynamo's default of 8 per function.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)
    common = {"do_sample": False, "use_cache": True, "pad_token_id": 0, "eos_token_id": 1}
    paths = {"eager": {}, "compiled": compiled_generation(args.backend, device), "int8": {}}
    results, lm_weights = [], {}
    for lm_size in args.lm_size:
        language_model = build_language_model(lm_size).to(device, dtype)
        lm_weights[lm_size] = weight_megabytes(language_model)
        models = build_models(args, language_model, device, dtype)
        variants = {  # (model, path) -> the model that runs it: int8 quantizes its own copy
            (name, path): quantize_int8(copy.deepcopy(model)) if path == "int8" else model
            for name, model in models.items()
            for path in args.paths
        }
        unique = {id(model): model for model in variants.values()}  # eager and compiled share one model object
        timers = {key: VisionTimer(model, device) for key, model in unique.items()}
        with torch.inference_mode():
            for batch in args.caption_batch_sizes:
                log(f" LM {lm_size}, batch {batch}")
                torch._dynamo.reset()  # the graphs of the previous batch size are not needed again
                cases, vision, warmup, memory = {}, {}, {}, FirstRunMemory(device)
                for (name, path), model in variants.items():
                    inputs = _inputs(model, batch, device, dtype)
                    full = {**common, **paths[path], "max_new_tokens": args.new_tokens}
                    full["min_new_tokens"] = args.new_tokens  # every model decodes the same number of steps
                    first = {**common, **paths[path], "max_new_tokens": 1}
                    synchronize(device)
                    start = time.perf_counter()  # the first call: compiles the decode step on the compiled path
                    out = model.generate(**inputs, **full)
                    synchronize(device)
                    warmup[name, path] = time.perf_counter() - start
                    if out.shape[1] - inputs["input_ids"].shape[1] != args.new_tokens:
                        raise RuntimeError(f"{name} ({path}) did not generate {args.new_tokens} tokens.")
                    vision[name, path], key, timer = [], f"{name}|{path}", timers[id(model)]
                    run_fn = _generate_fn(model, inputs, full, timer, vision[name, path])
                    cases[f"{key}|run"] = memory.wrap(f"{key}|run", run_fn)
                    cases[f"{key}|ttft"] = _generate_fn(model, inputs, first, timer, [])
                times = time_in_rounds(
                    cases,
                    args.caption_rounds,
                    args.caption_slice_s,
                    device,
                    on_run=memory.on_run,
                    log=log,
                    budget_s=args.caption_budget_s,
                )
                for (name, path), model in variants.items():
                    runs, ttft = times[f"{name}|{path}|run"], times[f"{name}|{path}|ttft"]
                    results.append(
                        _row(name, model, lm_size, path, batch, runs, ttft, vision[name, path], memory, warmup)
                    )
        del models, variants, language_model, timers
    return {
        "settings": {
            "lm_size": args.lm_size,
            "paths": args.paths,
            "models": args.models,
            "batch_sizes": args.caption_batch_sizes,
            "new_tokens": args.new_tokens,
            "image_size": args.image_size,
            "dtype": args.dtype,
            "device": str(device),
            "compile_backend": args.backend,
            "baseline": f"PaliGemmaForConditionalGeneration + SiglipVisionModel {args.baseline_siglip}",
            "rounds": args.caption_rounds,
            "slice_s": args.caption_slice_s,
            "budget_s": args.caption_budget_s,
            "cnngemma_vision_channels_last": args.channels_last,
            "language_model_weights_mb": lm_weights,
            "memory": "peak rise over the resident weights during one run (CPU: RSS after malloc_trim)",
        },
        "rows": results,
        "summary": _summary(results),
    }


def _row(name, model, lm_size, path, batch, runs, ttft, vision, memory, warmup) -> dict:
    run_median, ttft_median, vision_median = (summarize(v)["median"] for v in (runs, ttft, vision))
    return {
        "model": name,
        "lm_size": lm_size,
        "path": path,
        "batch_size": batch,
        "num_image_tokens": num_image_tokens(model),
        "prompt_tokens": num_image_tokens(model) + len(PROMPT_IDS),
        "captions_per_s": summarize([batch / t for t in runs]),
        # p95 needs at least 5 runs to mean anything; with fewer it is left out (None)
        "latency_s": {"p50": percentile(runs, 0.5), "p95": percentile(runs, 0.95) if len(runs) >= 5 else None},
        "ttft_s": summarize(ttft),
        "split_s": {
            "vision": vision_median,
            "prefill": max(ttft_median - vision_median, 0.0),
            "decode": max(run_median - ttft_median, 0.0),
        },
        "runs": len(runs),
        "first_call_s": warmup[name, path],
        "peak_memory_mb": memory.peaks.get(f"{name}|{path}|run"),
    }


def _summary(rows) -> dict:
    """Per decoder and batch: each model's captions/s and TTFT against the baseline's, on the same path and with
    each on its faster path; then the targets that these rows can check."""
    summary = {}
    for lm_size, batch in dict.fromkeys((r["lm_size"], r["batch_size"]) for r in rows):
        at = [r for r in rows if (r["lm_size"], r["batch_size"]) == (lm_size, batch)]
        names = dict.fromkeys(r["model"] for r in at)
        fastest = {
            n: max((r for r in at if r["model"] == n), key=lambda r: r["captions_per_s"]["median"]) for n in names
        }
        groups = {path: {r["model"]: r for r in at if r["path"] == path} for path in PATHS} | {"fastest": fastest}
        summary[f"{lm_size}/{batch}"] = {
            group: {
                name: {
                    "path": row["path"],
                    "speedup": row["captions_per_s"]["median"] / by_model[BASELINE]["captions_per_s"]["median"],
                    "ttft_ratio": row["ttft_s"]["median"] / by_model[BASELINE]["ttft_s"]["median"],
                }
                for name, row in by_model.items()
            }
            for group, by_model in groups.items()
            if BASELINE in by_model
        }
    summary["targets"] = [_check(target, rows, summary) for target in TARGETS]
    return summary


def _check(target: dict, rows: list, summary: dict) -> dict:
    """mobilenet_single against one target; `measured` stays None where this run lacks the rows."""
    entry = summary.get(f"{target['lm_size']}/{target['batch_size']}", {})
    single = entry.get("fastest", {}).get("mobilenet_single")
    if target["metric"] == "latency (s)":
        cells = [
            r["latency_s"]["p50"]
            for r in rows
            if (r["model"], r["lm_size"], r["batch_size"])
            == ("mobilenet_single", target["lm_size"], target["batch_size"])
        ]
        measured = min(cells, default=None)
    elif single is not None:
        measured = single["speedup"] if target["metric"] == "captions/s ratio" else single["ttft_ratio"]
    else:
        measured = None
    met = None
    if measured is not None:
        met = measured >= target["at_least"] if "at_least" in target else measured <= target["at_most"]
    return {**target, "model": "mobilenet_single", "measured": measured, "met": met}

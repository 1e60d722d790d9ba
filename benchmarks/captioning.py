"""End-to-end captioning: `generate` with greedy search, KV cache and a fixed number of new tokens.

The four CNNGemma variants and the PaliGemma baseline (SigLIP so400m/14) share one decoder, prompt and batch. Each
run is split into vision (`get_image_features`), prefill (the rest of the first forward) and decode (the rest).
"""

import functools
import time

import torch

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

TARGET = {"variant": "mobilenet_single", "batch_size": 32, "speedup": 5.0}


class PhaseTimer:
    """Times `generate`'s phases through the model's own calls: image features, then each forward.

    CNNGemma encodes the image inside its first forward; PaliGemma's `generate` encodes it before (as
    `mm_encoder_outputs`). Either way prefill is the first forward less any vision time inside it.
    """

    def __init__(self, model: torch.nn.Module, device: torch.device):
        self.device = device
        self.reset()
        inner = model.model
        original = inner.get_image_features

        @functools.wraps(original)  # generate reads the signature to find the encoder's arguments
        def timed_image_features(*args, **kwargs):
            synchronize(device)
            start = time.perf_counter()
            out = original(*args, **kwargs)
            synchronize(device)
            elapsed = time.perf_counter() - start
            self.vision += elapsed
            if self._in_forward and not self.forwards:
                self.vision_in_first_forward += elapsed
            return out

        inner.get_image_features = timed_image_features  # instance attribute: the model's forward calls it
        model.register_forward_pre_hook(self._pre)
        model.register_forward_hook(self._post)

    def _pre(self, module, args):
        synchronize(self.device)
        self._in_forward = True
        self._start = time.perf_counter()

    def _post(self, module, args, output):
        synchronize(self.device)
        self.forwards.append(time.perf_counter() - self._start)
        self._in_forward = False

    def reset(self):
        self.vision = 0.0
        self.vision_in_first_forward = 0.0
        self.forwards: list[float] = []
        self._in_forward = False

    def split(self, total: float) -> dict:
        prefill = self.forwards[0] - self.vision_in_first_forward
        return {"vision": self.vision, "prefill": prefill, "decode": total - self.vision - prefill}


def _inputs(model, batch: int, device, dtype) -> dict:
    tokens = [IMAGE_TOKEN_ID] * num_image_tokens(model) + PROMPT_IDS
    input_ids = torch.tensor([tokens] * batch, device=device)
    size = image_size_of(model)
    generator = torch.Generator().manual_seed(0)
    pixel_values = torch.randn(batch, 3, size, size, generator=generator).to(device, dtype)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "pixel_values": pixel_values}


def _generate_case(model, timer: PhaseTimer, inputs: dict, generate_kwargs: dict, phases: list):
    """One timed `generate` call; appends its vision / prefill / decode split to `phases`."""

    def fn():
        timer.reset()
        synchronize(timer.device)
        start = time.perf_counter()
        model.generate(**inputs, **generate_kwargs)
        synchronize(timer.device)
        phases.append(timer.split(time.perf_counter() - start))

    return fn


def build_models(args, language_model, device, dtype) -> dict:
    models = {
        variant: build_cnngemma(
            variant,
            language_model,
            image_size=args.image_size,
            channels_last=args.channels_last,
        ).to(device, dtype)
        for variant in VARIANTS
    }
    models[BASELINE] = build_paligemma(language_model, args.baseline_siglip, image_size=args.image_size).to(
        device, dtype
    )
    return models


def run(args, device, log=print) -> dict:
    dtype = args.torch_dtype
    log(
        f"captioning: LM {args.lm_size}, batches {args.caption_batch_sizes}, {args.new_tokens} new tokens, "
        f"{args.dtype}, {args.caption_rounds} rounds"
    )
    language_model = build_language_model(args.lm_size).to(device, dtype)
    models = build_models(args, language_model, device, dtype)
    timers = {name: PhaseTimer(model, device) for name, model in models.items()}
    generate_kwargs = {
        "max_new_tokens": args.new_tokens,
        "min_new_tokens": args.new_tokens,  # no early <eos>: every model decodes the same number of steps
        "do_sample": False,
        "use_cache": True,
        "pad_token_id": 0,
        "eos_token_id": 1,
    }

    results = []
    with torch.inference_mode():
        for name, model in models.items():  # warm-up at batch 1, and a check that every model decodes the same
            inputs = _inputs(model, 1, device, dtype)
            out = model.generate(**inputs, **generate_kwargs)
            new = out.shape[1] - inputs["input_ids"].shape[1]
            if new != args.new_tokens:
                raise RuntimeError(f"{name} generated {new} tokens, expected {args.new_tokens}.")

        for batch in args.caption_batch_sizes:
            inputs = {name: _inputs(model, batch, device, dtype) for name, model in models.items()}
            phases = {name: [] for name in models}
            memory = FirstRunMemory(device)
            cases = {
                name: memory.wrap(
                    name, _generate_case(model, timers[name], inputs[name], generate_kwargs, phases[name])
                )
                for name, model in models.items()
            }
            log(f" batch {batch}")
            times = time_in_rounds(
                cases,
                args.caption_rounds,
                args.caption_slice_s,
                device,
                on_run=memory.on_run,
                log=log,
                budget_s=args.caption_budget_s,
            )
            for name, model in models.items():
                runs = times[name]
                split = {k: summarize([p[k] for p in phases[name]]) for k in ("vision", "prefill", "decode")}
                results.append(
                    {
                        "model": name,
                        "batch_size": batch,
                        "num_image_tokens": num_image_tokens(model),
                        "prompt_tokens": num_image_tokens(model) + len(PROMPT_IDS),
                        "captions_per_s": summarize([batch / t for t in runs]),
                        "latency_s": {"p50": percentile(runs, 0.5), "p95": percentile(runs, 0.95), **summarize(runs)},
                        "split_s": split,
                        "peak_memory_mb": memory.peaks.get(name),
                        "weights_mb_excluding_shared_lm": weight_megabytes(model) - weight_megabytes(language_model),
                    }
                )
    return {
        "settings": {
            "lm_size": args.lm_size,
            "batch_sizes": args.caption_batch_sizes,
            "new_tokens": args.new_tokens,
            "image_size": args.image_size,
            "dtype": args.dtype,
            "device": str(device),
            "baseline": f"PaliGemmaForConditionalGeneration + SiglipVisionModel {args.baseline_siglip}",
            "rounds": args.caption_rounds,
            "slice_s": args.caption_slice_s,
            "budget_s": args.caption_budget_s,
            "cnngemma_vision_channels_last": args.channels_last,
            "language_model_weights_mb": weight_megabytes(language_model),
            "memory": "peak rise over the resident weights during one run (CPU: RSS after malloc_trim)",
        },
        "rows": results,
        "summary": _summary(results),
    }


def _summary(rows) -> dict:
    """Speedup of each variant's median captions/s over the baseline's, per batch size."""
    summary = {}
    for batch in sorted({r["batch_size"] for r in rows}):
        at = {r["model"]: r for r in rows if r["batch_size"] == batch}
        base = at[BASELINE]["captions_per_s"]["median"]
        summary[str(batch)] = {
            name: {
                "speedup": row["captions_per_s"]["median"] / base,
                # a conservative spread: slowest variant run vs fastest baseline run, and the reverse
                "speedup_min": row["captions_per_s"]["min"] / at[BASELINE]["captions_per_s"]["max"],
                "speedup_max": row["captions_per_s"]["max"] / at[BASELINE]["captions_per_s"]["min"],
            }
            for name, row in at.items()
            if name != BASELINE
        }
    target = summary.get(str(TARGET["batch_size"]), {}).get(TARGET["variant"])
    summary["target"] = {**TARGET, "measured": target["speedup"] if target else None}
    summary["target"]["met"] = bool(target and target["speedup"] >= TARGET["speedup"])
    return summary

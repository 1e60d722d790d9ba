"""Encoder throughput, the report's Table I protocol: a dummy batch at 224 px, a warm-up, timed synchronised runs.

Bare timm CNNs (NCHW and channels_last input), CNNGemma's vision path (`get_image_features`, single and multi), the
multi-mode projector alone and transformers' SiglipVisionModel at base/16 and so400m/14, timed side by side.
"""

import functools

import torch

from .common import VARIANTS, build_cnngemma, build_siglip, summarize, time_in_rounds

# The report's GPU measurement (batch 32, 224 px): images/s and the ratios over SigLIP it implies.
REPORT_GPU = {"mobilenetv3_large_100": 3487.0, "efficientnet_b0": 1584.0, "siglip": 219.0}
TARGETS_DEFAULT_PATH = {"mobilenetv3_large_100": 25.0, "efficientnet_b0": 12.0}
WRAPPER_TARGET = 0.95
LAYOUTS = {"NCHW": torch.contiguous_format, "channels_last input": torch.channels_last}


def path_name(channels_last: bool) -> str:
    """The bare-timm row that feeds the CNN as CNNGemma does with this `vision_channels_last`."""
    return "channels_last input" if channels_last else "NCHW"


def _forward_features(encoder: torch.nn.Module, x: torch.Tensor, memory_format: torch.memory_format):
    # the conversion is inside the timed call, as it is inside `get_image_features`
    return encoder.forward_features(x.contiguous(memory_format=memory_format))


def _cases(args, device, dtype, x, warm_ups: dict):
    """name -> (row metadata, callable). Models are built once, before any timing; cheaper warm-ups go in `warm_ups`."""
    cases = {}
    own_path = path_name(args.channels_last)
    for encoder in ("mobilenetv3_large_100", "efficientnet_b0"):
        variants = {
            variant: build_cnngemma(
                variant, image_size=args.image_size, hidden_size=args.projector_width, channels_last=args.channels_last
            ).to(device, dtype)
            for variant, (name, _mode) in VARIANTS.items()
            if name == encoder
        }
        # the bare rows run the single variant's own tower, so they and CNNGemma's row differ by the wrapper alone
        single = next(m for m in variants.values() if m.config.token_mode == "single")
        for path, memory_format in LAYOUTS.items():
            cases[f"{encoder} (timm, {path})"] = (
                {"encoder": encoder, "kind": "timm", "path": path},
                functools.partial(_forward_features, single.vision_tower, x, memory_format),
            )
        for variant, model in variants.items():
            mode = model.config.token_mode
            cases[f"CNNGemma {variant} (get_image_features)"] = (
                {"encoder": encoder, "kind": "cnngemma", "path": own_path, "token_mode": mode, "variant": variant},
                functools.partial(model.get_image_features, x),
            )
            if mode == "multi":
                grid = model.config.vision_grid
                features = torch.randn(
                    x.shape[0], grid[0] * grid[1], model.config.vision_feature_dim, device=device, dtype=dtype
                )
                cases[f"CNNGemma {variant} projector only"] = (
                    {"encoder": encoder, "kind": "projector", "path": "-", "token_mode": mode, "variant": variant},
                    functools.partial(model.model.multi_modal_projector, features),
                )
    for shape in args.siglip_shapes:
        model = build_siglip(shape, image_size=args.image_size).to(device, dtype)
        name = f"SigLIP {shape.removeprefix('siglip_')} (SiglipVisionModel)"
        cases[name] = ({"encoder": shape, "kind": "siglip", "path": "-"}, functools.partial(model, pixel_values=x))
        # SigLIP's matmuls need no shape-specific set-up: a 2-image warm-up spares a full so400m batch on CPU
        warm_ups[name] = functools.partial(model, pixel_values=x[:2])
    return cases


def run(args, device, log=print) -> dict:
    dtype = args.torch_dtype
    batch = args.batch_size
    torch.manual_seed(0)
    x = torch.randn(batch, 3, args.image_size, args.image_size, device=device, dtype=dtype)
    log(f"encoders: batch {batch}, {args.image_size} px, {args.dtype}, {args.rounds} rounds of >= {args.slice_s}s")
    warm_ups = {}
    built = _cases(args, device, dtype, x, warm_ups)
    calls = {name: fn for name, (_, fn) in built.items()}
    if args.compile:
        calls = {name: torch.compile(fn) for name, fn in calls.items()}
        warm_ups = {}  # the warm-up compiles: it must see the timed shapes

    with torch.inference_mode():
        for name, fn in calls.items():  # warm-up: first-call allocations, oneDNN primitives, compilation
            warm_ups.get(name, fn)()
        times = time_in_rounds(calls, args.rounds, args.slice_s, device, log=log, budget_s=args.budget_s)

    rows = []
    for name, (meta, _) in built.items():
        seconds = summarize(times[name])
        throughput = summarize([batch / t for t in times[name]])
        rows.append({"name": name, **meta, "seconds_per_batch": seconds, "images_per_s": throughput})
    return {
        "settings": {
            "batch_size": batch,
            "image_size": args.image_size,
            "dtype": args.dtype,
            "device": str(device),
            "cnngemma_vision_channels_last": args.channels_last,
            "compile": args.compile,
            "rounds": args.rounds,
            "slice_s": args.slice_s,
            "budget_s": args.budget_s,
            "projector_width": args.projector_width,
            "inference_mode": True,
        },
        "rows": rows,
        "summary": _summary(rows, path_name(args.channels_last)),
        "report_gpu_images_per_s": REPORT_GPU,
    }


def _median(rows, **match) -> float:
    return next(r for r in rows if all(r.get(k) == v for k, v in match.items()))["images_per_s"]["median"]


def _summary(rows, own_path: str) -> dict:
    """Ratios of medians from this run: over SigLIP base/16, channels_last over NCHW, the wrapper, multi-mode cost."""
    has_base16 = any(r["encoder"] == "siglip_base16" for r in rows)
    siglip = _median(rows, encoder="siglip_base16") if has_base16 else _median(rows, kind="siglip")
    summary = {"reference": "siglip_base16" if has_base16 else "first siglip row"}
    for encoder in ("mobilenetv3_large_100", "efficientnet_b0"):
        nchw = _median(rows, kind="timm", encoder=encoder, path="NCHW")
        channels_last = _median(rows, kind="timm", encoder=encoder, path="channels_last input")
        single = _median(rows, kind="cnngemma", encoder=encoder, token_mode="single")
        multi = _median(rows, kind="cnngemma", encoder=encoder, token_mode="multi")
        projector = _median(rows, kind="projector", encoder=encoder)
        wrapper = single / _median(rows, kind="timm", encoder=encoder, path=own_path)
        summary[encoder] = {
            "report_gpu_ratio": REPORT_GPU[encoder] / REPORT_GPU["siglip"],
            "plain_ratio": nchw / siglip,
            "default_path": own_path,
            "default_path_ratio": single / siglip,
            "default_path_target": TARGETS_DEFAULT_PATH[encoder],
            "default_path_target_met": single / siglip >= TARGETS_DEFAULT_PATH[encoder],
            "channels_last_speedup": channels_last / nchw,
            # CNNGemma's single call against the same tower fed the same way: what the pooling and projector cost
            "wrapper_single_vs_bare": wrapper,
            "wrapper_target": WRAPPER_TARGET,
            "wrapper_target_met": wrapper >= WRAPPER_TARGET,
            "multi_vs_single": multi / single,
            # per-image milliseconds the multi-mode projection adds, measured two ways
            "multi_projection_ms_per_image_from_difference": 1000 * (1 / multi - 1 / single),
            "multi_projection_ms_per_image_alone": 1000 / projector,
        }
    return summary

"""Encoder throughput, the report's Table I protocol: a dummy batch at 224 px, a warm-up, timed synchronised runs.

Bare timm CNNs (NCHW, channels_last, channels_last with BatchNorm folded), CNNGemma's own vision path
(`get_image_features`, single and multi), the multi-mode projector alone, and transformers' SiglipVisionModel at
base/16 and so400m/14, all in one run. Then the wrapper rounds: the bare encoder against CNNGemma's call around it,
with an A/A control that shows how far the method itself wanders in this run.
"""

import copy
import functools
import statistics
import time

import torch

from modeling_cnngemma.modeling_cnngemma import fold_batchnorm

from .common import (
    VARIANTS,
    build_cnngemma,
    build_siglip,
    median_interval,
    summarize,
    synchronize,
    time_in_rounds,
)

# The report's GPU measurement (batch 32, 224 px): images/s and the ratios over SigLIP it implies.
REPORT_GPU = {"mobilenetv3_large_100": 3487.0, "efficientnet_b0": 1584.0, "siglip": 219.0}
TARGETS_DEFAULT_PATH = {"mobilenetv3_large_100": 25.0, "efficientnet_b0": 12.0}
WRAPPER_TARGET = 0.95


def path_name(channels_last: bool, fold_batchnorm: bool) -> str:
    """The bare-timm row that runs what CNNGemma's vision path runs with these fast paths."""
    layout = "channels_last" if channels_last else "NCHW"
    return f"{layout} + folded BN" if fold_batchnorm else layout


def _bare_timm(tower: torch.nn.Module, channels_last: bool, fold: bool, example: torch.Tensor):
    """A copy of a CNNGemma vision tower as a bare timm model: the same weights, in the given fast path."""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = copy.deepcopy(tower).to(memory_format=memory_format)
    if fold:
        model, _ = fold_batchnorm(model, example[:1].contiguous(memory_format=memory_format))
    return model, memory_format


def _encoder_run_by(model, compiled: bool) -> torch.nn.Module:
    """The timm module CNNGemma's `get_image_features` runs: the tower itself, or (eager, folding on) the
    BatchNorm-folded copy CNNGemma caches, built here by asking for it. Compiled, CNNGemma runs the tower: the fold
    is not traced."""
    if compiled:
        return model.vision_tower
    with torch.no_grad():  # a tower whose weights need gradients is never folded
        return model.model.inference_vision_tower()


def _forward_features(encoder: torch.nn.Module, x: torch.Tensor, memory_format: torch.memory_format):
    return encoder.forward_features(x.contiguous(memory_format=memory_format))


def default_path_of(args) -> str:
    """The path CNNGemma's vision path runs. Compiled, it runs the unfolded tower: the fold happens outside the graph,
    and inductor fuses each BatchNorm into the pointwise ops after its conv anyway."""
    return path_name(args.channels_last, args.fold_batchnorm and not args.compile)


def _cases(args, device, dtype, x, warm_ups: dict):
    """name -> (row metadata, callable). Models are built once, before any timing; cheaper warm-ups go in `warm_ups`.

    Eager, the bare timm rows run three paths (NCHW, channels_last, channels_last + folded BN) and CNNGemma's own.
    Compiled, only CNNGemma's own: inductor chooses the conv layout itself, and each compile costs tens of seconds.
    """
    cases = {}
    default_path = default_path_of(args)
    own_path = (args.channels_last, args.fold_batchnorm and not args.compile)
    bare_paths = [] if args.compile else [(False, False), (True, False), (True, True)]
    if own_path not in bare_paths:
        bare_paths.append(own_path)
    for encoder in ("mobilenetv3_large_100", "efficientnet_b0"):
        variants = {}
        for variant, (name, _mode) in VARIANTS.items():
            if name == encoder:
                variants[variant] = build_cnngemma(
                    variant,
                    image_size=args.image_size,
                    hidden_size=args.projector_width,
                    channels_last=args.channels_last,
                    fold_batchnorm=args.fold_batchnorm,
                ).to(device, dtype)
        # Bare rows run the single variant's weights, so only the wrapper and the paths differ. On CNNGemma's own path
        # the bare row runs the very module `get_image_features` runs: that row and CNNGemma's differ by the code
        # around the encoder and nothing else (a second copy of the weights would add where its tensors lie in memory).
        single = next(m for m in variants.values() if m.config.token_mode == "single")
        for channels_last, fold in bare_paths:
            is_own = (channels_last, fold) == own_path
            if is_own:
                model, memory_format = _encoder_run_by(single, args.compile), single.model.vision_memory_format
            else:
                model, memory_format = _bare_timm(single.vision_tower, channels_last, fold, x)
            path = path_name(channels_last, fold)
            cases[f"{encoder} (timm, {path})"] = (
                {"encoder": encoder, "kind": "timm", "path": path, "cnngemma_module": is_own},
                functools.partial(_forward_features, model, x, memory_format),
            )
        for variant, model in variants.items():
            mode = model.config.token_mode
            cases[f"CNNGemma {variant} (get_image_features)"] = (
                {"encoder": encoder, "kind": "cnngemma", "path": default_path, "token_mode": mode, "variant": variant},
                functools.partial(model.get_image_features, x),
            )
            if mode == "multi":
                grid = model.config.vision_grid
                features = torch.randn(
                    x.shape[0], grid[0] * grid[1], model.config.vision_feature_dim, device=device, dtype=dtype
                )
                projector = model.model.multi_modal_projector
                cases[f"CNNGemma {variant} projector only"] = (
                    {
                        "encoder": encoder,
                        "kind": "projector",
                        "path": "default",
                        "token_mode": mode,
                        "variant": variant,
                    },
                    lambda p=projector, f=features: p(f),
                )
    for shape in args.siglip_shapes:
        model = build_siglip(shape, image_size=args.image_size).to(device, dtype)
        cases[f"SigLIP {shape.removeprefix('siglip_')} (SiglipVisionModel)"] = (
            {"encoder": shape, "kind": "siglip", "path": "plain"},
            lambda m=model: m(pixel_values=x),
        )
        # SigLIP's matmuls need no shape-specific set-up: a 2-image warm-up spares a full so400m batch on CPU
        warm_ups[f"SigLIP {shape.removeprefix('siglip_')} (SiglipVisionModel)"] = lambda m=model: m(pixel_values=x[:2])
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
        default_path = default_path_of(args)
        wrapper = {
            encoder: wrapper_rounds(
                calls[f"{encoder} (timm, {default_path})"],
                calls[f"CNNGemma {variant} (get_image_features)"],
                args.wrapper_rounds,
                device,
                log=log,
                label=encoder,
            )
            for variant, (encoder, mode) in VARIANTS.items()
            if mode == "single"
        }

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
            "cnngemma_vision_fold_batchnorm": args.fold_batchnorm,
            "compile": args.compile,
            "rounds": args.rounds,
            "slice_s": args.slice_s,
            "budget_s": args.budget_s,
            "wrapper_rounds": args.wrapper_rounds,
            "projector_width": args.projector_width,
            "inference_mode": True,
        },
        "rows": rows,
        "summary": _summary(rows, default_path, wrapper),
        "report_gpu_images_per_s": REPORT_GPU,
    }


# Each wrapper round runs the bare encoder twice and CNNGemma's call once, every call in every place by turns.
ROUND_ORDERS = (("bare", "wrapped", "again"), ("wrapped", "again", "bare"), ("again", "bare", "wrapped"))


def wrapper_rounds(bare, wrapped, rounds: int, device, log=None, label: str = "") -> dict[str, list[float]]:
    """Per round, "wrapper": the mean of the two bare times over the wrapped time, and "control": the first bare time
    over the second, an A/A ratio of one call against itself.

    The machine's speed drifts by tens of percent within minutes, more than the few percent the wrapper costs;
    a ratio of calls a moment apart cancels most of the drift that a ratio of two medians keeps. What it leaves shows
    in the control: its spread is the method's own noise in this run (a little more than the wrapper ratio's, which
    averages two bare calls). Rounds in multiples of 3 give each call each place equally often. `log` hears the
    medians so far five times along the way and at the end.
    """
    calls = {"bare": bare, "wrapped": wrapped, "again": bare}
    ratios = {"wrapper": [], "control": []}
    for index in range(rounds):
        seconds = {}
        for name in ROUND_ORDERS[index % len(ROUND_ORDERS)]:
            synchronize(device)
            start = time.perf_counter()
            calls[name]()
            synchronize(device)
            seconds[name] = time.perf_counter() - start
        ratios["wrapper"].append((seconds["bare"] + seconds["again"]) / 2 / seconds["wrapped"])
        ratios["control"].append(seconds["bare"] / seconds["again"])
        if log is not None and ((index + 1) % max(rounds // 5, 1) == 0 or index + 1 == rounds):
            so_far = {k: statistics.median(v) for k, v in ratios.items()}
            log(f"  {label} wrapper round {index + 1}/{rounds}: {so_far['wrapper']:.3f}, A/A {so_far['control']:.3f}")
    return ratios


def _median(rows, **match) -> float | None:
    for row in rows:
        if all(row.get(k) == v for k, v in match.items()):
            return row["images_per_s"]["median"]
    return None


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    return numerator / denominator if numerator is not None and denominator is not None else None


def _summary(rows, default_path: str, wrapper: dict[str, dict[str, list[float]]]) -> dict:
    """Ratios over SigLIP base/16 (plain and default path), fast-path speedups, wrapper overhead, multi-mode cost.

    A ratio whose rows were not measured (the NCHW and channels_last bare rows under --compile) is None.
    """
    siglip = _median(rows, kind="siglip", encoder="siglip_base16") or _median(rows, kind="siglip")
    summary = {"reference": "siglip_base16" if _median(rows, encoder="siglip_base16") else "first siglip row"}
    report_ratio = {k: REPORT_GPU[k] / REPORT_GPU["siglip"] for k in ("mobilenetv3_large_100", "efficientnet_b0")}
    for encoder in ("mobilenetv3_large_100", "efficientnet_b0"):
        plain = _median(rows, kind="timm", encoder=encoder, path=path_name(False, False))
        cl = _median(rows, kind="timm", encoder=encoder, path=path_name(True, False))
        cl_folded = _median(rows, kind="timm", encoder=encoder, path=path_name(True, True))
        bare_default = _median(rows, kind="timm", encoder=encoder, path=default_path)
        single = _median(rows, kind="cnngemma", encoder=encoder, token_mode="single")
        multi = _median(rows, kind="cnngemma", encoder=encoder, token_mode="multi")
        projector = _median(rows, kind="projector", encoder=encoder)
        paired, control = summarize(wrapper[encoder]["wrapper"]), summarize(wrapper[encoder]["control"])
        summary[encoder] = {
            "report_gpu_ratio": report_ratio[encoder],
            "plain_ratio": _ratio(plain, siglip),
            "default_path": default_path,
            "default_path_ratio": single / siglip,
            "default_path_target": TARGETS_DEFAULT_PATH[encoder],
            "default_path_target_met": single / siglip >= TARGETS_DEFAULT_PATH[encoder],
            "channels_last_speedup": _ratio(cl, plain),
            "fold_batchnorm_speedup": _ratio(cl_folded, cl),  # on top of channels_last
            "default_path_speedup": _ratio(single, plain),  # CNNGemma's single path against the bare NCHW encoder
            # the wrapper against the bare timm module it runs: the wrapper rounds (the target) with their A/A
            # control, and the ratio of the two rows' medians above
            "wrapper_single_vs_bare": paired["median"],
            "wrapper_single_vs_bare_paired": paired,
            "wrapper_single_vs_bare_ci95": median_interval(wrapper[encoder]["wrapper"]),
            "wrapper_control": control,
            "wrapper_control_ci95": median_interval(wrapper[encoder]["control"]),
            "wrapper_single_vs_bare_medians": single / bare_default,
            "wrapper_target": WRAPPER_TARGET,
            "wrapper_target_met": paired["median"] >= WRAPPER_TARGET,
            "multi_vs_single": multi / single,
            # per-image milliseconds the multi-mode projection adds, measured two ways
            "multi_projection_ms_per_image_from_difference": 1000 * (1 / multi - 1 / single),
            "multi_projection_ms_per_image_alone": 1000 / projector if projector else None,
        }
    return summary

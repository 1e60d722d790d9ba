"""Shared pieces of the benchmarks: the model shapes, builders that share one decoder, and timing in rounds.

Every model is randomly initialised (speed does not depend on the weights) and nothing touches the network.
"""

import ctypes
import datetime
import json
import os
import platform
import random
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModel

# Decoder shapes, read from the shipped configs so that they never drift from them: "tiny", "270m" (Gemma 3 270M,
# mobilenet_single_270m.json) and "2b" (PaliGemma-3B's Gemma-2B, mobilenet_single.json).
_TINY_JSON = Path(__file__).resolve().parents[1] / "configuration" / "tiny.json"
LM_SHAPES = {
    "tiny": json.loads(_TINY_JSON.read_text())["text_config"],
    "270m": json.loads((_TINY_JSON.parent / "mobilenet_single_270m.json").read_text())["text_config"],
    "2b": json.loads((_TINY_JSON.parent / "mobilenet_single.json").read_text())["text_config"],
}

# SigLIP vision towers: base/16-224 (google/siglip-base-patch16-224) and so400m/14 (PaliGemma's, here at 224 px).
SIGLIP_SHAPES = {
    "siglip_base16": {
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "patch_size": 16,
    },
    "siglip_so400m14": {
        "hidden_size": 1152,
        "intermediate_size": 4304,
        "num_hidden_layers": 27,
        "num_attention_heads": 16,
        "patch_size": 14,
    },
    # --quick only: the same code path at a size the test suite can afford
    "siglip_tiny": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "patch_size": 16,
    },
}

VARIANTS = {
    "mobilenet_single": ("mobilenetv3_large_100", "single"),
    "mobilenet_multi": ("mobilenetv3_large_100", "multi"),
    "efficientnet_single": ("efficientnet_b0", "single"),
    "efficientnet_multi": ("efficientnet_b0", "multi"),
}
BASELINE = "paligemma_so400m"

# One id for `<image>` in every model; the weights are random, so which id it is does not change the cost.
IMAGE_TOKEN_ID = 4
PROMPT_IDS = [2, 10, 11, 12]  # <bos> "caption" "en" "\n": the prompt every model gets after its image tokens

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ---------------------------------------------------------------------------------------------------- builders
def text_config(lm_size: str):
    shape = dict(LM_SHAPES[lm_size])
    return AutoConfig.for_model(shape.pop("model_type"), **shape)


def stub_text_config(hidden_size: int) -> dict:
    """A 1-layer, 16-token decoder of the right width: models are built with it, then get the shared decoder."""
    return {
        "model_type": "gemma",
        "hidden_size": hidden_size,
        "num_hidden_layers": 1,
        "intermediate_size": 8,
        "num_attention_heads": 1,
        "num_key_value_heads": 1,
        "head_dim": 8,
        "vocab_size": 16,
    }


def build_language_model(lm_size: str, seed: int = 0) -> nn.Module:
    """The decoder (no head) that every captioning/training model shares, so they all run the same weights."""
    torch.manual_seed(seed)
    return AutoModel.from_config(text_config(lm_size)).eval()


def attach_language_model(model: nn.Module, language_model: nn.Module) -> nn.Module:
    """Swaps the shared decoder (and a head tied to its embeddings) into a model built with the stub decoder."""
    model.model.language_model = language_model
    embeddings = language_model.get_input_embeddings().weight
    model.lm_head = nn.Linear(embeddings.shape[1], embeddings.shape[0], bias=False, device="meta")
    model.lm_head.weight = embeddings
    model.config.text_config = language_model.config
    return model


def build_cnngemma(
    variant: str,
    language_model: nn.Module | None = None,
    image_size: int = 224,
    hidden_size: int | None = None,
    channels_last: bool = True,
    seed: int = 0,
) -> nn.Module:
    """A CNNGemma variant. Without `language_model` it keeps the 1-layer stub: enough for `get_image_features`."""
    from modeling_cnngemma import CNNGemmaConfig, CNNGemmaForConditionalGeneration

    vision_model_name, token_mode = VARIANTS[variant]
    hidden = language_model.config.hidden_size if language_model is not None else hidden_size
    config = CNNGemmaConfig(
        vision_model_name=vision_model_name,
        token_mode=token_mode,
        image_size=image_size,
        text_config=stub_text_config(hidden),
        image_token_id=IMAGE_TOKEN_ID,
        vision_channels_last=channels_last,
    )
    torch.manual_seed(seed)
    model = CNNGemmaForConditionalGeneration(config)
    if language_model is not None:
        attach_language_model(model, language_model)
    return model.eval()


def siglip_vision_config(shape: str, image_size: int = 224, use_head: bool = True):
    from transformers import SiglipVisionConfig

    return SiglipVisionConfig(**SIGLIP_SHAPES[shape], image_size=image_size, vision_use_head=use_head)


def build_siglip(shape: str, image_size: int = 224, seed: int = 0) -> nn.Module:
    """transformers' SiglipVisionModel with random init, as the report measured it (pooling head included)."""
    from transformers import SiglipVisionModel

    torch.manual_seed(seed)
    return SiglipVisionModel(siglip_vision_config(shape, image_size)).eval()


def build_paligemma(
    language_model: nn.Module, siglip: str = "siglip_so400m14", image_size: int = 224, seed: int = 0
) -> nn.Module:
    """The baseline: PaliGemmaForConditionalGeneration with a SigLIP tower and the shared decoder."""
    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration

    hidden = language_model.config.hidden_size
    config = PaliGemmaConfig(
        vision_config=siglip_vision_config(siglip, image_size, use_head=False).to_dict(),
        text_config=stub_text_config(hidden),
        image_token_index=IMAGE_TOKEN_ID,
        projection_dim=hidden,
    )
    torch.manual_seed(seed)
    model = PaliGemmaForConditionalGeneration(config)
    # transformers 5.24: with a static cache, generate pre-builds PaliGemma's masks, as a dict for a sliding-window
    # decoder (Gemma 3 270M), which PaliGemma's own forward cannot take. Passing the 2D mask on lets it build them.
    model.create_masks_for_generate = lambda attention_mask=None, **_: attention_mask
    return attach_language_model(model, language_model).eval()


def num_image_tokens(model: nn.Module) -> int:
    config = model.config
    if config.model_type == "paligemma":
        return (config.vision_config.image_size // config.vision_config.patch_size) ** 2
    return config.num_image_tokens


def image_size_of(model: nn.Module) -> int:
    config = model.config
    return config.vision_config.image_size if config.model_type == "paligemma" else config.image_size


def weight_megabytes(module: nn.Module) -> float:
    """Unique parameters and buffers, in MB (a tied head counts once)."""
    tensors = {id(t): t for t in [*module.parameters(), *module.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values()) / 2**20


# ---------------------------------------------------------------------------------------------------- timing
def synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def summarize(values: list[float]) -> dict:
    """Median, quartiles, min and max of a list of measurements."""
    ordered = sorted(values)
    if len(ordered) >= 2:
        q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive")
    else:
        q1 = q3 = ordered[0]
    return {
        "median": statistics.median(ordered),
        "q1": q1,
        "q3": q3,
        "min": ordered[0],
        "max": ordered[-1],
        "n": len(ordered),
    }


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    position = (len(ordered) - 1) * q
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def time_in_rounds(
    cases: dict[str, Callable[[], object]],
    rounds: int,
    slice_s: float,
    device: torch.device,
    on_run: Callable[[str, int], None] | None = None,
    log: Callable[[str], None] = print,
    budget_s: float | None = None,
) -> dict[str, list[float]]:
    """Seconds per call of each case, measured in interleaved rounds so that load from other processes hits all alike.

    In each round every case runs once, then again until `slice_s` seconds of that round have passed: cheap cases
    collect many runs, an expensive one (SigLIP so400m) one per round. A case that has spent `budget_s` timed seconds
    sits out the remaining rounds, so each case gets `rounds` rounds or `budget_s` seconds, whichever comes first
    (the report's CPU protocol: at least 5 runs or 30 s). Each round runs the cases in a different (seeded) order,
    so no case always follows the same one: on CPU the case before changes what is left in the caches.
    `on_run(name, round)` is called before the first run of each case in each round (the memory probe uses it).
    """
    times = {name: [] for name in cases}
    for round_index in range(rounds):
        order = list(cases)
        random.Random(round_index).shuffle(order)
        for name in order:
            fn = cases[name]
            if budget_s is not None and sum(times[name]) >= budget_s:
                continue
            if on_run is not None:
                on_run(name, round_index)
            round_start = time.perf_counter()
            while True:
                synchronize(device)
                start = time.perf_counter()
                fn()
                synchronize(device)
                times[name].append(time.perf_counter() - start)
                if time.perf_counter() - round_start >= slice_s:
                    break
        log(f"  round {round_index + 1}/{rounds}: " + ", ".join(f"{n} {t[-1]:.3f}s" for n, t in times.items()))
    return times


# ---------------------------------------------------------------------------------------------------- memory
class PeakMemory:
    """Peak memory of a block: CUDA's allocator statistics, or on CPU the process RSS sampled every millisecond.

    On CPU the allocator's free pages are handed back first (glibc `malloc_trim`), so the RSS rise is the memory the
    block itself touches: activations, caches, gradients and optimizer state, not the weights already resident.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_mb = 0.0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            return self
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc: pages the allocator kept may hide part of the rise
            pass
        self._start = self._peak = _rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.001):
            self._peak = max(self._peak, _rss_bytes())

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mb = (torch.cuda.max_memory_allocated(self.device) - self._start) / 2**20
            return False
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, _rss_bytes())
        self.peak_mb = (self._peak - self._start) / 2**20
        return False


class FirstRunMemory:
    """Wraps timed cases so that each one's first run (round 0) also records its peak memory (`PeakMemory`)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peaks: dict[str, float] = {}
        self._pending: set[str] = set()

    def on_run(self, name: str, round_index: int):
        if round_index == 0:
            self._pending.add(name)

    def wrap(self, name: str, fn: Callable[[], object]) -> Callable[[], object]:
        def wrapped():
            if name not in self._pending:
                return fn()
            self._pending.discard(name)
            with PeakMemory(self.device) as memory:
                out = fn()
            self.peaks[name] = memory.peak_mb
            return out

        return wrapped


_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE_SIZE
    except OSError:  # not Linux
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ---------------------------------------------------------------------------------------------------- context
def machine_info(device: torch.device) -> dict:
    import timm
    import transformers

    info = {
        "date": datetime.date.today().isoformat(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "timm": timm.__version__,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    if hasattr(os, "getloadavg"):
        info["load_average_at_start"] = [round(x, 2) for x in os.getloadavg()]
    return info

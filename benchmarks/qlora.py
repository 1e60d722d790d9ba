"""QLoRA against bf16 LoRA on one GPU: the same CNNGemma (mobilenet_single) and the same LoRA adapters on the
attention projections, with the decoder in bf16 or in 4-bit NF4. The decoder has random weights of the --lm-size
shape, saved once and loaded by transformers' `from_pretrained` (with `BitsAndBytesConfig` for NF4) and
`device_map={'': device}`. Reports peak GPU memory and steps/s of each, and their ratios.

    python -m benchmarks.qlora --lm-size 2b --output-dir results/gpu --tag gpu_qlora_2b
    python -m benchmarks.qlora --quick --device cpu          # the code path in seconds, tiny shapes
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from peft import LoraConfig, inject_adapter_in_model
from transformers import AutoModel

from cnngemma.adapters import nf4_config, prepare_kbit_training

from .common import build_cnngemma, build_language_model, summarize, synchronize
from .training import LORA_TARGETS, _batch, _step_fn


def load_decoder(folder: Path, four_bit: bool, device: torch.device):
    kwargs = {"quantization_config": nf4_config(device)} if four_bit else {}
    return AutoModel.from_pretrained(folder, dtype=torch.bfloat16, device_map={"": device}, **kwargs)


def measure(folder: Path, four_bit: bool, args, device: torch.device) -> dict:
    started = time.perf_counter()
    language_model = load_decoder(folder, four_bit, device)
    model = build_cnngemma("mobilenet_single", language_model, image_size=args.image_size)
    model.model.vision_tower.to(device)  # the CNN and projector in float32, as train_hf.py keeps them
    model.model.multi_modal_projector.to(device)
    if four_bit:  # what train_hf.py --load_in_4bit does: peft's k-bit preparation, then the projector trains again
        model = prepare_kbit_training(model, gradient_checkpointing=False)
    model.requires_grad_(False)
    inject_adapter_in_model(LoraConfig(r=16, lora_alpha=16, target_modules=LORA_TARGETS), language_model)
    language_model.to(device)
    model.model.multi_modal_projector.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    batch = _batch(
        model, args.batch_size, args.caption_tokens, language_model.config.vocab_size, device, torch.float32
    )
    step = _step_fn(model, batch, optimizer, args.caption_tokens)
    step()  # warm-up: kernels and the AdamW state
    synchronize(device)
    loaded = time.perf_counter() - started
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(args.steps):
        tick = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - tick)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    result = {
        "decoder": "nf4" if four_bit else "bf16",
        "load_and_warmup_s": loaded,
        "seconds_per_step": summarize(times),
        "steps_per_s": 1 / summarize(times)["median"],
        "peak_memory_mb": peak,
        "trainable_parameters": sum(p.numel() for p in params),
    }
    del model, language_model, optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lm-size", default="2b", choices=("270m", "2b"), help="The decoder's shape (default 2b).")
    parser.add_argument("--batch-size", type=int, default=8, help="Training pairs per step (default 8).")
    parser.add_argument("--steps", type=int, default=10, help="Timed steps per precision (default 10).")
    parser.add_argument("--caption-tokens", type=int, default=24, help="Caption tokens per pair (default 24).")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--device", default="cuda", help="torch device (default cuda).")
    parser.add_argument("--quick", action="store_true", help="Tiny shapes, 2 steps: the code path only.")
    parser.add_argument("--output-dir", type=Path, default=Path("outputs/benchmarks-quick"))
    parser.add_argument("--tag", default="qlora")
    args = parser.parse_args(argv)
    if args.quick:
        args.lm_size, args.batch_size, args.steps, args.image_size, args.caption_tokens = "tiny", 2, 2, 64, 4
    path = args.output_dir / f"{args.tag}.json"
    if path.exists() and "speed_ratio" not in path.read_text(errors="replace"):  # before minutes of work
        parser.error(f"{path} exists and is not an earlier output of this script; pass another --tag or --output-dir.")
    device = torch.device(args.device)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        build_language_model(args.lm_size).to(torch.bfloat16).save_pretrained(folder)  # random weights, once
        for four_bit in (False, True):
            rows.append(measure(Path(folder), four_bit, args, device))
            print(json.dumps(rows[-1]), flush=True)
    bf16, nf4 = rows
    result = {
        "settings": {**{k: v for k, v in vars(args).items() if k != "output_dir"}, "lora": "r 16 on q/k/v/o"},
        "rows": rows,
        "memory_ratio": nf4["peak_memory_mb"] / bf16["peak_memory_mb"] if bf16["peak_memory_mb"] else None,
        "speed_ratio": nf4["steps_per_s"] / bf16["steps_per_s"],
    }
    args.output_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}: NF4/bf16 peak memory {result['memory_ratio']}, steps/s {result['speed_ratio']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
